// Depthwise k x k conv + folded BatchNorm + activation (+ SE squeeze) kernels.
//
// Each thread computes TW = tile_w<SW>() consecutive outputs along W. For every kernel row
// it loads the (TW - 1) * SW + K input columns that row needs once into registers and
// reuses them across all K taps and all TW outputs. Accumulation is fp32; BN and the
// activation (the template argument ACT, an effnet::Act) run in the epilogue. The squeeze
// (per-(n, c) spatial mean of the activated output, in fp32, before rounding) is reduced
// per block and then either atomically added into `mean` or,
// in deterministic mode, written as a per-block partial that dwconv.cu's reduction kernel
// sums in a fixed order. All global offsets are int64.
//
// Instantiated by the per-dtype files dwconv_{f32,f16,bf16}.cu (EFFNET_INSTANTIATE_DWCONV).
#pragma once

#include "device_utils.cuh"
#include "effnet_ext.h"
#include "static_switch.h"

namespace effnet {

// Outputs along W per thread: 4 at stride 1 (K + 3 input columns feed 4 outputs), 2 at
// stride 2, where neighbouring outputs share fewer columns and 4 would need too many
// registers to keep two 256-thread blocks per SM.
template <int SW>
__host__ __device__ constexpr int tile_w() {
  return SW == 1 ? 4 : 2;
}

// Kernel parameters (by value); pointers are dense tensors in the kernel's layout.
struct DWConvParams {
  const void* x;
  void* y;
  const float* weight;  // [C, K * K]
  const float* scale;
  const float* shift;
  float* mean;      // [N, C]
  float* partials;  // [gridDim.y, N * C] when deterministic, else nullptr
  int64_t n, c, h, w, ho, wo;
  int stride_h, pad_top, pad_left;
  float inv_hw;  // 1 / (Ho * Wo)
  bool vec;  // NHWC: 16-byte accesses along C are legal
};

// Sum one block's squeeze values and publish them: red holds `rows` x `cols` floats
// (row-major); column j belongs to global index base + j (valid if < limit). The sum
// runs in a fixed order, so the deterministic path is bitwise reproducible.
__device__ __forceinline__ void publish_squeeze(const float* red, int rows, int cols, int64_t first_index,
                                                int64_t index_limit, const DWConvParams& p, int64_t partial_row) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int nthreads = blockDim.x * blockDim.y;
  const int64_t nc = p.n * p.c;
  for (int j = tid; j < cols; j += nthreads) {
    const int64_t idx = first_index + j;
    if (idx >= index_limit) continue;
    float s = 0.0f;
    for (int r = 0; r < rows; ++r) s += red[r * cols + j];
    if (p.partials != nullptr) {
      p.partials[partial_row * nc + idx] = s;
    } else {
      atomicAdd(p.mean + idx, s * p.inv_hw);
    }
  }
}

// ------------------------------------------------------------------------------ NHWC
// Block: blockDim.x threads along C (V channels each, 16-byte packs), blockDim.y along
// output strips. grid.x: channel groups, grid.y: strips, grid.z: batch (all loop).
// Dynamic shared memory: weights [K * K][CB] (+ squeeze [blockDim.y][CB]), CB = blockDim.x * V.
template <typename T, int K, int SW, bool SQUEEZE, int ACT>
__global__ void __launch_bounds__(kThreads, 2) dwconv_nhwc_kernel(const DWConvParams p) {
  constexpr int V = PackWidth<T>::value;
  constexpr int kTileW = tile_w<SW>();
  constexpr int SEG = (kTileW - 1) * SW + K;
  extern __shared__ float smem[];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int CB = blockDim.x * V;
  const int64_t cb0 = static_cast<int64_t>(blockIdx.x) * CB;
  float* w_s = smem;
  float* red_s = smem + K * K * CB;

  // Stage this block's weights transposed to [tap][channel] so a thread reads its V
  // channels' weight for one tap as consecutive floats. The global reads walk the
  // block's [CB, K * K] slice of weight in order (coalesced).
  for (int i = ty * blockDim.x + tx; i < K * K * CB; i += blockDim.x * blockDim.y) {
    const int ch = i / (K * K), tap = i % (K * K);
    const int64_t cg = cb0 + ch;
    w_s[tap * CB + ch] = cg < p.c ? p.weight[cb0 * (K * K) + i] : 0.0f;
  }
  const int64_t c0 = cb0 + static_cast<int64_t>(tx) * V;
  const int64_t valid = p.c - c0;  // channels this thread owns (<= 0: none)
  __syncthreads();

  const T* __restrict__ x = static_cast<const T*>(p.x);
  T* __restrict__ y = static_cast<T*>(p.y);
  const int64_t strips_per_row = ceil_div(p.wo, kTileW);
  const int64_t strips = p.ho * strips_per_row;

  for (int64_t n = blockIdx.z; n < p.n; n += gridDim.z) {
    float sq[V];
#pragma unroll
    for (int v = 0; v < V; ++v) sq[v] = 0.0f;

    if (valid > 0) {
      for (int64_t s = static_cast<int64_t>(blockIdx.y) * blockDim.y + ty; s < strips;
           s += static_cast<int64_t>(gridDim.y) * blockDim.y) {
        const int64_t ho = s / strips_per_row;
        const int64_t wo0 = (s % strips_per_row) * kTileW;
        const int64_t hi0 = ho * p.stride_h - p.pad_top;
        const int64_t wi0 = wo0 * SW - p.pad_left;
        float acc[kTileW][V];
#pragma unroll
        for (int t = 0; t < kTileW; ++t)
#pragma unroll
          for (int v = 0; v < V; ++v) acc[t][v] = 0.0f;

#pragma unroll 1
        for (int kh = 0; kh < K; ++kh) {  // rows not unrolled: keeps code size (and build time) down
          const int64_t hi = hi0 + kh;
          if (hi < 0 || hi >= p.h) continue;
          const T* xrow = x + ((n * p.h + hi) * p.w) * p.c + c0;
          RawPack seg[SEG];
#pragma unroll
          for (int j = 0; j < SEG; ++j) {
            const int64_t wi = wi0 + j;
            seg[j] = (wi >= 0 && wi < p.w) ? load_pack<T, V>(xrow + wi * p.c, p.vec, valid) : make_uint4(0u, 0u, 0u, 0u);
          }
#pragma unroll
          for (int kw = 0; kw < K; ++kw) {
            const float* wt = w_s + (kh * K + kw) * CB + tx * V;
            float wv[V];
#pragma unroll
            for (int v = 0; v < V; ++v) wv[v] = wt[v];
#pragma unroll
            for (int t = 0; t < kTileW; ++t)
#pragma unroll
              for (int v = 0; v < V; ++v) acc[t][v] = fmaf(pack_elem<T>(seg[t * SW + kw], v), wv[v], acc[t][v]);
          }
        }

#pragma unroll
        for (int t = 0; t < kTileW; ++t) {
          const int64_t wo = wo0 + t;
          if (wo >= p.wo) break;
          float out[V];
#pragma unroll
          for (int v = 0; v < V; ++v) {
            // BN scale/shift re-read here (L1 hits) rather than held in registers.
            const float sc = v < valid ? __ldg(p.scale + c0 + v) : 0.0f;
            const float sh = v < valid ? __ldg(p.shift + c0 + v) : 0.0f;
            const float u = fmaf(acc[t][v], sc, sh);
            out[v] = activate<ACT>(u);
            if (SQUEEZE) sq[v] += out[v];
          }
          store_pack<T, V>(y + ((n * p.ho + ho) * p.wo + wo) * p.c + c0, out, p.vec, valid);
        }
      }
    }

    if (SQUEEZE) {
      // Channels beyond C hold zeros (scale = shift = 0), and are never published.
#pragma unroll
      for (int v = 0; v < V; ++v) red_s[ty * CB + tx * V + v] = sq[v];
      __syncthreads();
      publish_squeeze(red_s, blockDim.y, CB, n * p.c + cb0, n * p.c + p.c, p, blockIdx.y);
      __syncthreads();  // red_s is rewritten for the next n
    }
  }
}

// ------------------------------------------------------------------------------ NCHW
// Block: blockDim.x threads along the strips of one (n, c) plane, blockDim.y planes.
// grid.x: plane groups, grid.y: strips (loops). Dynamic shared memory: squeeze only.
template <typename T, int K, int SW, bool SQUEEZE, int ACT>
__global__ void __launch_bounds__(kThreads) dwconv_nchw_kernel(const DWConvParams p) {
  constexpr int kTileW = tile_w<SW>();
  constexpr int SEG = (kTileW - 1) * SW + K;
  extern __shared__ float red_s[];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t nc = p.n * p.c;
  const int64_t plane = static_cast<int64_t>(blockIdx.x) * blockDim.y + ty;  // n * C + c
  const bool valid = plane < nc;
  const int64_t c = valid ? plane % p.c : 0;
  const T* __restrict__ x = static_cast<const T*>(p.x) + plane * p.h * p.w;
  T* __restrict__ y = static_cast<T*>(p.y) + plane * p.ho * p.wo;
  const float* __restrict__ wc = p.weight + c * (K * K);
  const int64_t strips_per_row = ceil_div(p.wo, kTileW);
  const int64_t strips = p.ho * strips_per_row;
  float sq = 0.0f;

  if (valid) {
    const float sc = p.scale[c], sh = p.shift[c];
    for (int64_t s = static_cast<int64_t>(blockIdx.y) * blockDim.x + tx; s < strips;
         s += static_cast<int64_t>(gridDim.y) * blockDim.x) {
      const int64_t ho = s / strips_per_row;
      const int64_t wo0 = (s % strips_per_row) * kTileW;
      const int64_t hi0 = ho * p.stride_h - p.pad_top;
      const int64_t wi0 = wo0 * SW - p.pad_left;
      float acc[kTileW];
#pragma unroll
      for (int t = 0; t < kTileW; ++t) acc[t] = 0.0f;
#pragma unroll 1
      for (int kh = 0; kh < K; ++kh) {
        const int64_t hi = hi0 + kh;
        if (hi < 0 || hi >= p.h) continue;
        const T* xrow = x + hi * p.w;
        float seg[SEG];
#pragma unroll
        for (int j = 0; j < SEG; ++j) {
          const int64_t wi = wi0 + j;
          seg[j] = (wi >= 0 && wi < p.w) ? to_float(xrow[wi]) : 0.0f;
        }
#pragma unroll
        for (int kw = 0; kw < K; ++kw) {
          const float wv = __ldg(wc + kh * K + kw);
#pragma unroll
          for (int t = 0; t < kTileW; ++t) acc[t] = fmaf(seg[t * SW + kw], wv, acc[t]);
        }
      }
#pragma unroll
      for (int t = 0; t < kTileW; ++t) {
        const int64_t wo = wo0 + t;
        if (wo >= p.wo) break;
        const float u = fmaf(acc[t], sc, sh);
        const float out = activate<ACT>(u);
        if (SQUEEZE) sq += out;
        y[ho * p.wo + wo] = from_float<T>(out);
      }
    }
  }

  if (SQUEEZE) {
    red_s[ty * blockDim.x + tx] = sq;
    __syncthreads();
    // One sum per plane: transpose the view so "columns" are planes and "rows" are tx.
    const int tid = ty * blockDim.x + tx;
    if (tid < static_cast<int>(blockDim.y)) {
      const int64_t pl = static_cast<int64_t>(blockIdx.x) * blockDim.y + tid;
      if (pl < nc) {
        float s = 0.0f;
        for (int r = 0; r < static_cast<int>(blockDim.x); ++r) s += red_s[tid * blockDim.x + r];
        if (p.partials != nullptr) {
          p.partials[static_cast<int64_t>(blockIdx.y) * nc + pl] = s;
        } else {
          atomicAdd(p.mean + pl, s * p.inv_hw);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------ launch
struct LaunchShape {
  dim3 grid, block;
  size_t smem;
};

// Grid/block/shared memory for one configuration (also sizes the deterministic partials).
template <typename T, int K, int SW, bool SQUEEZE>
LaunchShape dwconv_shape(bool nhwc, int64_t n, int64_t c, int64_t ho, int64_t wo) {
  const int64_t strips = ho * ceil_div(wo, tile_w<SW>());
  LaunchShape s;
  if (nhwc) {
    constexpr int V = PackWidth<T>::value;
    const int64_t nvec = ceil_div(c, V);
    const int bx = static_cast<int>(nvec < 128 / V ? nvec : 128 / V);  // <= 128 channels per block
    const int by = kThreads / bx;
    s.block = dim3(bx, by);
    const int64_t gy = ceil_div(strips, by);
    s.grid = dim3(static_cast<unsigned>(ceil_div(nvec, bx)), static_cast<unsigned>(gy < 65535 ? gy : 65535),
                  static_cast<unsigned>(n < 65535 ? n : 65535));
    s.smem = sizeof(float) * (K * K * bx * V + (SQUEEZE ? by * bx * V : 0));
  } else {
    int64_t bx = ceil_div(strips, 32) * 32;
    if (bx > kThreads) bx = kThreads;
    const int by = kThreads / static_cast<int>(bx);
    s.block = dim3(static_cast<unsigned>(bx), by);
    const int64_t gy = ceil_div(strips, bx);
    s.grid = dim3(static_cast<unsigned>(ceil_div(n * c, by)), static_cast<unsigned>(gy < 65535 ? gy : 65535), 1);
    s.smem = SQUEEZE ? sizeof(float) * kThreads : 0;
  }
  return s;
}

template <typename T, int K, int SW, bool SQUEEZE, int ACT>
const char* launch_dwconv(const DWConvParams& p, bool nhwc, cudaStream_t stream) {
  const LaunchShape s = dwconv_shape<T, K, SW, SQUEEZE>(nhwc, p.n, p.c, p.ho, p.wo);
  if (nhwc) {
    dwconv_nhwc_kernel<T, K, SW, SQUEEZE, ACT><<<s.grid, s.block, s.smem, stream>>>(p);
  } else {
    dwconv_nchw_kernel<T, K, SW, SQUEEZE, ACT><<<s.grid, s.block, s.smem, stream>>>(p);
  }
  return launch_error();
}

// Launch the instance for (k, stride_w, squeeze, act) of element type T (arguments validated).
template <typename T>
const char* dispatch_dwconv(const DWConvParams& p, int k, int stride_w, bool squeeze, int act, bool nhwc,
                            cudaStream_t stream) {
  return KSIZE_SWITCH(k, K, [&] {
    return STRIDE_SWITCH(stride_w, SW, [&] {
      return BOOL_SWITCH(squeeze, SQ, [&] {
        return ACT_SWITCH(act, ACT, [&] { return launch_dwconv<T, K, SW, SQ, ACT>(p, nhwc, stream); });
      });
    });
  });
}

// Explicit instantiation for one dtype: 3 kernel sizes x 2 W-strides x {squeeze, not} x 5
// activations, NHWC and NCHW kernels each. EXTERN = extern for a declaration.
#define EFFNET_INSTANTIATE_DWCONV(EXTERN, T) \
  EXTERN template const char* dispatch_dwconv<T>(const DWConvParams&, int, int, bool, int, bool, cudaStream_t);

}  // namespace effnet
