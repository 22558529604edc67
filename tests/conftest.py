import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from harness import DEMO_MODEL, PdServer, add_model, make_model  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def cpu_kernels_built():
    """Builds (or finds cached) the engine's C++ CPU attention kernel once, before any engine
    starts: a cold build takes about a minute on 2 cores, longer than a test waits for READY."""
    from pdserve.engine.kernels.cpu import paged_decode_extension
    paged_decode_extension()


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
