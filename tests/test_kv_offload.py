"""The host offload tier under the prefix cache (engine/kv_offload.py): the block manager's rules
with a stand-in tier (pure logic), the tier's own bounds, then whole engines in this process: a
prompt the pool evicted is served from the tier, with the same greedy text as without it."""
import os
import random
import shutil
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from pdserve.common.block_hash import block_hashes
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.kv_disk import DiskKVTier
from pdserve.engine.kv_offload import HostKVTier, KVTiers
from pdserve.engine.sequence import SamplingParams, Sequence


def seq(request_id: str, tokens) -> Sequence:
    return Sequence(request_id, list(tokens), SamplingParams())


def compute(bm: BlockManager, s: Sequence, pool: list) -> None:
    """A step: every token computed (each block's 'KV' is its tokens), full blocks shared."""
    bs = bm.block_size
    for i, block in enumerate(s.block_table):
        pool[block] = tuple(s.all_token_ids[i * bs:(i + 1) * bs])
    s.num_cached_tokens = s.num_tokens
    bm.commit(s)


class ListTier:
    """Tiers over a list standing in for the pool tensor, each block's 'KV' a value; a block
    whose hash is in `lost` cannot be given back (a corrupt file)."""

    def __init__(self, pool: list, capacity: int):
        self.pool, self.capacity = pool, capacity
        self.entries: dict[int, tuple] = {}    # hash -> (tokens, kv), oldest first
        self.lost: set[int] = set()

    def contains(self, block_hash, tokens):
        return block_hash in self.entries and self.entries[block_hash][0] == tokens

    def put(self, block_hash, tokens, kv):
        self.entries.pop(block_hash, None)
        if len(self.entries) == self.capacity:
            del self.entries[next(iter(self.entries))]
        self.entries[block_hash] = (tokens, kv.clone() if isinstance(kv, torch.Tensor) else kv)

    def save(self, block, block_hash, tokens):
        self.put(block_hash, tokens, self.pool[block])

    def computed(self, block, block_hash, tokens):
        pass                                    # no write-through tier here

    def fetch(self, blocks):
        staged = []
        for h, _ in blocks:
            if h in self.lost:
                del self.entries[h]
                break
            staged.append(self.entries[h][1])
        return staged

    def restore(self, staged, blocks):
        for block, kv in zip(blocks, staged):
            self.pool[block] = kv


# ---- block manager ------------------------------------------------------------------------------
def cached_then_freed(num_blocks: int, tokens) -> tuple[list, ListTier, BlockManager]:
    """A block manager (block size 2) with a tier, after a prompt of these tokens was computed and let go."""
    pool = [None] * num_blocks
    tier = ListTier(pool, capacity=16)
    bm = BlockManager(num_blocks=num_blocks, block_size=2, tier=tier)
    a = seq("a", tokens)
    assert bm.allocate(a)
    compute(bm, a, pool)
    bm.free(a)                                  # tail first: its last full block is evicted first
    return pool, tier, bm


def test_evicted_blocks_go_to_the_tier_and_a_later_prompt_loads_them_back_into_fresh_blocks():
    pool, tier, bm = cached_then_freed(6, range(7))     # blocks [0 1] [2 3] [4 5] [6]
    b = seq("b", range(100, 111))               # needs all 6 blocks: a's 3 cached ones are evicted
    assert bm.allocate(b) and b.num_cached_tokens == 0
    assert bm.num_cached_blocks == 0 and len(tier.entries) == 3
    compute(bm, b, pool)
    bm.free(b)
    again = seq("a2", list(range(6)) + [9, 9])
    assert bm.allocate(again)
    assert again.num_cached_tokens == 6 and bm.hit_tokens == 0          # all from the tier, none from the pool
    assert [pool[block] for block in again.block_table[:3]] == [(0, 1), (2, 3), (4, 5)]
    assert again.block_hashes == block_hashes(list(range(6)), 2)
    assert bm.num_cached_blocks == 2 + 3        # two of b's, and the loaded blocks, cached in the pool again
    # the blocks of b evicted to make room were saved before a's KV was written over them
    assert {kv for _, kv in tier.entries.values()} == {(0, 1), (2, 3), (4, 5), (104, 105), (106, 107), (108, 109)}


@pytest.mark.parametrize("collision", [False, True])
def test_the_prefix_continues_in_the_tier_where_the_pool_ends_and_a_collision_is_a_miss(collision):
    pool, tier, bm = cached_then_freed(8, range(9))
    b = seq("b", range(100, 112))
    bm.allocate(b)                              # six blocks: the four plain ones, then [6 7] and [4 5]
    assert len(tier.entries) == 2
    compute(bm, b, pool)
    bm.free(b)
    if collision:                               # the hash of [4 5] found with other tokens
        h = block_hashes(list(range(6)), 2)[-1]
        tier.entries[h] = ((42, 42), tier.entries[h][1])
    c = seq("c", range(9))
    assert bm.allocate(c) and c.num_cached_tokens == (4 if collision else 8)
    assert bm.hit_tokens == 4                   # [0 1] [2 3] from the pool, [4 5] [6 7] from the tier
    if not collision:
        assert pool[c.block_table[2]] == (4, 5) and pool[c.block_table[3]] == (6, 7)


def test_a_block_a_tier_cannot_give_back_ends_the_prefix_there():
    pool, tier, bm = cached_then_freed(6, range(7))
    b = seq("b", range(100, 111))
    bm.allocate(b)                              # a's three blocks go to the tier
    compute(bm, b, pool)
    bm.free(b)
    tier.lost.add(block_hashes(list(range(6)), 2)[1])     # [2 3] is lost: [0 1] loads, the rest is computed
    again = seq("a2", range(7))
    assert bm.allocate(again) and again.num_cached_tokens == 2
    assert pool[again.block_table[0]] == (0, 1) and len(again.block_table) == 4
    assert bm.num_free_blocks == 2 and sum(bm.ref_counts) == 4


def test_no_room_or_no_prefix_caching_changes_nothing():
    pool, tier, bm = cached_then_freed(4, range(7))
    big = seq("big", range(100, 109))           # 5 blocks: never fits
    assert not bm.allocate(big)
    assert not tier.entries and bm.num_free_blocks == 4 and bm.num_cached_blocks == 3
    assert BlockManager(4, 2, enable_prefix_caching=False, tier=tier).tier is None


# ---- the host tier ------------------------------------------------------------------------------
def layer_major_pool(layers: int = 3, blocks: int = 4) -> torch.Tensor:
    """A pool in the engine's layout: stored layer-major, seen block-major."""
    pool = torch.arange(layers * blocks * 2 * 2 * 1 * 2, dtype=torch.float32).reshape(layers, blocks, 2, 2, 1, 2)
    return pool.transpose(0, 1)


def test_host_tier_is_bounded_lru_copies_all_layers_of_a_block_and_passes_what_it_lets_go_below():
    pool = layer_major_pool()
    block_bytes = pool[0].numel() * 4
    below = ListTier([], capacity=16)
    host = HostKVTier(pool.shape[1:], pool.dtype, capacity_bytes=2 * block_bytes + 1, block_size=2, below=below,
                      clock=lambda: 0.0)
    tiers = KVTiers(pool, [host], block_size=2, clock=lambda: 0.0)
    assert host.num_slots == 2
    expected = {b: pool[b].clone() for b in range(3)}
    for b in range(3):
        tiers.save(b, 10 + b, (b, b))
    assert not host.contains(10, (0, 0)) and host.contains(11, (1, 1)) and host.contains(12, (2, 2))
    assert torch.equal(below.entries[10][1], expected[0])      # the least recently used went below
    assert not tiers.contains(12, (9, 9))       # same hash, other tokens: a miss
    staged = tiers.fetch([(11, (1, 1)), (12, (2, 2))])
    tiers.save(3, 13, (3, 3))                   # evicts 11, the least recently used... after the fetch
    tiers.restore(staged, [0, 3])
    assert torch.equal(pool[0], expected[1]) and torch.equal(pool[3], expected[2])
    s = host.stats()
    assert (s.hit_tokens, s.saved_bytes, s.loaded_bytes, s.used_bytes, s.capacity_bytes) == (
        4, 4 * block_bytes, 2 * block_bytes, 2 * block_bytes, 2 * block_bytes)


# ---- the disk tier ------------------------------------------------------------------------------
def disk_tier(path, pool: torch.Tensor, blocks: int) -> DiskKVTier:
    block_bytes = pool[0].numel() * pool.element_size()
    return DiskKVTier(str(path), blocks * block_bytes, pool.shape[1:], pool.dtype, block_size=2)


def test_disk_tier_writes_block_files_bounded_lru_and_reads_them_back(tmp_path):
    pool = layer_major_pool()
    disk = disk_tier(tmp_path, pool, blocks=2)
    try:
        for b in range(3):
            disk.put(100 + b, (b, b), pool[b])
        disk.flush()
        assert not disk.contains(100, (0, 0)) and disk.contains(101, (1, 1)) and disk.contains(102, (2, 2))
        assert sorted(os.listdir(disk.directory)) == [disk.file(h).rsplit("/", 1)[1] for h in (101, 102)]
        assert torch.equal(disk.get(102), pool[2]) and torch.equal(disk.get(101), pool[1])
        assert disk.stats().used_bytes == disk.stats().capacity_bytes == 2 * disk.block_bytes
    finally:
        disk.close()
    assert not os.path.exists(disk.directory)


def test_a_hash_the_host_tier_holds_for_other_tokens_is_loaded_from_the_disk_tier_that_matches(tmp_path):
    pool = layer_major_pool()
    disk = disk_tier(tmp_path, pool, blocks=4)
    host = HostKVTier(pool.shape[1:], pool.dtype, capacity_bytes=4 * disk.block_bytes, block_size=2)
    tiers = KVTiers(pool, [host, disk], block_size=2)
    expected = pool[1].clone()
    try:
        disk.put(5, (1, 1), pool[1])
        disk.flush()
        host.put(5, (9, 9), pool[2])            # a collision: the same hash, other tokens
        staged = tiers.fetch([(5, (1, 1))])
        tiers.restore(staged, [0])
        assert torch.equal(pool[0], expected) and disk.stats().hit_tokens == 2 and host.stats().hit_tokens == 0
    finally:
        disk.close()


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "removed"])
def test_a_damaged_block_file_is_a_miss_and_leaves_the_index(tmp_path, damage):
    pool = layer_major_pool()
    disk = disk_tier(tmp_path, pool, blocks=4)
    try:
        disk.put(7, (1, 2), pool[1])
        disk.flush()
        path = disk.file(7)
        data = bytearray(open(path, "rb").read())
        if damage == "removed":
            os.unlink(path)
        else:
            if damage == "flipped byte":
                data[-5] ^= 0x40
            open(path, "wb").write(data if damage == "flipped byte" else data[:-4])
        assert disk.get(7) is None and not disk.contains(7, (1, 2)) and disk.bad_reads == 1
    finally:
        disk.close()


def test_failed_writes_lose_only_their_blocks(tmp_path):
    pool = layer_major_pool()
    disk = disk_tier(tmp_path, pool, blocks=4)
    shutil.rmtree(disk.directory)               # the folder went away under the engine: every write fails
    try:
        disk.put(7, (1, 2), pool[1])
        disk.flush()
        assert not disk.contains(7, (1, 2)) and disk.write_failures == 1 and disk.stats().used_bytes == 0
    finally:
        disk.close()


def test_an_engine_folder_is_private_and_a_dead_engines_folder_is_removed(tmp_path):
    pool = layer_major_pool()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"pdserve-kv-{socket.gethostname()}-{int(dead.stdout)}-abc"
    orphan.mkdir()
    unrelated = tmp_path / "keep-me"
    unrelated.mkdir()
    a, b = disk_tier(tmp_path, pool, 2), disk_tier(tmp_path, pool, 2)
    try:
        assert a.directory != b.directory and not orphan.exists() and unrelated.exists()
    finally:
        a.close()
        b.close()


# ---- whole engines ------------------------------------------------------------------------------
from pdserve.engine.config import EngineConfig  # noqa: E402
from pdserve.engine.llm_engine import LLMEngine  # noqa: E402


def engine(path: str, host_gb: float = 0.0, **disk) -> LLMEngine:
    return LLMEngine(EngineConfig(model_path=path, dtype="float32", kv_cache_blocks=24, kv_block_size=16,
                                  max_model_len=512, max_num_seqs=4, max_num_batched_tokens=256,
                                  admission_window_ms=0, kv_offload_host_gb=host_gb, **disk))


def generate(e: LLMEngine, request_id: str, tokens: list[int]) -> list[int]:
    """The greedy tokens of one request run alone."""
    if e.disk_tier is not None:
        e.disk_tier.flush()      # the blocks evicted so far are on disk before this prompt looks for them
    e.add_request(request_id, tokens, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    out = []
    while e.has_work():
        for o in e.step():
            assert o.error is None, o.error
            out += o.token_ids
    return out


def counting(e: LLMEngine) -> dict:
    """{request id: the prompt tokens its steps computed}, filled as the engine steps."""
    computed = {}
    run = e.runner.run

    def counted(step):
        for s, n in step.prefills:
            computed[s.request_id] = computed.get(s.request_id, 0) + n
        return run(step)
    e.runner.run = counted
    return computed


def conversation(e: LLMEngine, prompts: dict[str, list[int]]) -> tuple[dict, dict]:
    computed = counting(e)
    return {rid: generate(e, rid, tokens) for rid, tokens in prompts.items()}, computed


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    first = [rng.randrange(1, 1000) for _ in range(150)]
    others = [{f"other{i}": [rng.randrange(1, 1000) for _ in range(150)]} for i in range(6)]
    # three other prompts between each use of the first evict it from the pool (24 blocks)
    return {"first": first, **others[0], **others[1], **others[2], "again": first, **others[3], **others[4],
            **others[5], "next turn": first + [rng.randrange(1, 1000) for _ in range(40)]}


def test_a_prompt_the_pool_evicted_is_served_from_the_host_tier_with_the_same_text(small_model, prompts):
    plain = engine(small_model)
    expected, plain_computed = conversation(plain, prompts)
    tiered = engine(small_model, host_gb=0.01)
    got, computed = conversation(tiered, prompts)
    assert got == expected
    tier = tiered.stats().kv_tiers[0]
    assert tier.tier == "host" and tier.hit_tokens == 2 * 144 and tier.saved_bytes > 0
    # 150 tokens: 9 full blocks (144 tokens) come back from the tier, 6 are computed
    assert plain_computed["again"] == 150 and computed["again"] == 150 - 144
    assert plain_computed["next turn"] == 190 and computed["next turn"] == 190 - 144
    assert tiered.block_manager.hit_tokens == plain.block_manager.hit_tokens     # no pool hits: all from the tier
    assert tier.loaded_bytes == tier.hit_tokens // 16 * tiered.host_tier.block_bytes
    assert 0 < tier.used_bytes <= tier.capacity_bytes


@pytest.fixture(scope="module")
def plain_run(small_model, prompts):
    return conversation(engine(small_model), prompts)


SMALL_BLOCK_BYTES = 2 * 2 * 16 * 2 * 16 * 4     # the small model's block: layers x K/V x tokens x kv heads x dim


@pytest.mark.parametrize("host_blocks", [0, 4])
def test_a_prompt_the_pool_evicted_comes_back_from_disk_with_the_same_text(small_model, prompts, plain_run,
                                                                          tmp_path, host_blocks):
    """The disk tier alone, and under a host tier of four blocks that passes it what it lets go."""
    expected, _ = plain_run
    tiered = engine(small_model, host_blocks * SMALL_BLOCK_BYTES / 2**30, kv_offload_disk_path=str(tmp_path),
                    kv_offload_disk_gb=0.01)
    try:
        got, computed = conversation(tiered, prompts)
        assert got == expected
        assert computed["again"] == 150 - 144 and computed["next turn"] == 190 - 144
        tiers = {t.tier: t for t in tiered.stats().kv_tiers}
        assert sum(t.hit_tokens for t in tiers.values()) == 2 * 144 and tiers["disk"].hit_tokens >= 144
        assert tiers["disk"].loaded_bytes == tiers["disk"].hit_tokens // 16 * SMALL_BLOCK_BYTES
        assert 0 < tiers["disk"].used_bytes <= tiers["disk"].capacity_bytes and tiers["disk"].copy_seconds > 0
        assert len(os.listdir(tiered.disk_tier.directory)) == tiers["disk"].used_bytes // SMALL_BLOCK_BYTES
    finally:
        tiered.kv_tiers.close()


def test_a_corrupted_block_file_is_computed_again_with_the_same_text(small_model, prompts, plain_run, tmp_path):
    expected, _ = plain_run
    tiered = engine(small_model, kv_offload_disk_path=str(tmp_path), kv_offload_disk_gb=0.01)
    try:
        before = dict(list(prompts.items())[:4])             # the first prompt, then three that evict it
        got, _ = conversation(tiered, before)
        tiered.disk_tier.flush()
        path = tiered.disk_tier.file(block_hashes(prompts["first"], 16)[3])
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2] ^= 0x01                          # one bit of the fourth block's KV
        open(path, "wb").write(data)
        got_again, computed = conversation(tiered, {"again": prompts["again"]})
        assert {**got, **got_again} == {k: expected[k] for k in [*before, "again"]}
        assert computed["again"] == 150 - 3 * 16 and tiered.disk_tier.bad_reads == 1
    finally:
        tiered.kv_tiers.close()


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 64 KiB tmpfs: a disk that fills after a few blocks."""
    path = tmp_path / "full"
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield str(path)
    subprocess.run(["umount", str(path)], check=True)


def test_a_full_disk_costs_no_request(small_model, prompts, plain_run, tiny_filesystem):
    expected, _ = plain_run
    tiered = engine(small_model, kv_offload_disk_path=tiny_filesystem, kv_offload_disk_gb=1)
    try:
        got, _ = conversation(tiered, prompts)
        assert got == expected
        assert tiered.disk_tier.write_failures > 0 and tiered.disk_tier.stats().used_bytes > 0
    finally:
        tiered.kv_tiers.close()


def test_without_the_parameter_nothing_changes(small_model):
    e = engine(small_model)
    assert e.kv_tiers is None and e.block_manager.tier is None and e.stats().kv_tiers == ()
    with pytest.raises(ValueError, match="kv_offload_disk_path"):
        engine(small_model, kv_offload_disk_gb=1)


# ---- metrics ------------------------------------------------------------------------------------
def test_tier_figures_are_exported_per_engine_and_tier():
    from prometheus_client import CollectorRegistry, generate_latest

    from pdserve._proto import engine_pb2
    from pdserve.frontend.metrics import EngineCollector

    stats = engine_pb2.StatsResponse(num_total_blocks=4, kv_tiers=[engine_pb2.StatsResponse.KVTier(
        tier="host", hit_tokens=144, saved_bytes=4096, loaded_bytes=2048, copy_seconds=0.5, used_bytes=1024,
        capacity_bytes=8192)])
    live = SimpleNamespace(role="BOTH", instance_id="i0", address="a")
    dep = SimpleNamespace(name="m", version=1, live_engines=lambda: [live])
    manager = SimpleNamespace(all_deployments=lambda: [dep], index=lambda: [])
    registry = CollectorRegistry()
    registry.register(EngineCollector(manager, plane=SimpleNamespace(last_stats=lambda address: stats)))
    text = generate_latest(registry).decode()
    labels = 'instance="i0",model="m",role="BOTH",tier="host"'
    for line in (f"pdserve_kv_offload_hits_total{{{labels}}} 144.0",
                 f"pdserve_kv_offload_loaded_bytes_total{{{labels}}} 2048.0",
                 f"pdserve_kv_offload_saved_bytes_total{{{labels}}} 4096.0",
                 f"pdserve_kv_offload_copy_seconds_total{{{labels}}} 0.5",
                 f"pdserve_kv_offload_used_bytes{{{labels}}} 1024.0",
                 f"pdserve_kv_offload_capacity_bytes{{{labels}}} 8192.0"):
        assert line in text, line


# ---- served -------------------------------------------------------------------------------------
@pytest.mark.parametrize("tier", ["host", "disk"])
def test_a_served_engine_takes_the_parameter_and_its_metrics_show_the_tier_hits(repo, small_model, tier, tmp_path):
    """config.pbtxt's kv_offload_host_gb (or kv_offload_disk_*) reaches the engine; a prompt
    evicted from a small pool and asked again has the same greedy text, and the tier metrics
    count its hit."""
    from transformers import AutoTokenizer

    from pdserve_clients import LLMClient
    from pdserve_testing.harness import PdServer, add_model, config_text

    tokenizer = AutoTokenizer.from_pretrained(small_model)
    rng = random.Random(1)

    def text(n_tokens: int) -> str:
        ids = tokenizer.encode(tokenizer.decode([rng.randrange(100, 1000) for _ in range(n_tokens + 32)]))
        return tokenizer.decode(ids[:n_tokens])

    tiers = ({"kv_offload_host_gb": 0.01} if tier == "host" else
             {"kv_offload_disk_path": str(tmp_path / "kv"), "kv_offload_disk_gb": 0.01})
    add_model(repo, "small", small_model, config_text(kv_cache_blocks=40, **tiers))
    server = PdServer(repo).start()
    client = LLMClient(server.url, model="small")
    try:
        server.wait_ready("small")
        first = text(200)
        expected = client.generate(first, max_tokens=8, temperature=0, ignore_eos=True).text
        for _ in range(3):                      # 3 x 250 tokens evict the first prompt from a 640-token pool
            client.generate(text(250), max_tokens=8, temperature=0, ignore_eos=True)
        assert client.generate(first, max_tokens=8, temperature=0, ignore_eos=True).text == expected
        hits = lambda: server.metric_value("pdserve_kv_offload_hits_total", model="small", tier=tier)  # noqa: E731
        server.wait_for(lambda: hits() >= 160, f"the {tier} tier's hits in the metrics", timeout=30)
        assert server.metric_value("pdserve_kv_offload_capacity_bytes", model="small", tier=tier) > 0
    finally:
        client.close()
        server.stop()


@pytest.fixture(scope="module")
def f64_model(tmp_path_factory):
    from pdserve_testing.harness import make_model
    return make_model(str(tmp_path_factory.mktemp("offload") / "weights"), layers=2, hidden=128, intermediate=256)


def tiered_f64_engine(model: str, transport=None) -> LLMEngine:
    """test_prefix_cache's engine with both features, a pool of 40 blocks and a host tier of 64."""
    block_bytes = 2 * 2 * 4 * 2 * 32 * 8          # layers x K/V x block_size x kv_heads x head_dim x float64
    e = LLMEngine(EngineConfig(model_path=model, dtype="float64", kv_cache_blocks=40, max_model_len=512,
                               kv_block_size=4, max_num_seqs=8, max_num_batched_tokens=16,
                               kv_offload_host_gb=64 * block_bytes / 2**30), transport)
    assert e.host_tier.num_slots == 64
    return e


def test_pd_with_a_tier_on_both_engines_equals_aggregated(f64_model, monkeypatch):
    import test_prefix_cache as pc

    plain_engine = pc.engine
    monkeypatch.setattr(pc, "engine", lambda path, features, transport=None, **kw: (
        tiered_f64_engine(path, transport) if features else plain_engine(path, features, transport, **kw)))
    _, expected, got, prefill, decode, _ = pc.pd_run(f64_model, 3, ("P-tier", "D-tier"))
    assert got == expected
    assert prefill.host_tier.stats().hit_tokens + decode.host_tier.stats().hit_tokens > 0
    pc.assert_pool_clean(prefill)
    pc.assert_pool_clean(decode)


@pytest.mark.parametrize("seed", [0, 1])
def test_random_traffic_with_a_tier_equals_no_caching_at_all(f64_model, seed):
    """test_prefix_cache's workload (shared prefixes, preemption, aborts, chunked prefill) on a
    pool of 40 blocks with a host tier of 64, in float64: the same tokens as with no caching."""
    from test_prefix_cache import assert_pool_clean, drive, engine as cache_engine, workload

    model = f64_model
    plain = cache_engine(model, features=False, blocks=512)
    requests = workload(plain.tokenizer, seed)
    expected = drive(plain, requests)
    tiered = tiered_f64_engine(model)
    assert drive(tiered, requests) == expected
    assert tiered.scheduler.num_preemptions > 0 and tiered.host_tier.stats().hit_tokens > 0
    assert_pool_clean(tiered)
