// Interface between the op layer (csrc/cpu/robust_ce_cpu.cpp) and the fused row
// kernels, which are compiled once per CPU instruction set (kernel_*.cpp) and
// chosen at run time. Plain pointers only: no at::Tensor crosses this line, so
// the capability-specific objects share as little inline code as possible.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace robustloss {
namespace cpu {

struct RowsArgs {
  c10::ScalarType dtype;  // of the logits; statistics are in float32 (float64 for double)
  const void* logits;
  int64_t n, c, row_stride;
  const int64_t* target;  // already validated
  int64_t ignore_index;
  int64_t scheme;
  double a, b;
  bool normalised;  // derivative-normalised "mean": x = -log p
  void* rows;       // (n, 3) accumulator type: lse_nt, log w, x
};

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

using RowsFn = void (*)(const RowsArgs&);
using BackwardFn = void (*)(const BackwardArgs&);

struct Kernels {
  RowsFn rows;
  BackwardFn backward;
  const char* name;
};

// Defined in kernel_default.cpp / kernel_avx2.cpp / kernel_avx512.cpp.
Kernels kernels_DEFAULT();
Kernels kernels_AVX2();
Kernels kernels_AVX512();

// The fastest variant this CPU supports (chosen once).
const Kernels& kernels();

}  // namespace cpu
}  // namespace robustloss
