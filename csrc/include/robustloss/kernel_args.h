// The arguments of the row and gradient kernels, shared by the CPU and CUDA
// backends. Plain pointers only: no at::Tensor crosses this line, so the
// capability-specific CPU objects and the .cu files need no ATen headers.
// The op layers fill them with make_rows_args / make_backward_args (checks.h).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "robustloss/schemes.h"

namespace robustloss {

// The columns of the row pass's output, rows (n, kRowCols), and of the stats
// the gradient pass reads, stats (n, kStatCols) (spec §9). (m, ls) is lse_nt =
// m + ls in its two parts (schemes.h: LseParts); P-form rows hold lse there.
// robustloss_fast/_common.py names the same columns (RowCol, StatCol), and
// tests/test_kernel_ids.py reads these enums back against it.
enum RowCol : int {
  kRowM = 0,
  kRowLs = 1,
  kRowLogW = 2,
  kRowX = 3,
  kRowAlpha = 4,
  kRowBeta = 5,
  kRowGamma = 6,
  kRowCols = 7,
};

// One row of the row pass's output, written in the column order above: the
// CPU and CUDA row kernels both store through these, so the order has one
// source. (m, ls) is lse_nt, or lse for a P-form row.
template <typename T>
RL_HD void store_row(T* out, LseParts<T> cols01, T log_w, const RowGrad<T>& g) {
  out[kRowM] = cols01.m;
  out[kRowLs] = cols01.ls;
  out[kRowLogW] = log_w;
  out[kRowX] = g.x;
  out[kRowAlpha] = g.alpha;
  out[kRowBeta] = g.beta;
  out[kRowGamma] = g.gamma;
}

// An ignored row (SPEC §5: it counts nowhere): log w = -inf drops it from every weighted sum,
// and m = -inf with zero coefficients gives it a zero gradient.
template <typename T>
RL_HD void store_ignored_row(T* out) {
  constexpr T kInf = std::numeric_limits<T>::infinity();
  store_row<T>(out, LseParts<T>{-kInf, T(0)}, -kInf, RowGrad<T>{T(0), T(0), T(0), T(0)});
}

enum StatCol : int {
  kStatM = 0,
  kStatLs = 1,
  kStatAlpha = 2,
  kStatBeta = 3,
  kStatGamma = 4,
  kStatCols = 5,
};

// The row pass (SPEC §2-§4): rows (n, kRowCols) = (m, ls, log w, x, alpha,
// beta, gamma) per row (schemes.h: RowGrad), in the accumulator type (float,
// or double for double logits).
struct RowsArgs {
  c10::ScalarType dtype;  // of the logits
  const void* logits;     // (n, c), classes contiguous, rows `row_stride` elements apart
  int64_t n, c, row_stride;
  const int64_t* target;  // (n,); the CPU checks it before the kernel, CUDA inside it (a device assertion)
  int64_t ignore_index;
  int64_t scheme;
  double a, b;
  bool normalised;                // derivative-normalised "mean": x = -log p
  const void* smooth_weight;      // (c,) accumulator type: u of label smoothing; nullptr = all 1
  void* rows;                     // (n, kRowCols) accumulator type
};

// The gradient pass, one row at a time: out_j = g (alpha r_j + beta u_j) for
// j != y, out_y = g gamma; r_j = exp((z_j - m) - ls) (0 when m = -inf).
struct BackwardArgs {
  c10::ScalarType dtype;
  const void* logits;
  int64_t n, c, row_stride;
  const int64_t* target;
  int64_t ignore_index;
  const void* stats;          // (n, kStatCols) accumulator type: m, ls, alpha, beta, gamma
  const void* smooth_weight;  // (c,) accumulator type: u; nullptr = all 1
  const void* grad;   // accumulator type: one value, or n values
  bool grad_per_row;
  void* out;  // (n, c) contiguous, dtype of the logits
  // NFL (kNFL) reads its stats in P-form: (m, ls) of lse, then (alpha, beta, gamma), with
  // out_j = g (alpha P_j + beta h(P_j)), h of schemes.h's focal_terms(a, ...).
  int64_t scheme = -1;
  double a = 0.0;
};

template <typename T>
struct TypeTag {
  using type = T;
};

// Call f(TypeTag<scalar_t>{}) for the logits dtype: the one switch over the
// four supported dtypes, shared by the CPU and CUDA launchers.
template <typename F>
void dispatch_logits_dtype(c10::ScalarType dtype, F&& f) {
  switch (dtype) {
    case c10::ScalarType::Float:
      return f(TypeTag<float>{});
    case c10::ScalarType::Double:
      return f(TypeTag<double>{});
    case c10::ScalarType::Half:
      return f(TypeTag<c10::Half>{});
    case c10::ScalarType::BFloat16:
      return f(TypeTag<c10::BFloat16>{});
    default:
      TORCH_CHECK(false, "robustloss: unsupported logits dtype ", dtype);
  }
}

}  // namespace robustloss
