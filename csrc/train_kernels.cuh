// Device functions shared by the training kernels (dwconv_train.cu, se_train.cu): element
// addressing, the depthwise tap loop, the per-channel tile that every
// reduction kernel uses, and its fixed-order (bitwise reproducible) block reduction.
//
// The training kernels favour few template instances over register tiling: each thread
// computes one conv output at a time with the tap loop below (the forward kernels in
// dwconv_kernels.cuh keep their register-tiled loop; the train forward's apply pass is that
// forward kernel). Every reduction writes per-block partials that a combine kernel sums in a
// fixed order: no floating-point atomics, the same bits on every run.
#pragma once

#include "device_utils.cuh"
#include "effnet_ext.h"

namespace effnet {

__host__ __device__ __forceinline__ int64_t offset4(const Strides4& s, int64_t n, int64_t c, int64_t h, int64_t w) {
  return n * s.n + c * s.c + h * s.h + w * s.w;
}

// The raw taps of channel c ([C, K * K] fp32 weight) in registers.
template <int K>
__device__ __forceinline__ void load_taps(const float* __restrict__ weight, int64_t c, float (&wt)[K * K]) {
#pragma unroll
  for (int t = 0; t < K * K; ++t) wt[t] = __ldg(weight + c * (K * K) + t);
}

// z = sum over the K x K taps of x[n, c, hi0 + kh, wi0 + kw] * wt[kh * K + kw] (zero padding
// outside [0, H) x [0, W)), fp32, kh outer and kw inner as the forward kernels accumulate; wt:
// the taps in registers (load_taps).
template <typename T, int K>
__device__ __forceinline__ float dw_tap_sum(const T* __restrict__ x, const Strides4& xs, int64_t n, int64_t c,
                                            int64_t hi0, int64_t wi0, int64_t h, int64_t w,
                                            const float (&wt)[K * K]) {
  const T* base = x + n * xs.n + c * xs.c;
  float acc = 0.0f;
#pragma unroll
  for (int kh = 0; kh < K; ++kh) {
    const int64_t hi = hi0 + kh;
    if (hi < 0 || hi >= h) continue;
#pragma unroll
    for (int kw = 0; kw < K; ++kw) {
      const int64_t wi = wi0 + kw;
      if (wi < 0 || wi >= w) continue;
      acc = fmaf(to_float(base[hi * xs.h + wi * xs.w]), wt[kh * K + kw], acc);
    }
  }
  return acc;
}

// The per-channel tile of the reduction kernels. Block (bx, by): bx channels x by rows of
// positions; NHWC (32, 8): a warp reads 32 consecutive channels of one pixel (128 bytes in
// fp32), NCHW (1, 256): the whole block walks one channel's positions, consecutive in memory.
// grid.x = channel groups, grid.y = chunks of `chunk` consecutive positions of the
// reduction's range; rows of a block take the chunk's positions round-robin.
struct ChannelTile {
  unsigned bx, by;
};
constexpr unsigned kTileChannels = 32;  // the most channels a tile holds (NHWC's bx)
__host__ __forceinline__ ChannelTile channel_tile(bool nhwc) {
  return nhwc ? ChannelTile{kTileChannels, kThreads / kTileChannels} : ChannelTile{1, kThreads};
}

// Chunks of the position range [0, m): enough blocks to fill the GPU twice over, at least
// kMinPerThread positions per thread, a chunk length that depends on the shape alone (so the
// partials, and the result's bits, do not depend on anything else).
struct Chunking {
  int64_t chunk = 1, chunks = 1;
};
__host__ __forceinline__ Chunking chunking(int64_t m, int64_t channel_groups, unsigned by) {
  constexpr int64_t kMinPerThread = 16, kTargetBlocks = 2 * 132 * 8;
  int64_t want = ceil_div(kTargetBlocks, channel_groups > 0 ? channel_groups : 1);
  const int64_t most = ceil_div(m, static_cast<int64_t>(by) * kMinPerThread);
  if (want > most) want = most;
  if (want > 65535) want = 65535;
  if (want < 1) want = 1;
  Chunking ch;
  ch.chunk = ceil_div(m, want);
  if (ch.chunk < 1) ch.chunk = 1;
  ch.chunks = ceil_div(m, ch.chunk);
  if (ch.chunks < 1) ch.chunks = 1;
  return ch;
}

// Sum of v over the by rows of the block, in row order (bitwise reproducible), valid in row 0.
// `red` holds blockDim.x * blockDim.y floats; every thread of the block must call it.
__device__ __forceinline__ float rows_sum(float v, float* red) {
  const int bx = blockDim.x, tid = threadIdx.y * bx + threadIdx.x;
  red[tid] = v;
  __syncthreads();
  float s = 0.0f;
  if (threadIdx.y == 0)
    for (unsigned r = 0; r < blockDim.y; ++r) s += red[r * bx + threadIdx.x];
  __syncthreads();  // red may be reused at once
  return s;
}

// (count, mean, M2) of a set of values, merged by Chan et al.'s formula.
struct Moments {
  float count = 0.0f, mean = 0.0f, m2 = 0.0f;
};
__host__ __device__ __forceinline__ void welford_add(Moments& a, float v) {
  a.count += 1.0f;
  const float d = v - a.mean;
  a.mean += d / a.count;
  a.m2 = fmaf(d, v - a.mean, a.m2);
}
__host__ __device__ __forceinline__ void chan_merge(Moments& a, const Moments& b) {
  if (b.count == 0.0f) return;
  if (a.count == 0.0f) {
    a = b;
    return;
  }
  const float n = a.count + b.count, d = b.mean - a.mean, fb = b.count / n;
  a.mean = fmaf(d, fb, a.mean);
  a.m2 = a.m2 + b.m2 + d * d * a.count * fb;
  a.count = n;
}

}  // namespace effnet
