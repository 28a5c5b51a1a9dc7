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

namespace robustloss {

// The row pass (SPEC §2-§4): rows (n, 6) = (lse_nt, log w, x, alpha, beta,
// gamma) per row (schemes.h: RowGrad), in the accumulator type (float, or
// double for double logits).
struct RowsArgs {
  c10::ScalarType dtype;  // of the logits
  const void* logits;     // (n, c), classes contiguous, rows `row_stride` elements apart
  int64_t n, c, row_stride;
  const int64_t* target;  // (n,); the CPU checks it before the kernel, CUDA inside it
  int64_t ignore_index;
  int64_t scheme;
  double a, b;
  bool normalised;                // derivative-normalised "mean": x = -log p
  const void* smooth_weight;      // (c,) accumulator type: u of label smoothing; nullptr = all 1
  void* rows;                     // (n, 6) accumulator type
  int64_t* first_bad = nullptr;   // CUDA: device slot preset to n, lowered to the first bad row
};

// The gradient pass, one row at a time: out_j = g (alpha r_j + beta u_j) for
// j != y, out_y = g gamma; r_j = exp(z_j - lse_nt) (0 when lse_nt = -inf).
struct BackwardArgs {
  c10::ScalarType dtype;
  const void* logits;
  int64_t n, c, row_stride;
  const int64_t* target;
  int64_t ignore_index;
  const void* stats;          // (n, 4) accumulator type: lse_nt, alpha, beta, gamma
  const void* smooth_weight;  // (c,) accumulator type: u; nullptr = all 1
  const void* grad;   // accumulator type: one value, or n values
  bool grad_per_row;
  void* out;  // (n, c) contiguous, dtype of the logits
  // NFL (kNFL) reads its stats in P-form: (lse, alpha, beta, gamma) with
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
