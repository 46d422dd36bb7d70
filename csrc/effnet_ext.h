// Host-side interface of the effnet_kernels CUDA extension.
//
// Plain C++ (no CUDA, no libtorch headers): the pybind11 binding includes only this.
// Every entry point returns nullptr on success or a static error message (CUDA's own
// message for CUDA errors). Tensors are raw device pointers to dense data; streams
// are cudaStream_t values passed as void*.
#pragma once

#include <cstdint>

namespace effnet {

// Bump whenever the Python <-> C++ calling convention changes; effnet_kernels/_build.py
// holds the same number and refuses a module built with another one.
constexpr int kAbiVersion = 5;  // 5: the training entry points (dwconv_train.cu, se_train.cu)

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Elementwise functions, one code each (effnet_kernels/ops/_checks.py ACT_CODES holds the same
// numbers); a kernel takes its activation as a template argument (ACT_SWITCH, static_switch.h).
// dwconv_bn_act: kIdentity..kHardSwish; se_gate: kSiLU | kReLU inside, kSigmoid | kHardSigmoid
// at the output. PyTorch's definitions: hardswish(u) = u * relu6(u + 3) / 6,
// hardsigmoid(u) = relu6(u + 3) / 6.
enum Act : int {
  kIdentity = 0,
  kSiLU = 1,
  kReLU = 2,
  kReLU6 = 3,
  kHardSwish = 4,
  kSigmoid = 5,
  kHardSigmoid = 6,
};

struct DWConvArgs {
  const void* x = nullptr;       // [N, C, H, W] dense NCHW, or dense NHWC when nhwc
  void* y = nullptr;             // [N, C, Ho, Wo], same layout and dtype as x
  const float* weight = nullptr; // [k * k, C] tap-major with the BN scale folded in (w[c, tap] * scale[c])
  const float* shift = nullptr;  // [C]
  float* mean = nullptr;         // [N, C], zero-filled; only read when squeeze
  float* partials = nullptr;     // deterministic squeeze scratch, dwconv_partials_numel() floats
  int64_t partials_numel = 0;
  int dtype = kFloat32;
  bool nhwc = false;
  int64_t n = 0, c = 0, h = 0, w = 0, ho = 0, wo = 0;
  int k = 3, stride_h = 1, stride_w = 1, pad_top = 0, pad_left = 0;
  int act = kSiLU;  // kIdentity, kSiLU, kReLU, kReLU6 or kHardSwish
  bool squeeze = false;
  bool deterministic = false;
  int device = 0;
  void* stream = nullptr;
};

// y = act(dwconv(x, weight) + shift) (+ mean = spatial mean of y in fp32); the caller folds the BN
// scale into weight (effnet_kernels/cuda.py prepared_weight).
const char* dwconv_bn_act(const DWConvArgs& args);

// Floats of scratch dwconv_bn_act needs in args.partials (0 unless squeeze && deterministic).
int64_t dwconv_partials_numel(const DWConvArgs& args);

struct SEGateArgs {
  const void* pooled = nullptr;   // [N, C], dtype pooled_dtype
  const void* w_reduce = nullptr; // [R, C], dtype weight_dtype (all four weights share it)
  const void* b_reduce = nullptr; // [R]
  const void* w_expand = nullptr; // [C, R]
  const void* b_expand = nullptr; // [C]
  float* hidden = nullptr;        // [N, R] fp32 scratch
  float* gate = nullptr;          // [N, C] fp32 output
  int pooled_dtype = kFloat32;
  int weight_dtype = kFloat32;
  int64_t n = 0, c = 0, r = 0;
  int act = kSiLU;          // between the FCs: kSiLU or kReLU
  int gate_act = kSigmoid;  // the gate's function: kSigmoid or kHardSigmoid
  int device = 0;
  void* stream = nullptr;
};

// gate = gate_fn(W_e act(W_r pooled + b_r) + b_e).
const char* se_gate(const SEGateArgs& args);

struct SEExciteArgs {
  const void* y = nullptr;     // [N, C, H, W] dense NCHW, or dense NHWC when nhwc
  const float* gate = nullptr; // [N, C] fp32
  void* out = nullptr;         // like y
  int dtype = kFloat32;
  bool nhwc = false;
  int64_t n = 0, c = 0, h = 0, w = 0;
  int device = 0;
  void* stream = nullptr;
};

// out = y * gate[:, :, None, None].
const char* se_excite(const SEExciteArgs& args);

// ------------------------------------------------------------------ training (issue #11)
// Element strides of a 4-D tensor indexed (n, c, h, w): any layout, views included.
struct Strides4 {
  int64_t n = 0, c = 0, h = 0, w = 0;
};

// dwconv_bn_act_train's CUDA passes (dwconv_train.cu). Sizes and conv geometry as DWConvArgs;
// `nhwc` picks the thread mapping (coalesced for x's layout), the strides say where elements are.
struct DWConvTrainArgs {
  const void* x = nullptr;         // [N, C, H, W], dtype
  Strides4 xs;
  const float* weight = nullptr;   // [C, k * k] fp32 dense (the raw depthwise weight, no BN folded in)
  int dtype = kFloat32;
  bool nhwc = false;
  int64_t n = 0, c = 0, h = 0, w = 0, ho = 0, wo = 0;
  int k = 3, stride_h = 1, stride_w = 1, pad_top = 0, pad_left = 0;
  int act = kSiLU;                 // kIdentity..kHardSwish
  float* partials = nullptr;       // scratch, dwconv_train_partials_numel() floats
  int64_t partials_numel = 0;
  // dwconv_bn_stats: outputs, [C] fp32
  float* mean = nullptr;
  float* var = nullptr;
  // dwconv_bn_act_train_backward
  const void* grad_y = nullptr;    // [N, C, Ho, Wo], dtype, or nullptr (no gradient through y)
  Strides4 gys;
  const float* grad_pooled = nullptr;  // [N, C] fp32 dense, or nullptr
  const float* gamma = nullptr;    // [C] fp32
  const float* beta = nullptr;     // [C] fp32
  const float* in_mean = nullptr;  // [C] fp32: the forward's batch statistics
  const float* in_var = nullptr;
  float eps = 1e-5f;
  float* gz = nullptr;             // scratch [N, C, Ho, Wo] fp32, strides gzs
  Strides4 gzs;
  void* grad_x = nullptr;          // [N, C, H, W], dtype, strides gxs
  Strides4 gxs;
  float* grad_weight = nullptr;    // [k * k, C] fp32 (tap-major)
  float* grad_gamma = nullptr;     // [C] fp32
  float* grad_beta = nullptr;      // [C] fp32
  // dwconv_bn_input_grads: the values per channel the statistics span (a process group's, for
  // SyncBatchNorm); 0: n * ho * wo, this batch's
  int64_t count = 0;
  int device = 0;
  void* stream = nullptr;
};

// Floats of scratch the training passes need in args.partials (0 for an empty problem).
int64_t dwconv_train_partials_numel(const DWConvTrainArgs& args);

// mean / var = per-channel mean and biased variance of z = dwconv(x, weight) over (N, Ho, Wo):
// per-block (count, mean, M2) partials, combined in a fixed order with Chan's formula.
const char* dwconv_bn_stats(const DWConvTrainArgs& args);

// grad_x, grad_weight (tap-major), grad_gamma, grad_beta of dwconv_bn_act_train (through the
// batch statistics; effnet_kernels/reference.py dwconv_bn_act_train_backward).
const char* dwconv_bn_act_train_backward(const DWConvTrainArgs& args);

// The backward's two halves, for statistics that span a process group (the caller all-reduces
// between them): dwconv_bn_grad_sums writes this batch's grad_beta = sum(g), grad_gamma =
// sum(g * xhat) (pass 1); dwconv_bn_input_grads reads grad_beta / grad_gamma as the sums over
// `count` values per channel and writes grad_x and grad_weight (pass 2). The backward is the two
// in sequence with count = n * ho * wo.
const char* dwconv_bn_grad_sums(const DWConvTrainArgs& args);
const char* dwconv_bn_input_grads(const DWConvTrainArgs& args);

// se_excite_backward (se_train.cu): grad_y = grad_out * gate, grad_gate = sum_hw grad_out * y.
struct SEExciteBackwardArgs {
  const void* grad_out = nullptr;  // [N, C, H, W] dense NCHW, or dense NHWC when nhwc, dtype
  const void* y = nullptr;         // like grad_out
  const float* gate = nullptr;     // [N, C] fp32
  void* grad_y = nullptr;          // like grad_out
  float* grad_gate = nullptr;      // [N, C] fp32
  int dtype = kFloat32;
  bool nhwc = false;
  int64_t n = 0, c = 0, h = 0, w = 0;
  int device = 0;
  void* stream = nullptr;
};
const char* se_excite_backward(const SEExciteBackwardArgs& args);

// se_gate_backward (se_train.cu), everything fp32 dense: the five gradients of se_gate.
struct SEGateBackwardArgs {
  const float* grad_gate = nullptr;  // [N, C]
  const float* pooled = nullptr;     // [N, C]
  const float* w_reduce = nullptr;   // [R, C]
  const float* b_reduce = nullptr;   // [R]
  const float* w_expand = nullptr;   // [C, R]
  const float* b_expand = nullptr;   // [C]
  float* dv = nullptr;               // scratch [N, C]: gradient at the gate's input
  float* da = nullptr;               // scratch [N, R]: gradient at the hidden pre-activation
  float* hidden = nullptr;           // scratch [N, R]: act(W_r pooled + b_r)
  float* grad_pooled = nullptr;      // [N, C]
  float* grad_w_reduce = nullptr;    // [R, C]
  float* grad_b_reduce = nullptr;    // [R]
  float* grad_w_expand = nullptr;    // [C, R]
  float* grad_b_expand = nullptr;    // [C]
  int64_t n = 0, c = 0, r = 0;
  int act = kSiLU;          // kSiLU or kReLU
  int gate_act = kSigmoid;  // kSigmoid or kHardSigmoid
  int device = 0;
  void* stream = nullptr;
};
const char* se_gate_backward(const SEGateBackwardArgs& args);

// CUDA runtime version the module was compiled against (CUDART_VERSION).
int cudart_version();

}  // namespace effnet
