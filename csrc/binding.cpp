// pybind11 module effnet_kernels._C: the raw-pointer boundary of the CUDA backend.
//
// Functions take device pointers and the CUDA stream as Python ints (tensor.data_ptr(),
// torch.cuda.current_stream().cuda_stream), sizes as ints, and return None on success or
// an error message string, which effnet_kernels/cuda.py raises as an exception naming
// the op. No libtorch headers and no libtorch linkage: one build serves every torch.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "effnet_ext.h"

// Written by effnet_kernels/_build.py into the build directory: EFFNET_NVCC_VERSION,
// EFFNET_ARCHS, EFFNET_SOURCE_HASH.
#if __has_include("effnet_build_info.h")
#include "effnet_build_info.h"
#endif

#ifndef EFFNET_NVCC_VERSION
#define EFFNET_NVCC_VERSION "unknown"
#endif
#ifndef EFFNET_ARCHS
#define EFFNET_ARCHS "unknown"
#endif
#ifndef EFFNET_SOURCE_HASH
#define EFFNET_SOURCE_HASH "unknown"
#endif

namespace py = pybind11;

namespace {

template <typename P>
P* ptr(uintptr_t p) {
  return reinterpret_cast<P*>(p);
}

py::object result(const char* err) {
  if (err == nullptr) return py::none();
  return py::str(err);
}

effnet::DWConvArgs dwconv_args(uintptr_t x, uintptr_t y, uintptr_t weight, uintptr_t shift,
                               uintptr_t mean, uintptr_t partials, int64_t partials_numel, int dtype, bool nhwc,
                               int64_t n, int64_t c, int64_t h, int64_t w, int64_t ho, int64_t wo, int k,
                               int stride_h, int stride_w, int pad_top, int pad_left, int act, bool squeeze,
                               bool deterministic, int device, uintptr_t stream) {
  effnet::DWConvArgs a;
  a.x = ptr<const void>(x);
  a.y = ptr<void>(y);
  a.weight = ptr<const float>(weight);
  a.shift = ptr<const float>(shift);
  a.mean = ptr<float>(mean);
  a.partials = ptr<float>(partials);
  a.partials_numel = partials_numel;
  a.dtype = dtype;
  a.nhwc = nhwc;
  a.n = n;
  a.c = c;
  a.h = h;
  a.w = w;
  a.ho = ho;
  a.wo = wo;
  a.k = k;
  a.stride_h = stride_h;
  a.stride_w = stride_w;
  a.pad_top = pad_top;
  a.pad_left = pad_left;
  a.act = act;
  a.squeeze = squeeze;
  a.deterministic = deterministic;
  a.device = device;
  a.stream = ptr<void>(stream);
  return a;
}

// The training entry points take their arguments as one dict (names as the fields of the
// effnet_ext.h structs; pointers as ints, strides as 4-tuples): a missing name is a KeyError.
template <typename V>
V field(const py::dict& d, const char* name) {
  return d[name].cast<V>();
}
template <typename P>
P* field_ptr(const py::dict& d, const char* name) {
  return d.contains(name) ? ptr<P>(d[name].cast<uintptr_t>()) : nullptr;
}
effnet::Strides4 field_strides(const py::dict& d, const char* name) {
  effnet::Strides4 s;
  if (!d.contains(name)) return s;
  const py::tuple t = d[name].cast<py::tuple>();
  s.n = t[0].cast<int64_t>(), s.c = t[1].cast<int64_t>(), s.h = t[2].cast<int64_t>(), s.w = t[3].cast<int64_t>();
  return s;
}

effnet::DWConvTrainArgs train_args(const py::dict& d) {
  effnet::DWConvTrainArgs a;
  a.x = field_ptr<const void>(d, "x");
  a.xs = field_strides(d, "xs");
  a.weight = field_ptr<const float>(d, "weight");
  a.dtype = field<int>(d, "dtype");
  a.nhwc = field<bool>(d, "nhwc");
  a.n = field<int64_t>(d, "n");
  a.c = field<int64_t>(d, "c");
  a.h = field<int64_t>(d, "h");
  a.w = field<int64_t>(d, "w");
  a.ho = field<int64_t>(d, "ho");
  a.wo = field<int64_t>(d, "wo");
  a.k = field<int>(d, "k");
  a.stride_h = field<int>(d, "stride_h");
  a.stride_w = field<int>(d, "stride_w");
  a.pad_top = field<int>(d, "pad_top");
  a.pad_left = field<int>(d, "pad_left");
  a.act = d.contains("act") ? field<int>(d, "act") : effnet::kIdentity;
  a.partials = field_ptr<float>(d, "partials");
  a.partials_numel = d.contains("partials_numel") ? field<int64_t>(d, "partials_numel") : 0;
  a.mean = field_ptr<float>(d, "mean");
  a.var = field_ptr<float>(d, "var");
  a.grad_y = field_ptr<const void>(d, "grad_y");
  a.gys = field_strides(d, "gys");
  a.grad_pooled = field_ptr<const float>(d, "grad_pooled");
  a.gamma = field_ptr<const float>(d, "gamma");
  a.beta = field_ptr<const float>(d, "beta");
  a.in_mean = field_ptr<const float>(d, "in_mean");
  a.in_var = field_ptr<const float>(d, "in_var");
  a.eps = d.contains("eps") ? field<float>(d, "eps") : 1e-5f;
  a.gz = field_ptr<float>(d, "gz");
  a.gzs = field_strides(d, "gzs");
  a.grad_x = field_ptr<void>(d, "grad_x");
  a.gxs = field_strides(d, "gxs");
  a.grad_weight = field_ptr<float>(d, "grad_weight");
  a.grad_gamma = field_ptr<float>(d, "grad_gamma");
  a.grad_beta = field_ptr<float>(d, "grad_beta");
  a.count = d.contains("count") ? field<int64_t>(d, "count") : 0;
  a.device = d.contains("device") ? field<int>(d, "device") : 0;
  a.stream = field_ptr<void>(d, "stream");
  return a;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "effnet_kernels CUDA kernels (raw-pointer interface; see effnet_kernels/cuda.py)";

  m.def(
      "dwconv_partials_numel",
      [](int dtype, bool nhwc, int64_t n, int64_t c, int64_t ho, int64_t wo, int k, int stride_w, bool squeeze,
         bool deterministic) {
        effnet::DWConvArgs a;
        a.dtype = dtype;
        a.nhwc = nhwc;
        a.n = n;
        a.c = c;
        a.h = a.w = 1;
        a.ho = ho;
        a.wo = wo;
        a.k = k;
        a.stride_w = stride_w;
        a.squeeze = squeeze;
        a.deterministic = deterministic;
        return effnet::dwconv_partials_numel(a);
      },
      "Floats of scratch the deterministic squeeze needs (0 when none).", py::arg("dtype"), py::arg("nhwc"),
      py::arg("n"), py::arg("c"), py::arg("ho"), py::arg("wo"), py::arg("k"), py::arg("stride_w"),
      py::arg("squeeze"), py::arg("deterministic"));

  m.def(
      "dwconv_bn_act",
      [](uintptr_t x, uintptr_t y, uintptr_t weight, uintptr_t shift, uintptr_t mean,
         uintptr_t partials, int64_t partials_numel, int dtype, bool nhwc, int64_t n, int64_t c, int64_t h,
         int64_t w, int64_t ho, int64_t wo, int k, int stride_h, int stride_w, int pad_top, int pad_left,
         int act, bool squeeze, bool deterministic, int device, uintptr_t stream) {
        return result(effnet::dwconv_bn_act(dwconv_args(x, y, weight, shift, mean, partials, partials_numel,
                                                        dtype, nhwc, n, c, h, w, ho, wo, k, stride_h, stride_w,
                                                        pad_top, pad_left, act, squeeze, deterministic, device,
                                                        stream)));
      },
      "Depthwise conv (tap-major [k*k, C] weight, BN scale folded in) + BN shift + activation (an effnet::Act "
      "code) (+ squeeze); returns None or an error message.", py::arg("x"), py::arg("y"),
      py::arg("weight"), py::arg("shift"), py::arg("mean"), py::arg("partials"),
      py::arg("partials_numel"), py::arg("dtype"), py::arg("nhwc"), py::arg("n"), py::arg("c"), py::arg("h"),
      py::arg("w"), py::arg("ho"), py::arg("wo"), py::arg("k"), py::arg("stride_h"), py::arg("stride_w"),
      py::arg("pad_top"), py::arg("pad_left"), py::arg("act"), py::arg("squeeze"), py::arg("deterministic"),
      py::arg("device"), py::arg("stream"));

  m.def(
      "se_gate",
      [](uintptr_t pooled, uintptr_t w_reduce, uintptr_t b_reduce, uintptr_t w_expand, uintptr_t b_expand,
         uintptr_t hidden, uintptr_t gate, int pooled_dtype, int weight_dtype, int64_t n, int64_t c, int64_t r,
         int act, int gate_act, int device, uintptr_t stream) {
        effnet::SEGateArgs a;
        a.pooled = ptr<const void>(pooled);
        a.w_reduce = ptr<const void>(w_reduce);
        a.b_reduce = ptr<const void>(b_reduce);
        a.w_expand = ptr<const void>(w_expand);
        a.b_expand = ptr<const void>(b_expand);
        a.hidden = ptr<float>(hidden);
        a.gate = ptr<float>(gate);
        a.pooled_dtype = pooled_dtype;
        a.weight_dtype = weight_dtype;
        a.n = n;
        a.c = c;
        a.r = r;
        a.act = act;
        a.gate_act = gate_act;
        a.device = device;
        a.stream = ptr<void>(stream);
        return result(effnet::se_gate(a));
      },
      "SE gate [N, C] fp32 (act, gate_act: effnet::Act codes); returns None or an error message.", py::arg("pooled"), py::arg("w_reduce"),
      py::arg("b_reduce"), py::arg("w_expand"), py::arg("b_expand"), py::arg("hidden"), py::arg("gate"),
      py::arg("pooled_dtype"), py::arg("weight_dtype"), py::arg("n"), py::arg("c"), py::arg("r"),
      py::arg("act"), py::arg("gate_act"), py::arg("device"), py::arg("stream"));

  m.def(
      "se_excite",
      [](uintptr_t y, uintptr_t gate, uintptr_t out, int dtype, bool nhwc, int64_t n, int64_t c, int64_t h,
         int64_t w, int device, uintptr_t stream) {
        effnet::SEExciteArgs a;
        a.y = ptr<const void>(y);
        a.gate = ptr<const float>(gate);
        a.out = ptr<void>(out);
        a.dtype = dtype;
        a.nhwc = nhwc;
        a.n = n;
        a.c = c;
        a.h = h;
        a.w = w;
        a.device = device;
        a.stream = ptr<void>(stream);
        return result(effnet::se_excite(a));
      },
      "y * gate; returns None or an error message.", py::arg("y"), py::arg("gate"), py::arg("out"),
      py::arg("dtype"), py::arg("nhwc"), py::arg("n"), py::arg("c"), py::arg("h"), py::arg("w"),
      py::arg("device"), py::arg("stream"));

  m.def(
      "dwconv_train_partials_numel", [](const py::dict& d) { return effnet::dwconv_train_partials_numel(train_args(d)); },
      "Floats of scratch the training passes need (a dict of DWConvTrainArgs fields).", py::arg("args"));
  m.def(
      "dwconv_bn_stats", [](const py::dict& d) { return result(effnet::dwconv_bn_stats(train_args(d))); },
      "Per-channel batch mean / biased variance of the depthwise conv output; None or an error message.",
      py::arg("args"));
  m.def(
      "dwconv_bn_act_train_backward",
      [](const py::dict& d) { return result(effnet::dwconv_bn_act_train_backward(train_args(d))); },
      "grad_x, grad_weight (tap-major), grad_gamma, grad_beta of dwconv_bn_act_train; None or an error message.",
      py::arg("args"));
  m.def(
      "dwconv_bn_grad_sums", [](const py::dict& d) { return result(effnet::dwconv_bn_grad_sums(train_args(d))); },
      "The backward's first half: grad_gamma = sum(g * xhat), grad_beta = sum(g) over this batch; None or an "
      "error message.",
      py::arg("args"));
  m.def(
      "dwconv_bn_input_grads", [](const py::dict& d) { return result(effnet::dwconv_bn_input_grads(train_args(d))); },
      "The backward's second half: grad_x, grad_weight (tap-major) given grad_gamma / grad_beta summed over `count` "
      "values per channel; None or an error message.",
      py::arg("args"));
  m.def(
      "se_excite_backward",
      [](const py::dict& d) {
        effnet::SEExciteBackwardArgs a;
        a.grad_out = field_ptr<const void>(d, "grad_out");
        a.y = field_ptr<const void>(d, "y");
        a.gate = field_ptr<const float>(d, "gate");
        a.grad_y = field_ptr<void>(d, "grad_y");
        a.grad_gate = field_ptr<float>(d, "grad_gate");
        a.dtype = field<int>(d, "dtype");
        a.nhwc = field<bool>(d, "nhwc");
        a.n = field<int64_t>(d, "n");
        a.c = field<int64_t>(d, "c");
        a.h = field<int64_t>(d, "h");
        a.w = field<int64_t>(d, "w");
        a.device = d.contains("device") ? field<int>(d, "device") : 0;
        a.stream = field_ptr<void>(d, "stream");
        return result(effnet::se_excite_backward(a));
      },
      "grad_y = grad_out * gate, grad_gate = sum_hw grad_out * y; None or an error message.", py::arg("args"));
  m.def(
      "se_gate_backward",
      [](const py::dict& d) {
        effnet::SEGateBackwardArgs a;
        a.grad_gate = field_ptr<const float>(d, "grad_gate");
        a.pooled = field_ptr<const float>(d, "pooled");
        a.w_reduce = field_ptr<const float>(d, "w_reduce");
        a.b_reduce = field_ptr<const float>(d, "b_reduce");
        a.w_expand = field_ptr<const float>(d, "w_expand");
        a.b_expand = field_ptr<const float>(d, "b_expand");
        a.dv = field_ptr<float>(d, "dv");
        a.da = field_ptr<float>(d, "da");
        a.hidden = field_ptr<float>(d, "hidden");
        a.grad_pooled = field_ptr<float>(d, "grad_pooled");
        a.grad_w_reduce = field_ptr<float>(d, "grad_w_reduce");
        a.grad_b_reduce = field_ptr<float>(d, "grad_b_reduce");
        a.grad_w_expand = field_ptr<float>(d, "grad_w_expand");
        a.grad_b_expand = field_ptr<float>(d, "grad_b_expand");
        a.n = field<int64_t>(d, "n");
        a.c = field<int64_t>(d, "c");
        a.r = field<int64_t>(d, "r");
        a.act = field<int>(d, "act");
        a.gate_act = field<int>(d, "gate_act");
        a.device = d.contains("device") ? field<int>(d, "device") : 0;
        a.stream = field_ptr<void>(d, "stream");
        return result(effnet::se_gate_backward(a));
      },
      "The five gradients of se_gate (fp32 dense); None or an error message.", py::arg("args"));

  m.def(
      "build_info",
      []() {
        py::dict d;
        d["nvcc_version"] = EFFNET_NVCC_VERSION;
        d["archs"] = EFFNET_ARCHS;
        d["source_hash"] = EFFNET_SOURCE_HASH;
        d["abi_version"] = effnet::kAbiVersion;
        d["cudart_version"] = effnet::cudart_version();
        return d;
      },
      "How this module was built: nvcc version, archs, source hash, ABI version, CUDA runtime version.");
}
