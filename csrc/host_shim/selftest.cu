// Tests of the host shim itself, in CUDA syntax (rewritten and compiled like csrc/*.cu):
// a block reduction through shared memory (static or dynamic, with or without the barriers
// it needs), warp shuffles and votes, a warp op with an exited lane, invalid launches, and
// the fp16/bf16 conversions. Exposed as the Python module `_ek_shim` (PyInit__ek_shim) of the
// same shared library as the host build of `_C`, with the scheduler and defect switches.
#include <pybind11/pybind11.h>

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdint>

namespace py = pybind11;

namespace {

constexpr int kMaxThreads = 1024;

// out[blockIdx.x] = sum of x over the block's slice (blockDim.x values), a tree through
// shared memory; `sync` false drops the barriers between the tree's levels (a planted race).
template <bool DYNAMIC>
__global__ void block_sum_kernel(const float* __restrict__ x, float* __restrict__ out, int n, bool sync) {
  __shared__ float static_buf[kMaxThreads];
  extern __shared__ float dynamic_buf[];
  float* buf = DYNAMIC ? dynamic_buf : static_buf;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  buf[threadIdx.x] = i < n ? x[i] : 0.0f;
  if (sync) __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    if (sync) __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = buf[0];
}

// Per lane of one block: out[0..5][tid] = shfl(v, 3), shfl_xor(v, 5), shfl_down(v, 4),
// shfl_up(v, 2), shfl_xor(v, 1) at width 8, ballot(v odd), __syncthreads_count(tid % 3 == 0);
// v = 100 * warp + lane.
__global__ void shuffle_kernel(int* __restrict__ out) {
  const int tid = threadIdx.x, n = blockDim.x;
  const int v = 100 * (tid / 32) + tid % 32;
  out[0 * n + tid] = __shfl_sync(0xffffffffu, v, 3);
  out[1 * n + tid] = __shfl_xor_sync(0xffffffffu, v, 5);
  out[2 * n + tid] = __shfl_down_sync(0xffffffffu, v, 4);
  out[3 * n + tid] = __shfl_up_sync(0xffffffffu, v, 2);
  out[4 * n + tid] = __shfl_xor_sync(0xffffffffu, v, 1, 8);
  out[5 * n + tid] = static_cast<int>(__ballot_sync(0xffffffffu, v & 1));
  out[6 * n + tid] = __syncthreads_count(tid % 3 == 0);
}

// A warp sum after half the lanes returned: undefined on a GPU, an error under the shim.
__global__ void exited_lane_kernel(float* out) {
  if (threadIdx.x % 32 >= 16) return;
  float s = 1.0f;
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  out[threadIdx.x] = s;
}

// Half of warp 0 at a full-warp shuffle while the other half (and warp 1) wait at __syncthreads.
__global__ void deadlock_kernel(float* out) {
  if (threadIdx.x % 32 < 16 || threadIdx.x >= 32) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
  }
}

// out[0] = the 16 bytes at x (a uint4 read through __ldg).
__global__ void vector_load_kernel(const unsigned char* x, uint4* out) {
  out[0] = __ldg(reinterpret_cast<const uint4*>(x));
}

py::object result() {
  const cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) return py::none();
  return py::str(cudaGetErrorString(e));
}

template <class F>
void each(uintptr_t in, uintptr_t out, int64_t n, F f) {
  for (int64_t i = 0; i < n; ++i) f(in, out, i);
}

}  // namespace

PYBIND11_MODULE(_ek_shim, m) {
  m.doc() = "The host shim's own controls and tests (see csrc/host_shim/ek_shim.h)";
  m.def("set_schedule", &ekshim::set_schedule, "Thread order between barriers: 0 forward, 1 reverse, 2 shuffled.",
        py::arg("mode"), py::arg("seed") = 1);
  m.def("set_defect", &ekshim::set_defect, "Plant a defect in the machine (0 none; see ek_shim.h kDefect*).",
        py::arg("defect"));
  m.def("set_grid_cap", &ekshim::set_grid_cap,
        "Serve launches with at most (x, y, z) blocks per grid dimension (0: no cap; see ek_shim.h).",
        py::arg("x") = 0, py::arg("y") = 0, py::arg("z") = 0);
  m.def("counters", [] { return py::make_tuple(ekshim::launches(), ekshim::barriers()); },
        "(launches, barrier releases) so far.");
  m.def(
      "block_sum",
      [](uintptr_t x, uintptr_t out, int n, int threads, bool dynamic, bool sync) {
        const unsigned blocks = static_cast<unsigned>((n + threads - 1) / threads);
        if (dynamic) {
          block_sum_kernel<true><<<blocks, threads, threads * sizeof(float)>>>(
              reinterpret_cast<const float*>(x), reinterpret_cast<float*>(out), n, sync);
        } else {
          block_sum_kernel<false><<<blocks, threads>>>(reinterpret_cast<const float*>(x),
                                                       reinterpret_cast<float*>(out), n, sync);
        }
        return result();
      },
      py::arg("x"), py::arg("out"), py::arg("n"), py::arg("threads"), py::arg("dynamic"), py::arg("sync"));
  m.def(
      "shuffles",
      [](uintptr_t out, int threads) {
        shuffle_kernel<<<1, threads>>>(reinterpret_cast<int*>(out));
        return result();
      },
      py::arg("out"), py::arg("threads"));
  m.def(
      "exited_lane",
      [](uintptr_t out) {
        exited_lane_kernel<<<1, 64>>>(reinterpret_cast<float*>(out));
        return result();
      },
      py::arg("out"));
  m.def(
      "deadlock",
      [](uintptr_t out) {
        deadlock_kernel<<<1, 64>>>(reinterpret_cast<float*>(out));
        return result();
      },
      py::arg("out"));
  m.def(
      "bad_launch",
      [](int kind, uintptr_t out) {
        float* o = reinterpret_cast<float*>(out);
        if (kind == 0) exited_lane_kernel<<<1, 2048>>>(o);                   // too many threads
        if (kind == 1) exited_lane_kernel<<<dim3(1, 70000), 32>>>(o);        // grid.y too large
        if (kind == 2) block_sum_kernel<true><<<1, 32, 64 * 1024>>>(o, o, 0, true);  // > 48 KB dynamic
        if (kind == 3)  // a 16-byte load 4 bytes past an aligned address
          vector_load_kernel<<<1, 1>>>(reinterpret_cast<const unsigned char*>(o) + 4, reinterpret_cast<uint4*>(o) + 4);
        if (kind == 4)  // the same load, aligned: fine
          vector_load_kernel<<<1, 1>>>(reinterpret_cast<const unsigned char*>(o), reinterpret_cast<uint4*>(o) + 4);
        return result();
      },
      py::arg("kind"), py::arg("out"));
  m.def("float_to_half", [](uintptr_t in, uintptr_t out, int64_t n) {
    each(in, out, n, [](uintptr_t a, uintptr_t b, int64_t i) {
      reinterpret_cast<__half*>(b)[i] = __float2half_rn(reinterpret_cast<const float*>(a)[i]);
    });
  });
  m.def("half_to_float", [](uintptr_t in, uintptr_t out, int64_t n) {
    each(in, out, n, [](uintptr_t a, uintptr_t b, int64_t i) {
      reinterpret_cast<float*>(b)[i] = __half2float(reinterpret_cast<const __half*>(a)[i]);
    });
  });
  m.def("float_to_bf16", [](uintptr_t in, uintptr_t out, int64_t n) {
    each(in, out, n, [](uintptr_t a, uintptr_t b, int64_t i) {
      reinterpret_cast<__nv_bfloat16*>(b)[i] = __float2bfloat16_rn(reinterpret_cast<const float*>(a)[i]);
    });
  });
}
