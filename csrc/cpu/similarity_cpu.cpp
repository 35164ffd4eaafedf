// CPU kernels of the two cosine ops: reward scoring (text vs K motions: scores, worst index,
// worst score and the valuable flag in one pass) and the min cosine between a dataset motion
// and its K generated motions (one pass over the candidates, long rows split into chunks).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "../sopo.h"
#include "rows.h"

namespace sopo::cpu {
namespace {

// {a.a, a.b, b.b} over n elements.
template <typename scalar_t, typename acc_t>
SOPO_CPU_CLONES std::array<acc_t, 3> dot3(const scalar_t* a, const scalar_t* b, int64_t n) {
  return lane_sums<3, acc_t>(n, [&](int64_t i, acc_t* v) {
    const acc_t x = static_cast<acc_t>(a[i]), y = static_cast<acc_t>(b[i]);
    v[0] = x * x;
    v[1] = x * y;
    v[2] = y * y;
  });
}

// Candidates summed together in one sweep: 1 + 2 * 4 sums x 8 lanes fit the 16 AVX2 registers.
constexpr int64_t kGroup = 4;

// The sums of one chunk for NK candidates c + j * sck (j < NK) against the anchor a:
// out[0] = a.a, out[1 + 2 (k0 + j)] = a.c_j, out[2 + 2 (k0 + j)] = c_j.c_j.
template <int NK, typename scalar_t, typename acc_t>
SOPO_CPU_CLONES void cosine_sums(const scalar_t* a, const scalar_t* c, int64_t sck, int64_t n,
                                 acc_t* out, int64_t k0) {
  const auto s = lane_sums<1 + 2 * NK, acc_t, 8>(n, [&](int64_t i, acc_t* v) {
    const acc_t x = static_cast<acc_t>(a[i]);
    v[0] = x * x;
    for (int j = 0; j < NK; ++j) {
      const acc_t y = static_cast<acc_t>(c[j * sck + i]);
      v[1 + 2 * j] = x * y;
      v[2 + 2 * j] = y * y;
    }
  });
  out[0] = s[0];
  for (int j = 0; j < NK; ++j) {
    out[1 + 2 * (k0 + j)] = s[1 + 2 * j];
    out[2 + 2 * (k0 + j)] = s[2 + 2 * j];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> reward_scores_cpu(
    const at::Tensor& text_emb, const at::Tensor& motion_emb, double tau) {
  check_reward_inputs(text_emb, motion_emb);
  const int64_t B = motion_emb.size(0), K = motion_emb.size(1), D = motion_emb.size(2);
  const at::Tensor text = as_rows(text_emb, B, D);
  const at::Tensor motion = as_rows3(motion_emb, B, K, D);
  at::Tensor scores = at::empty({B, K}, text_emb.options());
  at::Tensor worst_index = at::empty({B}, text_emb.options().dtype(at::kLong));
  at::Tensor worst_score = at::empty({B}, text_emb.options());
  at::Tensor valuable = at::empty({B}, text_emb.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, text.scalar_type(), "reward_scores_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* T = text.const_data_ptr<scalar_t>();
    const scalar_t* M = motion.const_data_ptr<scalar_t>();
    scalar_t* S = scores.mutable_data_ptr<scalar_t>();
    int64_t* WI = worst_index.mutable_data_ptr<int64_t>();
    scalar_t* WS = worst_score.mutable_data_ptr<scalar_t>();
    bool* V = valuable.mutable_data_ptr<bool>();
    const int64_t st = text.stride(0), smb = motion.stride(0), smk = motion.stride(1);
    at::parallel_for(0, B, grain_for(K * D), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        acc_t best = 0;
        int64_t best_k = -1;
        for (int64_t k = 0; k < K; ++k) {
          const auto s = dot3<scalar_t, acc_t>(T + b * st, M + b * smb + k * smk, D);
          // the argmin runs on the rounded score, so worst_score == scores[b, worst_index]
          const scalar_t score = static_cast<scalar_t>(rescale_cos(cosine_from_sums(s[0], s[1], s[2])));
          S[b * K + k] = score;
          if (best_k < 0 || argmin_prefer<acc_t>(best, best_k, score, k)) {
            best = score;
            best_k = k;
          }
        }
        WI[b] = best_k;
        WS[b] = static_cast<scalar_t>(best);
        V[b] = static_cast<double>(best) < tau;  // exact comparison with the Python float
      }
    });
  });
  return {scores, worst_index, worst_score, valuable};
}

at::Tensor min_cosine_similarity_cpu(const at::Tensor& anchor, const at::Tensor& candidates,
                                     bool rescale) {
  const int64_t N = check_min_cosine_inputs(anchor, candidates);
  const int64_t B = anchor.size(0), K = candidates.size(1);
  const at::Tensor a_rows = as_rows(anchor, B, N);
  const at::Tensor c_rows = as_rows3(candidates, B, K, N);
  at::Tensor out = at::empty({B}, anchor.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, anchor.scalar_type(), "min_cosine_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* A = a_rows.const_data_ptr<scalar_t>();
    const scalar_t* C = c_rows.const_data_ptr<scalar_t>();
    const int64_t sa = a_rows.stride(0), scb = c_rows.stride(0), sck = c_rows.stride(1);
    const int64_t nch = num_chunks(N);
    const int64_t width = 1 + 2 * K;  // per (row, chunk): a.a, then a.c_k and c_k.c_k for each k
    std::vector<acc_t> part(B * nch * width);
    // One sweep per chunk reads the anchor once and up to kGroup candidates side by side
    // (kGroup + 1 input streams), so each input byte comes from memory once.
    at::parallel_for(0, B * nch, grain_for(K * std::min(N, kChunk)), [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / nch, c0 = (item % nch) * kChunk;
        const int64_t n = std::min(kChunk, N - c0);
        acc_t* p = part.data() + item * width;
        const scalar_t* a = A + b * sa + c0;
        for (int64_t k0 = 0; k0 < K; k0 += kGroup) {
          const scalar_t* c = C + b * scb + k0 * sck + c0;
          const int64_t nk = std::min<int64_t>(kGroup, K - k0);
          // p[0] = a.a (same value from every group); p[1 + 2k] = a.c_k; p[2 + 2k] = c_k.c_k
          switch (nk) {
            case 4: cosine_sums<4, scalar_t, acc_t>(a, c, sck, n, p, k0); break;
            case 3: cosine_sums<3, scalar_t, acc_t>(a, c, sck, n, p, k0); break;
            case 2: cosine_sums<2, scalar_t, acc_t>(a, c, sck, n, p, k0); break;
            default: cosine_sums<1, scalar_t, acc_t>(a, c, sck, n, p, k0); break;
          }
        }
      }
    });
    scalar_t* O = out.mutable_data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) {
      std::vector<acc_t> tot(width, acc_t(0));
      for (int64_t c = 0; c < nch; ++c)
        for (int64_t j = 0; j < width; ++j) tot[j] += part[(b * nch + c) * width + j];
      acc_t m = cosine_from_sums(tot[0], tot[1], tot[2]);
      for (int64_t k = 1; k < K; ++k) m = nan_min(m, cosine_from_sums(tot[0], tot[1 + 2 * k], tot[2 + 2 * k]));
      O[b] = static_cast<scalar_t>(rescale ? rescale_cos(m) : m);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(sopo_ext, CPU, m) {
  m.impl("reward_scores", &reward_scores_cpu);
  m.impl("min_cosine_similarity", &min_cosine_similarity_cpu);
}

}  // namespace sopo::cpu
