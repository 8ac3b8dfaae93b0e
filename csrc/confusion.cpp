// The confusion-count ops: their schemas, the argument checks shared by the CPU and CUDA
// kernels (csrc/cpu/confusion_cpu.cpp, csrc/cuda/confusion_cuda.cu) and the composite
// functional op.
#include "confusion.h"

#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

namespace recallprune {

TORCH_LIBRARY_FRAGMENT(recallprune, m) {
  // Confusion counts of one batch added to `counts` (int64 [C*C], row = true class).
  // input: logits [N, C, S] (float) or predicted labels [N, S] (int32/int64);
  // target: labels [N, S] (int32/int64). Entries with target == ignore_index are skipped;
  // other entries with a label outside [0, C) are added to `invalid` (int64 [1]).
  m.def(
      "confusion_update_(Tensor(a!) counts, Tensor(b!) invalid, Tensor input, Tensor target, "
      "int num_classes, int? ignore_index=None) -> ()");
  // The same for one batch into fresh tensors: returns (counts [C, C], invalid [1]).
  m.def(
      "confusion_matrix(Tensor input, Tensor target, int num_classes, int? ignore_index=None) "
      "-> (Tensor, Tensor)");
}

int64_t check_confusion_args(const at::Tensor& counts, const at::Tensor& invalid,
                             const at::Tensor& input, const at::Tensor& target,
                             int64_t num_classes) {
  TORCH_CHECK(num_classes >= 1, "confusion_update_: num_classes must be positive, got ",
              num_classes);
  TORCH_CHECK(num_classes <= (int64_t{1} << 31) && num_classes * num_classes < (int64_t{1} << 62),
              "confusion_update_: num_classes ", num_classes, " is too large");
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.dim() == 1 &&
                  counts.numel() == num_classes * num_classes && counts.is_contiguous(),
              "confusion_update_: counts must be a contiguous int64 tensor of ",
              num_classes * num_classes, " elements, got ", counts.scalar_type(), " of shape ",
              counts.sizes());
  TORCH_CHECK(invalid.scalar_type() == at::kLong && invalid.numel() == 1,
              "confusion_update_: invalid must be a one-element int64 tensor, got ",
              invalid.scalar_type(), " of shape ", invalid.sizes());
  for (const at::Tensor* t : {&invalid, &input, &target}) {
    TORCH_CHECK(t->device() == counts.device(),
                "confusion_update_: all tensors must be on the counts' device ", counts.device(),
                ", got one on ", t->device());
  }
  const auto target_type = target.scalar_type();
  TORCH_CHECK(target_type == at::kLong || target_type == at::kInt,
              "confusion_update_: target must be int64 or int32, got ", target_type);
  TORCH_CHECK(target.dim() == 2 && target.is_contiguous(),
              "confusion_update_: target must be a contiguous [N, S] tensor, got shape ",
              target.sizes());
  if (at::isFloatingType(input.scalar_type())) {
    const auto type = input.scalar_type();
    TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16 ||
                    type == at::kDouble,
                "confusion_update_: logits must be float32, float16, bfloat16 or float64, got ",
                type);
    TORCH_CHECK(input.dim() == 3 && input.size(1) == num_classes && input.is_contiguous(),
                "confusion_update_: logits must be a contiguous [N, C, S] tensor with C = ",
                num_classes, ", got shape ", input.sizes());
    TORCH_CHECK(input.size(0) == target.size(0) && input.size(2) == target.size(1),
                "confusion_update_: target shape ", target.sizes(),
                " does not match logits of shape ", input.sizes());
  } else {
    const auto type = input.scalar_type();
    TORCH_CHECK(type == at::kLong || type == at::kInt,
                "confusion_update_: predicted labels must be int64 or int32, got ", type);
    TORCH_CHECK(input.sizes() == target.sizes() && input.is_contiguous(),
                "confusion_update_: predicted labels must be contiguous and shaped like the "
                "target ",
                target.sizes(), ", got ", input.sizes());
  }
  return target.numel();
}

namespace {

std::tuple<at::Tensor, at::Tensor> confusion_matrix(const at::Tensor& input,
                                                    const at::Tensor& target,
                                                    int64_t num_classes,
                                                    std::optional<int64_t> ignore_index) {
  TORCH_CHECK(num_classes >= 1, "confusion_matrix: num_classes must be positive, got ",
              num_classes);
  auto options = target.options().dtype(at::kLong);
  at::Tensor counts = at::zeros({num_classes * num_classes}, options);
  at::Tensor invalid = at::zeros({1}, options);
  static const auto update = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("recallprune::confusion_update_", "")
                                 .typed<void(at::Tensor&, at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, int64_t, std::optional<int64_t>)>();
  update.call(counts, invalid, input, target, num_classes, ignore_index);
  return {counts.view({num_classes, num_classes}), invalid};
}

}  // namespace

TORCH_LIBRARY_IMPL(recallprune, CompositeExplicitAutograd, m) {
  m.impl("confusion_matrix", &confusion_matrix);
}

}  // namespace recallprune
