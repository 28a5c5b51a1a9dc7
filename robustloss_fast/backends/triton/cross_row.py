r"""The cross-row step of SPEC §5 as one Triton kernel: ``(value, stats)`` from the row pass's ``rows``.

The same function as ``robustloss_fast._finalize.finalize`` (without its
``across`` extension for distributed shards, which stays in tensor ops), in one
launch instead of about twenty small tensor ops: at small C those launches and
their host-side cost, not the row pass, made a training step cost ~2 ms on an
H200 (benchmarks/NOTES.md). ``cross_row_kernel``: one program walks the rows
in blocks of ``BLOCK_N``, twice where the reduction needs a batch total first.
Its blocks run one after another, so at large N their load latencies add up;
there ``cross_row_partials_kernel`` (a program per block: the block's totals)
and ``cross_row_apply_kernel`` (a program per block: every block's totals
merged in one fixed order, so every program sees bitwise the same ``D``,
then its block's coefficients) do the same in two launches. Both variants
run the same block functions below (``_totals_block``, ``_merge``,
``_coefficients_block``).

Per row ``i`` (``valid``: target not ignored; ``cw_i = weight[y_i]``, 0 when
ignored; ``s_i = cw_i sample_weight_i``, or ``sample_weight_i`` alone when the
class weights already sit in the rows (label smoothing); ``counts``/``active``:
``valid and s_i != 0``):

* ``normalize=True`` (``"mean"``): the normalised weights are a softmax of
  ``log w`` over the active rows. Pass 1 keeps an online maximum ``M`` of the
  active ``log w`` and rescales two running sums to it,
  ``D = sum |s_i| exp(log w_i - M)`` and ``V = sum t_i`` with the row's value
  term ``t_i = s_i exp(log w_i - M) x_i`` (an infinite ``x_i`` whose
  ``exp`` underflowed keeps its sign and infinity, ``_finalize.normalised_term``;
  a running sum that is already infinite is never multiplied by a rescale that
  may be 0). ``value = V / D`` (0 when ``D = 0``). Pass 2 writes
  ``coef_i = s_i exp(log w_i - M) / (2 D)`` (0 for a row with no finite
  non-target logit, SPEC §3) as ``(alpha, beta, gamma) = (coef, 0, -coef)``.
* otherwise: ``value_i = s_i x_i`` (0 unless ``counts``), summed for ``"sum"``
  and divided by ``D = sum cw_i`` for ``"mean"`` (0 when ``D = 0``); the
  row's ``(alpha, beta, gamma)`` are scaled by ``s_i`` (``s_i / D`` for
  ``"mean"``, which needs pass 1 for ``D``).

Normalised, ``log D`` (``M + log D``, ``-inf`` when no row counts) goes
to ``log_den``: the fused linear layer moves each chunk's coefficients to a
running normaliser with it. Columns ``(m, ls)`` pass through. A row whose ``ls`` is ``+inf`` is the row
kernel's mark of a bad target; ``good`` (one int32) is 1 when there is none,
and the caller hands it to ``torch._assert_async``: one more launch, no host
synchronisation.
"""

import triton
import triton.language as tl


@triton.jit
def _scale_of_row(rows, target_ptr, w_ptr, sw_ptr, ignore_index, HAS_W: tl.constexpr, HAS_SW: tl.constexpr,
                  WEIGHT_IN_ROWS: tl.constexpr):
    """(valid, s, cw) of the rows ``rows`` (a block of row indices, -1 past the end: not valid).

    ``w_ptr`` and ``sw_ptr`` point at accumulator-type buffers (the rows
    themselves when absent), so their element type is the arithmetic's.
    """
    acc = w_ptr.dtype.element_ty
    y = tl.load(target_ptr + rows, mask=rows >= 0, other=ignore_index)
    valid = y != ignore_index
    y_safe = tl.where(valid, y, 0)
    one = tl.where(valid, 1.0, 0.0).to(acc)
    if HAS_W:
        cw = tl.load(w_ptr + y_safe, mask=valid, other=0.0)
    else:
        cw = one
    if WEIGHT_IN_ROWS:
        s = one
    else:
        s = cw
    if HAS_SW:
        s = s * tl.load(sw_ptr + rows, mask=valid, other=0.0)
    return valid, s, cw


@triton.jit
def _merge(run_max, den, num, blk_max, blk_den, blk_num, NORMALISED: tl.constexpr):
    """Running totals merged with a block's (each relative to its own maximum of log w when normalised).

    A running maximum of -inf has summed nothing but zeros (or NaN, which stays
    NaN); an infinite sum is never multiplied by a rescale that may be 0."""
    if NORMALISED:
        new_max = tl.maximum(run_max, blk_max)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.where(run_max == float("-inf"), 0.0, tl.exp(run_max - shift))
        blk_scale = tl.where(blk_max == float("-inf"), 0.0, tl.exp(blk_max - shift))
        den = den * rescale + blk_den * blk_scale
        num = tl.where(tl.abs(num) == float("inf"), num, num * rescale)
        num += tl.where(tl.abs(blk_num) == float("inf"), blk_num, blk_num * blk_scale)
        return new_max, den, num
    return run_max, den + blk_den, num + blk_num


@triton.jit
def _totals_block(rows, rows_ptr, target_ptr, w_ptr, sw_ptr, value_ptr, stats_ptr, n_rows, ignore_index,
                  NORMALISED: tl.constexpr, REDUCTION: tl.constexpr, HAS_W: tl.constexpr, HAS_SW: tl.constexpr,
                  WEIGHT_IN_ROWS: tl.constexpr):
    """The totals of the block of rows ``rows``: (max log w, D, V) relative to that maximum when
    normalised, else (-inf, sum cw, sum s x); and its count of bad-target rows. Where no batch total
    is needed ("none" and "sum" unnormalised) it also writes the rows' values and stats."""
    acc = rows_ptr.dtype.element_ty
    in_range = rows < n_rows
    r = rows_ptr + rows * 7
    ls = tl.load(r + 1, mask=in_range, other=0.0)
    bad = tl.sum((in_range & (ls == float("inf"))).to(tl.int32), axis=0)
    valid, s, cw = _scale_of_row(tl.where(in_range, rows, -1), target_ptr, w_ptr, sw_ptr, ignore_index,
                                 HAS_W, HAS_SW, WEIGHT_IN_ROWS)  # fmt: skip
    counts = in_range & valid & (s != 0)
    x = tl.load(r + 3, mask=in_range, other=0.0)
    if NORMALISED:
        lw = tl.load(r + 2, mask=in_range, other=float("-inf"))
        blk_max = tl.max(tl.where(counts, lw, float("-inf")), axis=0)
        shift = tl.where(blk_max == float("-inf"), 0.0, blk_max)
        e = tl.where(counts, tl.exp(lw - shift), 0.0)
        den = tl.sum(tl.abs(s) * e, axis=0)
        # An infinite x whose exp underflowed keeps its sign and infinity (_finalize.normalised_term).
        keep = (tl.abs(x) == float("inf")) & (lw > float("-inf")) & (e == 0)
        term = tl.where(keep, tl.where(s > 0, x, -x), s * e * x)
        num = tl.sum(tl.where(counts, term, 0.0), axis=0)
    else:
        blk_max = tl.full([], float("-inf"), acc)
        sx = tl.where(counts, s * x, 0.0)
        if REDUCTION == 0:
            tl.store(value_ptr + rows, sx, mask=in_range)
        num = tl.sum(sx, axis=0)
        den = tl.sum(cw, axis=0)
        if REDUCTION != 1:  # "none" and "sum": the row's scale is s_i, known now
            st = stats_ptr + rows * 5
            tl.store(st, tl.load(r, mask=in_range, other=0.0), mask=in_range)
            tl.store(st + 1, ls, mask=in_range)
            for k in tl.static_range(3):
                col = tl.load(r + 4 + k, mask=in_range, other=0.0)
                tl.store(st + 2 + k, tl.where(counts, s * col, 0.0), mask=in_range)
    return blk_max, den, num, bad


@triton.jit
def _store_totals(value_ptr, log_den_ptr, run_max, den, num, NORMALISED: tl.constexpr, REDUCTION: tl.constexpr):
    """The batch value (and log D) from the merged totals."""
    ok = den != 0
    safe = tl.where(ok, den, 1.0)
    if NORMALISED:
        tl.store(value_ptr, tl.where(ok, num / safe, 0.0))
        # log D = M + log(sum |s| exp(log w - M)), -inf when no row counts (log 0).
        tl.store(log_den_ptr, tl.where(run_max == float("-inf"), 0.0, run_max) + tl.log(den))
    elif REDUCTION == 2:
        tl.store(value_ptr, num)
    elif REDUCTION == 1:
        tl.store(value_ptr, tl.where(ok, num / safe, 0.0))


@triton.jit
def _coefficients_block(rows, rows_ptr, target_ptr, w_ptr, sw_ptr, stats_ptr, n_rows, ignore_index, run_max, den,
                        NORMALISED: tl.constexpr, HAS_W: tl.constexpr, HAS_SW: tl.constexpr,
                        WEIGHT_IN_ROWS: tl.constexpr):
    """The stats of the block of rows ``rows`` from the batch totals (normalised, or "mean")."""
    ok = den != 0
    safe = tl.where(ok, den, 1.0)
    shift = tl.where(run_max == float("-inf"), 0.0, run_max)
    in_range = rows < n_rows
    r = rows_ptr + rows * 7
    valid, s, cw = _scale_of_row(tl.where(in_range, rows, -1), target_ptr, w_ptr, sw_ptr, ignore_index,
                                 HAS_W, HAS_SW, WEIGHT_IN_ROWS)  # fmt: skip
    counts = in_range & valid & (s != 0)
    m_row = tl.load(r, mask=in_range, other=0.0)
    st = stats_ptr + rows * 5
    tl.store(st, m_row, mask=in_range)
    tl.store(st + 1, tl.load(r + 1, mask=in_range, other=0.0), mask=in_range)
    if NORMALISED:
        lw = tl.load(r + 2, mask=in_range, other=float("-inf"))
        e = tl.where(counts, tl.exp(lw - shift), 0.0)
        coef = tl.where(counts & (m_row != float("-inf")), s * e / (2 * safe), 0.0)
        coef = tl.where(ok, coef, 0.0)
        tl.store(st + 2, coef, mask=in_range)
        tl.store(st + 3, tl.zeros_like(coef), mask=in_range)
        tl.store(st + 4, -coef, mask=in_range)
    else:
        scale = tl.where(ok, s / safe, 0.0)
        for k in tl.static_range(3):
            col = tl.load(r + 4 + k, mask=in_range, other=0.0)
            tl.store(st + 2 + k, tl.where(counts, scale * col, 0.0), mask=in_range)


@triton.jit
def cross_row_kernel(
    rows_ptr,
    target_ptr,
    w_ptr,
    sw_ptr,
    value_ptr,
    stats_ptr,
    good_ptr,
    log_den_ptr,
    n_rows,
    ignore_index,
    NORMALISED: tl.constexpr,
    REDUCTION: tl.constexpr,  # 0 none, 1 mean, 2 sum
    HAS_W: tl.constexpr,
    HAS_SW: tl.constexpr,
    WEIGHT_IN_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program: ``value`` ((N,) for "none", else one element) and ``stats`` (N, 5) from ``rows`` (N, 7)."""
    acc = rows_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK_N).to(tl.int64)
    run_max = tl.full([], float("-inf"), acc)
    den = tl.zeros([], acc)
    num = tl.zeros([], acc)
    bad = tl.zeros([], tl.int32)
    # Pass 1: the batch totals (and, where no total is needed, everything).
    for start in range(0, n_rows, BLOCK_N):
        blk_max, blk_den, blk_num, blk_bad = _totals_block(
            start + offs, rows_ptr, target_ptr, w_ptr, sw_ptr, value_ptr, stats_ptr, n_rows, ignore_index,
            NORMALISED, REDUCTION, HAS_W, HAS_SW, WEIGHT_IN_ROWS)  # fmt: skip
        run_max, den, num = _merge(run_max, den, num, blk_max, blk_den, blk_num, NORMALISED)
        bad += blk_bad
    tl.store(good_ptr, (bad == 0).to(tl.int32))
    _store_totals(value_ptr, log_den_ptr, run_max, den, num, NORMALISED, REDUCTION)
    # Pass 2: the rows' coefficients, where they needed a batch total.
    if NORMALISED or REDUCTION == 1:
        for start in range(0, n_rows, BLOCK_N):
            _coefficients_block(start + offs, rows_ptr, target_ptr, w_ptr, sw_ptr, stats_ptr, n_rows, ignore_index,
                                run_max, den, NORMALISED, HAS_W, HAS_SW, WEIGHT_IN_ROWS)  # fmt: skip


@triton.jit
def cross_row_partials_kernel(
    rows_ptr,
    target_ptr,
    w_ptr,
    sw_ptr,
    value_ptr,
    stats_ptr,
    part_ptr,
    n_rows,
    ignore_index,
    NORMALISED: tl.constexpr,
    REDUCTION: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_SW: tl.constexpr,
    WEIGHT_IN_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Program ``b``: the totals of rows ``[b BLOCK_N, (b + 1) BLOCK_N)`` into ``part[b]`` =
    (max log w, D, V, bad-target count), as ``cross_row_kernel``'s pass 1 makes them for that block."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    blk_max, den, num, bad = _totals_block(rows, rows_ptr, target_ptr, w_ptr, sw_ptr, value_ptr, stats_ptr, n_rows,
                                           ignore_index, NORMALISED, REDUCTION, HAS_W, HAS_SW, WEIGHT_IN_ROWS)
    p = part_ptr + pid * 4
    tl.store(p, blk_max)
    tl.store(p + 1, den)
    tl.store(p + 2, num)
    tl.store(p + 3, bad.to(part_ptr.dtype.element_ty))


@triton.jit
def cross_row_apply_kernel(
    rows_ptr,
    target_ptr,
    w_ptr,
    sw_ptr,
    value_ptr,
    stats_ptr,
    good_ptr,
    log_den_ptr,
    part_ptr,
    n_parts,
    n_rows,
    ignore_index,
    NORMALISED: tl.constexpr,
    REDUCTION: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_SW: tl.constexpr,
    WEIGHT_IN_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Program ``b``: every block's totals merged, ``BLOCK_P`` at a time in one fixed order (the same in
    every program); program 0 writes the value, log D and the targets' flag; every program then writes
    its block's stats where they need the totals."""
    acc = rows_ptr.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_P).to(tl.int64)
    run_max = tl.full([], float("-inf"), acc)
    den = tl.zeros([], acc)
    num = tl.zeros([], acc)
    bad = tl.zeros([], acc)
    for start in range(0, n_parts, BLOCK_P):
        idx = start + offs
        live = idx < n_parts
        p = part_ptr + idx * 4
        pm = tl.load(p, mask=live, other=float("-inf"))
        pd = tl.load(p + 1, mask=live, other=0.0)
        pn = tl.load(p + 2, mask=live, other=0.0)
        bad += tl.sum(tl.load(p + 3, mask=live, other=0.0), axis=0)
        if NORMALISED:
            blk_max = tl.max(pm, axis=0)
            shift = tl.where(blk_max == float("-inf"), 0.0, blk_max)
            scale = tl.where(pm == float("-inf"), 0.0, tl.exp(pm - shift))
            blk_den = tl.sum(pd * scale, axis=0)
            blk_num = tl.sum(tl.where(tl.abs(pn) == float("inf"), pn, pn * scale), axis=0)
        else:
            blk_max = tl.full([], float("-inf"), acc)
            blk_den = tl.sum(pd, axis=0)
            blk_num = tl.sum(pn, axis=0)
        run_max, den, num = _merge(run_max, den, num, blk_max, blk_den, blk_num, NORMALISED)
    if pid == 0:
        tl.store(good_ptr, (bad == 0).to(tl.int32))
        _store_totals(value_ptr, log_den_ptr, run_max, den, num, NORMALISED, REDUCTION)
    if NORMALISED or REDUCTION == 1:
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        _coefficients_block(rows, rows_ptr, target_ptr, w_ptr, sw_ptr, stats_ptr, n_rows, ignore_index, run_max, den,
                            NORMALISED, HAS_W, HAS_SW, WEIGHT_IN_ROWS)  # fmt: skip
