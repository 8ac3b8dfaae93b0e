// CPU kernel of recallprune::undecayed_sgd_: one at::parallel_for over the chunks
// of every tensor in the lists; the vectorised loop over a chunk is in kernels.inl.
#include "kernels.h"
#include "undecayed_sgd.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

namespace recallprune {
namespace {

// Elements per unit of parallel work: large enough to amortise scheduling, small
// enough to balance many mid-sized tensors over the threads.
constexpr int64_t kChunk = 1 << 15;

struct WorkItem {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

void undecayed_sgd_cpu_(at::TensorList params, at::TensorList grads,
                        at::TensorList momentum_buffers,
                        const c10::List<std::optional<at::Tensor>>& keep_masks,
                        const c10::List<std::optional<at::Tensor>>& decay_masks,
                        at::TensorList grad_sums, double lr, double momentum, double dampening,
                        double weight_decay, bool nesterov, bool maximize, bool is_first_step,
                        const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf) {
  check_undecayed_sgd_args(params, grads, momentum_buffers, keep_masks, decay_masks, grad_sums,
                           momentum, grad_scale, found_inf);
  for (const auto& param : params) {
    TORCH_CHECK(param.device().is_cpu(), "undecayed_sgd_ (CPU kernel): expected CPU tensors, got ",
                param.device());
  }
  // On the CPU, reading found_inf costs nothing: skip the whole step on an overflow.
  if (found_inf.has_value() && found_inf->item<float>() != 0.0f) {
    return;
  }
  const std::optional<float> scale =
      grad_scale.has_value() ? std::optional<float>(grad_scale->item<float>()) : std::nullopt;

  // Mask pointers gathered once: the parallel loop touches no IValues.
  std::vector<const uint8_t*> keep_ptrs(params.size()), decay_ptrs(params.size());
  std::vector<WorkItem> work;
  for (size_t t = 0; t < params.size(); ++t) {
    keep_ptrs[t] = mask_data(keep_masks, t);
    decay_ptrs[t] = mask_data(decay_masks, t);
    const int64_t numel = params[t].numel();
    for (int64_t begin = 0; begin < numel; begin += kChunk) {
      work.push_back({static_cast<int64_t>(t), begin, std::min(numel, begin + kChunk)});
    }
  }

  const cpu::SgdHyper hyper{lr,       momentum, dampening,     weight_decay,
                            nesterov, maximize, is_first_step, scale.has_value() ? &*scale : nullptr};
  const auto& kernels = cpu::kernels();
  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t w = first; w < last; ++w) {
      const WorkItem& item = work[w];
      const size_t t = static_cast<size_t>(item.tensor);
      const cpu::SgdRange range{
          params[t].scalar_type(),
          params[t].data_ptr(),
          grads[t].const_data_ptr(),
          momentum_buffers.empty() ? nullptr : momentum_buffers[t].data_ptr(),
          keep_ptrs[t],
          decay_ptrs[t],
          grad_sums.empty() ? nullptr : grad_sums[t].data_ptr(),
          item.begin,
          item.end};
      kernels.sgd_update(range, hyper);
    }
  });
}

// On the CPU a tensor learning rate costs nothing to read.
void undecayed_sgd_cpu_tensor_lr_(at::TensorList params, at::TensorList grads,
                                  at::TensorList momentum_buffers,
                                  const c10::List<std::optional<at::Tensor>>& keep_masks,
                                  const c10::List<std::optional<at::Tensor>>& decay_masks,
                                  at::TensorList grad_sums, const at::Tensor& lr, double momentum,
                                  double dampening, double weight_decay, bool nesterov,
                                  bool maximize, bool is_first_step,
                                  const std::optional<at::Tensor>& grad_scale,
                                  const std::optional<at::Tensor>& found_inf) {
  check_lr_tensor(lr, params);
  undecayed_sgd_cpu_(params, grads, momentum_buffers, keep_masks, decay_masks, grad_sums,
                     lr.item<double>(), momentum, dampening, weight_decay, nesterov, maximize,
                     is_first_step, grad_scale, found_inf);
}

}  // namespace

TORCH_LIBRARY_IMPL(recallprune, CPU, m) {
  m.impl("undecayed_sgd_", &undecayed_sgd_cpu_);
  m.impl("undecayed_sgd_.tensor_lr", &undecayed_sgd_cpu_tensor_lr_);
}

}  // namespace recallprune
