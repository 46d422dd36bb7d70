// Depthwise k x k conv + folded BatchNorm + activation (+ SE squeeze) kernels.
//
// Each thread computes TW = tile_w<SW>() consecutive outputs along W. For every kernel row
// it loads the (TW - 1) * SW + K input columns that row needs once into registers and
// reuses them across all K taps and all TW outputs. Accumulation is fp32. The weights come
// tap-major ([K * K, C]) with the BN scale folded in (effnet_kernels/cuda.py), so the
// epilogue adds the BN shift and applies the activation (the template argument ACT, an
// effnet::Act). The squeeze (per-(n, c) spatial mean of the activated output, in fp32,
// before rounding) is reduced per block and then either atomically added into `mean` or, in
// deterministic mode, written as a per-block partial that dwconv.cu's reduction kernel sums
// in a fixed order. Global offsets are int64, except the NCHW kernel's offsets within one
// plane (int32; dwconv.cu refuses planes of 2^31 elements or more).
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
  const float* weight;  // [K * K, C] tap-major, BN scale folded in: weight[tap, c] = w[c, tap] * scale[c]
  const float* shift;   // [C]
  float* mean;      // [N, C]
  float* partials;  // [gridDim.y, N * C] when deterministic, else nullptr
  int64_t n, c, h, w, ho, wo;
  int stride_h, pad_top, pad_left;
  float inv_hw;  // 1 / (Ho * Wo)
  bool vec;  // NHWC: 16-byte accesses along C are legal
};

// ------------------------------------------------------------------------------ NHWC
// Block: blockDim.x = BX threads along C (V channels each, 16-byte packs), blockDim.y along
// output strips. grid.x: channel blocks of CB = BX * V channels, grid.y: strips, grid.z:
// batch (all loop).
//
// Shared-memory layout (bank-conflict-free; benchmarks/kernel_audit/banks.py simulates it).
// A thread's V channels form G = V / 4 float4 chunks; chunk g of thread tx for tap t sits at
//   w_s[((t * G + g) * BX + tx) * 4 + q]      (q = 0..3: channel c0 + 4g + q)
// (the BN shift is staged the same way, as tap t = K * K), so one LDS.128 per (tap, g) reads
// 16 consecutive bytes per lane and the BX lanes of a channel block read consecutive chunks
// (conflict-free for BX <= 8 or BX % 8 == 0, which nhwc_threads_c guarantees). The staging loop walks w_s linearly (thread i writes word i:
// conflict-free) and gathers from the tap-major global weight. The squeeze buffer is
//   red_s[(g * (NT + red_pad(NT)) + tid) * 4 + q]   (tid = ty * BX + tx, NT = BX * blockDim.y)
// written with one STS.128 per g (consecutive lanes, consecutive chunks); the pad (in float4
// chunks) puts chunk group 1 at bank 16, so publish_squeeze_nhwc's 32-bit reads of both groups
// (lane j: channel j of the block) fall into distinct banks.
__device__ __forceinline__ int red_pad(int nthreads) { return (12 - nthreads % 8) % 8; }
template <int V>
__device__ __forceinline__ int staged_channel(int off, int bx) {  // w_s word (within a tap) -> channel in block
  const int g = off / (4 * bx), r = off - g * 4 * bx;
  return (r >> 2) * V + g * 4 + (r & 3);
}

// Sum one NHWC block's squeeze values over its blockDim.y rows and publish them. The sum runs
// in a fixed order, so the deterministic path is bitwise reproducible.
template <int V>
__device__ __forceinline__ void publish_squeeze_nhwc(const float* red, int64_t first_index, int64_t index_limit,
                                                     const DWConvParams& p, int64_t partial_row) {
  const int bx = blockDim.x, rows = blockDim.y, nthreads = bx * rows;
  const int tid = threadIdx.y * bx + threadIdx.x;
  const int64_t nc = p.n * p.c;
  for (int j = tid; j < bx * V; j += nthreads) {
    const int64_t idx = first_index + j;
    if (idx >= index_limit) continue;
    const int tx = j / V, v = j % V;
    const float* col = red + ((v / 4) * (nthreads + red_pad(nthreads)) + tx) * 4 + (v % 4);
    float s = 0.0f;
    for (int r = 0; r < rows; ++r) s += col[r * bx * 4];
    if (p.partials != nullptr) {
      p.partials[partial_row * nc + idx] = s;
    } else {
      atomicAdd(p.mean + idx, s * p.inv_hw);
    }
  }
}

// Dynamic shared memory: weights [K * K][G][BX][4], shift [G][BX][4] (+ squeeze [G][NT][4] + pad).
template <typename T, int K, int SW, bool SQUEEZE, int ACT>
__global__ void __launch_bounds__(kThreads, 2) dwconv_nhwc_kernel(const DWConvParams p) {
  constexpr int V = PackWidth<T>::value;
  constexpr int G = V / 4;
  constexpr int kTileW = tile_w<SW>();
  constexpr int SEG = (kTileW - 1) * SW + K;
  extern __shared__ __align__(16) float smem[];
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x;
  const int nthreads = bx * blockDim.y, tid = ty * bx + tx;
  const int CB = bx * V;
  const int64_t cb0 = static_cast<int64_t>(blockIdx.x) * CB;
  float* w_s = smem;                    // K * K taps, then the BN shift as row K * K
  float* red_s = smem + (K * K + 1) * CB;

  for (int i = tid; i < (K * K + 1) * CB; i += nthreads) {
    const int tap = i / CB;
    const int64_t cg = cb0 + staged_channel<V>(i - tap * CB, bx);
    w_s[i] = cg >= p.c ? 0.0f : __ldg(tap < K * K ? p.weight + tap * p.c + cg : p.shift + cg);
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
            float wv[V];
#pragma unroll
            for (int g = 0; g < G; ++g) {
              const float4 q = load_shared_f4(w_s + (((kh * K + kw) * G + g) * bx + tx) * 4);
              wv[4 * g] = q.x, wv[4 * g + 1] = q.y, wv[4 * g + 2] = q.z, wv[4 * g + 3] = q.w;
            }
#pragma unroll
            for (int t = 0; t < kTileW; ++t)
#pragma unroll
              for (int v = 0; v < V; ++v) acc[t][v] = fmaf(pack_elem<T>(seg[t * SW + kw], v), wv[v], acc[t][v]);
          }
        }

        float sh[V];
#pragma unroll
        for (int g = 0; g < G; ++g) {
          const float4 q = load_shared_f4(w_s + ((K * K * G + g) * bx + tx) * 4);
          sh[4 * g] = q.x, sh[4 * g + 1] = q.y, sh[4 * g + 2] = q.z, sh[4 * g + 3] = q.w;
        }
#pragma unroll
        for (int t = 0; t < kTileW; ++t) {
          const int64_t wo = wo0 + t;
          if (wo >= p.wo) break;
          float out[V];
#pragma unroll
          for (int v = 0; v < V; ++v) {
            const float u = acc[t][v] + sh[v];
            out[v] = activate<ACT>(u);
            if (SQUEEZE) sq[v] += out[v];
          }
          store_pack<T, V>(y + ((n * p.ho + ho) * p.wo + wo) * p.c + c0, out, p.vec, valid);
        }
      }
    }

    if (SQUEEZE) {
      // Channels beyond C hold zeros (weight = shift = 0), and are never published.
#pragma unroll
      for (int g = 0; g < G; ++g)
        store_shared_f4(red_s + (g * (nthreads + red_pad(nthreads)) + tid) * 4, sq[4 * g], sq[4 * g + 1],
                        sq[4 * g + 2], sq[4 * g + 3]);
      __syncthreads();
      publish_squeeze_nhwc<V>(red_s, n * p.c + cb0, n * p.c + p.c, p, blockIdx.y);
      __syncthreads();  // red_s is rewritten for the next n
    }
  }
}

// ------------------------------------------------------------------------------ NCHW
// Block: blockDim.x threads (a multiple of 32: each warp serves one plane) along the strips of
// one (n, c) plane, blockDim.y planes. grid.x: plane groups, grid.y: strips (loops). The K
// input rows of a strip are loaded in one unrolled pass (rows outside the image predicated
// off, not skipped by a branch), unrolled three rows at a time, so up to 3 * SEG loads are
// in flight together while three 256-thread blocks stay resident per SM. The squeeze is
// reduced by warp shuffles, then the blockDim.x / 32 warp sums of a plane are added in a fixed
// order. Dynamic shared memory: squeeze only, one float per warp.
template <typename T, int K, int SW, bool SQUEEZE, int ACT>
__global__ void __launch_bounds__(kThreads, 3) dwconv_nchw_kernel(const DWConvParams p) {
  constexpr int kTileW = tile_w<SW>();
  constexpr int SEG = (kTileW - 1) * SW + K;
  constexpr int kRowUnroll = 3;  // K = 3: all rows at once; 5, 7: three rows' loads in flight (<= 85 registers)
  extern __shared__ float red_s[];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t nc = p.n * p.c;
  const int64_t plane = static_cast<int64_t>(blockIdx.x) * blockDim.y + ty;  // n * C + c
  const bool valid = plane < nc;
  const int64_t c = valid ? plane % p.c : 0;
  const T* __restrict__ x = static_cast<const T*>(p.x) + plane * p.h * p.w;
  T* __restrict__ y = static_cast<T*>(p.y) + plane * p.ho * p.wo;
  const int64_t strips_per_row = ceil_div(p.wo, kTileW);
  const int64_t strips = p.ho * strips_per_row;
  float sq = 0.0f;

  if (valid) {
    const float sh = __ldg(p.shift + c);
    for (int64_t s = static_cast<int64_t>(blockIdx.y) * blockDim.x + tx; s < strips;
         s += static_cast<int64_t>(gridDim.y) * blockDim.x) {
      // In-plane offsets are int32: check_args keeps H * W and Ho * Wo below 2^31.
      const int ho = static_cast<int>(s / strips_per_row);
      const int wo0 = static_cast<int>(s % strips_per_row) * kTileW;
      const int hi0 = ho * p.stride_h - p.pad_top;
      const int wi0 = wo0 * SW - p.pad_left;
      const int h = static_cast<int>(p.h), w = static_cast<int>(p.w);
      float acc[kTileW];
#pragma unroll
      for (int t = 0; t < kTileW; ++t) acc[t] = 0.0f;
#pragma unroll kRowUnroll
      for (int kh = 0; kh < K; ++kh) {
        const int hi = hi0 + kh;
        const bool row_ok = hi >= 0 && hi < h;
        float seg[SEG];
#pragma unroll
        for (int j = 0; j < SEG; ++j) {
          const int wi = wi0 + j;
          seg[j] = (row_ok && wi >= 0 && wi < w) ? to_float(x[hi * w + wi]) : 0.0f;
        }
#pragma unroll
        for (int kw = 0; kw < K; ++kw) {
          const float wv = __ldg(p.weight + (kh * K + kw) * p.c + c);
#pragma unroll
          for (int t = 0; t < kTileW; ++t) acc[t] = fmaf(seg[t * SW + kw], wv, acc[t]);
        }
      }
#pragma unroll
      for (int t = 0; t < kTileW; ++t) {
        const int wo = wo0 + t;
        if (wo >= p.wo) break;
        const float u = acc[t] + sh;
        const float out = activate<ACT>(u);
        if (SQUEEZE) sq += out;
        y[ho * static_cast<int>(p.wo) + wo] = from_float<T>(out);
      }
    }
  }

  if (SQUEEZE) {
    const int warps_per_plane = blockDim.x / 32;
    sq = warp_sum(sq);  // every lane of a warp belongs to plane `plane`
    if (tx % 32 == 0) red_s[ty * warps_per_plane + tx / 32] = sq;
    __syncthreads();
    const int tid = ty * blockDim.x + tx;
    if (tid < static_cast<int>(blockDim.y)) {
      const int64_t pl = static_cast<int64_t>(blockIdx.x) * blockDim.y + tid;
      if (pl < nc) {
        float s = 0.0f;
        for (int r = 0; r < warps_per_plane; ++r) s += red_s[tid * warps_per_plane + r];
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

// Threads along C of an NHWC block (each owns a pack of V channels; nvec = ceil(C / V) packs):
// the largest BX <= 128 / V (at most 128 channels per block) whose equal channel blocks leave at
// most 1/8 of the lanes idle, among the BX with conflict-free weight reads (BX <= 8 or a
// multiple of 8). C = 144 fp16 (18 packs): BX = 6, three blocks of 48 channels, every lane busy.
__host__ __device__ inline int nhwc_threads_c(int64_t nvec, int v) {
  const int max_bx = 128 / v;
  if (nvec <= 8) return static_cast<int>(nvec);
  for (int bx = max_bx; bx > 1; bx -= (bx > 8 ? 8 : 1)) {
    const int64_t lanes = ceil_div(nvec, bx) * bx;
    if (8 * nvec >= 7 * lanes) return bx;
  }
  return 1;
}

// Grid/block/shared memory for one configuration (also sizes the deterministic partials).
template <typename T, int K, int SW, bool SQUEEZE>
LaunchShape dwconv_shape(bool nhwc, int64_t n, int64_t c, int64_t ho, int64_t wo) {
  const int64_t strips = ho * ceil_div(wo, tile_w<SW>());
  LaunchShape s;
  if (nhwc) {
    constexpr int V = PackWidth<T>::value;
    const int64_t nvec = ceil_div(c, V);
    const int bx = nhwc_threads_c(nvec, V);
    const int by = kThreads / bx;
    s.block = dim3(bx, by);
    const int64_t gy = ceil_div(strips, by);
    s.grid = dim3(static_cast<unsigned>(ceil_div(nvec, bx)), static_cast<unsigned>(gy < 65535 ? gy : 65535),
                  static_cast<unsigned>(n < 65535 ? n : 65535));
    s.smem = sizeof(float) * ((K * K + 1) * bx * V + (SQUEEZE ? by * bx * V + 32 : 0));  // + red_pad slack
  } else {
    int64_t bx = ceil_div(strips, 32) * 32;
    if (bx > kThreads) bx = kThreads;
    const int by = kThreads / static_cast<int>(bx);
    s.block = dim3(static_cast<unsigned>(bx), by);
    const int64_t gy = ceil_div(strips, bx);
    s.grid = dim3(static_cast<unsigned>(ceil_div(n * c, by)), static_cast<unsigned>(gy < 65535 ? gy : 65535), 1);
    s.smem = SQUEEZE ? sizeof(float) * (kThreads / 32) : 0;
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
