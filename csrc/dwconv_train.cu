// dwconv_bn_act_train on CUDA (issue #11): the batch statistics of the depthwise conv output
// and the backward through them. The forward's apply pass is the eval forward kernel
// (dwconv_kernels.cuh) with scale = gamma / sqrt(var + eps), shift = beta - mean * scale
// folded in by effnet_kernels/cuda.py, so this file holds the statistics and the backward.
//
// Passes and the bytes each moves (E_in = N*C*H*W, E_out = N*C*Ho*Wo elements, s = the
// element size of x, P = chunks * C partial rows of the fixed-order reductions; the K x K
// halo re-reads of x hit L1/L2):
//
//   forward   stats_kernel          read x: s*E_in                    write 12*P
//             stats_combine_kernel  read 12*P                         write 8*C (mean, var)
//             [apply: the eval forward kernel, read s*E_in, write s*E_out (+ 4*N*C squeeze)]
//   backward  bwd_reduce_kernel     read x, grad_y: s*(E_in + E_out)  write 8*P
//             sum_rows_kernel x 2   read 8*P                          write 8*C (grad_beta, grad_gamma)
//             gz_kernel             read x, grad_y: s*(E_in + E_out)  write gz: 4*E_out
//             input_grads_kernel    read gz, x: 4*E_out + s*E_in      write grad_x: s*E_in, 4*K*K*P_in
//             sum_rows_kernel       read 4*K*K*P_in                   write 4*K*K*C
//
// (+ 4*N*C of grad_pooled wherever grad_y is read; P_in = input chunks * C.) The backward moves
// 4*s*E_in + 2*s*E_out + 8*E_out bytes besides the partials: at stride 1 in fp16 20 per element,
// where grad_x and grad_w as two passes (each reading gz, grad_w x again) moved 24. Template instances: stats, bwd_reduce, gz,
// input_grads for k in {3, 5, 7} x {fp32, fp16, bf16}: 4 x 9 = 36 kernels, plus 2 untemplated
// combine kernels. Strides and the activation are runtime values (the activation's derivative
// is a uniform branch, activate_grad_rt); every reduction is deterministic (no atomics).
#include "device_utils.cuh"
#include "effnet_ext.h"
#include "static_switch.h"
#include "train_kernels.cuh"

namespace effnet {
namespace {

using Args = DWConvTrainArgs;

// Positions [first, limit) of the range [0, m) this block's chunk covers (m = N * Ho * Wo, or
// N * H * W for input_grads).
struct ChunkRange {
  int64_t first, limit;
};
__device__ __forceinline__ ChunkRange chunk_range(int64_t m, int64_t chunk) {
  const int64_t first = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t end = first + chunk;
  return {first, end < m ? end : m};
}

// (n, row, col) of position p of the range N * H * W of an H x W plane (the output's or the input's).
__device__ __forceinline__ void position(int64_t p, int64_t h, int64_t w, int64_t& n, int64_t& row, int64_t& col) {
  const int64_t hw = h * w;
  n = p / hw;
  const int64_t r = p - n * hw;
  row = r / w;
  col = r - row * w;
}

// z = dwconv(x)[n, c, ho, wo] (fp32); wt: the channel's taps (load_taps).
template <typename T, int K>
__device__ __forceinline__ float conv_at(const Args& a, int64_t n, int64_t c, int64_t ho, int64_t wo,
                                         const float (&wt)[K * K]) {
  return dw_tap_sum<T, K>(static_cast<const T*>(a.x), a.xs, n, c, ho * a.stride_h - a.pad_top,
                          wo * a.stride_w - a.pad_left, a.h, a.w, wt);
}

// Per-channel constants of the backward: the BatchNorm's and the squeeze gradient's.
struct ChannelBN {
  float mean, invstd, gamma, beta;
};
__device__ __forceinline__ ChannelBN channel_bn(const Args& a, int64_t c) {
  return {__ldg(a.in_mean + c), 1.0f / sqrtf(__ldg(a.in_var + c) + a.eps), __ldg(a.gamma + c), __ldg(a.beta + c)};
}

// g_u, the gradient at the activation's input u = xhat * gamma + beta, at (n, c, ho, wo):
// (grad_y + grad_pooled / (Ho * Wo)) * act'(u); xhat = (z - mean) * invstd is returned too.
template <typename T, int K>
__device__ __forceinline__ float grad_at_u(const Args& a, int64_t n, int64_t c, int64_t ho, int64_t wo,
                                           const float (&wt)[K * K], const ChannelBN& bn, float& xhat) {
  xhat = (conv_at<T, K>(a, n, c, ho, wo, wt) - bn.mean) * bn.invstd;
  const float u = fmaf(xhat, bn.gamma, bn.beta);
  float g = a.grad_y != nullptr ? to_float(static_cast<const T*>(a.grad_y)[offset4(a.gys, n, c, ho, wo)]) : 0.0f;
  if (a.grad_pooled != nullptr) g += __ldg(a.grad_pooled + n * a.c + c) / static_cast<float>(a.ho * a.wo);
  return a.act == kIdentity ? g : g * activate_grad_rt(a.act, u);
}

// Per-(chunk, channel) (count, mean, M2) of z: partials[(chunk * 3 + {0, 1, 2}) * C + c].
template <typename T, int K>
__global__ void __launch_bounds__(kThreads) stats_kernel(const Args a, int64_t chunk) {
  __shared__ float red[3 * kThreads];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const ChunkRange range = chunk_range(a.n * a.ho * a.wo, chunk);
  Moments mo;
  if (c < a.c) {
    float wt[K * K];
    load_taps<K>(a.weight, c, wt);
    for (int64_t p = range.first + threadIdx.y; p < range.limit; p += blockDim.y) {
      int64_t n, ho, wo;
      position(p, a.ho, a.wo, n, ho, wo);
      welford_add(mo, conv_at<T, K>(a, n, c, ho, wo, wt));
    }
  }
  const int nthreads = blockDim.x * blockDim.y, tid = threadIdx.y * blockDim.x + threadIdx.x;
  red[tid] = mo.count, red[nthreads + tid] = mo.mean, red[2 * nthreads + tid] = mo.m2;
  __syncthreads();
  if (threadIdx.y == 0 && c < a.c) {
    Moments all;
    for (unsigned r = 0; r < blockDim.y; ++r) {  // row order: deterministic
      const int i = r * blockDim.x + threadIdx.x;
      chan_merge(all, Moments{red[i], red[nthreads + i], red[2 * nthreads + i]});
    }
    float* row = a.partials + static_cast<int64_t>(blockIdx.y) * 3 * a.c;
    row[c] = all.count, row[a.c + c] = all.mean, row[2 * a.c + c] = all.m2;
  }
}

// mean[c], var[c] (biased) from the chunks' moments, merged in chunk order in fp64 (exact
// counts for any batch; C threads, so the cost is nothing).
__global__ void __launch_bounds__(kThreads)
stats_combine_kernel(const float* __restrict__ partials, int64_t chunks, int64_t c_, float* __restrict__ mean,
                     float* __restrict__ var) {
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < c_;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    double cnt = 0.0, mu = 0.0, m2 = 0.0;
    for (int64_t t = 0; t < chunks; ++t) {
      const float* row = partials + t * 3 * c_;
      const double nb = row[c], mb = row[c_ + c], m2b = row[2 * c_ + c];
      if (nb == 0.0) continue;
      const double nt = cnt + nb, d = mb - mu;
      mu += d * nb / nt;
      m2 += m2b + d * d * cnt * nb / nt;
      cnt = nt;
    }
    mean[c] = static_cast<float>(mu);
    var[c] = cnt > 0.0 ? static_cast<float>(m2 / cnt) : 0.0f;
  }
}

// Per-(chunk, channel) sum(g_u) and sum(g_u * xhat): partials[(chunk * 2 + {0, 1}) * C + c].
template <typename T, int K>
__global__ void __launch_bounds__(kThreads) bwd_reduce_kernel(const Args a, int64_t chunk) {
  __shared__ float red[kThreads];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const ChunkRange range = chunk_range(a.n * a.ho * a.wo, chunk);
  float s_g = 0.0f, s_gx = 0.0f;
  if (c < a.c) {
    float wt[K * K];
    load_taps<K>(a.weight, c, wt);
    const ChannelBN bn = channel_bn(a, c);
    for (int64_t p = range.first + threadIdx.y; p < range.limit; p += blockDim.y) {
      int64_t n, ho, wo;
      position(p, a.ho, a.wo, n, ho, wo);
      float xhat;
      const float g = grad_at_u<T, K>(a, n, c, ho, wo, wt, bn, xhat);
      s_g += g;
      s_gx = fmaf(g, xhat, s_gx);
    }
  }
  s_g = rows_sum(s_g, red);
  s_gx = rows_sum(s_gx, red);
  if (threadIdx.y == 0 && c < a.c) {
    float* row = a.partials + static_cast<int64_t>(blockIdx.y) * 2 * a.c;
    row[c] = s_g, row[a.c + c] = s_gx;
  }
}

// out[i] = sum over the rows t (in order) of partials[t * row_stride + i], i < width.
__global__ void __launch_bounds__(kThreads)
sum_rows_kernel(const float* __restrict__ partials, int64_t rows, int64_t row_stride, int64_t width,
                float* __restrict__ out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < width;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.0f;
    for (int64_t t = 0; t < rows; ++t) s += partials[t * row_stride + i];
    out[i] = s;
  }
}

// gz = gamma * invstd * (g_u - grad_beta / M - xhat * grad_gamma / M), the gradient at the conv
// output, fp32 into the scratch gz (strides gzs), over the reduction kernels' tile: a thread keeps
// one channel, its taps in registers and its BatchNorm constants, for a chunk of positions (a
// thread per element in memory order gathered the taps of 32 channels, K * K floats apart, on
// every element: NHWC's lanes are consecutive channels). No barrier, so idle channels return.
template <typename T, int K>
__global__ void __launch_bounds__(kThreads) gz_kernel(const Args a, int64_t chunk) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= a.c) return;
  const ChunkRange range = chunk_range(a.n * a.ho * a.wo, chunk);
  const float inv_m = 1.0f / static_cast<float>(a.count > 0 ? a.count : a.n * a.ho * a.wo);
  float wt[K * K];
  load_taps<K>(a.weight, c, wt);
  const ChannelBN bn = channel_bn(a, c);
  const float mean_g = __ldg(a.grad_beta + c) * inv_m, mean_gx = __ldg(a.grad_gamma + c) * inv_m;
  const float k1 = bn.gamma * bn.invstd;
  for (int64_t p = range.first + threadIdx.y; p < range.limit; p += blockDim.y) {
    int64_t n, ho, wo;
    position(p, a.ho, a.wo, n, ho, wo);
    float xhat;
    const float g = grad_at_u<T, K>(a, n, c, ho, wo, wt, bn, xhat);
    a.gz[offset4(a.gzs, n, c, ho, wo)] = k1 * (g - mean_g - xhat * mean_gx);
  }
}

// The input's two gradients in one pass over tiles of *input* positions (the tile of the
// reduction kernels, its chunks over N * H * W): for each of the K x K taps, the output
// position (ho, wo) that tap fed from this input (hi, wi) -- ho * stride_h + kh = hi + pad_top,
// where that divides exactly and lands in range --
//   grad_x[n, c, hi, wi] = sum over those taps of gz[n, c, ho, wo] * w[c, tap]
//   per-(chunk, tap, channel) partial of grad_w[c, tap] = sum of gz[n, c, ho, wo] * x[n, c, hi, wi]
// (each (output, tap) pair reads exactly one input, so summing over the input positions counts
// each once; taps that read padding contribute 0). partials[(chunk * K * K + tap) * C + c], tap-
// major as the grad_weight the combine writes. The block's 32 (NHWC) channels' taps are staged in
// shared memory tap-major, so a warp's weight reads are one conflict-free 128-byte row. The
// minimum of 3 blocks per SM (2 at k = 7, whose 49 accumulators take 128 registers) is ptxas's
// register target: without it, the 16-bit k = 5 instances were held at 64 registers and spilled.
template <typename T, int K>
__global__ void __launch_bounds__(kThreads, K == 7 ? 2 : 3) input_grads_kernel(const Args a, int64_t chunk) {
  __shared__ float red[kThreads];
  __shared__ float w_s[K * K * kTileChannels];
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const ChunkRange range = chunk_range(a.n * a.h * a.w, chunk);
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int i = tid; i < K * K * static_cast<int>(blockDim.x); i += blockDim.x * blockDim.y) {
    const int tap = i / blockDim.x, cx = i - tap * blockDim.x;
    const int64_t ch = static_cast<int64_t>(blockIdx.x) * blockDim.x + cx;
    w_s[i] = ch < a.c ? __ldg(a.weight + ch * (K * K) + tap) : 0.0f;
  }
  __syncthreads();
  const T* __restrict__ x = static_cast<const T*>(a.x);
  T* __restrict__ gx = static_cast<T*>(a.grad_x);
  float acc[K * K];
#pragma unroll
  for (int t = 0; t < K * K; ++t) acc[t] = 0.0f;
  if (c < a.c) {
    const float* __restrict__ wt = w_s + threadIdx.x;  // tap t at wt[t * blockDim.x]
    const int sh = a.stride_h - 1, sw = a.stride_w - 1;  // strides are 1 or 2 (check_args): shifts, not int64 division
    for (int64_t p = range.first + threadIdx.y; p < range.limit; p += blockDim.y) {
      int64_t n, hi, wi;
      position(p, a.h, a.w, n, hi, wi);
      const float xv = to_float(x[offset4(a.xs, n, c, hi, wi)]);
      const float* g = a.gz + n * a.gzs.n + c * a.gzs.c;
      float gxv = 0.0f;
#pragma unroll
      for (int kh = 0; kh < K; ++kh) {
        const int64_t th = hi + a.pad_top - kh;
        if (th < 0 || (th & sh) != 0) continue;
        const int64_t ho = th >> sh;
        if (ho >= a.ho) continue;
#pragma unroll
        for (int kw = 0; kw < K; ++kw) {
          const int64_t tw = wi + a.pad_left - kw;
          if (tw < 0 || (tw & sw) != 0) continue;
          const int64_t wo = tw >> sw;
          if (wo >= a.wo) continue;
          const float gv = g[ho * a.gzs.h + wo * a.gzs.w];
          gxv = fmaf(gv, wt[(kh * K + kw) * blockDim.x], gxv);
          acc[kh * K + kw] = fmaf(gv, xv, acc[kh * K + kw]);
        }
      }
      gx[offset4(a.gxs, n, c, hi, wi)] = from_float<T>(gxv);
    }
  }
  float* rows = a.partials + static_cast<int64_t>(blockIdx.y) * (K * K) * a.c;
#pragma unroll 1
  for (int t = 0; t < K * K; ++t) {
    float v = 0.0f;
#pragma unroll
    for (int j = 0; j < K * K; ++j) v = j == t ? acc[j] : v;  // register select, no local memory
    const float s = rows_sum(v, red);
    if (threadIdx.y == 0 && c < a.c) rows[t * a.c + c] = s;
  }
}

unsigned grid_1d(int64_t total) {
  const int64_t b = ceil_div(total, kThreads);
  return static_cast<unsigned>(b < (1 << 20) ? (b > 0 ? b : 1) : (1 << 20));
}

struct TileLaunch {
  dim3 grid, block;
  int64_t chunk;
};

// The tile launch over m positions: the output positions N * Ho * Wo (stats, bwd_reduce) or the
// input positions N * H * W (input_grads).
TileLaunch tile_launch(const Args& a, int64_t m) {
  const ChannelTile t = channel_tile(a.nhwc);
  const int64_t groups = ceil_div(a.c, t.bx);
  const Chunking ch = chunking(m, groups, t.by);
  return {dim3(static_cast<unsigned>(groups), static_cast<unsigned>(ch.chunks)), dim3(t.bx, t.by), ch.chunk};
}
TileLaunch output_tiles(const Args& a) { return tile_launch(a, a.n * a.ho * a.wo); }
TileLaunch input_tiles(const Args& a) { return tile_launch(a, a.n * a.h * a.w); }

const char* check_args(const Args& a) {
  if (a.dtype != kFloat32 && a.dtype != kFloat16 && a.dtype != kBFloat16) return "dwconv_bn_act_train: unsupported dtype code";
  if (a.k != 3 && a.k != 5 && a.k != 7) return "dwconv_bn_act_train: the CUDA kernels support kernel sizes 3, 5 and 7";
  if ((a.stride_h != 1 && a.stride_h != 2) || (a.stride_w != 1 && a.stride_w != 2))
    return "dwconv_bn_act_train: stride must be 1 or 2";
  if (a.n < 0 || a.c < 0 || a.h < 0 || a.w < 0 || a.ho < 1 || a.wo < 1) return "dwconv_bn_act_train: invalid sizes";
  if (a.pad_top < 0 || a.pad_left < 0) return "dwconv_bn_act_train: padding must be non-negative";
  if (a.act < kIdentity || a.act > kHardSwish) return "dwconv_bn_act_train: unsupported activation code";
  // an x of H * W = 0 (every output reads padding alone) has no storage: a null pointer, never read
  if ((a.x == nullptr && a.h * a.w > 0) || a.weight == nullptr) return "dwconv_bn_act_train: x and weight are required";
  return nullptr;
}

const char* check_partials(const Args& a) {
  if (a.partials == nullptr || a.partials_numel < dwconv_train_partials_numel(a))
    return "dwconv_bn_act_train: the partials buffer is missing or smaller than dwconv_train_partials_numel()";
  return nullptr;
}

}  // namespace

int64_t dwconv_train_partials_numel(const DWConvTrainArgs& a) {
  if (check_args(a) != nullptr || a.n == 0 || a.c == 0) return 0;
  // stats: 3 rows per output chunk, bwd_reduce 2; input_grads: K * K per input chunk
  const int64_t out_rows = 3 * static_cast<int64_t>(output_tiles(a).grid.y);
  const int64_t in_rows = a.k * a.k * static_cast<int64_t>(input_tiles(a).grid.y);
  return (out_rows > in_rows ? out_rows : in_rows) * a.c;
}

const char* dwconv_bn_stats(const DWConvTrainArgs& a) {
  if (const char* err = check_args(a)) return err;
  if (a.n == 0 || a.c == 0) return nullptr;
  if (a.mean == nullptr || a.var == nullptr) return "dwconv_bn_stats: mean and var outputs are required";
  if (const char* err = check_partials(a)) return err;
  const DeviceGuard device(a.device);
  if (const char* err = device.error()) return err;
  cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  const TileLaunch t = output_tiles(a);
  const char* err = DTYPE_SWITCH(a.dtype, T, [&] {
    return KSIZE_SWITCH(a.k, K, [&] {
      stats_kernel<T, K><<<t.grid, t.block, 0, stream>>>(a, t.chunk);
      return launch_error();
    });
  });
  if (err != nullptr) return err;
  stats_combine_kernel<<<grid_1d(a.c), kThreads, 0, stream>>>(a.partials, t.grid.y, a.c, a.mean, a.var);
  return launch_error();
}

namespace {

const char* check_backward_args(const DWConvTrainArgs& a) {
  if (a.gamma == nullptr || a.beta == nullptr || a.in_mean == nullptr || a.in_var == nullptr)
    return "dwconv_bn_act_train_backward: gamma, beta, mean and var are required";
  if (a.grad_gamma == nullptr || a.grad_beta == nullptr)
    return "dwconv_bn_act_train_backward: the grad_gamma and grad_beta buffers are required";
  return check_partials(a);
}

// pass 1: per-channel sum(g_u) -> grad_beta, sum(g_u * xhat) -> grad_gamma
template <typename T, int K>
const char* launch_grad_sums(const DWConvTrainArgs& a, cudaStream_t stream) {
  const TileLaunch t = output_tiles(a);
  bwd_reduce_kernel<T, K><<<t.grid, t.block, 0, stream>>>(a, t.chunk);
  if (const char* e = launch_error()) return e;
  sum_rows_kernel<<<grid_1d(a.c), kThreads, 0, stream>>>(a.partials, t.grid.y, 2 * a.c, a.c, a.grad_beta);
  if (const char* e = launch_error()) return e;
  sum_rows_kernel<<<grid_1d(a.c), kThreads, 0, stream>>>(a.partials + a.c, t.grid.y, 2 * a.c, a.c, a.grad_gamma);
  return launch_error();
}

// pass 2: gz from the sums in grad_beta / grad_gamma, then grad_x (transposed conv) and the
// grad_weight partials in one pass over the input, and their combine
template <typename T, int K>
const char* launch_input_grads(const DWConvTrainArgs& a, cudaStream_t stream) {
  const int64_t kk = a.k * a.k;
  const TileLaunch out = output_tiles(a);
  gz_kernel<T, K><<<out.grid, out.block, 0, stream>>>(a, out.chunk);
  if (const char* e = launch_error()) return e;
  const TileLaunch t = input_tiles(a);
  input_grads_kernel<T, K><<<t.grid, t.block, 0, stream>>>(a, t.chunk);
  if (const char* e = launch_error()) return e;
  sum_rows_kernel<<<grid_1d(kk * a.c), kThreads, 0, stream>>>(a.partials, t.grid.y, kk * a.c, kk * a.c,
                                                               a.grad_weight);
  return launch_error();
}

enum class Half { kSums, kInputGrads, kBoth };

const char* run_backward(const DWConvTrainArgs& a, Half half) {
  if (const char* err = check_args(a)) return err;
  if (a.n == 0 || a.c == 0) return nullptr;
  if (const char* err = check_backward_args(a)) return err;
  if (half != Half::kSums && (a.gz == nullptr || (a.grad_x == nullptr && a.h * a.w > 0) || a.grad_weight == nullptr))
    return "dwconv_bn_act_train_backward: the gz scratch and the grad_x and grad_weight outputs are required";
  if (a.count < 0) return "dwconv_bn_input_grads: count must be non-negative";
  const DeviceGuard device(a.device);
  if (const char* err = device.error()) return err;
  cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  return DTYPE_SWITCH(a.dtype, T, [&] {
    return KSIZE_SWITCH(a.k, K, [&]() -> const char* {
      if (half != Half::kInputGrads) {
        if (const char* e = launch_grad_sums<T, K>(a, stream)) return e;
      }
      if (half == Half::kSums) return nullptr;
      return launch_input_grads<T, K>(a, stream);
    });
  });
}

}  // namespace

const char* dwconv_bn_act_train_backward(const DWConvTrainArgs& a) {
  DWConvTrainArgs local = a;
  local.count = 0;  // this batch's statistics
  return run_backward(local, Half::kBoth);
}

const char* dwconv_bn_grad_sums(const DWConvTrainArgs& a) { return run_backward(a, Half::kSums); }

const char* dwconv_bn_input_grads(const DWConvTrainArgs& a) { return run_backward(a, Half::kInputGrads); }

}  // namespace effnet
