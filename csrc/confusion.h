// Device-independent parts of the confusion-count ops (confusion.cpp): the argument checks
// the CPU and CUDA kernels share, and the argmax rule (confusion_element.h).
#pragma once

#include "confusion_element.h"

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace recallprune {

// Checks shapes, dtypes and devices of confusion_update_; returns the number of entries.
// Shapes: counts [C*C] int64, invalid [1] int64, input [N, C, S] float or [N, S] int,
// target [N, S] int, all contiguous and on one device.
int64_t check_confusion_args(const at::Tensor& counts, const at::Tensor& invalid,
                             const at::Tensor& input, const at::Tensor& target,
                             int64_t num_classes);

// Checks of confusion_update_stacked_ (confusion_stacked.cpp), each model's slice by the
// checks above; returns the number of models B. Shapes: counts [B, C*C], invalid [B],
// input [B, N, C, S] or [B, N, S], target [B, N, S], all contiguous and on one device.
int64_t check_stacked_confusion_args(const at::Tensor& counts, const at::Tensor& invalid,
                                     const at::Tensor& input, const at::Tensor& target,
                                     int64_t num_classes);

}  // namespace recallprune
