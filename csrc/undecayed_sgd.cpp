// recallprune::undecayed_sgd_: its schemas and the argument checks shared by the CPU and
// CUDA kernels (csrc/cpu/undecayed_sgd_cpu.cpp, csrc/cuda/undecayed_sgd_cuda.cu).
#include "undecayed_sgd.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

namespace recallprune {

TORCH_LIBRARY_FRAGMENT(recallprune, m) {
  // One fused UndecayedSGD step over lists of tensors (see recallprune/optim/functional.py).
  // keep_masks / decay_masks: empty, or one optional bool/uint8 mask per parameter; with
  // keep_masks_packed (the CPU kernel only), each keep mask holds one bit per element instead
  // of a byte: bit e % 8 of byte e / 8 for element e in memory order.
  // momentum_buffers: empty when momentum == 0. grad_sums: empty unless the undecayed
  // gradient is being accumulated.
  m.def(
      "undecayed_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor?[] keep_masks, Tensor?[] decay_masks, Tensor(c!)[] grad_sums, *, float lr, "
      "float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, "
      "bool is_first_step, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "bool keep_masks_packed=False) -> ()");
  // The same with the learning rate and the weight decay as one-element float32/float64
  // tensors (as torch's _fused_sgd_.tensor_lr takes lr): each is read on the host when it is
  // on the CPU, and by the kernel when it is on the parameters' GPU (no host synchronisation).
  m.def(
      "undecayed_sgd_.tensor(Tensor(a!)[] params, Tensor[] grads, "
      "Tensor(b!)[] momentum_buffers, Tensor?[] keep_masks, Tensor?[] decay_masks, "
      "Tensor(c!)[] grad_sums, *, Tensor lr, float momentum, float dampening, "
      "Tensor weight_decay, bool nesterov, bool maximize, bool is_first_step, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, bool keep_masks_packed=False) -> ()");
}

namespace {

// Whether `other` (of the parameter's shape) lays its elements out in memory as `param`
// does: both dense and non-overlapping, with the same strides wherever a dimension has more
// than one element. The kernels then walk both as flat arrays from their data pointers
// (contiguous tensors, and channels_last ones alike).
bool same_layout(const at::Tensor& param, const at::Tensor& other) {
  if (!other.is_non_overlapping_and_dense()) {
    return false;
  }
  for (int64_t d = 0; d < param.dim(); ++d) {
    if (param.size(d) > 1 && param.stride(d) != other.stride(d)) {
      return false;
    }
  }
  return true;
}

void check_same_tensor(const at::Tensor& param, const at::Tensor& other, const char* what,
                       size_t i) {
  TORCH_CHECK(other.device() == param.device(), "undecayed_sgd_: ", what, "[", i,
              "] must be on the parameter's device ", param.device(), ", got ", other.device());
  TORCH_CHECK(other.sizes() == param.sizes(), "undecayed_sgd_: ", what, "[", i,
              "] must have the parameter's shape ", param.sizes(), ", got ", other.sizes());
  TORCH_CHECK(!other.is_sparse() && same_layout(param, other), "undecayed_sgd_: ", what, "[",
              i, "] must be a dense tensor with the parameter's memory layout (strides ",
              param.strides(), "), got strides ", other.strides());
}

void check_masks(const c10::List<std::optional<at::Tensor>>& masks, at::TensorList params,
                 const char* what, bool packed = false) {
  TORCH_CHECK(masks.size() == 0 || masks.size() == params.size(), "undecayed_sgd_: ", what,
              " must be empty or hold one entry per parameter (", params.size(), "), got ",
              masks.size());
  for (size_t i = 0; i < masks.size(); ++i) {
    const std::optional<at::Tensor> mask = masks.get(i);
    if (!mask.has_value()) {
      continue;
    }
    if (packed) {
      const int64_t bytes = (params[i].numel() + 7) / 8;
      TORCH_CHECK(mask->scalar_type() == at::kByte && mask->dim() == 1 &&
                      mask->numel() == bytes && mask->is_contiguous() &&
                      mask->device() == params[i].device(),
                  "undecayed_sgd_: packed ", what, "[", i, "] must be a contiguous uint8 [",
                  bytes, "] on ", params[i].device(), " (one bit per element), got ",
                  mask->scalar_type(), " ", mask->sizes(), " on ", mask->device());
      continue;
    }
    TORCH_CHECK(mask->scalar_type() == at::kBool || mask->scalar_type() == at::kByte,
                "undecayed_sgd_: ", what, "[", i, "] must be bool or uint8, got ",
                mask->scalar_type());
    check_same_tensor(params[i], *mask, what, i);
  }
}

}  // namespace

void check_undecayed_sgd_args(at::TensorList params, at::TensorList grads,
                              at::TensorList momentum_buffers,
                              const c10::List<std::optional<at::Tensor>>& keep_masks,
                              const c10::List<std::optional<at::Tensor>>& decay_masks,
                              at::TensorList grad_sums, double momentum,
                              const std::optional<at::Tensor>& grad_scale,
                              const std::optional<at::Tensor>& found_inf,
                              bool keep_masks_packed) {
  TORCH_CHECK(grads.size() == params.size(), "undecayed_sgd_: expected one gradient per parameter (",
              params.size(), "), got ", grads.size());
  TORCH_CHECK(momentum == 0.0 ? momentum_buffers.empty()
                              : momentum_buffers.size() == params.size(),
              "undecayed_sgd_: momentum_buffers must be empty when momentum is 0 and hold one "
              "buffer per parameter otherwise (",
              params.size(), " parameters, momentum ", momentum, "), got ",
              momentum_buffers.size());
  TORCH_CHECK(grad_sums.empty() || grad_sums.size() == params.size(),
              "undecayed_sgd_: grad_sums must be empty or hold one tensor per parameter (",
              params.size(), "), got ", grad_sums.size());
  check_masks(keep_masks, params, "keep_masks", keep_masks_packed);
  check_masks(decay_masks, params, "decay_masks");

  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& param = params[i];
    const auto dtype = param.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                    dtype == at::kBFloat16,
                "undecayed_sgd_: params[", i,
                "] must be float32, float64, float16 or bfloat16, got ", dtype);
    TORCH_CHECK(param.device() == params[0].device(),
                "undecayed_sgd_: all parameters must be on one device, params[0] is on ",
                params[0].device(), " and params[", i, "] on ", param.device());
    TORCH_CHECK(!param.is_sparse() && param.is_non_overlapping_and_dense(),
                "undecayed_sgd_: params[", i,
                "] must be dense and non-overlapping (contiguous in some memory format), got "
                "strides ",
                param.strides(), " for shape ", param.sizes());
    TORCH_CHECK(!grads[i].is_sparse(), "undecayed_sgd_: grads[", i,
                "] is sparse; the fused kernels take dense gradients only (use "
                "backend='reference' for sparse gradients)");
    check_same_tensor(param, grads[i], "grads", i);
    TORCH_CHECK(grads[i].scalar_type() == param.scalar_type(), "undecayed_sgd_: grads[", i,
                "] must have the parameter's dtype ", param.scalar_type(), ", got ",
                grads[i].scalar_type());
    if (!momentum_buffers.empty()) {
      check_same_tensor(param, momentum_buffers[i], "momentum_buffers", i);
      TORCH_CHECK(momentum_buffers[i].scalar_type() == param.scalar_type(),
                  "undecayed_sgd_: momentum_buffers[", i, "] must have the parameter's dtype ",
                  param.scalar_type(), ", got ", momentum_buffers[i].scalar_type());
    }
    if (!grad_sums.empty()) {
      check_same_tensor(param, grad_sums[i], "grad_sums", i);
      const auto expected = param.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
      TORCH_CHECK(grad_sums[i].scalar_type() == expected, "undecayed_sgd_: grad_sums[", i,
                  "] must be ", expected, " for a ", param.scalar_type(), " parameter, got ",
                  grad_sums[i].scalar_type());
    }
  }
  for (const auto* scalar : {&grad_scale, &found_inf}) {
    if (scalar->has_value()) {
      const char* name = scalar == &grad_scale ? "grad_scale" : "found_inf";
      TORCH_CHECK((*scalar)->numel() == 1 && (*scalar)->scalar_type() == at::kFloat,
                  "undecayed_sgd_: ", name, " must be a one-element float32 tensor, got ",
                  (*scalar)->scalar_type(), " with ", (*scalar)->numel(), " elements");
      TORCH_CHECK(params.empty() || (*scalar)->device() == params[0].device(),
                  "undecayed_sgd_: ", name, " must be on the parameters' device ",
                  params[0].device(), ", got ", (*scalar)->device());
    }
  }
}

void check_scalar_tensor(const at::Tensor& value, const char* name, at::TensorList params) {
  const bool float_dtype =
      value.scalar_type() == at::kFloat || value.scalar_type() == at::kDouble;
  TORCH_CHECK(value.numel() == 1 && float_dtype, "undecayed_sgd_: ", name,
              " must be a one-element float32 or float64 tensor, got ", value.scalar_type(),
              " with ", value.numel(), " elements");
  TORCH_CHECK(value.is_cpu() || params.empty() || value.device() == params[0].device(),
              "undecayed_sgd_: ", name, " must be on the CPU or on the parameters' device ",
              params[0].device(), ", got ", value.device());
}

}  // namespace recallprune
