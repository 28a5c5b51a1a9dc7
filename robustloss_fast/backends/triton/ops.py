"""Launch the Triton kernels and register them as ``robustloss::triton_*`` ops.

Ops (same contract as the C++ ``robust_ce_*`` ops, see ``robustloss_fast/backends/compiled.py``):

``robustloss::triton_rows(logits, target, scheme, a, b, smooth_weight?, ignore_index, normalised) -> rows``
    the row pass alone: ``(N, 7) = (m, ls, log w, x, alpha, beta, gamma)``, ``lse_nt = m + ls``;
    ``smooth_weight`` is ``u`` of label smoothing and NCE (all 1 when None).
    NFL (``Kernel.NFL``) writes ``lse`` in columns 0-1 instead of ``lse_nt`` (P-form).
``robustloss::triton_forward(logits, target, scheme, a, b, weight?, sample_weight?,
ignore_index, reduction, normalize) -> (value, stats)``
    the row pass, then the cross-row step in one more kernel (``cross_row.py``:
    ``_finalize.finalize``'s function in one launch); differentiable, with the
    SPEC gradient. ``stats`` is ``(N, 5) =
    (m, ls, alpha, beta, gamma)`` (``lse`` first for NFL); for label smoothing
    (``Kernel.CCE_LS``) ``weight`` is also the rows' ``smooth_weight``, as in ``F.cross_entropy``.
``robustloss::triton_backward(grad, logits, target, stats, smooth_weight?, ignore_index, scheme, a) -> grad_logits``
    ``g_i (alpha_i r_ij + beta_i u_j)`` off the target, ``g_i gamma_i`` at it;
    ``scheme`` and ``a`` are the forward's: for NFL the stats are in
    P-form and the off-target entries are ``g_i (alpha_i P_ij + beta_i h_a(P_ij))``.
``robustloss::triton_backward_(logits, grad, target, stats, smooth_weight?, ignore_index, scheme, a) -> ()``
    the same, written over ``logits`` (contiguous): each program loads its
    tile of logits before it stores the tile's gradient.
``robustloss::triton_scale_(src, f, out) -> ()``
    ``out = src * f`` in float32, rounded once to ``out``'s dtype (``scale.py``):
    ``f`` a 0-dim factor or one per row of ``src`` (rows of ``src.shape[-1]``);
    the fused linear layer's stored gradients.

Registration. On a GPU the ops are ``torch.library.triton_op``s launching through
``wrap_triton``, so ``torch.compile`` sees the kernels themselves. Under the
Triton interpreter (``TRITON_INTERPRET=1``, CPU tensors) that path cannot be
traced: ``wrap_triton`` hands back the raw interpreted kernel, and tracing with
fake tensors then runs it on them ("Cannot access data pointer of Tensor",
torch 2.13 / Triton 3.9). There the same functions are registered as opaque
``torch.library.custom_op``s with explicit fake kernels, which
``torch.compile(fullgraph=True)`` handles as well. Both share one body and one
autograd rule.
"""

import struct
from typing import Optional, Tuple

import torch
import triton
from torch.library import wrap_triton

from ..._common import (
    BAD_TARGET_ASSERT_MSG,
    NORMALIZE_TWO_TERM_MSG,
    ROW_COLS,
    STAT_COLS,
    Kernel,
    KernelSpec,
    Reduction,
    RowCol,
    acc_dtype,
    check_target,
)
from . import cross_row, kernels, scale

NS = "robustloss"

# Tile shapes. A row pass program reads at most MAX_BLOCK_C columns per chunk
# and loops over wider rows; narrow rows are packed several per program, up to
# SMALL_TILE elements and MAX_BLOCK_N rows. The backward pass uses a 2-D grid
# of (rows x BACKWARD_BLOCK_C column) tiles, so large C still spreads over
# many programs. Tests lower MAX_BLOCK_C / BACKWARD_BLOCK_C to force the
# chunked path on small C.
# The row pass's 8192 columns on at most 8 warps (32 logits a thread, no
# spills) were timed on an H200 (benchmarks/triton_tiles.py, NOTES.md): its
# forward at 16384 x 128256 bf16 took 1.29 ms against 1.79 ms at the old 32768
# columns on 32 warps, which spilled loop invariants. Other backward tiles
# moved that step by under 2%.
MAX_BLOCK_C = 8192
ROWS_MAX_WARPS = 8
BACKWARD_BLOCK_C = 4096
SMALL_TILE = 4096
MAX_BLOCK_N = 64


def _num_warps(tile: int) -> int:
    if tile >= 16384:
        return 32
    if tile >= 8192:
        return 16
    if tile >= 2048:
        return 8
    return 4


def _tile(n: int, c: int, max_block_c: int) -> Tuple[int, int, int]:
    """(BLOCK_N, BLOCK_C, num_warps) for an n x c problem."""
    block_c = min(triton.next_power_of_2(c), max_block_c)
    block_n = max(1, min(SMALL_TILE // block_c, MAX_BLOCK_N, triton.next_power_of_2(max(n, 1))))
    return block_n, block_c, _num_warps(block_n * block_c)


def _rows_tile(n: int, c: int) -> Tuple[int, int, int]:
    """The row pass's (BLOCK_N, BLOCK_C, num_warps): at most MAX_BLOCK_C columns on ROWS_MAX_WARPS warps."""
    block_n, block_c, warps = _tile(n, c, MAX_BLOCK_C)
    return block_n, block_c, min(warps, ROWS_MAX_WARPS)


def _backward_tile(n: int, c: int) -> Tuple[int, int, int]:
    """The backward's (BLOCK_N, BLOCK_C, num_warps): tiles of at most BACKWARD_BLOCK_C columns."""
    return _tile(n, c, BACKWARD_BLOCK_C)


def _split(v: float) -> Tuple[float, float]:
    """v as hi + lo, both float32-representable (Triton passes float arguments as float32)."""
    v = float(v)
    try:
        hi = struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:  # beyond float32: the kernel sees +-inf, as a float32 computation would
        return (float("inf") if v > 0 else float("-inf")), 0.0
    lo = struct.unpack("f", struct.pack("f", v - hi))[0]
    return hi, lo


def _is_real(t: torch.Tensor) -> bool:
    """False while the op is traced with fake tensors (torch.compile, make_fx)."""
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(t)


def _check_targets_here(target: torch.Tensor, num_classes: int, ignore_index: int) -> None:
    """CPU tensors (the interpreter): the host check is free, and names the value (IndexError)."""
    if target.device.type == "cpu" and _is_real(target):
        check_target(target, num_classes, ignore_index)


def _assert_targets_on_device(rows: torch.Tensor) -> None:
    """A bad target stops the stream with a device-side assertion, as F.cross_entropy does.

    The row kernel marks such a row with ``ls = +inf`` (no valid row has it:
    ``ls`` lies in ``[0, log C]`` or is NaN). The assertion is queued like a
    kernel, so the host never waits for it; it fires before anything reads
    the row's class weight.
    """
    if rows.device.type != "cpu" and rows.shape[0] > 0:
        bad = rows[:, RowCol.LS] == float("inf")
        torch._assert_async(~bad.any(), BAD_TARGET_ASSERT_MSG)


def _kernel(scheme: int, normalised: bool) -> Kernel:
    """The op's scheme argument as a Kernel, refusing unknown ids and normalised two-term schemes."""
    try:
        kernel = Kernel(scheme)
    except ValueError:
        raise ValueError(f"unknown scheme kernel id {scheme} (expected 0..{len(Kernel) - 1})") from None
    if normalised and kernel.two_term:
        raise ValueError(NORMALIZE_TWO_TERM_MSG)
    return kernel


def _smooth_weight(u: Optional[torch.Tensor], logits: torch.Tensor) -> Optional[torch.Tensor]:
    """u in the accumulator type, contiguous (the kernels read C entries of it)."""
    if u is None:
        return None
    if u.shape != (logits.shape[1],):
        raise ValueError(f"smooth_weight must have shape ({logits.shape[1]},), got {tuple(u.shape)}")
    return u.to(device=logits.device, dtype=acc_dtype(logits.dtype)).contiguous()


def _rows_impl(logits, target, scheme, a, b, smooth_weight, ignore_index, normalised):
    n, c = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    target = target.contiguous()
    rows = torch.empty((n, ROW_COLS), dtype=acc_dtype(logits.dtype), device=logits.device)
    if n == 0:
        return rows
    kernel = Kernel(scheme)
    # u matters to label smoothing and NCE only (their spread): the others get no extra
    # specialisation (NFL has no spread; its u, like the C++ op's, is checked and unused).
    u = _smooth_weight(smooth_weight, logits) if kernel.two_term else None
    u = u if kernel.needs_spread else None
    block_n, block_c, warps = _rows_tile(n, c)
    a_hi, a_lo = _split(a)
    b_hi, b_lo = _split(b)
    wrap_triton(kernels.rows_kernel)[(triton.cdiv(n, block_n),)](
        logits,
        target,
        rows if u is None else u,  # never read without HAS_U
        rows,
        n,
        c,
        logits.stride(0),
        ignore_index,
        a_hi,
        a_lo,
        b_hi,
        b_lo,
        SCHEME=scheme,
        SPREAD=kernel.needs_spread,
        P_FORM=kernel.p_form,
        NORMALISED=normalised,
        HAS_U=u is not None,
        BLOCK_N=block_n,
        BLOCK_C=block_c,
        num_warps=warps,
    )
    return rows


def triton_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    scheme: int,
    a: float,
    b: float,
    smooth_weight: Optional[torch.Tensor],
    ignore_index: int,
    normalised: bool,
) -> torch.Tensor:
    _kernel(scheme, normalised)
    _check_targets_here(target, logits.shape[1], ignore_index)
    rows = _rows_impl(logits, target, scheme, a, b, smooth_weight, ignore_index, normalised)
    _assert_targets_on_device(rows)
    return rows


def triton_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    scheme: int,
    a: float,
    b: float,
    weight: Optional[torch.Tensor],
    sample_weight: Optional[torch.Tensor],
    ignore_index: int,
    reduction: int,
    normalize: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    if reduction not in (0, 1, 2):
        raise ValueError(f"reduction must be 0 (none), 1 (mean) or 2 (sum), got {reduction}")
    spec = KernelSpec(_kernel(scheme, False), a, b, 1.0, Reduction(reduction), normalize, ignore_index)
    _kernel(scheme, spec.normalised)
    _check_targets_here(target, logits.shape[1], ignore_index)
    rows = _rows_impl(logits, target, scheme, a, b, spec.smooth_weight(weight), ignore_index, spec.normalised)
    return _cross_row(rows, target.contiguous(), spec, weight, sample_weight)


# Rows per block of the one-program cross-row kernel. Its two passes are loops
# of dependent blocks of up to CROSS_ROW_BLOCK rows, so at large N the latency
# of each block's loads adds up; at the rows it takes (up to 1024: one block,
# 4 warps) there is one iteration a pass. Above
# CROSS_ROW_ONE_PROGRAM_MAX rows the two-kernel version runs instead (a program
# per CROSS_ROW_PARALLEL_BLOCK rows, then a program per block merging every
# block's totals, CROSS_ROW_MERGE_BLOCK at a time): one launch more, no loop of
# dependent blocks. Timed in a CUDA graph on an H200 (benchmarks/NOTES.md): the
# one program 6 us at 1024 rows, 16 at 4096, 31 at 8192; the two kernels 7-8 us
# at 8193-65536 rows, so the one program keeps only batches up to 1024 rows.
CROSS_ROW_BLOCK = 4096
CROSS_ROW_ONE_PROGRAM_MAX = 1024
CROSS_ROW_PARALLEL_BLOCK = 1024
CROSS_ROW_MERGE_BLOCK = 1024


def _cross_row(rows, target, spec: KernelSpec, weight, sample_weight, *, assert_targets=True, log_denominator=False):
    """(value, stats[, log D]) of ``_finalize.finalize`` in one launch (``cross_row.py``), and the
    bad-target assertion (``assert_targets=False`` where the rows op has made it already)."""
    if log_denominator and not spec.normalised:
        raise ValueError("log_denominator is defined for derivative-normalised specs only")
    n, acc = rows.shape[0], rows.dtype
    value = torch.empty((n,) if spec.reduction == Reduction.NONE else (), dtype=acc, device=rows.device)
    stats = torch.empty((n, STAT_COLS), dtype=acc, device=rows.device)
    good = torch.empty((), dtype=torch.int32, device=rows.device)
    log_den = torch.empty((), dtype=acc, device=rows.device)
    w = None if weight is None else weight.to(acc).contiguous()
    sw = None if sample_weight is None else sample_weight.to(acc).contiguous()
    w_arg = rows if w is None else w  # never read without HAS_W / HAS_SW
    sw_arg = rows if sw is None else sw
    flags = dict(NORMALISED=spec.normalised, REDUCTION=int(spec.reduction), HAS_W=w is not None,
                 HAS_SW=sw is not None, WEIGHT_IN_ROWS=spec.weight_in_rows)  # fmt: skip
    if n <= CROSS_ROW_ONE_PROGRAM_MAX:
        block = min(CROSS_ROW_BLOCK, triton.next_power_of_2(max(n, 1)))
        wrap_triton(cross_row.cross_row_kernel)[(1,)](
            rows, target, w_arg, sw_arg, value, stats, good, log_den, n, spec.ignore_index, **flags,
            BLOCK_N=block, num_warps=8 if block >= 2048 else 4,
        )  # fmt: skip
    else:
        block = CROSS_ROW_PARALLEL_BLOCK
        parts = triton.cdiv(n, block)
        part = torch.empty((parts, 4), dtype=acc, device=rows.device)
        warps = 8 if block >= 2048 else 4
        wrap_triton(cross_row.cross_row_partials_kernel)[(parts,)](
            rows, target, w_arg, sw_arg, value, stats, part, n, spec.ignore_index, **flags,
            BLOCK_N=block, num_warps=warps,
        )  # fmt: skip
        wrap_triton(cross_row.cross_row_apply_kernel)[(parts,)](
            rows, target, w_arg, sw_arg, value, stats, good, log_den, part, parts, n, spec.ignore_index, **flags,
            BLOCK_N=block, BLOCK_P=min(CROSS_ROW_MERGE_BLOCK, triton.next_power_of_2(parts)), num_warps=warps,
        )  # fmt: skip
    if assert_targets and rows.device.type != "cpu":
        # A bad target stops the stream with a device-side assertion, as F.cross_entropy does;
        # queued like a kernel, so the host never waits (CPU tensors raised IndexError already).
        torch._assert_async(good, BAD_TARGET_ASSERT_MSG)
    return (value, stats, log_den) if log_denominator else (value, stats)


def _launch_backward(grad, logits, target, stats, smooth_weight, ignore_index, scheme, a, out) -> None:
    """The backward kernel over ``logits`` into ``out`` (contiguous (n, c); may be ``logits`` itself)."""
    n, c = logits.shape
    if n == 0:
        return
    target = target.contiguous()
    stats = stats.to(acc_dtype(logits.dtype)).contiguous()
    grad = grad.to(stats.dtype)
    p_form = Kernel(scheme).p_form
    u = _smooth_weight(smooth_weight, logits)
    # NFL's gradient has no u term (the C++ op ignores a smooth_weight there too).
    u = None if p_form else u
    block_n, block_c, warps = _backward_tile(n, c)
    # The focal gamma, read by the P-form kernel only (the others get 0, 0).
    a_hi, a_lo = _split(a) if p_form else (0.0, 0.0)
    wrap_triton(kernels.backward_kernel)[(triton.cdiv(n, block_n), triton.cdiv(c, block_c))](
        grad,
        0 if grad.dim() == 0 else grad.stride(0),
        logits,
        target,
        stats,
        stats if u is None else u,  # never read without HAS_U
        out,
        n,
        c,
        logits.stride(0),
        ignore_index,
        a_hi,
        a_lo,
        P_FORM=p_form,
        HAS_U=u is not None,
        BLOCK_N=block_n,
        BLOCK_C=block_c,
        num_warps=warps,
    )


def triton_backward(
    grad: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    stats: torch.Tensor,
    smooth_weight: Optional[torch.Tensor],
    ignore_index: int,
    scheme: int,
    a: float,
) -> torch.Tensor:
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _launch_backward(grad, logits, target, stats, smooth_weight, ignore_index, scheme, a, out)
    return out


def triton_backward_(
    logits: torch.Tensor,
    grad: torch.Tensor,
    target: torch.Tensor,
    stats: torch.Tensor,
    smooth_weight: Optional[torch.Tensor],
    ignore_index: int,
    scheme: int,
    a: float,
) -> None:
    if logits.dim() != 2 or not logits.is_contiguous():
        raise ValueError(
            f"the in-place backward needs contiguous 2-D logits, got shape {tuple(logits.shape)} "
            f"and strides {logits.stride()}"
        )
    _launch_backward(grad, logits, target, stats, smooth_weight, ignore_index, scheme, a, logits)


SCALE_BLOCK = 4096
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_scale_(src: torch.Tensor, f: torch.Tensor, out: torch.Tensor) -> None:
    if src.shape != out.shape or not (src.is_contiguous() and out.is_contiguous()):
        raise ValueError(f"scale: src and out must be contiguous and of one shape, got {tuple(src.shape)} "
                         f"and {tuple(out.shape)}")  # fmt: skip
    if src.dtype not in _SCALE_DTYPES or out.dtype not in _SCALE_DTYPES or f.dtype != torch.float32:
        raise ValueError(f"scale: src and out must be float16, bfloat16 or float32 and f float32, got "
                         f"{src.dtype}, {out.dtype} and {f.dtype}")  # fmt: skip
    n_cols = src.shape[-1] if src.dim() else 1
    per_row = f.numel() != 1
    if per_row and (n_cols == 0 or f.numel() * n_cols != src.numel()):
        raise ValueError(f"scale: f must hold one value, or one per row of {n_cols}, got {f.numel()} for "
                         f"{src.numel()} values")  # fmt: skip
    if src.numel() == 0:
        return
    wrap_triton(scale.scale_kernel)[(triton.cdiv(src.numel(), SCALE_BLOCK),)](
        src,
        f.contiguous(),
        out,
        src.numel(),
        n_cols,
        PER_ROW=per_row,
        SKIP_ONE=src is out,  # in place: a factor of 1 leaves it as it is
        BLOCK=SCALE_BLOCK,
        num_warps=8,
    )


# ---- fake kernels (used only where the ops are opaque custom_ops) ----


def _rows_fake(logits, target, scheme, a, b, smooth_weight, ignore_index, normalised):
    return logits.new_empty((logits.shape[0], ROW_COLS), dtype=acc_dtype(logits.dtype))


def _forward_fake(logits, target, scheme, a, b, weight, sample_weight, ignore_index, reduction, normalize):
    acc = acc_dtype(logits.dtype)
    n = logits.shape[0]
    value = logits.new_empty((n,) if reduction == 0 else (), dtype=acc)
    return value, logits.new_empty((n, STAT_COLS), dtype=acc)


def _backward_fake(grad, logits, target, stats, smooth_weight, ignore_index, scheme, a):
    return logits.new_empty(logits.shape)


def _backward_inplace_fake(logits, grad, target, stats, smooth_weight, ignore_index, scheme, a):
    return None


def _scale_fake(src, f, out):
    return None


def _register(name, fn, fake, mutates_args=()):
    qualname = f"{NS}::{name}"
    if kernels.INTERPRETED:
        op = torch.library.custom_op(qualname, fn, mutates_args=mutates_args)
        op.register_fake(fake)
        return op
    return torch.library.triton_op(qualname, fn, mutates_args=mutates_args)  # pragma: no cover - needs a GPU


rows_op = _register("triton_rows", triton_rows, _rows_fake)
forward_op = _register("triton_forward", triton_forward, _forward_fake)
backward_op = _register("triton_backward", triton_backward, _backward_fake)
backward_inplace_op = _register("triton_backward_", triton_backward_, _backward_inplace_fake, mutates_args=("logits",))
scale_op = _register("triton_scale_", triton_scale_, _scale_fake, mutates_args=("out",))


def _setup_context(ctx, inputs, output):
    logits, target, scheme, weight = inputs[0], inputs[1], inputs[2], inputs[5]
    # Label smoothing's second gradient term points along the class weights.
    smooth_weight = weight if Kernel(scheme).weight_in_rows else None
    ctx.save_for_backward(logits, target, output[1], smooth_weight)
    # The backward reads NFL's stats in P-form and needs its focal gamma (= a).
    ctx.ignore_index, ctx.scheme, ctx.a = inputs[7], scheme, inputs[3]
    # The stats take no gradient: autograd would otherwise fill an (N, 5) tensor of zeros
    # for them every step (one more launch on a GPU).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_value, _grad_stats):
    if torch.is_grad_enabled():
        raise RuntimeError("robustloss: double backward (create_graph=True) is not supported")
    # The SPEC gradient (weights detached, SPEC §3), not autograd through the rows.
    logits, target, stats, smooth_weight = ctx.saved_tensors
    if grad_value is None:  # only the stats reached the loss: they carry no gradient
        return (None,) * 10
    grad_logits = backward_op(grad_value, logits, target, stats, smooth_weight, ctx.ignore_index, ctx.scheme, ctx.a)
    return grad_logits, None, None, None, None, None, None, None, None, None


forward_op.register_autograd(_backward, setup_context=_setup_context)


def _loss(logits, target, spec: KernelSpec, weight, sample_weight):
    value, _ = forward_op(
        logits, target, int(spec.kernel), float(spec.a), float(spec.b), weight, sample_weight,
        int(spec.ignore_index), int(spec.reduction), bool(spec.normalize),
    )  # fmt: skip
    return value


def _rows(logits, target, spec: KernelSpec, weight):
    return rows_op(
        logits, target, int(spec.kernel), float(spec.a), float(spec.b), spec.smooth_weight(weight),
        int(spec.ignore_index), spec.normalised,
    )  # fmt: skip


def _finalize(rows, target, spec: KernelSpec, weight, sample_weight, *, log_denominator=False):
    # Rows from ``rows_op``, which has queued the bad-target assertion already.
    return _cross_row(rows, target.contiguous(), spec, weight, sample_weight, assert_targets=False,
                      log_denominator=log_denominator)  # fmt: skip


def _grad(grad, logits, target, stats, spec: KernelSpec, weight):
    return backward_op(
        grad, logits, target, stats, spec.smooth_weight(weight), int(spec.ignore_index), int(spec.kernel),
        float(spec.a),
    )  # fmt: skip


def _grad_inplace(grad, logits, target, stats, spec: KernelSpec, weight):
    backward_inplace_op(
        logits, grad, target, stats, spec.smooth_weight(weight), int(spec.ignore_index), int(spec.kernel),
        float(spec.a),
    )  # fmt: skip
