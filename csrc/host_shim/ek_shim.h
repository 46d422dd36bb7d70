// A small SIMT shim: the CUDA dialect the kernels in csrc/ use, for the host compiler (g++).
//
// Built only by effnet_kernels/cuda_host.py (tests): every thread of a block is a fiber, so
// __syncthreads and the warp intrinsics are real barriers among fibers; blocks run one after
// another. `kernel<<<grid, block, smem, stream>>>(args)` is rewritten at build time into
// `::ekshim::launch(kernel, ::ekshim::LaunchCfg(grid, block, smem, stream), args)` and
// `extern __shared__ T name[];` into a pointer to the block's dynamic shared memory (see
// cuda_host.py); nothing else of the sources is changed. Threads between two barriers run
// to completion one after the other in an order set by ekshim::set_schedule (forward,
// reverse, or shuffled at every barrier), and shared memory starts every block filled
// with 0xFF bytes (NaN as float), so a missing barrier or an unwritten element shows.
#pragma once

#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#define EFFNET_HOST_SHIM 1
#ifndef CUDART_VERSION
#define CUDART_VERSION 13000
#endif

// ------------------------------------------------------------------ qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __constant__
#define __managed__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __grid_constant__
// Block-static shared arrays (`__shared__ float t[64];`) are rewritten by cuda_host.py to
// per-block storage; a declaration it could not rewrite falls back to a static.
#define __shared__ static
#define __CUDACC__ 1

#include "ek_types.h"

// ------------------------------------------------------------------ runtime API subset
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorMisalignedAddress = 716,
  cudaErrorLaunchFailure = 719,
  cudaErrorLaunchOutOfResources = 701,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaMemcpyKind : int { cudaMemcpyHostToHost = 0, cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2,
                            cudaMemcpyDeviceToDevice = 3, cudaMemcpyDefault = 4 };

namespace ekshim {
// Limits of the emulated device (an H100/H200: sm_90).
constexpr int kMaxThreadsPerBlock = 1024;
constexpr size_t kDefaultSmem = 48 * 1024;
constexpr size_t kMaxSmemOptin = 227 * 1024;
constexpr int kSMs = 132;
constexpr int kWarp = 32;

cudaError_t& last_error();
const char*& last_error_detail();
void set_error(cudaError_t e, const char* detail);
const char* error_string(cudaError_t e);
int device();
size_t& smem_limit_for(const void* kernel);
}  // namespace ekshim

const char* cudaGetErrorString(cudaError_t e);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
cudaError_t cudaGetDevice(int* d);
cudaError_t cudaSetDevice(int d);
cudaError_t cudaGetDeviceCount(int* n);
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int device);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaStreamSynchronize(cudaStream_t);
cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t s = nullptr);
cudaError_t cudaMemset(void* p, int v, size_t n);
cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind k, cudaStream_t st = nullptr);
cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind k);
template <class F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<size_t>(value) > ekshim::kMaxSmemOptin) {
      ekshim::set_error(cudaErrorInvalidValue, "cudaFuncSetAttribute: more dynamic shared memory than the device has");
      return cudaErrorInvalidValue;
    }
    ekshim::smem_limit_for(reinterpret_cast<const void*>(kernel)) = static_cast<size_t>(value);
  }
  return cudaSuccess;
}

// Blocks of `threads` that fit one SM of the emulated device by threads alone (registers
// and shared memory are not modelled): 2048 resident threads, at most 32 blocks.
template <class F>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, F*, int threads, size_t) {
  *blocks = threads > 0 ? (2048 / threads < 32 ? 2048 / threads : 32) : 0;
  return cudaSuccess;
}

// ------------------------------------------------------------------ the SIMT machine
namespace ekshim {

// One emulated thread.
struct Thread {
  void* sp = nullptr;  // saved stack pointer while suspended
  uint3 tid{0, 0, 0};
  int linear = 0, lane = 0, warp = 0;
  int state = 0;       // kRunnable, kAtBlockBarrier, kAtWarpBarrier, kDone
  unsigned mask = 0;   // lanes of the warp barrier it waits at
  unsigned vote = 0;   // this lane's contribution to a vote
};

// The block being run: its coordinates and the thread now running.
struct Machine {
  uint3 block_idx{0, 0, 0};
  dim3 block_dim, grid_dim;
  Thread* current = nullptr;
  unsigned char* dyn_smem = nullptr;
  int defect = 0;                            // a planted defect (kDefect*), for negative controls
  uint64_t warp_slots[kMaxThreadsPerBlock];  // shuffle exchange, one 8-byte slot per thread
};
extern Machine g;

// Defects the tests plant in the machine to show that their checks can fail.
enum Defect : int {
  kDefectNone = 0,
  kDefectNoSync = 1,       // __syncthreads does nothing
  kDefectShuffleSelf = 2,  // every shuffle returns the lane's own value
  kDefectLostAtomic = 3,   // atomicAdd adds nothing
};
void set_defect(int defect);

void sync_block();                 // __syncthreads
void sync_warp(unsigned mask);     // barrier among the lanes of `mask` of this warp
void* block_shared(const void* site, size_t bytes, size_t align);  // per-block __shared__ storage

// Run `body(ctx)` as every thread of every block of the grid; false (and an error set) when
// the configuration is invalid or a block deadlocked.
bool run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, void (*body)(void*), void* ctx);

// Scheduling order of the threads between barriers: 0 forward, 1 reverse, 2 shuffled.
void set_schedule(int mode, uint64_t seed);
// Serve every valid launch with at most (x, y, z) blocks per grid dimension (0: no cap), gridDim
// reporting the served grid: a stand-in for a grid clamped at the hardware limit, so tests run
// the kernels' grid-stride loops with small shapes. Only for dimensions the launched kernels loop
// over (a kernel whose blocks each own a fixed slice of that dimension would leave work undone).
void set_grid_cap(unsigned x, unsigned y, unsigned z);
// Launches and barrier releases so far (for tests of the shim).
uint64_t launches();
uint64_t barriers();

struct LaunchCfg {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  LaunchCfg(dim3 g_, dim3 b_, size_t s = 0, cudaStream_t st = nullptr) : grid(g_), block(b_), smem(s), stream(st) {}
};

template <class... P, class... A>
void launch(void (*kernel)(P...), const LaunchCfg& cfg, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
  struct Ctx {
    void (*k)(P...);
    std::tuple<std::decay_t<P>...> params;
  } ctx{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
  run_grid(reinterpret_cast<const void*>(kernel), cfg.grid, cfg.block, cfg.smem,
           [](void* c) {
             Ctx* x = static_cast<Ctx*>(c);
             std::apply(x->k, x->params);  // each thread gets its own copies of the parameters
           },
           &ctx);
}

template <class T>
inline T* dynamic_smem() { return reinterpret_cast<T*>(g.dyn_smem); }

// `align`: the declaration's __align__(n), when it asks for more than alignof(A).
template <class A>
inline A& static_smem(const void* site, size_t align = alignof(A)) {
  return *static_cast<A*>(block_shared(site, sizeof(A), align > alignof(A) ? align : alignof(A)));
}

template <class T>
inline T exchange(unsigned mask, T v, int src) {
  static_assert(sizeof(T) <= 8, "the shim exchanges values of at most 8 bytes");
  Thread* t = g.current;
  if (g.defect == kDefectShuffleSelf) src = t->lane;
  uint64_t raw = 0;
  std::memcpy(&raw, &v, sizeof(T));
  g.warp_slots[t->linear] = raw;
  sync_warp(mask);
  const uint64_t got = g.warp_slots[t->warp * kWarp + src];
  sync_warp(mask);  // nobody overwrites a slot before every lane has read
  T r;
  std::memcpy(&r, &got, sizeof(T));
  return r;
}
unsigned vote(unsigned mask, bool pred);  // ballot over the lanes of mask
}  // namespace ekshim

#define threadIdx (::ekshim::g.current->tid)
#define blockIdx (::ekshim::g.block_idx)
#define blockDim (::ekshim::g.block_dim)
#define gridDim (::ekshim::g.grid_dim)
constexpr int warpSize = 32;

inline void __syncthreads() { ekshim::sync_block(); }
namespace ekshim {
// __syncthreads that also counts the threads of the block whose predicate is true.
inline int sync_count(int pred) {
  const int n = static_cast<int>(g.block_dim.x * g.block_dim.y * g.block_dim.z);
  g.warp_slots[g.current->linear] = pred != 0;
  sync_block();
  int count = 0;
  for (int i = 0; i < n; ++i) count += static_cast<int>(g.warp_slots[i]);
  sync_block();  // nobody overwrites a slot before every thread has counted
  return count;
}
}  // namespace ekshim
inline int __syncthreads_count(int p) { return ekshim::sync_count(p); }
inline int __syncthreads_and(int p) {
  return ekshim::sync_count(p) == static_cast<int>(blockDim.x * blockDim.y * blockDim.z);
}
inline int __syncthreads_or(int p) { return ekshim::sync_count(p) > 0; }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ekshim::sync_warp(mask); }
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}
inline unsigned __activemask() { return 0xffffffffu; }

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  const int lane = ekshim::g.current->lane;
  return ekshim::exchange(mask, v, (lane / width) * width + (src % width));
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = ekshim::g.current->lane;
  const int src = lane ^ lane_mask;
  return ekshim::exchange(mask, v, src / width == lane / width ? src : lane);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ekshim::g.current->lane;
  const int src = lane + static_cast<int>(delta);
  return ekshim::exchange(mask, v, src / width == lane / width ? src : lane);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ekshim::g.current->lane;
  const int src = lane - static_cast<int>(delta);
  return ekshim::exchange(mask, v, src >= 0 && src / width == lane / width ? src : lane);
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return ekshim::vote(mask, pred != 0); }
inline int __any_sync(unsigned mask, int pred) { return (ekshim::vote(mask, pred != 0) & mask) != 0; }
inline int __all_sync(unsigned mask, int pred) { return (ekshim::vote(mask, pred != 0) & mask) == mask; }

// Atomics: threads never run at the same time, so a plain read-modify-write is atomic.
template <class T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  if (ekshim::g.defect != ekshim::kDefectLostAtomic) *p = old + v;
  return old;
}
template <class T>
inline T atomicSub(T* p, T v) { const T old = *p; *p = old - v; return old; }
template <class T>
inline T atomicMax(T* p, T v) { const T old = *p; *p = old < v ? v : old; return old; }
template <class T>
inline T atomicMin(T* p, T v) { const T old = *p; *p = v < old ? v : old; return old; }
template <class T>
inline T atomicExch(T* p, T v) { const T old = *p; *p = v; return old; }
template <class T>
inline T atomicCAS(T* p, T cmp, T v) { const T old = *p; if (old == cmp) *p = v; return old; }
template <class T>
inline T atomicAdd_block(T* p, T v) { return atomicAdd(p, v); }
