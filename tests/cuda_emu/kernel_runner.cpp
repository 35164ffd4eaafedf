// Runs the project's CUDA kernels (csrc/cuda/*.cuh, the very source nvcc compiles) on the CPU
// through the emulation harness, for tests/cuda_emu/test_emu_kernels.py.
//
//   kernel_runner <op> <case_dir>
//
// <case_dir>/meta.txt holds "key value" lines (op parameters, dtype, sizes, strides, element
// offsets that misalign the data); each input is a raw little-endian file in the case dir,
// already laid out with its row strides. Outputs are written back as raw files. The host logic
// mirrors csrc/cuda/*.cu: same grids, same partial buffers, same launch order.
#include "emu.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/loss_kernels.cuh"
#include "cuda/similarity_kernels.cuh"

using namespace sopo::cuda;

namespace {

struct Case {
  std::string dir;
  std::map<std::string, std::string> meta;

  int64_t i(const std::string& k) const { return std::stoll(at(k)); }
  double f(const std::string& k) const { return std::stod(at(k)); }
  const std::string& at(const std::string& k) const {
    auto it = meta.find(k);
    if (it == meta.end()) throw std::runtime_error("meta.txt: missing key " + k);
    return it->second;
  }
  bool has(const std::string& k) const { return meta.count(k) > 0; }

  // The raw bytes of input `name`, placed `offset` elements into a fresh heap buffer so that
  // the data pointer is as (mis)aligned as the test asks. The buffer is exactly as long as the
  // data: AddressSanitizer flags any read past it.
  template <typename T>
  T* load(const std::string& name, std::vector<std::vector<char>>& keep) const {
    std::ifstream in(dir + "/" + name, std::ios::binary);
    if (!in) throw std::runtime_error("missing input " + name);
    std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const int64_t off = has(name + ".offset") ? i(name + ".offset") : 0;
    std::vector<char> buf(off * sizeof(T) + bytes.size());
    std::copy(bytes.begin(), bytes.end(), buf.begin() + off * sizeof(T));
    keep.push_back(std::move(buf));
    return reinterpret_cast<T*>(keep.back().data() + off * sizeof(T));
  }

  template <typename T>
  void save(const std::string& name, const T* data, int64_t n) const {
    std::ofstream out(dir + "/" + name, std::ios::binary);
    out.write(reinterpret_cast<const char*>(data), n * sizeof(T));
  }
};

Case read_case(const std::string& dir) {
  Case c{dir, {}};
  std::ifstream in(dir + "/meta.txt");
  if (!in) throw std::runtime_error("missing " + dir + "/meta.txt");
  std::string k, v;
  while (in >> k >> v) c.meta[k] = v;
  return c;
}

// The CUDA ops' grid sizing (common.cuh) with the SM count of the case: small, so that rows are
// split over several blocks without emulating a whole GPU.
int64_t blocks_per_row(const Case& c, int64_t rows, int64_t n, int64_t vec) {
  return sopo::cuda::blocks_per_row(rows, n, vec, c.i("sms"));
}

template <typename T>
LossSide<T> side(const Case& c, const char* s, bool with_ref, std::vector<std::vector<char>>& keep,
                 std::vector<T>* grad) {
  using A = acc_t<T>;
  const std::string p = s;
  LossSide<T> out{};
  out.pred = c.load<T>("pred_" + p, keep);
  out.sp = c.i("sp_" + p);
  out.target = c.load<T>("target_" + p, keep);
  out.st = c.i("st_" + p);
  if (with_ref) out.ref = c.load<T>("ref_" + p, keep), out.sr = c.i("sr_" + p);
  out.mask_kind = static_cast<int>(c.i("mask_kind_" + p));
  if (out.mask_kind == kBoolMask) out.mask = c.load<uint8_t>("mask_" + p, keep);
  if (out.mask_kind == kAccMask) out.mask = c.load<A>("mask_" + p, keep);
  out.sm = out.mask_kind ? c.i("sm_" + p) : 0;
  if (grad) out.grad = grad->data();
  return out;
}

template <typename T>
void run_loss(const Case& c) {
  using A = acc_t<T>;
  const int64_t B = c.i("B"), N = c.i("N");
  std::vector<std::vector<char>> keep;
  // forward: partials, then finalize
  LossSides<T> sides{{side<T>(c, "w", true, keep, nullptr), side<T>(c, "l", true, keep, nullptr)}};
  const int64_t bx = blocks_per_row(c, 2 * B, N, Pack<T>::kSize);
  std::vector<A> partials(B * 2 * bx * 2, A(-12345));  // poisoned: every slot must be written
  emu::launch(loss_partials_kernel<T>, dim3(B * bx, 2), dim3(kThreads), 0, sides, N, bx, partials.data());
  std::vector<A> loss(B), stats(B * kNumStats);
  std::vector<int> bad(B);
  const A* beta_w = c.load<A>("beta_w", keep);
  const A* scale = c.load<A>("scale", keep);
  const bool* valuable = reinterpret_cast<const bool*>(c.load<uint8_t>("valuable", keep));
  emu::launch(loss_finalize_kernel<T>, dim3(ceil_div(B, kThreads)), dim3(kThreads), 0,
              static_cast<const A*>(partials.data()), bx, B, N, sides.side[0].mask_kind,
              sides.side[1].mask_kind, beta_w, valuable, scale, c.f("beta"), loss.data(), stats.data(),
              bad.data());
  c.save("loss", loss.data(), B);
  c.save("stats", stats.data(), B * kNumStats);
  c.save("bad", bad.data(), B);
  // backward, from the forward's stats
  std::vector<T> grad_w(B * N), grad_l(B * N);
  LossSides<T> gsides{{side<T>(c, "w", false, keep, &grad_w), side<T>(c, "l", false, keep, &grad_l)}};
  const A* grad_loss = c.load<A>("grad_loss", keep);
  emu::launch(loss_grad_kernel<T>, dim3(B * bx, 2), dim3(kThreads), 0, gsides, N, bx, grad_loss,
              static_cast<const A*>(stats.data()));
  c.save("grad_w", grad_w.data(), B * N);
  c.save("grad_l", grad_l.data(), B * N);
}

template <typename T>
void run_reward(const Case& c) {
  const int64_t B = c.i("B"), K = c.i("K"), D = c.i("D");
  std::vector<std::vector<char>> keep;
  const T* text = c.load<T>("text", keep);
  const T* motion = c.load<T>("motion", keep);
  std::vector<T> scores(B * K), worst_score(B);
  std::vector<int64_t> worst_index(B);
  std::vector<uint8_t> valuable(B);
  const int64_t grid = std::min<int64_t>(B, c.has("max_grid") ? c.i("max_grid") : 65535);
  emu::launch(reward_scores_kernel<T>, dim3(grid), dim3(kThreads), 0, text, motion, B, K, D,
              c.i("st"), c.i("smb"), c.i("smk"), c.f("tau"), scores.data(), worst_index.data(),
              worst_score.data(), reinterpret_cast<bool*>(valuable.data()));
  c.save("scores", scores.data(), B * K);
  c.save("worst_index", worst_index.data(), B);
  c.save("worst_score", worst_score.data(), B);
  c.save("valuable", valuable.data(), B);
}

template <typename T>
void run_min_cosine(const Case& c) {
  using A = acc_t<T>;
  const int64_t B = c.i("B"), K = c.i("K"), N = c.i("N");
  std::vector<std::vector<char>> keep;
  const T* anchor = c.load<T>("anchor", keep);
  const T* cand = c.load<T>("candidates", keep);
  const int64_t groups = ceil_div(K, kCosGroup);
  const int64_t bx = blocks_per_row(c, B * groups, N, Pack<T>::kSize);
  std::vector<A> partials(B * bx * (1 + 2 * K), A(-12345));
  emu::launch(min_cosine_partials_kernel<T>, dim3(B * bx, groups), dim3(kThreads), 0, anchor, cand, K,
              N, c.i("sa"), c.i("scb"), c.i("sck"), bx, partials.data());
  std::vector<T> out(B);
  emu::launch(min_cosine_finalize_kernel<T>, dim3(ceil_div(B, kThreads)), dim3(kThreads), 0,
              static_cast<const A*>(partials.data()), bx, B, K, c.i("rescale") != 0, out.data());
  c.save("out", out.data(), B);
}

template <template <typename> class Run>
void dispatch(const Case& c) {
  const std::string& dtype = c.at("dtype");
  if (dtype == "float32") return Run<float>{}(c);
  if (dtype == "float64") return Run<double>{}(c);
  if (dtype == "bfloat16") return Run<c10::BFloat16>{}(c);
  if (dtype == "float16") return Run<c10::Half>{}(c);
  throw std::runtime_error("unknown dtype " + dtype);
}

template <typename T> struct Loss { void operator()(const Case& c) { run_loss<T>(c); } };
template <typename T> struct Reward { void operator()(const Case& c) { run_reward<T>(c); } };
template <typename T> struct MinCos { void operator()(const Case& c) { run_min_cosine<T>(c); } };

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s loss|reward|min_cosine <case_dir>\n", argv[0]);
    return 2;
  }
  try {
    const Case c = read_case(argv[2]);
    const std::string op = argv[1];
    if (op == "loss") dispatch<Loss>(c);
    else if (op == "reward") dispatch<Reward>(c);
    else if (op == "min_cosine") dispatch<MinCos>(c);
    else throw std::runtime_error("unknown op " + op);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kernel_runner: %s\n", e.what());
    return 1;
  }
  return 0;
}
