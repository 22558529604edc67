"""The CPU kernels are built at install, one module per instruction set, and chosen from the CPU's
flags; an engine start runs no compiler and needs nothing under ~/.cache."""
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys

import pytest

from pdserve.engine.kernels import variants
from pdserve.engine.kernels.cpu import KernelsNotBuilt, cpu_flags, extension, load_variant

AVX2 = {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"}
AVX512 = AVX2 | {"avx512f", "avx512cd", "avx512bw", "avx512vl", "avx512dq"}


@pytest.mark.parametrize("flags, expected", [
    (AVX2, "avx2"),                                                   # Haswell .. Zen 3
    (AVX512, "avx512"),                                               # Skylake-SP, Ice Lake
    (AVX512 | {"avx512_bf16", "avx512_vnni"}, "avx512_bf16"),         # Cooper Lake, Zen 4 (no AMX)
    (AVX512 | {"avx512_bf16", "amx_tile", "amx_bf16", "amx_int8", "avx512_fp16"}, "amx_bf16"),  # Sapphire Rapids
    (AVX512 | {"avx512_bf16", "amx_tile", "amx_int8"}, "avx512_bf16"),  # AMX tiles without their bf16 product
    (AVX512 | {"amx_tile", "amx_bf16"}, "avx512"),                     # AMX without avx512_bf16's converts
    (AVX2 | {"avx512f", "avx512cd", "avx512er"}, "avx2"),             # Knights Landing: AVX-512 without BW/VL
    (AVX2 | {"avx512_bf16"}, "avx2"),                                 # bf16 alone is no AVX-512 build
    (AVX2 | {"avx_vnni", "avx_ne_convert"}, "avx2"),                  # AVX2-only cores with bf16 converts
    (AVX2 - {"fma"}, None),                                           # no FMA: the portable path
    ({"sse4_2", "avx"}, None),                                        # Sandy Bridge
    (set(), None),                                                    # no /proc/cpuinfo flags (ARM: "Features")
])
def test_the_variant_follows_the_cpu_flags(flags, expected):
    chosen = variants.choose(flags)
    assert (chosen and chosen.name) == expected


def test_each_variant_is_compiled_for_exactly_the_flags_it_needs():
    """-m flags, never -march=native (the build machine need not be the serving one), and what
    the compiler may use is what the choice requires of the CPU."""
    cpuinfo = {"-mavx2": "avx2", "-mfma": "fma", "-mf16c": "f16c", "-mavx512f": "avx512f", "-mavx512bw": "avx512bw",
               "-mavx512vl": "avx512vl", "-mavx512dq": "avx512dq", "-mavx512bf16": "avx512_bf16",
               "-mamx-tile": "amx_tile", "-mamx-bf16": "amx_bf16"}
    for v in variants.VARIANTS:
        assert {cpuinfo[f] for f in v.cflags} == v.needs, v.name
        assert not any(f.startswith("-march") for f in (*v.cflags, *variants.COMMON_CFLAGS))
    # best first: no variant is shadowed by an earlier one that needs less
    for i, v in enumerate(variants.VARIANTS):
        assert all(not (w.needs <= v.needs) for w in variants.VARIANTS[:i]), v.name
    assert variants.built_for("x86_64") == variants.VARIANTS and variants.built_for("aarch64") == ()


def test_setup_built_every_variant_and_the_bind_shim():
    """`make setup` (pip install -e . through setup.py) leaves one module per variant, the ones
    this CPU cannot run included, and the bind shim."""
    for v in variants.built_for(platform.machine()):
        assert importlib.util.find_spec(v.module) is not None, f"{v.module} not built: run make setup"
    assert importlib.util.find_spec("pdserve.engine._bind_host") is not None


def test_the_avx2_build_holds_no_avx512_instruction():
    """Its own flags reached the compiler, and its own object the linker (the variants build side
    by side from one source): an AVX2 CPU could not run a single zmm instruction."""
    if shutil.which("objdump") is None or platform.machine() not in variants.X86_MACHINES:
        pytest.skip("needs objdump, on x86")
    path = importlib.util.find_spec("pdserve.engine.kernels._cpu_avx2").origin
    code = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path], capture_output=True, text=True, check=True)
    assert "%zmm" not in code.stdout
    assert "%ymm" in code.stdout


@pytest.mark.parametrize("variant", variants.VARIANTS, ids=lambda v: v.name)
def test_every_variant_this_cpu_runs_loads(variant):
    if not variant.needs <= cpu_flags():
        pytest.skip(f"this CPU lacks {sorted(variant.needs - cpu_flags())}")
    assert {"paged_decode", "rms_norm", "silu_and_mul", "store_kv", "panel_linear"} <= set(dir(load_variant(variant)))


def test_this_cpu_gets_its_best_variant():
    chosen = variants.choose(cpu_flags())
    module, note = extension()
    assert (module is None) == (chosen is None)
    if chosen is not None:
        assert module.__name__ == chosen.module and chosen.name in note


def test_a_missing_build_is_a_clear_error():
    with pytest.raises(KernelsNotBuilt, match="make setup"):
        load_variant(variants.Variant("never_built", frozenset(), ()))


ENGINE_SCRIPT = r"""
import json, sys
compilers = ("cc", "gcc", "g++", "c++", "clang", "clang++", "ninja", "ld")
spawned = []
sys.addaudithook(lambda event, args: spawned.append(repr(args[1])) if event == "subprocess.Popen" else None)
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sequence import SamplingParams
engine = LLMEngine(EngineConfig(model_path=sys.argv[1], kv_cache_blocks=64, max_model_len=256))
engine.add_request("r", engine.tokenizer.encode("def main():"), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
tokens = []
while engine.has_work():
    for out in engine.step():
        tokens += list(out.token_ids)
print(json.dumps({"tokens": tokens, "kernels": engine.runner.kernels.describe(),
                  "compilers": [s for s in spawned if any(c in s for c in compilers)]}))
"""


def test_an_engine_starts_and_generates_with_no_compiler_and_no_cache(demo_model, tmp_path):
    """No compiler on PATH, a HOME without ~/.cache: the engine loads its build and generates."""
    home, empty_bin = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    empty_bin.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "CXX", "TORCH_EXTENSIONS_DIR", "PDSERVE_CPU_ATTENTION")}
    env.update(PATH=str(empty_bin), HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"),
               HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", ENGINE_SCRIPT, demo_model], env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["tokens"]) == 8 and result["compilers"] == []
    if variants.choose(cpu_flags()) is not None:
        assert "C++ paged kernel" in result["kernels"], result["kernels"]
    cache = home / ".cache"
    assert not (cache / "torch_extensions").exists() and not (cache / "pdserve").exists()
