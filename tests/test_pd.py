"""PD disaggregation against a real etcd, real engine processes and Mooncake over TCP."""
import os
import random
import signal
import threading
import time

import pytest

from pdserve_testing.harness import PdServer, add_model, config_text, etcd_records, inputs
from tritonclient.utils import InferenceServerException

from pdserve_clients import LLMClient

from pdserve.common.etcd_server import EtcdProcess

PD = (("PREFILL", "cpu"), ("DECODE", "cpu"))
GREEDY = {"temperature": 0, "ignore_eos": True}


def generate(server, model, prompt, max_tokens=16, **extra):
    result = server.client.infer(model, inputs(prompt, False, {**GREEDY, "max_tokens": max_tokens, **extra},
                                               exclude_input_in_output=True, return_num_output_tokens=True,
                                               return_finish_reason=True))
    return (result.as_numpy("text_output")[0].decode(), int(result.as_numpy("num_output_tokens")[0]),
            result.as_numpy("finish_reason")[0].decode())


@pytest.fixture(scope="module")
def pd_server(tmp_path_factory, small_model):
    """'agg' (one BOTH engine) and 'pd' (one PREFILL + one DECODE engine) on the same weights."""
    repo = str(tmp_path_factory.mktemp("pd-repo"))
    add_model(repo, "agg", small_model, config_text(max_model_len=512))
    add_model(repo, "pd", small_model, config_text(role_groups=PD, max_model_len=512))
    server = PdServer(repo).start()
    server.wait_ready("agg")
    server.wait_ready("pd")
    yield server
    server.stop()


def transfers(server) -> float:
    return server.metric_value("pdserve_kv_transfer_seconds_count", model="pd")


def test_pd_greedy_equals_aggregated(pd_server, small_model):
    short = "x = 1"                                   # below one block of 16 tokens
    long = "def handler(event, context):\n    " * 20   # many blocks
    before = transfers(pd_server)
    for prompt, max_tokens in [(short, 24), (long, 24), ("import os", 1)]:
        assert generate(pd_server, "pd", prompt, max_tokens) == generate(pd_server, "agg", prompt, max_tokens)
    # up to max_model_len: the prompt plus what fits, ending on "length"
    text, n, reason = generate(pd_server, "pd", long, max_tokens=2000)
    assert (text, n, reason) == generate(pd_server, "agg", long, max_tokens=2000)
    assert reason == "length" and n > 0
    # seeded sampling gives the same tokens through PD (the first token is drawn by the prefill engine)
    seeded = {"temperature": 0.9, "top_p": 0.95, "seed": 7}
    assert generate(pd_server, "pd", short, 20, **seeded) == generate(pd_server, "agg", short, 20, **seeded)
    pd_server.wait_for(lambda: transfers(pd_server) >= before + 5, "the prefill engine's handoffs in the metrics", 5)
    assert pd_server.metric_value("pdserve_kv_transfer_bytes_total", model="pd") > 0


def test_etcd_records_carry_leases_and_go_on_stop(repo, small_model):
    add_model(repo, "pd", small_model, config_text(role_groups=PD))
    server = PdServer(repo, extra_args=["--cluster", "blue"]).start()
    try:
        server.wait_ready("pd")
        records = etcd_records(server.etcd_endpoint)
        assert sorted(r["role"] for _, r, _ in records) == ["DECODE", "PREFILL"]
        for key, record, lease in records:
            assert key == f"/pdserve/blue/engines/pd/{record['instance_id']}"
            assert lease != 0, "every record hangs on its engine's lease"
            assert record["state"] == "ready" and record["address"] and record["incarnation"]
            assert record["capacity"]["num_blocks"] == 256
        endpoint = server.etcd_endpoint
        # removing the model stops its engines gracefully: their leases are revoked, the records go
        import shutil
        shutil.rmtree(os.path.join(repo, "pd"))
        server.wait_for(lambda: not etcd_records(endpoint), "the records to go", 30)
    finally:
        server.stop()


def stream_tokens(url, model, prompt, max_tokens, results_out: list):
    """Streams one request; appends ('ok', text) or ('error', message) to results_out."""
    client = LLMClient(url, model)
    try:
        text = client.stream_all(prompt, timeout=60, **GREEDY, max_tokens=max_tokens).text
        results_out.append(("ok", text, time.monotonic()))
    except InferenceServerException as exc:
        results_out.append(("error", str(exc), time.monotonic()))
    finally:
        client.close()


def test_killing_the_decode_engine(repo, demo_model):
    add_model(repo, "pd", demo_model, config_text(role_groups=PD, max_model_len=1024, kv_cache_blocks=512))
    server = PdServer(repo, extra_args=["--lease-ttl", "6"]).start()
    try:
        server.wait_ready("pd")
        outcomes: list = []
        threads = [threading.Thread(target=stream_tokens, args=(server.url, "pd", f"def f{i}(x):", 600, outcomes))
                   for i in range(3)]
        for t in threads:
            t.start()
        server.wait_for(lambda: server.metric_value("pdserve_requests_running", role="DECODE") == 3, "3 streams", 30)
        decode = server.engines("DECODE")[0]
        killed_at = time.monotonic()
        os.kill(decode["pid"], signal.SIGKILL)
        for t in threads:
            t.join(timeout=60)
        assert [o[0] for o in outcomes] == ["error"] * 3, outcomes
        assert all(o[2] - killed_at < 6 for o in outcomes), "terminal errors arrive within the lease TTL"
        # the supervisor restarts the decode engine; new requests then succeed
        server.wait_for(lambda: any(r["role"] == "DECODE" and r["state"] == "ready" and r["pid"] != decode["pid"]
                                    for r in server.engines()), "a restarted decode engine", 60)
        assert generate(server, "pd", "def g(y):", 8)[1] == 8
        server.wait_for(lambda: server.metric_value("pdserve_kv_cache_usage_ratio", role="PREFILL") == 0
                        and server.metric_value("pdserve_kv_cache_usage_ratio", role="DECODE") == 0,
                        "every pool all-free", 10)
    finally:
        server.stop()


def test_killing_the_prefill_engine_falls_back_to_local_prefill(repo, small_model):
    add_model(repo, "pd", small_model, config_text(role_groups=PD))
    add_model(repo, "agg", small_model, config_text())
    server = PdServer(repo).start()
    try:
        server.wait_ready("pd")
        server.wait_ready("agg")
        prompt = "import json"
        expected = generate(server, "agg", prompt, 12)
        prompt_tokens = int(server.client.infer("agg", inputs(prompt, False, {"max_tokens": 1},
                                                              return_num_input_tokens=True))
                            .as_numpy("num_input_tokens")[0])
        prefill = server.engines("PREFILL")[0]
        os.kill(prefill["pid"], signal.SIGKILL)

        def no_prefill_engine() -> bool:
            return not any(r["state"] == "ready" for r in server.engines("PREFILL"))

        server.wait_for(no_prefill_engine, "the supervisor to take the dead prefill engine out of etcd", 10)
        admitted = decode_prompt_tokens(server)
        # while the prefill engine is gone (and being restarted) requests prefill on the decode engine
        for _ in range(5):
            assert generate(server, "pd", prompt, 12) == expected
        assert no_prefill_engine(), "a prefill engine was back before the requests were done"
        # which the decode engine's own figures show: it admitted the five prompts, no prefill engine being live
        server.wait_for(lambda: decode_prompt_tokens(server) >= admitted + 5 * prompt_tokens,
                        "the decode engine to count the five prompts", 5)
        server.wait_for(lambda: any(r["role"] == "PREFILL" and r["pid"] != prefill["pid"] for r in server.engines()),
                        "a restarted prefill engine", 60)
    finally:
        server.stop()


def decode_prompt_tokens(server) -> float:
    """Prompt tokens the 'pd' decode engine admitted (looked up in its prefix cache): a prompt
    prefilled here, or one whose KV a prefill engine wrote into blocks it reserved."""
    return server.metric_value("pdserve_prefix_cache_queries_total", model="pd", role="DECODE")


def test_etcd_restart_mid_load_loses_no_request(repo, small_model, tmp_path):
    etcd = EtcdProcess(data_dir=str(tmp_path / "etcd")).start()
    add_model(repo, "pd", small_model, config_text(role_groups=PD))
    ttl = 4
    server = PdServer(repo, extra_args=["--etcd-endpoints", etcd.endpoint, "--lease-ttl", str(ttl)]).start()
    try:
        server.wait_ready("pd")
        outcomes: list = []
        stop = threading.Event()

        def load():
            while not stop.is_set():
                stream_tokens(server.url, "pd", "for x in range(3):", 24, outcomes)

        def served_after(count: int) -> bool:
            return len(outcomes) >= count + 3   # a round of the three clients, at least

        def keepalives_failed(role: str) -> float:
            return server.metric_value("pdserve_lease_keepalive_failures_total", model="pd", role=role)

        workers = [threading.Thread(target=load) for _ in range(3)]
        for w in workers:
            w.start()
        server.wait_for(lambda: served_after(0), "the load to flow", 30)
        etcd.stop()
        stopped_at, served = time.monotonic(), len(outcomes)
        # etcd stays away longer than the lease TTL, so the engines' leases are gone when it is
        # back; meanwhile both engines notice, and requests are still served
        server.wait_for(lambda: time.monotonic() - stopped_at > ttl + 2 and served_after(served)
                        and keepalives_failed("PREFILL") > 0 and keepalives_failed("DECODE") > 0,
                        "an etcd outage past the lease TTL, seen by both engines, with requests served", 60)
        etcd.start()
        served = len(outcomes)
        # the engines register again, the view is whole, and the load goes on meanwhile
        server.wait_for(lambda: sorted(r["role"] for r in server.engines() if r["state"] == "ready")
                        == ["DECODE", "PREFILL"] and served_after(served),
                        "both engines back in etcd, with requests served", 60)
        stop.set()
        for w in workers:
            w.join(timeout=60)
        assert outcomes and all(kind == "ok" for kind, _, _ in outcomes), [o for o in outcomes if o[0] != "ok"][:3]
        assert generate(server, "pd", "x", 4)[1] == 4
    finally:
        server.stop()
        etcd.cleanup()


def test_two_nodes_one_cluster(tmp_path, small_model):
    """Node A hosts the PREFILL engine, node B the DECODE engine; either front end serves."""
    etcd = EtcdProcess(data_dir=str(tmp_path / "etcd")).start()
    repo_a, repo_b = str(tmp_path / "a"), str(tmp_path / "b")
    add_model(repo_a, "pd", small_model, config_text(role_groups=(("PREFILL", "cpu"),)))
    add_model(repo_b, "pd", small_model, config_text(role_groups=(("DECODE", "cpu"),)))
    add_model(repo_b, "agg", small_model, config_text())
    common = ["--etcd-endpoints", etcd.endpoint, "--cluster", "two"]
    node_a = PdServer(repo_a, extra_args=common + ["--node-name", "a"]).start()
    node_b = PdServer(repo_b, extra_args=common + ["--node-name", "b"]).start()
    try:
        node_a.wait_ready("pd")
        node_b.wait_ready("pd")
        node_b.wait_ready("agg")
        records = node_a.engines()
        assert {(r["node"], r["role"]) for r in records if r["model"] == "pd"} == {("a", "PREFILL"), ("b", "DECODE")}
        expected = generate(node_b, "agg", "while True:", 16)
        assert generate(node_a, "pd", "while True:", 16) == expected
        assert generate(node_b, "pd", "while True:", 16) == expected
        node_a.wait_for(lambda: node_a.metric_value("pdserve_kv_transfer_seconds_count", model="pd") >= 2,
                        "node A's prefill engine to have handed off both requests", 5)
    finally:
        node_a.stop()
        node_b.stop()
        etcd.cleanup()


def test_200_mixed_requests_with_cancellations_leave_every_pool_free(pd_server):
    rng = random.Random(3)
    prompts = ["a", "def f(x):\n    return x", "class A:\n    pass\n" * 12, "import os\n" * 40]
    outcomes = {"ok": 0, "cancelled": 0, "error": []}
    lock = threading.Lock()

    def worker(seed: int, count: int):
        r = random.Random(seed)
        clients = {model: LLMClient(pd_server.url, model) for model in ("pd", "agg")}
        for _ in range(count):
            client = clients[r.choice(["pd", "pd", "agg"])]
            pieces = client.stream(r.choice(prompts), timeout=60, **GREEDY, max_tokens=r.randint(1, 40))
            cancel_after = r.choice([None, None, None, 1, 1, 3])   # pieces read before cancelling
            outcome = "ok"
            try:
                for seen, _ in enumerate(pieces, start=1):
                    if seen == cancel_after:
                        outcome = "cancelled"
                        break
            except InferenceServerException as exc:
                outcome = str(exc)
            finally:
                pieces.close()              # an early close cancels the request
            with lock:
                if outcome in ("ok", "cancelled"):
                    outcomes[outcome] += 1
                else:
                    outcomes["error"].append(outcome)
        for client in clients.values():
            client.close()

    threads = [threading.Thread(target=worker, args=(rng.random(), 25)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert outcomes["error"] == []
    assert outcomes["ok"] + outcomes["cancelled"] == 200 and outcomes["cancelled"] > 20
    pd_server.wait_for(
        lambda: all(s.value == 0 for fam, samples in pd_server.metrics().items()
                    if fam in ("pdserve_kv_cache_usage_ratio", "pdserve_requests_running", "pdserve_requests_waiting")
                    for s in samples),
        "every engine's pool all-free", 15)


def test_long_prompts_do_not_stall_the_running_streams_with_one_engine_pinned_per_core(repo, demo_model,
                                                                                       dedicated_cores):
    """The demo layout (PREFILL on cpu:0, DECODE on cpu:1) at the front end's default CPU priority:
    while the prefill engine computes long prompts, the streams on the decode engine keep flowing.
    Both cores are then busy with engine threads that never sleep, and the front end must still get
    its turn on them (at SCHED_IDLE it did not: the streams stood still for about a second)."""
    from transformers import AutoTokenizer
    add_model(repo, "pd", demo_model, config_text(role_groups=(("PREFILL", "cpu:0"), ("DECODE", "cpu:1")),
                                                  max_model_len=2048, kv_cache_blocks=1024))
    server = PdServer(repo).start()
    try:
        server.wait_ready("pd", timeout=120)
        tokenizer = AutoTokenizer.from_pretrained(demo_model)
        rng = random.Random(0)
        vocab = [i for i in range(len(tokenizer)) if i not in set(tokenizer.all_special_ids)]
        long_prompts = [tokenizer.decode([rng.choice(vocab) for _ in range(1024)]) for _ in range(3)]
        generate(server, "pd", long_prompts[0][:200], 2)   # warm-up: both engines have run once
        streams: dict[int, object] = {}

        def stream(i: int) -> None:
            client = LLMClient(server.url, "pd")
            try:
                streams[i] = client.stream_all(f"def f{i}(x):", timeout=120, max_tokens=300, **GREEDY)
            finally:
                client.close()

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        server.wait_for(lambda: server.metric_value("pdserve_requests_running", role="DECODE") == 16, "16 streams", 30)
        answers = []
        longs = [threading.Thread(target=lambda p: answers.append(generate(server, "pd", p, 2)[1]), args=(p,))
                 for p in long_prompts]
        for t in longs:   # queued together: the prefill engine's core stays busy for seconds
            t.start()
        for t in threads + longs:
            t.join(timeout=120)
        assert answers == [2, 2, 2]
        assert sorted(streams) == list(range(16)) and all(r.num_output_tokens == 300 for r in streams.values())
        gaps = [b - a for r in streams.values() for a, b in zip(r.piece_times, r.piece_times[1:])]
        assert max(gaps) < 0.5, f"a stream stood still for {max(gaps):.2f} s while the prompts were computed"
    finally:
        server.stop()


def test_short_prompts_are_prefilled_by_the_decode_engine_long_ones_handed_off(tmp_path, small_model):
    """max_local_prefill_tokens: a prompt that short is computed by the DECODE engine (no KV
    handoff), a longer one by the PREFILL engine, with the same greedy text as aggregated."""
    repo = str(tmp_path / "repo")
    add_model(repo, "agg", small_model, config_text(max_model_len=512))
    add_model(repo, "pd", small_model, config_text(role_groups=PD, max_model_len=512, max_local_prefill_tokens=32))
    server = PdServer(repo).start()
    try:
        server.wait_ready("agg")
        server.wait_ready("pd")

        def prefills(where: str) -> float:
            return server.metric_value("pdserve_prefills_total", model="pd", where=where)
        short, long = "x = 1", "def handler(event, context):\n    " * 10
        assert generate(server, "pd", short) == generate(server, "agg", short)
        assert (prefills("local"), prefills("remote")) == (1, 0)
        assert generate(server, "pd", long) == generate(server, "agg", long)
        assert (prefills("local"), prefills("remote")) == (1, 1)
        server.wait_for(lambda: transfers(server) == 1, "the long prompt's one KV handoff", 10)
    finally:
        server.stop()
