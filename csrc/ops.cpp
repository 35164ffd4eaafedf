// The sopo_ext operator library: schemas of the custom ops and the Python module that loads
// them. Kernels register per device: csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA).
// Fake (meta) kernels and autograd live in sopo_ext/_ops.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(sopo_ext, m) {
  // text_emb [B, D], motion_emb [B, K, D] -> scores [B, K], worst_index [B] int64,
  // worst_score [B], valuable [B] bool (= worst_score < tau).
  m.def("reward_scores(Tensor text_emb, Tensor motion_emb, float tau) -> (Tensor, Tensor, Tensor, Tensor)");
  // anchor [B, ...], candidates [B, K, ...] -> [B] min over k of cos (cos/2 + 1/2 if rescale).
  m.def("min_cosine_similarity(Tensor anchor, Tensor candidates, bool rescale) -> Tensor");
  // The six [B, ...] predictions/targets, per-sample beta_w, valuable (bool), scale ([B]) and the
  // optional masks -> (loss [B], stats [B, 5] = d_w, d_l, z, coef_w, coef_l), both in the
  // accumulation dtype (fp32 for fp16/bf16 inputs). coef_* are the per-sample factors of the gradient the backward applies.
  m.def(
      "sopo_loss_forward(Tensor pred_w, Tensor ref_pred_w, Tensor target_w, Tensor pred_l, "
      "Tensor ref_pred_l, Tensor target_l, Tensor beta_w, Tensor valuable, Tensor scale, "
      "float beta, Tensor? mask_w, Tensor? mask_l) -> (Tensor, Tensor)");
  // Both at once for a training step: the forward's outputs plus (grad_pred_w, grad_pred_l) for
  // grad_loss[b] = grad_scale (1 / B under a mean reduction, 1 under a sum), computed while each
  // row is still in cache. The autograd backward returns them when the incoming gradient is
  // that constant, and runs sopo_loss_backward otherwise.
  m.def(
      "sopo_loss_forward_backward(Tensor pred_w, Tensor ref_pred_w, Tensor target_w, Tensor pred_l, "
      "Tensor ref_pred_l, Tensor target_l, Tensor beta_w, Tensor valuable, Tensor scale, "
      "float beta, Tensor? mask_w, Tensor? mask_l, float grad_scale) -> (Tensor, Tensor, Tensor, Tensor)");
  // grad_loss [B] and the forward's stats -> (grad_pred_w, grad_pred_l), one pass.
  m.def(
      "sopo_loss_backward(Tensor grad_loss, Tensor pred_w, Tensor target_w, Tensor pred_l, "
      "Tensor target_l, Tensor? mask_w, Tensor? mask_l, Tensor stats) -> (Tensor, Tensor)");
}

// `import sopo_ext._C` runs the static registrations above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
