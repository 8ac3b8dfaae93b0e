// recallprune::stacked_linear and recallprune::stacked_linear_backward: B linear layers of one
// shape at once (the study's stacked models), each with its own weights, dense or compact
// (its kept weights alone, the others pruned); their schemas and argument checks. The CPU kernels are
// in cpu/stacked_linear_cpu.cpp; elsewhere recallprune.ops.stacked_linear computes the same
// math with torch's batched products.
#include "stacked_linear.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

namespace recallprune {

void check_kept_lists(const char* op, const char* ptr_name, const char* idx_name,
                      const at::Tensor& ptr, const at::Tensor& idx, int64_t rows) {
  TORCH_CHECK(ptr.scalar_type() == at::kLong && ptr.dim() == 1 && ptr.size(0) == rows + 1 &&
                  ptr.is_contiguous(),
              op, ": ", ptr_name, " must be a contiguous int64 tensor of ", rows + 1,
              " offsets, got ", ptr.scalar_type(), " of shape ", ptr.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kInt && idx.dim() == 1 && idx.is_contiguous(), op, ": ",
              idx_name, " must be a contiguous 1-D int32 tensor, got ", idx.scalar_type(),
              " of shape ", idx.sizes());
  TORCH_CHECK(ptr.device() == idx.device(), op, ": ", ptr_name, " and ", idx_name,
              " must be on one device, got ", ptr.device(), " and ", idx.device());
  if (!ptr.device().is_cpu()) return;  // read where they are: the CPU kernels' lists only
  const int64_t* p = ptr.const_data_ptr<int64_t>();
  TORCH_CHECK(p[0] == 0, op, ": ", ptr_name, " must start at 0, got ", p[0]);
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(p[r + 1] >= p[r], op, ": ", ptr_name, " must not decrease, got ", p[r + 1],
                " after ", p[r], " at row ", r);
  }
  TORCH_CHECK(p[rows] == idx.numel(), op, ": ", ptr_name, " must end at the length of ",
              idx_name, " (", idx.numel(), "), got ", p[rows]);
}

LinearShape check_stacked_linear_args(const char* op, const at::Tensor& input,
                                      const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& row_ptr,
                                      const std::optional<at::Tensor>& row_cols,
                                      double dense_above) {
  TORCH_CHECK(input.scalar_type() == at::kFloat && input.dim() == 3 && input.is_contiguous(), op,
              ": input must be a contiguous float32 [B, in, n] tensor, got ", input.scalar_type(),
              " of shape ", input.sizes());
  TORCH_CHECK(row_ptr.has_value() == row_cols.has_value(), op,
              ": row_ptr and row_cols must be given together (a compact weight) or not at all");
  LinearShape shape{input.size(0), input.size(1), 0, input.size(2), row_ptr.has_value()};
  TORCH_CHECK(input.device() == weight.device(), op,
              ": input and weight must be on one device, got ", input.device(), " and ",
              weight.device());
  if (shape.compact) {
    TORCH_CHECK(shape.models >= 1, op, ": a compact weight needs at least one model, got input ",
                "of shape ", input.sizes());
    TORCH_CHECK(row_ptr->device() == weight.device(), op,
                ": row_ptr must be on the weight's device, got ", row_ptr->device(), " and ",
                weight.device());
    const int64_t rows = row_ptr->dim() == 1 ? row_ptr->size(0) - 1 : -1;
    TORCH_CHECK(rows >= 0 && rows % shape.models == 0, op, ": row_ptr must hold B * out + 1 = ",
                shape.models, " * out + 1 offsets, got shape ", row_ptr->sizes());
    shape.out = rows / shape.models;
    check_kept_lists(op, "row_ptr", "row_cols", *row_ptr, *row_cols, rows);
    TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 1 &&
                    weight.size(0) == row_cols->numel() && weight.is_contiguous(),
                op, ": a compact weight must be a contiguous float32 tensor of the ",
                row_cols->numel(), " kept weights' values, got ", weight.scalar_type(),
                " of shape ", weight.sizes());
  } else {
    TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 3 &&
                    weight.size(0) == shape.models && weight.size(2) == shape.in &&
                    weight.is_contiguous(),
                op, ": weight must be a contiguous float32 [B, out, in] tensor with B = ",
                shape.models, " and in = ", shape.in, " (the input's), got ",
                weight.scalar_type(), " of shape ", weight.sizes());
    shape.out = weight.size(1);
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 2 &&
                    bias->size(0) == shape.models && bias->size(1) == shape.out &&
                    bias->is_contiguous() && bias->device() == weight.device(),
                op, ": bias must be a contiguous float32 [B, out] tensor with B = ", shape.models,
                " and out = ", shape.out, " on the weight's device, got ", bias->scalar_type(),
                " of shape ", bias->sizes(), " on ", bias->device());
  }
  TORCH_CHECK(dense_above >= 0.0, op, ": dense_above must be a fraction >= 0, got ",
              dense_above);
  return shape;
}

TORCH_LIBRARY_FRAGMENT(recallprune, m) {
  // output [B, out, n] = relu?(weight @ input + bias[..., None]) per model. weight: dense
  // [B, out, in], or compact: the kept weights' values [nnz], row by row (row r = b * out + o
  // of model b holds weight[row_ptr[r] : row_ptr[r + 1]] at the columns row_cols[row_ptr[r] :
  // row_ptr[r + 1]], ascending), the others pruned. dense_above: the kept fraction from which
  // a block of rows is computed densely (the speed only; see cpu/kernels.h).
  m.def(
      "stacked_linear(Tensor input, Tensor weight, Tensor? bias, Tensor? row_ptr, "
      "Tensor? row_cols, bool relu=False, float dense_above=0.5) -> Tensor");
  // The gradients of stacked_linear: grad is that of its output; output, given, is its (relu)
  // output, through which grad goes first. A compact weight's input gradient needs the kept
  // weights by column too: column c = b * in + i of model b is kept by the rows
  // col_rows[col_ptr[c] : col_ptr[c + 1]] (ascending), whose values are at weight[col_vals[...]].
  // Returns (grad_input, grad_weight (the weight's shape), grad_bias) as output_mask asks,
  // empty tensors otherwise.
  // The index lists of a bool mask [B, out, in] (True: kept), as stacked_linear and its
  // backward read them: row_ptr int64 [B * out + 1], row_cols int32, col_ptr int64
  // [B * in + 1], col_rows int32, col_vals int64 (see stacked_linear_backward).
  m.def(
      "kept_weight_lists(Tensor mask) -> (Tensor row_ptr, Tensor row_cols, Tensor col_ptr, "
      "Tensor col_rows, Tensor col_vals)");
  m.def(
      "stacked_linear_backward(Tensor grad, Tensor input, Tensor weight, Tensor? output, "
      "Tensor? row_ptr, Tensor? row_cols, Tensor? col_ptr, Tensor? col_rows, Tensor? col_vals, "
      "bool[3] output_mask, float dense_above=0.5) -> (Tensor, Tensor, Tensor)");
}

}  // namespace recallprune
