r"""Fused linear layer + robust cross-entropy that never materialises the logits.

``linear_robust_cross_entropy(hidden, weight, target, scheme, ...)`` equals
``robust_cross_entropy(hidden @ weight.T + bias, target, scheme, ...)`` (value
and gradients for ``hidden``, ``weight`` and ``bias``), but holds at most one
chunk of ``chunk_size`` rows of logits (and one of their gradient) at a time.
For a language model with ``N`` tokens and a vocabulary of ``V`` this removes
the two ``N x V`` tensors (logits and their gradient) that dominate memory.

The cross-row normaliser
------------------------
SPEC §5's ``"mean"`` with ``normalize=True`` divides every row's gradient by
``D = sum_i |s_i| w_i``, which needs every row's weight. Two exact ways are
implemented; both see each logit chunk only through the row op
(``robust_ce_rows``: ``(m, ls, log w, x)`` per row, ``lse_nt = m + ls``) and the gradient op
(``robust_ce_backward``: ``g * coef * (r - e_y)``), so the scheme math is the
backend's, not repeated here.

* **Gradient in forward** (``grad_in_forward=True``; the default for
  ``"mean"``/``"sum"`` when a gradient is needed). One pass over the row
  chunks: ``z_k = h_k W^T + b`` (matmul 1), its rows, and its gradient with
  *provisional* coefficients that are exact up to one factor per chunk.
  For the normalised mean the provisional coefficient of row ``i`` is
  ``s_i exp(log w_i - L_{<=k}) / 2`` where ``L_{<=k}`` is the log-sum-exp of
  ``log w_j + log |s_j|`` over the active rows of chunks ``1..k`` (so
  ``exp(L) = D`` at the end). Then ``grad_h_k = G_k W`` (matmul 2) and
  ``grad_W += G_k^T h_k`` (matmul 3), accumulated in float32 with the
  online rescale ``grad_W <- grad_W * exp(L_{<=k-1} - L_{<=k})`` (as in a
  streaming softmax); the rows of ``grad_h_k`` get their factor
  ``exp(L_{<=k} - L)`` in backward. Nothing ever overflows, for any ``beta``. Where a reference
  ``R >= L`` is known before the first chunk (``_fixed_reference``: the DM
  families, whose ``log w`` is bounded: ``R = log sum |s_i| + max log w``,
  ``log N + max log w`` without weights, at most 10 above ``L`` with
  weights and 30 without), every chunk uses ``R`` instead of ``L_{<=k}``: its factor
  ``exp(L_k - R) <= 1`` cannot overflow, nothing is rescaled across chunks
  (no pass over ``grad_W`` per chunk), and the one factor ``exp(R - L)``
  joins backward's. Unnormalised reductions
  need no rescale (``"mean"`` divides by ``sum_i weight[y_i]``, known from
  the targets before the first chunk: every chunk's coefficients carry it).
  Backward only multiplies the stored gradients by the (scalar) upstream
  gradient and any pending factor (on a GPU in the same pass that rounds a
  float32 sum to a 16-bit parameter's dtype; on a CPU not at all when
  both are 1).
  **Cost: 3 matmuls** of ``N x H x V``
  in all, the same as an eager ``linear`` + loss; the gradients are held
  from forward to backward (``grad_weight`` as its float32 sum across
  chunks; for 16-bit inputs ``grad_hidden``, and ``grad_weight`` of a single
  chunk, in their own dtype where their one GEMM rounds them anyway:
  ``_held_16bit``), and they are computed even if ``backward`` is never called.
* **Recompute** (``grad_in_forward=False``; always for ``reduction="none"``,
  whose upstream gradient is per element and unknown in forward, and with a
  ``process_group``). Forward: per chunk ``z_k`` (matmul 1) and its rows;
  then the cross-row step over all rows gives exact ``(m, ls, alpha, beta,
  gamma)`` per row; only ``hidden``, ``weight``, ``target`` and these
  ``(N, 5)`` stats are saved. Backward: per chunk recompute ``z_k`` (matmul 2), write
  ``G_k = g_k * coef * (r - e_y)`` with the per-row upstream gradient
  ``g_k``, then ``grad_h_k = G_k W`` (matmul 3) and ``grad_W += G_k^T h_k``
  (matmul 4). **Cost: 4 matmuls**, one more than eager, and nothing but the
  stats held between forward and backward.
* **Recompute, tiled over the vocabulary** (a ``memory_budget`` too small
  for whole rows). Forward as above. Backward in tiles of rows x vocabulary
  columns, vocabulary blocks outermost: each block of ``grad_weight`` is
  finished (over all rows) before the next, so no ``V x H`` float32
  accumulator exists; ``grad_hidden`` is summed over the blocks in float32
  instead (``N x H``). Still 4 matmuls.
* **Hybrid** (16-bit inputs, a ``memory_budget`` too small for the
  gradient-in-forward path and for the tiled recompute's float32 sum beside
  wide tiles, where the gradient may be made in forward: ``"mean"``/``"sum"``,
  no ``process_group``). Forward as the gradient-in-forward path for
  ``grad_hidden`` alone: per chunk ``z_k`` (matmul 1) and ``grad_h_k = G_k W``
  (matmul 2, its one GEMM over the whole vocabulary, held as that path holds
  it, with the same pending factors); nothing is summed across chunks.
  Backward: the tiles of the vocabulary-tiled recompute below for
  ``grad_weight`` and ``grad_bias`` alone (matmuls 3 and 4; each block of
  ``grad_weight`` from one GEMM over all ``N`` rows when a tile has them all).
  **Cost: 4 matmuls**, and neither float32 sum: beyond the returned
  gradients it holds one chunk of logits in forward and one tile in backward
  (and the row statistics). It takes the split's place below (one matmul
  fewer, the same memory); where the tiled recompute fits it is kept, as its
  tiles of all rows multiply faster than the hybrid's forward chunks (on a
  2-vCPU Xeon, benchmarks/NOTES.md).
* **Recompute, split** (16-bit inputs, a ``memory_budget`` too small for
  that ``N x H`` sum beside tiles of 1024 columns). Forward as above. Backward
  twice: the vocabulary-outer tiles give ``grad_weight`` and ``grad_bias``
  alone, then chunks of whole rows give ``grad_hidden``, each chunk's from
  one GEMM (``G_k W``, float32 inside, rounded once). **Cost: 5 matmuls**,
  and no float32 sum of either gradient across chunks: beyond the returned
  gradients it holds a tile, a chunk and the row statistics (and, with a
  16-bit bias, the float32 ``grad_bias`` sum: ``4 V`` bytes).

Exact float32 sums across chunks need one float32 accumulator for 16-bit
inputs: ``V x H`` for ``grad_weight`` when the rows are chunked, or ``N x H``
for ``grad_hidden`` when the vocabulary is (2 GiB against 128 MiB at
``N = 8192``, ``H = 4096``, ``V = 128256``), unless the logits are made once
more (the split). The second is the lean one of 4 matmuls; the split is
leaner still (a budget of tens of MiB at that size), at a fifth matmul.

Exactness and memory together: with 3 matmuls, every row chunk's
``G_k^T h_k`` adds into one ``grad_weight`` sum, so holding that sum in
float32 costs ``4 V H`` bytes (2 GiB at ``V = 128256``, ``H = 4096``)
unless one chunk holds every row's logits (``2 N V``: 2 GiB at
``N = 8192``). A plan that holds less makes the logits twice (4 matmuls:
the hybrid), or accumulates the sum in the 16-bit gradient itself, which
this layer does not do (Liger-Kernel's fused linear cross-entropy does:
3 matmuls and one chunk of logits, its ``grad_weight`` off by ~3e-3).

How the work is cut comes from a memory budget (``memory_budget=`` bytes;
by default chunks of about 64 MiB on CPUs, 2 GiB on GPUs): ``_plan`` holds
the model of every tensor the layer allocates beyond its inputs and returned
gradients, and picks the fastest plan that fits (3 matmuls with chunks of at
least 256 rows, else whole-row recompute, else vocabulary tiles, else the
hybrid where the gradient may be made in forward, else the split). Every
chunk's logits are written into one buffer, and a chunk's
gradient over its logits (the backends' in-place gradient op) unless a
soft-cap needs the capped logits afterwards.

Precision: logits and their gradient chunks have the input's dtype (as eager
logits would); row statistics are float32 (float64 for float64 input);
``grad_weight``, ``grad_hidden`` (tiled) and ``grad_bias`` are accumulated
across chunks in float32 (float64) even for bfloat16/float16 inputs and
rounded once at the end. A 16-bit product is added to a float32 accumulator
by one GEMM with a float32 output where ATen has one (CUDA), else per block
of 4096 accumulator rows in the input dtype (float32 inside the GEMM, the
block rounded once) and added in float32 -- on GPUs and on CPUs with native
bfloat16 GEMMs (AVX512-BF16, AMX). Other CPUs emulate the 16-bit GEMM, up to
hundreds of times slower; there every product, the logits' included, runs
in float32 on float32 copies of 512 x 512 blocks of its operands
(``_upcast_product``). ``_add_product`` has the error measurements.

Soft-capping
------------
``softcap=c`` computes the loss of ``c * tanh(z / c)`` (Gemma 2's final
logit soft-capping) instead of ``z``. Each chunk of logits is capped in place
before its row op; its gradient chunk ``G_k`` (with respect to the capped
logits) is multiplied by ``dz_c / dz = 1 - (z_c / c)^2`` before the matmuls,
on both paths. No extra chunk is held.

``torch.compile(fullgraph=True)`` traces both paths without a graph break
(tested with ``backend="aot_eager"``); the chunk loop is unrolled, so the
graph grows with ``N / chunk_size``. Host synchronisation on GPUs: none;
bad targets stop the stream with the backends' device-side assertion, and
``set_validate_targets(True)`` checks them on the host once per call (one
synchronisation) before the first chunk.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from dataclasses import dataclass, replace

from . import _finalize, backends
from ._common import (
    ROW_COLS,
    KernelSpec,
    Reduction,
    acc_dtype,
    check_target,
    real_scalar,
    validating_targets,
)
from .functional import check_class_weight, check_not_differentiable, check_target_dtype, kernel_spec, scale_loss
from .schemes import Scheme

__all__ = ["linear_robust_cross_entropy", "LinearRobustCrossEntropyLoss"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_MIB = 1 << 20
# Default working memory of one chunk (its logits, and their gradient when it
# cannot be written over them), per device type. CPU: on a 2-core EPYC at
# (N, H, V) = (2048, 512, 32000) a training step took within 3% of its best
# from 512 rows up (fp32 and bf16; see benchmarks/NOTES.md); 64 MiB is 512
# float32 rows there, about the memory the fixed 2^23-logit chunks held. GPUs: every chunk
# after the first reads and writes the float32 V x H grad_weight sum (4.2 GB at V = 128256,
# H = 4096, ~1 ms at an H200's 4.3 TB/s), against the chunk's GEMMs' 6 rows V H FLOPs: the
# share of the sum is about 250 / rows there, whatever V and H. With 512 MiB (2048 rows at
# that V) a step took 43.3 ms at N = 8192 and 173 ms at N = 32768, torch.compile's 39.1 and
# 164 (benchmarks/NOTES.md); 2 GiB holds 8372 rows there, one chunk at N = 8192 (no float32
# sum at all: _held_16bit), and at most about as much as that sum holds beside it.
_DEFAULT_CHUNK_BYTES = {"cpu": 64 * _MIB}
_DEFAULT_CHUNK_BYTES_ACCELERATOR = 2048 * _MIB
# With an explicit memory_budget, the gradient-in-forward path needs at least
# this many rows per chunk (or all of them); below, its per-chunk passes over
# the V x H accumulator cost more than the recompute path's extra GEMM.
_MIN_CHUNK_ROWS = 256
# Vocabulary block of the bfloat16/float16 grad_weight product before it is
# added to the float32 accumulator (where no GEMM writes float32 from 16-bit).
_VOCAB_BLOCK = 4096
# Where a CPU would emulate a 16-bit GEMM, products run in float32 on float32 copies of
# blocks of at most this many rows and columns of each operand (_upcast_product): 1 MiB
# each, at most 3 MiB whatever the operands (a whole float32 V x H weight is 2 GiB at
# V = 128256, H = 4096), and a 512^3 float32 GEMM is ~2 ms on the 2-core CI VM, so the
# per-block host work and the copies (1/512 of the multiply-adds per operand) are lost in it.
_UPCAST_BLOCK = 512
# Recompute backward tiled over the vocabulary: the narrowest tile, and the
# spare columns after it. A row whose class lies outside the tile gets its
# "target" in the first spare column, whose gradient is discarded; 8 keeps a
# 16-bit tile's rows 16-byte aligned for the GEMMs.
_MIN_VOCAB_TILE = 128
_TILE_PAD = 8
# A 16-bit grad_hidden whose float32 sum over vocabulary tiles leaves room only for tiles
# narrower than this splits the backward in two instead (_plan). Each tile reads and writes
# that N x H sum (8 N H bytes) and has its fixed work (~10 ops); the split costs one more
# GEMM (2 N H V FLOP). On an H200 (790 TFLOP/s, 4.25 TB/s) the traffic alone is even at
# ~740 columns, before the per-tile host work; on the 2-core CI VM at (2048, 512, 32000)
# bf16 the split was faster than tiles of 1408 columns and slower than tiles of 3456
# (benchmarks/NOTES.md). Between the two.
_SPLIT_BELOW_COLS = 1024


def _cpu_flags() -> frozenset:
    """This CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


# Read once, at import: torch.compile cannot trace a file read inside the loss.
_FLAGS = _cpu_flags()
_ONEDNN_BUILT = torch.backends.mkldnn.is_available()
_CPU_FAST_16BIT = {
    torch.bfloat16: bool(_FLAGS & {"avx512_bf16", "amx_bf16"}),
    torch.float16: "amx_fp16" in _FLAGS,
}


def _cpu_fast_16bit_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` matrices natively (oneDNN then runs them faster than float32).

    bfloat16 with AVX512-BF16 or AMX-BF16: measured on an AMD EPYC with
    AVX512-BF16, a (256 x 32000)^T (256 x 512) product took 0.12 s per 5 in
    bfloat16 and 0.34 s in float32 on float32 copies. float16 without AMX-FP16
    is emulated (23x slower than the upcast there), so it is not picked;
    neither is anything on a CPU whose flags cannot be read. The native
    kernels are oneDNN's: without it (a torch built without it, or
    ``torch.backends.mkldnn.enabled = False``, read at each call) ATen's
    fallback GEMM took 0.56 s per product there, 9x the upcast. (Dynamo does
    not trace the switch: a compiled graph takes it as at import.)
    """
    if not (_CPU_FAST_16BIT.get(dtype, False) and _ONEDNN_BUILT):
        return False
    return torch.compiler.is_compiling() or bool(torch.backends.mkldnn.enabled)


def _upcast_gemm(dtype: torch.dtype, device_type: str) -> bool:
    """Whether a ``dtype`` product runs in float32 here (:func:`_upcast_product`): 16-bit on a CPU that would emulate it.

    The emulation is not just slower. ATen's fallback for ``gl @ W`` (the
    ``grad_hidden`` product, whose inner dimension is the vocabulary) took
    66 s in float16 for 256 x 50257 x 1024 on the 2-core CI VM, against
    0.19 s for the float32 product on float32 copies; bfloat16 without
    oneDNN, 6.2 s against 0.035 s at 256 x 8192 x 1024.
    """
    return device_type == "cpu" and dtype in (torch.float16, torch.bfloat16) and not _cpu_fast_16bit_gemm(dtype)


def _upcast_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float = 0.0, bias=None) -> None:
    """out <- beta * out + a @ b (+ bias) in float32, on float32 copies of ``_UPCAST_BLOCK``-square blocks.

    For 16-bit ``a``, ``b`` where :func:`_upcast_gemm` says so. A float32
    ``out`` takes each block's products directly (``beta`` applies to its
    first one; ``beta = 0`` does not read ``out``, so it may be
    uninitialised); a 16-bit ``out`` (``beta = 0``) gets each block's float32
    sum over the inner dimension, plus ``bias``, rounded once, as a 16-bit
    GEMM with float32 accumulation would. Temporaries: one block of each
    operand, and for a 16-bit ``out`` its block's sum (``_plan``'s ``up``).

    Under ``torch.compile`` it is one opaque op (``robustloss::upcast_product_``):
    traced, the block loops would unroll into ``(m/512)(k/512)(n/512)``
    products per call (~50k a step at N = 2048, H = 4096, V = 128256; a
    compile of 1024 x 2048 x 32000 took 104 s).
    """
    if bias is not None or out.dtype != torch.float32:
        assert beta == 0.0, "a 16-bit result or a bias is written, not accumulated"
    if torch.compiler.is_compiling():
        _upcast_product_op(out, a, b, float(beta), bias)
    else:
        _upcast_blocks(out, a, b, float(beta), bias)


def _upcast_blocks(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float, bias) -> None:
    f32, blk = torch.float32, _UPCAST_BLOCK
    (m, k), n = a.shape, b.shape[1]
    direct = out.dtype == f32
    tmp = None if direct else torch.empty((min(m, blk), min(n, blk)), dtype=f32, device=out.device)
    for r0, r1 in _chunks(m, blk):
        for c0, c1 in _chunks(n, blk):
            acc = out[r0:r1, c0:c1] if direct else tmp[: r1 - r0, : c1 - c0]
            first = beta
            if bias is not None:
                acc.copy_(bias[c0:c1].expand_as(acc))
                first = 1.0
            if k == 0 and first != 1.0:  # no product to apply beta
                acc.zero_() if first == 0.0 else acc.mul_(first)
            for k0, k1 in _chunks(k, blk):
                acc.addmm_(a[r0:r1, k0:k1].to(f32), b[k0:k1, c0:c1].to(f32), beta=first if k0 == 0 else 1.0)
            if not direct:
                out[r0:r1, c0:c1].copy_(acc)


_upcast_product_op = torch.library.custom_op(
    "robustloss::upcast_product_", _upcast_blocks, mutates_args=("out",),
    schema="(Tensor(a!) out, Tensor a, Tensor b, float beta, Tensor? bias) -> ()",
)  # fmt: skip
_upcast_product_op.register_fake(lambda out, a, b, beta, bias: None)


@dataclass(frozen=True)
class _Plan:
    """How the rows and the vocabulary are cut, from the memory budget (:func:`_plan`).

    ``rows``: rows per forward chunk (and per gradient chunk of the
    gradient-in-forward path). ``tile_rows`` x ``tile_cols``: the recompute
    backward's tile; ``tiled``: it runs vocabulary blocks outermost (else in
    chunks of ``tile_rows`` whole rows, ``tile_cols == V``). ``gif`` and
    ``tiled`` together are the hybrid: ``grad_hidden`` made in forward,
    ``grad_weight`` and ``grad_bias`` from the tiles.
    ``inplace``: each chunk's gradient is written over its logits.
    ``working_bytes``: the model's working memory beyond the inputs and the
    returned gradients (what :func:`_plan` keeps under the budget).
    ``split_rows``: when non-zero, the recompute backward runs twice: the
    tiles give ``grad_weight`` and ``grad_bias`` alone, and chunks of this
    many whole rows give ``grad_hidden`` (no float32 sum across chunks).
    """

    gif: bool
    rows: int
    tile_rows: int
    tile_cols: int
    inplace: bool
    working_bytes: int
    tiled: bool = False
    split_rows: int = 0


def _balanced(n: int, rows: int) -> int:
    """``rows`` lowered to split ``n`` into equal chunks (no short last chunk to pay a GEMM for)."""
    rows = max(1, min(rows, n))
    return -(-n // -(-n // rows)) if n else 1


def _plan(n, v, hdim, dtype, device_type, *, needs_h, needs_w, needs_b, gif, cap, budget, chunk_size) -> _Plan:
    r"""Chunk rows (and recompute tiles) from a memory budget in bytes.

    The model counts what the layer allocates beyond its inputs and the
    gradients it returns (``e = dtype.itemsize``, ``a`` = 4, or 8 for float64):

    * per logit of a chunk: ``e`` for the logits, ``e`` more for their
      gradient when a soft-cap needs the capped logits afterwards (otherwise
      the gradient is written over them);
    * 16-bit weights: the ``V x H`` float32 ``grad_weight`` accumulator of
      row chunks (the exact sum across chunks; none where one chunk has every
      row and :func:`_held_16bit` holds it in 16 bits); a 16-bit product block of up
      to ``4096 x H`` and its float32 copy where the GEMM cannot write float32;
      the float32 ``grad_bias`` sum of a 16-bit bias (``V a``);
    * where 16-bit GEMMs are upcast (:func:`_upcast_gemm`), the float32
      blocks of the largest product at each point: a block of each operand
      and, for a 16-bit result (logits, whole-row ``grad_hidden``, a whole
      tile's ``grad_weight`` block), the block's sum, at most
      ``3 x 512 x 512 x a`` bytes;
    * gradient in forward: the float32 ``N x H`` ``grad_hidden`` of a 16-bit
      ``hidden`` where products are upcast (elsewhere it is held in 16 bits,
      and backward's factor takes a float32 block of at most ``_SCALE_BLOCK``
      values); recompute tiled over the vocabulary: a float32 one, summed over
      tiles, and an ``tile_cols x H`` float32 block of ``grad_weight`` when a
      tile has fewer than ``N`` rows; the hybrid: the larger of its forward
      (the gradient-in-forward chunk without ``grad_weight``) and its tiles
      (beside a float32 ``grad_hidden`` where products are upcast);
    * the row statistics, ``12 a`` per row.

    With ``budget=None`` a chunk gets the device's default
    (``_DEFAULT_CHUNK_BYTES``) and the path is the caller's. With a budget:
    the gradient-in-forward path (3 GEMMs) if it fits with at least
    ``min(N, 256)`` rows per chunk; else the recompute path (4 GEMMs), whole
    rows if they fit, else tiles of all ``N`` rows and as many vocabulary
    columns as fit (each ``grad_weight`` block then comes from one GEMM,
    nothing accumulated across chunks), at least ``_SPLIT_BELOW_COLS`` of
    them for a 16-bit ``grad_hidden``. Past that, a 16-bit ``grad_hidden``
    is made in forward where it may be (the hybrid: 4 GEMMs, chunks of as
    many rows as fit, tiles of all ``N`` rows and as many columns as fit,
    else of 128 columns and fewer rows), else it splits the backward in two
    (5 GEMMs, no float32 sum of either gradient
    across chunks: the tiles give ``grad_weight``, chunks of whole rows give
    ``grad_hidden``); other dtypes, or a split that cannot hold one whole
    row, take narrower tiles of fewer rows, else (no tile's float32
    ``grad_weight`` block fits) whole rows, fewer than 256. Below every
    plan the one that holds least: tiles of 128 columns and 256 rows, or for
    a 16-bit ``grad_hidden`` the split with one row at a time if smaller.
    """
    e = dtype.itemsize
    a = 8 if dtype == torch.float64 else 4
    wide = a != e
    upcast = _upcast_gemm(dtype, device_type)  # (16-bit only: wide)
    inplace = cap is None
    per_logit = e * (1 if inplace else 2)
    stats = 12 * a * n
    w_acc = v * hdim * a if wide and needs_w else 0
    h_acc = n * hdim * a if needs_h and wide else 0
    b_acc = v * a if needs_b and wide else 0  # the recompute backward's float32 grad_bias sum

    def product(acc_rows):
        # A 16-bit GEMM's product block and its float32 copy in the add (none upcast: float32 GEMM into acc).
        direct = wide and not upcast and _fp32_out_gemm(device_type)
        return min(acc_rows, _VOCAB_BLOCK) * hdim * (e + a) if wide and not upcast and not direct else 0

    def up(m, k, n_, direct=True):
        # Where 16-bit products are upcast, an (m x k) @ (k x n_) product's float32 blocks
        # (_upcast_product): one of each operand, and the block's sum of a 16-bit result.
        if not upcast:
            return 0
        bm, bk, bn = (min(x, _UPCAST_BLOCK) for x in (m, k, n_))
        return (bm * bk + bk * bn + (0 if direct else bm * bn)) * a

    # The grad_bias column sums (1 x rows by rows x cols): a 1 x V 16-bit product and its
    # float32 copy in the add, where products are not upcast.
    bias_tmp = v * (e + a) if needs_b and wide and not upcast else 0

    def gif_bytes(rows, with_w=True):
        w, b = with_w and needs_w, with_w and needs_b
        own_h, own_w = _held_16bit(dtype, device_type, rows >= n)
        # Backward's factor on a gradient held in 16 bits: a float32 block of whole rows.
        held_rows = max(n if own_h and needs_h else 0, v if own_w and w else 0)
        scale = min(held_rows, max(1, _SCALE_BLOCK // hdim)) * hdim * a if held_rows and hdim else 0
        tmp = max(product(v) if w and not own_w else 0, bias_tmp if b else 0, up(rows, hdim, v, False),
                  up(v, rows, hdim) if w else 0, up(rows, v, hdim) if needs_h else 0, scale)
        held = (0 if own_w or not w else w_acc) + (0 if own_h else h_acc)
        return stats + held + (v * a if b else 0) + rows * v * per_logit + tmp

    def whole_rows_bytes(rows, with_w=True):
        w = with_w and needs_w
        tmp = max(product(v) if w else 0, up(v, rows, hdim) if w else 0,
                  up(rows, v, hdim, False) if needs_h else 0, up(rows, hdim, v, False))
        return stats + (w_acc if w else 0) + b_acc + tmp + rows * v * per_logit

    def tile_bytes(rows, cols, with_h=True):
        h = with_h and needs_h
        g_acc = cols * hdim * a if needs_w and rows < n else 0
        tmp = max(product(rows) if h else 0, product(cols) if needs_w and rows < n else 0,
                  up(rows, hdim, cols, False), up(rows, cols, hdim) if h else 0,
                  up(cols, rows, hdim, rows < n) if needs_w else 0)
        return stats + (h_acc if with_h else 0) + g_acc + b_acc + tmp + rows * (cols + _TILE_PAD) * per_logit

    def fwd_bytes(rows):
        return stats + rows * v * e + up(rows, hdim, v, False)

    # grad_hidden made in forward stays float32 through backward where it is not held in 16 bits.
    h_held = 0 if _held_16bit(dtype, device_type, False)[0] else h_acc

    def hybrid_bytes(rows, tile_rows, cols):
        return max(gif_bytes(rows, with_w=False), h_held + tile_bytes(tile_rows, cols, with_h=False))

    def make(gif, rows, tile_rows, tile_cols, balance=True, tiled=False, split_rows=0):
        if balance:  # an explicit chunk_size is taken as given
            rows, tile_rows = _balanced(n, rows), _balanced(n, tile_rows)
            split_rows = split_rows and _balanced(n, split_rows)
        if gif and tiled:
            used = hybrid_bytes(rows, tile_rows, tile_cols)
        elif gif:
            used = gif_bytes(rows)
        elif split_rows:
            backward = max(tile_bytes(tile_rows, tile_cols, with_h=False), whole_rows_bytes(split_rows, with_w=False))
            used = max(fwd_bytes(rows), backward)
        elif tiled:
            used = max(fwd_bytes(rows), tile_bytes(tile_rows, tile_cols))
        else:
            used = max(fwd_bytes(rows), whole_rows_bytes(tile_rows))
        return _Plan(gif, rows, tile_rows, tile_cols, inplace, used, tiled or bool(split_rows), split_rows)

    if budget is None:
        if chunk_size is not None:
            rows = max(1, min(chunk_size, n))
            return make(gif, rows, rows, v, balance=False)
        rows = _DEFAULT_CHUNK_BYTES.get(device_type, _DEFAULT_CHUNK_BYTES_ACCELERATOR) // (v * per_logit)
        return make(gif, rows, rows, v)

    def largest(cost, hi, step=1):
        """The largest multiple of ``step`` in [step, hi] with cost(x) <= budget (cost grows with x), else 0."""
        lo, top = 0, hi // step
        while lo < top:
            mid = (lo + top + 1) // 2
            lo, top = (mid, top) if cost(mid * step) <= budget else (lo, mid - 1)
        return lo * step

    least = min(n, _MIN_CHUNK_ROWS)
    if gif:
        # One chunk may hold less than several (no float32 sum across chunks: _held_16bit), so
        # the model is not monotonic in the rows there; every other count is searched.
        if gif_bytes(n) <= budget:
            return make(True, n, n, v)
        rows = largest(gif_bytes, n)
        if rows >= least:
            return make(True, rows, rows, v)
    # Recompute: forward chunks hold only their logits (no gradient, no accumulator).
    fwd_rows = max(1, largest(fwd_bytes, n))
    rows = largest(whole_rows_bytes, n)
    if rows >= least:
        return make(False, fwd_rows, rows, v)
    # The last tile may be short: a vocabulary that is not a multiple of 128 gets its full width too.
    def widest(cost):
        return v if cost(v) <= budget else largest(cost, v, _MIN_VOCAB_TILE)

    cols = widest(lambda c: tile_bytes(n, c))
    split = h_acc > 0
    if cols >= (min(v, _SPLIT_BELOW_COLS) if split else 1):
        return make(False, fwd_rows, n, cols, tiled=True)
    if split and gif and (needs_w or needs_b):
        # The hybrid, where the float32 grad_hidden sum leaves the tiles too narrow: grad_hidden in
        # forward (each chunk's from one GEMM), grad_weight and grad_bias from tiles of the vocabulary
        # in backward (each block from one GEMM over all rows when a tile has them all): 4 GEMMs, no
        # float32 sum across chunks, against the split's 5. (Where both fit, the tiles of all rows
        # give grad_hidden too: on a 2-vCPU Xeon 1-32% faster than the hybrid's forward chunks,
        # benchmarks/NOTES.md.)
        h_rows = largest(lambda r: gif_bytes(r, with_w=False), n)
        if h_rows:
            cols = widest(lambda c: hybrid_bytes(h_rows, n, c))
            if cols:
                return make(True, h_rows, n, cols, tiled=True)
            cols = min(v, _MIN_VOCAB_TILE)
            tile_rows = largest(lambda r: hybrid_bytes(h_rows, r, cols), n)
            if tile_rows:
                return make(True, h_rows, tile_rows, cols, tiled=True)

    def split_plan(split_rows):
        cols = widest(lambda c: tile_bytes(n, c, with_h=False))
        tile_rows = n
        if not cols:
            cols = min(v, _MIN_VOCAB_TILE)
            tile_rows = largest(lambda r: tile_bytes(r, cols, with_h=False), n) or 1
        return make(False, fwd_rows, tile_rows, cols, split_rows=split_rows)

    split_rows = largest(lambda r: whole_rows_bytes(r, with_w=False), n) if split else 0
    if split_rows:
        return split_plan(split_rows)
    # Narrow tiles of fewer rows (also for a split whose grad_hidden pass cannot hold one whole
    # row). When nothing fits: tiles of 256 rows rather than a crawl of single rows, or the
    # split with one row at a time where that holds less.
    cols = min(v, _MIN_VOCAB_TILE)
    rows = largest(lambda r: tile_bytes(r, cols), n)
    if rows:
        return make(False, fwd_rows, rows, cols, tiled=True)
    # No tile fits (its float32 grad_weight block is over the budget): whole rows, fewer than
    # `least` of them, may still fit.
    rows = largest(whole_rows_bytes, n)
    if rows:
        return make(False, fwd_rows, rows, v)
    narrow = make(False, fwd_rows, least, cols, tiled=True)
    if not split:
        return narrow
    one_row = split_plan(1)  # (not min(..., key=...): Dynamo cannot trace that over dataclasses)
    return one_row if one_row.working_bytes < narrow.working_bytes else narrow


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out=None) -> torch.Tensor:
    if _upcast_gemm(h.dtype, h.device.type):
        if out is None:
            out = torch.empty((h.shape[0], weight.shape[0]), dtype=h.dtype, device=h.device)
        _upcast_product(out, h, weight.t(), bias=bias)
        return out
    if out is not None and torch.compiler.is_compiling():
        # Dynamo does not trace out= into a view; the compiled graph copies instead.
        return out.copy_(_logits(h, weight, bias))
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


_FP32_OUT_GEMM = {}


def _fp32_out_gemm(device_type: str) -> bool:
    """Whether ATen adds a 16-bit product into a float32 matrix in one GEMM here (``addmm`` with ``out_dtype``).

    CUDA builds of recent torch have it (cuBLAS with a float32 C); older ones
    refuse a float32 ``self`` and CPU builds lack the kernel. Probed once per
    device type on 8 x 8 matrices (no synchronisation: a refusal is a host-side
    check), never while compiling.
    """
    if device_type != "cuda" or torch.compiler.is_compiling():
        return False
    ok = _FP32_OUT_GEMM.get(device_type)
    if ok is None:
        ok = False
        if torch.cuda.is_available():
            try:
                x = torch.zeros((8, 8), dtype=torch.bfloat16, device=device_type)
                acc = torch.zeros((8, 8), dtype=torch.float32, device=device_type)
                torch.addmm(acc, x, x, out_dtype=torch.float32, out=acc)
                ok = True
            except (RuntimeError, TypeError, NotImplementedError):
                pass
        _FP32_OUT_GEMM[device_type] = ok
    return ok


def _held_16bit(dtype: torch.dtype, device_type: str, one_chunk: bool) -> Tuple[bool, bool]:
    """Whether the gradient-in-forward path holds 16-bit ``(grad_hidden, grad_weight)`` in their own dtype.

    Where a 16-bit product is rounded to 16 bits by its GEMM anyway (not upcast
    to float32 blocks), a float32 copy of it holds the same values at twice the
    bytes and costs a conversion each way. ``grad_hidden``'s rows each come
    from one such GEMM; a bfloat16 ``grad_weight`` only when one chunk has
    every row (else its float32 sum across chunks is the exact one). The
    pending factor is applied in backward in float32 and rounded once
    (:func:`_scale_16bit_`).
    That factor is the upstream gradient (one chunk needs no rescale): at 1,
    the numbers of a float32 copy; otherwise a second rounding of the GEMM's
    16-bit output, where a GPU GEMM writing float32 (:func:`_fp32_out_gemm`)
    would have rounded once. Eager bf16 (the upstream times the 16-bit logits'
    gradient, then the GEMM) rounds twice too; holding it in float32 would
    cost a ``V x H`` float32 matrix (2 GiB at V = 128256, H = 4096) and two
    passes over it, about 4 ms of a 43 ms step on an H200 (benchmarks/NOTES.md).
    """
    if dtype.itemsize != 2 or _upcast_gemm(dtype, device_type):
        return False, False
    # Not float16's grad_weight: its unnormalised "mean" keeps the divisor for backward (see
    # fold_mean), so one chunk's sum would hold N times the gradient -- past float16's 65504.
    return True, one_chunk and dtype == torch.bfloat16


_SCALE_BLOCK = 1 << 18  # elements of the float32 block _scale_16bit_ holds (1 MiB)


def _scale_16bit_(g: torch.Tensor, f: torch.Tensor) -> None:
    """g <- g * f for a 16-bit ``g`` and a float32 ``f`` (0-dim, or one value per row): float32 products rounded once.

    On a GPU a 16-bit ``mul_`` would round a 0-dim ``f`` to 16 bits first; a
    dimensioned one makes the product float32, converted inside the kernel
    (one pass). On a CPU a 0-dim ``f`` is read as a float32 scalar by the
    16-bit ``mul_`` (one pass), but a per-row ``f`` makes ATen copy all of
    ``g`` to float32 first: that runs in blocks of rows, the float32 copy at
    most ``_SCALE_BLOCK`` values (or one row).
    """
    if g.device.type != "cpu":
        _scale_into(g, f, g)
        return
    if f.dim() == 0:
        g.mul_(f)
        return
    step = max(1, _SCALE_BLOCK // max(1, g.shape[-1]))
    for r0 in range(0, g.shape[0], step):
        blk = g[r0 : r0 + step]
        blk.copy_(blk.to(f.dtype).mul_(f[r0 : r0 + step]))


def _scale_into(src: torch.Tensor, f: torch.Tensor, out: torch.Tensor) -> None:
    """out <- src * f (``f`` 0-dim, or one value per row) in float32, rounded once to ``out``'s dtype (a GPU's pass).

    Where the device has a kernel for it (:func:`backends.fused_scale`), that
    kernel: ATen's mixed-dtype ``mul`` takes its casting path, which on an
    H200 ran at a fifth of the copy rate, and the kernel skips a factor of 1
    written in place. Elsewhere ATen's ``mul``. (Compiled graphs never come
    here: ``_backward_stored`` scales them with plain tensor ops.)
    """
    fused = backends.fused_scale(src.device)
    if fused is not None and f.dtype == torch.float32 and src.is_contiguous() and out.is_contiguous():
        fused(src, f.reshape(-1), out)
    else:
        # A dimensioned f makes ATen compute in float32 (a 0-dim one would be rounded to src's dtype first).
        torch.mul(src, f.reshape((1,) * max(src.dim(), 1)) if f.dim() == 0 else f, out=out)


def _add_product(
    acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, decay: Optional[torch.Tensor] = None, upcast=None,
    fresh: bool = False,
) -> None:
    """acc <- decay * acc + a @ b, acc in the accumulation dtype (float32 for 16-bit inputs).

    ``fresh``: the first term of the sum, acc <- a @ b; ``acc`` is not read
    (it may be uninitialised: the GEMM's beta is 0, which ignores even NaN),
    so the caller skips zero-filling it, and a first ``decay`` (of zeros) is
    not a pass over it either.

    16-bit products take one of three paths. Where a GEMM writes float32 from
    16-bit inputs (:func:`_fp32_out_gemm`: CUDA) it adds into ``acc`` itself,
    one pass over ``acc``. Otherwise the 16-bit GEMM (GPUs; CPUs that multiply
    the dtype natively, :func:`_cpu_fast_16bit_gemm`) runs per block of
    ``acc``'s rows, accumulating in float32 inside the GEMM; each block
    product is rounded once to the input dtype and added to ``acc`` in
    float32. With ``upcast`` (default on other CPUs, where the float32 GEMM
    is the fast one) the product runs in float32 on float32 copies of
    blocks (:func:`_upcast_product`). Either
    way the sum across chunks is float32: the returned 16-bit gradient is
    rounded once more, and that final rounding dominates (bfloat16
    ``grad_weight``, 2048 x 512 x 32000, random chunks of 256 rows: max error
    3.3e-3 of max |grad_W| upcast, 3.9e-3 with the 16-bit GEMM, against
    1.8e-3 before the final rounding).
    """
    on_cpu = acc.device.type == "cpu"
    if upcast is None:
        upcast = _upcast_gemm(a.dtype, acc.device.type)
    upcast = upcast and a.dtype != acc.dtype
    if fresh and torch.compiler.is_compiling() and not upcast:
        # Inductor may lower addmm to beta * acc + a @ b (small shapes, max-autotune's epilogue),
        # where 0 * an uninitialised NaN is NaN: a compiled graph starts from zeros instead (the
        # upcast product is an opaque op, whose beta = 0 reads nothing).
        acc.zero_()
        fresh, decay = False, None
    if fresh:
        beta, decay = 0.0, None
    elif decay is not None and on_cpu and not torch.compiler.is_compiling():
        # On CPU reading the scalar costs nothing and lets the GEMM apply it
        # (its beta) instead of a separate pass over the accumulator.
        beta = float(decay)
        if beta == 0.0:
            # A GEMM's beta = 0 drops what acc holds, NaN included, where 0 * NaN is NaN on the
            # materialised logits (a NaN hidden row among ignored ones). A factor of 0 (the first
            # active chunk after chunks with none, or a chunk whose normaliser is ~104 above the
            # running one in float32) costs this one pass more.
            acc.mul_(0.0)
            beta = 1.0
    else:
        beta = 1.0
        if decay is not None:
            acc.mul_(decay)
    if upcast:
        _upcast_product(acc, a, b, beta)
        return
    if a.dtype == acc.dtype:
        acc.addmm_(a, b, beta=beta)
        return
    if _fp32_out_gemm(acc.device.type):
        torch.addmm(acc, a, b, beta=beta, out_dtype=acc.dtype, out=acc)
        return
    for r0 in range(0, a.shape[0], _VOCAB_BLOCK):
        r1 = min(r0 + _VOCAB_BLOCK, a.shape[0])
        block = acc[r0:r1]
        if beta == 0.0:
            block.copy_(torch.mm(a[r0:r1], b))
            continue
        if beta != 1.0:
            block.mul_(beta)  # block by block: the accumulator is read once
        block.add_(torch.mm(a[r0:r1], b))


def _accumulator(shape, dtype, device, n: int) -> torch.Tensor:
    """The accumulator of a sum over the chunks of ``n`` rows: uninitialised, as the first
    chunk writes it (``_add_product(..., fresh=True)``; zero-filling a float32 ``V x H``
    is 2 GiB of writes at V = 128256, H = 4096), or zeros when there is no chunk."""
    return torch.empty(shape, dtype=dtype, device=device) if n else torch.zeros(shape, dtype=dtype, device=device)


def _add_column_sums(acc: torch.Tensor, gl: torch.Tensor) -> None:
    """acc <- acc + gl.sum(0) (``grad_bias``) as a product with a row of ones.

    ``gl.sum(0, dtype=float32)`` would first copy a 16-bit chunk to float32 on
    CPUs (a chunk-sized temporary the memory budget does not hold); the GEMV
    sums in float32 inside, as the ``grad_weight`` products do.
    """
    ones = torch.ones((1, gl.shape[0]), dtype=gl.dtype, device=gl.device)
    _add_product(acc[None], ones, gl)


def _softcap_(z: torch.Tensor, cap: float) -> torch.Tensor:
    """z <- cap * tanh(z / cap) in place (in the order Gemma 2 rounds it)."""
    return z.div_(cap).tanh_().mul_(cap)


def _softcap_grad_(gl: torch.Tensor, zc: torch.Tensor, cap: float) -> None:
    """gl <- gl * (1 - (zc / cap)^2), the chain rule through the cap; overwrites zc."""
    gl.mul_(zc.div_(cap).square_().neg_().add_(1))


def _chunks(n: int, chunk: int):
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def _chunk_buffer(n: int, rows: int, v: int, like: torch.Tensor) -> Optional[torch.Tensor]:
    """One ``rows x v`` buffer for the logits of every chunk of ``n`` rows (``None`` for one chunk, or while compiling).

    A chunk-sized tensor allocated per chunk is, on a CPU, a fresh mapping
    each time (glibc maps blocks above 32 MiB and unmaps them when freed) whose
    first touch page-faults: at (16384, 128, 8000) float32 that was a fifth of
    a training step (benchmarks/NOTES.md). Inductor plans a compiled graph's
    buffers itself, and Dynamo does not trace ``out=`` into a view. Under
    autocast the logits are whatever dtype autocast gives each product.
    """
    if n <= rows or torch.compiler.is_compiling() or torch.is_autocast_enabled(like.device.type):
        return None  # (autocast picks the logits' dtype, and does not apply to out= products)
    return torch.empty((rows, v), dtype=like.dtype, device=like.device)


def _finalize_all(backend, rows, target, spec, cw, sw, group):
    if group is None:
        return backend.finalize(rows, target, spec, cw, sw)
    from .distributed import finalize_distributed  # lazily: torch.distributed is optional

    return finalize_distributed(rows, target, spec, cw, sw, group)


# Without weights: the widest spread of w_i / exp(R), in nats, that a fixed
# reference may give: its smallest coefficients are then >= e^-30 of the
# largest, far inside the float32 (and bfloat16) exponent range; float16 chunk
# gradients are not.
_FIXED_REFERENCE_SPAN = 30.0
# With weights the coefficients spread as the weights do, whatever R; R only
# puts each at most hi - lo nats lower than the running normaliser would, so a
# row weighted that much closer to the bottom of the float range flushes to 0.
# Kept small (DM with beta = 8: 2).
_FIXED_REFERENCE_WEIGHTED_SHIFT = 10.0


def _gatherable(target: torch.Tensor, cw: Optional[torch.Tensor], spec: KernelSpec) -> torch.Tensor:
    """``target`` with classes outside ``[0, V)`` ignored, to gather class weights before the row pass.

    Such a target counts nowhere (the row pass stops on it; on a GPU nothing
    checked it before): the class-weight gather must not be the one to fault first.
    """
    if cw is None:
        return target
    return torch.where((target >= 0) & (target < cw.shape[0]), target, spec.ignore_index)


def _fixed_reference(spec: KernelSpec, target, cw, sw, dtype: torch.dtype, chunks: int):
    """A reference ``R >= log D`` known before the first chunk, or None.

    ``D = sum_i |s_i| w_i <= S exp(hi)`` with ``hi`` the bound of ``log w``
    (``KernelSpec.log_weight_range``) and ``S = sum_i |s_i|`` over the rows
    that count, so ``R = log S + hi``; and ``D >= S exp(lo)``, so ``R - log D
    <= hi - lo``: relative to ``R`` each coefficient is at most ``exp(hi - lo)``
    smaller than relative to ``D``. Without class or sample weights ``S <= N``,
    known on the host: ``R = log N + hi`` (a float; ``N`` counts ignored rows
    too, so the spread is ``hi - lo + log N``). With weights ``S`` is a sum on
    the device, made once (a few small kernels, no host synchronisation): ``R``
    is a tensor, -inf when no row counts, NaN for a NaN weight (SPEC §6: it
    reaches D). None for one chunk: nothing is rescaled across chunks there,
    and coefficients made against ``R`` would need ``exp(R - log D)`` in
    backward, a second rounding of every 16-bit gradient held (on a GPU, one
    chunk's ``grad_weight`` too). ``R`` is used only where the chunk
    gradients are not float16 and, without weights, ``hi - lo + log N <=
    _FIXED_REFERENCE_SPAN`` (DM with ``beta = 8``: 2 + log N), with weights
    ``hi - lo <= _FIXED_REFERENCE_WEIGHTED_SHIFT``.
    """
    bounds = spec.log_weight_range
    n = target.shape[0]
    if bounds is None or n == 0 or dtype == torch.float16 or chunks < 2:
        return None
    lo, hi = bounds
    if cw is None and sw is None:
        return None if hi - lo + math.log(n) > _FIXED_REFERENCE_SPAN else math.log(n) + hi
    if hi - lo > _FIXED_REFERENCE_WEIGHTED_SHIFT:
        return None
    _, s, _ = _finalize.sample_scale(_gatherable(target, cw, spec), cw, sw, spec, acc_dtype(dtype))
    return torch.logsumexp(s.abs().log(), 0) + hi


def _shares(logs: torch.Tensor, total) -> torch.Tensor:
    """exp(logs - total): the shares of log-sum-exp parts in their total, 1 where they are equal.

    Equal infinities are what matters. Both -inf (nothing active yet): the
    coefficients made against them are all 0, so any finite factor keeps
    them 0. Both +inf (an infinite weight, |s_i| w_i = inf): a coefficient
    made against one infinite normaliser is already what it is against the
    other (s_i w_i / inf: 0, NaN for the infinite row itself), so the factor
    is 1, not exp(inf - inf) = NaN; as on materialised logits, only that
    row's gradient is NaN. A NaN part or total still gives NaN (SPEC §6: no
    NaN is hidden)."""
    return torch.where(logs == total, 1.0, torch.exp(logs - total))


def _chunk_grad(backend, g, z, t, st, spec, cw, cap, inplace):
    """The gradient of a chunk (or tile) of logits ``z``: over ``z`` itself when ``inplace``."""
    if inplace:
        backend.grad_inplace(g, z, t, st, spec, cw)
        return z
    gl = backend.grad(g, z, t, st, spec, cw)
    if cap is not None:
        _softcap_grad_(gl, z, cap)
    return gl


def _product_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out <- a @ b: one GEMM (float32 inside for 16-bit inputs), or float32 blocks where a CPU would emulate it.

    A float32 ``out`` of 16-bit operands gets the 16-bit product (rounded once) where the GEMM runs in 16 bits.
    """
    if _upcast_gemm(a.dtype, out.device.type):
        _upcast_product(out, a, b)
    elif out.dtype != a.dtype or torch.compiler.is_compiling():  # no out= into a view under Dynamo
        out.copy_(torch.mm(a, b))
    else:
        torch.mm(a, b, out=out)


class _LinearRobustCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, cw, sw, spec: KernelSpec, plan: _Plan, backend, group, cap):
        n = hidden.shape[0]
        v, hdim = weight.shape
        acc = acc_dtype(hidden.dtype)
        gif = plan.gif
        # A chunk's provisional coefficients: its own derivative-normalised
        # mean (rescaled below), or the plain sum ("mean": times its divisor, unnormalised_f below).
        chunk_normalised = replace(spec, reduction=Reduction.MEAN, normalize=True)
        chunk_sum = replace(spec, reduction=Reduction.SUM, normalize=False)
        needs_h, needs_w, needs_b = ctx.needs_input_grad[:3]
        rows = torch.empty((n, ROW_COLS), dtype=acc, device=hidden.device)

        if gif:
            own_h, own_w = _held_16bit(hidden.dtype, hidden.device.type, n <= plan.rows)
            gh = torch.empty((n, hdim), dtype=hidden.dtype if own_h else acc, device=hidden.device) if needs_h else None
            # The hybrid plan (tiled) leaves grad_weight and grad_bias to backward's tiles.
            needs_w, needs_b = needs_w and not plan.tiled, needs_b and not plan.tiled
            gw = _accumulator((v, hdim), weight.dtype if own_w else acc, hidden.device, n) if needs_w else None
            gb = torch.zeros((v,), dtype=acc, device=hidden.device) if needs_b else None
            one = torch.ones((), dtype=acc, device=hidden.device)
            ninf = torch.full((), -math.inf, dtype=acc, device=hidden.device)
            l_run = ninf
            l_after = []  # L_{<=k}: the reference of chunk k's provisional coefficients
            frame = None
            if spec.normalised:
                frame = _fixed_reference(spec, target, cw, sw, hidden.dtype, -(-n // plan.rows))
            # "mean"'s divisor sum_i weight[y_i], from the targets (unnormalised schemes).
            mean_f = None
            if not spec.normalised and spec.reduction == Reduction.MEAN:
                _, _, cw_rows = _finalize.sample_scale(_gatherable(target, cw, spec), cw, None, spec, acc)
                denom = cw_rows.sum()
                mean_f = torch.where(denom != 0, 1 / torch.where(denom != 0, denom, one), torch.zeros_like(denom))
            # Known before any chunk, it is every chunk's upstream factor inside the gradient op,
            # and backward is left with the upstream gradient alone (on a CPU nothing to do when
            # that is 1). Not in float16: a chunk's gradient entries, already ~1/V, would shrink
            # by the divisor too and fall below float16's range (15-22% error at N = 8192,
            # V = 4000, against 0.1% with the divisor applied in backward to the products).
            fold_mean = mean_f is not None and hidden.dtype != torch.float16
            unnormalised_f = mean_f if fold_mean else one

        buf = _chunk_buffer(n, plan.rows, v, hidden)
        for s, e in _chunks(n, plan.rows):
            z = _logits(hidden[s:e], weight, bias, out=None if buf is None else buf[: e - s])
            if cap is not None:
                _softcap_(z, cap)
            t = target[s:e]
            rows_k = backend.rows(z, t, spec, cw)
            rows[s:e] = rows_k
            if not gif:
                del z
                continue
            sw_k = None if sw is None else sw[s:e]
            if spec.normalised:
                # Provisional coef = s exp(log w - L_k) / 2 from the chunk's own
                # normaliser L_k = log sum |s| w, moved to the running reference
                # L_{<=k} by the factor f_k, passed to the gradient op as its
                # upstream scalar (it multiplies every coefficient of the chunk).
                _, st, l_k = backend.finalize(rows_k, t, chunk_normalised, cw, sw_k, log_denominator=True)
                l_new = torch.logaddexp(l_run, l_k)
                if frame is not None:
                    decay, f_k = None, _shares(l_k, frame)
                else:
                    decay, f_k = _shares(torch.stack((l_run, l_k)), l_new).unbind()
                    if gb is not None:
                        gb.mul_(decay)
                    l_after.append(l_new)
                l_run = l_new
            else:
                # Unnormalised: the coefficients are s times the row's own, times "mean"'s divisor.
                _, st = backend.finalize(rows_k, t, chunk_sum, cw, sw_k)
                decay, f_k = None, unnormalised_f
            gl = _chunk_grad(backend, f_k, z, t, st, spec, cw, cap, plan.inplace)
            del z
            if gh is not None:
                _product_into(gh[s:e], gl, weight)
            if gw is not None:
                _add_product(gw, gl.t(), hidden[s:e], decay, fresh=s == 0)
            if gb is not None:
                _add_column_sums(gb, gl)
            del gl

        value, stats = _finalize_all(backend, rows, target, spec, cw, sw, group)
        ctx.dtypes = (hidden.dtype, weight.dtype, weight.dtype)
        ctx.spec = spec
        ctx.plan = plan
        ctx.backend = backend
        ctx.cap = cap
        if gif:
            # The factor every stored gradient still needs, applied in backward together with
            # the upstream gradient (one pass over each, not one here and one there).
            scale = one
            row_scale = None  # grad_hidden's factor per row (the normalised mean)
            if spec.normalised:
                if frame is not None:
                    # From the fixed reference to L; D = 0 (nothing active) gives 0, not inf * 0; both
                    # +inf (an infinite weight) 1, as in _shares.
                    up = torch.exp(torch.where(l_run == frame, 0.0, frame - l_run))
                    scale = torch.where(l_run == -math.inf, 0.0, up)
                    rows_f = scale.expand(n)
                else:
                    # Each chunk's rows from its reference L_{<=k} to the final L (chunks are plan.rows
                    # long but the last: no host-made lengths, no copy to the device).
                    f = _shares(torch.stack(l_after), l_run) if l_after else one[None]
                    rows_f = f[:, None].expand(-1, plan.rows).reshape(-1)[:n]
                # One chunk took the final L as its reference itself: its rows' factor is exactly 1 (or
                # NaN for all, which the gradient op already gave every row that counts), none to apply.
                if gh is not None and (frame is not None or len(l_after) > 1):
                    # A NaN row makes D, so every factor, NaN; an ignored row's zero gradient stays
                    # zero (SPEC §5: it counts nowhere), as on materialised logits.
                    row_scale = torch.where(target == spec.ignore_index, 0.0, rows_f)[:, None]
            elif mean_f is not None and not fold_mean:
                scale = mean_f
            recompute = (hidden, weight, bias, target, stats, spec.smooth_weight(cw)) if plan.tiled else ()
            ctx.save_for_backward(gh, gw, gb, scale, row_scale, *recompute)
        else:
            ctx.save_for_backward(hidden, weight, bias, target, stats, spec.smooth_weight(cw))
        return value

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():  # create_graph=True: refuse rather than drop the second-order term
            raise RuntimeError("robustloss: double backward (create_graph=True) is not supported")
        plan = ctx.plan
        needs_h, needs_w, needs_b = ctx.needs_input_grad[:3]
        saved = ctx.saved_tensors
        gh = None
        if plan.gif:
            gh, gw, gb = _LinearRobustCE._backward_stored(ctx, grad, *saved[:5])
            if not plan.tiled:
                return (gh, gw, gb) + (None,) * 8
            saved = saved[5:]  # the hybrid: what the tiles recompute grad_weight and grad_bias from
        hidden, weight, bias, target, stats, u = saved
        grad = grad.to(stats.dtype)
        args = (ctx, grad, hidden, weight, bias, target, stats, u)
        if plan.gif or plan.split_rows:
            # The tiles for grad_weight and grad_bias alone; grad_hidden made in forward (the hybrid)
            # or after them from whole rows (the split, one GEMM more): each finished within its own
            # sweep, so no float32 sum across chunks is held.
            gw = gb = None
            if needs_w or needs_b:
                _, gw, gb = _LinearRobustCE._backward_tiled(*args, (False, needs_w, needs_b))
            if needs_h and plan.split_rows:
                gh, _, _ = _LinearRobustCE._backward_rows(*args, (True, False, False), plan.split_rows)
        elif plan.tiled:
            gh, gw, gb = _LinearRobustCE._backward_tiled(*args, (needs_h, needs_w, needs_b))
        else:
            gh, gw, gb = _LinearRobustCE._backward_rows(*args, (needs_h, needs_w, needs_b), plan.tile_rows)
        gw = None if gw is None else gw.to(weight.dtype)
        gb = None if gb is None else gb.to(weight.dtype)
        return (gh, gw, gb) + (None,) * 8

    @staticmethod
    def _backward_rows(ctx, grad, hidden, weight, bias, target, stats, u, needs, rows):
        """Recompute in chunks of ``rows`` whole rows: the ``needs`` of (grad_hidden, grad_weight, grad_bias),
        ``grad_weight`` summed across chunks in float32, each chunk's ``grad_hidden`` from one GEMM."""
        needs_h, needs_w, needs_b = needs
        acc = stats.dtype
        gh = torch.empty_like(hidden) if needs_h else None
        gw = _accumulator(weight.shape, acc, weight.device, hidden.shape[0]) if needs_w else None
        gb = torch.zeros(weight.shape[:1], dtype=acc, device=weight.device) if needs_b else None
        buf = _chunk_buffer(hidden.shape[0], rows, weight.shape[0], hidden)
        for s, e in _chunks(hidden.shape[0], rows):
            z = _logits(hidden[s:e], weight, bias, out=None if buf is None else buf[: e - s])
            if ctx.cap is not None:
                _softcap_(z, ctx.cap)
            g = grad[s:e] if grad.dim() == 1 else grad
            gl = _chunk_grad(ctx.backend, g, z, target[s:e], stats[s:e], ctx.spec, u, ctx.cap, ctx.plan.inplace)
            del z
            if gh is not None:
                _product_into(gh[s:e], gl, weight)
            if gw is not None:
                _add_product(gw, gl.t(), hidden[s:e], fresh=s == 0)
            if gb is not None:
                _add_column_sums(gb, gl)
            del gl
        return gh, gw, gb

    @staticmethod
    def _backward_tiled(ctx, grad, hidden, weight, bias, target, stats, u, needs):
        """Recompute in tiles of ``tile_rows x tile_cols`` logits, vocabulary blocks outermost: the ``needs``
        of (grad_hidden, grad_weight, grad_bias).

        Each block of ``grad_weight`` is finished before the next begins: one
        GEMM over all ``N`` rows when a tile has them all (float32 inside the
        GEMM, rounded once), else a float32 ``tile_cols x H`` sum over the
        row tiles. ``grad_hidden`` is summed over the blocks in float32. The
        gradient op sees a tile as rows of ``tile_cols + 8`` classes: a row
        whose class is outside the block has its target in the first spare
        column, whose gradient (``gamma``) is dropped with the spare columns;
        every other entry is elementwise in the row's statistics (spec §9), so
        the tile's gradient is the slice of the whole row's.
        """
        needs_h, needs_w, needs_b = needs
        plan, spec, cap = ctx.plan, ctx.spec, ctx.cap
        n, hdim = hidden.shape
        v = weight.shape[0]
        acc = stats.dtype
        dev = hidden.device
        # -1 is never a column of a tile, whatever the caller's ignore_index.
        tile_spec = replace(spec, ignore_index=-1)
        ignored = target == spec.ignore_index
        gh = torch.empty((n, hdim), dtype=acc, device=dev) if needs_h else None  # the first block writes it
        gw = _accumulator(weight.shape, weight.dtype, dev, n) if needs_w else None  # block by block
        gb = torch.empty((v,), dtype=acc, device=dev) if needs_b else None
        whole = plan.tile_rows >= n
        gw_block = None if whole or not needs_w else torch.empty((plan.tile_cols, hdim), dtype=acc, device=dev)
        buf = torch.empty(plan.tile_rows * (plan.tile_cols + _TILE_PAD), dtype=hidden.dtype, device=dev)
        pad_u = None if u is None else torch.ones((_TILE_PAD,), dtype=u.dtype, device=dev)
        for v0, v1 in _chunks(v, plan.tile_cols):
            c = v1 - v0
            w_blk = weight[v0:v1]
            b_blk = None if bias is None else bias[v0:v1]
            u_blk = None if u is None else torch.cat((u[v0:v1], pad_u))
            inside = (target >= v0) & (target < v1)
            t_blk = torch.where(ignored, -1, torch.where(inside, target - v0, c))
            if gb is not None:
                gb[v0:v1].zero_()
            for s, e in _chunks(n, plan.tile_rows):
                tile = buf[: (e - s) * (c + _TILE_PAD)].view(e - s, c + _TILE_PAD)
                z = tile[:, :c]
                _logits(hidden[s:e], w_blk, b_blk, out=z)
                tile[:, c:].zero_()
                if cap is not None:
                    _softcap_(z, cap)
                g = grad[s:e] if grad.dim() == 1 else grad
                gl = _chunk_grad(ctx.backend, g, tile, t_blk[s:e], stats[s:e], tile_spec, u_blk, None, plan.inplace)
                gl = gl[:, :c]
                if cap is not None:
                    _softcap_grad_(gl, z, cap)
                if gh is not None:
                    _add_product(gh[s:e], gl, w_blk, fresh=v0 == 0)
                if gw is not None:
                    if whole:
                        _product_into(gw[v0:v1], gl.t(), hidden)
                    else:
                        _add_product(gw_block[:c], gl.t(), hidden[s:e], fresh=s == 0)
                if gb is not None:
                    _add_column_sums(gb[v0:v1], gl)
                del gl, z, tile
            if gw_block is not None:
                gw[v0:v1].copy_(gw_block[:c])
        if gh is not None:
            gh = gh.to(hidden.dtype)
        return gh, gw, gb

    @staticmethod
    def _backward_stored(ctx, grad, gh, gw, gb, scale, row_scale):
        """The gradients stored in forward (None for those not stored) times ``grad`` and the forward's pending factor.

        On a GPU a float32 sum for a 16-bit parameter is scaled and rounded to
        the parameter's dtype in one pass. On a CPU it is scaled in place and
        then rounded: ATen's CPU kernel for a float32 product written as
        bfloat16 is not vectorised (19 ms against 11 ms for the two passes at
        32000 x 512). A gradient held in 16 bits (:func:`_held_16bit`) is
        scaled in float32, rounded once (:func:`_scale_16bit_`), and returned itself. Either way the stored
        gradients count as modified (those returned as they are too: the
        caller may change them), so a second backward through this graph
        fails autograd's saved-tensor version check instead of going wrong.
        """
        grad = grad.to(scale.dtype)
        factor = grad * scale
        compiling = torch.compiler.is_compiling()
        on_cpu = factor.device.type == "cpu"
        # On CPU the scalar is free to read: skip the multiply when it is 1.
        unit = not compiling and on_cpu and float(factor) == 1.0
        out = []
        for g, dt in zip((gh, gw, gb), ctx.dtypes):
            # grad_hidden of the normalised mean has a factor per row (never a unit one to skip).
            per_row = g is not None and g is gh and row_scale is not None
            f = grad * row_scale if per_row else factor
            if g is None:
                out.append(None)
            elif compiling:
                out.append((g.to(f.dtype) * f).to(dt))
            elif g.dtype != dt and not on_cpu:
                out.append(torch.empty_like(g, dtype=dt))
                _scale_into(g, f, out[-1])
                torch.autograd.graph.increment_version(g)
            else:
                if per_row or not unit:
                    if g.dtype != f.dtype:  # held in its 16-bit dtype (_held_16bit)
                        _scale_16bit_(g, f)
                    else:
                        g.mul_(f)
                elif g.dtype == dt:
                    torch.autograd.graph.increment_version(g)  # returned as it is: still counts as used
                out.append(g.to(dt))
        return tuple(out)


def _check(hidden, weight, bias, target, class_weight, sample_weight):
    if not all(isinstance(x, torch.Tensor) for x in (hidden, weight, target)):
        raise TypeError("hidden, weight and target must be tensors")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float16, bfloat16, float32 or float64, got {hidden.dtype}")
    if weight.dtype != hidden.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise TypeError(
            f"hidden, weight and bias must share one dtype, got {hidden.dtype}, {weight.dtype}"
            + ("" if bias is None else f", {bias.dtype}")
        )
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape (N, H), (B, T, H) or (..., H)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one row (V >= 1 classes)")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"bias must have shape ({weight.shape[0]},)")
    check_target_dtype(target)
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} must equal hidden.shape[:-1] = {tuple(hidden.shape[:-1])}"
        )
    for name, x in (("weight", weight), ("bias", bias), ("target", target), ("class_weight", class_weight),
                    ("sample_weight", sample_weight)):
        if x is not None and x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} but hidden is on {hidden.device}")
    if class_weight is not None:
        check_class_weight(class_weight, weight.shape[0], hidden.device, "class_weight")
    if sample_weight is not None:
        if not sample_weight.dtype.is_floating_point or tuple(sample_weight.shape) != tuple(target.shape):
            raise ValueError(f"sample_weight must be a floating tensor shaped like target {tuple(target.shape)}")


def linear_robust_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    scheme: Scheme,
    *,
    bias: Optional[torch.Tensor] = None,
    class_weight: Optional[torch.Tensor] = None,
    sample_weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalize: Optional[bool] = None,
    chunk_size: Optional[int] = None,
    memory_budget: Optional[int] = None,
    backend: str = "auto",
    process_group=None,
    grad_in_forward: Optional[bool] = None,
    label_smoothing: float = 0.0,
    softcap: Optional[float] = None,
) -> torch.Tensor:
    r"""``robust_cross_entropy(hidden @ weight.T + bias, target, scheme, ...)`` without the logits.

    The rows are processed ``chunk_size`` at a time; at most one chunk of
    logits and one of their gradient exist at once. See the module docstring
    for the two exact treatments of the cross-row normaliser ``D`` and their
    cost: **3 matmuls** (``grad_in_forward=True``) or **4 matmuls**
    (recompute in backward) of size ``N x H x V`` per forward + backward.

    Args:
        hidden: ``(N, H)``, ``(B, T, H)`` or ``(..., H)``; float32, float64,
            bfloat16 or float16.
        weight: ``(V, H)`` output projection (same dtype as ``hidden``).
        target: class indices shaped ``hidden.shape[:-1]``, each in ``[0, V)``
            or ``ignore_index``.
        scheme: a scheme of :mod:`robustloss_fast.schemes`.
        bias: optional ``(V,)``.
        class_weight: optional per-class weights ``(V,)`` (the ``weight`` of
            :func:`robust_cross_entropy`).
        sample_weight: optional per-element weights shaped like ``target``.
        ignore_index, reduction, normalize, label_smoothing: as in
            :func:`robust_cross_entropy` (``label_smoothing`` with ``CCE()``
            only; ``class_weight`` then weighs the smoothing sum, as there).
        chunk_size: rows per chunk (fixed); default: from ``memory_budget``.
        memory_budget: bytes of working memory the call may hold beyond its
            inputs and the gradients it returns (logit chunks, float32
            accumulators, row statistics; the model is ``_plan``'s
            docstring). ``None`` (default): chunks of about 64 MiB on CPUs
            and 2 GiB on GPUs, the path as ``grad_in_forward`` says. Given,
            the fastest plan that fits: the 3-matmul path with chunks of at
            least 256 rows, else the recompute path (4 matmuls), tiled over
            the vocabulary when whole rows do not fit -- the one that needs no
            ``V x H`` float32 accumulator for 16-bit weights; where even its
            ``N x H`` float32 ``grad_hidden`` sum leaves the tiles narrow,
            ``"mean"``/``"sum"`` get the hybrid (4 matmuls: ``grad_hidden``
            in forward, ``grad_weight`` from the tiles; no float32 sum across
            chunks, so tens of MiB suffice at LLM sizes). Exclusive with
            ``chunk_size``.
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"``
            (chosen as in :func:`robust_cross_entropy`); the chunk matmuls are
            ATen's, the row and gradient passes the backend's ops.
        process_group: with a ``torch.distributed`` group, ``D`` is taken over
            the whole group's batch (see :mod:`robustloss_fast.distributed`);
            uses the recompute path.
        grad_in_forward: ``None`` (default) picks the 3-matmul path for
            ``"mean"``/``"sum"`` when a gradient is needed, no
            ``process_group`` is given and ``memory_budget`` allows it;
            ``False`` forces the recompute path.
            ``True`` is refused for ``"none"`` (its upstream gradient is per
            element). After a ``grad_in_forward`` forward, only one backward
            may run through the graph (the stored gradients are scaled in
            place; a second backward raises autograd's in-place error).

        softcap: ``None`` or a positive ``c``: the logits are
            ``c * tanh((hidden @ weight.T + bias) / c)`` (final logit
            soft-capping, as in Gemma 2), in value and gradient.

    Returns:
        The loss as :func:`robust_cross_entropy` returns it (float32 for 16-bit
        inputs; shaped like ``target`` for ``reduction="none"``).
    """
    spec = kernel_spec(scheme, reduction, normalize, ignore_index, label_smoothing)
    check_not_differentiable(class_weight=class_weight, sample_weight=sample_weight)
    _check(hidden, weight, bias, target, class_weight, sample_weight)
    if grad_in_forward and (spec.reduction == Reduction.NONE or process_group is not None):
        raise ValueError("grad_in_forward=True needs reduction 'mean' or 'sum' and no process_group")
    if softcap is not None:
        # A cap given as any real scalar (a NumPy or one-element tensor included), named if not.
        softcap = real_scalar(softcap, "softcap")
        if not 0 < softcap < math.inf:
            raise ValueError(f"softcap must be None or a positive finite number, got {softcap!r}")
    be = backends.resolve(backend, hidden.device)

    v, hdim = weight.shape
    h2 = hidden.reshape(-1, hdim)
    if not h2.is_contiguous():
        h2 = h2.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    n = h2.shape[0]
    t = target.reshape(-1).long()
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if memory_budget is not None:
        if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 1:
            raise ValueError(f"memory_budget must be a positive int (bytes), got {memory_budget!r}")
        if chunk_size is not None:
            raise ValueError("give chunk_size or memory_budget, not both")
    acc = acc_dtype(hidden.dtype)
    cw = None if class_weight is None else class_weight.to(acc).contiguous()
    sw = None if sample_weight is None else sample_weight.reshape(-1).to(acc).contiguous()
    if (t.device.type == "cpu" or validating_targets()) and not torch.compiler.is_compiling():
        # Free on the CPU (a GPU pays one sync: opt-in), and it names the position
        # in the whole batch (a backend's own check sees one chunk at a time).
        check_target(t, v, ignore_index)

    needs = [torch.is_grad_enabled() and x is not None and x.requires_grad for x in (hidden, weight, bias)]
    if grad_in_forward is None:
        grad_in_forward = spec.reduction != Reduction.NONE and process_group is None
    plan = _plan(
        n, v, hdim, hidden.dtype, hidden.device.type, needs_h=needs[0], needs_w=needs[1], needs_b=needs[2],
        gif=bool(grad_in_forward) and any(needs), cap=softcap, budget=memory_budget, chunk_size=chunk_size,
    )  # fmt: skip
    value = _LinearRobustCE.apply(h2, weight, bias, t, cw, sw, spec, plan, be, process_group, softcap)
    value = scale_loss(value, spec)
    if spec.reduction == Reduction.NONE:
        value = value.reshape(target.shape)
    return value


class LinearRobustCrossEntropyLoss(nn.Module):
    """Module form of :func:`linear_robust_cross_entropy`.

    ``forward(hidden, weight, target, bias=None, sample_weight=None)``; the
    output layer's ``weight``/``bias`` are passed in (as with Liger's fused
    linear cross-entropy) so the module can sit after any ``nn.Linear``.
    ``class_weight`` is a registered buffer.
    """

    def __init__(
        self,
        scheme: Scheme,
        class_weight: Optional[torch.Tensor] = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        normalize: Optional[bool] = None,
        chunk_size: Optional[int] = None,
        memory_budget: Optional[int] = None,
        backend: str = "auto",
        process_group=None,
        grad_in_forward: Optional[bool] = None,
        label_smoothing: float = 0.0,
        softcap: Optional[float] = None,
    ):
        super().__init__()
        kernel_spec(scheme, reduction, normalize, ignore_index, label_smoothing)  # fail at construction
        self.scheme = scheme
        self.register_buffer("class_weight", class_weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.normalize = normalize
        self.chunk_size = chunk_size
        self.memory_budget = memory_budget
        self.backend = backend
        self.process_group = process_group
        self.grad_in_forward = grad_in_forward
        self.label_smoothing = label_smoothing
        self.softcap = softcap

    def forward(self, hidden, weight, target, bias=None, sample_weight=None):
        return linear_robust_cross_entropy(
            hidden,
            weight,
            target,
            self.scheme,
            bias=bias,
            class_weight=self.class_weight,
            sample_weight=sample_weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            normalize=self.normalize,
            chunk_size=self.chunk_size,
            memory_budget=self.memory_budget,
            backend=self.backend,
            process_group=self.process_group,
            grad_in_forward=self.grad_in_forward,
            label_smoothing=self.label_smoothing,
            softcap=self.softcap,
        )

    def extra_repr(self) -> str:
        return f"scheme={self.scheme!r}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"
