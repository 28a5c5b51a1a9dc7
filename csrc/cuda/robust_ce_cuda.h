// Interface between the CUDA op layer (robust_ce_cuda_ops.cpp, host compiler)
// and the CUDA kernels (robust_ce_cuda.cu, nvcc). Plain pointers only, as in
// csrc/cpu/kernel.h: no at::Tensor crosses this line, so the .cu file needs no
// ATen headers and nvcc compiles it quickly.
#pragma once

#include <c10/core/ScalarType.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace robustloss {
namespace cuda {

// The row pass (SPEC §2-§4): rows (n, 3) = (lse_nt, log w, x) per row, in the
// accumulator type (float, or double for double logits).
struct RowsArgs {
  c10::ScalarType dtype;  // of the logits
  const void* logits;     // (n, c), classes contiguous, rows `row_stride` elements apart
  int64_t n, c, row_stride;
  const int64_t* target;  // (n,) device; NOT validated: the kernel checks every value
  int64_t ignore_index;
  int64_t scheme;
  double a, b;
  bool normalised;     // derivative-normalised "mean": x = -log p
  void* rows;          // (n, 3) accumulator type
  int64_t* first_bad;  // device slot preset to n; lowered to the first row with a bad target
};

// The cross-row step (SPEC §5) on the device: (value, stats) from rows.
struct FinalizeArgs {
  bool is_double;  // accumulator type of rows/weights/value/stats
  const void* rows;
  const int64_t* target;
  int64_t n, c, ignore_index;
  const void* weight;         // (c,) accumulator type, or nullptr
  const void* sample_weight;  // (n,) accumulator type, or nullptr
  int64_t reduction;
  bool normalize;
  double* workspace;  // finalize_workspace_size(n) doubles
  void* value;        // (n,) for reduction none, else one element
  void* stats;        // (n, 2): lse_nt, coef
};

// Doubles of scratch the finalize step needs for n rows (0 for n == 0).
int64_t finalize_workspace_size(int64_t n);

// The gradient pass: out = g * coef * (r - e_y), one row at a time.
struct BackwardArgs {
  c10::ScalarType dtype;
  const void* logits;
  int64_t n, c, row_stride;
  const int64_t* target;
  int64_t ignore_index;
  const void* stats;  // (n, 2) accumulator type
  const void* grad;   // accumulator type: one value, or n values
  bool grad_per_row;
  void* out;  // (n, c) contiguous, dtype of the logits
};

// Each launches on `stream` and checks the launch; n must be > 0.
void launch_rows(const RowsArgs& args, cudaStream_t stream);
void launch_finalize(const FinalizeArgs& args, cudaStream_t stream);
void launch_backward(const BackwardArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace robustloss
