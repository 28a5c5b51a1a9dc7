"""linear_robust_cross_entropy's memory budget: the plans it picks, the vocabulary-tiled backward, the memory held."""

import dataclasses
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import robustloss_fast as rf
from robustloss_fast import schemes
from robustloss_fast._bench import peak_cpu_bytes
from robustloss_fast.linear import _plan, linear_robust_cross_entropy

from _backends import thin
from test_linear import ALL_SCHEMES, _both, _close, _inputs

GIB, MIB = 1 << 30, 1 << 20


def _llm_plan(budget, n=8192, dtype=torch.bfloat16, device="cuda", cap=None, gif=True):
    return _plan(n, 128256, 4096, dtype, device, needs_h=True, needs_w=True, needs_b=False, gif=gif, cap=cap,
                 budget=budget, chunk_size=None)


def test_default_chunks_from_the_device_budget():
    # 2 GiB of bfloat16 logits at V = 128256 is 8372 rows: 8192 rows in one chunk, 32768 in four.
    plan = _llm_plan(None)
    assert (plan.gif, plan.rows, plan.tile_cols, plan.inplace) == (True, 8192, 128256, True)
    assert _llm_plan(None, n=32768).rows == 8192
    # A soft-cap keeps the capped logits beside their gradient: half the rows.
    assert _llm_plan(None, cap=30.0).rows == 4096
    # CPU: 64 MiB; float32 logits at V = 32000 are 524 rows, 2048 split in four.
    cpu = _plan(2048, 32000, 512, torch.float32, "cpu", needs_h=True, needs_w=True, needs_b=False, gif=True,
                cap=None, budget=None, chunk_size=None)
    assert cpu.rows == 512
    # An explicit chunk_size is kept as given (a short last chunk included).
    fixed = _plan(23, 11, 7, torch.float64, "cpu", needs_h=True, needs_w=True, needs_b=True, gif=True, cap=None,
                  budget=None, chunk_size=5)
    assert fixed.rows == 5


def test_budget_picks_the_fastest_plan_that_fits(monkeypatch):
    import robustloss_fast.linear as linear

    # A GPU whose GEMM adds bfloat16 products into float32 (recent CUDA builds of torch).
    monkeypatch.setitem(linear._FP32_OUT_GEMM, "cuda", True)
    # One chunk of all 8192 rows needs no float32 sum (its grad_weight comes from one GEMM, held
    # in bfloat16): 2 GiB of logits fit 2.5 GiB, with or without a GEMM that writes float32.
    for fp32_out in (True, False):
        monkeypatch.setitem(linear._FP32_OUT_GEMM, "cuda", fp32_out)
        one = _llm_plan(2.5 * GIB)
        assert one.gif and one.rows == 8192 and one.working_bytes <= 2.5 * GIB
    # 16384 rows: room for the float32 V x H sum (2 GiB) and three chunks of logits: 3 matmuls.
    big = _llm_plan(3.5 * GIB, n=16384)
    assert big.gif and big.rows == -(-16384 // 3) and big.working_bytes <= 3.5 * GIB
    # No room for the accumulator: recompute, tiled over the vocabulary with all 8192 rows per tile.
    lean = _llm_plan(1 * GIB)
    assert not lean.gif and lean.tile_rows == 8192 and lean.tile_cols < 128256
    assert lean.tile_cols % 128 == 0 and lean.working_bytes <= 1 * GIB
    # Smaller still: narrower tiles of fewer rows, always within the budget.
    for budget in (256 * MIB, 200 * MIB):
        for gif in (True, False):
            plan = _llm_plan(budget, gif=gif)
            assert plan.working_bytes <= budget and (gif or not plan.gif), (budget, plan)
    tiny = _llm_plan(16 * MIB, n=8192)
    assert (tiny.tile_rows, tiny.tile_cols) < (8192, 128256) and tiny.tile_rows >= 1
    # 256 MiB: the float32 grad_hidden (128 MiB) leaves tiles of 1920 columns, 67 of them: tiled.
    assert _llm_plan(256 * MIB).tile_cols >= 512 and not _llm_plan(256 * MIB).gif
    # 200 MiB: it would leave fewer than 1024 columns; grad_hidden is made in forward instead, and
    # the tiles of all 8192 rows are 3968 columns wide: the hybrid (4 matmuls, no float32 sum).
    hybrid = _llm_plan(200 * MIB)
    assert hybrid.gif and hybrid.tiled and hybrid.tile_rows == 8192 and hybrid.tile_cols >= 3968, hybrid
    # float32 weights need no separate accumulator: the 3-matmul path fits where bf16's did not.
    assert _llm_plan(1 * GIB, dtype=torch.float32).gif


@pytest.mark.parametrize("n", [1024, 8192, 32768])
def test_every_budget_is_kept(n):
    # From 8 MiB to 4 GiB at (N, 4096, 128256) bf16 with both gradients: the plan's model stays
    # within the budget. (1024 rows in 512 MiB once took whole-row chunks, whose backward
    # holds the 2 GiB float32 grad_weight sum.)
    for mib in (8, 16, 32, 64, 128, 160, 256, 512, 1024, 2048, 4096):
        for gif in (True, False):
            plan = _llm_plan(mib * MIB, n=n, gif=gif)
            assert plan.working_bytes <= mib * MIB, (n, mib, plan)
            if not plan.gif and not plan.tiled:  # whole rows, recomputed: their grad_weight sum fits too
                assert 4 * 128256 * 4096 <= mib * MIB


@pytest.mark.parametrize("dtype,device,floor", [
    # bfloat16 on a GPU: the split's one row at a time (48 bytes of statistics a row and one row
    # of logits) holds the least, not 37-row tiles (2.7 MB with their float32 grad_hidden sum).
    (torch.bfloat16, "cuda", 37 * 48 + 128256 * 2),
    # float16 on a CPU, whose products are upcast in blocks: one row's forward also holds a
    # 512 x 512 float32 block of the weight and one of the row (_upcast_product), the floor of
    # every plan.
    (torch.float16, "cpu", 37 * 48 + 128256 * 2 + 4 * (512 * 512 + 2 * 512)),
])  # fmt: skip
def test_below_every_plan_the_smallest_is_used(dtype, device, floor):
    for budget in (64 << 10, 608_800, 700_000, floor - 1):
        plan = _plan(37, 128256, 4096, dtype, device, needs_h=True, needs_w=False, needs_b=False, gif=True,
                     cap=None, budget=budget, chunk_size=None)  # fmt: skip
        assert plan.working_bytes <= max(budget, floor), (budget, plan)


def test_few_whole_rows_where_no_tile_fits():
    # float32 at (8192, 4096, 128256): a tile's float32 grad_weight block (128 x 4096: 2 MiB) is over a
    # 1.5 MiB budget, a few whole rows of logits (0.5 MiB each, beside 0.4 MiB of statistics) are not.
    plan = _llm_plan(3 * MIB // 2, dtype=torch.float32)
    assert not plan.tiled and 1 <= plan.tile_rows < 256 and plan.working_bytes <= 3 * MIB // 2, plan


def test_split_backward_where_tiles_would_be_narrow():
    # The recompute path (no gradient in forward). Below ~250 MiB at N = 8192 the float32 grad_hidden
    # (128 MiB, and a product block to add to it) would leave tiles of fewer than 1024 columns: the
    # backward splits in two instead, wide tiles for grad_weight (all 8192 rows) and chunks of whole
    # rows for grad_hidden, with no float32 sum of either.
    for mib in (128, 64, 32):
        plan = _llm_plan(mib * MIB, gif=False)
        assert not plan.gif and plan.tiled and plan.split_rows >= 1 and plan.tile_rows == 8192, plan
        assert plan.tile_cols >= 512 and plan.split_rows * 128256 * 2 <= mib * MIB, plan
        # Where the gradient may be made in forward, the hybrid takes the split's place: the same tiles
        # and chunks of about as many whole rows (beside them, backward's 1 MiB float32 block that
        # scales grad_hidden) at one GEMM fewer.
        hybrid = _llm_plan(mib * MIB)
        assert hybrid.gif and hybrid.tiled and not hybrid.split_rows and hybrid.tile_rows == 8192, hybrid
        assert hybrid.tile_cols >= plan.tile_cols and hybrid.rows >= 0.95 * plan.split_rows, (hybrid, plan)
    # 32768 rows: the float32 grad_hidden alone is 512 MiB.
    plan = _llm_plan(512 * MIB, n=32768, gif=False)
    assert plan.split_rows and plan.tile_cols >= 4096 and plan.working_bytes <= 512 * MIB, plan
    # float32 (its grad_hidden is summed in the returned tensor) and bf16 without grad_hidden never split.
    assert not _llm_plan(32 * MIB, dtype=torch.float32, gif=False).split_rows
    no_h = _plan(8192, 128256, 4096, torch.bfloat16, "cuda", needs_h=False, needs_w=True, needs_b=False, gif=True,
                 cap=None, budget=32 * MIB, chunk_size=None)
    assert no_h.tiled and not no_h.split_rows


def test_budget_arguments_are_validated():
    hidden, weight, _, target, _, _ = _inputs(5, 3, 4, torch.float32)
    for bad in (0, -1, 1.5, True, "1GiB"):
        with pytest.raises(ValueError, match="memory_budget"):
            linear_robust_cross_entropy(hidden, weight, target, schemes.DM(), memory_budget=bad)
    with pytest.raises(ValueError, match="not both"):
        linear_robust_cross_entropy(hidden, weight, target, schemes.DM(), memory_budget=1 << 20, chunk_size=2)


# N = 23, H = 7, V = 300, float64: whole rows of one chunk need 23 * 300 * 8 bytes and more,
# so these budgets force the vocabulary-tiled backward: tiles of all 23 rows and 128 columns
# (blocks 0-127, 128-255 and a short 256-299), and tiles of 2 rows (grad_weight summed over row tiles).
TILED = {"all_rows": 30_000, "few_rows": 12_000}
# Where the tiles give every gradient (the recompute path: grad_in_forward=False, as for reduction
# "none" or a process group), or grad_weight and grad_bias only (the hybrid: grad_hidden made in
# forward, where the upstream gradient is a scalar).
PATHS = {"hybrid": None, "recompute": False}


def _tiled_plan(budget, n=23, h=7, v=300, dtype=torch.float64, cap=None, device="cpu", gif=True):
    return _plan(n, v, h, dtype, device, needs_h=True, needs_w=True, needs_b=True, gif=gif, cap=cap,
                 budget=budget, chunk_size=None)


def _force_hybrid(monkeypatch):
    """Every tiled plan that may make the gradient in forward runs as the hybrid.

    The planner picks the hybrid only for a 16-bit grad_hidden whose float32 sum would leave the
    tiles narrow; its parity at float64 tolerances needs it forced (the same tiles and chunks).
    """
    import robustloss_fast.linear as linear

    real = linear._plan
    used = []

    def forced(*args, **kwargs):
        plan = real(*args, **kwargs)
        if plan.tiled and kwargs["gif"]:
            plan = dataclasses.replace(plan, gif=True, split_rows=0)
        used.append(plan)
        return plan

    monkeypatch.setattr(linear, "_plan", forced)
    return used


@pytest.fixture(params=sorted(PATHS))
def tiled_path(request, monkeypatch):
    """grad_in_forward for each way the tiles run: the hybrid (forced; where the test tiled, it ran the
    hybrid) and the recompute path. (bfloat16 at the "all_rows" budget fits one chunk: no tiles.)"""
    used = _force_hybrid(monkeypatch) if request.param == "hybrid" else None
    yield PATHS[request.param]
    if used is not None and any(p.tiled for p in used):
        assert any(p.gif and p.tiled for p in used), used


def test_the_test_budgets_tile_as_intended():
    for gif in (True, False):
        plan = _tiled_plan(TILED["all_rows"], gif=gif)
        assert (plan.gif, plan.tiled, plan.tile_rows, plan.tile_cols) == (False, True, 23, 128)
        plan = _tiled_plan(TILED["few_rows"], gif=gif)
        assert not plan.gif and plan.tiled and plan.tile_cols == 128 and 1 < plan.tile_rows < 23
    # bfloat16 at the smaller budget: the split where the gradient cannot be made in forward, else the hybrid.
    assert _tiled_plan(TILED["few_rows"], dtype=torch.bfloat16, gif=False).split_rows
    plan = _tiled_plan(TILED["few_rows"], dtype=torch.bfloat16)
    assert plan.gif and plan.tiled and not plan.split_rows, plan


@pytest.mark.parametrize("tiling", sorted(TILED))
@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=repr)
def test_tiled_parity_every_scheme_float64(backend, scheme, tiling, tiled_path):
    # Every backend on its own device; ignored rows, class and signed sample weights, bias,
    # a random upstream gradient, every reduction ("none" always recomputes).
    reductions = thin(["mean", "sum", "none"], backend, 2, ALL_SCHEMES.index(scheme))
    for reduction in reductions:
        hidden, weight, bias, target, cw, sw = _inputs(23, 7, 300, torch.float64, device=backend.device)
        got, want = _both(hidden, weight, bias, target, scheme, cw, sw, lambda r: torch.randn_like(r),
                          reduction=reduction, memory_budget=TILED[tiling], backend=backend.name,
                          grad_in_forward=tiled_path)
        _close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("ignore_index", [-100, 0, 130, 300])
def test_tiled_any_ignore_index(ignore_index, tiled_path):
    # An ignore_index that is a column of some tile (0, 130) or the first spare column's
    # local index (300 - 256 = 44 is the short block's width) must not be confused with a class.
    hidden, weight, bias, target, cw, sw = _inputs(23, 7, 300, torch.float64)
    target = torch.where(target == -100, ignore_index, target)
    target[:3] = torch.tensor([0, 130, 256])
    got, want = _both(hidden, weight, bias, target, schemes.DM(), cw, sw, lambda r: torch.randn_like(r),
                      memory_budget=TILED["all_rows"], ignore_index=ignore_index, grad_in_forward=tiled_path)
    _close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("tiling", sorted(TILED))
def test_tiled_label_smoothing_and_softcap(tiling, tiled_path):
    # Label smoothing routes the class weights into every column (the spare ones get 1s);
    # the soft-cap's chain rule needs the capped logits beside the gradient.
    hidden, weight, bias, target, cw, sw = _inputs(23, 7, 300, torch.float64)
    got, want = _both(hidden, weight, bias, target, schemes.CCE(), cw, sw, lambda r: torch.randn_like(r),
                      memory_budget=TILED[tiling], label_smoothing=0.2, grad_in_forward=tiled_path)
    _close(got, want, rtol=1e-9, atol=1e-12)
    cap = 1.5
    out = linear_robust_cross_entropy(hidden, weight, target, schemes.DM(), bias=bias, class_weight=cw,
                                      sample_weight=sw, softcap=cap, memory_budget=TILED[tiling],
                                      grad_in_forward=tiled_path)
    params = (hidden, weight, bias)
    logits = cap * torch.tanh(torch.addmm(bias, hidden, weight.t()) / cap)
    ref = rf.robust_cross_entropy(logits, target, schemes.DM(), weight=cw, sample_weight=sw, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
    for a, b in zip(torch.autograd.grad(out, params), torch.autograd.grad(ref, params)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


LOW_PRECISION = [(torch.float32, 2e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)]


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=repr)
def test_tiled_parity_low_precision(backend, scheme, tiled_path):
    # Every scheme on every backend on its own device, against the reference on logits of
    # the same dtype (an emulated backend: two of the three dtypes, rotated over the schemes).
    gif = tiled_path is None
    for dtype, tol in thin(LOW_PRECISION, backend, 2, ALL_SCHEMES.index(scheme)):
        hidden, weight, bias, target, cw, sw = _inputs(45, 16, 700, dtype, device=backend.device)
        # The smallest budget (in 1 KiB steps) that tiles all 45 rows by at least 256 columns.
        def plan_of(b):
            return _tiled_plan(b, n=45, h=16, v=700, dtype=dtype, device=hidden.device.type, gif=gif)

        budget = next(b for b in range(1024, 1 << 20, 1024) if plan_of(b).tile_rows == 45 and plan_of(b).tile_cols >= 256)
        plan = plan_of(budget)
        assert plan.tiled and plan.tile_cols < 700 and (gif or not plan.gif), plan
        got, want = _both(hidden, weight, bias, target, scheme, cw, sw, lambda r: torch.randn_like(r),
                          memory_budget=budget, backend=backend.name, grad_in_forward=tiled_path)
        _close(got, want, rtol=tol, atol=tol)


# The split backward, forced on float64 (whose plans never split: its grad_hidden is summed in the returned
# tensor) to check it at float64 tolerances: forward chunks of 5 rows; grad_weight from tiles of 128 columns
# (3 blocks, the last short) of all 23 rows or of 6 (a float32 block sum over 4 row tiles); grad_hidden
# from chunks of 4 whole rows.
SPLITS = {"all_rows": (23, 4), "few_rows": (6, 4)}


def _force_split(monkeypatch, tile_rows, split_rows):
    import robustloss_fast.linear as linear

    real = linear._plan

    def forced(n, v, *args, **kwargs):
        plan = real(n, v, *args, **kwargs)
        return dataclasses.replace(plan, gif=False, tile_rows=min(tile_rows, n), tile_cols=min(128, v), tiled=True,
                                   split_rows=min(split_rows, n))  # fmt: skip

    monkeypatch.setattr(linear, "_plan", forced)


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=repr)
def test_split_parity_every_scheme_float64(monkeypatch, backend, scheme, split):
    _force_split(monkeypatch, *SPLITS[split])
    reductions = thin(["mean", "sum", "none"], backend, 2, ALL_SCHEMES.index(scheme))
    for reduction in reductions:
        hidden, weight, bias, target, cw, sw = _inputs(23, 7, 300, torch.float64, device=backend.device)
        got, want = _both(hidden, weight, bias, target, scheme, cw, sw, lambda r: torch.randn_like(r),
                          reduction=reduction, chunk_size=5, backend=backend.name)
        _close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", LOW_PRECISION, ids=lambda x: str(x).replace("torch.", ""))
def test_split_parity_forced_every_dtype(monkeypatch, backend, dtype, tol):
    # The split in float32 (which the planner never splits) and 16-bit, forced to the same tiles,
    # against the reference on logits of the same dtype, every reduction.
    _force_split(monkeypatch, *SPLITS["few_rows"])
    for reduction in ("mean", "sum", "none"):
        hidden, weight, bias, target, cw, sw = _inputs(23, 7, 300, dtype, device=backend.device)
        got, want = _both(hidden, weight, bias, target, schemes.DM(), cw, sw, lambda r: torch.randn_like(r),
                          reduction=reduction, chunk_size=5, backend=backend.name)
        _close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("wanted", ["hidden", "weight", "bias", "weight_and_bias"])
def test_split_computes_only_the_gradients_asked_for(monkeypatch, wanted):
    # Each sweep runs for what it gives: grad_hidden alone skips the tiles, grad_weight or grad_bias
    # alone computes no grad_hidden (counted); label smoothing and a soft-cap on the way.
    import robustloss_fast.linear as linear

    _force_split(monkeypatch, 6, 4)
    calls = []
    for sweep in ("_backward_tiled", "_backward_rows"):
        real = getattr(linear._LinearRobustCE, sweep)

        def counted(*args, _real=real, _name=sweep):
            calls.append(_name)
            return _real(*args)

        monkeypatch.setattr(linear._LinearRobustCE, sweep, staticmethod(counted))
    hidden, weight, bias, target, cw, sw = _inputs(23, 7, 300, torch.float64)
    for x, name in ((hidden, "hidden"), (weight, "weight"), (bias, "bias")):
        x.requires_grad_(name in wanted)
    params = [x for x in (hidden, weight, bias) if x.requires_grad]
    for kw in ({}, {"label_smoothing": 0.1}, {"softcap": 2.0}):
        scheme = schemes.CCE() if kw.get("label_smoothing") else schemes.DM()
        out = linear_robust_cross_entropy(hidden, weight, target, scheme, bias=bias, class_weight=cw,
                                          sample_weight=sw, chunk_size=5, **kw)
        logits = torch.addmm(bias, hidden, weight.t())
        if "softcap" in kw:
            logits = kw["softcap"] * torch.tanh(logits / kw["softcap"])
        ref = rf.robust_cross_entropy(logits, target, scheme, weight=cw, sample_weight=sw, backend="torch",
                                      label_smoothing=kw.get("label_smoothing", 0.0))
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
        calls.clear()
        for a, b in zip(torch.autograd.grad(out, params), torch.autograd.grad(ref, params)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        want = ["_backward_tiled"] if wanted != "hidden" else []
        assert calls == want + (["_backward_rows"] if wanted == "hidden" else []), calls


@pytest.mark.parametrize("scheme", ALL_SCHEMES, ids=repr)
def test_split_parity_low_precision(backend, scheme):
    # The split as the planner picks it on the recompute path: 16-bit, a budget too small for tiles
    # of the float32 grad_hidden sum at full width (V = 300 is under 1024 columns).
    for dtype, tol in thin(LOW_PRECISION[1:], backend, 1, ALL_SCHEMES.index(scheme)):
        hidden, weight, bias, target, cw, sw = _inputs(45, 16, 300, dtype, device=backend.device)
        plan = _tiled_plan(16_000, n=45, h=16, v=300, dtype=dtype, device=hidden.device.type, gif=False)
        assert plan.split_rows and plan.tile_cols < 300 and plan.split_rows < 45, plan
        got, want = _both(hidden, weight, bias, target, scheme, cw, sw, lambda r: torch.randn_like(r),
                          memory_budget=16_000, backend=backend.name, grad_in_forward=False)
        _close(got, want, rtol=tol, atol=tol)


def test_tiled_nan_row_and_all_ignored(tiled_path):
    hidden, weight, bias, target, cw, sw = _inputs(23, 7, 300, torch.float64, extras=False)
    target[4] = 7
    with torch.no_grad():
        hidden[4] = math.nan
    got = linear_robust_cross_entropy(hidden, weight, target, schemes.CCE(), bias=bias, reduction="none",
                                      memory_budget=TILED["all_rows"])
    (gh,) = torch.autograd.grad(got.sum(), (hidden,))
    assert got[4].isnan() and gh[4].isnan().all()
    rest = torch.ones(23, dtype=torch.bool)
    rest[4] = False
    assert got[rest].isfinite().all() and gh[rest].isfinite().all()
    target = torch.full_like(target, -100)
    out = linear_robust_cross_entropy(hidden.detach()[5:].requires_grad_(), weight, target[5:], schemes.DM(),
                                      memory_budget=TILED["all_rows"], grad_in_forward=tiled_path)
    out.backward()
    assert out.item() == 0.0 and weight.grad.abs().sum() == 0


# Several chunks (or tiles) each, so every float32 sum has a first term and later ones. (bfloat16
# takes, recomputing, whole-width tiles at the "all_rows" budget and the split backward at the
# "few_rows" one; with the gradient in forward, one chunk of the 3-matmul path and the hybrid's
# tiles of 128 columns. The "hybrid_*" plans are forced: _plan_kwargs.)
PLANS = {
    "grad_in_forward": dict(chunk_size=5),
    "recompute": dict(chunk_size=5, grad_in_forward=False),
    **{f"{path}_{name}": dict(memory_budget=budget, grad_in_forward=gif) for name, budget in TILED.items()
       for path, gif in PATHS.items()},
}


def _plan_kwargs(monkeypatch, name):
    """PLANS[name], its tiled plans run as the hybrid for the "hybrid_*" ones."""
    if name.startswith("hybrid"):
        _force_hybrid(monkeypatch)
    return PLANS[name]


@pytest.mark.parametrize("plan", sorted(PLANS))
@pytest.mark.parametrize("dtype,fast_16bit", [(torch.float64, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_sums_are_written_before_they_are_read(nan_filled_empty, monkeypatch, plan, dtype, fast_16bit):
    # The float32 accumulators are allocated uninitialised and the first chunk's GEMM
    # writes them (beta = 0); a read before that write would bring in the NaNs.
    # Both CPU paths of 16-bit products: the bfloat16 GEMM in blocks, and float32 copies.
    import robustloss_fast.linear as linear

    monkeypatch.setitem(linear._CPU_FAST_16BIT, torch.bfloat16, fast_16bit)
    assert torch.empty(64).isnan().all()  # the fill is live: this test can fail
    hidden, weight, bias, target, cw, sw = _inputs(23, 7, 300, dtype)
    got, want = _both(hidden, weight, bias, target, schemes.DM(), cw, sw, lambda r: torch.randn_like(r),
                      **_plan_kwargs(monkeypatch, plan))
    tol = (1e-9, 1e-12) if dtype == torch.float64 else (3e-2, 3e-2)
    _close(got, want, rtol=tol[0], atol=tol[1])


@pytest.mark.parametrize("plan", [None, *sorted(PLANS)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_an_empty_batch_gives_zeros(nan_filled_empty, monkeypatch, plan, reduction):
    # N = 0 (SPEC §5: D = 0 gives value 0 and gradient 0): every plan, no chunk at all, so the
    # float32 sums must be zeros rather than the uninitialised first-chunk buffers.
    hidden, weight, bias, target, _, _ = _inputs(0, 7, 300, torch.float32)
    out = linear_robust_cross_entropy(hidden, weight, target, schemes.DM(), bias=bias, reduction=reduction,
                                      **({} if plan is None else _plan_kwargs(monkeypatch, plan)))
    gh, gw, gb = torch.autograd.grad(out.sum(), (hidden, weight, bias))
    assert out.shape == ((0,) if reduction == "none" else ())
    assert (out == 0).all() and gh.shape == (0, 7)
    assert torch.equal(gw, torch.zeros_like(weight)) and torch.equal(gb, torch.zeros_like(bias))


def _held(hidden, weight, bias, target, budget, gif=None):
    """A DM step under ``budget``: the peak bytes it allocated beyond the gradients it returns, its value, its gradients."""

    def step():
        out = linear_robust_cross_entropy(hidden, weight, target, schemes.DM(), bias=bias, memory_budget=budget,
                                          grad_in_forward=gif)
        return out, torch.autograd.grad(out, (hidden, weight, bias))

    peak, (out, grads) = peak_cpu_bytes(step)
    assert peak is not None, "this torch's profiler has no allocation events"
    return peak - sum(g.numel() * g.element_size() for g in grads), out, grads


STEPS = [(dtype, 64, mib) for dtype in (torch.float32, torch.bfloat16) for mib in (3, 8, 24)]
STEPS += [(torch.bfloat16, 512, 2), (torch.bfloat16, 512, 4)]


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("gemm", ["native", "upcast"])
@pytest.mark.parametrize("dtype,h,budget_mib", STEPS, ids=lambda x: str(x).replace("torch.", ""))
def test_a_step_holds_no_more_than_the_budget(monkeypatch, dtype, h, budget_mib, gemm, path):
    # N x V = 1024 x 16000 logits are 62.5 MiB in float32. Whatever the plan (H = 64 -- 3 MiB: tiles
    # of fewer rows; 8 MiB: tiles of all rows; 24 MiB: the 3-matmul path; H = 512, bfloat16, whose
    # float32 grad_hidden sum is 2 MiB: recomputing, the split backward, else the hybrid, which has
    # no such sum; upcast, it holds grad_hidden in float32 and at 2 MiB splits too), the bytes allocated during forward +
    # backward stay within the budget plus the returned gradients (hidden, weight, bias) and 1 MiB:
    # the GEMM library's packing buffers, and N-sized vectors (targets, masks). The hybrid's peak is
    # its tiles' grad_weight product with grad_hidden already held; there oneDNN's own buffer for the
    # transposed bfloat16 operand (0.7-2.7 MiB, whatever the budget; the split peaks elsewhere) is
    # measured here and allowed too. Both CPU ways of a bfloat16 product: the native GEMM, and
    # float32 copies of its operands (CPUs without it).
    import robustloss_fast.linear as linear

    if dtype == torch.float32 and gemm == "upcast":
        pytest.skip("float32 products are never upcast")
    monkeypatch.setitem(linear._CPU_FAST_16BIT, torch.bfloat16, gemm == "native")
    torch.manual_seed(0)
    n, v = 1024, 16000
    hidden, weight, bias, target, _, _ = _inputs(n, h, v, dtype)
    budget = budget_mib * MIB
    gif = path == "hybrid"
    plan = _plan(n, v, h, dtype, "cpu", needs_h=True, needs_w=True, needs_b=True, gif=gif, cap=None,
                 budget=budget, chunk_size=None)
    if h == 512:
        hybrid = gif and (gemm == "native" or budget_mib > 2)
        assert plan.tiled and (plan.gif if hybrid else plan.split_rows), plan
    elif gemm == "native":
        assert not plan.split_rows, plan

    held, out, grads = _held(hidden, weight, bias, target, budget, PATHS[path])
    library = 0
    if plan.gif and plan.tiled and gemm == "native":
        g, x = torch.zeros(plan.tile_rows, plan.tile_cols, dtype=dtype), hidden[: plan.tile_rows].detach()
        block = torch.empty(plan.tile_cols, h, dtype=dtype)
        library = peak_cpu_bytes(lambda: torch.mm(g.t(), x, out=block))[0]
    assert held <= budget + MIB + library, (held / MIB, budget_mib, library / MIB)
    assert budget < n * v * dtype.itemsize  # holding the logits would break it
    ref = _both(hidden, weight, bias, target, schemes.DM(), None, None, lambda r: torch.ones_like(r))[1]
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    _close((out, grads), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("budget_mib", [8, 16])
def test_the_float32_bias_sum_is_held_within_the_budget(budget_mib):
    # V = 10^6, H = 8, bfloat16: the recompute backward's float32 grad_bias sum is 3.8 MiB, more than
    # the slack of the test above (it once went uncounted: 2.3-2.6 MiB over these budgets).
    torch.manual_seed(0)
    n, h, v = 64, 8, 1_000_000
    hidden, weight, bias, target, _, _ = _inputs(n, h, v, torch.bfloat16)
    held = _held(hidden, weight, bias, target, budget_mib * MIB)[0]
    assert held <= (budget_mib + 1) * MIB, (held / MIB, budget_mib)


@pytest.mark.parametrize("tiling", sorted(TILED))
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_tiled_compile_fullgraph(tiling, dtype, tiled_path):
    # The tiles' GEMMs write into views of one buffer (out=), which Dynamo does not trace:
    # under torch.compile they copy instead, and nothing breaks the graph (aot_eager: no codegen).
    # float16 on a CPU without AMX-FP16: the products in float32 blocks (_upcast_product).
    hidden, weight, bias, target, cw, sw = _inputs(23, 7, 300, dtype)
    torch._dynamo.reset()

    def f(h, w, b, t, s):
        return linear_robust_cross_entropy(h, w, t, schemes.DM(), bias=b, class_weight=cw, sample_weight=s,
                                           memory_budget=TILED[tiling], grad_in_forward=tiled_path)

    params = (hidden, weight, bias)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(hidden, weight, bias, target, sw)
    got = torch.autograd.grad(out, params)
    ref = f(hidden, weight, bias, target, sw)
    want = torch.autograd.grad(ref, params)
    torch.testing.assert_close(out, ref)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


class _Gemms(TorchDispatchMode):
    """The operand dtypes (``seen``) and multiply-adds (``macs``) of every matrix product dispatched while active."""

    GEMMS = {torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.bmm,
             torch.ops.aten.baddbmm, torch.ops.aten.baddbmm_, torch.ops.aten.mv, torch.ops.aten.addmv,
             torch.ops.aten.addmv_, torch.ops.aten.matmul}  # fmt: skip

    def __init__(self):
        super().__init__()
        self.seen = []
        self.macs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.GEMMS:
            tensors = [x for x in args if isinstance(x, torch.Tensor)]
            self.seen.append({x.dtype for x in tensors})
            a, b = tensors[-2:]  # (addmm's and addmv's first operand is what they add to)
            self.macs += a.numel() * (b.shape[-1] if b.dim() > 1 else 1)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("plan,products", [
    ("grad_in_forward", 3), ("recompute", 4), ("hybrid_all_rows", 4), ("hybrid_few_rows", 4),
    ("recompute_all_rows", 4), ("recompute_few_rows", 4), ("split", 5),
])  # fmt: skip
def test_each_plan_multiplies_as_many_n_h_v_products_as_it_says(monkeypatch, plan, products):
    # The matmul count of the module docstring, counted: the multiply-adds of every GEMM of a
    # training step, in units of N H V (float64, no bias: no GEMV of column sums).
    n, h, v = 23, 7, 300
    if plan == "split":
        _force_split(monkeypatch, *SPLITS["few_rows"])
    kw = dict(chunk_size=5) if plan == "split" else _plan_kwargs(monkeypatch, plan)
    hidden, weight, _, target, cw, sw = _inputs(n, h, v, torch.float64)
    with _Gemms() as work:
        out = linear_robust_cross_entropy(hidden, weight, target, schemes.DM(), class_weight=cw, sample_weight=sw,
                                          **kw)
        torch.autograd.grad(out, (hidden, weight))
    assert work.macs == products * n * h * v, (work.macs / (n * h * v), products)


@pytest.mark.parametrize("plan", sorted(PLANS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emulated_16bit_gemms_run_in_float32_blocks(nan_filled_empty, monkeypatch, plan, dtype):
    # A CPU without native 16-bit GEMMs: every product of forward and backward, on every plan,
    # runs in float32 (ATen's emulated 16-bit GEMM took 66 s where float32 took 0.19 s), in
    # blocks of 16 here so that H = 20 and V = 300 span several, short last ones included;
    # NaN-filled empties: no block reads memory before writing it.
    import robustloss_fast.linear as linear

    monkeypatch.setitem(linear._CPU_FAST_16BIT, dtype, False)
    monkeypatch.setattr(linear, "_UPCAST_BLOCK", 16)
    hidden, weight, bias, target, cw, sw = _inputs(23, 20, 300, dtype)
    with _Gemms() as gemms:
        out = linear_robust_cross_entropy(hidden, weight, target, schemes.DM(), bias=bias, class_weight=cw,
                                          sample_weight=sw, **_plan_kwargs(monkeypatch, plan))
        grads = torch.autograd.grad(out, (hidden, weight, bias))
    assert len(gemms.seen) > 3 * 19 and all(s == {torch.float32} for s in gemms.seen), gemms.seen
    ref = _both(hidden, weight, bias, target, schemes.DM(), cw, sw, lambda r: torch.ones_like(r))[1]
    _close((out, grads), ref, rtol=3e-2, atol=3e-2)


def test_native_16bit_gemms_stay_16bit(monkeypatch):
    # The counterpart (the check above can fail): where the CPU multiplies bfloat16 natively,
    # the products are bfloat16 ones.
    import robustloss_fast.linear as linear

    monkeypatch.setitem(linear._CPU_FAST_16BIT, torch.bfloat16, True)
    if not linear._cpu_fast_16bit_gemm(torch.bfloat16):
        pytest.skip("this torch has no oneDNN (or it is disabled): no native bfloat16 GEMM to take")
    hidden, weight, bias, target, _, _ = _inputs(23, 20, 300, torch.bfloat16)
    with _Gemms() as gemms:
        out = linear_robust_cross_entropy(hidden, weight, target, schemes.DM(), bias=bias, chunk_size=5)
        torch.autograd.grad(out, (hidden, weight, bias))
    assert any(torch.bfloat16 in s for s in gemms.seen), gemms.seen


@pytest.mark.parametrize("grad_in_forward", [None, False])
def test_compiled_graph_does_not_grow_with_the_blocks(monkeypatch, grad_in_forward):
    # Traced, _upcast_product's block loops would unroll: (m/512)(k/512)(n/512) products per
    # call, ~50k a step at LLM sizes. Compiled, each product is one opaque op: in blocks of 5,
    # H = 40 and V = 600 (8 x 120 blocks) give the graphs H = 20 and V = 300 give.
    import robustloss_fast.linear as linear
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    monkeypatch.setitem(linear._CPU_FAST_16BIT, torch.float16, False)
    monkeypatch.setattr(linear, "_UPCAST_BLOCK", 5)

    def nodes(h, v):
        hidden, weight, bias, target, _, _ = _inputs(23, h, v, torch.float16)
        counts = []

        def counting(gm, example_inputs):
            def count(g, _):
                counts.append(len(g.graph.nodes))
                return make_boxed_func(g)

            return aot_module_simplified(gm, example_inputs, fw_compiler=count, bw_compiler=count)

        def f(hd, w, b):
            return linear_robust_cross_entropy(hd, w, target, schemes.DM(), bias=b, chunk_size=5,
                                               grad_in_forward=grad_in_forward)

        torch._dynamo.reset()
        out = torch.compile(f, fullgraph=True, backend=counting)(hidden, weight, bias)
        got = torch.autograd.grad(out, (hidden, weight, bias))
        want = torch.autograd.grad(f(hidden, weight, bias), (hidden, weight, bias))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        return counts

    small, large = nodes(20, 300), nodes(40, 600)
    assert small == large and len(small) == 2, (small, large)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compile_below_every_plan(dtype):
    # A budget under every plan takes the smallest one (the split's one row, or narrow tiles),
    # chosen while tracing too.
    hidden, weight, bias, target, _, _ = _inputs(23, 7, 300, dtype)

    def f(h, w, b):
        return linear_robust_cross_entropy(h, w, target, schemes.DM(), bias=b, memory_budget=1)

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(hidden, weight, bias)
    got = torch.autograd.grad(out, (hidden, weight, bias))
    ref = f(hidden, weight, bias)
    torch.testing.assert_close(out, ref)
    for a, b in zip(got, torch.autograd.grad(ref, (hidden, weight, bias))):
        torch.testing.assert_close(a, b)


def _native_bf16(monkeypatch):
    import robustloss_fast.linear as linear

    monkeypatch.setitem(linear._CPU_FAST_16BIT, torch.bfloat16, True)
    if not linear._cpu_fast_16bit_gemm(torch.bfloat16):
        pytest.skip("this torch has no oneDNN (or it is disabled): no native bfloat16 GEMM, so products are upcast")


@pytest.mark.parametrize("scheme", [schemes.DM(), schemes.CCE()], ids=repr)
def test_one_chunk_holds_16bit_gradients_in_their_dtype(monkeypatch, scheme):
    # One chunk of every row, bfloat16 GEMMs that round their products: grad_weight is that
    # product itself, so no V x H float32 accumulator (4 MiB here; the chunk's logits are 256 KiB)
    # and no float32 grad_hidden is held.
    _native_bf16(monkeypatch)
    n, h, v = 64, 512, 2048
    hidden, weight, bias, target, _, _ = _inputs(n, h, v, torch.bfloat16)

    def step():
        out = linear_robust_cross_entropy(hidden, weight, target, scheme, bias=bias)
        return torch.autograd.grad(out, (hidden, weight, bias))

    peak, grads = peak_cpu_bytes(step)
    assert peak is not None, "this torch's profiler has no allocation events"
    held = peak - sum(g.numel() * g.element_size() for g in grads)
    assert held < v * h * 4 / 2, held
    plan = _plan(n, v, h, torch.bfloat16, "cpu", needs_h=True, needs_w=True, needs_b=True, gif=True, cap=None,
                 budget=None, chunk_size=None)
    assert plan.rows >= n and held <= plan.working_bytes + MIB, (held, plan)


def test_16bit_gradients_take_the_upstream_factor_in_float32(monkeypatch):
    # The pending factor (here the upstream gradient 0.7, not a bfloat16 number) multiplies the
    # float32 value of a gradient held in bfloat16 and is rounded once: exactly round(0.7 x the
    # unit step's gradients) with one chunk (whose own factors are 1), as a float32 copy gives;
    # a bfloat16 multiply would round 0.7 to 0.69921875 first.
    _native_bf16(monkeypatch)
    hidden, weight, bias, target, cw, sw = _inputs(64, 24, 40, torch.bfloat16)
    kw = dict(bias=bias, class_weight=cw, sample_weight=sw)
    units = torch.autograd.grad(linear_robust_cross_entropy(hidden, weight, target, schemes.DM(), **kw),
                                (hidden, weight))
    got = torch.autograd.grad(0.7 * linear_robust_cross_entropy(hidden, weight, target, schemes.DM(), **kw),
                              (hidden, weight))
    for g, u in zip(got, units):
        assert torch.equal(g, (u.float() * 0.7).bfloat16())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the GPU branch (one in-place multiply) needs a CUDA device"))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scale_16bit_multiplies_in_float32_and_rounds_once(monkeypatch, device, dtype):
    # 0.7 and per-row factors that no 16-bit number equals: exactly round(float32 product), in
    # blocks of 5 x 7 values on a CPU (7 rows of 5 and a short last block), at once on a GPU.
    import robustloss_fast.linear as linear

    monkeypatch.setattr(linear, "_SCALE_BLOCK", 35)
    g = torch.randn(23, 5, device=device).to(dtype)
    for f in (torch.tensor(0.7, device=device), torch.rand(23, 1, device=device) + 0.1):
        got = g.clone()
        linear._scale_16bit_(got, f)
        assert torch.equal(got, (g.float() * f).to(dtype)), f


def test_a_budget_that_holds_one_chunk_gets_it(monkeypatch):
    # (1024, 4096, 32000) bfloat16 on a CPU with native bfloat16 GEMMs: one chunk holds its
    # grad_weight in bfloat16 (63.5 MiB in all), several need the 500 MiB float32 sum. A budget
    # of 100 MiB takes the one chunk (3 matmuls), not a 4-matmul recompute.
    _native_bf16(monkeypatch)
    plan = _plan(1024, 32000, 4096, torch.bfloat16, "cpu", needs_h=True, needs_w=True, needs_b=False, gif=True,
                 cap=None, budget=100 * MIB, chunk_size=None)
    assert plan.gif and plan.rows == 1024 and plan.working_bytes <= 100 * MIB, plan
