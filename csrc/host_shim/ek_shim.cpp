// The SIMT machine of the host shim (ek_shim.h): fibers, barriers, launches, runtime API.
//
// Each thread of a block is a fiber on its own mmap'ed stack (a guard page below it). A
// fiber runs until it reaches a barrier (__syncthreads, or a warp barrier behind the
// shuffles / votes / __syncwarp) or returns; when every thread is parked the scheduler
// releases what can be released (the warp groups whose every lane arrived, else the block
// barrier once all live threads wait there) and runs the released threads in the chosen
// order. Nothing releasable with threads still parked is a deadlock: the launch fails
// with a message, as a hung kernel would be noticed on a GPU.
#include "ek_shim.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#if defined(__x86_64__) && !defined(EK_SHIM_UCONTEXT)
#define EK_SHIM_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

namespace ekshim {

Machine g;

namespace {

enum State { kRunnable = 0, kAtBlock = 1, kAtWarp = 2, kDone = 3 };
constexpr size_t kStack = 256 * 1024;
constexpr size_t kGuard = 4096;

std::recursive_mutex launch_mutex;
cudaError_t sticky = cudaSuccess;
cudaError_t last_code = cudaSuccess;  // of `message`
std::string message = "no error";
int current_device = 0;
int sched_mode = 2;
uint64_t sched_seed = 0x9e3779b97f4a7c15ull;
uint64_t n_launches = 0, n_barriers = 0;
dim3 grid_cap(0, 0, 0);  // set_grid_cap (0: no cap)

std::vector<Thread> threads;
std::vector<char*> stacks;  // stack bases (lowest usable address)
void (*body_fn)(void*) = nullptr;
void* body_ctx = nullptr;
const char* failure = nullptr;  // why the current block stopped

alignas(64) unsigned char dyn_smem_buf[kMaxSmemOptin + 64];
alignas(64) unsigned char static_smem_buf[kMaxSmemOptin + 64];
size_t dyn_bytes = 0, static_bytes = 0, smem_cap = kDefaultSmem;
std::vector<std::pair<const void*, size_t>> static_sites;

std::unordered_map<const void*, size_t>& smem_limits() {
  static std::unordered_map<const void*, size_t> m;
  return m;
}

#ifdef EK_SHIM_ASM_SWITCH
extern "C" void ek_ctx_switch(void** save, void* to);
extern "C" void ek_ctx_start();
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack,
// stores the stack pointer in *save, and resumes the context whose stack pointer is `to`.
asm(R"(
  .text
  .p2align 4
  .globl ek_ctx_switch
  .hidden ek_ctx_switch
  .type ek_ctx_switch,@function
ek_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw (%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr 8(%rsp)
  fldcw (%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size ek_ctx_switch,.-ek_ctx_switch
  .p2align 4
  .globl ek_ctx_start
  .hidden ek_ctx_start
  .type ek_ctx_start,@function
ek_ctx_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size ek_ctx_start,.-ek_ctx_start
)");
void* scheduler_sp = nullptr;
#else
ucontext_t scheduler_uc;
std::vector<ucontext_t> contexts;
#endif

void fiber_main(void* arg) {
  Thread* t = static_cast<Thread*>(arg);
  body_fn(body_ctx);
  g.warp_slots[t->linear] = 0;  // an exited thread counts as false in __syncthreads_count
  t->state = kDone;
#ifdef EK_SHIM_ASM_SWITCH
  ek_ctx_switch(&t->sp, scheduler_sp);
#else
  swapcontext(&contexts[t->linear], &scheduler_uc);
#endif
  __builtin_trap();  // a finished fiber is never resumed
}

#ifndef EK_SHIM_ASM_SWITCH
void fiber_entry_uc(unsigned hi, unsigned lo) {
  fiber_main(reinterpret_cast<void*>((static_cast<uintptr_t>(hi) << 32) | lo));
}
#endif

bool ensure_stacks(size_t n) {
  while (stacks.size() < n) {
    void* p = mmap(nullptr, kStack + kGuard, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return false;
    mprotect(p, kGuard, PROT_NONE);  // stack overflow faults instead of corrupting a neighbour
    stacks.push_back(static_cast<char*>(p) + kGuard);
  }
  return true;
}

void init_fiber(Thread& t) {
#ifdef EK_SHIM_ASM_SWITCH
  char* top = stacks[t.linear] + kStack;  // 16-byte aligned (page aligned)
  uint64_t* sp = reinterpret_cast<uint64_t*>(top - 88);
  uint16_t cw;
  uint32_t csr;
  asm volatile("fnstcw %0" : "=m"(cw));
  asm volatile("stmxcsr %0" : "=m"(csr));
  std::memset(sp, 0, 88);
  std::memcpy(sp, &cw, 2);
  std::memcpy(reinterpret_cast<char*>(sp) + 8, &csr, 4);
  sp[2] = 0;                                                   // r15
  sp[3] = 0;                                                   // r14
  sp[4] = reinterpret_cast<uint64_t>(&fiber_main);             // r13: entry
  sp[5] = reinterpret_cast<uint64_t>(&t);                      // r12: its argument
  sp[6] = 0;                                                   // rbx
  sp[7] = 0;                                                   // rbp
  sp[8] = reinterpret_cast<uint64_t>(&ek_ctx_start);           // return address
  t.sp = sp;
#else
  ucontext_t& uc = contexts[t.linear];
  getcontext(&uc);
  uc.uc_stack.ss_sp = stacks[t.linear];
  uc.uc_stack.ss_size = kStack;
  uc.uc_link = nullptr;
  const uintptr_t a = reinterpret_cast<uintptr_t>(&t);
  makecontext(&uc, reinterpret_cast<void (*)()>(&fiber_entry_uc), 2, static_cast<unsigned>(a >> 32),
              static_cast<unsigned>(a & 0xffffffffu));
#endif
}

void resume(Thread& t) {
  g.current = &t;
#ifdef EK_SHIM_ASM_SWITCH
  ek_ctx_switch(&scheduler_sp, t.sp);
#else
  swapcontext(&scheduler_uc, &contexts[t.linear]);
#endif
  g.current = nullptr;
}

void park(int state) {
  Thread* t = g.current;
  t->state = state;
#ifdef EK_SHIM_ASM_SWITCH
  ek_ctx_switch(&t->sp, scheduler_sp);
#else
  swapcontext(&contexts[t->linear], &scheduler_uc);
#endif
}

uint64_t rng_state = 1;
uint64_t next_random() {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return rng_state;
}

void make_order(std::vector<int>& order, int n) {
  order.resize(n);
  for (int i = 0; i < n; ++i) order[i] = sched_mode == 1 ? n - 1 - i : i;
  if (sched_mode == 2)
    for (int i = n - 1; i > 0; --i) std::swap(order[i], order[static_cast<int>(next_random() % (i + 1))]);
}

// Release the barriers that can be; false when none could (a deadlock or a bad mask).
bool release(int n) {
  bool released = false;
  const int warps = (n + kWarp - 1) / kWarp;
  for (int w = 0; w < warps; ++w) {
    const int lanes = std::min(kWarp, n - w * kWarp);
    const unsigned existing = lanes == kWarp ? 0xffffffffu : ((1u << lanes) - 1u);
    for (int l = 0; l < lanes; ++l) {
      Thread& t = threads[w * kWarp + l];
      if (t.state != kAtWarp) continue;
      const unsigned m = t.mask & existing;
      if (!(m >> l & 1u)) {
        failure = "a warp-synchronous intrinsic was called by a lane outside its own mask";
        return false;
      }
      bool all = true;
      for (int j = 0; j < lanes && all; ++j) {
        if (!(m >> j & 1u)) continue;
        const Thread& u = threads[w * kWarp + j];
        if (u.state == kDone) {
          failure = "a warp-synchronous intrinsic names a lane in its mask that has exited";
          return false;
        }
        all = u.state == kAtWarp && (u.mask & existing) == m;
      }
      if (!all) continue;
      for (int j = 0; j < lanes; ++j)
        if (m >> j & 1u) threads[w * kWarp + j].state = kRunnable;
      released = true;
      ++n_barriers;
    }
  }
  if (released) return true;
  int done = 0, at_block = 0;
  for (int i = 0; i < n; ++i) {
    done += threads[i].state == kDone;
    at_block += threads[i].state == kAtBlock;
  }
  if (at_block > 0 && at_block == n - done) {
    for (int i = 0; i < n; ++i)
      if (threads[i].state == kAtBlock) threads[i].state = kRunnable;
    ++n_barriers;
    return true;
  }
  failure = at_block > 0 ? "deadlock: some threads wait at __syncthreads while others wait at a warp barrier"
                         : "deadlock: a warp barrier (shuffle/vote/__syncwarp) that not every lane of its mask reaches";
  return false;
}

// Run one block to completion; false (failure set) on a deadlock.
bool run_block(int n) {
  std::memset(dyn_smem_buf, 0xff, dyn_bytes);  // unwritten shared memory reads as NaN
  static_sites.clear();
  static_bytes = 0;
  for (int i = 0; i < n; ++i) {
    threads[i].state = kRunnable;
    init_fiber(threads[i]);
  }
  std::vector<int> order;
  for (;;) {
    make_order(order, n);
    for (int i : order)
      if (threads[i].state == kRunnable) resume(threads[i]);
    if (failure) return false;  // set by a thread (e.g. too much shared memory)
    bool all_done = true;
    for (int i = 0; i < n && all_done; ++i) all_done = threads[i].state == kDone;
    if (all_done) return true;
    if (!release(n)) return false;
  }
}

const char* code_string(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorLaunchOutOfResources: return "too many resources requested for launch";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorMisalignedAddress: return "misaligned address";
  }
  return "unknown error";
}

}  // namespace

cudaError_t& last_error() { return sticky; }
int device() { return current_device; }

const char* error_string(cudaError_t e) { return e == last_code && e != cudaSuccess ? message.c_str() : code_string(e); }

void set_error(cudaError_t e, const char* detail) {
  sticky = e;
  last_code = e;
  message = std::string(code_string(e)) + (detail ? std::string(" (host shim: ") + detail + ")" : std::string());
}

size_t& smem_limit_for(const void* kernel) {
  auto it = smem_limits().find(kernel);
  if (it == smem_limits().end()) it = smem_limits().emplace(kernel, kDefaultSmem).first;
  return it->second;
}

void misaligned(const void* p, size_t align) {
  char why[96];
  std::snprintf(why, sizeof why, "a %zu-byte aligned access at %p", align, p);
  set_error(cudaErrorMisalignedAddress, why);
}

void set_schedule(int mode, uint64_t seed) {
  sched_mode = mode;
  sched_seed = seed ? seed : 1;
}
void set_grid_cap(unsigned x, unsigned y, unsigned z) { grid_cap = dim3(x, y, z); }
uint64_t launches() { return n_launches; }
uint64_t barriers() { return n_barriers; }

void sync_block() {
  if (g.defect != kDefectNoSync) park(kAtBlock);
}
void set_defect(int defect) { g.defect = defect; }

void sync_warp(unsigned mask) {
  g.current->mask = mask;
  park(kAtWarp);
}

unsigned vote(unsigned mask, bool pred) {
  Thread* t = g.current;
  g.warp_slots[t->linear] = pred ? 1u : 0u;
  sync_warp(mask);
  unsigned r = 0;
  const int n = static_cast<int>(g.block_dim.x * g.block_dim.y * g.block_dim.z);
  for (int l = 0; l < kWarp; ++l) {
    const int i = t->warp * kWarp + l;
    if (i < n && (mask >> l & 1u) && g.warp_slots[i]) r |= 1u << l;
  }
  sync_warp(mask);
  return r;
}

void* block_shared(const void* site, size_t bytes, size_t align) {
  for (const auto& s : static_sites)
    if (s.first == site) return static_smem_buf + s.second;
  const size_t off = (static_bytes + align - 1) / align * align;
  if (off + bytes + dyn_bytes > smem_cap) {
    failure = "static + dynamic shared memory exceed the kernel's limit";
    set_error(cudaErrorLaunchOutOfResources, failure);
    return static_smem_buf;  // the block is abandoned at the next barrier or exit
  }
  static_sites.emplace_back(site, off);
  static_bytes = off + bytes;
  std::memset(static_smem_buf + off, 0xff, bytes);
  return static_smem_buf + off;
}

bool run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem, void (*body)(void*), void* ctx) {
  std::lock_guard<std::recursive_mutex> lock(launch_mutex);
  ++n_launches;
  const uint64_t threads_per_block = static_cast<uint64_t>(block.x) * block.y * block.z;
  char why[160];
  if (threads_per_block == 0 || threads_per_block > kMaxThreadsPerBlock || block.x > 1024 || block.y > 1024 ||
      block.z > 64) {
    std::snprintf(why, sizeof why, "block (%u, %u, %u)", block.x, block.y, block.z);
    set_error(cudaErrorInvalidConfiguration, why);
    return false;
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    std::snprintf(why, sizeof why, "grid (%u, %u, %u)", grid.x, grid.y, grid.z);
    set_error(cudaErrorInvalidConfiguration, why);
    return false;
  }
  // Validated as asked, served as capped (set_grid_cap).
  if (grid_cap.x && grid.x > grid_cap.x) grid.x = grid_cap.x;
  if (grid_cap.y && grid.y > grid_cap.y) grid.y = grid_cap.y;
  if (grid_cap.z && grid.z > grid_cap.z) grid.z = grid_cap.z;
  smem_cap = smem_limit_for(kernel);
  if (smem > smem_cap) {
    std::snprintf(why, sizeof why, "%zu bytes of dynamic shared memory, the limit is %zu", smem, smem_cap);
    set_error(cudaErrorInvalidValue, why);
    return false;
  }
  const int n = static_cast<int>(threads_per_block);
  if (!ensure_stacks(n)) {
    set_error(cudaErrorMemoryAllocation, "fiber stacks");
    return false;
  }
  threads.assign(n, Thread{});
#ifndef EK_SHIM_ASM_SWITCH
  contexts.resize(n);
#endif
  for (int z = 0, i = 0; z < static_cast<int>(block.z); ++z)
    for (int y = 0; y < static_cast<int>(block.y); ++y)
      for (int x = 0; x < static_cast<int>(block.x); ++x, ++i) {
        threads[i].tid = uint3{static_cast<unsigned>(x), static_cast<unsigned>(y), static_cast<unsigned>(z)};
        threads[i].linear = i;
        threads[i].lane = i % kWarp;
        threads[i].warp = i / kWarp;
      }
  g.block_dim = block;
  g.grid_dim = grid;
  g.dyn_smem = dyn_smem_buf;
  dyn_bytes = smem;
  body_fn = body;
  body_ctx = ctx;
  failure = nullptr;
  rng_state = sched_seed ^ (n_launches * 0x9e3779b97f4a7c15ull);
  if (!rng_state) rng_state = 1;
  const bool reverse = sched_mode == 1;
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  for (uint64_t b = 0; b < blocks; ++b) {
    const uint64_t k = reverse ? blocks - 1 - b : b;
    g.block_idx = uint3{static_cast<unsigned>(k % grid.x), static_cast<unsigned>((k / grid.x) % grid.y),
                        static_cast<unsigned>(k / (static_cast<uint64_t>(grid.x) * grid.y))};
    if (!run_block(n)) {
      std::snprintf(why, sizeof why, "block (%u, %u, %u): %s", g.block_idx.x, g.block_idx.y, g.block_idx.z, failure);
      set_error(sticky != cudaSuccess ? sticky : cudaErrorLaunchFailure, why);
      return false;
    }
  }
  return true;
}

}  // namespace ekshim

// ------------------------------------------------------------------ runtime API
const char* cudaGetErrorString(cudaError_t e) { return ekshim::error_string(e); }

cudaError_t cudaGetLastError() {
  const cudaError_t e = ekshim::last_error();
  ekshim::last_error() = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return ekshim::last_error(); }

cudaError_t cudaGetDevice(int* d) {
  *d = ekshim::device();
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) {
  if (d != 0) {
    ekshim::set_error(cudaErrorInvalidDevice, "the emulated machine has one device");
    return cudaErrorInvalidDevice;
  }
  return cudaSuccess;
}
cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  switch (a) {
    case cudaDevAttrMaxThreadsPerBlock: *v = ekshim::kMaxThreadsPerBlock; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = static_cast<int>(ekshim::kDefaultSmem); break;
    case cudaDevAttrWarpSize: *v = ekshim::kWarp; break;
    case cudaDevAttrMultiProcessorCount: *v = ekshim::kSMs; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *v = 228 * 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = static_cast<int>(ekshim::kMaxSmemOptin); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}
cudaError_t cudaMemset(void* p, int v, size_t n) { return cudaMemsetAsync(p, v, n, nullptr); }
cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind, cudaStream_t) {
  std::memmove(d, s, n);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind k) { return cudaMemcpyAsync(d, s, n, k, nullptr); }
