"""The cluster's KV store (engine/kv_store.py, common/mooncake_master.py): the store tier against a
real private mooncake_master, two engines of one process sharing it, then two pdserve nodes (two
front ends, one etcd, one master): a prompt node A's engine computed is loaded, not computed, by
node B's engine, with the same greedy text; and a master killed mid-load costs no request."""
import json
import os
import random
import re
import signal
import threading
import time

import pytest
import torch

from pdserve_testing.harness import PdServer, add_model, config_text, etcd_records

from pdserve.common.etcd_server import EtcdProcess
from pdserve.common.mooncake_master import MooncakeMaster
from pdserve.common.records import KVStoreRecord
from pdserve.engine import kv_store
from pdserve.engine.kv_disk import record_parts
from pdserve.engine.kv_store import StoreKVTier
from pdserve_clients import LLMClient

SHAPE = (2, 2, 2, 2, 4)        # layers x K/V x block tokens x kv heads x head dim
GREEDY = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}


@pytest.fixture
def master(tmp_path):
    m = MooncakeMaster(log_dir=str(tmp_path)).start()
    yield m
    m.stop()


def tier(endpoint: str, namespace: str = "model") -> StoreKVTier:
    client = kv_store.connect(endpoint, 16 * 2**20)
    assert client is not None
    return StoreKVTier(client, namespace, torch.Size(SHAPE), torch.float32, block_size=2)


def kill(m: MooncakeMaster) -> None:
    os.kill(m.proc.pid, signal.SIGKILL)
    m.proc.wait()


# ---- the tier -----------------------------------------------------------------------------------
def test_a_block_one_client_puts_is_loaded_by_another_of_the_same_model_only(master):
    a, b, other = tier(master.endpoint), tier(master.endpoint), tier(master.endpoint, "another model")
    kv = torch.randn(SHAPE)
    a.put(7, (1, 2), kv)
    a.flush()
    assert a.stats().saved_bytes == a.block_bytes and a.failures == 0
    assert b.contains(7, (1, 2)) and torch.equal(b.get(7), kv)
    assert not other.contains(7, (1, 2))
    a.put(7, (1, 2), kv)                      # known to be there: not put again
    a.flush()
    assert a.stats().saved_bytes == a.block_bytes


@pytest.mark.parametrize("damage", ["other tokens", "flipped bit", "foreign value"])
def test_a_block_the_store_cannot_give_back_intact_is_a_miss_and_not_asked_again(master, damage):
    a, b = tier(master.endpoint), tier(master.endpoint)
    kv = torch.randn(SHAPE)
    tokens = (3, 4) if damage == "other tokens" else (1, 2)   # "other tokens": a hash collision
    if damage == "other tokens":
        a.put(7, (1, 2), kv)
        a.flush()
    else:
        value = bytearray(b"".join(record_parts(7, (1, 2), kv)))
        if damage == "flipped bit":
            value[len(value) // 2] ^= 0x01
        else:
            value = bytearray(b"not a block record")
        assert a.client.put(a.key(7), bytes(value)) == 0
    assert b.contains(7, tokens)               # the key is there ...
    assert b.get(7) is None and b.bad_reads == 1   # ... its value is not this block
    assert not b.contains(7, tokens)


def test_a_killed_master_makes_the_tier_a_quick_miss_until_it_answers_again(master):
    a = tier(master.endpoint)
    kv = torch.randn(SHAPE)
    a.put(1, (1, 2), kv)
    a.flush()
    kill(master)
    start = time.monotonic()
    assert not a.contains(2, (3, 4)) and a.failures == 1 and not a.available
    a.put(3, (5, 6), kv)                       # off: dropped without a call
    a.flush()
    assert a.get(1) is None and not a.contains(1, (1, 2)) and a.failures == 1
    assert time.monotonic() - start < 5       # no call waited on the dead master


# ---- two engines of one process -----------------------------------------------------------------
from pdserve.engine.config import EngineConfig  # noqa: E402
from pdserve.engine.llm_engine import LLMEngine  # noqa: E402
from pdserve.engine.sequence import SamplingParams  # noqa: E402


def engine(model: str, endpoint: str) -> LLMEngine:
    return LLMEngine(EngineConfig(model_path=model, dtype="float32", kv_cache_blocks=48, kv_block_size=16,
                                  max_model_len=512, max_num_seqs=4, admission_window_ms=0, kv_store="mooncake",
                                  kv_store_gb=0.05, kv_store_endpoint=endpoint))


def generate(e: LLMEngine, request_id: str, tokens: list[int]) -> tuple[list[int], int]:
    """The greedy tokens of one request run alone, and the prompt tokens its steps computed."""
    e.add_request(request_id, tokens, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    out, computed, run = [], 0, e.runner.run

    def counted(step):
        nonlocal computed
        computed += sum(n for _, n in step.prefills)
        return run(step)
    e.runner.run = counted
    try:
        while e.has_work():
            for o in e.step():
                assert o.error is None, o.error
                out += o.token_ids
    finally:
        e.runner.run = run
    return out, computed


def test_a_prompt_one_engine_computed_is_loaded_by_another_and_a_dead_master_means_computing(small_model, master):
    rng = random.Random(0)
    prompt, later = ([rng.randrange(1, 1000) for _ in range(150)] for _ in range(2))
    a, b = engine(small_model, master.endpoint), engine(small_model, master.endpoint)
    try:
        expected, computed_a = generate(a, "a", prompt)
        a.kv_tiers.tier("store").flush()
        got, computed_b = generate(b, "b", prompt)
        assert got == expected and computed_a == 150 and computed_b == 150 - 144   # 9 blocks from the store
        store = {t.tier: t for t in b.stats().kv_tiers}["store"]
        assert store.hit_tokens == 144 and store.loaded_bytes == 9 * b.kv_tiers.tier("store").block_bytes
        expected_later, _ = generate(a, "a2", later)
        a.kv_tiers.tier("store").flush()
        kill(master)
        got_later, computed = generate(b, "b2", later)
        assert got_later == expected_later and computed == 150
    finally:
        a.kv_tiers.close()
        b.kv_tiers.close()


def test_without_an_endpoint_an_engine_outside_pdserve_is_refused(small_model):
    with pytest.raises(ValueError, match="kv_store_endpoint"):
        engine(small_model, "")


# ---- two nodes ----------------------------------------------------------------------------------
TOKEN = "kv-store-cluster-secret-0123456789"


def stream(server: PdServer, model: str, prompt: str) -> str:
    client = LLMClient(server.url, model)
    try:
        return client.stream_all(prompt, timeout=60, **GREEDY).text
    finally:
        client.close()


def test_two_nodes_share_one_store_and_a_killed_master_costs_no_request(tmp_path, small_model):
    """Node A runs the master (published in etcd), node B joins it; each serves the same weights
    under its own model name, so each request runs on the node's own engine."""
    etcd = EtcdProcess(data_dir=str(tmp_path / "etcd")).start()
    token_file = tmp_path / "cluster.token"
    token_file.write_text(TOKEN)
    common = ["--etcd-endpoints", etcd.endpoint, "--cluster", "kv", "--cluster-token-file", str(token_file)]
    config = config_text(kv_store="mooncake", kv_store_gb=0.05, kv_cache_blocks=64, max_num_batched_tokens=512)
    nodes = []
    try:
        for name in ("a", "b"):   # one after the other: B finds the master A published
            add_model(str(tmp_path / name), f"small-{name}", small_model, config)
            nodes.append(PdServer(str(tmp_path / name), extra_args=common + ["--node-name", name]).start())
            nodes[-1].wait_ready(f"small-{name}")
        a, b = nodes
        [(key, record, lease)] = etcd_records(etcd.endpoint, kind="kv_store")
        master = KVStoreRecord.from_json(json.dumps(record).encode(), TOKEN)
        assert key == "/pdserve/kv/kv_store/mooncake" and master.node == "a" and lease != 0
        assert f"the cluster's Mooncake master {master.master}" in b.full_log()
        pid = int(re.search(r"private Mooncake master on \S+, pid (\d+)", a.full_log())[1])

        rng = random.Random(1)
        prompts = [" ".join(f"w{rng.randrange(1000)}" for _ in range(100)) for _ in range(5)]
        expected = [stream(a, "small-a", p) for p in prompts]
        assert stream(b, "small-b", prompts[0]) == expected[0]
        # node B's engine loaded at least the prompt's first 10 blocks (the metrics follow the Stats polls)
        b.wait_for(lambda: b.metric_value("pdserve_kv_offload_hits_total", tier="store") >= 16 * 10,
                   "node B's store hits", 10)
        a.wait_for(lambda: a.metric_value("pdserve_kv_offload_saved_bytes_total", tier="store") > 0,
                   "node A's puts", 10)

        # the master dies while node B serves the other prompts: each is still answered, the same
        results: dict[int, str] = {}
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, stream(b, "small-b", prompts[i])))
                   for i in range(1, 5)]
        for t in threads:
            t.start()
        os.kill(pid, signal.SIGKILL)
        for t in threads:
            t.join()
        assert results == {i: expected[i] for i in range(1, 5)}
        assert stream(a, "small-a", prompts[0] + " more") and "KV store:" in b.full_log()
    finally:
        for n in nodes:
            n.stop()
        etcd.cleanup()


# ---- the kv_aware router ------------------------------------------------------------------------
@pytest.mark.parametrize("p1_queue, in_store, chosen", [(1000, False, "p1"), (1000, True, "p2"), (600, True, "p1")])
def test_kv_aware_counts_blocks_in_the_store_as_cheap_not_free(p1_queue, in_store, chosen):
    """p1 holds the prompt's 93 blocks in its pool, p2 nothing: 1488 cached tokens outweigh p1's
    queue of 1000; once p1 has put them in the store p2 loads them (each worth half a pool block:
    0 - 744 < 1000 - 1488), but not against a queue of 600 (600 - 1488 < -744)."""
    from pdserve.common.block_hash import block_hashes
    from test_router import BLOCK, choose, hold, make_router, prompt, record, stats

    router = make_router([record("p1", "PREFILL"), record("p2", "PREFILL"), record("d", "DECODE")],
                         {"p1": stats(prefill_tokens=p1_queue), "p2": stats(prefill_tokens=0)})
    tokens = prompt(3)
    hold(router, "p1", tokens)
    if in_store:   # as p1's Stats answer reports its puts (engine/kv_store.py's events)
        router.plane.observe("p1:1", stats(prefill_tokens=p1_queue, store_event_id=2,
                                           store_stored_hashes=block_hashes(tokens, BLOCK)))
    assert choose(router, tokens).prefill.instance_id == chosen
