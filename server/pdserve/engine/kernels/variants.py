"""The builds of the CPU kernels (kernels/csrc/cpu_kernels.cpp), one per instruction set, and the
choice among them from a CPU's flags.

setup.py compiles every variant at install with its explicit -m flags (never -march=native: the
build machine need not be the serving one), and cpu.py imports the best one this CPU's
/proc/cpuinfo flags allow. A CPU without AVX2 and FMA (or not x86) gets none: the engine runs the
portable torch path there. Nothing here imports torch: setup.py reads this file before building.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

PACKAGE = "pdserve.engine.kernels"
SOURCE = "server/pdserve/engine/kernels/csrc/cpu_kernels.cpp"   # relative to the repository root
# -g0 overrides Python's -g (debug info of the torch headers: 13 MB a module, slower builds);
# -ffast-math reorders float sums (the tests' tolerances allow it); OpenMP for at::parallel_for.
COMMON_CFLAGS = ("-O3", "-g0", "-ffast-math", "-fopenmp")
LINK_FLAGS = ("-fopenmp",)
X86_MACHINES = ("x86_64", "AMD64")

_AVX2 = (("avx2", "fma", "f16c"), ("-mavx2", "-mfma", "-mf16c"))
_AVX512 = (("avx512f", "avx512bw", "avx512vl", "avx512dq"),
           ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"))


@dataclass(frozen=True)
class Variant:
    name: str                    # the module is PACKAGE._cpu_<name>
    needs: frozenset[str]        # /proc/cpuinfo flags the build's instructions need
    cflags: tuple[str, ...]      # what the compiler may use: exactly `needs`, as -m flags

    @property
    def module(self) -> str:
        return f"{PACKAGE}._cpu_{self.name}"


def _variant(name: str, *sets: tuple[tuple[str, ...], tuple[str, ...]]) -> Variant:
    return Variant(name, frozenset(f for flags, _ in sets for f in flags), tuple(m for _, ms in sets for m in ms))


_BF16 = (("avx512_bf16",), ("-mavx512bf16",))

# Best first. The AMX build runs the bf16 decode attention on tiles (oneDNN's GEMMs use AMX on
# their own in every build).
VARIANTS = (
    _variant("amx_bf16", _AVX2, _AVX512, _BF16, (("amx_tile", "amx_bf16"), ("-mamx-tile", "-mamx-bf16"))),
    _variant("avx512_bf16", _AVX2, _AVX512, _BF16),
    _variant("avx512", _AVX2, _AVX512),
    _variant("avx2", _AVX2),
)


def choose(flags: Iterable[str]) -> Variant | None:
    """The best variant a CPU with these flags runs, or None (the portable torch path)."""
    have = frozenset(flags)
    return next((v for v in VARIANTS if v.needs <= have), None)


def built_for(machine: str) -> tuple[Variant, ...]:
    """The variants setup.py builds on a machine of this architecture (platform.machine())."""
    return VARIANTS if machine in X86_MACHINES else ()
