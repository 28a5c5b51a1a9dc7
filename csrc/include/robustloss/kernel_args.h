// The arguments of the row and gradient kernels, shared by the CPU and CUDA
// backends. Plain pointers only: no at::Tensor crosses this line, so the
// capability-specific CPU objects and the .cu file need no ATen headers.
// The op layers fill them with make_rows_args / make_backward_args (checks.h).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace robustloss {

// The row pass (SPEC §2-§4): rows (n, 3) = (lse_nt, log w, x) per row, in the
// accumulator type (float, or double for double logits).
struct RowsArgs {
  c10::ScalarType dtype;  // of the logits
  const void* logits;     // (n, c), classes contiguous, rows `row_stride` elements apart
  int64_t n, c, row_stride;
  const int64_t* target;  // (n,); the CPU checks it before the kernel, CUDA inside it
  int64_t ignore_index;
  int64_t scheme;
  double a, b;
  bool normalised;                // derivative-normalised "mean": x = -log p
  void* rows;                     // (n, 3) accumulator type
  int64_t* first_bad = nullptr;   // CUDA: device slot preset to n, lowered to the first bad row
};

// The gradient pass: out = g * coef * (r - e_y), one row at a time.
struct BackwardArgs {
  c10::ScalarType dtype;
  const void* logits;
  int64_t n, c, row_stride;
  const int64_t* target;
  int64_t ignore_index;
  const void* stats;  // (n, 2) accumulator type: lse_nt, coef
  const void* grad;   // accumulator type: one value, or n values
  bool grad_per_row;
  void* out;  // (n, c) contiguous, dtype of the logits
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
