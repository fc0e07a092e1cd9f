// The simulator's runtime: fiber scheduling per block, barriers, warp exchanges, the kernel
// registry and the C entry points the Rust launcher calls (src/backend/cuda/sim.rs).
#include "cuda_sim.h"

#include <ucontext.h>

#include <cstdio>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace sim {
ThreadState* current = nullptr;
BlockState block;
unsigned char* dynamic_smem = nullptr;

namespace {
enum Wait { RUNNING = 0, AT_BLOCK = 1, AT_WARP = 2 };

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  ThreadState st;
  bool done = false;
  int wait = RUNNING;
};

constexpr size_t kStack = 256 * 1024;
ucontext_t g_sched;
std::vector<Fiber>* g_fibers = nullptr;
size_t g_cur = 0;
Trampoline g_kernel = nullptr;
void** g_args = nullptr;
std::vector<uint64_t> g_xchg;
std::vector<unsigned char> g_vote;
bool g_spun = false;  // the fiber that just ran gave way in sim::yield

struct Entry {
  Trampoline t;
  const char* sig;
};
std::map<std::string, Entry>& registry() {
  static std::map<std::string, Entry> r;
  return r;
}

void fiber_main() {
  g_kernel(g_args);
  Fiber& f = (*g_fibers)[g_cur];
  f.done = true;
  swapcontext(&f.ctx, &g_sched);
}

// Consecutive scheduler rounds in which every live thread only spun (sim::yield) before the
// block is declared stuck: an mbarrier that never completes.
constexpr long kMaxSpinRounds = 1L << 16;

void wait_at(int kind) {
  Fiber& f = (*g_fibers)[g_cur];
  f.wait = kind;
  swapcontext(&f.ctx, &g_sched);
}

// Runs one block to completion. Returns an error message, or empty.
std::string run_block() {
  std::vector<Fiber>& fs = *g_fibers;
  const unsigned n = block.nthreads;
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = fs[i];
    f.done = false;
    f.wait = RUNNING;
    f.st.linear = i;
    f.st.tid = dim3(i % block.bdim.x, (i / block.bdim.x) % block.bdim.y,
                    i / (block.bdim.x * block.bdim.y));
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
  }
  long spins = 0;
  for (;;) {
    bool progressed = false, spun = false;
    for (unsigned i = 0; i < n; ++i) {
      Fiber& f = fs[i];
      if (f.done || f.wait != RUNNING) continue;
      g_cur = i;
      current = &f.st;
      g_spun = false;
      swapcontext(&g_sched, &f.ctx);
      if (g_spun && !f.done && f.wait == RUNNING) {
        spun = true;
      } else {
        progressed = true;
      }
    }
    // Every live thread now waits at a barrier (or all are done).
    bool all_done = true, all_block = true, released = false;
    for (unsigned w = 0; w * 32 < n; ++w) {
      bool live = false, whole_warp = true;
      for (unsigned l = w * 32; l < std::min(n, w * 32 + 32); ++l) {
        if (fs[l].done) continue;
        live = true;
        if (fs[l].wait != AT_WARP) whole_warp = false;
      }
      if (live && whole_warp) {
        for (unsigned l = w * 32; l < std::min(n, w * 32 + 32); ++l) fs[l].wait = RUNNING;
        released = true;
      }
    }
    if (released) continue;
    if (spun) {
      spins = progressed ? 0 : spins + 1;
      if (spins > kMaxSpinRounds)
        return "deadlock: threads spin on an mbarrier (or flag) that never completes";
      continue;
    }
    for (unsigned i = 0; i < n; ++i) {
      if (fs[i].done) continue;
      all_done = false;
      if (fs[i].wait != AT_BLOCK) all_block = false;
    }
    if (all_done) return "";
    if (all_block) {
      for (unsigned i = 0; i < n; ++i) fs[i].wait = RUNNING;
      continue;
    }
    return "deadlock: some threads wait in __syncthreads while others of the block wait in a "
           "warp primitive";
  }
}
}  // namespace

void syncthreads() { wait_at(AT_BLOCK); }
void yield() {
  g_spun = true;
  wait_at(RUNNING);
}
void syncwarp() { wait_at(AT_WARP); }

uint64_t warp_exchange(uint64_t mine, unsigned src_lane) {
  unsigned me = current->linear;
  unsigned base = me & ~31u;
  g_xchg[me] = mine;
  syncwarp();
  unsigned src = base + src_lane;
  uint64_t got = src < block.nthreads ? g_xchg[src] : mine;
  syncwarp();
  return got;
}

static unsigned vote_bits(bool p) {
  unsigned me = current->linear;
  unsigned base = me & ~31u;
  g_vote[me] = p;
  syncwarp();
  unsigned bits = 0;
  for (unsigned l = 0; l < 32 && base + l < block.nthreads; ++l) {
    if (!(*g_fibers)[base + l].done && g_vote[base + l]) bits |= 1u << l;
  }
  syncwarp();
  return bits;
}
bool warp_vote_any(bool p) { return vote_bits(p) != 0; }
bool warp_vote_all(bool p) {
  unsigned me = current->linear, base = me & ~31u, live = 0;
  for (unsigned l = 0; l < 32 && base + l < block.nthreads; ++l)
    if (!(*g_fibers)[base + l].done) live |= 1u << l;
  return vote_bits(p) == live;
}
unsigned warp_ballot(bool p) { return vote_bits(p); }

void register_kernel(const char* name, Trampoline t, const char* sig) {
  registry()[name] = Entry{t, sig};
}
}  // namespace sim

float sim_half_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while (!(man & 0x400u));
      u = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | man << 13;
  } else {
    u = sign | (exp + 112) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t sim_float_to_half(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0));
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to infinity
  if (a < 0x38800000u) {                                  // subnormal or zero
    float m = std::fabs(f) * 16777216.0f;                 // 2^24
    return uint16_t(sign | uint32_t(std::nearbyint(m)));
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u;
  return uint16_t(sign | (r >> 13));
}

static std::mutex g_launch_mutex;

extern "C" {
// Launches kernel `name` like cuLaunchKernel (args: pointers to each argument). Returns 0, or
// writes a message into err and returns non-zero.
int sd2_sim_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                   unsigned by, unsigned bz, size_t smem, void** args, char* err,
                   size_t err_len) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  auto fail = [&](const std::string& m) {
    std::snprintf(err, err_len, "%s", m.c_str());
    return 1;
  };
  auto it = sim::registry().find(name);
  if (it == sim::registry().end()) return fail(std::string("no simulated kernel named ") + name);
  const unsigned n = bx * by * bz;
  if (n == 0 || n > 1024) return fail("block of " + std::to_string(n) + " threads (1..1024)");
  if (gx == 0 || gy == 0 || gz == 0) return fail("empty grid");
  std::vector<sim::Fiber> fibers(n);
  for (auto& f : fibers) f.stack.resize(sim::kStack);
  // 1024-aligned, as Hopper's 128-byte swizzle patterns (TMA, wgmma) assume of their tiles.
  std::vector<unsigned char> shared_raw(smem + 1024 + 16);
  unsigned char* shared_base = shared_raw.data() + ((1024 - (reinterpret_cast<uintptr_t>(shared_raw.data()) & 1023)) & 1023);
  sim::g_fibers = &fibers;
  sim::g_kernel = it->second.t;
  sim::g_args = args;
  sim::g_xchg.assign(n, 0);
  sim::g_vote.assign(n, 0);
  sim::dynamic_smem = shared_base;
  sim::block.bdim = dim3(bx, by, bz);
  sim::block.gdim = dim3(gx, gy, gz);
  sim::block.nthreads = n;
  std::string e;
  for (unsigned z = 0; z < gz && e.empty(); ++z)
    for (unsigned y = 0; y < gy && e.empty(); ++y)
      for (unsigned x = 0; x < gx && e.empty(); ++x) {
        sim::block.bid = dim3(x, y, z);
        std::fill(shared_raw.begin(), shared_raw.end(), 0xA5);  // poison: unwritten reads show up
        e = sim::run_block();
      }
  sim::current = nullptr;
  sim::g_fibers = nullptr;
  sim::dynamic_smem = nullptr;
  if (!e.empty()) return fail(std::string(name) + ": " + e);
  return 0;
}

int sd2_sim_kernel_count() { return int(sim::registry().size()); }

// The parameter signature `kernel` was registered with (see sim::sig_char), or null.
const char* sd2_sim_kernel_signature(const char* kernel) {
  auto it = sim::registry().find(kernel);
  return it == sim::registry().end() ? nullptr : it->second.sig;
}

const char* sd2_sim_kernel_name(int i) {
  auto it = sim::registry().begin();
  for (int k = 0; k < i && it != sim::registry().end(); ++k) ++it;
  return it == sim::registry().end() ? nullptr : it->first.c_str();
}
}
