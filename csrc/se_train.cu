// Backward of the squeeze-and-excitation ops (issue #11): se_excite_backward and
// se_gate_backward. Reductions run in a fixed order (no atomics): bitwise reproducible.
//
// Bytes (s = element size of y; R hidden units): se_excite_backward reads grad_out and y
// (2*s*N*C*H*W) + the gate (4*N*C), writes grad_y (s*N*C*H*W) and grad_gate (4*N*C), one pass.
// se_gate_backward moves O(N*C + R*C) floats: the per-sample kernel reads pooled, grad_gate and
// both weights (per sample, from L2), writes dv [N, C], da and hidden [N, R], grad_pooled [N, C];
// at_b_kernel then forms the four weight gradients (each reads its two [N, *] operands once per
// output column block).
//
// Template instances: se_excite_bwd_kernel x 3 dtypes, se_gate_bwd_sample_kernel x (SiLU | ReLU)
// x (sigmoid | hard-sigmoid) = 4, at_b_kernel 1: 8 kernels.
#include "device_utils.cuh"
#include "effnet_ext.h"
#include "static_switch.h"
#include "train_kernels.cuh"

namespace effnet {
namespace {

constexpr int kWarps = kThreads / 32;

// One block per (channel group, sample), the channel tile of train_kernels.cuh over the H*W
// positions of one sample: grad_y = grad_out * gate, grad_gate = sum over H*W of grad_out * y.
template <typename T>
__global__ void __launch_bounds__(kThreads)
se_excite_bwd_kernel(const SEExciteBackwardArgs a) {
  __shared__ float red[kThreads];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t hw = a.h * a.w;
  const T* __restrict__ go = static_cast<const T*>(a.grad_out);
  const T* __restrict__ y = static_cast<const T*>(a.y);
  T* __restrict__ gy = static_cast<T*>(a.grad_y);
  for (int64_t n = blockIdx.y; n < a.n; n += gridDim.y) {
    float s = 0.0f;
    if (c < a.c) {
      const float g = __ldg(a.gate + n * a.c + c);
      for (int64_t p = threadIdx.y; p < hw; p += blockDim.y) {
        const int64_t e = a.nhwc ? (n * hw + p) * a.c + c : (n * a.c + c) * hw + p;
        const float d = to_float(go[e]);
        gy[e] = from_float<T>(d * g);
        s = fmaf(d, to_float(y[e]), s);
      }
    }
    s = rows_sum(s, red);
    if (threadIdx.y == 0 && c < a.c) a.grad_gate[n * a.c + c] = s;
  }
}

// One block per sample n (grid-stride over samples), with a[r] = W_r pooled + b_r, act(a) and
// da in shared memory (dynamic, 3 * R floats):
//   1. a[r], h[r] = act(a[r])        (warp per r, lanes over C, warp_sum: fixed order)
//   2. dv[n, c] = grad_gate * gate'(W_e h + b_e)               (thread per c)
//   3. da[n, r] = act'(a[r]) * sum_c dv[n, c] W_e[c, r]; hidden[n, r] = h[r]  (warp per r)
//   4. grad_pooled[n, c] = sum_r da[r] W_r[r, c]               (thread per c)
// dv is read back from global memory in step 3: __syncthreads orders the block's global writes.
template <int ACT, int GATE>
__global__ void __launch_bounds__(kThreads) se_gate_bwd_sample_kernel(const SEGateBackwardArgs p) {
  extern __shared__ __align__(16) float smem[];
  float* a_s = smem;
  float* h_s = smem + p.r;
  float* da_s = smem + 2 * p.r;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int64_t n = blockIdx.x; n < p.n; n += gridDim.x) {
    const float* pooled = p.pooled + n * p.c;
    for (int64_t j = warp; j < p.r; j += kWarps) {
      const float* wr = p.w_reduce + j * p.c;
      float s = 0.0f;
      for (int64_t k = lane; k < p.c; k += 32) s = fmaf(pooled[k], wr[k], s);
      s = warp_sum(s);
      if (lane == 0) {
        a_s[j] = s + p.b_reduce[j];
        h_s[j] = activate<ACT>(a_s[j]);
      }
    }
    __syncthreads();
    for (int64_t c = threadIdx.x; c < p.c; c += blockDim.x) {
      const float* we = p.w_expand + c * p.r;
      float v = 0.0f;
      for (int64_t j = 0; j < p.r; ++j) v = fmaf(h_s[j], we[j], v);
      v += p.b_expand[c];
      p.dv[n * p.c + c] = p.grad_gate[n * p.c + c] * activate_grad<GATE>(v);
    }
    __syncthreads();
    const float* dv = p.dv + n * p.c;
    for (int64_t j = warp; j < p.r; j += kWarps) {
      float s = 0.0f;
      for (int64_t k = lane; k < p.c; k += 32) s = fmaf(dv[k], p.w_expand[k * p.r + j], s);
      s = warp_sum(s);
      if (lane == 0) {
        const float da = s * activate_grad<ACT>(a_s[j]);
        da_s[j] = da;
        p.da[n * p.r + j] = da;
        p.hidden[n * p.r + j] = h_s[j];
      }
    }
    __syncthreads();
    for (int64_t c = threadIdx.x; c < p.c; c += blockDim.x) {
      float s = 0.0f;
      for (int64_t j = 0; j < p.r; ++j) s = fmaf(da_s[j], p.w_reduce[j * p.c + c], s);
      p.grad_pooled[n * p.c + c] = s;
    }
    __syncthreads();  // a_s / da_s are rewritten for the next sample
  }
}

// out[i, j] = sum over n (in order) of A[n, i] * B[n, j] (A == nullptr: ones), i < I, j < J:
// the weight gradients as sums over the batch (j fastest: B's rows are read coalesced).
__global__ void __launch_bounds__(kThreads)
at_b_kernel(const float* __restrict__ A, const float* __restrict__ B, float* __restrict__ out, int64_t n,
            int64_t ni, int64_t nj) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < ni * nj;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / nj, j = e - i * nj;
    float s = 0.0f;
    for (int64_t t = 0; t < n; ++t) s = fmaf(A != nullptr ? A[t * ni + i] : 1.0f, B[t * nj + j], s);
    out[e] = s;
  }
}

unsigned blocks_1d(int64_t work) {
  const int64_t b = ceil_div(work, kThreads);
  return static_cast<unsigned>(b < (1 << 20) ? (b > 0 ? b : 1) : (1 << 20));
}

}  // namespace

const char* se_excite_backward(const SEExciteBackwardArgs& a) {
  if (a.dtype != kFloat32 && a.dtype != kFloat16 && a.dtype != kBFloat16) return "se_excite_backward: unsupported dtype code";
  if (a.n < 0 || a.c < 0 || a.h < 0 || a.w < 0) return "se_excite_backward: invalid sizes";
  if (a.n == 0 || a.c == 0) return nullptr;
  const DeviceGuard device(a.device);
  if (const char* err = device.error()) return err;
  cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  const ChannelTile t = channel_tile(a.nhwc);
  const dim3 grid(static_cast<unsigned>(ceil_div(a.c, t.bx)), static_cast<unsigned>(a.n < 65535 ? a.n : 65535));
  return DTYPE_SWITCH(a.dtype, T, [&] {
    se_excite_bwd_kernel<T><<<grid, dim3(t.bx, t.by), 0, stream>>>(a);
    return launch_error();
  });
}

const char* se_gate_backward(const SEGateBackwardArgs& a) {
  if (a.n < 0 || a.c < 0 || a.r < 1) return "se_gate_backward: invalid sizes";
  if (a.act != kSiLU && a.act != kReLU) return "se_gate_backward: unsupported activation code";
  if (a.gate_act != kSigmoid && a.gate_act != kHardSigmoid) return "se_gate_backward: unsupported gate code";
  if (a.c == 0) return nullptr;
  const DeviceGuard device(a.device);
  if (const char* err = device.error()) return err;
  cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  const size_t smem = sizeof(float) * 3 * static_cast<size_t>(a.r);
  if (smem > 48 * 1024) return "se_gate_backward: more than 4096 hidden units";
  if (a.n > 0) {
    const char* err = TWO_WAY_SWITCH(a.act, kSiLU, kReLU, ACT, [&] {
      return TWO_WAY_SWITCH(a.gate_act, kSigmoid, kHardSigmoid, GATE, [&] {
        se_gate_bwd_sample_kernel<ACT, GATE><<<static_cast<unsigned>(a.n < 65535 ? a.n : 65535), kThreads, smem, stream>>>(a);
        return launch_error();
      });
    });
    if (err != nullptr) return err;
  }
  // grad_w_expand[c, r] = sum_n dv[n, c] hidden[n, r]; grad_b_expand[c] = sum_n dv[n, c];
  // grad_w_reduce[r, c] = sum_n da[n, r] pooled[n, c]; grad_b_reduce[r] = sum_n da[n, r].
  at_b_kernel<<<blocks_1d(a.c * a.r), kThreads, 0, stream>>>(a.dv, a.hidden, a.grad_w_expand, a.n, a.c, a.r);
  if (const char* err = launch_error()) return err;
  at_b_kernel<<<blocks_1d(a.c), kThreads, 0, stream>>>(nullptr, a.dv, a.grad_b_expand, a.n, 1, a.c);
  if (const char* err = launch_error()) return err;
  at_b_kernel<<<blocks_1d(a.r * a.c), kThreads, 0, stream>>>(a.da, a.pooled, a.grad_w_reduce, a.n, a.r, a.c);
  if (const char* err = launch_error()) return err;
  at_b_kernel<<<blocks_1d(a.r), kThreads, 0, stream>>>(nullptr, a.da, a.grad_b_reduce, a.n, 1, a.r);
  return launch_error();
}

}  // namespace effnet
