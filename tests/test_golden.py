"""The golden cases of ``shared/golden/robust_ce_cases.json`` (SPEC read independently).

Each case was computed in float64 by an implementation of SPEC written outside
this project, so agreement to ~1e-9 checks our reading of SPEC, not just the
consistency of our backends with each other. The file lives in ``shared/``
beside the clone (CI copies it there); ``ROBUSTLOSS_GOLDEN`` can point to the
directory instead.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

import robustloss_fast as rf
from robustloss_fast._common import Kernel
from robustloss_fast import backends

SCHEME_NAMES = ("CCE", "MAE", "MSE", "GCE", "DM", "IMAE", "DMNormal", "DMExponential", "DMBeta")
SPEC_KERNELS = ("CCE", "MAE", "MSE", "GCE", "DM", "DM_NORMAL", "DM_BETA")


def _golden_file():
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "golden"]
    if os.environ.get("ROBUSTLOSS_GOLDEN"):
        candidates.append(Path(os.environ["ROBUSTLOSS_GOLDEN"]))
    for folder in candidates:
        path = folder / "robust_ce_cases.json"
        if path.is_file():
            return path
    return None


GOLDEN = _golden_file()
CASES = json.loads(GOLDEN.read_text())["cases"] if GOLDEN is not None else []
# Asked per backend (not via available_backends()) so an optional backend
# that fails to load cannot take these tests down with it.
BACKENDS = [b for b in ("torch", "cpu") if backends.unavailable_reason(b) is None]

pytestmark = pytest.mark.skipif(
    GOLDEN is None,
    reason="golden cases not found: expected ../shared/golden/robust_ce_cases.json beside the clone "
    "or a directory in $ROBUSTLOSS_GOLDEN",
)


def _scheme(text: str):
    # The file names schemes by their constructor call, e.g. "DM(lam=0.5, beta=12.0)".
    return eval(text, {"__builtins__": {}}, {name: getattr(rf, name) for name in SCHEME_NAMES})


def _tensor(data, dtype=torch.float64):
    return None if data is None else torch.tensor(data, dtype=dtype)


def _run(case, backend, dtype=torch.float64):
    logits = torch.tensor(case["logits"], dtype=torch.float64).to(dtype).requires_grad_()
    value = rf.robust_cross_entropy(
        logits,
        torch.tensor(case["target"], dtype=torch.long),
        _scheme(case["scheme"]),
        weight=_tensor(case["weight"]),
        sample_weight=_tensor(case["sample_weight"]),
        ignore_index=case["ignore_index"],
        reduction=case["reduction"],
        normalize=case["normalize"],
        backend=backend,
    )
    upstream = case["grad_output"]
    grad_out = torch.ones_like(value) if upstream is None else torch.tensor(upstream, dtype=value.dtype)
    value.backward(grad_out)
    return value.detach(), logits.grad


def test_golden_file_is_complete():
    """Guard against a truncated file silently shrinking the parametrised cases below."""
    assert len(CASES) >= 60
    # Every kernel formula of SPEC §4 appears.
    assert {_scheme(c["scheme"]).kernel_id for c in CASES} >= {Kernel[k] for k in SPEC_KERNELS}
    assert {c["reduction"] for c in CASES} == {"none", "mean", "sum"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index", range(len(CASES)) if CASES else [pytest.param(0, marks=pytest.mark.skip)])
def test_golden_float64(index, backend):
    case = CASES[index]
    value, grad = _run(case, backend)
    expected_value = torch.tensor(case["expected_value"], dtype=torch.float64)
    expected_grad = torch.tensor(case["expected_grad"], dtype=torch.float64)
    assert value.dtype == torch.float64 and grad.dtype == torch.float64
    assert value.shape == expected_value.shape
    note = f"case {index} ({case['note']}, {case['scheme']}, {case['reduction']})"
    torch.testing.assert_close(value, expected_value, rtol=1e-9, atol=1e-12, msg=lambda m: f"{note}: value\n{m}")
    # Gradients span many magnitudes (1e-180 .. 0.5 in the beta = 500 case):
    # relative 1e-9 per element plus an absolute floor far below the largest entry.
    atol = 1e-12 * max(1.0, float(expected_grad.abs().max()))
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=atol, msg=lambda m: f"{note}: gradient\n{m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_golden_float32(backend):
    """Every case again in float32, to float32 rounding (the kernels accumulate in float32)."""
    for index, case in enumerate(CASES):
        value, grad = _run(case, backend, torch.float32)
        expected_value = torch.tensor(case["expected_value"], dtype=torch.float64)
        expected_grad = torch.tensor(case["expected_grad"], dtype=torch.float64)
        assert value.dtype == torch.float32 and grad.dtype == torch.float32
        scale = max(1.0, float(expected_value.abs().max())) if expected_value.numel() else 1.0
        note = f"case {index} ({case['note']}, {case['scheme']}, {case['reduction']})"
        # The inputs have 4-5 significant digits, so float32 rounding of the
        # logits moves the result by ~1e-7 relative; 2e-5 leaves room for
        # margins of up to ~30 in exponents.
        torch.testing.assert_close(value.double(), expected_value, rtol=2e-5, atol=2e-6 * scale, msg=note)
        gscale = float(expected_grad.abs().max()) if expected_grad.numel() else 1.0
        torch.testing.assert_close(grad.double(), expected_grad, rtol=2e-5, atol=2e-6 * max(gscale, 1e-30), msg=note)
        assert math.isfinite(float(value.sum()))
