"""Quantized weights (engine/quantization.py, engine/kernels/quant.py): the maths of quantizing
and packing, compressed-tensors checkpoints written by compressed-tensors' own compressors from a
small seeded model (W8A8 and W4A16, as llm-compressor saves them) against transformers' loading
of the same checkpoints, and `quantization: int8` against the unquantized model, in process and
served through real processes."""
import os
import queue
import shutil

import numpy as np
import pytest
import torch
import transformers
import tritonclient.grpc as grpcclient
from transformers import AutoModelForCausalLM, AutoTokenizer

from pdserve_testing.engines import greedy_tokens
from pdserve_testing.harness import DEMO_MODEL, PdServer, add_model, config_text, inputs

from pdserve.engine.attention import AttentionMetadata
from pdserve.engine.config import EngineConfig
from pdserve.engine.kernels.cpu import INT8_DOT_FLAGS, CpuKernels, cpu_flags
from pdserve.engine.kernels.quant import FakeQuantLinear, OneDnnInt8Linear
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.model_runner import ModelRunner, load_state_dict
from pdserve.engine.quantization import (QuantizationError, QuantizedWeight, pack_int32, plan,
                                         quantize_int8_per_channel, quantize_int8_per_token, unpack_int32)
from pdserve.repository.config import ConfigError, load_model_spec

ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors writes the test checkpoints")

VOCAB = 8192   # the demo tokenizer's
# hidden and intermediate sizes that are whole groups of 128 (W4A16's group size)
CONFIG = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, eos_token_id=0, bos_token_id=0, pad_token_id=0,
              initializer_range=0.08)   # peaked next-token distributions: no near-ties for rounding to flip
PROMPT = [int(t) for t in np.random.default_rng(0).integers(3, VOCAB, 40)]


# ---- the maths -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8])
def test_packing_is_compressed_tensors_format(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    low = -(1 << (bits - 1))
    values = torch.randint(low, -low, (6, 70), dtype=torch.int8)     # 70: a partial last word
    theirs = pack_to_int32(values, bits)
    assert torch.equal(pack_int32(values, bits), theirs)
    assert torch.equal(unpack_int32(theirs, bits, 70), values)
    assert torch.equal(unpack_from_int32(pack_int32(values, bits), bits, values.shape), values)


def test_int8_per_channel_and_per_token_quantization_bounds():
    w = torch.randn(32, 100) * torch.logspace(-3, 1, 32)[:, None]
    values, scale = quantize_int8_per_channel(w)
    assert values.dtype == torch.int8 and scale.shape == (32, 1)
    assert values.abs().amax(1).eq(127).all()                       # each channel's largest weight is +-127
    assert ((values.float() * scale - w).abs() <= scale / 2 + 1e-7).all()
    x = torch.randn(5, 100, dtype=torch.bfloat16) * 30
    xq, xs = quantize_int8_per_token(x)
    assert xq.abs().amax(1).eq(127).all() and xs.shape == (5, 1)
    assert ((xq.float() * xs - x.float()).abs() <= xs / 2 + 1e-5).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_int8_linear_equals_the_reference(dtype):
    torch.manual_seed(0)
    values, scale = quantize_int8_per_channel(torch.randn(200, 96))
    weight, bias = QuantizedWeight(values, scale), torch.randn(200)
    kernels = CpuKernels(torch.device("cpu"), dtype)
    if not cpu_flags() & INT8_DOT_FLAGS:   # AVX2 only: oneDNN's int8 path saturates, the reference runs
        assert isinstance(kernels.linear(weight, bias), FakeQuantLinear)
        return
    fast, reference = OneDnnInt8Linear(weight, bias), FakeQuantLinear(weight, bias)
    for rows in (1, 7, 100):
        x = (torch.randn(rows, 96) * 4).to(dtype)
        want = reference(x).float()
        torch.testing.assert_close(fast(x).float(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
    assert isinstance(kernels.linear(weight, bias), OneDnnInt8Linear)    # the factory picks it


def test_quantized_weights_concatenate_stack_and_split_as_tensors():
    torch.manual_seed(0)
    parts = [QuantizedWeight(*quantize_int8_per_channel(torch.randn(n, 64))) for n in (8, 4, 4)]
    fused = torch.cat(parts).detach()                                   # a fused QKV
    assert isinstance(fused, QuantizedWeight) and fused.shape == (16, 64)
    torch.testing.assert_close(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
    for part, back in zip(parts, fused.split([8, 4, 4])):              # Phi-3's split of its fused qkv
        assert torch.equal(part.values, back.values) and torch.equal(part.scale, back.scale)
    experts = torch.stack([torch.cat(parts[1:])] * 3)                   # MoE experts stacked, then iterated
    assert [tuple(e.shape) for e in experts] == [(8, 64)] * 3
    # anything else sees the dequantized weight
    torch.testing.assert_close(torch.matmul(torch.ones(1, 64), parts[0].t()), torch.ones(1, 64) @ parts[0].dequantize().t())


def test_what_cannot_run_is_refused_clearly(tmp_path):
    cpu = torch.device("cpu")
    with pytest.raises(QuantizationError, match="fp8 needs a CUDA GPU of compute capability 8.9"):
        plan(transformers.Qwen2Config(), "fp8", cpu)
    awq = transformers.Qwen2Config()
    awq.quantization_config = {"quant_method": "awq"}
    with pytest.raises(QuantizationError, match="quant_method 'awq' are not supported"):
        plan(awq, "", cpu)
    static = transformers.Qwen2Config()
    static.quantization_config = {"quant_method": "compressed-tensors", "config_groups": {"g": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True},
        "input_activations": {"num_bits": 8, "type": "int", "strategy": "tensor", "dynamic": False}}}}
    with pytest.raises(QuantizationError, match="static"):
        plan(static, "", cpu)
    with pytest.raises(QuantizationError, match="already quantized"):
        plan(transformers.Qwen2Config(quantization_config=static.quantization_config), "int8", cpu)
    with pytest.raises(QuantizationError, match="quantized deepseek_v3 models are not supported yet"):
        plan(transformers.DeepseekV3Config(), "int8", cpu)
    model = tmp_path / "m"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(config_text(quantization="int4"))
    with pytest.raises(ConfigError, match="'quantization' is 'int4'; use int8, fp8"):
        load_model_spec(str(model))


# ---- checkpoints ---------------------------------------------------------------------------------
def write_float(out: str, seed: int = 0) -> str:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(transformers.Qwen2Config(**CONFIG)).float().eval()
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(DEMO_MODEL, name), out)
    return out


def write_compressed(src: str, out: str, preset: str) -> str:
    """`src` quantized with compressed-tensors' preset scheme (W8A8, W4A16), min-max scales, and
    saved compressed as llm-compressor saves it (ModelCompressor)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    config = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])}, ignore=["lm_head"])
    apply_quantization_config(model, config)
    with torch.no_grad():
        for module in model.modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None:
                continue
            args, w = scheme.weights, module.weight
            w = w.unflatten(-1, (-1, args.group_size)) if args.group_size else w.unsqueeze(-2)
            scale, zero_point = calculate_qparams(w.amin(-1), w.amax(-1), args)
            module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, name), out)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, demo_model):
    root = tmp_path_factory.mktemp("quantized")
    fp = write_float(str(root / "float"))
    return {"float": fp, "W8A8": write_compressed(fp, str(root / "w8a8"), "W8A8"),
            "W4A16": write_compressed(fp, str(root / "w4a16"), "W4A16")}


def engine_logits(path: str, tokens: list[int], **cfg) -> torch.Tensor:
    """Every position's logits from pdserve's engine (one prefill), [T, vocab] float32."""
    runner = ModelRunner(EngineConfig(model_path=path, dtype="float32", kv_cache_blocks=8, max_model_len=128, **cfg))
    t = lambda v: torch.tensor(v, dtype=torch.long)   # noqa: E731
    n = len(tokens)
    meta = AttentionMetadata(slot_blocks=t([1 + p // 16 for p in range(n)]), slot_offsets=t([p % 16 for p in range(n)]),
                             last_token_indices=t(range(n)), prefill_bounds=[(0, n)], prefill_cached=[0],
                             prefill_block_tables=[None])
    with torch.inference_mode():
        return runner.model(t(tokens), t(range(n)), runner.kv_cache, meta).float()


def hf_logits(path: str, tokens: list[int]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def greedy_sequence(path: str, n: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model.generate(torch.tensor([PROMPT]), max_new_tokens=n, min_new_tokens=n, do_sample=False)[0].tolist()


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """The share of positions whose greedy token (argmax) is the same."""
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item()


@pytest.mark.parametrize("preset", ["W8A8", "W4A16"])
def test_compressed_checkpoint_weights_are_the_ones_transformers_decompresses(checkpoints, preset):
    path = checkpoints[preset]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        hf(torch.tensor([PROMPT[:2]]))          # compressed-tensors decompresses on the first forward
    config = transformers.AutoConfig.from_pretrained(path)
    ours = plan(config, "", torch.device("cpu")).bundle(load_state_dict(path))
    quantized = {k[:-len(".weight")]: w for k, w in ours.items() if isinstance(w, QuantizedWeight)}
    assert len(quantized) == 7 * CONFIG["num_hidden_layers"]          # every linear but the LM head
    for name, weight in quantized.items():
        assert weight.activations == ("int8" if preset == "W8A8" else "none")
        assert torch.equal(weight.dequantize(), hf.get_submodule(name).weight), name


@pytest.mark.parametrize("preset", ["W8A8", "W4A16"])
def test_compressed_checkpoint_logits_match_transformers_loading_of_it(checkpoints, preset):
    """On transformers' own greedy continuation. W4A16 (16-bit activations): transformers'
    logits. W8A8: activations are quantized per token as vLLM does (amax / 127) where
    compressed-tensors' forward uses amax / 127.5, two roundings as far apart as either is from
    the float model: logits within that distance, the greedy token the same at most positions."""
    path = checkpoints[preset]
    tokens = greedy_sequence(path, 40)
    ours, theirs, unquantized = engine_logits(path, tokens), hf_logits(path, tokens), hf_logits(checkpoints["float"], tokens)
    error = (ours - theirs).abs()
    if preset == "W4A16":
        assert error.max().item() <= 1e-3 * theirs.std().item()
        assert agreement(ours, theirs) == 1.0
    else:
        assert error.mean().item() <= 0.1 * theirs.std().item() and error.max().item() <= 0.5 * theirs.std().item()
        assert agreement(ours, theirs) >= 0.85
        assert agreement(ours, unquantized) >= 0.8
    # int4 of random weights (no structure for the groups to keep) moves the logits further
    cosine = torch.nn.functional.cosine_similarity(ours, unquantized, dim=-1).min().item()
    assert cosine >= {"W8A8": 0.99, "W4A16": 0.7}[preset]


def test_int8_at_load_stays_close_to_the_unquantized_model(checkpoints):
    path = checkpoints["float"]
    tokens = greedy_sequence(path, 40)
    ours, unquantized = engine_logits(path, tokens, quantization="int8"), hf_logits(path, tokens)
    error = (ours - unquantized).abs()
    assert error.mean().item() <= 0.1 * unquantized.std().item() and error.max().item() <= 0.5 * unquantized.std().item()
    assert agreement(ours, unquantized) >= 0.85


# ---- served --------------------------------------------------------------------------------------
def streamed_text(server: PdServer, model: str, prompt: str, n: int) -> str:
    pieces: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.url)
    client.start_stream(callback=lambda result, error: pieces.put(error or result))
    client.async_stream_infer(model, inputs(prompt, True, {"max_tokens": n, "temperature": 0, "ignore_eos": True},
                                            exclude_input_in_output=True))
    client.stop_stream()
    client.close()
    text = ""
    while not pieces.empty():
        result = pieces.get()
        assert not isinstance(result, Exception), result
        text += "".join(t.decode() for t in result.as_numpy("text_output") or ())
    return text


def engine_greedy(path: str, tokens: list[int], n: int, **cfg) -> list[int]:
    engine = LLMEngine(EngineConfig(model_path=path, dtype="float32", kv_cache_blocks=32, max_model_len=256, **cfg))
    return greedy_tokens(engine, [tokens], n)[0]


def test_quantized_models_serve_through_tritonclient(checkpoints, repo):
    """A W8A8 and a W4A16 checkpoint and `quantization: int8` of the float one, each served by
    its own engine process: READY, and each streams the greedy text of pdserve's engine in this
    process; W4A16's is transformers' greedy text too."""
    prompt = "def parse(tokens):\n    \"\"\"Reads"
    models = {"w8a8": (checkpoints["W8A8"], {}), "w4a16": (checkpoints["W4A16"], {}),
              "int8": (checkpoints["float"], {"quantization": "int8"})}
    for name, (path, params) in models.items():
        add_model(repo, name, path, config_text(max_model_len=256, kv_cache_blocks=32, max_num_seqs=4, **params))
    tokenizer = AutoTokenizer.from_pretrained(checkpoints["float"])
    ids = tokenizer(prompt).input_ids
    expected = {name: tokenizer.decode(engine_greedy(path, ids, 16, **params), skip_special_tokens=True)
                for name, (path, params) in models.items()}
    hf = AutoModelForCausalLM.from_pretrained(checkpoints["W4A16"], dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, len(ids):]
    assert expected["w4a16"] == tokenizer.decode(out, skip_special_tokens=True)
    server = PdServer(repo).start()
    try:
        for name in models:
            server.wait_ready(name, timeout=120)
        for name in models:
            assert streamed_text(server, name, prompt, 16) == expected[name], name
    finally:
        server.stop()


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gemma3_text", "phi3"])
def test_int8_at_load_runs_every_quantizable_family(family, tmp_path, demo_model):
    """MoE experts stacked, Phi-3's fused weights split, Gemma's norms: each family's own load
    path carries its quantized weights; the logits stay close to the family's float ones."""
    from test_model_families import CONFIGS, write_model
    path = write_model(CONFIGS[family](), str(tmp_path / family))
    ours, unquantized = engine_logits(path, PROMPT[:24], quantization="int8"), engine_logits(path, PROMPT[:24])
    cosine = torch.nn.functional.cosine_similarity(ours, unquantized, dim=-1).min().item()
    assert cosine >= 0.95, family
