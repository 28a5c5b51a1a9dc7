"""What only the Triton backend has: its tiles, its programs, its op registration under torch.compile.

Its parity with the reference -- every scheme, dtype, mode, shape family and
edge case -- is the backend suite's (tests/test_backends.py,
tests/test_backend_ops.py), which runs it like every registered backend.

Where it runs: on CUDA tensors with a GPU; without one, tests/conftest.py sets
TRITON_INTERPRET=1 before Triton is imported and the kernels run under the
interpreter on CPU tensors (the registry then lists "cpu" among its devices,
and the suite thins its loops for it: tests/_backends.py). The interpreter
evaluates both branches of tl.where in numpy and warns about log(0) on lanes
it then discards; those warnings are filtered here. It is slow, so shapes are
small: the chunked (online max/sum) path is forced by lowering the tile
widths instead of by wide rows.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import robustloss_fast as rf
from robustloss_fast import backends
from robustloss_fast.schemes import APL, CCE, DM, IMAE, NCE, NFL, DMBeta

from _backends import OnDevice, device_of
from _cases import (
    DTYPES,
    IGNORE,
    MODES,
    TWO_TERM_MODES,
    Loss,
    Problem,
    assert_grad,
    assert_value,
    check_loss,
    dtype_id,
    make_problem,
    reference_problem,
    reference_result,
)

_REASON = backends.unavailable_reason("triton")

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(_REASON is not None, reason=f"the Triton backend is unusable here: {_REASON}"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
]

if _REASON is None:
    from robustloss_fast.backends.triton import ops as tops

# The Triton backend on the device the registry gives it here.
TRITON = OnDevice("triton", device_of("triton"))
DEVICE = TRITON.device


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Tiles of 8 columns: every row below spans several chunks of the online max/sum."""
    monkeypatch.setattr(tops, "MAX_BLOCK_C", 8)
    monkeypatch.setattr(tops, "BACKWARD_BLOCK_C", 8)
    assert tops._tile(4, 37, tops.MAX_BLOCK_C)[1] == 8


def _chunked_problem(dtype):
    """Eight rows of 37 classes, five chunks of 8. Row 0: its first two chunks masked (the running max is
    still -inf when the first finite logit arrives); row 1: only its target and one class in the last chunk
    finite; row 2: its target in the last, partial chunk."""
    problem = make_problem((8, 37), dtype, DEVICE, config="ignore")
    x, t = problem.logits, problem.target
    x[0, :16] = -math.inf
    t[0] = 20
    x[1, :] = -math.inf
    t[1] = 3
    x[1, 3] = 0.5
    x[1, 35] = 1.5
    t[2] = 36
    return problem


CHUNKED_LOSSES = [Loss(s) for s in (CCE(), DM(), DMBeta(alpha=2.0, eta=3.0))]
CHUNKED_LOSSES += [Loss(s) for s in (NCE(), APL(), APL(passive="mae", alpha=10.0, beta=0.1))]
CHUNKED_LOSSES += [Loss(CCE(), 0.1), Loss(CCE(), 0.6)]
CHUNKED_LOSSES += [Loss(s) for s in (NFL(), NFL(gamma=2.0), NFL(gamma=0.0))]
CHUNKED_LOSSES += [Loss(APL(active="nfl", passive="mae", alpha=1.0, beta=0.4, gamma=g)) for g in (0.5, 2.0, 0.0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("loss", CHUNKED_LOSSES, ids=str)
def test_chunked_rows_wider_than_a_block(tiny_blocks, loss, dtype):
    """The online max/sum across chunks, masked leading chunks and a target in the partial last chunk;
    the spread and focal sums of the two-term schemes across every chunk; every mode."""
    modes = TWO_TERM_MODES if loss.two_term else [m for m in MODES if m != ("mean", None)]
    for reduction, normalize in modes:
        problem = _chunked_problem(dtype)
        if loss.label_smoothing:
            # Weight 0 on the masked classes (else the value is +inf): row 1 keeps its leading masked
            # chunks but has finite classes from 16 on; U = sum u and the spread span every chunk.
            problem.weight = (torch.rand(37) + 0.5).to(DEVICE)
            problem.weight[:16] = 0.0
            problem.logits[1, 16:] = make_problem((1, 21), dtype, DEVICE).logits[0]
        elif loss.kernel.p_form:
            problem.weight = (torch.rand(37) + 0.5).to(DEVICE)
        check_loss(TRITON, problem, loss, reduction, normalize, "chunked")
        if loss.two_term:
            # Rows without a masked class, unweighted: U = C, and sums over F and h span every chunk.
            rest = Problem(problem.logits[2:], problem.target[2:])
            check_loss(TRITON, rest, loss, reduction, normalize, "chunked, unmasked")


def test_many_rows_span_several_programs():
    """64 rows per program for C = 3: three programs, the last one partial."""
    problem = make_problem((150, 3), torch.float32, DEVICE, config="ignore")
    for reduction, normalize in MODES:
        check_loss(TRITON, problem, Loss(IMAE()), reduction, normalize, "150 rows")


def test_ops_are_registered_where_torch_compile_finds_them():
    """robustloss::triton_rows / triton_forward / triton_backward: triton_op on a GPU, custom_op under the
    interpreter (which has no GPU kernels to trace); either way with an autograd rule on the forward."""
    for name in ("triton_rows", "triton_forward", "triton_backward"):
        assert hasattr(torch.ops.robustloss, name), name
    x = make_problem((6, 5), torch.float32, DEVICE, config="plain")
    logits = x.logits.detach().requires_grad_()
    value, _ = torch.ops.robustloss.triton_forward(logits, x.target, int(DM().kernel_id), 1.0, 8.0, None, None,
                                                    IGNORE, 1, True)  # fmt: skip
    assert value.grad_fn is not None, "triton_forward has no autograd rule"


# ---------------------------------------------------------------------------
# torch.compile


def _compiled_parity(fn, loss, problem, reduction="mean", normalize=None):
    """``torch.compile(fn, fullgraph=True)`` value and gradient against the float64 reference."""
    compiled = torch.compile(fn, fullgraph=True)
    x = problem.logits.detach().clone().requires_grad_()
    v = compiled(x, problem.target, problem.weight)
    v.backward()
    up = torch.ones((), dtype=torch.float64, device=DEVICE)
    rv, rg, _, _ = reference_result(reference_problem(problem), loss, reduction, normalize, up)
    assert_value(v.detach(), rv, x.dtype, what="compiled value")
    assert_grad(x.grad, rg, what="compiled gradient")


def test_torch_compile_fullgraph_with_ignored_targets():
    torch._dynamo.reset()
    problem = make_problem((9, 6), torch.float32, DEVICE, config="full")
    problem.sample_weight = None

    def loss(inp, target, weight):
        return rf.robust_cross_entropy(inp, target, DM(), weight=weight, backend="triton")

    _compiled_parity(loss, Loss(DM()), problem)


def test_torch_compile_fullgraph_two_kernel_cross_row(monkeypatch):
    """The cross-row step of a large batch (two kernels: partials, then apply) under torch.compile: on a GPU
    Inductor traces both launches (wrap_triton); thresholds lowered so that 41 rows take that path."""
    from robustloss_fast.backends.triton import ops

    monkeypatch.setattr(ops, "CROSS_ROW_ONE_PROGRAM_MAX", 16)
    monkeypatch.setattr(ops, "CROSS_ROW_PARALLEL_BLOCK", 8)
    torch._dynamo.reset()
    problem = make_problem((41, 6), torch.float32, DEVICE, config="full")

    def loss(inp, target, weight):
        return rf.robust_cross_entropy(inp, target, DM(), weight=weight, sample_weight=problem.sample_weight,
                                       backend="triton")

    _compiled_parity(loss, Loss(DM()), problem)


def test_torch_compile_fullgraph_label_smoothing_with_weight():
    """The autograd rule hands the backward op label smoothing's class weights (its u) under torch.compile."""
    torch._dynamo.reset()
    problem = make_problem((9, 6), torch.float32, DEVICE, config="full")
    spec = Loss(CCE(), 0.2).spec()

    def loss(inp, target, weight):
        return backends.get("triton").loss(inp, target, spec, weight, None)

    compiled = torch.compile(loss, fullgraph=True)
    xc = problem.logits.detach().clone().requires_grad_()
    v = compiled(xc, problem.target, problem.weight)
    v.backward()
    xr = problem.logits.detach().double().requires_grad_()
    r = F.cross_entropy(xr, problem.target, weight=problem.weight.double(), label_smoothing=0.2)
    r.backward()
    assert_value(v.detach(), r.detach(), torch.float32, what="compiled value")
    assert_grad(xc.grad, xr.grad, what="compiled gradient")


def test_torch_compile_fullgraph_nfl():
    """The autograd rule hands the backward op NFL's scheme id and gamma under torch.compile too."""
    torch._dynamo.reset()
    problem = make_problem((9, 6), torch.float32, DEVICE, config="full")
    problem.sample_weight = None
    scheme = APL(active="nfl", passive="mae", alpha=1.0, beta=0.4, gamma=0.5)
    spec = Loss(scheme).spec()

    def loss(inp, target, weight):
        return backends.get("triton").loss(inp, target, spec, weight, None)

    _compiled_parity(loss, Loss(scheme), problem)


# ---- the fused linear layer's scale of its stored gradients (scale.py) ----


def _rounded(p: torch.Tensor, dtype: torch.dtype):
    """float32 values p rounded to dtype: to nearest (a GPU), or also toward zero for bfloat16 under the
    interpreter, whose float32 -> bfloat16 conversion truncates (Triton 3.9)."""
    nearest = p.to(dtype)
    if not (tops.kernels.INTERPRETED and dtype == torch.bfloat16):
        return (nearest,)
    return nearest, (p.view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)


_BF16, _F16, _F32 = torch.bfloat16, torch.float16, torch.float32
# (src, out, in place): the layer's 16-bit gradients scaled where they are, its float32 sums into 16 bits.
_SCALE_CASES = [(_BF16, _BF16, True), (_F16, _F16, True), (_F32, _F32, True), (_BF16, _BF16, False),
                (_F32, _BF16, False), (_F32, _F16, False)]  # fmt: skip


@pytest.mark.parametrize("src_dtype,out_dtype,in_place", _SCALE_CASES,
                         ids=[f"{dtype_id(a)}-{dtype_id(b)}-{'in_place' if c else 'out'}" for a, b, c in _SCALE_CASES])
@pytest.mark.parametrize("shape", [(37, 300), (5000,), (3, 1)])
@pytest.mark.parametrize("factor", ["one", "scalar", "nan", "huge", "per_row"])
def test_scale_is_the_float32_product_rounded_once(src_dtype, out_dtype, in_place, shape, factor):
    src = (torch.randn(shape, dtype=torch.float64) * 3).to(src_dtype).to(DEVICE)
    src.view(-1)[::97] = float("nan")  # a NaN value stays NaN under every factor
    rows = src.numel() // shape[-1]
    f = {"one": torch.tensor(1.0), "scalar": torch.rand(()) * 4, "nan": torch.tensor(float("nan")),
         "huge": torch.tensor(3e38), "per_row": torch.rand(rows) * 4}[factor].to(DEVICE)  # fmt: skip
    want = _rounded((src.float().reshape(rows, -1) * f.reshape(-1, 1)).reshape(shape), out_dtype)
    out = src.clone() if in_place else torch.full(shape, 7.0, dtype=out_dtype, device=DEVICE)
    tops.scale_op(out if in_place else src, f.reshape(-1), out)
    assert any(torch.equal(out.nan_to_num(0.5, 9.0, -9.0), w.nan_to_num(0.5, 9.0, -9.0)) for w in want), factor
    assert torch.equal(out.isnan(), want[0].isnan())


def test_scale_refuses_what_it_cannot_do():
    src = torch.zeros(4, 6, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="one value, or one per row"):
        tops.scale_op(src, torch.ones(5, device=DEVICE), src)
    with pytest.raises(ValueError, match="float32"):
        tops.scale_op(src, torch.ones(1, dtype=torch.float64, device=DEVICE), src)
    with pytest.raises(ValueError, match="one shape"):
        tops.scale_op(src, torch.ones(1, device=DEVICE), torch.zeros(6, 4, dtype=torch.bfloat16, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        tops.scale_op(src.t(), torch.ones(1, device=DEVICE), torch.zeros(6, 4, dtype=torch.bfloat16, device=DEVICE))


def test_the_fused_linear_scales_its_gradients_with_the_kernel_where_the_registry_has_it():
    from robustloss_fast import linear

    assert backends.fused_scale(torch.device(DEVICE)) is not None
    g = torch.randn(9, 40, device=DEVICE).to(torch.bfloat16)
    f = torch.rand(9, 1, device=DEVICE) * 2  # grad_hidden's factor per row, shaped as the layer makes it
    out = g.clone()
    linear._scale_into(out, f, out)
    assert any(torch.equal(out, w) for w in _rounded(g.float() * f, torch.bfloat16))
