// Device helpers shared by the kernels: dtype conversion, 16-byte packs, activations,
// launch-error checking. No libtorch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "effnet_ext.h"

namespace effnet {

constexpr int kThreads = 256;  // threads per block for every kernel here

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// min(max(u, 0), 6), keeping NaN as PyTorch's clamps do.
__device__ __forceinline__ float relu6(float u) { return u < 0.0f ? 0.0f : (u > 6.0f ? 6.0f : u); }

// The elementwise function ACT (an effnet::Act) in fp32, PyTorch's definitions; SiLU and
// sigmoid with the accurate expf.
template <int ACT>
__device__ __forceinline__ float activate(float u) {
  static_assert(ACT >= kIdentity && ACT <= kHardSigmoid, "unknown activation code");
  if constexpr (ACT == kSiLU) return u / (1.0f + expf(-u));
  if constexpr (ACT == kReLU) return u < 0.0f ? 0.0f : u;
  if constexpr (ACT == kReLU6) return relu6(u);
  if constexpr (ACT == kHardSwish) return u * relu6(u + 3.0f) / 6.0f;
  if constexpr (ACT == kSigmoid) return 1.0f / (1.0f + expf(-u));
  if constexpr (ACT == kHardSigmoid) return relu6(u + 3.0f) / 6.0f;
  return u;  // kIdentity
}

// d activate<ACT>(u) / du in fp32, as PyTorch's backward defines it (effnet_kernels/reference.py
// ACTIVATION_GRADS): relu u > 0; relu6 0 < u < 6; hardswish 0 below -3, u / 3 + 1/2 up to 3,
// then 1; hardsigmoid 1/6 on (-3, 3); silu s (1 + u (1 - s)) and sigmoid s (1 - s), s = sigmoid(u).
template <int ACT>
__device__ __forceinline__ float activate_grad(float u) {
  static_assert(ACT >= kIdentity && ACT <= kHardSigmoid, "unknown activation code");
  if constexpr (ACT == kSiLU) {
    const float s = 1.0f / (1.0f + expf(-u));
    return s * (1.0f + u * (1.0f - s));
  }
  if constexpr (ACT == kReLU) return u > 0.0f ? 1.0f : 0.0f;
  if constexpr (ACT == kReLU6) return (u > 0.0f && u < 6.0f) ? 1.0f : 0.0f;
  if constexpr (ACT == kHardSwish) return u < -3.0f ? 0.0f : (u <= 3.0f ? u / 3.0f + 0.5f : 1.0f);
  if constexpr (ACT == kSigmoid) {
    const float s = 1.0f / (1.0f + expf(-u));
    return s * (1.0f - s);
  }
  if constexpr (ACT == kHardSigmoid) return (u > -3.0f && u < 3.0f) ? 1.0f / 6.0f : 0.0f;
  return 1.0f;  // kIdentity
}

// activate_grad with the activation as a runtime value (uniform across a launch: the branch
// costs nothing next to the memory traffic of the elementwise training kernels, and keeps
// their instance count down).
__device__ __forceinline__ float activate_grad_rt(int act, float u) {
  switch (act) {
    case kSiLU: return activate_grad<kSiLU>(u);
    case kReLU: return activate_grad<kReLU>(u);
    case kReLU6: return activate_grad<kReLU6>(u);
    case kHardSwish: return activate_grad<kHardSwish>(u);
    case kSigmoid: return activate_grad<kSigmoid>(u);
    case kHardSigmoid: return activate_grad<kHardSigmoid>(u);
    default: return 1.0f;
  }
}

// Elements of T in one 16-byte access.
template <typename T>
struct PackWidth {
  static constexpr int value = 16 / sizeof(T);
};

// 16 bytes of raw elements (V = PackWidth<T> of them), kept packed in registers and
// converted to float where used: half the registers of a float copy for fp16/bf16.
using RawPack = uint4;

template <typename T>
__device__ __forceinline__ float pack_elem(const RawPack& r, int i) {
  return to_float(reinterpret_cast<const T*>(&r)[i]);
}

// Load V consecutive elements starting at p. With vec (p 16-byte aligned, all V in
// range) one 16-byte load; otherwise `valid` scalar loads, zeros beyond.
template <typename T, int V>
__device__ __forceinline__ RawPack load_pack(const T* __restrict__ p, bool vec, int64_t valid) {
  static_assert(V * sizeof(T) == 16, "a pack is 16 bytes");
  if (vec) return __ldg(reinterpret_cast<const RawPack*>(p));
  RawPack r = make_uint4(0u, 0u, 0u, 0u);
  T* e = reinterpret_cast<T*>(&r);
#pragma unroll
  for (int i = 0; i < V; ++i)
    if (i < valid) e[i] = p[i];
  return r;
}

// Raw bits of one element, widened to 32 bits.
__device__ __forceinline__ uint32_t bits_of(float v) { return __float_as_uint(v); }
__device__ __forceinline__ uint32_t bits_of(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint32_t bits_of(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

// Store V floats rounded to T at p (vector or `valid` scalar stores, as load_pack). The
// 16-byte pack is assembled as four 32-bit words and written with one st.global.v4.
template <typename T, int V>
__device__ __forceinline__ void store_pack(T* __restrict__ p, const float (&v)[V], bool vec, int64_t valid) {
  static_assert(V * sizeof(T) == 16, "a pack is 16 bytes");
  if (vec) {
    uint32_t w[4];
    if constexpr (sizeof(T) == 4) {
#pragma unroll
      for (int i = 0; i < 4; ++i) w[i] = bits_of(from_float<T>(v[i]));
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) w[i] = bits_of(from_float<T>(v[2 * i])) | (bits_of(from_float<T>(v[2 * i + 1])) << 16);
    }
    __stwb(reinterpret_cast<uint4*>(p), make_uint4(w[0], w[1], w[2], w[3]));
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i)
      if (i < valid) p[i] = from_float<T>(v[i]);
  }
}

// 16-byte shared-memory accesses (one LDS.128 / STS.128); p must be 16-byte aligned.
__device__ __forceinline__ float4 load_shared_f4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ void store_shared_f4(float* p, float a, float b, float c, float d) {
  *reinterpret_cast<float4*>(p) = make_float4(a, b, c, d);
}

__device__ __forceinline__ float warp_sum(float s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  return s;
}

__host__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Makes `device` current for one entry point and restores the caller's device when it
// goes out of scope. The current device is per-thread driver state that this module's
// (static) CUDA runtime shares with torch's: an op on cuda:1 must not leave torch's
// current device switched to 1.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cudaError_t err = cudaGetDevice(&prev_);
    if (err == cudaSuccess && prev_ != device) {
      err = cudaSetDevice(device);
      switched_ = err == cudaSuccess;
    }
    error_ = err == cudaSuccess ? nullptr : cudaGetErrorString(err);
  }
  ~DeviceGuard() {
    // A failed restore must not surface as the next call's launch error.
    if (switched_ && cudaSetDevice(prev_) != cudaSuccess) cudaGetLastError();
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  // nullptr when `device` is current, else CUDA's message.
  const char* error() const { return error_; }

 private:
  int prev_ = 0;
  bool switched_ = false;
  const char* error_ = nullptr;
};

// nullptr after a good launch, else CUDA's message.
__host__ __forceinline__ const char* launch_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace effnet
