// Device-independent parts of recallprune::undecayed_sgd_ (undecayed_sgd.cpp): the argument
// checks the CPU and CUDA kernels share, and the update of one element
// (undecayed_sgd_element.h).
#pragma once

#include "undecayed_sgd_element.h"

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <optional>

namespace recallprune {

// Checks that need no device: list lengths, shapes, dtypes, layouts, one device.
// The kernels take dense, non-overlapping tensors, every tensor of a parameter laid out in
// memory as the parameter is; the Python wrapper routes others to the reference.
void check_undecayed_sgd_args(at::TensorList params, at::TensorList grads,
                              at::TensorList momentum_buffers,
                              const c10::List<std::optional<at::Tensor>>& keep_masks,
                              const c10::List<std::optional<at::Tensor>>& decay_masks,
                              at::TensorList grad_sums, double momentum,
                              const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf,
                              bool keep_masks_packed);

// Checks of a tensor hyper-parameter of undecayed_sgd_.tensor (`name`: "lr" or
// "weight_decay"): one float32 or float64 element, on the CPU or on the parameters' device.
void check_scalar_tensor(const at::Tensor& value, const char* name, at::TensorList params);

// Mask pointer as bytes (bool and uint8 share a layout), or nullptr where absent.
inline const uint8_t* mask_data(const c10::List<std::optional<at::Tensor>>& masks, size_t i) {
  if (masks.size() == 0) {
    return nullptr;
  }
  const std::optional<at::Tensor> mask = masks.get(i);
  return mask.has_value() ? static_cast<const uint8_t*>(mask->const_data_ptr()) : nullptr;
}

}  // namespace recallprune
