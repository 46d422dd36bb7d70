// dwconv_bn_act entry point: argument checks, static dispatch to the template instances
// (dispatch_dwconv<T>, compiled in dwconv_{f32,f16,bf16}.cu), and the deterministic squeeze
// reduction.
#include "device_utils.cuh"
#include "dwconv_kernels.cuh"
#include "effnet_ext.h"
#include "static_switch.h"

namespace effnet {

EFFNET_INSTANTIATE_DWCONV(extern, float)
EFFNET_INSTANTIATE_DWCONV(extern, __half)
EFFNET_INSTANTIATE_DWCONV(extern, __nv_bfloat16)

int cudart_version() { return CUDART_VERSION; }

namespace {

__global__ void reduce_partials_kernel(const float* __restrict__ partials, float* __restrict__ mean, int64_t tiles,
                                       int64_t nc, float hw) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nc;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.0f;
    for (int64_t t = 0; t < tiles; ++t) s += partials[t * nc + i];  // fixed order: deterministic
    mean[i] = s / hw;
  }
}

const char* check_args(const DWConvArgs& a) {
  if (a.dtype != kFloat32 && a.dtype != kFloat16 && a.dtype != kBFloat16) return "dwconv_bn_act: unsupported dtype code";
  if (a.k != 3 && a.k != 5 && a.k != 7) return "dwconv_bn_act: the CUDA kernels support kernel sizes 3, 5 and 7";
  if ((a.stride_h != 1 && a.stride_h != 2) || (a.stride_w != 1 && a.stride_w != 2))
    return "dwconv_bn_act: stride must be 1 or 2";
  // H or W may be 0 when the padding alone covers the kernel (every output is act(shift)):
  // the kernels then read no input at all.
  if (a.n < 0 || a.c < 0 || a.h < 0 || a.w < 0 || a.ho < 1 || a.wo < 1) return "dwconv_bn_act: invalid sizes";
  if (a.h * a.w > INT32_MAX || a.ho * a.wo > INT32_MAX)  // the NCHW kernel's in-plane offsets are int32
    return "dwconv_bn_act: a plane of more than 2^31 - 1 elements is not supported";
  if (a.pad_top < 0 || a.pad_left < 0) return "dwconv_bn_act: padding must be non-negative";
  if (a.act < kIdentity || a.act > kHardSwish) return "dwconv_bn_act: unsupported activation code";
  return nullptr;
}

// gridDim.y of the launch (the number of partial rows in deterministic mode).
int64_t partial_rows(const DWConvArgs& a) {
  return DTYPE_SWITCH(a.dtype, T, [&] {
    return KSIZE_SWITCH(a.k, K, [&] {
      return STRIDE_SWITCH(a.stride_w, SW, [&] {
        return static_cast<int64_t>(dwconv_shape<T, K, SW, true>(a.nhwc, a.n, a.c, a.ho, a.wo).grid.y);
      });
    });
  });
}

}  // namespace

int64_t dwconv_partials_numel(const DWConvArgs& a) {
  if (!a.squeeze || !a.deterministic || check_args(a) != nullptr || a.n == 0 || a.c == 0) return 0;
  return partial_rows(a) * a.n * a.c;
}

const char* dwconv_bn_act(const DWConvArgs& a) {
  if (const char* err = check_args(a)) return err;
  if (a.n == 0 || a.c == 0) return nullptr;
  const DeviceGuard device(a.device);  // both launches below run on a.device
  if (const char* err = device.error()) return err;
  const bool deterministic = a.squeeze && a.deterministic;
  const int64_t need = dwconv_partials_numel(a);
  if (deterministic && (a.partials == nullptr || a.partials_numel < need))
    return "dwconv_bn_act: the partials buffer is missing or smaller than dwconv_partials_numel()";
  if (a.squeeze && a.mean == nullptr) return "dwconv_bn_act: squeeze needs a mean buffer";

  DWConvParams p;
  p.x = a.x;
  p.y = a.y;
  p.weight = a.weight;
  p.shift = a.shift;
  p.mean = a.mean;
  p.partials = deterministic ? a.partials : nullptr;
  p.n = a.n;
  p.c = a.c;
  p.h = a.h;
  p.w = a.w;
  p.ho = a.ho;
  p.wo = a.wo;
  p.stride_h = a.stride_h;
  p.pad_top = a.pad_top;
  p.pad_left = a.pad_left;
  p.inv_hw = 1.0f / static_cast<float>(a.ho * a.wo);
  const int elem = a.dtype == kFloat32 ? 4 : 2;
  p.vec = a.nhwc && (a.c * elem) % 16 == 0 && aligned16(a.x) && aligned16(a.y);

  cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  const char* err = DTYPE_SWITCH(a.dtype, T, [&] {
    return dispatch_dwconv<T>(p, a.k, a.stride_w, a.squeeze, a.act, a.nhwc, stream);
  });
  if (err != nullptr || !deterministic) return err;
  const int64_t nc = a.n * a.c;
  const int64_t blocks = ceil_div(nc, kThreads);
  reduce_partials_kernel<<<static_cast<unsigned>(blocks < 65535 ? blocks : 65535), kThreads, 0, stream>>>(
      a.partials, a.mean, need / nc, nc, static_cast<float>(a.ho * a.wo));
  return launch_error();
}

}  // namespace effnet
