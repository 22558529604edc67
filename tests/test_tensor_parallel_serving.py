"""Tensor parallelism served: one instance over cpu:0 and cpu:1 (two processes joined with gloo)
gives one device's greedy text through tritonclient, so does PD between instances of sizes 2
and 1 either way round (each rank writing its KV heads through Mooncake), and a rank killed
takes its instance down and back up whole."""
import os
import queue
import signal
import threading
import time

import pytest
import tritonclient.grpc as grpcclient

from pdserve_testing.harness import PdServer, add_model, config_text, inputs, write_config

GREEDY = {"temperature": 0, "ignore_eos": True}


def tp_config(size: int = 2, role: str = "BOTH", **params) -> str:
    """One instance of `size` ranks on cpu:0.. (size 1: one device, the reference)."""
    devices = ", ".join(f'"cpu:{i}"' for i in range(size))
    return config_text(role_groups=((role, "cpu:0"),), **params).replace(
        'devices: [ "cpu:0" ]', f"devices: [ {devices} ] tensor_parallel_size: {size}")


def pd_config(prefill_size: int, decode_size: int, auto: bool = False, **params) -> str:
    """A PREFILL and a DECODE instance of these sizes (ranks on cpu:0.., or cpu:1 for a size 1).
    auto: both groups AUTO instead (the planner starts the first PREFILL, the second DECODE)."""
    roles = ("AUTO", "AUTO") if auto else ("PREFILL", "DECODE")
    text = config_text(role_groups=((roles[0], "cpu:0"), (roles[1], "cpu:2")), **params)
    for device, size in (("cpu:0", prefill_size), ("cpu:2", decode_size)):
        devices = ", ".join(f'"cpu:{i}"' for i in range(size)) if size > 1 else '"cpu:1"'
        text = text.replace(f'devices: [ "{device}" ]', f"devices: [ {devices} ] tensor_parallel_size: {size}")
    return text


def stream(server: PdServer, model: str, prompt: str, max_tokens: int, timeout: float = 60) -> tuple[str, Exception | None]:
    """A greedy request streamed through tritonclient: its text, and the error it ended with."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer(model, inputs(prompt, True, {**GREEDY, "max_tokens": max_tokens},
                                            exclude_input_in_output=True), enable_empty_final_response=True)
    text, error = "", None
    try:
        while True:
            result, error = responses.get(timeout=timeout)
            if error is not None:
                return text, error
            text += "".join(t.decode() for t in result.as_numpy("text_output") or ())
            if result.get_response().parameters["triton_final_response"].bool_param:
                return text, None
    finally:
        client.stop_stream()
        client.close()


def followers(pid: int) -> list[int]:
    """The ranks rank 0 started (its child processes)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


PROMPTS = [("x = 1", 24), ("def handler(event, context):\n    " * 12, 24)]   # one block; many (chunked)


@pytest.fixture(scope="module")
def tp_server(tmp_path_factory, small_model):
    """'one' on cpu:0 and 'tp2' on cpu:0 + cpu:1, the same weights; 'p2d1' (PREFILL of size 2,
    DECODE of size 1) and 'p1d2' (the other way round)."""
    repo = str(tmp_path_factory.mktemp("tp-repo"))
    add_model(repo, "one", small_model, config_text(role_groups=(("BOTH", "cpu:0"),), max_num_batched_tokens=64))
    add_model(repo, "tp2", small_model, tp_config(2, max_num_batched_tokens=64))
    add_model(repo, "p2d1", small_model, pd_config(2, 1, max_num_batched_tokens=64))
    add_model(repo, "p1d2", small_model, pd_config(1, 2, max_num_batched_tokens=64))
    add_model(repo, "auto21", small_model, pd_config(2, 1, auto=True, max_num_batched_tokens=64))
    server = PdServer(repo).start()
    for model in ("one", "tp2", "p2d1", "p1d2", "auto21"):
        server.wait_ready(model)
    yield server
    server.stop()


def test_size_2_streams_one_devices_greedy_text(tp_server):
    for prompt, max_tokens in PROMPTS * 2:   # the second round reuses the prefix cache
        expected, error = stream(tp_server, "one", prompt, max_tokens)
        assert error is None and expected
        assert stream(tp_server, "tp2", prompt, max_tokens) == (expected, None)
    # a batch of concurrent requests: one step carries several sequences over both ranks
    burst = [f"def f{i}(x):" for i in range(4)]
    assert streams_at_once(tp_server, "tp2", burst) == [stream(tp_server, "one", p, 16) for p in burst]
    # one instance: one record, its rank 0's, with its size
    records = [r for r in tp_server.engines() if r["model"] == "tp2"]
    assert len(records) == 1 and records[0]["capacity"]["tensor_parallel_size"] == 2
    assert len(followers(records[0]["pid"])) == 1



def streams_at_once(server, model: str, prompts: list[str], max_tokens: int = 16) -> list:
    """The prompts streamed concurrently (one step carries several sequences); outcomes in order."""
    outcomes: dict = {}
    threads = [threading.Thread(target=lambda i=i, p=p: outcomes.__setitem__(i, stream(server, model, p, max_tokens)))
               for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [outcomes[i] for i in range(len(prompts))]

@pytest.mark.parametrize("model", ["p2d1", "p1d2", "auto21"])
def test_pd_between_sizes_streams_one_devices_greedy_text(tp_server, model):
    """Each prefill rank writes the KV heads it holds into the decode rank(s) that own them,
    strided where the sizes differ. A lone prompt is handed off (max_local_prefill_tokens 0);
    of a burst, the router may prefill some on the decode engine. The long prompt is chunked
    (max_num_batched_tokens 64: pushed piece by piece), and the second round finds it in both
    engines' prefix caches (blocks the decode engine holds are not written). auto21: the same
    with AUTO instances, started PREFILL (size 2) and DECODE (size 1)."""
    before = tp_server.metric_value("pdserve_kv_transfer_seconds_count", model=model)
    for prompt, max_tokens in PROMPTS * 2:
        assert stream(tp_server, model, prompt, max_tokens) == stream(tp_server, "one", prompt, max_tokens)
    # handed off, not prefilled by the decode engine after a failed handoff
    tp_server.wait_for(lambda: tp_server.metric_value("pdserve_kv_transfer_seconds_count", model=model) >= before + 2,
                       "the handoffs in the metrics", 10)
    tp_server.wait_for(lambda: tp_server.metric_value("pdserve_prefix_cache_hits_total", model=model) > 0,
                       "the second round's prefix-cache hits in the metrics", 10)
    burst = [f"def f{i}(x):" for i in range(3)]
    assert streams_at_once(tp_server, model, burst) == [stream(tp_server, "one", p, 16) for p in burst]
    assert tp_server.metric_value("pdserve_kv_transfer_failures_total", model=model) == 0
    records = {r["role"]: r for r in tp_server.engines() if r["model"] == model}
    sizes = {"p2d1": {"PREFILL": 2, "DECODE": 1}, "p1d2": {"PREFILL": 1, "DECODE": 2},
             "auto21": {"PREFILL": 2, "DECODE": 1}}[model]
    assert {role: r["capacity"]["tensor_parallel_size"] for role, r in records.items()} == sizes


def test_kill_9_of_a_rank_restarts_its_instance_and_fails_its_streams(tp_server):
    expected, _ = stream(tp_server, "one", "import os", 16)
    record = next(r for r in tp_server.engines() if r["model"] == "tp2")
    outcome: list = []
    t = threading.Thread(target=lambda: outcome.append(stream(tp_server, "tp2", "def f(x):", 480)))
    t.start()
    tp_server.wait_for(lambda: tp_server.metric_value("pdserve_requests_running", model="tp2") == 1, "a stream", 30)
    os.kill(followers(record["pid"])[0], signal.SIGKILL)
    killed_at = time.monotonic()
    t.join(60)
    assert not t.is_alive(), "a stream hangs after its instance lost a rank"
    text, error = outcome[0]
    assert error is not None, f"the stream ended without an error after {len(text)} characters"
    # the instance comes back whole (a new rank 0, a new follower) and serves the same text
    tp_server.wait_for(lambda: any(r["model"] == "tp2" and r["instance_id"] != record["instance_id"]
                                   and r["state"] == "ready" for r in tp_server.engines()), "the restarted instance", 120)
    assert stream(tp_server, "tp2", "import os", 16) == (expected, None)
    assert time.monotonic() - killed_at < 120


def test_a_stalled_rank_takes_its_instance_down_and_no_stream_hangs(tp_server):
    """SIGSTOP of a follower: rank 0 waits in a collective, makes no progress, and the watchdog
    (PDSERVE_ENGINE_STALL_TIMEOUT) kills it; the follower dies with it and the instance restarts."""
    record = next(r for r in tp_server.engines() if r["model"] == "tp2" and r["state"] == "ready")
    outcome: list = []
    t = threading.Thread(target=lambda: outcome.append(stream(tp_server, "tp2", "def g(x):", 480)))
    t.start()
    tp_server.wait_for(lambda: tp_server.metric_value("pdserve_requests_running", model="tp2") == 1, "a stream", 30)
    [follower] = followers(record["pid"])
    os.kill(follower, signal.SIGSTOP)
    t.join(60)
    assert not t.is_alive(), "a stream hangs behind a stalled rank"
    assert outcome[0][1] is not None
    tp_server.wait_for(lambda: not os.path.exists(f"/proc/{follower}"), "the stalled rank to be gone", 30)
    tp_server.wait_for(lambda: any(r["model"] == "tp2" and r["instance_id"] != record["instance_id"]
                                   and r["state"] == "ready" for r in tp_server.engines()), "the restarted instance", 120)


def pool_in_use(server: PdServer, model: str, role: str) -> float:
    return server.metric_value("pdserve_kv_cache_usage_ratio", model=model, role=role)


def restarted(server: PdServer, record: dict) -> bool:
    return any(r["model"] == record["model"] and r["role"] == record["role"] and r["state"] == "ready"
               and r["instance_id"] != record["instance_id"] for r in server.engines())


LONG = "class Handler:\n    def run(self):\n        return 1\n" * 12    # many blocks, handed off


@pytest.mark.parametrize("model,dies", [("p2d1", "PREFILL"), ("p1d2", "DECODE")])
def test_a_rank_killed_mid_handoff_leaks_no_block_and_no_stream_hangs(tp_server, model, dies):
    """The rank is stopped (SIGSTOP) before the handoff, so the handoff waits on it, then killed.
    A prefill rank: its instance goes down, the decode engine prefills the prompt itself and
    streams the same text. A decode rank: its instance goes down, the stream ends (an error, or
    migrated), and the prefill engine, whose writes fail, frees the prompt's blocks."""
    expected, _ = stream(tp_server, "one", LONG, 8)
    record = next(r for r in tp_server.engines() if r["model"] == model and r["role"] == dies and r["state"] == "ready")
    survivor = "DECODE" if dies == "PREFILL" else "PREFILL"
    [rank] = followers(record["pid"])
    os.kill(rank, signal.SIGSTOP)
    outcome: list = []
    t = threading.Thread(target=lambda: outcome.append(stream(tp_server, model, LONG, 8, timeout=90)))
    t.start()
    try:
        tp_server.wait_for(lambda: sum(tp_server.metric_value(f"pdserve_requests_{state}", model=model, role="PREFILL")
                                       for state in ("waiting", "running")) == 1,
                           "the prefill engine to hold the prompt", 30)
    finally:
        os.kill(rank, signal.SIGKILL)
    t.join(90)
    assert not t.is_alive(), "a stream hangs after a rank died mid-handoff"
    text, error = outcome[0]
    if dies == "PREFILL":
        assert (text, error) == (expected, None)
    else:
        assert error is not None or text == expected
    tp_server.wait_for(lambda: restarted(tp_server, record), "the instance to restart", 120)
    tp_server.wait_for(lambda: pool_in_use(tp_server, model, survivor) == 0, f"the {survivor} engine's pool all-free", 30)
    assert stream(tp_server, model, LONG, 8) == (expected, None)


def test_a_changed_config_reloads_a_tensor_parallel_model_beside_the_old_one(tp_server):
    """Hot reload: tp2's new config loads (two ranks again) beside the old, then takes over."""
    expected, _ = stream(tp_server, "one", "import os", 16)
    repo = tp_server.repo
    write_config(os.path.join(repo, "tp2"), tp_config(2, max_num_batched_tokens=64, max_num_seqs=8))
    tp_server.wait_for(lambda: tp_server.client.get_model_config("tp2", as_json=True)["config"]["parameters"]
                       ["max_num_seqs"]["string_value"] == "8", "the changed config to serve", 120)
    assert stream(tp_server, "tp2", "import os", 16) == (expected, None)
    tp_server.wait_for(lambda: len([r for r in tp_server.engines() if r["model"] == "tp2"]) == 1,
                       "the old instance to go", 60)
    [record] = [r for r in tp_server.engines() if r["model"] == "tp2"]
    assert record["capacity"]["tensor_parallel_size"] == 2 and len(followers(record["pid"])) == 1
