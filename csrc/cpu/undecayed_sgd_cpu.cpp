// CPU kernel of recallprune::undecayed_sgd_: one at::parallel_for over the chunks
// of every tensor in the lists, at::vec::Vectorized over each chunk.
#include "undecayed_sgd.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
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

// Raw pointers of one parameter's lists; absent lists and masks are nullptr.
template <typename scalar_t, typename opmath_t>
struct TensorPointers {
  scalar_t* param;
  const scalar_t* grad;
  scalar_t* momentum_buffer;
  const uint8_t* keep_mask;
  const uint8_t* decay_mask;
  opmath_t* grad_sum;
};

// Bytes of a mask -> a lane mask (all bits set where the byte is non-zero).
template <typename T>
inline at::vec::Vectorized<T> load_mask(const uint8_t* mask) {
  using Vec = at::vec::Vectorized<T>;
  alignas(64) T lanes[Vec::size()];
  for (int j = 0; j < Vec::size(); ++j) {
    lanes[j] = mask[j] ? T(1) : T(0);
  }
  return Vec::loadu(lanes) != Vec(T(0));
}

// Vectorised body for float and double: the same update as undecayed_sgd_element.
template <typename T>
int64_t update_vectorized(const TensorPointers<T, T>& p, int64_t begin, int64_t end,
                          const SgdScalars<T>& s, const T* grad_scale) {
  using Vec = at::vec::Vectorized<T>;
  const Vec zero(T(0));
  const Vec neg_lr(s.neg_lr), momentum(s.momentum), one_minus_dampening(s.one_minus_dampening),
      weight_decay(s.weight_decay);
  int64_t i = begin;
  for (; i + Vec::size() <= end; i += Vec::size()) {
    Vec grad = Vec::loadu(p.grad + i);
    if (grad_scale != nullptr) {
      grad = grad / Vec(*grad_scale);
    }
    const Vec w = Vec::loadu(p.param + i);
    const bool masked = p.keep_mask != nullptr;
    const Vec keep = masked ? load_mask<T>(p.keep_mask + i) : zero;
    if (p.grad_sum != nullptr) {
      const Vec old_sum = Vec::loadu(p.grad_sum + i);
      const Vec new_sum = old_sum + grad;
      (masked ? Vec::blendv(old_sum, new_sum, keep) : new_sum).store(p.grad_sum + i);
    }
    Vec g = s.maximize ? grad.neg() : grad;
    if (s.has_weight_decay) {
      const Vec decayed = at::vec::fmadd(w, weight_decay, g);
      g = p.decay_mask != nullptr ? Vec::blendv(g, decayed, load_mask<T>(p.decay_mask + i))
                                  : decayed;
    }
    if (s.has_momentum) {
      Vec buf = s.is_first_step
                    ? g
                    : at::vec::fmadd(g, one_minus_dampening,
                                     Vec::loadu(p.momentum_buffer + i) * momentum);
      g = s.nesterov ? at::vec::fmadd(buf, momentum, g) : buf;
      if (masked) {
        buf = Vec::blendv(zero, buf, keep);
      }
      buf.store(p.momentum_buffer + i);
    }
    Vec new_w = at::vec::fmadd(g, neg_lr, w);
    if (masked) {
      new_w = Vec::blendv(zero, new_w, keep);
    }
    new_w.store(p.param + i);
  }
  return i;
}

template <typename scalar_t>
void update_range(const TensorPointers<scalar_t, at::opmath_type<scalar_t>>& p, int64_t begin,
                  int64_t end, const SgdScalars<at::opmath_type<scalar_t>>& s,
                  const at::opmath_type<scalar_t>* grad_scale) {
  using opmath_t = at::opmath_type<scalar_t>;
  int64_t i = begin;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    i = update_vectorized<scalar_t>(p, begin, end, s, grad_scale);
  }
  // Scalar tail (and the whole range for fp16/bf16, computed in float).
  for (; i < end; ++i) {
    if (p.keep_mask != nullptr && !p.keep_mask[i]) {
      p.param[i] = scalar_t(0);
      if (s.has_momentum) {
        p.momentum_buffer[i] = scalar_t(0);
      }
      continue;
    }
    opmath_t grad = static_cast<opmath_t>(p.grad[i]);
    if (grad_scale != nullptr) {
      grad = grad / *grad_scale;
    }
    if (p.grad_sum != nullptr) {
      p.grad_sum[i] += grad;
    }
    opmath_t buf = s.has_momentum && !s.is_first_step
                       ? static_cast<opmath_t>(p.momentum_buffer[i])
                       : opmath_t(0);
    const bool decay = p.decay_mask == nullptr || p.decay_mask[i];
    p.param[i] = static_cast<scalar_t>(
        undecayed_sgd_element<opmath_t>(static_cast<opmath_t>(p.param[i]), grad, buf, decay, s));
    if (s.has_momentum) {
      p.momentum_buffer[i] = static_cast<scalar_t>(buf);
    }
  }
}

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

  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t first, int64_t last) {
    for (int64_t w = first; w < last; ++w) {
      const WorkItem& item = work[w];
      const size_t t = static_cast<size_t>(item.tensor);
      AT_DISPATCH_FLOATING_TYPES_AND2(
          at::kHalf, at::kBFloat16, params[t].scalar_type(), "undecayed_sgd_cpu_", [&] {
            using opmath_t = at::opmath_type<scalar_t>;
            const TensorPointers<scalar_t, opmath_t> pointers{
                params[t].data_ptr<scalar_t>(),
                grads[t].const_data_ptr<scalar_t>(),
                momentum_buffers.empty() ? nullptr : momentum_buffers[t].data_ptr<scalar_t>(),
                keep_ptrs[t],
                decay_ptrs[t],
                grad_sums.empty() ? nullptr : grad_sums[t].data_ptr<opmath_t>()};
            const SgdScalars<opmath_t> scalars(lr, momentum, dampening, weight_decay, nesterov,
                                               maximize, is_first_step);
            const opmath_t scale_value = scale.has_value() ? opmath_t(*scale) : opmath_t(1);
            update_range<scalar_t>(pointers, item.begin, item.end, scalars,
                                   scale.has_value() ? &scale_value : nullptr);
          });
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(recallprune, CPU, m) {
  m.impl("undecayed_sgd_", &undecayed_sgd_cpu_);
}

}  // namespace recallprune
