"""Shared fixtures, and the test tiers: each test is marked from what it uses, so no test file
carries a tier mark by hand and a new file is classified as it is written.

- integration: the test, a fixture it uses, or a helper of its module or of the harness that
  either calls, starts real processes (PROCESS_STARTERS: a pdserve server with its engines, an
  etcd server).
- perf: it uses the `dedicated_cores` fixture (timings that need the cores to itself).
- gpu: it lives in a GPU module (GPU_MODULES).

`make test-unit` runs the tests none of these marks; `make test` runs them all."""
import inspect
import os
import shutil
import types

import pytest

from pdserve_testing.harness import DEMO_MODEL, PdServer, add_model, make_model

PROCESS_STARTERS = frozenset({"PdServer", "EtcdProcess", "MooncakeMaster"})
GPU_MODULES = frozenset({"test_cuda.py"})


def _code_objects(code: types.CodeType):
    yield code
    for const in code.co_consts:   # nested functions, lambdas, comprehensions
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _starts_processes(fn, seen: set) -> bool:
    """Whether fn, or a function of the test modules or the harness that it names, names a
    process starter: a static look at the names its code uses, followed through helpers."""
    fn = inspect.unwrap(fn)
    code = getattr(fn, "__code__", None)
    if code is None or code in seen:
        return False
    seen.add(code)
    names = {name for c in _code_objects(code) for name in c.co_names}
    if names & PROCESS_STARTERS:
        return True
    scope = getattr(fn, "__globals__", {})
    for name in names:
        helper = scope.get(name)
        if inspect.isclass(helper):
            helper = helper.__init__
        if inspect.isfunction(helper) and _ours(helper) and _starts_processes(helper, seen):
            return True
    return False


def _ours(fn) -> bool:
    module = getattr(fn, "__module__", "") or ""
    return module.startswith(("test_", "conftest", "pdserve_testing"))


def _uses_processes(item) -> bool:
    seen: set = set()
    fixtures = getattr(item, "_fixtureinfo", None)
    fixture_funcs = [d.func for defs in (fixtures.name2fixturedefs.values() if fixtures else ())
                     for d in defs]
    return any(_starts_processes(fn, seen) for fn in [getattr(item, "function", None), *fixture_funcs] if fn)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _uses_processes(item):
            item.add_marker(pytest.mark.integration)
        if "dedicated_cores" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.perf)
        if item.path.name in GPU_MODULES:
            item.add_marker(pytest.mark.gpu)


@pytest.fixture
def dedicated_cores():
    """For a test that asserts timings: it needs two cores (one engine pinned to each) and the
    machine to itself, so it is marked `perf` and left out of `make test-unit`."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores: one engine pinned to each")


@pytest.fixture(scope="session")
def small_model(tmp_path_factory) -> str:
    """A 2-layer Qwen2 with a 1024-token tokenizer: engines start and generate fast."""
    return make_model(str(tmp_path_factory.mktemp("small-model") / "weights"))


@pytest.fixture(scope="session")
def demo_model() -> str:
    if not os.path.exists(os.path.join(DEMO_MODEL, "model.safetensors")):
        pytest.fail("the demo model is missing: run `make demo-model` (make test does it)")
    return DEMO_MODEL


@pytest.fixture
def repo(tmp_path) -> str:
    path = tmp_path / "repository"
    path.mkdir()
    return str(path)


@pytest.fixture(scope="module")
def served(tmp_path_factory, small_model):
    """One server in poll mode with the small model as 'small', shared by a module's tests."""
    repo = tmp_path_factory.mktemp("served-repo")
    add_model(str(repo), "small", small_model)
    server = PdServer(str(repo)).start()
    server.wait_ready("small")
    yield server
    server.stop()
    shutil.rmtree(repo, ignore_errors=True)
