// The fused CPU kernels built for DEFAULT (setup.py adds this file's flags).
#include "kernel_impl.h"

namespace robustloss {
namespace cpu {

Kernels kernels_DEFAULT() {
  return {&CPU_CAPABILITY::rows_impl, &CPU_CAPABILITY::backward_impl, "DEFAULT"};
}

}  // namespace cpu
}  // namespace robustloss
