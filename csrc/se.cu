// Squeeze-and-excitation kernels: se_gate (pooled -> gate, two small kernels tiled over
// kSampleTile samples, through an fp32 hidden buffer) and se_excite (y * gate, 16-byte
// accesses whenever the pointers are aligned).
#include "device_utils.cuh"
#include "effnet_ext.h"
#include "static_switch.h"

namespace effnet {
namespace {

constexpr int kWarps = kThreads / 32;
// Samples per se_gate tile: each weight row is read once per kSampleTile samples.
constexpr int kSampleTile = 8;
// Hidden units staged in shared memory per pass of se_expand_kernel.
constexpr int kHiddenChunk = 256;

// hidden[n, r] = act(sum_c pooled[n, c] * w_reduce[r, c] + b_reduce[r]). One warp per
// (sample tile, r): its lanes stride over C, read each W_reduce element once and apply it to
// the tile's kSampleTile pooled rows (rows past N are clamped to N - 1 and not written).
// Warp index = tile * R + r: the warps of a block share one pooled tile (L1) and read
// neighbouring W_reduce rows.
template <typename TP, typename TW, int ACT>
__global__ void __launch_bounds__(kThreads)
se_reduce_kernel(const TP* __restrict__ pooled, const TW* __restrict__ w, const TW* __restrict__ b,
                 float* __restrict__ hidden, int64_t n, int64_t c, int64_t r) {
  const int lane = threadIdx.x % 32;
  const int64_t tiles = ceil_div(n, kSampleTile);
  // Grid-stride over warps (uniform per warp): blocks_for() caps the grid.
  for (int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; warp < tiles * r;
       warp += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t i0 = (warp / r) * kSampleTile, j = warp % r;
    const TP* prow[kSampleTile];
#pragma unroll
    for (int t = 0; t < kSampleTile; ++t) prow[t] = pooled + (i0 + t < n ? i0 + t : n - 1) * c;
    const TW* wrow = w + j * c;
    float s[kSampleTile];
#pragma unroll
    for (int t = 0; t < kSampleTile; ++t) s[t] = 0.0f;
    for (int64_t k = lane; k < c; k += 32) {
      const float wv = to_float(wrow[k]);
#pragma unroll
      for (int t = 0; t < kSampleTile; ++t) s[t] = fmaf(to_float(prow[t][k]), wv, s[t]);
    }
    const float bj = to_float(b[j]);
#pragma unroll
    for (int t = 0; t < kSampleTile; ++t) {
      const float sum = warp_sum(s[t]);
      if (lane == t && i0 + t < n) hidden[(i0 + t) * r + j] = activate<ACT>(sum + bj);
    }
  }
}

// gate[n, c] = gate_fn(sum_r hidden[n, r] * w_expand[c, r] + b_expand[c]), GATE (kSigmoid or
// kHardSigmoid) the gate's function. One thread per (sample tile, c): the block stages the
// tile's hidden rows in shared memory (kHiddenChunk units at a time) and each thread reads its
// W_expand row once for the kSampleTile samples. grid.x: channel blocks, grid.y: tiles (loops).
//
// Staging layout, unit-major: unit k of the chunk for sample row t is h_s[k * kSampleTile + t].
// Staging element e is (t, k) = (e % 8, e / 8) and goes to word e, so a warp's stores are 32
// consecutive words, one per bank, for every chunk length (R < 32 puts several sample rows in
// one warp: a row-major h_s[t * 256 + k] put them in the same banks, 2-8 way). The inner loop
// reads unit k's 8 samples as two 16-byte loads, the same address in every lane (broadcast), as
// many shared loads as the row-major layout's float4 reads along k; the global reads of the
// staging (8 rows x 4 units per warp) touch 8 sectors instead of 4, once per chunk per block.
template <typename TW, int GATE>
__global__ void __launch_bounds__(kThreads)
se_expand_kernel(const float* __restrict__ hidden, const TW* __restrict__ w, const TW* __restrict__ b,
                 float* __restrict__ gate, int64_t n, int64_t c, int64_t r) {
  static_assert(kSampleTile == 8, "the inner loop reads a unit's samples as two float4");
  __shared__ __align__(16) float h_s[kSampleTile * kHiddenChunk];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t tiles = ceil_div(n, kSampleTile);
  const TW* wrow = w + (j < c ? j : 0) * r;
  for (int64_t tile = blockIdx.y; tile < tiles; tile += gridDim.y) {
    const int64_t i0 = tile * kSampleTile;
    float s[kSampleTile];
#pragma unroll
    for (int t = 0; t < kSampleTile; ++t) s[t] = 0.0f;
    for (int64_t k0 = 0; k0 < r; k0 += kHiddenChunk) {
      const int len = static_cast<int>(r - k0 < kHiddenChunk ? r - k0 : kHiddenChunk);
      __syncthreads();  // the previous chunk has been used
      for (int e = threadIdx.x; e < kSampleTile * len; e += blockDim.x) {
        const int t = e % kSampleTile, k = e / kSampleTile;
        h_s[e] = i0 + t < n ? hidden[(i0 + t) * r + k0 + k] : 0.0f;  // e == k * kSampleTile + t
      }
      __syncthreads();
      for (int k = 0; k < len; ++k) {
        const float wv = to_float(wrow[k0 + k]);
        const float4 lo = load_shared_f4(h_s + k * kSampleTile), hi = load_shared_f4(h_s + k * kSampleTile + 4);
        const float h[kSampleTile] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
        for (int t = 0; t < kSampleTile; ++t) s[t] = fmaf(h[t], wv, s[t]);
      }
    }
    if (j < c) {
      const float bj = to_float(b[j]);
#pragma unroll
      for (int t = 0; t < kSampleTile; ++t)
        if (i0 + t < n) gate[(i0 + t) * c + j] = activate<GATE>(s[t] + bj);
    }
  }
}

// Gate row of element e of a dense tensor: NCHW e / HW, NHWC (e / (HW * C)) * C + e % C.
__device__ __forceinline__ int64_t gate_index(int64_t e, int64_t c, int64_t hw, bool nhwc) {
  return nhwc ? (e / (hw * c)) * c + e % c : e / hw;
}

// out = y * gate. With vec (y and out 16-byte aligned) every thread takes 16-byte packs of the
// flat tensor; a pack's V gate indices are one run when `uniform` (NCHW: HW % V == 0, NHWC:
// C % V == 0), else computed per element (NCHW incrementally: a pack may cross planes, e.g.
// HW = 49 or 196). The total % V tail, and everything when !vec, goes one element per thread.
template <typename T>
__global__ void __launch_bounds__(kThreads)
se_excite_kernel(const T* __restrict__ y, const float* __restrict__ gate, T* __restrict__ out, int64_t total,
                 int64_t c, int64_t hw, bool nhwc, bool vec, bool uniform) {
  constexpr int V = PackWidth<T>::value;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = vec ? total / V : 0;
  for (int64_t i = first; i < packs; i += step) {
    const int64_t e = i * V;
    const RawPack in = load_pack<T, V>(y + e, true, V);
    float o[V];
    if (nhwc) {
      if (uniform) {
        const int64_t g = gate_index(e, c, hw, true);
#pragma unroll
        for (int v = 0; v < V; ++v) o[v] = pack_elem<T>(in, v) * __ldg(gate + g + v);
      } else {
#pragma unroll
        for (int v = 0; v < V; ++v) o[v] = pack_elem<T>(in, v) * __ldg(gate + gate_index(e + v, c, hw, true));
      }
    } else if (uniform) {
      const float g = __ldg(gate + e / hw);
#pragma unroll
      for (int v = 0; v < V; ++v) o[v] = pack_elem<T>(in, v) * g;
    } else {
      int64_t g = e / hw, rem = e - g * hw;
#pragma unroll
      for (int v = 0; v < V; ++v) {
        o[v] = pack_elem<T>(in, v) * __ldg(gate + g);
        if (++rem == hw) rem = 0, ++g;
      }
    }
    store_pack<T, V>(out + e, o, true, V);
  }
  for (int64_t e = packs * V + first; e < total; e += step)
    out[e] = from_float<T>(to_float(y[e]) * __ldg(gate + gate_index(e, c, hw, nhwc)));
}

unsigned blocks_for(int64_t work, int64_t per_block) {
  const int64_t b = ceil_div(work, per_block);
  return static_cast<unsigned>(b < (1 << 20) ? b : (1 << 20));
}

bool valid_dtype(int d) { return d == kFloat32 || d == kFloat16 || d == kBFloat16; }

}  // namespace

const char* se_gate(const SEGateArgs& a) {
  if (!valid_dtype(a.pooled_dtype) || !valid_dtype(a.weight_dtype)) return "se_gate: unsupported dtype code";
  if (a.n < 0 || a.c < 0 || a.r < 1) return "se_gate: invalid sizes";
  if (a.act != kSiLU && a.act != kReLU) return "se_gate: unsupported activation code";
  if (a.gate_act != kSigmoid && a.gate_act != kHardSigmoid) return "se_gate: unsupported gate code";
  if (a.n == 0 || a.c == 0) return nullptr;
  const DeviceGuard device(a.device);
  if (const char* err = device.error()) return err;
  cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  return DTYPE_SWITCH(a.weight_dtype, TW, [&] {
    const char* err = DTYPE_SWITCH(a.pooled_dtype, TP, [&] {
      return TWO_WAY_SWITCH(a.act, kSiLU, kReLU, ACT, [&] {
        se_reduce_kernel<TP, TW, ACT><<<blocks_for(ceil_div(a.n, kSampleTile) * a.r, kWarps), kThreads, 0, stream>>>(
            static_cast<const TP*>(a.pooled), static_cast<const TW*>(a.w_reduce),
            static_cast<const TW*>(a.b_reduce), a.hidden, a.n, a.c, a.r);
        return launch_error();
      });
    });
    if (err != nullptr) return err;
    const int64_t tiles = ceil_div(a.n, kSampleTile);
    const dim3 grid(static_cast<unsigned>(ceil_div(a.c, kThreads)), static_cast<unsigned>(tiles < 65535 ? tiles : 65535));
    return TWO_WAY_SWITCH(a.gate_act, kSigmoid, kHardSigmoid, GATE, [&] {
      se_expand_kernel<TW, GATE><<<grid, kThreads, 0, stream>>>(
          a.hidden, static_cast<const TW*>(a.w_expand), static_cast<const TW*>(a.b_expand), a.gate, a.n, a.c, a.r);
      return launch_error();
    });
  });
}

const char* se_excite(const SEExciteArgs& a) {
  if (!valid_dtype(a.dtype)) return "se_excite: unsupported dtype code";
  if (a.n < 0 || a.c < 0 || a.h < 0 || a.w < 0) return "se_excite: invalid sizes";
  const int64_t hw = a.h * a.w;
  const int64_t total = a.n * a.c * hw;
  if (total == 0) return nullptr;
  const DeviceGuard device(a.device);
  if (const char* err = device.error()) return err;
  cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  const int64_t v = a.dtype == kFloat32 ? 4 : 8;
  const bool vec = total >= v && aligned16(a.y) && aligned16(a.out);
  const bool uniform = (a.nhwc ? a.c : hw) % v == 0;
  return DTYPE_SWITCH(a.dtype, T, [&] {
    se_excite_kernel<T><<<blocks_for(vec ? ceil_div(total, v) : total, kThreads), kThreads, 0, stream>>>(
        static_cast<const T*>(a.y), a.gate, static_cast<T*>(a.out), total, a.c, hw, a.nhwc, vec, uniform);
    return launch_error();
  });
}

}  // namespace effnet
