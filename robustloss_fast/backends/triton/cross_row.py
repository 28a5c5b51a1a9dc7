r"""The cross-row step of SPEC §5 as one Triton kernel: ``(value, stats)`` from the row pass's ``rows``.

The same function as ``robustloss_fast._finalize.finalize`` (without its
``across`` extension for distributed shards, which stays in tensor ops), in one
launch instead of about twenty small tensor ops: at small C those launches and
their host-side cost, not the row pass, made a training step cost ~2 ms on an
H200 (benchmarks/NOTES.md). One program walks the rows in blocks of
``BLOCK_N``, twice where the reduction needs a batch total first.

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
    zero = tl.zeros([BLOCK_N], acc)
    bad = tl.zeros([BLOCK_N], tl.int32)
    run_max = tl.full([], float("-inf"), acc)
    den = tl.zeros([], acc)
    num = tl.zeros([], acc)

    # Pass 1: the batch totals (and, where no total is needed, everything).
    for start in range(0, n_rows, BLOCK_N):
        rows = start + offs
        in_range = rows < n_rows
        r = rows_ptr + rows * 7
        ls = tl.load(r + 1, mask=in_range, other=0.0)
        bad += (in_range & (ls == float("inf"))).to(tl.int32)
        valid, s, cw = _scale_of_row(tl.where(in_range, rows, -1), target_ptr, w_ptr, sw_ptr, ignore_index,
                                     HAS_W, HAS_SW, WEIGHT_IN_ROWS)  # fmt: skip
        counts = in_range & valid & (s != 0)
        x = tl.load(r + 3, mask=in_range, other=0.0)
        if NORMALISED:
            lw = tl.load(r + 2, mask=in_range, other=float("-inf"))
            new_max = tl.maximum(run_max, tl.max(tl.where(counts, lw, float("-inf")), axis=0))
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            # A running max of -inf has summed nothing but zeros (or NaN, which stays NaN).
            rescale = tl.where(run_max == float("-inf"), 0.0, tl.exp(run_max - shift))
            e = tl.where(counts, tl.exp(lw - shift), 0.0)
            den = den * rescale + tl.sum(tl.abs(s) * e, axis=0)
            keep = (tl.abs(x) == float("inf")) & (lw > float("-inf")) & (e == 0)
            term = tl.where(keep, tl.where(s > 0, x, -x), s * e * x)
            num = tl.where(tl.abs(num) == float("inf"), num, num * rescale)
            num += tl.sum(tl.where(counts, term, 0.0), axis=0)
            run_max = new_max
        else:
            sx = tl.where(counts, s * x, 0.0)
            if REDUCTION == 0:
                tl.store(value_ptr + rows, sx, mask=in_range)
            else:
                num += tl.sum(sx, axis=0)
            den += tl.sum(cw, axis=0)
            if REDUCTION != 1:  # "none" and "sum": the row's scale is s_i, known now
                st = stats_ptr + rows * 5
                tl.store(st, tl.load(r, mask=in_range, other=0.0), mask=in_range)
                tl.store(st + 1, ls, mask=in_range)
                for k in tl.static_range(3):
                    col = tl.load(r + 4 + k, mask=in_range, other=0.0)
                    tl.store(st + 2 + k, tl.where(counts, s * col, zero), mask=in_range)
    tl.store(good_ptr, (tl.sum(bad, axis=0) == 0).to(tl.int32))

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

    # Pass 2: the rows' coefficients, where they needed a batch total.
    if NORMALISED or REDUCTION == 1:
        shift = tl.where(run_max == float("-inf"), 0.0, run_max)
        for start in range(0, n_rows, BLOCK_N):
            rows = start + offs
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
                tl.store(st + 3, zero, mask=in_range)
                tl.store(st + 4, -coef, mask=in_range)
            else:
                scale = tl.where(ok, s / safe, 0.0)
                for k in tl.static_range(3):
                    col = tl.load(r + 4 + k, mask=in_range, other=0.0)
                    tl.store(st + 2 + k, tl.where(counts, scale * col, zero), mask=in_range)
