// CPU kernel of recallprune::undecayed_sgd_: one at::parallel_for over the chunks
// of every tensor in the lists; the loop over a range of chunks, for the parameter's dtype
// and this CPU's instruction set, is in kernels.inl.
#include "kernels.h"
#include "undecayed_sgd.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
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

// The lists of one step, the masks as pointers gathered once: the parallel loop touches no
// IValues.
struct Lists {
  at::TensorList params;
  at::TensorList grads;
  at::TensorList momentum_buffers;
  std::vector<const uint8_t*> keep_masks;
  bool keep_bits;  // the keep masks hold a bit per element (keep_masks_packed)
  std::vector<const uint8_t*> decay_masks;
  at::TensorList grad_sums;

  // One work item's pointers for a kernel whose elements are scalar_t (fp16 and bf16 as their
  // bits) and whose sums are opmath_t.
  template <typename scalar_t, typename opmath_t = scalar_t>
  cpu::SgdRange<scalar_t, opmath_t> range(const WorkItem& item) const {
    const size_t t = static_cast<size_t>(item.tensor);
    return {static_cast<scalar_t*>(params[t].data_ptr()),
            static_cast<const scalar_t*>(grads[t].const_data_ptr()),
            momentum_buffers.empty() ? nullptr
                                     : static_cast<scalar_t*>(momentum_buffers[t].data_ptr()),
            keep_masks[t],
            keep_bits,
            decay_masks[t],
            grad_sums.empty() ? nullptr : static_cast<opmath_t*>(grad_sums[t].data_ptr()),
            item.begin,
            item.end};
  }
};

// One work item through this CPU's kernel for the parameter's dtype.
void update(const cpu::KernelTable& kernels, const Lists& lists, const WorkItem& item,
            const cpu::SgdHyper& hyper) {
  const auto dtype = lists.params[static_cast<size_t>(item.tensor)].scalar_type();
  switch (dtype) {
    case at::kFloat:
      return kernels.sgd_float(lists.range<float>(item), hyper);
    case at::kDouble:
      return kernels.sgd_double(lists.range<double>(item), hyper);
    case at::kHalf:
      return kernels.sgd_half(lists.range<uint16_t, float>(item), hyper);
    case at::kBFloat16:
      return kernels.sgd_bfloat16(lists.range<uint16_t, float>(item), hyper);
    default:  // check_undecayed_sgd_args lets no other dtype through
      TORCH_CHECK(false, "undecayed_sgd_ (CPU kernel): no kernel for ", dtype);
  }
}

void undecayed_sgd_cpu_(at::TensorList params, at::TensorList grads,
                        at::TensorList momentum_buffers,
                        const c10::List<std::optional<at::Tensor>>& keep_masks,
                        const c10::List<std::optional<at::Tensor>>& decay_masks,
                        at::TensorList grad_sums, double lr, double momentum, double dampening,
                        double weight_decay, bool nesterov, bool maximize, bool is_first_step,
                        const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf, bool keep_masks_packed) {
  check_undecayed_sgd_args(params, grads, momentum_buffers, keep_masks, decay_masks, grad_sums,
                           momentum, grad_scale, found_inf, keep_masks_packed);
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

  Lists lists{params, grads, momentum_buffers, {}, keep_masks_packed, {}, grad_sums};
  std::vector<WorkItem> work;
  for (size_t t = 0; t < params.size(); ++t) {
    lists.keep_masks.push_back(mask_data(keep_masks, t));
    lists.decay_masks.push_back(mask_data(decay_masks, t));
    const int64_t numel = params[t].numel();
    for (int64_t begin = 0; begin < numel; begin += kChunk) {
      work.push_back({static_cast<int64_t>(t), begin, std::min(numel, begin + kChunk)});
    }
  }

  const cpu::SgdHyper hyper{lr,       momentum, dampening,     weight_decay,
                            nesterov, maximize, is_first_step, scale.has_value() ? &*scale : nullptr};
  const auto& kernels = cpu::kernels();
  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t first, int64_t last) {
    // A thread's consecutive chunks of one tensor run as one range: one long pass streams
    // faster than many short ones (about 4% at 16M elements, one AVX-512 thread of a Zen 4).
    // The ranges still break at multiples of kChunk, so every element takes the vector or
    // the scalar path whatever the number of threads, and the results stay the same.
    for (int64_t w = first; w < last;) {
      WorkItem range = work[w];
      while (++w < last && work[w].tensor == range.tensor) {
        range.end = work[w].end;
      }
      update(kernels, lists, range, hyper);
    }
  });
}

// On the CPU, tensor hyper-parameters cost nothing to read.
void undecayed_sgd_cpu_tensor_(at::TensorList params, at::TensorList grads,
                               at::TensorList momentum_buffers,
                               const c10::List<std::optional<at::Tensor>>& keep_masks,
                               const c10::List<std::optional<at::Tensor>>& decay_masks,
                               at::TensorList grad_sums, const at::Tensor& lr, double momentum,
                               double dampening, const at::Tensor& weight_decay, bool nesterov,
                               bool maximize, bool is_first_step,
                               const std::optional<at::Tensor>& grad_scale,
                               const std::optional<at::Tensor>& found_inf,
                               bool keep_masks_packed) {
  check_scalar_tensor(lr, "lr", params);
  check_scalar_tensor(weight_decay, "weight_decay", params);
  undecayed_sgd_cpu_(params, grads, momentum_buffers, keep_masks, decay_masks, grad_sums,
                     lr.item<double>(), momentum, dampening, weight_decay.item<double>(),
                     nesterov, maximize, is_first_step, grad_scale, found_inf,
                     keep_masks_packed);
}

}  // namespace

TORCH_LIBRARY_IMPL(recallprune, CPU, m) {
  m.impl("undecayed_sgd_", &undecayed_sgd_cpu_);
  m.impl("undecayed_sgd_.tensor", &undecayed_sgd_cpu_tensor_);
}

}  // namespace recallprune
