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

// ------------------------------------------------------------------ vector types
struct alignas(8) float2 { float x, y; };
struct float3 { float x, y, z; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) int2 { int x, y; };
struct int3 { int x, y, z; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct uint3 { unsigned x, y, z; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) double2 { double x, y; };
struct alignas(4) ushort2 { unsigned short x, y; };
struct alignas(8) ushort4 { unsigned short x, y, z, w; };
struct alignas(16) longlong2 { long long x, y; };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float3 make_float3(float x, float y, float z) { return {x, y, z}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return {x, y, z}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline ushort2 make_ushort2(unsigned short x, unsigned short y) { return {x, y}; }
inline double2 make_double2(double x, double y) { return {x, y}; }

// ------------------------------------------------------------------ fp16 / bf16
namespace ekshim {
inline uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float u2f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// float -> IEEE half, round to nearest even (subnormals, overflow to inf, NaN kept quiet).
inline uint16_t float_to_half_bits(float f) {
  const uint32_t x = f2u(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t a = x & 0x7fffffffu;
  if (a >= 0x7f800000u) return static_cast<uint16_t>(sign | (a > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
  const int e = static_cast<int>(a >> 23);
  uint32_t r, rem, halfway;
  if (e >= 113) {  // normal half
    const uint32_t m = a & 0x7fffffu;
    r = (static_cast<uint32_t>(e - 112) << 10) | (m >> 13);
    rem = m & 0x1fffu;
    halfway = 0x1000u;
  } else {  // subnormal half: units of 2^-24
    const int shift = 126 - e;
    if (shift > 24) return static_cast<uint16_t>(sign);
    const uint32_t m = (a & 0x7fffffu) | (e ? 0x800000u : 0u);
    r = m >> shift;
    rem = m & ((1u << shift) - 1u);
    halfway = 1u << (shift - 1);
  }
  if (rem > halfway || (rem == halfway && (r & 1u))) ++r;
  return static_cast<uint16_t>(sign | r);
}

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1f) return u2f(sign | 0x7f800000u | (m << 13));
  if (e != 0) return u2f(sign | ((e + 112) << 23) | (m << 13));
  const float v = std::ldexp(static_cast<float>(m), -24);
  return sign ? -v : v;
}

// float -> bfloat16, round to nearest even, NaN kept quiet.
inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t x = f2u(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
inline float bf16_bits_to_float(uint16_t b) { return u2f(static_cast<uint32_t>(b) << 16); }
}  // namespace ekshim

struct __half {
  uint16_t __x;
  __half() = default;
  __half(float f) : __x(ekshim::float_to_half_bits(f)) {}
  __half(double f) : __x(ekshim::float_to_half_bits(static_cast<float>(f))) {}
  __half(int v) : __half(static_cast<float>(v)) {}
  operator float() const { return ekshim::half_bits_to_float(__x); }
};
struct __nv_bfloat16 {
  uint16_t __x;
  __nv_bfloat16() = default;
  __nv_bfloat16(float f) : __x(ekshim::float_to_bf16_bits(f)) {}
  __nv_bfloat16(double f) : __x(ekshim::float_to_bf16_bits(static_cast<float>(f))) {}
  __nv_bfloat16(int v) : __nv_bfloat16(static_cast<float>(v)) {}
  operator float() const { return ekshim::bf16_bits_to_float(__x); }
};
struct alignas(4) __half2 { __half x, y; };
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };
using half = __half;
using half2 = __half2;
using nv_bfloat16 = __nv_bfloat16;
using nv_bfloat162 = __nv_bfloat162;

inline float __half2float(__half h) { return ekshim::half_bits_to_float(h.__x); }
inline __half __ushort_as_half(unsigned short u) { __half h; h.__x = u; return h; }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __float2half_rn(float f) { return __ushort_as_half(ekshim::float_to_half_bits(f)); }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return ekshim::bf16_bits_to_float(b.__x); }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { __nv_bfloat16 b; b.__x = u; return b; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __ushort_as_bfloat16(ekshim::float_to_bf16_bits(f)); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline __half2 __float2half2_rn(float a) { return __floats2half2_rn(a, a); }
inline __half2 __halves2half2(__half a, __half b) { return {a, b}; }
inline __half2 __float22half2_rn(float2 v) { return __floats2half2_rn(v.x, v.y); }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return {a, b}; }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return {__bfloat162float(h.x), __bfloat162float(h.y)}; }
inline float __low2float(__nv_bfloat162 h) { return __bfloat162float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return __bfloat162float(h.y); }
inline __half __hadd(__half a, __half b) { return __float2half_rn(float(a) + float(b)); }
inline __half __hmul(__half a, __half b) { return __float2half_rn(float(a) * float(b)); }
inline __half __hfma(__half a, __half b, __half c) { return __float2half_rn(std::fma(float(a), float(b), float(c))); }
inline __half2 __hmul2(__half2 a, __half2 b) { return {__hmul(a.x, b.x), __hmul(a.y, b.y)}; }
inline __half2 __hadd2(__half2 a, __half2 b) { return {__hadd(a.x, b.x), __hadd(a.y, b.y)}; }
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) { return {__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)}; }

// ------------------------------------------------------------------ math and bits
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline unsigned __float_as_uint(float f) { return ekshim::f2u(f); }
inline float __uint_as_float(unsigned u) { return ekshim::u2f(u); }
inline int __float_as_int(float f) { return static_cast<int>(ekshim::f2u(f)); }
inline float __int_as_float(int i) { return ekshim::u2f(static_cast<uint32_t>(i)); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz(static_cast<unsigned>(v)); }
inline int __ffs(int v) { return __builtin_ffs(v); }
template <class A, class B>
inline std::common_type_t<A, B> min(A a, B b) { return b < a ? b : a; }
template <class A, class B>
inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }

// Cache-hinted loads and stores are plain accesses here, after the alignment check a GPU
// makes (a misaligned vector access fails the launch with "misaligned address").
namespace ekshim {
void misaligned(const void* p, size_t align);
template <class T>
inline const T* aligned(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) misaligned(p, alignof(T));
  return p;
}
}  // namespace ekshim
template <class T> inline T __ldg(const T* p) { return *ekshim::aligned(p); }
template <class T> inline T __ldcs(const T* p) { return *ekshim::aligned(p); }
template <class T> inline T __ldcg(const T* p) { return *ekshim::aligned(p); }
template <class T> inline T __ldca(const T* p) { return *ekshim::aligned(p); }
template <class T> inline T __ldlu(const T* p) { return *ekshim::aligned(p); }
template <class T> inline T __ldcv(const T* p) { return *ekshim::aligned(p); }
template <class T> inline void __stwb(T* p, T v) { *const_cast<T*>(ekshim::aligned(p)) = v; }
template <class T> inline void __stcs(T* p, T v) { *const_cast<T*>(ekshim::aligned(p)) = v; }
template <class T> inline void __stcg(T* p, T v) { *const_cast<T*>(ekshim::aligned(p)) = v; }
template <class T> inline void __stwt(T* p, T v) { *const_cast<T*>(ekshim::aligned(p)) = v; }

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

template <class A>
inline A& static_smem(const void* site) {
  return *static_cast<A*>(block_shared(site, sizeof(A), alignof(A)));
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
