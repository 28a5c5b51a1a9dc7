// The fused CPU kernels built for AVX512 (setup.py adds this file's flags).
#include "kernel_impl.h"

namespace robustloss {
namespace cpu {

Kernels kernels_AVX512() {
  return {&CPU_CAPABILITY::rows_impl, &CPU_CAPABILITY::backward_impl, "AVX512"};
}

}  // namespace cpu
}  // namespace robustloss
