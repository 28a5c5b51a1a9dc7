// What the three CUDA passes of robustloss (SPEC §2-§6) share, for float32,
// float16, bfloat16 (float32 accumulation) and float64 logits. Each pass is
// its own translation unit, so nvcc compiles them in parallel and a change to
// one recompiles only that one:
//
//   rows.cu      rows_kernel: the row statistics and coefficients, rows (N, 7)
//   finalize.cu  one_block_kernel, or partials_kernel + apply_kernel: the
//                cross-row step, stats (N, 5)
//   backward.cu  backward_kernel: the gradient
//
// None holds anything of size N x C. This header defines no kernel, so no
// kernel is compiled twice: its device functions are inlined into the kernels
// of the file that includes it, and its host helpers are inline (one copy in
// the binary).
//
// Determinism (SPEC §6.3): no atomics take part in any value. The order of
// every sum is fixed by (N, C, the row's address modulo 16 bytes): the same
// tensors give bitwise the same outputs, run after run.
//
// Bad targets (SPEC §6.4): the kernels check every target themselves; a row
// whose target is neither ignore_index nor in [0, C) is never read or written
// out of bounds. The row kernel stops with a device-side assertion naming the
// condition (RL_DEVICE_ASSERT below), as PyTorch's own CUDA losses do: the
// host never waits for the device to learn about it, so a training step
// issues no device-to-host synchronisation (and CUDA-graph capture needs no
// special case). Where the assertion cannot stop the kernel (the emulator
// records it and raises after the launch), the row's statistics are NaN;
// finalize counts such a row nowhere and backward writes a NaN row. The
// host-side check that names the value and its position is opt-in
// (robustloss_fast.set_validate_targets): it costs one synchronisation.
//
// Offsets: every row offset and column index is int64, so N * C past 2^31
// elements is fine.
//
// Without a GPU, csrc/cuda/emu/check_emu.py runs these files' code on a CPU
// emulation of blocks, warps and shuffles and compares every op with the
// reference (.ci/cuda_build_check.sh runs it after the nvcc build);
// tests/test_cuda.py is the on-device half.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "robust_ce_cuda.h"
#include "robustloss/schemes.h"

// A device-side assertion that NDEBUG does not remove (c10's CUDA_KERNEL_ASSERT_MSG):
// the kernel stops and the next CUDA call reports it. The emulator defines its own.
#ifndef RL_DEVICE_ASSERT
#define RL_DEVICE_ASSERT(cond, msg) CUDA_KERNEL_ASSERT_MSG(cond, msg)
#endif

// What a bad target's assertion says (ROBUSTLOSS_BAD_TARGET_MSG's words, without
// the value: the device has no formatted message).
#define RL_BAD_TARGET_ASSERT_MSG                                                                    \
  "robust_cross_entropy: target out of bounds: expected 0 <= target < num_classes or target == "  \
  "ignore_index (robustloss_fast.set_validate_targets(True) names the value and its position)"

namespace robustloss {
namespace cuda {

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <typename T>
__device__ __forceinline__ T inf() {
  return std::numeric_limits<T>::infinity();
}
template <typename T>
__device__ __forceinline__ T nan() {
  return std::numeric_limits<T>::quiet_NaN();
}

// Full-precision exp/log (not the approximate intrinsics): the gradient entries
// r_j far below 1 keep their relative accuracy.
__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }
__device__ __forceinline__ float dexpm1(float x) { return expm1f(x); }
__device__ __forceinline__ double dexpm1(double x) { return expm1(x); }
// The larger of a and b, and the other one where one is NaN (one FMNMX).
__device__ __forceinline__ float dmax(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double dmax(double a, double b) { return fmax(a, b); }

// 2^x by the hardware's ex2 alone (MUFU.EX2; x < -126 gives 0). __expf would
// be the same ex2 plus a compare and two predicated multiplies per call, which
// keep its results below 2^-126 from flushing to 0.
__device__ __forceinline__ float ex2_ftz(float x) {
#ifdef __CUDA_ARCH__
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#else  // the emulator (csrc/cuda/emu: ex2's own error and the flush not modelled); nvcc's host pass never calls it
  return exp2f(x);
#endif
}

// The exp of the per-element loops over logits of type T (the row pass's
// online sum, backward's exp(z - m)), where it sets the instruction count: at
// 16384 x 128256 bf16 those loops issued about as many instructions as their
// bytes take to move, and expf is 8 of them per logit, a range reduction around
// ex2 (benchmarks/NOTES.md, "what the SASS says"). For 16-bit logits it is
// ex2(x log2 e): a relative error of about 2^-22 + |x| 2^-24 (x = z - m <= 0;
// results below 2^-126 are 0), far under the 2^-9 (bf16) or 2^-12 (float16)
// rounding of every gradient entry written, and at most ~3e-7 relative on the
// float32 sum of the row's terms (a term e^x <= 1 carries |x| e^x 2^-24 <=
// 2^-24 / e). float32 and float64 logits keep the full-precision exp: their
// gradients are compared at float32 precision. RL_ACCURATE_EXP (setup.py:
// ROBUSTLOSS_ACCURATE_EXP=1) gives 16-bit logits expf too: the A/B of
// benchmarks/gpu_suite.sh's fastexp stage.
template <typename T>
__device__ __forceinline__ typename AccOf<T>::type exp_elem(typename AccOf<T>::type x) {
#ifndef RL_ACCURATE_EXP
  if constexpr (sizeof(T) == 2) return ex2_ftz(x * 1.44269504f);  // log2 e, rounded to float
#endif
  return dexp(x);
}

// ---------------------------------------------------------------------------
// 16-byte packs and row alignment

constexpr int kPackBytes = 16;

template <typename T>
struct Pack {
  static constexpr int kVec = kPackBytes / static_cast<int>(sizeof(T));
  T v[kVec];
};

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {  // p is 16-byte aligned
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  Pack<T> out;
  memcpy(&out, &raw, kPackBytes);
  return out;
}

// The same through the ordinary (coherent) path, for memory the kernel may also
// write: backward's loads, whose in-place form breaks __ldg's read-only contract
// (one load path keeps its loop one copy; a read-once stream gains nothing from
// the read-only cache).
template <typename T>
__device__ __forceinline__ Pack<T> load_pack_coherent(const T* p) {  // p is 16-byte aligned
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  Pack<T> out;
  memcpy(&out, &raw, kPackBytes);
  return out;
}

// A pack of values in the logits' type, rounded from acc_t (built in the
// registers, then stored once by store_pack).
template <typename T, int K>
__device__ __forceinline__ Pack<T> pack_of(const typename AccOf<T>::type (&v)[K]) {
  static_assert(K == Pack<T>::kVec, "one pack");
  Pack<T> pk;
#pragma unroll
  for (int k = 0; k < K; ++k) pk.v[k] = static_cast<T>(v[k]);
  return pk;
}

// One 16-byte store, streaming (st.global.cs: evict-first, since nothing here
// reads the gradient back). A plain uint4 assignment was split by the compiler
// into four 4-byte stores (bf16) or two 8-byte ones (float), seen in the PTX of
// backward_kernel; __stwb kept one st.global.v4 but as a strong (.STRONG.SM)
// store in the SASS. __stcs is one weak STG.E.EF.128.
template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& pk) {  // p is 16-byte aligned
  uint4 raw;
  memcpy(&raw, &pk, kPackBytes);
  __stcs(reinterpret_cast<uint4*>(p), raw);
}

// x[d] = v when 0 <= d < K, else nothing: the one element of a pack that is
// the row's target (d = y - the pack's first column), at the cost of one
// compare per pack instead of one per element.
template <int K, typename V>
__device__ __forceinline__ void set_at(V (&x)[K], int64_t d, V v) {
  if (static_cast<uint64_t>(d) < static_cast<uint64_t>(K)) {
#pragma unroll
    for (int k = 0; k < K; ++k) x[k] = k == d ? v : x[k];
  }
}

// Elements before the first 16-byte boundary of a row (all of them when the
// pointer is not even element-aligned, so nothing is ever loaded misaligned).
template <typename T>
__device__ __forceinline__ int64_t head_count(const T* p, int64_t c) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(p);
  if (addr % sizeof(T) != 0) return c;
  const int64_t h = static_cast<int64_t>(((kPackBytes - (addr % kPackBytes)) % kPackBytes) / sizeof(T));
  return h < c ? h : c;
}

// ---------------------------------------------------------------------------
// Online logsumexp over the non-target classes

template <typename acc_t>
struct Lse {
  acc_t m;  // running max of the finite values (-inf: none yet)
  acc_t s;  // sum of exp(value - m)
  int bad;  // saw NaN or +inf: the row's lse_nt is NaN (SPEC §6)
};

template <typename acc_t>
__device__ __forceinline__ Lse<acc_t> lse_identity() {
  return Lse<acc_t>{-inf<acc_t>(), acc_t(0), 0};
}

template <typename T, typename acc_t>
__device__ __forceinline__ void lse_add(Lse<acc_t>& st, acc_t x) {
  if (x != x || x == inf<acc_t>()) {
    st.bad = 1;
  } else if (x > st.m) {  // also the first finite value: s * exp(-inf) = 0
    st.s = st.s * exp_elem<T>(st.m - x) + acc_t(1);
    st.m = x;
  } else if (x != -inf<acc_t>()) {
    st.s += exp_elem<T>(x - st.m);
  }
}

// A pack at once: one max and one rescale per pack, and no test of its own per
// element. NaN and +inf are not looked for here: a NaN makes exp(NaN - m) NaN
// (fmax skips it in the max), a +inf becomes the max and adds exp(inf - inf) =
// NaN, and from then on s stays NaN; lse_seal turns that into bad. -inf adds
// exp(-inf - m) = 0; while the max is still -inf the terms are taken against 0
// instead (-inf - -inf would be NaN: GPU_NOTES, masked lanes).
template <typename T, typename acc_t, int K>
__device__ __forceinline__ void lse_add_pack(Lse<acc_t>& st, const acc_t (&x)[K]) {
  acc_t vmax = x[0];
#pragma unroll
  for (int k = 1; k < K; ++k) vmax = dmax(vmax, x[k]);
  if (vmax > st.m) {  // NaN > m is false; the first finite pack: s * exp(-inf) = 0
    st.s *= exp_elem<T>(st.m - vmax);
    st.m = vmax;
  }
  const acc_t m = st.m == -inf<acc_t>() ? acc_t(0) : st.m;
#pragma unroll
  for (int k = 0; k < K; ++k) st.s += exp_elem<T>(x[k] - m);
}

// After lse_add_pack's last pack: a NaN sum means the share saw NaN or +inf.
template <typename acc_t>
__device__ __forceinline__ void lse_seal(Lse<acc_t>& st) {
  if (st.s != st.s) st.bad = 1;
}

template <typename acc_t>
__device__ __forceinline__ void lse_merge(Lse<acc_t>& a, const Lse<acc_t>& b) {
  a.bad |= b.bad;
  if (b.m == -inf<acc_t>()) return;
  if (a.m == -inf<acc_t>()) {
    a.m = b.m;
    a.s = b.s;
  } else if (b.m > a.m) {
    a.s = a.s * dexp(a.m - b.m) + b.s;
    a.m = b.m;
  } else {
    a.s += b.s * dexp(b.m - a.m);
  }
}

// Butterfly over WIDTH lanes; every lane of the warp must call it. Lane 0 of
// each WIDTH-group ends with a result whose merge order is fixed.
template <int WIDTH, typename acc_t>
__device__ __forceinline__ Lse<acc_t> lse_warp_reduce(Lse<acc_t> v) {
#pragma unroll
  for (int off = WIDTH / 2; off > 0; off >>= 1) {
    Lse<acc_t> o;
    o.m = __shfl_xor_sync(0xffffffffu, v.m, off, WIDTH);
    o.s = __shfl_xor_sync(0xffffffffu, v.s, off, WIDTH);
    o.bad = __shfl_xor_sync(0xffffffffu, v.bad, off, WIDTH);
    lse_merge(v, o);
  }
  return v;
}

// The sum pair of the two-term schemes' second pass: spread = sum_k u_k (M
// - z_k) (schemes.h: spread_ref) and U = sum_k u_k (U only with a smooth weight: else it is C); for
// NFL, (sum F_k, sum h_k) over the non-target classes.
template <typename acc_t>
struct Spread {
  acc_t s, u;
};

template <int WIDTH, typename acc_t>
__device__ __forceinline__ Spread<acc_t> spread_warp_reduce(Spread<acc_t> v) {
#pragma unroll
  for (int off = WIDTH / 2; off > 0; off >>= 1) {
    v.s += __shfl_xor_sync(0xffffffffu, v.s, off, WIDTH);
    v.u += __shfl_xor_sync(0xffffffffu, v.u, off, WIDTH);
  }
  return v;
}

// Whole-block reduction (TPR == BLOCK > 32) through one warp's shuffle tree
// per level; every thread must call it. The result is valid in thread 0.
template <int BLOCK, typename V, typename WarpReduce>
__device__ __forceinline__ V block_reduce(V v, V* smem, const V& identity, WarpReduce warp_reduce) {
  constexpr int kWarps = BLOCK / 32;
  v = warp_reduce(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? smem[lane] : identity;
    v = warp_reduce(v);
  }
  __syncthreads();  // smem is reused by the block's next row
  return v;
}

// Number of packs each thread loads before it uses any: bytes in flight.
constexpr int kUnroll = 4;
// NFL's passes (forward and backward) evaluate exp, expm1, log, a power and a
// division per element, so they should be bound by arithmetic rather than by
// bytes in flight (not yet timed on a GPU): one pack at a time. Unrolled by 4
// their inlined math doubled nvcc's time for the kernels.
constexpr int kFocalUnroll = 1;

// ---------------------------------------------------------------------------
// Launch configuration (host)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int grid_for(int64_t blocks) {
  constexpr int64_t kMaxGrid = 2147483647;  // gridDim.x limit; the kernels loop past it
  return static_cast<int>(blocks < kMaxGrid ? blocks : kMaxGrid);
}

// The row and gradient passes give each row a group of TPR threads: 4 or 32
// lanes of a warp for small C, so a block holds several rows, or a whole block
// of 128 or 512 threads for large C. TPR follows the row's length in 16-byte
// packs, about 2 to 32 packs per thread.
enum class Layout { kQuad, kWarp, kBlock128, kBlock512 };

template <typename T>
Layout layout_for(int64_t c) {
  const int64_t packs = ceil_div(c, Pack<T>::kVec);
  if (packs <= 8) return Layout::kQuad;
  if (packs <= 128) return Layout::kWarp;
  if (packs <= 2048) return Layout::kBlock128;
  return Layout::kBlock512;
}

// f(TPR, BLOCK) as integral constants for the layout of rows of c classes:
// the one switch over layouts, shared by the row and backward launchers.
template <typename T, typename F>
void with_layout(int64_t c, F&& f) {
  using std::integral_constant;
  switch (layout_for<T>(c)) {
    case Layout::kQuad:
      return f(integral_constant<int, 4>{}, integral_constant<int, 128>{});
    case Layout::kWarp:
      return f(integral_constant<int, 32>{}, integral_constant<int, 128>{});
    case Layout::kBlock128:
      return f(integral_constant<int, 128>{}, integral_constant<int, 128>{});
    case Layout::kBlock512:
      return f(integral_constant<int, 512>{}, integral_constant<int, 512>{});
  }
}

}  // namespace cuda
}  // namespace robustloss
