// Squeeze-and-excitation kernels: se_gate (pooled -> gate, two small warp-per-output
// kernels through an fp32 hidden buffer) and se_excite (y * gate, 16-byte accesses
// when the layout and alignment allow).
#include "device_utils.cuh"
#include "effnet_ext.h"
#include "static_switch.h"

namespace effnet {
namespace {

constexpr int kWarps = kThreads / 32;

// hidden[n, r] = act(sum_c pooled[n, c] * w_reduce[r, c] + b_reduce[r]); one warp per (n, r).
template <typename TP, typename TW, int ACT>
__global__ void __launch_bounds__(kThreads)
se_reduce_kernel(const TP* __restrict__ pooled, const TW* __restrict__ w, const TW* __restrict__ b,
                 float* __restrict__ hidden, int64_t n, int64_t c, int64_t r) {
  const int lane = threadIdx.x % 32;
  // Grid-stride over warps (uniform per warp): blocks_for() caps the grid.
  for (int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; warp < n * r;
       warp += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t i = warp / r, j = warp % r;
    const TP* prow = pooled + i * c;
    const TW* wrow = w + j * c;
    float s = 0.0f;
    for (int64_t k = lane; k < c; k += 32) s = fmaf(to_float(prow[k]), to_float(wrow[k]), s);
    s = warp_sum(s);
    if (lane == 0) hidden[warp] = activate<ACT>(s + to_float(b[j]));
  }
}

// gate[n, c] = gate_fn(sum_r hidden[n, r] * w_expand[c, r] + b_expand[c]); one warp per (n, c),
// GATE (kSigmoid or kHardSigmoid) the gate's function.
template <typename TW, int GATE>
__global__ void __launch_bounds__(kThreads)
se_expand_kernel(const float* __restrict__ hidden, const TW* __restrict__ w, const TW* __restrict__ b,
                 float* __restrict__ gate, int64_t n, int64_t c, int64_t r) {
  const int lane = threadIdx.x % 32;
  for (int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; warp < n * c;
       warp += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t i = warp / c, j = warp % c;
    const float* hrow = hidden + i * r;
    const TW* wrow = w + j * r;
    float s = 0.0f;
    for (int64_t k = lane; k < r; k += 32) s = fmaf(hrow[k], to_float(wrow[k]), s);
    s = warp_sum(s);
    if (lane == 0) gate[warp] = activate<GATE>(s + to_float(b[j]));
  }
}

// out = y * gate, element e of a dense tensor in NCHW (gate index e / HW) or NHWC
// (gate index (e / (HW * C)) * C + e % C). With vec every 16-byte pack shares one
// gate row segment: NCHW needs HW % V == 0, NHWC needs C % V == 0.
template <typename T>
__global__ void __launch_bounds__(kThreads)
se_excite_kernel(const T* __restrict__ y, const float* __restrict__ gate, T* __restrict__ out, int64_t total,
                 int64_t c, int64_t hw, bool nhwc, bool vec) {
  constexpr int V = PackWidth<T>::value;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (vec) {
    for (int64_t i = first; i < total / V; i += step) {
      const int64_t e = i * V;
      const RawPack in = load_pack<T, V>(y + e, true, V);
      float o[V];
      if (nhwc) {
        const int64_t g = (e / (hw * c)) * c + e % c;
#pragma unroll
        for (int v = 0; v < V; ++v) o[v] = pack_elem<T>(in, v) * __ldg(gate + g + v);
      } else {
        const float g = __ldg(gate + e / hw);
#pragma unroll
        for (int v = 0; v < V; ++v) o[v] = pack_elem<T>(in, v) * g;
      }
      store_pack<T, V>(out + e, o, true, V);
    }
  } else {
    for (int64_t e = first; e < total; e += step) {
      const int64_t g = nhwc ? (e / (hw * c)) * c + e % c : e / hw;
      out[e] = from_float<T>(to_float(y[e]) * __ldg(gate + g));
    }
  }
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
        se_reduce_kernel<TP, TW, ACT><<<blocks_for(a.n * a.r, kWarps), kThreads, 0, stream>>>(
            static_cast<const TP*>(a.pooled), static_cast<const TW*>(a.w_reduce),
            static_cast<const TW*>(a.b_reduce), a.hidden, a.n, a.c, a.r);
        return launch_error();
      });
    });
    if (err != nullptr) return err;
    return TWO_WAY_SWITCH(a.gate_act, kSigmoid, kHardSigmoid, GATE, [&] {
      se_expand_kernel<TW, GATE><<<blocks_for(a.n * a.c, kWarps), kThreads, 0, stream>>>(
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
  const bool vec = ((a.nhwc ? a.c : hw) % v == 0) && aligned16(a.y) && aligned16(a.out);
  return DTYPE_SWITCH(a.dtype, T, [&] {
    se_excite_kernel<T><<<blocks_for(vec ? total / v : total, kThreads), kThreads, 0, stream>>>(
        static_cast<const T*>(a.y), a.gate, static_cast<T*>(a.out), total, a.c, hw, a.nhwc, vec);
    return launch_error();
  });
}

}  // namespace effnet
