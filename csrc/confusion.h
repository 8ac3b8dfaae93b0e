// Device-independent parts of the confusion-count ops: argument checks and the
// composite functional op.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <optional>

namespace recallprune {

// Checks shapes, dtypes and devices of confusion_update_; returns the number of entries.
// Shapes: counts [C*C] int64, invalid [1] int64, input [N, C, S] float or [N, S] int,
// target [N, S] int, all contiguous and on one device.
int64_t check_confusion_args(const at::Tensor& counts, const at::Tensor& invalid,
                             const at::Tensor& input, const at::Tensor& target,
                             int64_t num_classes);

// Internal linkage: compiled once per CPU instruction set (see csrc/cpu/kernels.h).
namespace {

// An argmax that matches torch.argmax: the first index of the largest value, and a NaN
// counts as larger than any number (the first NaN wins).
template <typename T>
C10_HOST_DEVICE inline bool argmax_takes(T value, T best) {
  return value > best || (value != value && best == best);
}

}  // namespace

}  // namespace recallprune
