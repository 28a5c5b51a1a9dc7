// Interface between the op layer (csrc/cpu/robust_ce_cpu.cpp) and the fused row
// kernels, which are compiled once per CPU instruction set (kernel_*.cpp) and
// chosen at run time. Plain pointers only: no at::Tensor crosses this line, so
// the capability-specific objects share as little inline code as possible.
#pragma once

#include "robustloss/kernel_args.h"

#include <cstdint>

namespace robustloss {
namespace cpu {

using robustloss::BackwardArgs;
using robustloss::RowsArgs;

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
