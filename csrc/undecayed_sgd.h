// The one UndecayedSGD update, shared by the CPU and CUDA kernels, and the
// device-independent argument checks of the op.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>
#include <c10/macros/Macros.h>

#include <optional>

namespace recallprune {
// Internal linkage on purpose: the CPU kernels are compiled once per instruction set
// (csrc/cpu/kernels_*.cpp), and each copy of this math must stay in its own object.
namespace {

// Hyper-parameters in the math type of the tensors (float for fp32/fp16/bf16).
template <typename opmath_t>
struct SgdScalars {
  opmath_t neg_lr;
  opmath_t momentum;
  opmath_t one_minus_dampening;
  opmath_t weight_decay;
  bool nesterov;
  bool maximize;
  bool is_first_step;
  bool has_momentum;
  bool has_weight_decay;

  SgdScalars(double lr, double momentum_, double dampening, double weight_decay_, bool nesterov_,
             bool maximize_, bool is_first_step_)
      : neg_lr(static_cast<opmath_t>(-lr)),
        momentum(static_cast<opmath_t>(momentum_)),
        one_minus_dampening(static_cast<opmath_t>(1.0 - dampening)),
        weight_decay(static_cast<opmath_t>(weight_decay_)),
        nesterov(nesterov_),
        maximize(maximize_),
        is_first_step(is_first_step_),
        has_momentum(momentum_ != 0.0),
        has_weight_decay(weight_decay_ != 0.0) {}
};

// One element of a kept (unpruned) weight, in the order of torch.optim.SGD:
//   g = -g if maximize;  g += weight_decay * w where decay applies;
//   buf = g (first step) or momentum * buf + (1 - dampening) * g;
//   g = g + momentum * buf (nesterov) or buf;  w = w - lr * g.
// `grad` is already unscaled. Returns the new weight; updates `buf` in place.
template <typename opmath_t>
C10_HOST_DEVICE inline opmath_t undecayed_sgd_element(opmath_t w, opmath_t grad, opmath_t& buf,
                                                      bool decay, const SgdScalars<opmath_t>& s) {
  opmath_t g = s.maximize ? -grad : grad;
  if (s.has_weight_decay && decay) {
    g = g + s.weight_decay * w;
  }
  if (s.has_momentum) {
    buf = s.is_first_step ? g : buf * s.momentum + s.one_minus_dampening * g;
    g = s.nesterov ? g + s.momentum * buf : buf;
  }
  return w + s.neg_lr * g;
}

}  // namespace

// Checks that need no device: list lengths, shapes, dtypes, layouts, one device.
// The kernels require dense contiguous tensors; the Python wrapper routes others
// to the reference implementation.
void check_undecayed_sgd_args(at::TensorList params, at::TensorList grads,
                              at::TensorList momentum_buffers,
                              const c10::List<std::optional<at::Tensor>>& keep_masks,
                              const c10::List<std::optional<at::Tensor>>& decay_masks,
                              at::TensorList grad_sums, double momentum,
                              const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf);

// Checks of the tensor learning rate of undecayed_sgd_.tensor_lr: one float32 or float64
// element, on the CPU or on the parameters' device.
void check_lr_tensor(const at::Tensor& lr, at::TensorList params);

// Mask pointer as bytes (bool and uint8 share a layout), or nullptr where absent.
inline const uint8_t* mask_data(const c10::List<std::optional<at::Tensor>>& masks, size_t i) {
  if (masks.size() == 0) {
    return nullptr;
  }
  const std::optional<at::Tensor> mask = masks.get(i);
  return mask.has_value() ? static_cast<const uint8_t*>(mask->const_data_ptr()) : nullptr;
}

}  // namespace recallprune
