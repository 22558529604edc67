"""Prefix caching and chunked prefill: the block manager's and the scheduler's rules (pure logic),
then whole engines in this process: outputs with both features on equal outputs with both off,
across shared prefixes, preemption, aborts and KV handoffs (failed ones too), and every block
ends free or cached."""
import random

import pytest

from pdserve.common.block_hash import block_hashes
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.kv_events import KVEventLog
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.sequence import SamplingParams, Sequence


def seq(request_id: str, tokens) -> Sequence:
    return Sequence(request_id, list(tokens), SamplingParams())


def compute(bm: BlockManager, s: Sequence) -> None:
    """What a step does to a sequence's bookkeeping: all its tokens computed, full blocks shared."""
    s.num_cached_tokens = s.num_tokens
    bm.commit(s)


# ---- block manager ------------------------------------------------------------------------------
def test_a_repeated_prompt_reuses_full_blocks_but_never_its_last_token():
    events = KVEventLog()
    bm = BlockManager(num_blocks=16, block_size=4, events=events)
    a = seq("a", range(10))                  # blocks [0-3] [4-7] [8-9]
    assert bm.allocate(a) and a.num_cached_tokens == 0 and len(a.block_table) == 3
    compute(bm, a)
    assert bm.num_cached_blocks == 2          # the partial block is not shared
    assert set(events.since(0).stored) == set(block_hashes(list(range(10)), 4))
    b = seq("b", list(range(8)) + [99, 98])  # same first 8 tokens
    assert bm.allocate(b) and b.num_cached_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert bm.ref_counts[a.block_table[0]] == 2
    c = seq("c", range(8))                    # exactly two full blocks: the last token is computed again
    assert bm.allocate(c) and c.num_cached_tokens == 4 and c.block_table[0] == a.block_table[0]
    assert c.block_table[1] != a.block_table[1]
    assert (bm.query_tokens, bm.hit_tokens) == (10 + 10 + 8, 8 + 4)


def test_blocks_are_registered_only_once_computed_and_a_different_prefix_misses():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq("a", range(12))
    bm.allocate(a)
    b = seq("b", range(12))
    bm.allocate(b)
    assert b.num_cached_tokens == 0           # a's KV is not computed yet: nothing to share
    compute(bm, a)
    compute(bm, b)                            # same content: b's blocks stay private
    assert bm.num_cached_blocks == 3
    d = seq("d", [7] + list(range(1, 13)))    # differs in the first token: no block matches
    bm.allocate(d)
    assert d.num_cached_tokens == 0


def test_shared_blocks_live_until_their_last_user_and_then_stay_cached():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = seq("a", range(9)), seq("b", range(9))
    bm.allocate(a)
    compute(bm, a)
    bm.allocate(b)
    shared = a.block_table[:2]
    bm.free(a)                                # preemption, abort or finish of a: b still reads them
    assert all(bm.ref_counts[x] == 1 for x in shared) and not set(shared) & set(bm.free_queue)
    bm.free(b)
    assert bm.num_free_blocks == 8 and bm.num_cached_blocks == 2 and set(shared) <= set(bm.free_queue)
    again = seq("again", range(9))
    assert bm.allocate(again) and again.num_cached_tokens == 8 and again.block_table[:2] == shared


def test_eviction_is_least_recently_freed_first_and_plain_blocks_go_before_cached_ones():
    events = KVEventLog()
    bm = BlockManager(num_blocks=6, block_size=2, events=events)
    old, new = seq("old", [1, 2, 3]), seq("new", [4, 5, 6])
    for s in (old, new):
        bm.allocate(s)
        compute(bm, s)
    bm.free(old)
    bm.free(new)
    cursor = events.since(0).event_id
    # 6 blocks: 2 never used, 2 plain (partial tails), 2 cached; a 4-block request spares the cached ones
    filler = seq("filler", [9] * 7)
    assert bm.allocate(filler) and bm.num_cached_blocks == 2
    bm.free(filler)
    # 6 more blocks needed: the old prompt's block is evicted before the new one's
    big = seq("big", [8] * 11)
    assert bm.allocate(big) and bm.num_cached_blocks == 0
    changes = events.since(cursor)
    assert set(changes.removed) == set(block_hashes([1, 2, 3], 2) + block_hashes([4, 5, 6], 2))
    assert bm.allocate(seq("full", [1])) is False  # nothing left; nothing taken
    assert bm.num_free_blocks == 0


def test_prefix_caching_off_shares_nothing():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = seq("a", range(9))
    bm.allocate(a)
    compute(bm, a)
    b = seq("b", range(9))
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and bm.num_cached_blocks == 0


def test_kv_event_log_gives_net_changes_and_resets_stale_cursors():
    log = KVEventLog(max_events=4)
    log.stored(1)
    log.stored(2)
    first = log.since(0)
    assert first.reset and set(first.stored) == {1, 2}
    log.removed(1)
    log.stored(3)
    batch = log.since(first.event_id)
    assert not batch.reset and set(batch.stored) == {3} and set(batch.removed) == {1}
    assert log.since(batch.event_id).stored == () and not log.since(batch.event_id).reset
    for h in range(10, 16):
        log.stored(h)                          # the log keeps 4 events: the old cursor is too old
    stale = log.since(batch.event_id)
    assert stale.reset and set(stale.stored) == {2, 3, *range(10, 16)}
    assert log.since(10 ** 9).reset            # a cursor from a former process of this address
    fresh = KVEventLog()
    empty = fresh.since(0)                     # a caller that asked before any event ...
    fresh.stored(7)
    later = fresh.since(empty.event_id)        # ... gets changes, not a reset that would wipe its view
    assert empty.reset and not later.reset and later.stored == (7,)


# ---- scheduler ------------------------------------------------------------------------------------
def finish_step(sched: Scheduler, step, token: int = 0) -> None:
    """Marks the step computed and gives every sequence that reached its end a new token."""
    sched.computed(step)
    for s in [s for s, _ in step.prefills] + step.decodes:
        if s.num_uncomputed_tokens == 0:
            s.output_token_ids.append(token)


def test_chunked_prefill_serves_decodes_first_and_splits_long_prompts():
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10)
    short = seq("short", range(3))
    sched.add(short)
    step = sched.schedule()
    assert step.prefills == [(short, 3)]
    finish_step(sched, step)
    long = seq("long", range(100, 125))       # 25 tokens, budget 10: pieces of 9, 9, 7 beside the decode
    sched.add(long)
    pieces = []
    while True:
        step = sched.schedule()
        assert step.decodes == [short] and step.num_tokens <= 10
        pieces += [n for s, n in step.prefills]
        finish_step(sched, step)
        if long.num_uncomputed_tokens <= 1:
            break
    assert pieces == [9, 9, 7] and len(long.output_token_ids) == 1
    assert sched.waiting_prefill_tokens == 0


def test_whole_prompt_mode_runs_prefill_and_decode_steps_apart():
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=2048, enable_chunked_prefill=False)
    a = seq("a", range(3))
    sched.add(a)
    finish_step(sched, sched.schedule())
    b = seq("b", range(50, 80))
    sched.add(b)
    step = sched.schedule()
    assert step.prefills == [(b, 30)] and not step.decodes
    finish_step(sched, step)
    step = sched.schedule()
    assert step.decodes == [a, b] and not step.prefills


def test_a_preempted_sequence_resumes_from_its_cached_blocks():
    bm = BlockManager(num_blocks=6, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=8)
    a = seq("a", range(4))
    sched.add(a)
    finish_step(sched, sched.schedule())      # a: 5 tokens in 2 blocks
    b = seq("b", range(10, 26))               # 16 tokens: 4 blocks, the pool is full
    sched.add(b)
    step = sched.schedule()
    assert step.decodes == [a] and step.prefills == [(b, 7)]
    while not sched.num_preemptions:          # b, admitted last, goes when a block runs out
        finish_step(sched, step)
        step = sched.schedule()
    assert list(sched.waiting) == [b] and b.block_table == [] and bm.num_cached_blocks >= 4
    sched.finish(a, "stop")
    step = sched.schedule()
    # b comes back with its 4 full prompt blocks from the cache: only what follows is computed
    assert step.prefills == [(b, b.num_tokens - 16)] and b.num_cached_tokens == 16


@pytest.mark.parametrize("seed", range(3))
def test_random_traffic_never_leaks_or_double_frees_a_block(seed):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=24, block_size=4)
    sched = Scheduler(bm, max_num_seqs=6, max_num_batched_tokens=rng.choice([5, 16, 64]))
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(4, 20))] for _ in range(3)]
    live: list[Sequence] = []
    for i in range(300):
        if rng.random() < 0.3:
            s = seq(f"r{i}", rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 9))])
            s.params = SamplingParams(max_tokens=rng.randrange(1, 12))
            sched.add(s)
            live.append(s)
        if live and rng.random() < 0.05:
            victim = live.pop(rng.randrange(len(live)))
            sched.finish(victim, "abort")
        step = sched.schedule()
        finish_step(sched, step, token=rng.randrange(50))
        for s in [s for s in live if len(s.output_token_ids) >= s.params.max_tokens]:
            sched.finish(s, "length")
            live.remove(s)
        in_use = [b for s in sched.running + list(sched.awaiting_kv.values()) for b in s.block_table]
        assert sorted(b for b in range(24) if bm.ref_counts[b]) == sorted(set(in_use))
        assert len(bm.free_queue) + len(set(in_use)) == 24
    for s in live:
        sched.finish(s, "abort")
    assert bm.num_free_blocks == 24 and not any(bm.ref_counts)


# ---- whole engines, in this process ------------------------------------------------------------
from pdserve.engine.config import EngineConfig  # noqa: E402
from pdserve.engine.kv_transport import KVDestination, KVTransport  # noqa: E402
from pdserve.engine.llm_engine import LLMEngine  # noqa: E402


class LocalTransport(KVTransport):
    """Copies blocks between pools of this process: the handoff's rules without Mooncake."""
    pools: dict = {}
    name = "local"

    def __init__(self, session: str):
        self.session, self.fail_next, self.written = session, 0, 0

    def register_pool(self, pool):
        self.pool = LocalTransport.pools[self.session] = pool

    def handshake(self) -> dict:
        return {"transport": "local", "protocol": "copy", "session": self.session, "base_address": 0,
                "block_bytes": self.pool[0, 0].numel() * self.pool.element_size(), "layer_stride": 0}

    def submit_layer(self, peer: KVDestination, layer: int, src_blocks, dst_blocks):
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("link down")
        LocalTransport.pools[peer.session][list(dst_blocks), layer] = self.pool[list(src_blocks), layer]
        self.written += len(src_blocks) if layer == 0 else 0
        return None, len(src_blocks) * peer.block_bytes

    def wait(self, handles) -> None:
        pass


@pytest.fixture(scope="module")
def f64_model(tmp_path_factory):
    from pdserve_testing.harness import make_model
    return make_model(str(tmp_path_factory.mktemp("pc") / "weights"), layers=2, hidden=128, intermediate=256)


def engine(path: str, features: bool, transport=None, blocks: int = 256, budget: int = 24) -> LLMEngine:
    return LLMEngine(EngineConfig(model_path=path, dtype="float64", kv_cache_blocks=blocks, max_model_len=512,
                                  kv_block_size=4, max_num_seqs=8, max_num_batched_tokens=budget,
                                  enable_prefix_caching=features, enable_chunked_prefill=features), transport)


def workload(tokenizer, seed: int):
    """Requests sharing a few long prefixes, arriving at random steps, some aborted mid-way."""
    rng = random.Random(seed)
    prefixes = ["def handler(event, context):\n    " * 3, "The quick brown fox jumps over the lazy dog. " * 4,
                "import os\nimport sys\nimport json\n" * 2]
    out = []
    for i in range(14):
        text = rng.choice(prefixes) + rng.choice(["x = 1", "return", "print(", "# done", ""]) + str(i % 3)
        params = SamplingParams(max_tokens=rng.randrange(4, 20), temperature=0.0, ignore_eos=True)
        out.append((f"r{i}", tokenizer.encode(text), params, rng.randrange(0, 40),
                    rng.randrange(2, 30) if rng.random() < 0.2 else None))
    return out


def drive(decode, requests, prefill_engine=None):
    """Feeds requests at their arrival steps, aborts some after a few steps; with a prefill
    engine, `decode` is a DECODE engine whose handoffs are carried out here.
    Returns {request_id: tokens} of the requests that were not aborted."""
    got = {rid: [] for rid, *_ in requests}
    aborted = set()
    step = 0
    while step < 2000:
        for rid, tokens, params, arrival, abort_at in requests:
            if arrival == step:
                decode.add_request(rid, tokens, params, prefill_address="P" if prefill_engine else "")
            if abort_at is not None and arrival + abort_at == step and rid in decode.sequences:
                decode.abort(rid)
                aborted.add(rid)
        for out in decode.step():
            assert out.error is None, out.error
            got[out.request_id] += list(out.token_ids)
        if prefill_engine is not None:
            for handoff, seq in decode.take_dispatch():
                dest = KVDestination(**decode.transport.handshake(), block_ids=tuple(handoff.block_ids),
                                     held_blocks=handoff.held_blocks)
                prefill_engine.add_prefill_request(handoff.request_id, seq.prompt_token_ids, seq.params, dest,
                                                   deadline=1e12)
            for out in prefill_engine.step():
                first = out.token_ids[0] if out.error is None else None
                cause = out.error.cause if out.error else None
                for o in decode.on_prefill_answer(out.request_id, first, cause, str(out.error or "")):
                    got[o.request_id] += list(o.token_ids)
        step += 1
        if step > 40 and not decode.has_work() and not decode.num_open_handoffs:
            break
    return {rid: t for rid, t in got.items() if rid not in aborted}


def assert_pool_clean(e: LLMEngine) -> None:
    bm = e.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not any(bm.ref_counts), "a block leaked"


@pytest.mark.parametrize("seed", [0, 1])
def test_features_on_equal_features_off_with_shared_prefixes_preemption_and_aborts(f64_model, seed):
    plain = engine(f64_model, features=False, blocks=512)
    requests = workload(plain.tokenizer, seed)
    expected = drive(plain, requests)
    # a pool small enough to preempt, a budget small enough to chunk every prompt
    fast = engine(f64_model, features=True, blocks=40, budget=16)
    assert drive(fast, requests) == expected
    assert fast.scheduler.num_preemptions > 0 and fast.block_manager.hit_tokens > 0
    assert_pool_clean(fast)
    assert_pool_clean(plain)


def pd_run(f64_model, seed: int, sessions: tuple[str, str], failing_pushes: int = 0):
    """A workload (no aborts) through aggregated engines with both features off, then through
    a PREFILL and a DECODE engine with both on. Returns (requests, expected, got, prefill,
    decode, the prefill side's transport)."""
    plain = engine(f64_model, features=False)
    requests = [(rid, tokens, params, arrival, None)
                for rid, tokens, params, arrival, _ in workload(plain.tokenizer, seed)]
    expected = drive(plain, requests)
    p_transport, d_transport = LocalTransport(sessions[0]), LocalTransport(sessions[1])
    p_transport.fail_next = failing_pushes
    prefill, decode = engine(f64_model, True, p_transport), engine(f64_model, True, d_transport)
    got = drive(decode, requests, prefill_engine=prefill)
    return requests, expected, got, prefill, decode, p_transport


def test_pd_sends_only_blocks_the_decode_engine_lacks_and_equals_aggregated(f64_model):
    requests, expected, got, prefill, decode, p_transport = pd_run(f64_model, 3, ("P", "D"))
    assert got == expected
    total = sum(-(-len(tokens) // 4) for _, tokens, *_ in requests)
    assert p_transport.written < total / 2, (p_transport.written, total)   # shared prefixes are not sent again
    assert prefill.block_manager.hit_tokens > 0 and decode.block_manager.hit_tokens > 0
    assert_pool_clean(prefill)
    assert_pool_clean(decode)


def test_a_failed_handoff_is_prefilled_locally_and_never_caches_half_written_blocks(f64_model):
    # the first five layer pushes fail: those prompts are prefilled on the decode side
    _, expected, got, prefill, decode, p_transport = pd_run(f64_model, 4, ("P2", "D2"), failing_pushes=5)
    assert got == expected
    assert p_transport.fail_next == 0
    assert_pool_clean(prefill)
    assert_pool_clean(decode)
