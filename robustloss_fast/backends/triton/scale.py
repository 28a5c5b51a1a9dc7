r"""The Triton kernel that scales a stored gradient once: ``out = src * f``, rounded once.

The fused linear layer (``robustloss_fast/linear.py``, gradient in forward)
holds ``grad_hidden``, ``grad_weight`` and ``grad_bias`` from its forward and
multiplies them in backward by the upstream gradient times a pending factor:
a 0-dim ``f``, or one value per row of ``grad_hidden`` (the normalised mean
over several chunks). With 16-bit parameters, ``src`` is the 16-bit gradient
itself (``out`` is ``src``) or its float32 sum (``out`` 16-bit).

Math: ``out_ij = round(float32(src_ij) * f_i)`` with ``f_i = f`` for a scalar:
the float32 product rounded once to ``out``'s dtype, as
``torch.mul(src, f.reshape(1, 1), out=out)`` computes it. ATen runs that
mixed-dtype product through its casting elementwise path: on an H200 the
two such passes of a step at N = 8192, H = 4096, V = 128256 took 2.6 ms,
nearly all of it the bf16 ``grad_weight`` (2.1 GB moved at about 0.8 TB/s,
against 4.3 TB/s for a copy: ``benchmarks/NOTES.md``, 2026-12-01). Here each
program streams ``BLOCK`` contiguous values.

A scalar ``f`` equal to 1 written over its own ``src`` changes nothing (``x *
1 = x`` exactly, and its rounding is the identity), so with ``SKIP_ONE`` every
load and store is masked off and the pass costs one launch. That is the
common case: ``loss.backward()`` passes an upstream gradient of 1, and a
fused linear of one chunk has no pending factor.
"""

import triton
import triton.language as tl


@triton.jit
def scale_kernel(
    src_ptr,
    f_ptr,
    out_ptr,
    n_elements,
    n_cols,
    PER_ROW: tl.constexpr,
    SKIP_ONE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out[k] = src[k] * f (f[k // n_cols] with PER_ROW), in float32, for BLOCK elements of the flat arrays."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if PER_ROW:
        live = offs < n_elements
        f = tl.load(f_ptr + offs // n_cols, mask=live, other=0.0).to(tl.float32)
    else:
        f = tl.load(f_ptr).to(tl.float32)
        if SKIP_ONE:  # nothing to do: no element is live
            n_elements = tl.where(f != 1.0, n_elements, 0)
        live = offs < n_elements
    x = tl.load(src_ptr + offs, mask=live, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (x * f).to(out_ptr.dtype.element_ty), mask=live)
