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
  TORCH_CHECK(input.device() == weight.device(), op,
              ": input and weight must be on one device, got ", input.device(), " and ",
              weight.device());
  LinearShape shape = check_stacked_weight(op, "", input.size(0), input.size(1), weight, bias,
                                           row_ptr, row_cols, dense_above);
  shape.n = input.size(2);
  return shape;
}

LinearShape check_stacked_weight(const char* op, const char* layer, int64_t models, int64_t in,
                                 const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& row_ptr,
                                 const std::optional<at::Tensor>& row_cols, double dense_above) {
  TORCH_CHECK(row_ptr.has_value() == row_cols.has_value(), op, ": ", layer,
              "row_ptr and row_cols must be given together (a compact weight) or not at all");
  LinearShape shape{models, in, 0, 0, row_ptr.has_value()};
  if (shape.compact) {
    TORCH_CHECK(shape.models >= 1, op, ": ", layer,
                "a compact weight needs at least one model, got ", models);
    TORCH_CHECK(row_ptr->device() == weight.device(), op, ": ", layer,
                "row_ptr must be on the weight's device, got ", row_ptr->device(), " and ",
                weight.device());
    const int64_t rows = row_ptr->dim() == 1 ? row_ptr->size(0) - 1 : -1;
    TORCH_CHECK(rows >= 0 && rows % shape.models == 0, op, ": ", layer,
                "row_ptr must hold B * out + 1 = ", shape.models,
                " * out + 1 offsets, got shape ", row_ptr->sizes());
    shape.out = rows / shape.models;
    check_kept_lists(op, "row_ptr", "row_cols", *row_ptr, *row_cols, rows);
    TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 1 &&
                    weight.size(0) == row_cols->numel() && weight.is_contiguous(),
                op, ": ", layer, "a compact weight must be a contiguous float32 tensor of the ",
                row_cols->numel(), " kept weights' values, got ", weight.scalar_type(),
                " of shape ", weight.sizes());
  } else {
    TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.dim() == 3 &&
                    weight.size(0) == shape.models && weight.size(2) == shape.in &&
                    weight.is_contiguous(),
                op, ": ", layer, "weight must be a contiguous float32 [B, out, in] tensor with B = ",
                shape.models, " and in = ", shape.in, " (the input's), got ",
                weight.scalar_type(), " of shape ", weight.sizes());
    shape.out = weight.size(1);
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 2 &&
                    bias->size(0) == shape.models && bias->size(1) == shape.out &&
                    bias->is_contiguous() && bias->device() == weight.device(),
                op, ": ", layer, "bias must be a contiguous float32 [B, out] tensor with B = ",
                shape.models, " and out = ", shape.out, " on the weight's device, got ",
                bias->scalar_type(), " of shape ", bias->sizes(), " on ", bias->device());
  }
  TORCH_CHECK(dense_above >= 0.0, op, ": dense_above must be a fraction >= 0, got ",
              dense_above);
  return shape;
}

void check_column_lists(const char* op, const char* layer, const LinearShape& s,
                        const at::Tensor& weight, const std::optional<at::Tensor>& col_ptr,
                        const std::optional<at::Tensor>& col_rows,
                        const std::optional<at::Tensor>& col_vals) {
  TORCH_CHECK(s.compact && col_ptr.has_value() && col_rows.has_value() && col_vals.has_value(),
              op, ": ", layer,
              "the input gradient of a compact weight needs its kept weights by column "
              "(col_ptr, col_rows and col_vals), and those need a compact weight");
  TORCH_CHECK(col_ptr->device() == weight.device(), op, ": ", layer,
              "col_ptr must be on the weight's device, got ", col_ptr->device());
  check_kept_lists(op, "col_ptr", "col_rows", *col_ptr, *col_rows, s.models * s.in);
  TORCH_CHECK(col_rows->numel() == weight.numel() && col_vals->scalar_type() == at::kLong &&
                  col_vals->dim() == 1 && col_vals->numel() == weight.numel() &&
                  col_vals->is_contiguous() && col_vals->device() == weight.device(),
              op, ": ", layer, "col_rows and col_vals must list the ", weight.numel(),
              " kept weights (col_vals as contiguous int64), got ", col_rows->numel(), " and ",
              col_vals->scalar_type(), " of shape ", col_vals->sizes());
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
  // One training step's gradients of B stacked MLPs (the layers' weights as stacked_linear
  // takes them, a relu after every layer but the last), each on its own samples: model b's
  // inputs are the rows x[batch[b]] (x [N, features]), its targets y[batch[b]], its loss the
  // mean softmax cross-entropy of its logits over its n samples. lists: per layer, row_ptr,
  // row_cols, col_ptr, col_rows, col_vals of a compact weight (None for a dense one; the
  // first layer's column lists are not read), or none at all. Returns each sample's loss
  // [B, n] and, per layer, the gradients of the weight (its shape) and the bias [B, out]:
  // the same as stacked_linear's forward, torch's cross_entropy and stacked_linear_backward.
  m.def(
      "stacked_mlp_grads(Tensor x, Tensor y, Tensor batch, Tensor[] weights, Tensor[] biases, "
      "Tensor?[] lists, float dense_above=0.5) -> (Tensor, Tensor[], Tensor[])");
  // stacked_mlp_grads, then each model's UndecayedSGD step (momentum on) while its gradients
  // are in cache, in place; returns the losses (the gradients are spent): the same bits as undecayed_sgd_ over the whole parameters with
  // these gradients. Per layer the momentum buffers of the weight and the bias and the
  // weight's keep mask (bool, of a dense weight's shape; None: all kept); lr and weight_decay
  // per parameter, the weights' first, then the biases'. Nothing changes where the call
  // fails: the samples and targets are checked first, and the index lists too with
  // check_lists (the kernels check what they read in any case: unchecked, a bad list raises
  // after the models before it have stepped).
  m.def(
      "stacked_mlp_step_(Tensor x, Tensor y, Tensor batch, Tensor(a!)[] weights, "
      "Tensor(b!)[] biases, Tensor?[] lists, Tensor(c!)[] weight_momenta, "
      "Tensor(d!)[] bias_momenta, Tensor?[] keep_masks, float[] lr, float[] weight_decay, "
      "float momentum, float dampening, bool nesterov, bool maximize, bool check_lists=True, "
      "float dense_above=0.5) -> Tensor");
}

}  // namespace recallprune
