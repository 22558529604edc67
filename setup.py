"""Builds pdserve's compiled parts at install, so that no engine start needs a compiler:

- the engine's CPU kernels (server/pdserve/engine/kernels/csrc/cpu_kernels.cpp), once per
  instruction set with explicit -m flags (engine/kernels/variants.py); the engine imports the
  one its CPU's flags allow;
- the Mooncake bind shim (server/pdserve/engine/bind_host.c), a plain C library preloaded into
  engines (engine/bind_host.py); named like an extension module only so that setuptools builds
  and installs it like the kernels.

The kernels build against the torch already installed, so pip must not isolate the build:
`pip install --no-build-isolation -e .` after torch (`make setup` does both). The metadata is in
pyproject.toml.
"""
import copy
import glob
import importlib.util
import os
import platform
import sys

from setuptools import Extension, setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as exc:
    sys.exit(f"pdserve builds its CPU kernels against the installed torch ({exc}): install torch first, "
             "then `pip install --no-build-isolation -e .` (make setup does both)")


def load_variants():
    """engine/kernels/variants.py by its path: importing the package would import all of pdserve."""
    spec = importlib.util.spec_from_file_location("pdserve_build_variants", "server/pdserve/engine/kernels/variants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


variants = load_variants()
headers = glob.glob(os.path.join(os.path.dirname(variants.SOURCE), "*.h"))
kernels = [CppExtension(v.module, [variants.SOURCE], extra_compile_args=[*variants.COMMON_CFLAGS, *v.cflags],
                        extra_link_args=list(variants.LINK_FLAGS), depends=headers)
           for v in variants.built_for(platform.machine())]
bind_shim = Extension("pdserve.engine._bind_host", ["server/pdserve/engine/bind_host.c"],
                      extra_compile_args=["-O2", "-std=gnu11"], libraries=["dl"])



class BuildCompiled(BuildExtension):
    """torch's build_ext without ninja (one source per module; without it a .c file is compiled
    as C), building the modules side by side instead, one per core."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, use_ninja=False, **kwargs)

    def finalize_options(self):
        super().finalize_options()
        self.parallel = self.parallel or os.cpu_count() or 1

    def build_extension(self, ext):
        # The variants compile one source file: each gets its own object folder, or builds side by
        # side would write, and link, one another's object (an AVX-512 one in the AVX2 module).
        own = copy.copy(self)
        own.build_temp = os.path.join(self.build_temp, ext.name)
        super(BuildCompiled, own).build_extension(ext)


setup(ext_modules=[*kernels, bind_shim], cmdclass={"build_ext": BuildCompiled})
