// Input checks shared by the CPU and CUDA implementations of the ops.
//
// sopo_ext.functional validates first and gives the friendliest messages; these checks are the
// second line for direct torch.ops.sopo_ext.* calls. TORCH_CHECK_VALUE / TORCH_CHECK_TYPE
// surface in Python as ValueError / TypeError.
#pragma once

#include <ATen/OpMathType.h>
#include <torch/types.h>

namespace sopo {

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name,
                   " must be a floating-point tensor (float16, bfloat16, float32 or float64), got ",
                   t.scalar_type());
}

inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ",
                    ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " must have the dtype of ",
                   ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on the device of ", ref_name, " (",
                    ref.device(), "), got ", t.device());
}

inline void check_per_sample(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == ref.size(0), name, " must have shape [B] = [",
                    ref.size(0), "], got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on the device of pred_w (",
                    ref.device(), "), got ", t.device());
}

inline void check_mask(const std::optional<at::Tensor>& mask, const char* name,
                       const at::Tensor& pred) {
  if (!mask.has_value()) return;
  const at::Tensor& m = *mask;
  TORCH_CHECK_TYPE(m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()), name,
                   " must be a bool or floating-point tensor, got ", m.scalar_type());
  TORCH_CHECK_VALUE(m.sizes() == pred.sizes(), name, " must have the prediction's shape ",
                    pred.sizes(), ", got ", m.sizes());
  TORCH_CHECK_VALUE(m.device() == pred.device(), name, " must be on the device of the predictions (",
                    pred.device(), "), got ", m.device());
}

inline void check_batch(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() >= 1 && t.size(0) > 0, name,
                    " must have a non-empty batch dimension, got shape ", t.sizes());
}

inline void check_reward_inputs(const at::Tensor& text, const at::Tensor& motion) {
  check_floating(text, "text_emb");
  TORCH_CHECK_VALUE(text.dim() == 2, "text_emb must be [B, D], got ", text.sizes());
  TORCH_CHECK_VALUE(motion.dim() == 3, "motion_emb must be [B, K, D], got ", motion.sizes());
  TORCH_CHECK_TYPE(motion.scalar_type() == text.scalar_type(),
                   "motion_emb must have the dtype of text_emb (", text.scalar_type(), "), got ",
                   motion.scalar_type());
  TORCH_CHECK_VALUE(motion.device() == text.device(), "motion_emb must be on the device of text_emb");
  TORCH_CHECK_VALUE(text.size(0) > 0, "text_emb: B must be > 0");
  TORCH_CHECK_VALUE(motion.size(0) == text.size(0) && motion.size(2) == text.size(1),
                    "motion_emb must be [B, K, D] = [", text.size(0), ", K, ", text.size(1),
                    "], got ", motion.sizes());
  TORCH_CHECK_VALUE(motion.size(1) > 0, "motion_emb: K must be > 0");
  TORCH_CHECK_VALUE(text.size(1) > 0, "text_emb: D must be > 0");
}

// anchor [B, ...], candidates [B, K, ...] with equal trailing element counts N.
inline int64_t check_min_cosine_inputs(const at::Tensor& anchor, const at::Tensor& cand) {
  check_floating(anchor, "anchor");
  check_batch(anchor, "anchor");
  TORCH_CHECK_VALUE(cand.dim() >= 2, "candidates must be [B, K, ...], got ", cand.sizes());
  TORCH_CHECK_TYPE(cand.scalar_type() == anchor.scalar_type(),
                   "candidates must have the dtype of anchor (", anchor.scalar_type(), "), got ",
                   cand.scalar_type());
  TORCH_CHECK_VALUE(cand.device() == anchor.device(), "candidates must be on the device of anchor");
  TORCH_CHECK_VALUE(cand.size(0) == anchor.size(0), "candidates must have B = ", anchor.size(0),
                    " rows, got ", cand.size(0));
  TORCH_CHECK_VALUE(cand.size(1) > 0, "candidates: K must be > 0");
  const int64_t B = anchor.size(0);
  const int64_t N = anchor.numel() / B;
  TORCH_CHECK_VALUE(cand.numel() == N * B * cand.size(1),
                    "candidates' trailing dims must hold as many elements as anchor's (", N,
                    "), got candidates ", cand.sizes(), " for anchor ", anchor.sizes());
  TORCH_CHECK_VALUE(N > 0, "anchor must have at least one element per row");
  return N;
}

inline void check_loss_inputs(const at::Tensor& pred_w, const at::Tensor& ref_pred_w,
                              const at::Tensor& target_w, const at::Tensor& pred_l,
                              const at::Tensor& ref_pred_l, const at::Tensor& target_l,
                              const at::Tensor& beta_w, const at::Tensor& valuable,
                              const at::Tensor& scale, const std::optional<at::Tensor>& mask_w,
                              const std::optional<at::Tensor>& mask_l) {
  check_floating(pred_w, "pred_w");
  check_batch(pred_w, "pred_w");
  TORCH_CHECK_VALUE(pred_w.numel() > 0, "pred_w must have at least one element per sample");
  check_like(ref_pred_w, "ref_pred_w", pred_w, "pred_w");
  check_like(target_w, "target_w", pred_w, "pred_w");
  check_like(pred_l, "pred_l", pred_w, "pred_w");
  check_like(ref_pred_l, "ref_pred_l", pred_w, "pred_w");
  check_like(target_l, "target_l", pred_w, "pred_w");
  check_floating(beta_w, "beta_w");
  check_per_sample(beta_w, "beta_w", pred_w);
  check_floating(scale, "scale");
  check_per_sample(scale, "scale", pred_w);
  TORCH_CHECK_TYPE(valuable.scalar_type() == at::kBool, "valuable must be a bool tensor, got ",
                   valuable.scalar_type());
  check_per_sample(valuable, "valuable", pred_w);
  check_mask(mask_w, "mask_w", pred_w);
  check_mask(mask_l, "mask_l", pred_w);
}

// The backward's inputs; stats must be the [B, num_stats] accumulation-dtype tensor of the forward.
inline void check_loss_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& pred_w,
                                       const at::Tensor& target_w, const at::Tensor& pred_l,
                                       const at::Tensor& target_l,
                                       const std::optional<at::Tensor>& mask_w,
                                       const std::optional<at::Tensor>& mask_l,
                                       const at::Tensor& stats, int64_t num_stats) {
  check_floating(pred_w, "pred_w");
  check_batch(pred_w, "pred_w");
  check_like(target_w, "target_w", pred_w, "pred_w");
  check_like(pred_l, "pred_l", pred_w, "pred_w");
  check_like(target_l, "target_l", pred_w, "pred_w");
  check_mask(mask_w, "mask_w", pred_w);
  check_mask(mask_l, "mask_l", pred_w);
  check_per_sample(grad_loss, "grad_loss", pred_w);
  const auto acc = at::toOpMathType(pred_w.scalar_type());
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == pred_w.size(0) && stats.size(1) == num_stats &&
                        stats.scalar_type() == acc && stats.device() == pred_w.device(),
                    "stats must be the [B, ", num_stats, "] ", acc,
                    " tensor returned by sopo_loss_forward, got ", stats.sizes(), " ",
                    stats.scalar_type(), " on ", stats.device());
}

}  // namespace sopo
