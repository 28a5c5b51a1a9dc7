"""Bad targets: where they are reported and what the opt-in host validation adds (docs/spec.md §6.4).

On CPU tensors every backend raises IndexError naming the value and its flat
position. GPU tensors are checked on the device (a device-side assertion; see
tests/test_cuda.py and benchmarks/sanitize_case.py, which need a GPU);
``set_validate_targets(True)`` moves the check to the host on every device,
before the loss runs. Its cost is a synchronisation, so it must stay off by
default and out of traced graphs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import robustloss_fast as rf
from robustloss_fast import _common, backends, functional, linear
from robustloss_fast.schemes import CCE, DM

BACKENDS = [b for b in backends.NAMES if backends.unavailable_reason(b) is None and "cpu" in (backends.devices(b) or ("cpu",))]


@pytest.fixture
def validation():
    previous = rf.set_validate_targets(True)
    yield
    rf.set_validate_targets(previous)


def _spy(monkeypatch, module):
    calls = []
    real = module.check_target

    def spy(target, num_classes, ignore_index):
        calls.append((tuple(target.shape), num_classes, ignore_index))
        return real(target, num_classes, ignore_index)

    monkeypatch.setattr(module, "check_target", spy)
    return calls


def test_off_by_default_and_a_bool():
    assert rf.validating_targets() is False
    with pytest.raises(TypeError, match="bool"):
        rf.set_validate_targets(1)
    assert rf.set_validate_targets(True) is False
    try:
        assert rf.validating_targets() is True
    finally:
        assert rf.set_validate_targets(False) is True


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [7, -3, 10**12])
def test_cpu_tensors_raise_index_error_naming_value_and_position(bad, backend):
    x = torch.randn(9, 7)
    t = torch.randint(0, 7, (9,))
    t[5] = bad
    with pytest.raises(IndexError, match=rf"target value {bad} \(at flat position 5\).*7 classes"):
        rf.robust_cross_entropy(x, t, DM(), backend=backend)


def test_validation_checks_before_the_backend_runs(monkeypatch, validation):
    # The host check runs in the API on every device when asked (here: a CPU tensor, so
    # the spy sees the call that a GPU tensor would pay a synchronisation for).
    calls = _spy(monkeypatch, functional)
    ran = []
    real_resolve = backends.resolve

    def resolve(name, device):
        be = real_resolve(name, device)
        return dataclasses.replace(be, loss=lambda *a: ran.append(1) or be.loss(*a))

    monkeypatch.setattr(backends, "resolve", resolve)
    x, t = torch.randn(4, 3), torch.tensor([0, 2, 3, 1])
    with pytest.raises(IndexError, match=r"target value 3 \(at flat position 2\)"):
        rf.robust_cross_entropy(x, t, CCE(), backend="torch")
    assert calls == [((4,), 3, -100)] and ran == []
    # A good batch runs, checked once.
    rf.robust_cross_entropy(x, t.clamp(max=2), CCE(), backend="torch", ignore_index=-1)
    assert calls[-1] == ((4,), 3, -1) and ran == [1]


def test_validation_off_costs_no_host_check_in_the_api(monkeypatch):
    calls = _spy(monkeypatch, functional)
    rf.robust_cross_entropy(torch.randn(4, 3), torch.tensor([0, 2, 1, 1]), CCE(), backend="torch")
    assert calls == []


def test_validation_covers_the_fused_linear_layer(monkeypatch, validation):
    calls = _spy(monkeypatch, linear)
    h, w = torch.randn(6, 4), torch.randn(5, 4)
    t = torch.tensor([0, 1, 2, 3, 4, 5])
    with pytest.raises(IndexError, match=r"target value 5 \(at flat position 5\)"):
        rf.linear_robust_cross_entropy(h, w, t, CCE(), chunk_size=2)
    assert calls == [((6,), 5, -100)]


def test_validation_stays_out_of_traced_graphs(validation):
    x, t = torch.randn(6, 5), torch.randint(0, 5, (6,))
    compiled = torch.compile(lambda a, b: rf.robust_cross_entropy(a, b, CCE(), backend="torch"), fullgraph=True,
                             backend="aot_eager")  # fmt: skip
    torch.testing.assert_close(compiled(x, t), torch.nn.functional.cross_entropy(x, t))


def test_the_assertion_message_says_how_to_get_the_value():
    # The device cannot format the bad value; its message points at the opt-in check.
    assert "set_validate_targets(True)" in _common.BAD_TARGET_ASSERT_MSG
    assert "target out of bounds" in _common.BAD_TARGET_ASSERT_MSG


def test_one_wording_per_message_across_languages():
    """The C++ messages say what the Python ones say (checks.h, common.cuh vs _common)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "csrc"
    cuh = (root / "cuda" / "common.cuh").read_text()
    body = re.search(r"#define RL_BAD_TARGET_ASSERT_MSG(.*?)\n(?!\s*\")", cuh + "\n", re.S).group(1)
    assert "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', body)) == _common.BAD_TARGET_ASSERT_MSG
    checks = (root / "include" / "robustloss" / "checks.h").read_text()
    macro = re.search(r"#define ROBUSTLOSS_BAD_TARGET_MSG\(value, position, num_classes, ignore_index\)(.*?)\n\n",
                      checks, re.S).group(1)  # fmt: skip
    # Fill the macro's pieces with sample values and compare with the Python wording.
    pieces = re.findall(r'"((?:[^"\\]|\\.)*)"|\((value|position|num_classes|ignore_index)\)(-1)?', macro)
    sample = {"value": 7, "position": 2, "num_classes": 5, "ignore_index": -100}
    text = "".join(lit if lit else str(sample[name] - (1 if minus else 0)) for lit, name, minus in pieces)
    assert text == _common.bad_target_message(7, 2, 5, -100)
