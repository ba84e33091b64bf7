// Python binding of the CUDA launchers (module sslpt.kernels._C, or ssl_kernels_C when JIT-built by kernels/_cuda.py).
//
// Includes only torch/extension.h and the plain-C launcher declarations: the CPU build of PyTorch lacks part
// of its CUDA headers (c10/cuda/impl/cuda_cmake_macros.h, cusparse.h), so nothing here needs them. The CUDA
// stream comes from Python as an integer (torch.cuda.current_stream(device).cuda_stream) and the device index
// from the tensors; the launchers switch to that device and back.
//
// Every function checks its arguments (device, dtype, shape, layout) and raises a RuntimeError naming the
// argument; outputs are allocated by the Python caller (so that tests can poison them) and written in place.
#include <torch/extension.h>

#include <string>

#include "launchers.h"

namespace {

using torch::Tensor;

void check_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " is missing");
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor: the CUDA extension sslpt.kernels._C runs on the GPU only, got "
              "a tensor on ", t.device(), " (use backend='reference' or 'triton' for CPU tensors)");
}

void check_same_device(const Tensor& t, const Tensor& like, const char* name) {
  check_cuda(t, name);
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), " like the other inputs, got ",
              t.device());
}

int float_code(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case torch::kFloat: return SSL_F32;
    case torch::kHalf: return SSL_F16;
    case torch::kBFloat16: return SSL_BF16;
    default: TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return -1;
}

int mask_code(const Tensor& t, const char* name) {
  if (t.scalar_type() == torch::kBool || t.scalar_type() == torch::kByte) return SSL_U8;
  return float_code(t, name);
}

void check_dtype(const Tensor& t, torch::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

void check_shape(const Tensor& t, std::vector<int64_t> shape, const char* name) {
  TORCH_CHECK(t.sizes() == torch::IntArrayRef(shape), name, " must have shape ", torch::IntArrayRef(shape), ", got ",
              t.sizes());
}

void check_contiguous(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_unit_last_stride(const Tensor& t, const char* name) {
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, name, " must have unit stride along its last dimension, got "
              "strides ", t.strides());
}

void* stream_ptr(int64_t stream) { return reinterpret_cast<void*>(static_cast<intptr_t>(stream)); }

int device_index(const Tensor& t) { return t.get_device(); }

void check_status(int status, const char* op) {
  TORCH_CHECK(status == 0, "sslpt.kernels._C.", op, ": CUDA error: ", ssl_cuda_error_string(status));
}

template <typename T = void>
T* ptr_or_null(const c10::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? static_cast<T*>(t->data_ptr()) : nullptr;
}

// ---- gathering ----------------------------------------------------------------------------------------

void gather_rows(const Tensor& src, const Tensor& index, const Tensor& out, int64_t stream) {
  check_cuda(src, "src");
  check_same_device(index, src, "index");
  check_same_device(out, src, "out");
  TORCH_CHECK(src.dim() == 3, "src must be [B, L, D], got shape ", src.sizes());
  TORCH_CHECK(index.dim() == 2 && index.size(0) == src.size(0), "index must be [B, K] with B = ", src.size(0),
              ", got shape ", index.sizes());
  TORCH_CHECK(index.scalar_type() == torch::kLong || index.scalar_type() == torch::kInt,
              "index must be int64 or int32, got ", index.scalar_type());
  float_code(src, "src");
  check_contiguous(index, "index");
  check_unit_last_stride(src, "src");
  check_dtype(out, src.scalar_type(), "out");
  check_shape(out, {src.size(0), index.size(1), src.size(2)}, "out");
  check_contiguous(out, "out");
  const int status = ssl_gather_rows(src.data_ptr(), src.stride(0), src.stride(1), index.data_ptr(),
                                     index.scalar_type() == torch::kLong, out.data_ptr(), src.size(0), index.size(1),
                                     src.size(2), static_cast<int>(src.element_size()), device_index(src),
                                     stream_ptr(stream));
  check_status(status, "gather_rows");
}

void scatter_rows(const Tensor& src, const Tensor& inverse, const c10::optional<Tensor>& fill, const Tensor& out,
                  int64_t stream) {
  check_cuda(src, "src");
  check_same_device(inverse, src, "inverse");
  check_same_device(out, src, "out");
  TORCH_CHECK(src.dim() == 3, "src must be [B, K, D], got shape ", src.sizes());
  float_code(src, "src");
  check_unit_last_stride(src, "src");
  check_dtype(inverse, torch::kInt, "inverse");
  TORCH_CHECK(inverse.dim() == 2 && inverse.size(0) == src.size(0), "inverse must be [B, L] with B = ", src.size(0),
              ", got shape ", inverse.sizes());
  check_contiguous(inverse, "inverse");
  if (fill.has_value() && fill->defined()) {
    check_same_device(*fill, src, "fill");
    check_dtype(*fill, src.scalar_type(), "fill");
    check_shape(*fill, {src.size(2)}, "fill");
    check_contiguous(*fill, "fill");
  }
  check_dtype(out, src.scalar_type(), "out");
  check_shape(out, {src.size(0), inverse.size(1), src.size(2)}, "out");
  check_contiguous(out, "out");
  const int status = ssl_scatter_rows(src.data_ptr(), src.stride(0), src.stride(1), inverse.data_ptr<int32_t>(),
                                      ptr_or_null<const void>(fill), out.data_ptr(), src.size(0), inverse.size(1),
                                      src.size(2), static_cast<int>(src.element_size()), device_index(src),
                                      stream_ptr(stream));
  check_status(status, "scatter_rows");
}

void scatter_rows_bwd(const Tensor& dout, const Tensor& inverse, const Tensor& dx_vis, const Tensor& partial,
                      int64_t rows_per_group, int64_t stream) {
  check_cuda(dout, "dout");
  check_same_device(inverse, dout, "inverse");
  check_same_device(dx_vis, dout, "dx_vis");
  check_same_device(partial, dout, "partial");
  TORCH_CHECK(dout.dim() == 3, "dout must be [B, L, D], got shape ", dout.sizes());
  const int dtype = float_code(dout, "dout");
  check_unit_last_stride(dout, "dout");
  check_dtype(inverse, torch::kInt, "inverse");
  check_shape(inverse, {dout.size(0), dout.size(1)}, "inverse");
  check_contiguous(inverse, "inverse");
  TORCH_CHECK(dx_vis.dim() == 3 && dx_vis.size(0) == dout.size(0) && dx_vis.size(2) == dout.size(2),
              "dx_vis must be [B, K, D] like dout, got shape ", dx_vis.sizes());
  check_dtype(dx_vis, dout.scalar_type(), "dx_vis");
  check_contiguous(dx_vis, "dx_vis");
  TORCH_CHECK(rows_per_group > 0, "rows_per_group must be positive");
  const int64_t groups = (dout.size(0) * dout.size(1) + rows_per_group - 1) / rows_per_group;
  check_dtype(partial, torch::kFloat, "partial");
  check_shape(partial, {groups, dout.size(2)}, "partial");
  check_contiguous(partial, "partial");
  const int status = ssl_scatter_rows_bwd(dout.data_ptr(), dout.stride(0), dout.stride(1), inverse.data_ptr<int32_t>(),
                                          dx_vis.data_ptr(), partial.data_ptr<float>(), dout.size(0), dout.size(1),
                                          dx_vis.size(1), dout.size(2), rows_per_group, dtype, device_index(dout),
                                          stream_ptr(stream));
  check_status(status, "scatter_rows_bwd");
}

// ---- patch_loss ---------------------------------------------------------------------------------------

void patch_loss_fwd(const Tensor& pred, const Tensor& target, const Tensor& mask, const Tensor& per_patch,
                    const c10::optional<Tensor>& diff, const Tensor& loss, const Tensor& count, bool norm_pix,
                    double eps, int64_t stream) {
  check_cuda(pred, "pred");
  check_same_device(target, pred, "target");
  check_same_device(mask, pred, "mask");
  TORCH_CHECK(pred.dim() == 3, "pred must be [B, L, P], got shape ", pred.sizes());
  const int pred_dtype = float_code(pred, "pred"), target_dtype = float_code(target, "target");
  const int m_code = mask_code(mask, "mask");
  check_shape(target, pred.sizes().vec(), "target");
  check_shape(mask, {pred.size(0), pred.size(1)}, "mask");
  check_unit_last_stride(pred, "pred");
  check_unit_last_stride(target, "target");
  TORCH_CHECK(!norm_pix || pred.size(2) >= 2, "norm_pix needs at least 2 values per patch");
  for (const Tensor* t : {&per_patch, &loss, &count}) {
    check_same_device(*t, pred, "per_patch/loss/count");
    check_dtype(*t, torch::kFloat, "per_patch/loss/count");
    check_contiguous(*t, "per_patch/loss/count");
  }
  check_shape(per_patch, {pred.size(0), pred.size(1)}, "per_patch");
  TORCH_CHECK(loss.numel() == 1 && count.numel() == 1, "loss and count must hold one element each");
  void* diff_ptr = nullptr;
  if (diff.has_value() && diff->defined()) {
    check_same_device(*diff, pred, "diff");
    check_dtype(*diff, pred.scalar_type(), "diff");
    check_shape(*diff, pred.sizes().vec(), "diff");
    check_contiguous(*diff, "diff");
    diff_ptr = diff->data_ptr();
  }
  const int64_t blocks = (pred.size(0) * pred.size(1) + SSL_PATCH_LOSS_ROWS - 1) / SSL_PATCH_LOSS_ROWS;
  Tensor parts = torch::empty({2, std::max<int64_t>(blocks, 1)}, pred.options().dtype(torch::kFloat));
  const int status = ssl_patch_loss_fwd(
      pred.data_ptr(), pred_dtype, pred.stride(0), pred.stride(1), target.data_ptr(), target_dtype, target.stride(0),
      target.stride(1), mask.data_ptr(), m_code, mask.stride(0), mask.stride(1), per_patch.data_ptr<float>(), diff_ptr,
      parts.data_ptr<float>(), parts.data_ptr<float>() + parts.size(1), loss.data_ptr<float>(),
      count.data_ptr<float>(), pred.size(0), pred.size(1), pred.size(2), norm_pix, static_cast<float>(eps),
      device_index(pred), stream_ptr(stream));
  check_status(status, "patch_loss_fwd");
}

void patch_loss_bwd(const Tensor& diff, const Tensor& mask, const c10::optional<Tensor>& grad_loss,
                    const Tensor& count, const c10::optional<Tensor>& grad_per_patch, const Tensor& grad_pred,
                    int64_t stream) {
  check_cuda(diff, "diff");
  check_same_device(mask, diff, "mask");
  check_same_device(count, diff, "count");
  check_same_device(grad_pred, diff, "grad_pred");
  TORCH_CHECK(diff.dim() == 3, "diff must be [B, L, P], got shape ", diff.sizes());
  const int dtype = float_code(diff, "diff");
  check_contiguous(diff, "diff");
  const int m_code = mask_code(mask, "mask");
  check_shape(mask, {diff.size(0), diff.size(1)}, "mask");
  check_dtype(count, torch::kFloat, "count");
  if (grad_loss.has_value() && grad_loss->defined()) {
    check_same_device(*grad_loss, diff, "grad_loss");
    check_dtype(*grad_loss, torch::kFloat, "grad_loss");
    TORCH_CHECK(grad_loss->numel() == 1, "grad_loss must hold one element");
  }
  if (grad_per_patch.has_value() && grad_per_patch->defined()) {
    check_same_device(*grad_per_patch, diff, "grad_per_patch");
    check_dtype(*grad_per_patch, torch::kFloat, "grad_per_patch");
    check_shape(*grad_per_patch, {diff.size(0), diff.size(1)}, "grad_per_patch");
    check_contiguous(*grad_per_patch, "grad_per_patch");
  }
  check_dtype(grad_pred, diff.scalar_type(), "grad_pred");
  check_shape(grad_pred, diff.sizes().vec(), "grad_pred");
  check_contiguous(grad_pred, "grad_pred");
  const int status = ssl_patch_loss_bwd(diff.data_ptr(), dtype, mask.data_ptr(), m_code, mask.stride(0),
                                        mask.stride(1), ptr_or_null<const float>(grad_loss), count.data_ptr<float>(),
                                        ptr_or_null<const float>(grad_per_patch), grad_pred.data_ptr(), diff.size(0),
                                        diff.size(1), diff.size(2), device_index(diff), stream_ptr(stream));
  check_status(status, "patch_loss_bwd");
}

// ---- relative_loss ------------------------------------------------------------------------------------

void relative_loss_fwd(const Tensor& score, const Tensor& true_loss, const c10::optional<Tensor>& grad,
                       const Tensor& loss, const Tensor& count, bool stable, int64_t stream) {
  check_cuda(score, "pred_score");
  check_same_device(true_loss, score, "true_loss");
  TORCH_CHECK(score.dim() == 2, "pred_score must be [B, M], got shape ", score.sizes());
  const int score_dtype = float_code(score, "pred_score"), true_dtype = float_code(true_loss, "true_loss");
  check_shape(true_loss, score.sizes().vec(), "true_loss");
  float* grad_ptr = nullptr;
  if (grad.has_value() && grad->defined()) {
    check_same_device(*grad, score, "grad");
    check_dtype(*grad, torch::kFloat, "grad");
    check_shape(*grad, score.sizes().vec(), "grad");
    check_contiguous(*grad, "grad");
    grad_ptr = grad->data_ptr<float>();
  }
  for (const Tensor* t : {&loss, &count}) {
    check_same_device(*t, score, "loss/count");
    check_dtype(*t, torch::kFloat, "loss/count");
    TORCH_CHECK(t->numel() == 1, "loss and count must hold one element each");
  }
  const int64_t parts = score.size(0) * ((score.size(1) + SSL_RELATIVE_ROWS - 1) / SSL_RELATIVE_ROWS);
  Tensor part_loss = torch::empty({std::max<int64_t>(parts, 1)}, score.options().dtype(torch::kFloat));
  Tensor part_count = torch::empty({std::max<int64_t>(parts, 1)}, score.options().dtype(torch::kInt));
  const int status = ssl_relative_loss_fwd(
      score.data_ptr(), score_dtype, score.stride(0), score.stride(1), true_loss.data_ptr(), true_dtype,
      true_loss.stride(0), true_loss.stride(1), grad_ptr, part_loss.data_ptr<float>(), part_count.data_ptr<int32_t>(),
      loss.data_ptr<float>(), count.data_ptr<float>(), score.size(0), score.size(1), stable, device_index(score),
      stream_ptr(stream));
  check_status(status, "relative_loss_fwd");
}

// ---- hard-patch selection -----------------------------------------------------------------------------

void row_topk(const Tensor& scores, int64_t k, const Tensor& out, int64_t stream) {
  check_cuda(scores, "pred_score");
  check_same_device(out, scores, "out");
  TORCH_CHECK(scores.dim() == 2, "pred_score must be [B, L], got shape ", scores.sizes());
  const int dtype = float_code(scores, "pred_score");
  TORCH_CHECK(k >= 0 && k <= scores.size(1), "k must be in [0, ", scores.size(1), "], got ", k);
  check_dtype(out, torch::kLong, "out");
  check_shape(out, {scores.size(0), k}, "out");
  check_contiguous(out, "out");
  const int status = ssl_row_topk(scores.data_ptr(), dtype, scores.stride(0), scores.stride(1), scores.size(0),
                                  scores.size(1), k, out.data_ptr<int64_t>(), device_index(scores), stream_ptr(stream));
  check_status(status, "row_topk");
}

// ---- info_nce -----------------------------------------------------------------------------------------

void check_logits(const Tensor& S, const Tensor& scale) {
  check_cuda(S, "logits");
  check_same_device(scale, S, "scale");
  TORCH_CHECK(S.dim() == 2, "logits must be [R, C], got shape ", S.sizes());
  check_dtype(S, torch::kFloat, "logits");
  check_contiguous(S, "logits");
  check_dtype(scale, torch::kFloat, "scale");
  TORCH_CHECK(scale.numel() == 1, "scale must hold one element");
}

void check_vector(const c10::optional<Tensor>& t, const Tensor& like, int64_t size, const char* name) {
  if (!t.has_value() || !t->defined()) return;
  check_same_device(*t, like, name);
  check_dtype(*t, torch::kFloat, name);
  check_shape(*t, {size}, name);
  check_contiguous(*t, name);
}

void lse_rows(const Tensor& S, const Tensor& scale, const Tensor& lse, const c10::optional<Tensor>& pos,
              int64_t pos_col0, int64_t stream) {
  check_logits(S, scale);
  check_vector(lse, S, S.size(0), "lse");
  check_vector(pos, S, S.size(0), "pos");
  if (pos.has_value() && pos->defined())
    TORCH_CHECK(pos_col0 >= 0 && pos_col0 + S.size(0) <= S.size(1), "positive columns [", pos_col0, ", ",
                pos_col0 + S.size(0), ") must lie in [0, ", S.size(1), ")");
  const int status = ssl_lse_rows(S.data_ptr<float>(), S.size(0), S.size(1), scale.data_ptr<float>(),
                                  lse.data_ptr<float>(), ptr_or_null<float>(pos), pos_col0, device_index(S),
                                  stream_ptr(stream));
  check_status(status, "lse_rows");
}

void lse_cols(const Tensor& S, const Tensor& scale, int64_t rows_per_seg, const Tensor& part, int64_t stream) {
  check_logits(S, scale);
  TORCH_CHECK(rows_per_seg > 0, "rows_per_seg must be positive");
  check_same_device(part, S, "part");
  check_dtype(part, torch::kFloat, "part");
  check_shape(part, {(S.size(0) + rows_per_seg - 1) / rows_per_seg, S.size(1)}, "part");
  check_contiguous(part, "part");
  const int status = ssl_lse_cols(S.data_ptr<float>(), S.size(0), S.size(1), scale.data_ptr<float>(), rows_per_seg,
                                  part.data_ptr<float>(), device_index(S), stream_ptr(stream));
  check_status(status, "lse_cols");
}

void lse_grad(const Tensor& S, const Tensor& scale, const c10::optional<Tensor>& row_lse,
              const c10::optional<Tensor>& row_grad, const c10::optional<Tensor>& row_pos_grad, int64_t pos_col0,
              const c10::optional<Tensor>& col_lse, const c10::optional<Tensor>& col_grad, const Tensor& W,
              int64_t stream) {
  check_logits(S, scale);
  check_vector(row_lse, S, S.size(0), "row_lse");
  check_vector(row_grad, S, S.size(0), "row_grad");
  check_vector(row_pos_grad, S, S.size(0), "row_pos_grad");
  check_vector(col_lse, S, S.size(1), "col_lse");
  check_vector(col_grad, S, S.size(1), "col_grad");
  if (row_pos_grad.has_value() && row_pos_grad->defined())
    TORCH_CHECK(pos_col0 >= 0 && pos_col0 + S.size(0) <= S.size(1), "positive columns out of range");
  check_same_device(W, S, "W");
  const int w_dtype = float_code(W, "W");
  check_shape(W, S.sizes().vec(), "W");
  check_contiguous(W, "W");
  const int status = ssl_lse_grad(S.data_ptr<float>(), S.size(0), S.size(1), scale.data_ptr<float>(),
                                  ptr_or_null<const float>(row_lse), ptr_or_null<const float>(row_grad),
                                  ptr_or_null<const float>(row_pos_grad), pos_col0, ptr_or_null<const float>(col_lse),
                                  ptr_or_null<const float>(col_grad), W.data_ptr(), w_dtype, device_index(S),
                                  stream_ptr(stream));
  check_status(status, "lse_grad");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA kernels of the ssl-kernels-engine (see csrc/README.md); arguments are checked here.";
  m.attr("PATCH_LOSS_ROWS") = static_cast<int>(SSL_PATCH_LOSS_ROWS);
  m.attr("RELATIVE_ROWS") = static_cast<int>(SSL_RELATIVE_ROWS);
  m.def("gather_rows", &gather_rows, "out[b, k] = src[b, index[b, k]]", py::arg("src"), py::arg("index"),
        py::arg("out"), py::arg("stream"));
  m.def("scatter_rows", &scatter_rows, "out[b, l] = src[b, inverse[b, l]] or fill (zeros if None)", py::arg("src"),
        py::arg("inverse"), py::arg("fill"), py::arg("out"), py::arg("stream"));
  m.def("scatter_rows_bwd", &scatter_rows_bwd, "dx_vis rows and per-group fp32 sums of the masked rows",
        py::arg("dout"), py::arg("inverse"), py::arg("dx_vis"), py::arg("partial"), py::arg("rows_per_group"),
        py::arg("stream"));
  m.def("patch_loss_fwd", &patch_loss_fwd, "per-patch MSE, diff and the masked mean", py::arg("pred"),
        py::arg("target"), py::arg("mask"), py::arg("per_patch"), py::arg("diff"), py::arg("loss"), py::arg("count"),
        py::arg("norm_pix"), py::arg("eps"), py::arg("stream"));
  m.def("patch_loss_bwd", &patch_loss_bwd, "grad of pred from the stored diff", py::arg("diff"), py::arg("mask"),
        py::arg("grad_loss"), py::arg("count"), py::arg("grad_per_patch"), py::arg("grad_pred"), py::arg("stream"));
  m.def("relative_loss_fwd", &relative_loss_fwd, "pairwise ranking loss and its per-score gradient sums",
        py::arg("pred_score"), py::arg("true_loss"), py::arg("grad"), py::arg("loss"), py::arg("count"),
        py::arg("stable"), py::arg("stream"));
  m.def("row_topk", &row_topk, "positions of the k largest scores per row (ties: lower position first)",
        py::arg("pred_score"), py::arg("k"), py::arg("out"), py::arg("stream"));
  m.def("lse_rows", &lse_rows, "row log-sum-exp of scale * S and the positive logits", py::arg("logits"),
        py::arg("scale"), py::arg("lse"), py::arg("pos"), py::arg("pos_col0"), py::arg("stream"));
  m.def("lse_cols", &lse_cols, "column log-sum-exp of scale * S per segment of rows", py::arg("logits"),
        py::arg("scale"), py::arg("rows_per_seg"), py::arg("part"), py::arg("stream"));
  m.def("lse_grad", &lse_grad, "gradient weights W of the log-sum-exp statistics", py::arg("logits"),
        py::arg("scale"), py::arg("row_lse"), py::arg("row_grad"), py::arg("row_pos_grad"), py::arg("pos_col0"),
        py::arg("col_lse"), py::arg("col_grad"), py::arg("W"), py::arg("stream"));
}
