// CUDA-on-CPU emulation: compiles CUDA device code with g++ and runs it on the CPU.
//
// No machine of this project has a GPU, so kernels are verified by running their very source here,
// under ThreadSanitizer / AddressSanitizer / UBSan. A g++ translation unit includes this header,
// then a .cuh file of device code (no CUDA runtime headers), then launches a kernel with
//     emu::launch(kernel, grid, block, dynamic_smem_bytes, args...);
// Device pointers are plain host pointers (std::vector data, torch CPU tensors).
//
// Execution model. Blocks run one after another; every CUDA thread of a block is one emulated
// thread, so `__shared__` can be `static`: a function-local static array is exactly the shared
// memory of the block that is running. A warp is 32 consecutive threads of the block, threadIdx
// linearized x-fastest; the last warp may be partial. Two modes (EMU_MODE or emu::set_mode):
//   threads  one std::thread per CUDA thread, reused across blocks. The only mode ThreadSanitizer
//            understands. The harness synchronizes only what CUDA does: a warp collective orders
//            the lanes of its warp, __syncthreads the whole block (and a returning thread's writes
//            come before later collectives of its warp and block). So TSan reports a missing
//            barrier as a data race even when the values come out right.
//   fibers   one ucontext coroutine per CUDA thread on the launching OS thread: deterministic and
//            several times faster (64 blocks x 256 threads: 0.1 s against 0.7 s). At every
//            barrier / warp collective the scheduler runs the other ready fibers in the order
//            EMU_SCHEDULE names: forward (default), reverse or random:<seed> (a fresh permutation
//            per round). No single order exposes every missing barrier: run at least two.
//            ASan is told about every stack switch, so fibers work under ASan (which prints a
//            one-time "doesn't fully support makecontext/swapcontext" warning). TSan cannot follow
//            ucontext switches: TSan builds use threads (their default; fibers are an error).
// The default is fibers, threads under TSan. The environment is read once (first launch);
// emu::set_* apply from the next launch on.
//
// Dynamic shared memory (SOPO_DYNAMIC_SMEM) is an exact-size heap buffer, so ASan sees overruns,
// filled with 0xff bytes (NaN as float) before every block, so reads before writes show up.
//
// Errors are reported on stderr as "emu error: ..." naming block, thread, primitive and call site,
// then std::abort(). Detected in both modes:
//   - a warp collective (shuffle, __syncwarp) while a lane it names waits at __syncthreads,
//     or waits at a collective with another mask or kind; a lane entering __syncthreads while
//     lanes of its warp wait for it at a collective; __syncthreads from different call sites
//     within one warp (bar.sync is .aligned: undefined in CUDA);
//   - a shuffle reading a lane that does not exist (partial last warp), has returned, or is not
//     in the mask: CUDA gives an undefined value there;
//   - strict mode (default; EMU_STRICT=0 turns it off): __syncthreads after some threads of the
//     block returned, and a warp collective naming a lane that returned. Off, returned threads
//     count as arrived at __syncthreads and need not join collectives (what the hardware does).
//   - no progress for EMU_TIMEOUT_S seconds (default 10): a watchdog prints what every thread of
//     the block is doing (e.g. one spinning, the others at __syncthreads) instead of hanging.
//
// API. Macros: __global__ (inline), __device__, __host__ (empty), __forceinline__ (inline),
// __launch_bounds__(...) (empty), __shared__ (static), SOPO_DYNAMIC_SMEM(type, name).
// Globals: threadIdx, blockIdx (uint3), blockDim, gridDim (dim3), warpSize. Intrinsics:
// __syncthreads(), __syncwarp(mask), __shfl_sync / __shfl_up_sync / __shfl_down_sync /
// __shfl_xor_sync(mask, value, lane or delta, width = 32) for any trivially copyable type of at
// most 8 bytes (float, double, ints, c10::Half...), __ldg, __float_as_uint, __uint_as_float;
// <cmath> functions unqualified or with :: pick the float overloads. Host side: emu::launch,
// emu::set_mode(emu::Mode::Threads | Fibers), emu::set_schedule("forward" | "reverse" |
// "random:<seed>"), emu::set_strict(bool), emu::set_timeout(seconds); environment: EMU_MODE,
// EMU_SCHEDULE, EMU_STRICT, EMU_TIMEOUT_S. Launches are serialized (a global mutex).
//
// Not covered: code generation by nvcc, inter-block races (blocks are sequential), memory-ordering
// fences, atomics, performance. Floating-point contraction differs from the GPU: compare with
// tolerances. Fibers are cooperative: a spin-wait on memory another thread of the block writes
// without a barrier never ends in fiber mode (the watchdog then reports it).
#pragma once

#ifndef __CUDACC__

#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <bit>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <math.h>  // libstdc++'s <math.h> adds `using std::sqrt;` etc.: ::sqrt(float) is the float overload
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <source_location>
#include <sstream>
#include <stop_token>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <vector>

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

// ---- CUDA keywords. `__restrict__` needs nothing: g++ knows it. ----
#define __global__ inline  // kernels live in headers that several test programs may include
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // blocks run one after another: a static is one block's shared memory

// ---- Built-in types and variables ----
struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

// Per emulated thread: thread_local in thread mode; the fiber scheduler rewrites them at each switch.
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

namespace emu {

enum class Mode { Threads, Fibers };

namespace detail {

template <class... Parts>
std::string cat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

inline std::string hex(unsigned mask) {
  char text[16];
  std::snprintf(text, sizeof text, "0x%08x", mask);
  return text;
}

[[noreturn]] inline void fail(const std::string& message) {
  static std::mutex first_error;  // the first error is printed; any later one waits for the abort
  first_error.lock();
  std::fprintf(stderr, "emu error: %s\n", message.c_str());
  std::fflush(stderr);
  std::abort();
}

// ---- Configuration: environment first, emu::set_* may override between launches ----
#if defined(__SANITIZE_THREAD__)
inline constexpr bool kThreadSanitizer = true;
#else
inline constexpr bool kThreadSanitizer = false;
#endif

enum class Order { Forward, Reverse, Random };

struct Config {
  Mode mode = kThreadSanitizer ? Mode::Threads : Mode::Fibers;
  Order order = Order::Forward;
  std::uint64_t seed = 0;
  bool strict = true;
  double timeout_seconds = 10;
};

inline void parse_schedule(std::string_view spec, Config& config) {
  constexpr std::string_view random = "random:";
  if (spec == "forward") {
    config.order = Order::Forward;
  } else if (spec == "reverse") {
    config.order = Order::Reverse;
  } else if (spec.starts_with(random) && spec.size() > random.size() &&
             spec.find_first_not_of("0123456789", random.size()) == spec.npos) {
    config.order = Order::Random;
    config.seed = std::stoull(std::string(spec.substr(random.size())));
  } else {
    fail(cat("schedule '", spec, "': expected forward, reverse or random:<seed>"));
  }
}

inline Config& config() {
  static Config config = [] {
    Config c;
    if (const char* mode = std::getenv("EMU_MODE")) {
      const std::string_view m = mode;
      if (m != "threads" && m != "fibers") fail(cat("EMU_MODE='", m, "': expected threads or fibers"));
      c.mode = m == "threads" ? Mode::Threads : Mode::Fibers;
    }
    if (const char* schedule = std::getenv("EMU_SCHEDULE")) parse_schedule(schedule, c);
    if (const char* strict = std::getenv("EMU_STRICT")) c.strict = std::string_view(strict) != "0";
    if (const char* timeout = std::getenv("EMU_TIMEOUT_S")) {
      c.timeout_seconds = std::atof(timeout);
      if (!(c.timeout_seconds > 0)) fail(cat("EMU_TIMEOUT_S='", timeout, "': expected seconds > 0"));
    }
    return c;
  }();
  return config;
}

// Ends the messages of the checks that EMU_STRICT=0 turns off.
inline constexpr const char* kStrictOnly = " (strict mode; EMU_STRICT=0 allows it)";

// ---- State of the block that is running ----
enum class Activity : std::uint8_t { Running, AtSyncthreads, AtWarpCollective, Returned };
enum class CollectiveKind : std::uint8_t { Shuffle, Syncwarp };

struct WarpRequest {
  CollectiveKind kind;
  const char* name;        // the intrinsic, for messages
  unsigned mask;
  unsigned value_bytes;    // size of the shuffled type; 0 for __syncwarp
  unsigned source_lane;    // lane a shuffle reads (its own lane where CUDA returns the own value)
  std::uint64_t payload;   // bits of the shuffled value
};

struct LaneState {
  Activity activity = Activity::Running;
  std::source_location where;  // call site of the primitive the lane waits at
  WarpRequest request{};       // valid while AtWarpCollective
  std::uint64_t result = 0;
};

struct WarpState {
  std::mutex mutex;  // guards lanes
  std::condition_variable released;
  LaneState lanes[32];
  unsigned existing = 0;  // one bit per lane that exists: the last warp of a block may be partial
};

struct Launch {
  Launch(const Config& settings_, dim3 grid_, dim3 block_, std::size_t dynamic_smem_bytes)
      : settings(settings_), grid(grid_), block(block_), threads(block_.x * block_.y * block_.z),
        block_count(std::uint64_t{grid_.x} * grid_.y * grid_.z), warps(new WarpState[(threads + 31) / 32]),
        smem_bytes(dynamic_smem_bytes), dynamic_smem(new std::byte[dynamic_smem_bytes]) {
    static_assert(__STDCPP_DEFAULT_NEW_ALIGNMENT__ >= 16, "dynamic shared memory must be 16-byte aligned");
    for (unsigned w = 0; w * 32 < threads; ++w) {
      const unsigned lanes = std::min(32u, threads - w * 32);
      warps[w].existing = lanes == 32 ? ~0u : (1u << lanes) - 1;
    }
  }

  WarpState& warp_of(unsigned tid) { return warps[tid / 32]; }

  // Resets the block state for block `linear` (x fastest) and poisons dynamic shared memory with
  // 0xff bytes (NaN as float) so that reading it before writing shows up in results.
  void begin_block(std::uint64_t linear) {
    std::lock_guard lock(mutex);
    block_linear = linear;
    block_index = {static_cast<unsigned>(linear % grid.x), static_cast<unsigned>(linear / grid.x % grid.y),
                   static_cast<unsigned>(linear / (std::uint64_t{grid.x} * grid.y))};
    live = threads;
    waiting = returned = 0;
    for (unsigned w = 0; w * 32 < threads; ++w) {
      std::lock_guard warp_lock(warps[w].mutex);
      for (LaneState& lane : warps[w].lanes) lane = LaneState{};
    }
    std::memset(dynamic_smem.get(), 0xff, smem_bytes);
  }

  const Config settings;  // a copy: emu::set_* during a launch does not affect it
  const dim3 grid, block;
  const unsigned threads;
  const std::uint64_t block_count;
  const std::unique_ptr<WarpState[]> warps;
  const std::size_t smem_bytes;
  const std::unique_ptr<std::byte[]> dynamic_smem;
  std::atomic<std::uint64_t> progress{0};  // bumped at every arrival, return and fiber switch
  std::atomic<unsigned> fiber_on_cpu{~0u};  // fiber mode: the thread whose fiber executes, if any

  std::mutex mutex;  // guards the fields below (block index, __syncthreads bookkeeping)
  std::condition_variable released;
  std::uint64_t block_linear = 0;
  uint3 block_index{0, 0, 0};
  unsigned live = 0, waiting = 0, returned = 0, first_returned = 0;
  std::uint64_t generation = 0;  // completed __syncthreads of this launch
  std::source_location barrier_site;
};

// The emulated thread running on this OS thread (switched with the fiber in fiber mode).
struct ThreadContext {
  Launch* launch = nullptr;
  unsigned tid = 0;  // linear thread index in the block
};
inline thread_local ThreadContext self;

inline void become_thread(Launch& launch, unsigned tid) {
  self = {&launch, tid};
  threadIdx = {tid % launch.block.x, tid / launch.block.x % launch.block.y, tid / (launch.block.x * launch.block.y)};
}

inline ThreadContext& current(const char* primitive) {
  if (self.launch == nullptr) fail(cat(primitive, " called outside a kernel run by emu::launch"));
  return self;
}

// ---- Messages ----
inline std::string site(const std::source_location& where) {
  const char* slash = std::strrchr(where.file_name(), '/');
  return cat(slash ? slash + 1 : where.file_name(), ":", where.line());
}

inline std::string thread_name(const Launch& launch, unsigned tid) {
  const unsigned x = tid % launch.block.x, y = tid / launch.block.x % launch.block.y,
                 z = tid / (launch.block.x * launch.block.y);
  const uint3 b = launch.block_index;
  return cat("thread ", tid, " (threadIdx (", x, ",", y, ",", z, "), warp ", tid / 32, " lane ", tid % 32,
             ") of block (", b.x, ",", b.y, ",", b.z, ")");
}

inline std::string activity_text(const Launch& launch, unsigned tid, const LaneState& lane) {
  switch (lane.activity) {
    case Activity::Running:
      return launch.settings.mode == Mode::Threads || tid == launch.fiber_on_cpu.load() ? "running" : "ready to run";
    case Activity::AtSyncthreads: return cat("wait at __syncthreads (", site(lane.where), ")");
    case Activity::AtWarpCollective: return cat("wait at ", lane.request.name, " (", site(lane.where), ")");
    case Activity::Returned: return "returned";
  }
  return {};
}

// What every thread of the running block does, one line per run of threads doing the same thing
// (at most kMaxLines). Takes the locks itself: callers must hold none.
inline std::string describe_threads(Launch& launch) {
  constexpr unsigned kMaxLines = 40;
  unsigned lines = 0;
  std::lock_guard block_lock(launch.mutex);
  std::string out = cat("block (", launch.block_index.x, ",", launch.block_index.y, ",", launch.block_index.z, "):");
  std::string run_text;
  unsigned run_first = 0;
  auto end_run = [&](unsigned end) {
    if (run_text.empty() || ++lines > kMaxLines) return;
    out += end - run_first == 1 ? cat("\n  thread ", run_first) : cat("\n  threads ", run_first, "-", end - 1);
    out += cat(": ", run_text);
  };
  for (unsigned tid = 0; tid < launch.threads; ++tid) {
    WarpState& warp = launch.warp_of(tid);
    std::string text;
    {
      std::lock_guard warp_lock(warp.mutex);
      text = activity_text(launch, tid, warp.lanes[tid % 32]);
    }
    if (text != run_text) {
      end_run(tid);
      run_text = text;
      run_first = tid;
    }
  }
  end_run(launch.threads);
  if (lines > kMaxLines) out += cat("\n  ... ", lines - kMaxLines, " more lines");
  return out;
}

// ---- Fibers (declared here, defined below: waits yield to the scheduler) ----
inline void yield_to_scheduler();

// Blocks the calling emulated thread until done(); `lock` guards what done() reads. A fiber gives
// the OS thread back to the scheduler without holding any lock, which resumes it once its lane is
// Running again.
template <class Done>
void wait_until(Mode mode, std::unique_lock<std::mutex>& lock, std::condition_variable& released, Done done) {
  if (mode == Mode::Threads) {
    released.wait(lock, done);
    return;
  }
  while (!done()) {
    lock.unlock();
    yield_to_scheduler();
    lock.lock();
  }
}

// ---- Warp collectives ----
inline bool same_collective(const WarpRequest& a, const WarpRequest& b) {
  return a.kind == b.kind && a.mask == b.mask && a.value_bytes == b.value_bytes;
}

// All lanes the collective names (mask & existing) have arrived or returned.
inline bool group_arrived(const WarpState& warp, unsigned group) {
  for (unsigned lane = 0; lane < 32; ++lane) {
    const Activity a = warp.lanes[lane].activity;
    if ((group >> lane & 1u) && a != Activity::AtWarpCollective && a != Activity::Returned) return false;
  }
  return true;
}

// Completes the collective of `group` (warp lock held): computes every lane's result, then wakes them.
inline void release_warp_collective(Launch& launch, unsigned warp_index, unsigned group) {
  WarpState& warp = launch.warps[warp_index];
  auto waiting = [&](unsigned lane) {
    return (group >> lane & 1u) && warp.lanes[lane].activity == Activity::AtWarpCollective;
  };
  for (unsigned lane = 0; lane < 32; ++lane) {
    LaneState& me = warp.lanes[lane];
    if (!waiting(lane) || me.request.kind != CollectiveKind::Shuffle) continue;
    const unsigned source = me.request.source_lane;
    const char* problem = !(warp.existing >> source & 1u)                      ? "does not exist"
                          : !(group >> source & 1u)                            ? "is not in the mask"
                          : warp.lanes[source].activity == Activity::Returned ? "has returned"
                                                                               : nullptr;
    if (problem != nullptr) {
      fail(cat(thread_name(launch, warp_index * 32 + lane), " calls ", me.request.name, " at ", site(me.where),
               " (mask ", hex(me.request.mask), ") and reads lane ", source, ", which ", problem,
               " (the block has ", launch.threads, " threads): CUDA returns an undefined value"));
    }
    me.result = warp.lanes[source].request.payload;
  }
  for (unsigned lane = 0; lane < 32; ++lane) {
    if (waiting(lane)) warp.lanes[lane].activity = Activity::Running;
  }
  warp.released.notify_all();
}

// One warp-wide primitive: the calling lane arrives, waits for every lane its mask names, and gets
// its result. Checks that the lanes agree first, because a disagreement would block forever.
inline std::uint64_t warp_collective(const WarpRequest& request, const std::source_location& where) {
  ThreadContext& me = current(request.name);
  Launch& launch = *me.launch;
  const unsigned lane = me.tid % 32, warp_index = me.tid / 32;
  WarpState& warp = launch.warps[warp_index];
  launch.progress.fetch_add(1, std::memory_order_relaxed);
  std::unique_lock lock(warp.mutex);
  auto culprit = [&] { return cat(thread_name(launch, me.tid), " calls ", request.name, " at ", site(where)); };
  if (!(request.mask >> lane & 1u)) fail(cat(culprit(), " with mask ", hex(request.mask), " without its own lane"));
  const unsigned group = request.mask & warp.existing;
  for (unsigned other = 0; other < 32; ++other) {
    if (other == lane || !(warp.existing >> other & 1u)) continue;
    const LaneState& o = warp.lanes[other];
    const bool named = group >> other & 1u;
    const bool waits_for_me = o.activity == Activity::AtWarpCollective && (o.request.mask >> lane & 1u);
    if (named && o.activity == Activity::AtSyncthreads) {
      fail(cat(culprit(), " while lane ", other, " of its warp waits at __syncthreads (", site(o.where),
               "): divergent collective, deadlock in CUDA"));
    }
    if ((named || waits_for_me) && o.activity == Activity::AtWarpCollective && !same_collective(o.request, request)) {
      fail(cat(culprit(), " (mask ", hex(request.mask), ") while lane ", other, " waits at ", o.request.name, " (",
               site(o.where), ", mask ", hex(o.request.mask), "): the lanes disagree on the collective"));
    }
    if (named && o.activity == Activity::Returned && launch.settings.strict) {
      fail(cat(culprit(), " with mask ", hex(request.mask), " naming lane ", other,
               ", which has returned", kStrictOnly));
    }
  }
  LaneState& mine = warp.lanes[lane];
  mine.activity = Activity::AtWarpCollective;
  mine.where = where;
  mine.request = request;
  if (group_arrived(warp, group)) {
    release_warp_collective(launch, warp_index, group);
  } else {
    wait_until(launch.settings.mode, lock, warp.released, [&] { return mine.activity == Activity::Running; });
  }
  return mine.result;
}

template <class T>
concept Shufflable = std::is_trivially_copyable_v<T> && sizeof(T) <= 8;

enum class ShuffleMode { Index, Up, Down, Xor };

// The lane a shuffle reads, as PTX shfl.sync defines it: the warp is cut into sections of `width`
// lanes; up/down return the own value when the source leaves the section, xor when it lies in a
// later section (an earlier one may be read), idx wraps the lane modulo width.
inline unsigned shuffle_source(ShuffleMode mode, unsigned lane, unsigned operand, int width, const char* name,
                               const std::source_location& where) {
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    fail(cat(thread_name(*self.launch, self.tid), " calls ", name, " at ", site(where), " with width ", width,
             ": must be a power of 2 in [1, 32]"));
  }
  const unsigned b = operand & 31u;  // PTX uses the low 5 bits of the lane operand
  const unsigned section_mask = (32u - width) & 31u;
  const unsigned first = lane & section_mask;  // first and last lane of the caller's section
  const unsigned last = first | (31u & ~section_mask);
  switch (mode) {
    case ShuffleMode::Index: return first | (b & ~section_mask);
    case ShuffleMode::Up: return lane >= first + b ? lane - b : lane;
    case ShuffleMode::Down: return lane + b <= last ? lane + b : lane;
    case ShuffleMode::Xor: return (lane ^ b) <= last ? lane ^ b : lane;
  }
  return lane;
}

template <Shufflable T>
T shuffle(ShuffleMode mode, const char* name, unsigned mask, T value, unsigned operand, int width,
          const std::source_location& where) {
  const unsigned lane = current(name).tid % 32;
  std::uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  const unsigned source = shuffle_source(mode, lane, operand, width, name, where);
  const std::uint64_t result = warp_collective({CollectiveKind::Shuffle, name, mask, sizeof(T), source, bits}, where);
  std::array<unsigned char, sizeof(T)> bytes;
  std::memcpy(bytes.data(), &result, sizeof(T));
  return std::bit_cast<T>(bytes);
}

// ---- __syncthreads and returning threads ----
// Completes a __syncthreads (block lock held): every waiting lane is Running again.
inline void release_block_barrier(Launch& launch) {
  for (unsigned w = 0; w * 32 < launch.threads; ++w) {
    std::lock_guard warp_lock(launch.warps[w].mutex);
    for (LaneState& lane : launch.warps[w].lanes) {
      if (lane.activity == Activity::AtSyncthreads) lane.activity = Activity::Running;
    }
  }
  launch.waiting = 0;
  ++launch.generation;
  launch.released.notify_all();
}

inline void syncthreads(const std::source_location& where) {
  ThreadContext& me = current("__syncthreads");
  Launch& launch = *me.launch;
  const unsigned lane = me.tid % 32;
  WarpState& warp = launch.warp_of(me.tid);
  launch.progress.fetch_add(1, std::memory_order_relaxed);
  auto culprit = [&] { return cat(thread_name(launch, me.tid), " enters __syncthreads at ", site(where)); };
  {
    std::lock_guard warp_lock(warp.mutex);
    for (unsigned other = 0; other < 32; ++other) {
      const LaneState& o = warp.lanes[other];
      if (other == lane || !(warp.existing >> other & 1u)) continue;
      if (o.activity == Activity::AtWarpCollective && (o.request.mask >> lane & 1u)) {
        fail(cat(culprit(), " while lane ", other, " of its warp waits for it at ", o.request.name, " (",
                 site(o.where), "): divergent collective, deadlock in CUDA"));
      }
      if (o.activity == Activity::AtSyncthreads &&
          (o.where.line() != where.line() || o.where.column() != where.column() ||
           std::strcmp(o.where.file_name(), where.file_name()) != 0)) {
        fail(cat(culprit(), " while lane ", other, " of its warp waits at __syncthreads (", site(o.where),
                 "): divergent __syncthreads within a warp, undefined in CUDA"));
      }
    }
    warp.lanes[lane].activity = Activity::AtSyncthreads;
    warp.lanes[lane].where = where;
  }
  std::unique_lock lock(launch.mutex);
  if (launch.returned > 0 && launch.settings.strict) {
    fail(cat(culprit(), " after ", launch.returned, " threads of its block returned (first: thread ",
             launch.first_returned, "): undefined in CUDA", kStrictOnly));
  }
  if (launch.waiting++ == 0) launch.barrier_site = where;
  if (launch.waiting == launch.live) {
    release_block_barrier(launch);
  } else {
    const std::uint64_t generation = launch.generation;
    wait_until(launch.settings.mode, lock, launch.released, [&] { return launch.generation != generation; });
  }
}

// Book-keeping when the kernel function of an emulated thread returns.
inline void thread_returns(Launch& launch, unsigned tid) {
  const unsigned lane = tid % 32, warp_index = tid / 32;
  WarpState& warp = launch.warps[warp_index];
  launch.progress.fetch_add(1, std::memory_order_relaxed);
  {
    std::lock_guard warp_lock(warp.mutex);
    warp.lanes[lane].activity = Activity::Returned;
    for (unsigned other = 0; other < 32; ++other) {  // collectives still waiting for this lane
      const LaneState& o = warp.lanes[other];
      if (o.activity != Activity::AtWarpCollective || !(o.request.mask >> lane & 1u)) continue;
      if (launch.settings.strict) {
        fail(cat(thread_name(launch, tid), " returns while lane ", other, " of its warp waits for it at ",
                 o.request.name, " (", site(o.where), ")", kStrictOnly));
      }
      const unsigned group = o.request.mask & warp.existing;
      if (group_arrived(warp, group)) release_warp_collective(launch, warp_index, group);
    }
  }
  std::lock_guard lock(launch.mutex);
  if (launch.waiting > 0 && launch.settings.strict) {
    fail(cat(thread_name(launch, tid), " returns while ", launch.waiting, " threads of its block wait at ",
             "__syncthreads (", site(launch.barrier_site), "): undefined in CUDA", kStrictOnly));
  }
  if (launch.returned++ == 0) launch.first_returned = tid;
  --launch.live;
  if (launch.waiting > 0 && launch.waiting == launch.live) release_block_barrier(launch);
}

inline void run_emulated_thread(Launch& launch, unsigned tid, const std::function<void()>& kernel_call) {
  kernel_call();
  thread_returns(launch, tid);
}

// ---- Fiber mode ----
#if defined(__SANITIZE_ADDRESS__)
inline void asan_start_switch(void** fake_stack, const void* bottom, std::size_t size) {
  __sanitizer_start_switch_fiber(fake_stack, bottom, size);
}
inline void asan_finish_switch(void* fake_stack, const void** old_bottom, std::size_t* old_size) {
  __sanitizer_finish_switch_fiber(fake_stack, old_bottom, old_size);
}
#else
inline void asan_start_switch(void**, const void*, std::size_t) {}
inline void asan_finish_switch(void*, const void**, std::size_t*) {}
#endif

inline constexpr unsigned kMaxThreadsPerBlock = 1024;
inline constexpr std::size_t kFiberStackBytes = 256 * 1024;

// kMaxThreadsPerBlock fiber stacks, each above a PROT_NONE guard page that turns a stack overflow
// into SIGSEGV. Mapped once per process (MAP_NORESERVE: only touched pages cost memory) and never
// unmapped; ASan clears a stack's shadow whenever swapcontext enters it, so reuse is clean.
class FiberStacks {
 public:
  FiberStacks() : guard_(static_cast<std::size_t>(sysconf(_SC_PAGESIZE))), slot_(guard_ + kFiberStackBytes) {
    void* base = mmap(nullptr, slot_ * kMaxThreadsPerBlock, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) fail("mmap of the fiber stacks failed");
    base_ = static_cast<char*>(base);
    for (unsigned i = 0; i < kMaxThreadsPerBlock; ++i) mprotect(base_ + i * slot_, guard_, PROT_NONE);
  }
  char* stack(unsigned i) const { return base_ + i * slot_ + guard_; }

 private:
  std::size_t guard_, slot_;
  char* base_ = nullptr;
};

class FiberScheduler;
inline thread_local FiberScheduler* active_scheduler = nullptr;

class FiberScheduler {
 public:
  FiberScheduler(Launch& launch, const std::function<void()>& kernel_call)
      : launch_(launch), kernel_call_(kernel_call), contexts_(new ucontext_t[launch.threads]) {
    static FiberStacks all_stacks;
    stacks_ = &all_stacks;
    const Config& c = launch.settings;
    order_.resize(launch.threads);
    std::iota(order_.begin(), order_.end(), 0u);
    if (c.order == Order::Reverse) std::reverse(order_.begin(), order_.end());
    shuffle_each_round_ = c.order == Order::Random;
    rng_.seed(c.seed);
  }

  // Runs the block begun by launch.begin_block to completion.
  void run_block() {
    for (unsigned tid = 0; tid < launch_.threads; ++tid) prepare_fiber(contexts_[tid], stacks_->stack(tid));
    // Rounds: every Running fiber runs until it waits or returns, in the schedule order.
    while (launch_.live > 0) {
      if (shuffle_each_round_) std::shuffle(order_.begin(), order_.end(), rng_);
      bool ran = false;
      for (const unsigned tid : order_) {
        if (launch_.warp_of(tid).lanes[tid % 32].activity != Activity::Running) continue;
        switch_to(tid);
        ran = true;
      }
      if (!ran) fail(cat("deadlock: no thread can run in ", describe_threads(launch_)));
    }
  }

  // Called by the running fiber: back to the scheduler until its lane is Running again.
  void yield() {
    void* fake_stack = nullptr;
    asan_start_switch(&fake_stack, scheduler_stack_bottom_, scheduler_stack_size_);
    swapcontext(&contexts_[self.tid], &scheduler_context_);
    asan_finish_switch(fake_stack, nullptr, nullptr);
  }

 private:
  // A fresh context that starts fiber_main on `stack`. getcontext only initializes it: execution
  // never comes back to this getcontext, which is why it sits in a function of its own.
  static void prepare_fiber(ucontext_t& context, char* stack) {
    getcontext(&context);
    context.uc_stack = {stack, 0, kFiberStackBytes};
    context.uc_link = nullptr;
    makecontext(&context, &FiberScheduler::fiber_main, 0);
  }

  void switch_to(unsigned tid) {
    become_thread(launch_, tid);
    launch_.progress.fetch_add(1, std::memory_order_relaxed);
    void* fake_stack = nullptr;
    asan_start_switch(&fake_stack, stacks_->stack(tid), kFiberStackBytes);
    launch_.fiber_on_cpu.store(tid);
    swapcontext(&scheduler_context_, &contexts_[tid]);
    launch_.fiber_on_cpu.store(~0u);
    asan_finish_switch(fake_stack, nullptr, nullptr);
  }

  static void fiber_main() {
    FiberScheduler& s = *active_scheduler;
    asan_finish_switch(nullptr, &s.scheduler_stack_bottom_, &s.scheduler_stack_size_);
    run_emulated_thread(s.launch_, self.tid, s.kernel_call_);
    asan_start_switch(nullptr, s.scheduler_stack_bottom_, s.scheduler_stack_size_);  // nullptr: fiber ends
    setcontext(&s.scheduler_context_);
  }

  Launch& launch_;
  const std::function<void()>& kernel_call_;
  const FiberStacks* stacks_;
  std::unique_ptr<ucontext_t[]> contexts_;  // never moved: a ucontext_t points into itself
  ucontext_t scheduler_context_;
  const void* scheduler_stack_bottom_ = nullptr;  // the launching thread's stack, for ASan
  std::size_t scheduler_stack_size_ = 0;
  std::vector<unsigned> order_;
  bool shuffle_each_round_ = false;
  std::mt19937_64 rng_;
};

inline void yield_to_scheduler() { active_scheduler->yield(); }

inline void run_with_fibers(Launch& launch, const std::function<void()>& kernel_call) {
  FiberScheduler scheduler(launch, kernel_call);
  active_scheduler = &scheduler;
  for (std::uint64_t b = 0; b < launch.block_count; ++b) {
    launch.begin_block(b);
    blockIdx = launch.block_index;
    scheduler.run_block();
  }
  active_scheduler = nullptr;
}

// ---- Thread mode: one std::thread per CUDA thread, looping over the blocks ----
inline void run_with_threads(Launch& launch, const std::function<void()>& kernel_call) {
  launch.begin_block(0);
  // Between blocks: all threads of block b have returned before block b + 1 starts.
  std::barrier block_end(launch.threads, [&launch]() noexcept {
    if (launch.block_linear + 1 < launch.block_count) launch.begin_block(launch.block_linear + 1);
  });
  std::vector<std::jthread> workers;
  workers.reserve(launch.threads);
  for (unsigned tid = 0; tid < launch.threads; ++tid) {
    workers.emplace_back([&launch, &kernel_call, &block_end, tid] {
      blockDim = launch.block;
      gridDim = launch.grid;
      become_thread(launch, tid);
      for (std::uint64_t b = 0; b < launch.block_count; ++b) {
        blockIdx = launch.block_index;
        run_emulated_thread(launch, tid, kernel_call);
        block_end.arrive_and_wait();
      }
    });
  }
}

// Aborts with a description of the block when no thread arrives, returns or switches for the timeout.
inline void watch_progress(Launch& launch, std::stop_token stop) {
  std::mutex mutex;
  std::condition_variable_any never_notified;
  std::unique_lock lock(mutex);
  const auto period = std::chrono::duration<double>(launch.settings.timeout_seconds);
  std::uint64_t last = launch.progress.load();
  while (!never_notified.wait_for(lock, stop, period, [&] { return stop.stop_requested(); })) {
    const std::uint64_t now = launch.progress.load();
    if (now == last) {
      fail(cat("no progress for ", launch.settings.timeout_seconds, " s (EMU_TIMEOUT_S): a thread spins or a barrier ",
               "is never reached in ", describe_threads(launch)));
    }
    last = now;
  }
}

inline void launch_erased(dim3 grid, dim3 block, std::size_t dynamic_smem_bytes,
                          const std::function<void()>& kernel_call) {
  static std::mutex one_launch_at_a_time;  // `__shared__` statics belong to the one running block
  std::lock_guard serial(one_launch_at_a_time);
  const std::uint64_t threads = std::uint64_t{block.x} * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || threads == 0 ||
      threads > kMaxThreadsPerBlock || block.z > 64) {
    fail(cat("invalid launch configuration: grid (", grid.x, ",", grid.y, ",", grid.z, "), block (", block.x, ",",
             block.y, ",", block.z, ")"));
  }
  Launch launch(config(), grid, block, dynamic_smem_bytes);
  if (kThreadSanitizer && launch.settings.mode == Mode::Fibers) {
    fail("fiber mode does not work under ThreadSanitizer (TSan cannot follow ucontext stack switches): "
         "use EMU_MODE=threads");
  }
  {
    std::jthread watchdog([&launch](std::stop_token stop) { watch_progress(launch, stop); });
    if (launch.settings.mode == Mode::Threads) {
      run_with_threads(launch, kernel_call);
    } else {
      blockDim = block;
      gridDim = grid;
      run_with_fibers(launch, kernel_call);
    }
  }
  self = {};
}

template <class T>
T* dynamic_shared_memory() {
  return reinterpret_cast<T*>(current("SOPO_DYNAMIC_SMEM").launch->dynamic_smem.get());
}

}  // namespace detail

// ---- Public API ----
inline void set_mode(Mode mode) { detail::config().mode = mode; }
// "forward", "reverse" or "random:<seed>" (fiber mode only).
inline void set_schedule(std::string_view spec) { detail::parse_schedule(spec, detail::config()); }
inline void set_strict(bool strict) { detail::config().strict = strict; }
inline void set_timeout(double seconds) {
  if (!(seconds > 0)) detail::fail(detail::cat("emu::set_timeout(", seconds, "): expected seconds > 0"));
  detail::config().timeout_seconds = seconds;
}

// Runs kernel(args...) for every thread of every block of the grid, one block at a time, with
// `dynamic_smem_bytes` of dynamic shared memory (SOPO_DYNAMIC_SMEM) per block.
template <class Kernel, class... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, std::size_t dynamic_smem_bytes, Args... args) {
  detail::launch_erased(grid, block, dynamic_smem_bytes, [&] { kernel(args...); });
}

}  // namespace emu

// Dynamic shared memory, in the kernel body. Under nvcc the kernel headers define it as
// `extern __shared__ type name[]`; here it is the launch's 16-byte aligned per-block buffer.
#define SOPO_DYNAMIC_SMEM(type, name) type* const name = ::emu::detail::dynamic_shared_memory<type>()

// ---- Intrinsics. The trailing source_location argument names the call site in error messages. ----
inline void __syncthreads(std::source_location where = std::source_location::current()) {
  emu::detail::syncthreads(where);
}

inline void __syncwarp(unsigned mask = 0xffffffffu, std::source_location where = std::source_location::current()) {
  emu::detail::warp_collective({emu::detail::CollectiveKind::Syncwarp, "__syncwarp", mask, 0, 0, 0}, where);
}

template <emu::detail::Shufflable T>
T __shfl_sync(unsigned mask, T value, int src_lane, int width = warpSize,
              std::source_location where = std::source_location::current()) {
  using emu::detail::ShuffleMode;
  return emu::detail::shuffle(ShuffleMode::Index, "__shfl_sync", mask, value, src_lane, width, where);
}

template <emu::detail::Shufflable T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta, int width = warpSize,
                 std::source_location where = std::source_location::current()) {
  using emu::detail::ShuffleMode;
  return emu::detail::shuffle(ShuffleMode::Up, "__shfl_up_sync", mask, value, delta, width, where);
}

template <emu::detail::Shufflable T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = warpSize,
                   std::source_location where = std::source_location::current()) {
  using emu::detail::ShuffleMode;
  return emu::detail::shuffle(ShuffleMode::Down, "__shfl_down_sync", mask, value, delta, width, where);
}

template <emu::detail::Shufflable T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = warpSize,
                  std::source_location where = std::source_location::current()) {
  using emu::detail::ShuffleMode;
  return emu::detail::shuffle(ShuffleMode::Xor, "__shfl_xor_sync", mask, value, lane_mask, width, where);
}

template <class T>
T __ldg(const T* p) { return *p; }

inline unsigned __float_as_uint(float x) { return std::bit_cast<unsigned>(x); }
inline float __uint_as_float(unsigned x) { return std::bit_cast<float>(x); }

#endif  // __CUDACC__
