// recallprune::confusion_update_stacked_: the confusion counts of B models at once (the
// study's stacked models), model b counting into row b; its schema, its argument checks and
// its CPU kernel. On the CPU each model's batch is counted by confusion_update_'s kernel on
// views of its slice (that kernel runs in parallel within a batch): no copy, and the same
// counts as B separate updates by construction. The CUDA kernel counts every model in one
// launch (cuda/confusion_cuda.cu).
#include "confusion.h"

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>

namespace recallprune {

int64_t check_stacked_confusion_args(const at::Tensor& counts, const at::Tensor& invalid,
                                     const at::Tensor& input, const at::Tensor& target,
                                     int64_t num_classes) {
  TORCH_CHECK(num_classes >= 1, "confusion_update_stacked_: num_classes must be positive, got ",
              num_classes);
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.dim() == 2 && counts.is_contiguous(),
              "confusion_update_stacked_: counts must be a contiguous int64 [B, C * C] tensor, "
              "got ",
              counts.scalar_type(), " of shape ", counts.sizes());
  const int64_t models = counts.size(0);
  TORCH_CHECK(invalid.scalar_type() == at::kLong && invalid.dim() == 1 &&
                  invalid.size(0) == models && invalid.is_contiguous(),
              "confusion_update_stacked_: invalid must be a contiguous int64 tensor of ", models,
              " elements (one per model), got ", invalid.scalar_type(), " of shape ",
              invalid.sizes());
  const int64_t input_dims = at::isFloatingType(input.scalar_type()) ? 4 : 3;
  TORCH_CHECK(input.dim() == input_dims && input.size(0) == models,
              "confusion_update_stacked_: input must be logits [B, N, C, S] or labels [B, N, S] "
              "with B = ",
              models, ", got shape ", input.sizes());
  TORCH_CHECK(target.dim() == 3 && target.size(0) == models,
              "confusion_update_stacked_: target must be labels [B, N, S] with B = ", models,
              ", got shape ", target.sizes());
  TORCH_CHECK(input.is_contiguous() && target.is_contiguous(),
              "confusion_update_stacked_: input and target must be contiguous");
  // Every model's slice as confusion_update_ takes it (the slices share their shapes).
  if (models > 0) {
    check_confusion_args(counts.select(0, 0), invalid.narrow(0, 0, 1), input.select(0, 0),
                         target.select(0, 0), num_classes);
  }
  return models;
}

namespace {

void confusion_update_stacked_cpu_(at::Tensor& counts, at::Tensor& invalid,
                                   const at::Tensor& input, const at::Tensor& target,
                                   int64_t num_classes, std::optional<int64_t> ignore_index) {
  check_stacked_confusion_args(counts, invalid, input, target, num_classes);
  static const auto update = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("recallprune::confusion_update_", "")
                                 .typed<void(at::Tensor&, at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, int64_t, std::optional<int64_t>)>();
  for (int64_t b = 0; b < counts.size(0); ++b) {
    at::Tensor model_counts = counts.select(0, b);
    at::Tensor model_invalid = invalid.narrow(0, b, 1);
    update.call(model_counts, model_invalid, input.select(0, b), target.select(0, b), num_classes,
                ignore_index);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(recallprune, m) {
  // The confusion counts of B models: counts int64 [B, C*C] (row b: model b's [C*C], row =
  // true class), invalid int64 [B]; input logits [B, N, C, S] (float) or predicted labels
  // [B, N, S] (int32/int64), target labels [B, N, S]; otherwise as confusion_update_.
  m.def(
      "confusion_update_stacked_(Tensor(a!) counts, Tensor(b!) invalid, Tensor input, "
      "Tensor target, int num_classes, int? ignore_index=None) -> ()");
}

TORCH_LIBRARY_IMPL(recallprune, CPU, m) {
  m.impl("confusion_update_stacked_", &confusion_update_stacked_cpu_);
}

}  // namespace recallprune
