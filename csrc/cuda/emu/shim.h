// A CPU emulation of the parts of the CUDA execution model that the kernels of
// csrc/cuda (*.cu, common.cuh) use, so that their own code runs (and is
// checked against the reference) on machines without a GPU. Not part of the
// extension: setup.py compiles only csrc/cuda/*.cu and csrc/cuda/*.cpp.
//
// - one std::thread per CUDA thread of a block; the blocks of a grid run one
//   after another, so __shared__ can be a function-local static;
// - __syncthreads is a barrier of the block's threads;
// - __shfl_xor_sync and __shfl_sync are per-warp exchanges between two
//   barriers, so a warp whose lanes do not all reach the same shuffle
//   deadlocks here (on a GPU it would be undefined behaviour);
// - 16-byte loads and stores abort unless 16-byte aligned, as they would fault
//   on a GPU;
// - EMU_MAX_GRID caps the grid of the grid-stride kernels, to exercise their
//   loops with few rows; EMU_ONE_BLOCK_MAX_ROWS, when set, replaces the row
//   count up to which finalize.cu takes its one-launch path (0: never);
// - a device-side assertion (RL_DEVICE_ASSERT) that fails is recorded, the
//   thread goes on, and the launch raises it as a RuntimeError once the
//   block's threads are joined (on a GPU the kernel stops and the next CUDA
//   call fails with it).
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>  // cudaStream_t, uint4

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

namespace emu {

inline std::atomic<const char*> failed_assertion{nullptr};

inline void device_assert(bool cond, const char* msg) {
  if (!cond) failed_assertion.store(msg);
}

}  // namespace emu

#define RL_DEVICE_ASSERT(cond, msg) emu::device_assert(static_cast<bool>(cond), msg)
#define RL_ONE_BLOCK_MAX_ROWS(rows) emu::env_int("EMU_ONE_BLOCK_MAX_ROWS", static_cast<int>(rows))

namespace emu {

struct Dim {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local Dim thread_idx, block_idx;
inline Dim grid_dim, block_dim;

struct Warp {
  std::unique_ptr<std::barrier<>> bar;
  alignas(8) unsigned char slot[32][8];
};
inline std::vector<std::unique_ptr<Warp>> warps;
inline std::atomic<int64_t> launches{0};  // every launch so far (check_emu's emu_launches op reads it)
inline std::unique_ptr<std::barrier<>> block_barrier;

inline int env_int(const char* name, int otherwise) {
  const char* e = std::getenv(name);
  return e ? std::atoi(e) : otherwise;
}

inline int max_grid() { return env_int("EMU_MAX_GRID", 1 << 30); }

[[noreturn]] inline void fault(const char* what) {
  std::fprintf(stderr, "emulated CUDA fault: %s\n", what);
  std::abort();
}

// kernel<<<grid, block>>>(p); `exact` kernels index blocks directly (no grid-stride loop).
template <typename P>
void launch(void (*kernel)(P), int grid, int block, P p, bool exact) {
  launches.fetch_add(1);
  if (!exact && grid > max_grid()) grid = max_grid();
  grid_dim = Dim{static_cast<unsigned>(grid), 1, 1};
  block_dim = Dim{static_cast<unsigned>(block), 1, 1};
  block_barrier = std::make_unique<std::barrier<>>(block);
  warps.clear();
  for (int w = 0; w < (block + 31) / 32; ++w) {
    auto warp = std::make_unique<Warp>();
    warp->bar = std::make_unique<std::barrier<>>(block - 32 * w < 32 ? block - 32 * w : 32);
    warps.push_back(std::move(warp));
  }
  std::vector<std::thread> threads;
  for (int t = 0; t < block; ++t) {
    threads.emplace_back([=] {
      thread_idx = Dim{static_cast<unsigned>(t), 0, 0};
      for (int b = 0; b < grid; ++b) {
        block_idx = Dim{static_cast<unsigned>(b), 0, 0};
        kernel(p);
        block_barrier->arrive_and_wait();
      }
    });
  }
  for (auto& t : threads) t.join();
  if (const char* msg = failed_assertion.exchange(nullptr)) {
    TORCH_CHECK(false, "emulated CUDA error: device-side assertion failed: ", msg);
  }
}

}  // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define gridDim emu::grid_dim
#define blockDim emu::block_dim

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned, T v, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8, "one register");
  const int lane = static_cast<int>(threadIdx.x % 32);
  auto& warp = *emu::warps[threadIdx.x / 32];
  std::memcpy(warp.slot[lane], &v, sizeof(T));
  warp.bar->arrive_and_wait();
  const int seg = lane / width * width;
  T out;
  std::memcpy(&out, warp.slot[seg + ((lane - seg) ^ lane_mask)], sizeof(T));
  warp.bar->arrive_and_wait();
  return out;
}

// Lane src_lane of this lane's width-segment.
template <typename T>
T __shfl_sync(unsigned, T v, int src_lane, int width = 32) {
  static_assert(sizeof(T) <= 8, "one register");
  const int lane = static_cast<int>(threadIdx.x % 32);
  auto& warp = *emu::warps[threadIdx.x / 32];
  std::memcpy(warp.slot[lane], &v, sizeof(T));
  warp.bar->arrive_and_wait();
  const int seg = lane / width * width;
  T out;
  std::memcpy(&out, warp.slot[seg + src_lane % width], sizeof(T));
  warp.bar->arrive_and_wait();
  return out;
}

template <typename T>
T __ldg(const T* p) {
  if (sizeof(T) == 16 && reinterpret_cast<uintptr_t>(p) % 16 != 0) emu::fault("misaligned 16-byte load");
  return *p;
}

// The one 16-byte store the kernels make (common.cuh: store_pack).
inline void __stcs(uint4* p, uint4 v) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) emu::fault("misaligned 16-byte store");
  *p = v;
}

inline long long atomicMin(long long* p, long long v) {
  std::atomic_ref<long long> a(*p);
  long long cur = a.load();
  while (v < cur && !a.compare_exchange_weak(cur, v)) {
  }
  return cur;
}
