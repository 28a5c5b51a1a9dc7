"""The fused cross-row steps -- the Triton kernel (backends/triton/cross_row.py) and the C++/CUDA op
``robust_ce_finalize`` -- against ``_finalize.finalize``, the tensor-op original.

Fresh random row statistics with every flag the kernels specialise on
(normalised or not, each reduction, class and signed sample weights, the class
weights in the rows), ignored rows, rows that do not count (s = 0), rows with
log w = -inf, infinite and NaN values, several blocks of rows and none,
batches past 1024 rows (both steps' two launches), NaN and infinite weights; and a
training step's launch count: three Triton kernels and no other computing op.
"""

from __future__ import annotations

import math

import pytest
import torch

import robustloss_fast as rf
from robustloss_fast import _finalize, backends
from robustloss_fast._common import ROW_COLS, Kernel, KernelSpec, Reduction, RowCol
from robustloss_fast.schemes import DM

from _backends import device_of
from _cases import cross_row_rows
from _launches import LAUNCH, aten_outside_launches, mark_triton_launches

REASON = backends.unavailable_reason("triton")
needs_triton = pytest.mark.skipif(REASON is not None, reason=f"backend 'triton' is unavailable here: {REASON}")
pytestmark = [
    pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter"),
    # numpy, under the interpreter, reducing the deliberate NaN row
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
]
IGNORE = -100


def _param(name, variant=None):
    reason = backends.unavailable_reason(name)
    marks = [pytest.mark.triton] if name == "triton" else []
    if reason is not None:
        marks.append(pytest.mark.skip(reason=f"backend {name!r} is unavailable here: {reason}"))
    if variant is None:
        return pytest.param(name, marks=marks, id=name)
    return pytest.param((name, variant), marks=marks, id=f"{name}-{variant}")


#: The backends with a cross-row step of their own ("torch" runs _finalize.finalize itself).
FUSED = [_param(name) for name in ("cpu", "cuda", "triton")]


def _small_blocks(monkeypatch, variant):
    """The Triton cross-row step in small blocks, so that small batches span several: the one-program
    kernel, or the two-kernel version (a program per block, the blocks' totals merged a few at a time)."""
    from robustloss_fast.backends.triton import ops

    monkeypatch.setattr(ops, "CROSS_ROW_BLOCK", 8)
    monkeypatch.setattr(ops, "CROSS_ROW_PARALLEL_BLOCK", 8)
    monkeypatch.setattr(ops, "CROSS_ROW_MERGE_BLOCK", 4)
    monkeypatch.setattr(ops, "CROSS_ROW_ONE_PROGRAM_MAX", 1 << 62 if variant == "one_program" else 0)


def _spec(kernel, reduction, normalize):
    return KernelSpec(kernel, 1.0, 8.0, 1.0, reduction, normalize, IGNORE)


CASES = [
    (Kernel.DM, Reduction.MEAN, True),
    (Kernel.DM, Reduction.MEAN, False),
    (Kernel.DM, Reduction.SUM, False),
    (Kernel.DM, Reduction.NONE, False),
    (Kernel.CCE_LS, Reduction.MEAN, False),  # the class weights sit in the rows
    (Kernel.CCE_LS, Reduction.NONE, False),
]


def _close(got, want, dtype, what, scale=None):
    """Within the accumulation tolerance of ``dtype`` relative to |want| plus ``scale`` (the size of the
    terms a signed sum cancelled; default 1e-3 of the largest |want|)."""
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    g, w = got.double().cpu(), want.double().cpu()
    if w.numel() == 0:
        return
    if scale is None:
        scale = w.abs().nan_to_num(0, 0, 0).max() * 1e-3
    same = (g == w) | (g.isnan() & w.isnan())
    near = (g - w).abs() <= tol * (w.abs() + scale)
    bad = ~(same | (near & w.isfinite()))
    assert not bool(bad.any()), f"{what}: got {g[bad][:4].tolist()}, want {w[bad][:4].tolist()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kernel,reduction,normalize", CASES, ids=lambda v: getattr(v, "name", str(v)))
@pytest.mark.parametrize("which", [_param("cpu"), _param("cuda"), _param("triton", "one_program"),
                                   _param("triton", "two_kernels")])
def test_kernel_matches_finalize(monkeypatch, which, kernel, reduction, normalize, dtype):
    name, variant = which if isinstance(which, tuple) else (which, None)
    if name == "triton":
        _small_blocks(monkeypatch, variant)
    batches = ((0, None, True), (1, None, False), (8, "edges", True), (29, "edges", False), (37, None, True),
               (64, "edges", True), (29, "inf", True), (64, "inf", False), (29, "nan", True))  # fmt: skip
    _check_batches(name, _spec(kernel, reduction, normalize), dtype, batches)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kernel,reduction,normalize", CASES, ids=lambda v: getattr(v, "name", str(v)))
@pytest.mark.parametrize("name", [_param("cpu"), _param("cuda")])
def test_kernel_matches_finalize_past_the_one_launch_limit(name, kernel, reduction, normalize, dtype):
    """Batches past the one-launch limit (1024 rows), where the step takes two launches, with the edge
    rows in the first chunk and the last: at the limit + 1 (5 chunks of 205 rows on CUDA) and at
    8193, 9000 and 20000 rows (33, 36 and 79 chunks)."""
    batches = ((1025, "edges", True), (8193, "edges", True), (9000, "inf", True), (20000, "nan", False))
    _check_batches(name, _spec(kernel, reduction, normalize), dtype, batches)


def _check_batches(name, spec, dtype, batches):
    """Backend ``name``'s cross-row step against ``_finalize.finalize`` in float64 on the same rounded rows,
    for each (rows, special rows, class and signed sample weights or none) of ``batches``."""
    finalize = backends.get(name).finalize
    device = device_of(name)
    for n, special, weights in batches:
        rows, target = cross_row_rows(n, dtype, device, special)
        w = (torch.rand(7, dtype=dtype) + 0.5).to(device) if weights else None
        sw = torch.randn(n, dtype=dtype).to(device) if weights else None
        if weights and n > 6:
            sw[6] = 0  # a row that does not count
            target[5] = IGNORE
            sw[5] = math.nan  # an ignored row's sample weight is never read
        extra = {"log_denominator": True} if spec.normalised else {}
        got = finalize(rows, target, spec, w, sw, **extra)
        # A signed sample weight makes the value a cancelling sum, whose error scales with the sum of
        # |terms|: the same value with |sample_weight|.
        f64 = [None if x is None else x.double() for x in (rows, w, sw)]
        want = _finalize.finalize(f64[0], target, spec, f64[1], f64[2], **extra)
        cancelled = None
        if sw is not None and spec.reduction != Reduction.NONE:
            cancelled = _finalize.finalize(f64[0], target, spec, f64[1], f64[2].abs())[0].abs().nan_to_num(0, 0, 0)
        what = f"n={n} special={special} weights={weights}"
        assert len(got) == len(want) and all(g.shape == w_.shape for g, w_ in zip(got, want)), what
        for k, (part, g, w_) in enumerate(zip(("value", "stats", "log D"), got, want)):
            assert g.dtype == dtype, f"{what} {part} dtype {g.dtype}"
            _close(g, w_, dtype, f"{what} {part}", scale=cancelled if k == 0 else None)


@pytest.mark.parametrize("name", FUSED + [_param("torch")])
def test_nan_weights_reach_the_rows_that_count_and_no_others(name):
    """A NaN sample weight makes D NaN even where every row that counts has w = 0 (value and log D NaN,
    not 0 and -inf); a NaN class weight makes the mean's D NaN. Either way the rows that count get NaN
    stats and an ignored row or one with sample weight 0 keeps zeros (SPEC §5: they count nowhere)."""
    device = device_of(name)
    finalize = backends.get(name).finalize
    rows, _ = cross_row_rows(4, torch.float64, "cpu")
    target = torch.tensor([0, 1, IGNORE, 2])
    zero_w = rows.clone()
    zero_w[:, RowCol.LOGW] = -math.inf
    nan_cw = torch.tensor([1.0, math.nan, 1, 1, 1, 1, 1], dtype=torch.float64)
    cases = [  # (rows, spec, class weight, sample weight, rows that count)
        (zero_w, _spec(Kernel.DM, Reduction.MEAN, True), None, torch.tensor([math.nan, 1.0, 1.0, 0.0]), [0, 1]),
        (rows, _spec(Kernel.DM, Reduction.MEAN, False), nan_cw, torch.tensor([1.0, 1.0, 1.0, 0.0]), [0, 1]),
    ]
    for r, spec, w, sw, counting in cases:
        extra = {"log_denominator": True} if spec.normalised else {}
        got = finalize(r.to(device), target.to(device), spec, None if w is None else w.to(device), sw.to(device),
                       **extra)  # fmt: skip
        want = _finalize.finalize(r, target, spec, w, sw, **extra)
        assert got[0].isnan() and (not spec.normalised or got[2].isnan()), (spec, got[0], got[2:])
        stats = got[1].cpu()
        assert stats[counting, 2].isnan().all() and stats[counting, 4].isnan().all(), stats
        assert (stats[[2, 3], 2:] == 0).all(), stats
        for k, (g, w_) in enumerate(zip(got, want)):
            _close(g, w_, torch.float64, f"{spec} result {k}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("where", ["sample", "class"])
@pytest.mark.parametrize("name", FUSED)
def test_an_infinite_weight_matches_finalize(name, where, dtype):
    """An infinite sample or class weight on a row that counts makes D (and the sums) infinite: every
    other row's normalised coefficient is 0, the infinite rows' own inf / inf = NaN, the value NaN or
    inf. The kernels' log-domain merges meet inf - inf there; they must give _finalize's answer
    wherever the infinite row falls (first, middle or last block; past 1024 rows on the CUDA step's
    two-launch path), for every reduction. Its log w is within a few nats of the others' (as DM's are):
    one so far below the largest that exp(log w - max) underflows to 0 makes inf x 0 = NaN of D in any
    dtype (the float32 kernels at 104 nats, the float64 reference at 745)."""
    finalize = backends.get(name).finalize
    device = device_of(name)
    for n in (29, 700, 9000):
        for pos in (0, n // 2, n - 1):
            rows, target = cross_row_rows(n, dtype, "cpu")
            rows[:, RowCol.LOGW] /= 30
            w = torch.rand(7, dtype=dtype) + 0.5
            sw = torch.rand(n, dtype=dtype) + 0.5
            target[pos] = 1
            if where == "sample":
                sw[pos] = math.inf
            else:
                w[1] = math.inf
            for kernel, reduction, normalize in CASES:
                spec = _spec(kernel, reduction, normalize)
                extra = {"log_denominator": True} if spec.normalised else {}
                got = finalize(rows.to(device), target.to(device), spec, w.to(device), sw.to(device), **extra)
                want = _finalize.finalize(rows.double(), target, spec, w.double(), sw.double(), **extra)
                if spec.normalised:
                    assert want[2] == math.inf and want[1][pos, 2].isnan()  # the case is what it says
                for part, g, w_ in zip(("value", "stats", "log D"), got, want):
                    _close(g, w_, dtype, f"n={n} row {pos} {where} {spec} {part}")


@pytest.mark.parametrize("name", FUSED + [_param("torch")])
def test_log_denominator_is_for_normalised_specs_only(name):
    rows, target = cross_row_rows(4, torch.float32, device_of(name), None)
    with pytest.raises(ValueError, match="normalised"):
        backends.get(name).finalize(rows, target, _spec(Kernel.DM, Reduction.SUM, False), None, None,
                                    log_denominator=True)  # fmt: skip


@pytest.mark.triton
@needs_triton
@pytest.mark.parametrize("variant", ["one_program", "two_kernels"])
def test_the_kernel_counts_every_block(monkeypatch, variant):
    """The sums cover every row: a batch of five blocks (and, for the merge, two groups of partials),
    weights of one, so D is the row count, and every row's stats are written."""
    from robustloss_fast.backends.triton import ops

    _small_blocks(monkeypatch, variant)
    monkeypatch.setattr(ops, "CROSS_ROW_BLOCK", 4)
    monkeypatch.setattr(ops, "CROSS_ROW_PARALLEL_BLOCK", 4)
    device = device_of("triton")
    rows = torch.zeros(19, ROW_COLS, device=device)
    rows[:, RowCol.X] = 1.0
    rows[:, RowCol.ALPHA] = 1.0
    target = torch.zeros(19, dtype=torch.long, device=device)
    for reduction, want, alpha in ((Reduction.SUM, 19.0, 1.0), (Reduction.MEAN, 1.0, 1 / 19)):
        value, stats = ops._cross_row(rows, target, _spec(Kernel.CCE, reduction, False), None, None)
        assert float(value) == want
        assert torch.equal(stats[:, 2].cpu(), torch.full((19,), alpha))  # alpha scaled by s_i (/ D)


@pytest.mark.triton
@needs_triton
def test_large_batches_take_two_kernels(monkeypatch):
    """Above CROSS_ROW_ONE_PROGRAM_MAX rows a training step runs the partials and apply kernels in place
    of the one-program one; below, the one program."""
    from robustloss_fast.backends.triton import ops

    device = device_of("triton")
    launches = mark_triton_launches(monkeypatch, device)
    monkeypatch.setattr(ops, "CROSS_ROW_ONE_PROGRAM_MAX", 40)
    monkeypatch.setattr(ops, "CROSS_ROW_PARALLEL_BLOCK", 16)
    for n, kernels in ((40, ["cross_row_kernel"]), (41, ["cross_row_partials_kernel", "cross_row_apply_kernel"])):
        x = torch.randn(n, 6, device=device, requires_grad=True)
        t = torch.randint(0, 6, (n,), device=device)
        launches.clear()
        rf.robust_cross_entropy(x, t, DM(), backend="triton").backward()
        assert launches == ["rows_kernel", *kernels, "backward_kernel"], launches


@pytest.mark.triton
@needs_triton
def test_a_training_step_is_three_triton_launches(monkeypatch):
    """Forward (row pass, cross-row step) and backward: three kernels, and no other torch op that computes:
    only allocations, views and autograd's seed (ones_like), plus the bad-target assertion on a GPU. The
    CPU-only host check of the targets (what the interpreter's CPU tensors get instead of the assertion)
    is set aside, and so are the interpreter's own copies inside each launch."""
    from robustloss_fast.backends.triton import ops

    device = device_of("triton")
    launches = mark_triton_launches(monkeypatch, device)
    monkeypatch.setattr(ops, "_check_targets_here", lambda *a: None)
    x = torch.randn(33, 10, device=device, requires_grad=True)
    t = torch.randint(0, 10, (33,), device=device)
    w = torch.rand(10, device=device) + 0.5
    rf.robust_cross_entropy(x, t, DM(), weight=w, backend="triton").backward()  # warm: compile and cache
    launches.clear()
    x.grad = None  # a fresh step: no accumulation into an old gradient
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        rf.robust_cross_entropy(x, t, DM(), weight=w, backend="triton").backward()
    assert launches == ["rows_kernel", "cross_row_kernel", "backward_kernel"], launches
    assert sum(e.name == LAUNCH for e in prof.events()) == 3
    ops_run = aten_outside_launches(prof)
    free = {"empty", "empty_strided", "empty_like", "new_empty", "as_strided", "view", "to", "contiguous", "detach",
            "select", "slice", "alias", "reshape", "_reshape_alias", "expand", "ones_like", "fill_",
            "_assert_async"}  # fmt: skip
    computing = [op for op in ops_run if op not in free]
    assert computing == [], computing
    assert ops_run.count("fill_") == 1  # autograd's seed (ones_like), nothing of ours
