// The argmax rule of the confusion ops, shared by the CPU kernels (every instruction set) and
// the CUDA kernel. It includes c10/macros only, as undecayed_sgd_element.h.
#pragma once

#include <c10/macros/Macros.h>

namespace recallprune {
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
