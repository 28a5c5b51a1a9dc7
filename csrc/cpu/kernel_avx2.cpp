// The fused CPU kernels built for AVX2 (setup.py adds this file's flags).
#include "kernel_impl.h"

namespace robustloss {
namespace cpu {

Kernels kernels_AVX2() {
  return {&CPU_CAPABILITY::rows_impl, &CPU_CAPABILITY::backward_impl, "AVX2"};
}

}  // namespace cpu
}  // namespace robustloss
