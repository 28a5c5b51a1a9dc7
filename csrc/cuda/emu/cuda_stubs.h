// Host stand-ins for the c10::cuda pieces robust_ce_cuda_ops.cpp uses, for the
// emulator (see shim.h): the "device" is host memory, there is one stream and
// nothing is ever captured into a CUDA graph.
#pragma once

#include <c10/core/Device.h>
#include <cuda_runtime_api.h>

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
enum class CaptureStatus { None, Active };
inline CaptureStatus currentStreamCaptureStatusMayInitCtx() { return CaptureStatus::None; }
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
}  // namespace c10::cuda
