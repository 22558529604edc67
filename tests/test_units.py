"""Pure logic: config validation messages, tensor parsing, detokenizer, block accounting."""
import asyncio
import json
import types

import grpc
import pytest

from pdserve_testing.harness import config_text, thread_policies, write_config

from pdserve._proto import engine_pb2
from pdserve.cluster.engine_client import EngineCallError, GenerateCall
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.detokenizer import IncrementalDetokenizer, text_of_ids
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.sequence import SamplingParams, Sequence
from pdserve.frontend.tensors import InvalidInput, parse_sampling_parameters
from pdserve.common.records import ModelRecord
from pdserve.repository.config import ConfigError, config_to_json, load_model_spec, published_spec


def model_folder(tmp_path, config: str, versions=(1,)):
    folder = tmp_path / "m"
    for v in versions:
        (folder / str(v)).mkdir(parents=True)
    write_config(str(folder), config)
    return str(folder)


@pytest.mark.parametrize("config,words", [
    ("instance_group [ { role: BOTH devices: [ \"tpu:0\" ] } ]", ["devices", "cpu, cpu:N, cuda:N, npu:N"]),
    ('parameters: { key: "kv_cache_blocks" value: { string_value: "many" } }', ["kv_cache_blocks", "int"]),
    ('parameters: { key: "colour" value: { string_value: "red" } }', ["colour", "known keys"]),
    ('name: "other"', ["folder", "'m'"]),
    ("max_batch_size: [", ["config.pbtxt", "text format"]),
    ('parameters: { key: "stream_interval" value: { string_value: "0" } }', ["stream_interval", "at least 1"]),
    ('parameters: { key: "admission_window_ms" value: { string_value: "inf" } }', ["admission_window_ms", "0 to 1000"]),
    ("version_policy: { specific: { versions: [ 4 ] } }", ["[4]", "available"]),
])
def test_config_errors_name_the_file_field_and_fix(tmp_path, config, words):
    with pytest.raises(ConfigError) as info:
        load_model_spec(model_folder(tmp_path, config))
    message = str(info.value)
    assert "config.pbtxt" in message
    for word in words:
        assert word in message


def test_config_versions_and_instances(tmp_path):
    text = config_text(role_groups=(("PREFILL", "cpu:0"), ("DECODE", "cpu:1"))) + "version_policy: { latest: { num_versions: 2 } }\n"
    spec = load_model_spec(model_folder(tmp_path, text, versions=(1, 3, 7)))
    assert spec.versions == [3, 7]
    assert [(i.role, i.device) for i in spec.instances] == [("PREFILL", "cpu:0"), ("DECODE", "cpu:1")]
    assert spec.engine_config(7, "cpu:1").model_path.endswith("/m/7")
    assert spec.config.model_transaction_policy.decoupled


def test_a_published_config_round_trips_signed_and_keeps_the_front_end_parameters(tmp_path):
    config = config_text(migration_limit=2, max_inflight_requests=5, enable_prefix_caching="true")
    spec = load_model_spec(model_folder(tmp_path, config))
    record = ModelRecord("m", "1", "node-a", config_to_json(spec.config))
    token = "a-secret-of-sixteen-or-more"
    read = ModelRecord.from_json(record.signed_json(token), token)
    remote = published_spec(read.model, int(read.version), read.config)
    assert remote.config == spec.config and remote.versions == [1] and remote.instances == []
    assert remote.engine_parameters == {"migration_limit": 2, "max_inflight_requests": 5}
    with pytest.raises(ValueError, match="signature"):
        ModelRecord.from_json(ModelRecord("m", "1", "node-a", read.config).to_json(), token)   # unsigned
    forged = json.loads(record.signed_json(token))
    forged["config"]["backend"] = "other"
    with pytest.raises(ValueError, match="signature"):
        ModelRecord.from_json(json.dumps(forged).encode(), token)


def test_no_version_folder(tmp_path):
    with pytest.raises(ConfigError, match="no numeric version folder"):
        load_model_spec(model_folder(tmp_path, "", versions=()))


def test_sampling_parameters_accept_strings_like_triton_vllm():
    sp = parse_sampling_parameters(json.dumps({"temperature": "0.5", "max_tokens": "7", "top_k": -1, "stop": "\n"}))
    assert (sp.temperature, sp.max_tokens, sp.top_k, list(sp.stop)) == (0.5, 7, 0, ["\n"])
    for bad in ({"max_tokens": 1.5}, {"seed": -1}, {"ignore_eos": "maybe"}, {"stop": [1]}, {"min_tokens": 99}, [1]):
        with pytest.raises(InvalidInput):
            parse_sampling_parameters(json.dumps(bad))


class ByteTokenizer:
    """Token i is byte i: decoding joins bytes, as a byte-level BPE decoder does."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def test_detokenizer_never_splits_a_character_and_holds_back_stops():
    detok = IncrementalDetokenizer(text_of_ids(ByteTokenizer()), stop=("END",))
    pieces = []
    for b in "héllo €nd E".encode():
        detok.add_token(b)
        pieces.append(detok.take_piece(final=False))
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == "héllo €nd"  # " E" could begin "END": held back
    stopped_at = next(i for i, b in enumerate(b"ND more") if detok.add_token(b))
    assert stopped_at == 1  # "END" completes with the D
    assert "".join(pieces) + detok.take_piece(final=True) == "héllo €nd "


def test_detokenizer_decodes_as_transformers_does(demo_model):
    """The Rust tokenizer's decode, taken directly, gives transformers' text: special tokens
    skipped, characters split across tokens, and with space clean-up on, transformers' own path."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    text = "def f(x):\n    return x  # héllo wörld €5 你好 "
    ids = tokenizer.encode(text)
    special = tokenizer.all_special_ids[:1]
    for window in [ids, special + ids + special, ids[1:3], ids[-4:], []]:
        assert text_of_ids(tokenizer)(window) == tokenizer.decode(window, skip_special_tokens=True)
    tokenizer.clean_up_tokenization_spaces = True
    assert text_of_ids(tokenizer).func == tokenizer.decode
    detok = IncrementalDetokenizer(text_of_ids(AutoTokenizer.from_pretrained(demo_model)))
    for token in ids:
        detok.add_token(token)
    assert detok.take_piece(final=True) == tokenizer.decode(ids, skip_special_tokens=True)


def test_preemption_frees_and_requeues():
    bm = BlockManager(num_blocks=4, block_size=2)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=100)
    a, b = Sequence("a", [1, 2, 3], SamplingParams()), Sequence("b", [7, 8, 9], SamplingParams())
    sched.add(a)
    sched.add(b)
    step = sched.schedule()
    assert step.prefills == [(a, 3), (b, 3)] and not step.decodes and bm.num_free_blocks == 0
    for token in (5, 6):
        sched.computed(step)
        for seq in (a, b):
            seq.output_token_ids.append(token)
        step = sched.schedule()
    # after token 6 both need a 3rd block for their 5th token: b, admitted last, is preempted
    assert step.decodes == [a] and not step.prefills and list(sched.waiting) == [b] and b.block_table == []
    sched.finish(a, "stop")
    assert bm.num_free_blocks == 4
    with pytest.raises(ValueError, match="kv_cache_blocks"):
        sched.add(Sequence("c", list(range(20)), SamplingParams()))


@pytest.mark.parametrize("model", ["demo_model", "small_model"])
def test_the_front_end_tokenizes_as_transformers_does(model, request, tmp_path):
    """Front ends tokenize prompts with `tokenizers` from tokenizer.json and send token ids to the
    engines; transformers' AutoTokenizer.encode (the reference the correctness tests use) must give
    the same ids, hence the same block hashes."""
    import asyncio

    from transformers import AutoTokenizer

    from pdserve.common.block_hash import block_hashes
    from pdserve.common.errors import ServeError
    from pdserve.frontend.prompts import PromptTokenizers
    folder = request.getfixturevalue(model)
    reference = AutoTokenizer.from_pretrained(folder)
    texts = ["Hello world", "  spaces\nnew line\t tab", "héllo wörld 你好 🙂", "The quick brown fox. " * 100,
             "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|> mid <|endoftext|>"]

    async def main():
        tokenizers = PromptTokenizers()
        try:
            for text in texts:
                ids = reference.encode(text)
                prompt = await tokenizers.encode(folder, text, block_size=4)
                assert (prompt.token_ids, prompt.block_hashes, prompt.block_size) == (ids, block_hashes(ids, 4), 4)
            with pytest.raises(ServeError, match="the prompt is empty"):
                await tokenizers.encode(folder, "")
            with pytest.raises(ServeError, match="has no tokenizer.json"):
                await tokenizers.encode(str(tmp_path), "no tokenizer here")
        finally:
            tokenizers.close()
    asyncio.run(main())


def test_prompts_over_max_model_len_are_refused_on_the_front_end(demo_model):
    """A prompt of max_model_len tokens or more fails with the engines' message; one whose byte
    length alone proves it too long fails before it is tokenized."""
    import asyncio
    import time

    from pdserve.common.errors import Cause, ServeError
    from pdserve.frontend.prompts import PromptTokenizers

    async def main():
        tokenizers = PromptTokenizers()
        try:
            loaded = await tokenizers.tokenizer(demo_model)
            assert loaded.bytes_per_token is not None   # byte-level BPE under NFC: the proof applies
            ok = await tokenizers.encode(demo_model, "def f(x):\n    return x\n", max_model_len=64)
            assert 0 < len(ok.token_ids) < 64
            too_long = r"the prompt has \d+ tokens but max_model_len is 64; shorten the prompt to at most 63 tokens"
            with pytest.raises(ServeError, match=too_long):
                await tokenizers.encode(demo_model, "".join(chr(0x4E00 + i) for i in range(64)), max_model_len=64)
            huge = "x = 1\n" * 600_000   # 3.6 MB
            started = time.monotonic()
            with pytest.raises(ServeError, match="bytes, more than max_model_len") as refused:
                await tokenizers.encode(demo_model, huge, max_model_len=4096)
            assert refused.value.cause == Cause.INVALID_ARGUMENT
            assert time.monotonic() - started < 0.5   # refused without tokenizing 3.6 MB
        finally:
            tokenizers.close()
    asyncio.run(main())


def test_a_tokenizer_that_can_drop_text_gives_no_byte_bound():
    """Whitespace pre-tokenizers and [UNK] models can turn megabytes into few tokens: no proof."""
    from pdserve.frontend.prompts import max_bytes_per_token
    byte_level = {"normalizer": {"type": "NFC"}, "model": {"type": "BPE"},
                  "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                      {"type": "Split", "behavior": "Isolated"}, {"type": "ByteLevel"}]}}
    assert max_bytes_per_token(byte_level, ["a", "abcd", "ĠĠĠ"]) == 6 * 3
    assert max_bytes_per_token({**byte_level, "normalizer": None}, ["a", "abcd"]) == 4
    assert max_bytes_per_token({**byte_level, "pre_tokenizer": {"type": "Whitespace"}}, ["a"]) is None
    assert max_bytes_per_token({**byte_level, "normalizer": {"type": "BertNormalizer"}}, ["a"]) is None
    assert max_bytes_per_token({"model": {"type": "WordPiece"}, "pre_tokenizer": None}, ["a"]) is None
    metaspace = {"normalizer": {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None, "model": {"type": "BPE", "byte_fallback": True}}
    assert max_bytes_per_token(metaspace, ["<0x0A>", "▁the"]) == 6 * 3
    assert max_bytes_per_token({**metaspace, "model": {"type": "BPE", "byte_fallback": False}}, ["a"]) is None


def test_bind_host_confines_named_hosts_and_keeps_the_operator_s_preloads():
    from pdserve.engine import bind_host
    assert bind_host.host_address("127.0.0.1") == "127.0.0.1"
    assert bind_host.host_address("[::1]") == "::1"
    assert bind_host.host_address("localhost") in ("127.0.0.1", "::1")   # names are resolved
    assert bind_host.host_address("0.0.0.0") is None and bind_host.host_address("::") is None
    env = bind_host.environment("127.0.0.1", {"LD_PRELOAD": "/opt/libmine.so"})
    assert env["PDSERVE_BIND_HOST"] == "127.0.0.1"
    assert env["LD_PRELOAD"].endswith(" /opt/libmine.so") and env["LD_PRELOAD"].split()[0].endswith(".so")
    assert bind_host.environment("0.0.0.0", {}) == {}


def _output(text: str, n: int, reason: str = "") -> engine_pb2.StreamOutput:
    return engine_pb2.StreamOutput(request_id="r", response=engine_pb2.GenerateResponse(
        text=text, token_ids=[n], num_input_tokens=5, num_output_tokens=n, finish_reason=reason))


def test_an_engine_call_merges_what_its_caller_has_not_taken_and_holds_to_the_stream_interval():
    async def main():
        stream = types.SimpleNamespace(calls={}, send=lambda command: None)
        call = GenerateCall(stream, "r", None, stream_interval=3)
        call.deliver(_output("a", 1))
        first = await asyncio.wait_for(call.__anext__(), 1)
        assert (first.text, list(first.token_ids)) == ("a", [1]), "the first token goes at once"
        call.deliver(_output("b", 2))
        call.deliver(_output("c", 3))
        waiting = asyncio.ensure_future(call.__anext__())
        await asyncio.sleep(0.05)
        assert not waiting.done(), "two tokens wait for the third"
        call.deliver(_output("d", 4))
        merged = await asyncio.wait_for(waiting, 1)
        assert (merged.text, list(merged.token_ids), merged.num_output_tokens) == ("bcd", [2, 3, 4], 4)
        call.deliver(_output("e", 5, "length"))
        last = await asyncio.wait_for(call.__anext__(), 1)
        assert (last.text, last.finish_reason) == ("e", "length"), "the end goes at once"
        with pytest.raises(StopAsyncIteration):
            await call.__anext__()

        # every token: a caller that falls behind gets one merged response, not a backlog
        behind = GenerateCall(stream, "s", None)
        for n, text in enumerate("xyz", start=1):
            behind.deliver(_output(text, n))
        taken = await asyncio.wait_for(behind.__anext__(), 1)
        assert (taken.text, taken.num_output_tokens) == ("xyz", 3)

        # the stream breaks with tokens held: the tokens come out first, then the error
        broken = GenerateCall(stream, "t", None, stream_interval=8)
        broken.deliver(_output("p", 1))
        await broken.__anext__()
        broken.deliver(_output("q", 2))
        broken.deliver(EngineCallError(grpc.StatusCode.UNAVAILABLE, "the engine went away"))
        assert (await asyncio.wait_for(broken.__anext__(), 1)).text == "q"
        with pytest.raises(EngineCallError):
            await broken.__anext__()

    asyncio.run(main())


def test_stream_interval_is_a_sampling_parameter_of_at_least_one():
    assert parse_sampling_parameters('{"stream_interval": "4"}').stream_interval == 4
    with pytest.raises(InvalidInput, match="stream_interval"):
        parse_sampling_parameters('{"stream_interval": 0}')


def test_front_end_cpu_priority_normal_changes_nothing_and_spawns_run_on_one_thread():
    import os
    import threading

    from pdserve.common import cpu_priority
    before = thread_policies(os.getpid())
    assert cpu_priority.lower_front_end("normal").startswith("normal")
    assert {tid: p for tid, p in thread_policies(os.getpid()).items() if tid in before} == before
    with pytest.raises(ValueError, match="auto, batch, idle, normal"):
        cpu_priority.lower_front_end("low")

    async def spawned_on():
        return {await cpu_priority.spawn(threading.get_native_id) for _ in range(3)}
    [spawner] = asyncio.run(spawned_on())   # one thread starts every process
    assert spawner != threading.get_native_id()


def test_auto_front_end_priority_goes_idle_only_beside_one_engine_on_every_core():
    from pdserve.common import cpu_priority
    assert cpu_priority.idle_is_safe(["cpu"])
    for devices in ([], ["cpu:0"], ["cpu", "cpu"], ["cpu:0", "cpu:1"], ["cuda:0"], ["cpu", "cuda:0"]):
        assert not cpu_priority.idle_is_safe(devices), devices


def test_a_chat_templates_bos_is_not_doubled():
    """A tokenizer whose post-processor adds BOS (Llama's) and a template text that starts with it:
    the chat door encodes without special tokens (one BOS), a raw prompt with them."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from pdserve.frontend.prompts import LoadedTokenizer, encode
    tokenizer = Tokenizer(models.WordLevel({"<s>": 0, "hi": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tokenizer.add_special_tokens(["<s>"])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    loaded = LoadedTokenizer(tokenizer, None)
    assert encode(loaded, "<s>hi", add_special_tokens=False).token_ids == [0, 1]
    assert encode(loaded, "hi").token_ids == [0, 1]


def test_admissions_count_each_versions_requests_not_yet_sent_to_an_engine():
    """What a front end sends as GenerateRequest.admitting: the requests of the same model version
    it is still tokenizing or routing; each closes once (when sent, or when its request ends)."""
    from collections import defaultdict

    from pdserve.frontend.core import Admission

    counts = defaultdict(int)
    first, second, third = (Admission(counts, ("m", "1")) for _ in range(3))
    other_model = Admission(counts, ("n", "1"))
    assert first.close() == 2
    assert first.close() == 2   # closing again changes nothing
    assert second.close() == 1 and third.close() == 0
    assert other_model.close() == 0 and counts == {("m", "1"): 0, ("n", "1"): 0}
