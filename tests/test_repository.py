"""Hot add, change, break and remove of models (poll mode); explicit load/unload; bad devices."""
import os
import shutil
import threading
import time

import pytest
from tritonclient.utils import InferenceServerException

from pdserve_testing.harness import PdServer, add_model, config_text, inputs, write_config

from pdserve_clients import LLMClient

GREEDY = {"max_tokens": 8, "temperature": 0, "ignore_eos": True}


class BackgroundStreams:
    """Keeps streaming requests going to one model and records every failure."""

    def __init__(self, url: str, model: str):
        self.url, self.model = url, model
        self.completed, self.failures = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        client = LLMClient(self.url, self.model)
        while not self._stop.is_set():
            try:
                client.stream_all("hello", timeout=60, **GREEDY)
                self.completed += 1
            except (InferenceServerException, TimeoutError) as exc:
                self.failures.append(str(exc) or "timed out")
        client.close()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=90)


def generate(server, model, version=""):
    result = server.client.infer(model, inputs("abc", False, GREEDY), model_version=version)
    return result.as_numpy("text_output")[0]


def test_poll_mode_hot_add_change_break_remove(repo, small_model):
    add_model(repo, "steady", small_model)
    server = PdServer(repo, poll_secs=1).start()
    try:
        server.wait_ready("steady")
        with BackgroundStreams(server.url, "steady") as streams:
            # add
            model_dir = add_model(repo, "hot", small_model)
            server.wait_ready("hot")
            before = generate(server, "hot")
            # change: a new config loads beside the old one, then takes over
            write_config(model_dir, config_text(max_num_seqs=8))
            server.wait_for(lambda: server.client.get_model_config("hot", as_json=True)["config"]["parameters"]
                            ["max_num_seqs"]["string_value"] == "8", "the changed config to serve")
            assert generate(server, "hot") == before
            # break: the old version keeps serving and the reason shows
            write_config(model_dir, "instance_group [ { role: BOTH devices: [ \"cpu\" ] } ]\nmax_batch_size: oops\n")
            server.wait_for(lambda: "previous configuration keeps serving" in server.states("hot")[0][2],
                            "the failed reload to show")
            version, state, reason = server.states("hot")[0]
            assert state == "READY" and "config.pbtxt" in reason and "max_batch_size" in reason
            assert generate(server, "hot") == before
            # a new version folder with a good config: version 2 serves
            write_config(model_dir, config_text())
            shutil.copytree(small_model, os.path.join(model_dir, "2"))
            server.wait_ready("hot", version="2")
            assert generate(server, "hot", "2") == before
            assert not server.client.is_model_ready("hot", "1")
            # remove
            shutil.rmtree(model_dir)
            server.wait_for(lambda: not server.states("hot"), "the removed model to go")
            with pytest.raises(InferenceServerException) as info:
                generate(server, "hot")
            assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert streams.failures == [], streams.failures
        assert streams.completed > 0
    finally:
        server.stop()


def test_broken_model_is_unavailable_with_reason(repo, small_model):
    model_dir = add_model(repo, "broken", small_model, config_text(dtype="float8"))
    server = PdServer(repo, poll_secs=1).start()
    try:
        server.wait_for(lambda: server.states("broken") and "dtype" in server.states("broken")[0][2],
                        "the broken model's reason")
        _, state, reason = server.states("broken")[0]
        assert state == "UNAVAILABLE" and "float32" in reason
        assert not server.client.is_server_ready()
        with pytest.raises(InferenceServerException) as info:
            generate(server, "broken")
        assert info.value.status() == "StatusCode.NOT_FOUND"
        # fixing the file loads it
        write_config(model_dir, config_text())
        server.wait_ready("broken")
        assert server.client.is_server_ready()
    finally:
        server.stop()


def test_missing_device_makes_model_unavailable(repo, small_model):
    add_model(repo, "nodevice", small_model, config_text(role_groups=(("BOTH", "cuda:99"),)))
    server = PdServer(repo, poll_secs=1).start()
    try:
        server.wait_for(lambda: server.states("nodevice") and "cuda:99" in server.states("nodevice")[0][2],
                        "the load failure's reason", timeout=60)
        _, state, reason = server.states("nodevice")[0]
        assert state == "UNAVAILABLE" and "cuda:99 is not available" in reason
    finally:
        server.stop()


def test_explicit_mode_load_and_unload(repo, small_model):
    add_model(repo, "first", small_model)
    add_model(repo, "second", small_model)
    server = PdServer(repo, mode="explicit", load_models=["first"]).start()
    try:
        server.wait_ready("first")
        assert server.states("second") == [("", "UNAVAILABLE", "unloaded")]
        with pytest.raises(InferenceServerException) as info:
            generate(server, "second")
        assert info.value.status() == "StatusCode.NOT_FOUND"
        server.client.load_model("second")
        assert server.states("second")[0][:2] == ("1", "READY")
        assert generate(server, "second")
        server.client.unload_model("first")
        assert server.states("first") == [("", "UNAVAILABLE", "unloaded")]
        assert not server.client.is_model_ready("first")
        with pytest.raises(InferenceServerException) as info:
            server.client.load_model("nonexistent")
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        # explicit mode ignores folder changes until asked
        add_model(repo, "third", small_model)
        time.sleep(2)
        assert server.states("third") == [("", "UNAVAILABLE", "unloaded")]
    finally:
        server.stop()


def test_version_not_ready_is_unavailable(repo, small_model):
    """While a new version loads, asking for it by number answers UNAVAILABLE."""
    model_dir = add_model(repo, "slow", small_model)
    server = PdServer(repo, poll_secs=1, extra_args=[]).start()
    try:
        server.wait_ready("slow")
        write_config(model_dir, config_text() + 'version_policy: { all: {} }\n')
        shutil.copytree(small_model, os.path.join(model_dir, "2"))
        server.wait_for(lambda: any(v == "2" and s == "LOADING" for v, s, _ in server.states("slow")),
                        "version 2 to be LOADING", timeout=30)
        with pytest.raises(InferenceServerException) as info:
            generate(server, "slow", "2")
        assert info.value.status() == "StatusCode.UNAVAILABLE"
        server.wait_ready("slow", "2")
        assert generate(server, "slow", "2") == generate(server, "slow", "1")
    finally:
        server.stop()
