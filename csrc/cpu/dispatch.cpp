// Run-time choice of the CPU kernel variant, by what this CPU supports.
// ROBUSTLOSS_CPU_CAPABILITY=default|avx2|avx512 caps it (for testing every
// variant on one machine), like ATEN_CPU_CAPABILITY does for ATen.
#include <cstdlib>
#include <cstring>

#include "kernel.h"

namespace robustloss {
namespace cpu {

namespace {
Kernels choose() {
  const char* cap = std::getenv("ROBUSTLOSS_CPU_CAPABILITY");
  const bool allow512 = cap == nullptr || std::strcmp(cap, "avx512") == 0;
  const bool allow2 = allow512 || std::strcmp(cap, "avx2") == 0;
#if defined(ROBUSTLOSS_X86_VARIANTS) && defined(__GNUC__)
  __builtin_cpu_init();
  if (allow512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return kernels_AVX512();
  }
  if (allow2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return kernels_AVX2();
  }
#else
  (void)allow2;
#endif
  return kernels_DEFAULT();
}
}  // namespace

const Kernels& kernels() {
  static const Kernels chosen = choose();
  return chosen;
}

}  // namespace cpu
}  // namespace robustloss
