// The UndecayedSGD update of one element, shared by the CPU kernels (every instruction set,
// every dtype) and the CUDA kernel, so that the arithmetic the GPU runs is the one the CPU
// tests exercise. It includes c10/macros only: the per-instruction-set files, compiled with
// flags of their own, include it without pulling in code that other files share.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace recallprune {
// Internal linkage on purpose: the CPU kernels are compiled once per instruction set
// (csrc/cpu/kernels_*.cpp), and each copy of this math must stay in its own object.
namespace {

// The scalars of one step in the math type of the tensors (float for fp32/fp16/bf16): the
// hyper-parameters, and the AMP gradient scale where the kernel has read one.
template <typename opmath_t>
struct SgdScalars {
  opmath_t neg_lr;
  opmath_t momentum;
  opmath_t one_minus_dampening;
  opmath_t weight_decay;
  opmath_t grad_scale = 1;  // gradients are divided by it where has_grad_scale
  bool nesterov;
  bool maximize;
  bool is_first_step;
  bool has_momentum;
  bool has_weight_decay;
  bool has_grad_scale = false;

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
// `grad` is already unscaled. Returns the new weight; updates `buf` in place. The CPU's
// vectorised loop (csrc/cpu/kernels.inl) is the same steps on whole vectors.
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

// Element i of one parameter's arrays, in their storage type (fp16/bf16 computed in float):
// a pruned weight (keep false) and its momentum become zero; a kept one has its gradient
// unscaled and added to `grad_sum` (nullptr unless the undecayed gradient is summed), then
// takes the update above. `momentum_buffer` is read and written only when momentum is on.
template <typename scalar_t, typename opmath_t>
C10_HOST_DEVICE inline void undecayed_sgd_update(int64_t i, scalar_t* param, const scalar_t* grad,
                                                 scalar_t* momentum_buffer, opmath_t* grad_sum,
                                                 bool keep, bool decay,
                                                 const SgdScalars<opmath_t>& s) {
  if (!keep) {
    param[i] = scalar_t(0);
    if (s.has_momentum) {
      momentum_buffer[i] = scalar_t(0);
    }
    return;
  }
  opmath_t g = static_cast<opmath_t>(grad[i]);
  if (s.has_grad_scale) {
    g = g / s.grad_scale;
  }
  if (grad_sum != nullptr) {
    grad_sum[i] += g;
  }
  opmath_t buf = s.has_momentum && !s.is_first_step ? static_cast<opmath_t>(momentum_buffer[i])
                                                    : opmath_t(0);
  param[i] = static_cast<scalar_t>(
      undecayed_sgd_element<opmath_t>(static_cast<opmath_t>(param[i]), g, buf, decay, s));
  if (s.has_momentum) {
    momentum_buffer[i] = static_cast<scalar_t>(buf);
  }
}

}  // namespace
}  // namespace recallprune
