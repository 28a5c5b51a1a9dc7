"""Arguments as a PyTorch user passes them: accepted where F.cross_entropy accepts them, and
errors that name the argument where not (issue 18, items 3 and 4; docs/spec.md §1, §11).

Each refusal is checked for its type and for the argument's name in the message;
each acceptance against the same call with plain Python values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import robustloss_fast as rf
from robustloss_fast import backends
from robustloss_fast.schemes import APL, CCE, DM, GCE, IMAE, NFL, SCE, DMBeta, Focal, TaylorCE

BACKENDS = [b for b in ("torch", "cpu") if backends.unavailable_reason(b) is None]


def _inputs(n=6, c=5):
    return torch.randn(n, c), torch.randint(0, c, (n,))


# ---------------------------------------------------------------------------
# scheme parameters: every real scalar PyTorch users pass


@pytest.mark.parametrize(
    "make",
    [
        lambda v: DM(beta=v),
        lambda v: DM(lam=v),
        lambda v: IMAE(T=v),
        lambda v: GCE(q=v / 4),
        lambda v: SCE(alpha=v),
        lambda v: Focal(gamma=v),
        lambda v: NFL(gamma=v),
        lambda v: APL(alpha=v),
        lambda v: DMBeta(alpha=v),
    ],
)
@pytest.mark.parametrize(
    "value",
    [np.float32(2.0), np.float64(2.0), np.int64(2), torch.tensor(2.0), torch.tensor([2.0]), torch.tensor(2, dtype=torch.int32)],
    ids=["np.float32", "np.float64", "np.int64", "tensor0d", "tensor1", "tensor_int"],
)
def test_scheme_parameters_take_numpy_and_tensor_scalars(make, value):
    got, want = make(value), make(2.0)
    assert got == want and hash(got) == hash(want)
    assert all(type(v) is float for v in vars(got).values() if not isinstance(v, str))


def test_taylor_order_takes_integral_scalars():
    assert TaylorCE(order=np.int64(3)) == TaylorCE(order=3)
    with pytest.raises(TypeError, match="TaylorCE: order"):
        TaylorCE(order=3.0)


@pytest.mark.parametrize(
    "value,error",
    [
        (2**1100, ValueError),  # beyond the float range: named, not a bare OverflowError
        (-(2**1100), ValueError),
        (float("inf"), ValueError),
        (np.float32("nan"), ValueError),
        (torch.tensor([1.0, 2.0]), TypeError),
        (torch.tensor(True), TypeError),
        (True, TypeError),
        (1 + 2j, TypeError),
        ("8", TypeError),
    ],
    ids=["2**1100", "-2**1100", "inf", "np.nan", "tensor2", "tensor_bool", "bool", "complex", "str"],
)
def test_bad_scheme_parameters_name_the_parameter(value, error):
    with pytest.raises(error, match="DM: beta"):
        DM(beta=value)


# ---------------------------------------------------------------------------
# loss flags


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_outside_int64_is_a_value_error(backend):
    x, t = _inputs()
    for bad in (2**63, -(2**63) - 1, 10**20):
        with pytest.raises(ValueError, match="ignore_index must fit in int64"):
            rf.robust_cross_entropy(x, t, DM(), ignore_index=bad, backend=backend)
    # The int64 extremes themselves are fine (no row matches them).
    for edge in (2**63 - 1, -(2**63)):
        v = rf.robust_cross_entropy(x, t, CCE(), ignore_index=edge, backend=backend)
        torch.testing.assert_close(v, F.cross_entropy(x, t))
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        rf.robust_cross_entropy(x, t, DM(), ignore_index=1.5, backend=backend)
    got = rf.robust_cross_entropy(x, t, CCE(), ignore_index=np.int64(-100), backend=backend)
    torch.testing.assert_close(got, F.cross_entropy(x, t))


def test_label_smoothing_takes_the_scalars_f_cross_entropy_takes():
    x, t = _inputs()
    want = F.cross_entropy(x, t, label_smoothing=0.25)
    for eps in (np.float32(0.25), torch.tensor(0.25), np.float64(0.25)):
        torch.testing.assert_close(rf.robust_cross_entropy(x, t, CCE(), label_smoothing=eps), want)
    with pytest.raises(TypeError, match="label_smoothing"):
        rf.robust_cross_entropy(x, t, CCE(), label_smoothing="0.1")


# ---------------------------------------------------------------------------
# targets and weights


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_target_dtypes_f_cross_entropy_takes_and_int32(dtype, backend):
    x, t = _inputs()
    got = rf.robust_cross_entropy(x, t.to(dtype), CCE(), backend=backend)
    torch.testing.assert_close(got, F.cross_entropy(x, t))


@pytest.mark.parametrize("dtype", [torch.int16, torch.int8, torch.bool, torch.float32])
def test_other_target_dtypes_are_refused_naming_the_dtype(dtype):
    x, t = _inputs()
    with pytest.raises(TypeError, match=str(dtype).replace("torch.", "")):
        rf.robust_cross_entropy(x, t.to(dtype), DM())
    h, w = torch.randn(6, 4), torch.randn(5, 4)
    with pytest.raises(TypeError, match=str(dtype).replace("torch.", "")):
        rf.linear_robust_cross_entropy(h, w, t.to(dtype), DM())


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_class_weights_name_their_dtype(dtype):
    x, t = _inputs()
    with pytest.raises(TypeError, match=f"weight must be a floating tensor.*{str(dtype).replace('torch.', '')}"):
        rf.robust_cross_entropy(x, t, DM(), weight=torch.ones(5, dtype=dtype))
    h, w = torch.randn(6, 4), torch.randn(5, 4)
    with pytest.raises(TypeError, match=f"class_weight must be a floating tensor.*{str(dtype).replace('torch.', '')}"):
        rf.linear_robust_cross_entropy(h, w, t, DM(), class_weight=torch.ones(5, dtype=dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_class_weights_of_any_floating_dtype_are_used_in_the_accumulation_dtype(weight_dtype, backend):
    # A deliberate difference (spec §11): F.cross_entropy wants the input's dtype;
    # here the weights are cast once to float32 (float64 for float64 input).
    x, t = _inputs()
    w = torch.rand(5) + 0.5
    w_given = w.to(weight_dtype)
    got = rf.robust_cross_entropy(x, t, CCE(), weight=w_given, backend=backend)
    torch.testing.assert_close(got, F.cross_entropy(x, t, weight=w_given.float()))


@pytest.mark.parametrize("shape", [(1, 5), (5, 1), (4,)])
def test_class_weight_shape_must_be_exactly_c(shape):
    # F.cross_entropy takes (1, C) for spatial inputs only (its 2-D kernel checks the
    # element count) and refuses it elsewhere; one rule here: (C,).
    x, t = _inputs()
    with pytest.raises(ValueError, match=r"weight must have shape \(5,\)"):
        rf.robust_cross_entropy(x, t, DM(), weight=torch.ones(shape))


# ---------------------------------------------------------------------------
# the cache of validated specs


def test_a_cached_spec_is_the_same_and_types_still_decide():
    """A repeated plain-typed call returns the spec made the first time; a value equal to a cached one but
    of a type the checks refuse (True for an int, 1 for a bool) is still refused, not looked up."""
    from robustloss_fast import functional

    first = functional.kernel_spec(DM(beta=5.5), "mean", True, 3, 0.0)
    assert functional.kernel_spec(DM(beta=5.5), "mean", True, 3, 0.0) is first
    assert functional.kernel_spec(DM(beta=5.5), "sum", True, 3, 0.0) is not first
    with pytest.raises(TypeError, match="normalize"):
        functional.kernel_spec(DM(beta=5.5), "mean", 1, 3, 0.0)
    functional.kernel_spec(CCE(), "mean", None, 1, 0.0)
    with pytest.raises(TypeError, match="ignore_index"):
        functional.kernel_spec(CCE(), "mean", None, True, 0.0)
    # A scheme that cannot be hashed (a user's subclass) is validated every call instead.
    unhashable = type("UnhashableDM", (DM,), {"__hash__": None})(beta=2.0)
    assert functional.kernel_spec(unhashable).b == 2.0
    # A refused call caches nothing: the same arguments are refused again.
    for _ in range(2):
        with pytest.raises(ValueError, match="label_smoothing"):
            functional.kernel_spec(DM(), "mean", None, -100, 0.1)


def test_the_spec_cache_stays_bounded(monkeypatch):
    """A schedule that changes a scheme's parameter every step refills the cache, never grows it past its size."""
    from robustloss_fast import functional

    monkeypatch.setattr(functional, "_SPECS", {})
    for k in range(3 * functional._SPECS_MAX):
        spec = functional.kernel_spec(DM(beta=1.0 + k / 1000))
        assert spec.b == 1.0 + k / 1000
        assert len(functional._SPECS) <= functional._SPECS_MAX
