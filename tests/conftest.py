"""Test configuration shared by every test file.

Environment that must be set before torch/Triton are imported lives here:
- without a CUDA device, Triton kernels run under its interpreter on CPU
  tensors (TRITON_INTERPRET=1), so the Triton parity tests run in CI;
- on a 2-core CI machine one inductor compile thread avoids stalls;
- torch.compile's on-disk caches go to a fresh directory per run: their keys
  do not cover the Python source of our custom ops' fake kernels and autograd
  rules, so a cache written before an op's signature changed would serve the
  old graph ("missing value for argument 'scheme'").

The ``backend`` fixture runs a test once per registered backend, on that
backend's device (tests/_backends.py); the backend suite is built on it.
"""

import os
import shutil
import tempfile

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="robustloss-inductor-"))
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Each test draws fresh random inputs; the seed is printed on failure to reproduce it."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None:
        for key, value in item.user_properties:
            if key == "seed":
                print(f"\n[robustloss_fast] torch seed for {item.nodeid}: {value}")


# Imported here, after TRITON_INTERPRET is set: it imports the backends.
from _backends import PARAMS as _BACKEND_PARAMS  # noqa: E402


@pytest.fixture
def nan_filled_empty():
    """``torch.empty`` returns NaNs (deterministic mode's fill of uninitialised memory): a test
    that reads memory before writing it then sees NaN."""
    was = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was[0])
        torch.utils.deterministic.fill_uninitialized_memory = was[1]


@pytest.fixture
def returns_of(monkeypatch):
    """``returns_of(module, name)``: a list that collects what ``module.name`` returns from then on
    (the function still runs; undone after the test)."""

    def spy(module, name):
        seen = []
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            seen.append(real(*args, **kwargs))
            return seen[-1]

        monkeypatch.setattr(module, name, wrapper)
        return seen

    return spy


@pytest.fixture(params=_BACKEND_PARAMS)
def backend(request):
    """Every registered backend on its own device (tests/_backends.py): an ``OnDevice``.

    A test that takes this fixture runs once per backend; one that
    parametrises ``backend`` itself (a list of names) overrides it.
    """
    return request.param


def pytest_sessionstart(session):
    """Stop before the first test when the built extension carries its own C++
    runtime: every test where it raises an error would kill the interpreter
    (or see a garbled message), and without pytest-xdist nothing after that
    runs or is reported. tests/test_build.py says more."""
    if hasattr(session.config, "workerinput"):  # a pytest-xdist worker: the controller checked
        return
    from _linkage import missing_tools, own_runtime
    from robustloss_fast.backends import compiled as _ops

    if _ops.EXT is None or missing_tools():
        return
    own = own_runtime(_ops.EXT.__file__)
    if own:
        pytest.exit(
            f"{_ops.EXT.__file__} defines its own C++ runtime/unwinder ({', '.join(own)}): C++ errors raised "
            "in it crash the interpreter. Rebuild it with setup.py, whose link arguments and check prevent this.",
            returncode=1,
        )
