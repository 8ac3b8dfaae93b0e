// The inner loops of the CPU kernels, written once with at::vec::Vectorized and compiled
// per instruction set: the including file defines CPU_CAPABILITY (and, for AVX2/AVX-512,
// CPU_CAPABILITY_AVX2 / CPU_CAPABILITY_AVX512 and the matching target pragma).
// Everything here lives in recallprune::cpu::CPU_CAPABILITY or has internal linkage, so
// the copies never mix.
#include "confusion.h"
#include "kernels.h"
#include "undecayed_sgd.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <type_traits>

namespace recallprune::cpu::CPU_CAPABILITY {
namespace {

// ---- UndecayedSGD ---------------------------------------------------------------------

// Bytes of a bool mask (0 or 1) -> a lane mask (all bits set where the byte is 1). The
// widening loop has no branch, so the compiler turns it into a few vector instructions and
// the cost does not depend on the mask's values.
template <typename T>
inline at::vec::Vectorized<T> load_mask(const uint8_t* mask) {
  using Vec = at::vec::Vectorized<T>;
  alignas(64) T lanes[Vec::size()];
  for (int j = 0; j < Vec::size(); ++j) {
    lanes[j] = static_cast<T>(mask[j]);
  }
  return Vec::loadu(lanes) != Vec(T(0));
}

// The same with the instruction set's own byte-to-lane widening.
#if defined(CPU_CAPABILITY_AVX512)
template <>
inline at::vec::Vectorized<float> load_mask<float>(const uint8_t* mask) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(mask));
  return _mm512_castsi512_ps(_mm512_movm_epi32(_mm_test_epi8_mask(bytes, bytes)));
}
template <>
inline at::vec::Vectorized<double> load_mask<double>(const uint8_t* mask) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(mask));
  return _mm512_castsi512_pd(
      _mm512_movm_epi64(static_cast<__mmask8>(_mm_test_epi8_mask(bytes, bytes))));
}
#elif defined(CPU_CAPABILITY_AVX2)
template <>
inline at::vec::Vectorized<float> load_mask<float>(const uint8_t* mask) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(mask));
  const __m256i lanes = _mm256_cvtepu8_epi32(bytes);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(lanes, _mm256_setzero_si256()));
}
template <>
inline at::vec::Vectorized<double> load_mask<double>(const uint8_t* mask) {
  int32_t word;
  std::memcpy(&word, mask, sizeof(word));
  const __m256i lanes = _mm256_cvtepu8_epi64(_mm_cvtsi32_si128(word));
  return _mm256_castsi256_pd(_mm256_cmpgt_epi64(lanes, _mm256_setzero_si256()));
}
#endif

// Vectorised body for float and double: the same steps as undecayed_sgd_element, with
// fused multiply-adds where torch's CPU kernels use them. The common switches (a keep mask,
// momentum, weight decay) are template parameters, so the hot loop carries no test of them.
// Returns where it stopped.
template <typename T, bool kMasked, bool kMomentum, bool kDecay>
int64_t sgd_vectorized(T* param, const T* grad, T* momentum_buffer, const uint8_t* keep_mask,
                       const uint8_t* decay_mask, T* grad_sum, int64_t begin, int64_t end,
                       const SgdScalars<T>& s, const T* grad_scale) {
  using Vec = at::vec::Vectorized<T>;
  const Vec zero(T(0));
  const Vec neg_lr(s.neg_lr), momentum(s.momentum), one_minus_dampening(s.one_minus_dampening),
      weight_decay(s.weight_decay);
  int64_t i = begin;
  for (; i + Vec::size() <= end; i += Vec::size()) {
    Vec g = Vec::loadu(grad + i);
    if (grad_scale != nullptr) {
      g = g / Vec(*grad_scale);
    }
    const Vec w = Vec::loadu(param + i);
    Vec keep;
    if constexpr (kMasked) {
      keep = load_mask<T>(keep_mask + i);
    }
    if (grad_sum != nullptr) {
      const Vec old_sum = Vec::loadu(grad_sum + i);
      const Vec new_sum = old_sum + g;
      if constexpr (kMasked) {
        Vec::blendv(old_sum, new_sum, keep).store(grad_sum + i);
      } else {
        new_sum.store(grad_sum + i);
      }
    }
    if (s.maximize) {
      g = g.neg();
    }
    if constexpr (kDecay) {
      const Vec decayed = at::vec::fmadd(w, weight_decay, g);
      g = decay_mask != nullptr ? Vec::blendv(g, decayed, load_mask<T>(decay_mask + i)) : decayed;
    }
    if constexpr (kMomentum) {
      Vec buf = s.is_first_step ? g
                                : at::vec::fmadd(g, one_minus_dampening,
                                                 Vec::loadu(momentum_buffer + i) * momentum);
      g = s.nesterov ? at::vec::fmadd(buf, momentum, g) : buf;
      if constexpr (kMasked) {
        buf = Vec::blendv(zero, buf, keep);
      }
      buf.store(momentum_buffer + i);
    }
    Vec new_w = at::vec::fmadd(g, neg_lr, w);
    if constexpr (kMasked) {
      new_w = Vec::blendv(zero, new_w, keep);
    }
    new_w.store(param + i);
  }
  return i;
}

// Picks the instantiation of sgd_vectorized for the switches of this step.
template <typename T>
int64_t sgd_vectorized_dispatch(T* param, const T* grad, T* momentum_buffer,
                                const uint8_t* keep_mask, const uint8_t* decay_mask, T* grad_sum,
                                int64_t begin, int64_t end, const SgdScalars<T>& s,
                                const T* grad_scale) {
  const auto run = [&](auto masked, auto with_momentum, auto decay) {
    return sgd_vectorized<T, decltype(masked)::value, decltype(with_momentum)::value,
                          decltype(decay)::value>(param, grad, momentum_buffer, keep_mask,
                                                  decay_mask, grad_sum, begin, end, s,
                                                  grad_scale);
  };
  const auto with_decay = [&](auto masked, auto with_momentum) {
    return s.has_weight_decay ? run(masked, with_momentum, std::true_type{})
                              : run(masked, with_momentum, std::false_type{});
  };
  const auto with_momentum = [&](auto masked) {
    return s.has_momentum ? with_decay(masked, std::true_type{})
                          : with_decay(masked, std::false_type{});
  };
  return keep_mask != nullptr ? with_momentum(std::true_type{}) : with_momentum(std::false_type{});
}

template <typename scalar_t>
void sgd_typed(const SgdRange& r, const SgdHyper& h) {
  using opmath_t = at::opmath_type<scalar_t>;
  auto* param = static_cast<scalar_t*>(r.param);
  const auto* grad = static_cast<const scalar_t*>(r.grad);
  auto* momentum_buffer = static_cast<scalar_t*>(r.momentum_buffer);
  auto* grad_sum = static_cast<opmath_t*>(r.grad_sum);
  const SgdScalars<opmath_t> s(h.lr, h.momentum, h.dampening, h.weight_decay, h.nesterov,
                               h.maximize, h.is_first_step);
  const opmath_t scale_value = h.grad_scale != nullptr ? opmath_t(*h.grad_scale) : opmath_t(1);
  const opmath_t* scale = h.grad_scale != nullptr ? &scale_value : nullptr;
  int64_t i = r.begin;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    i = sgd_vectorized_dispatch<scalar_t>(param, grad, momentum_buffer, r.keep_mask, r.decay_mask,
                                 grad_sum, r.begin, r.end, s, scale);
  }
  // Scalar tail (and the whole range for fp16/bf16, computed in float).
  for (; i < r.end; ++i) {
    if (r.keep_mask != nullptr && !r.keep_mask[i]) {
      param[i] = scalar_t(0);
      if (s.has_momentum) {
        momentum_buffer[i] = scalar_t(0);
      }
      continue;
    }
    opmath_t g = static_cast<opmath_t>(grad[i]);
    if (scale != nullptr) {
      g = g / *scale;
    }
    if (grad_sum != nullptr) {
      grad_sum[i] += g;
    }
    opmath_t buf = s.has_momentum && !s.is_first_step ? static_cast<opmath_t>(momentum_buffer[i])
                                                      : opmath_t(0);
    const bool decay = r.decay_mask == nullptr || r.decay_mask[i];
    param[i] = static_cast<scalar_t>(
        undecayed_sgd_element<opmath_t>(static_cast<opmath_t>(param[i]), g, buf, decay, s));
    if (s.has_momentum) {
      momentum_buffer[i] = static_cast<scalar_t>(buf);
    }
  }
}

void sgd_update(const SgdRange& r, const SgdHyper& h) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.dtype, "undecayed_sgd_cpu_",
                                  [&] { sgd_typed<scalar_t>(r, h); });
}

// ---- argmax ---------------------------------------------------------------------------

// First index of the maximum of x[0..n) (NaN largest, first on ties), vectorised.
template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
  using Vec = at::vec::Vectorized<T>;
  if (n < 2 * Vec::size()) {
    int64_t best = 0;
    for (int64_t c = 1; c < n; ++c) {
      if (argmax_takes(x[c], x[best])) best = c;
    }
    return best;
  }
  // Pass 1: the maximum (at::vec::maximum propagates NaN).
  Vec running = Vec::loadu(x);
  int64_t c = Vec::size();
  for (; c + Vec::size() <= n; c += Vec::size()) {
    running = at::vec::maximum(running, Vec::loadu(x + c));
  }
  alignas(64) T lanes[Vec::size()];
  running.store(lanes);
  T top = lanes[0];
  for (int j = 1; j < Vec::size(); ++j) {
    if (argmax_takes(lanes[j], top)) top = lanes[j];
  }
  for (; c < n; ++c) {
    if (argmax_takes(x[c], top)) top = x[c];
  }
  if (std::isnan(top)) {
    for (int64_t i = 0; i < n; ++i) {
      if (std::isnan(x[i])) return i;
    }
  }
  // Pass 2 (the row is in L1 now): the first lane equal to the maximum.
  const Vec target(top);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    // zero_mask(): bit j set where lane j is zero, i.e. where x != top.
    const uint64_t not_equal = static_cast<uint64_t>((Vec::loadu(x + i) == target).zero_mask());
    const uint64_t all_lanes = (uint64_t{1} << Vec::size()) - 1;
    const uint64_t equal = ~not_equal & all_lanes;
    if (equal != 0) return i + std::countr_zero(equal);
  }
  for (; i < n; ++i) {
    if (x[i] == top) return i;
  }
  return 0;  // unreachable: top came from the row
}

// Rows shorter than this take the gather argmax below (class indices stay exact in T).
constexpr int64_t kGatherClasses = 256;

// Argmax of Vec::size() short rows at once: lane j walks row j through a strided gather,
// so the compares are vector-wide and branch-free.
template <typename T>
void argmax_short_rows(const T* x, int64_t num_classes, int64_t rows, int64_t* out) {
  using Vec = at::vec::Vectorized<T>;
  using IndexVec = at::vec::Vectorized<at::vec::int_same_size_t<T>>;
  const IndexVec row_offsets = IndexVec::arange(0, num_classes);
  int64_t r = 0;
  for (; r + Vec::size() <= rows; r += Vec::size()) {
    const T* block = x + r * num_classes;
    Vec best = at::vec::gather<sizeof(T)>(block, row_offsets);
    Vec index(T(0));  // class indices below kGatherClasses are exact in T
    for (int64_t c = 1; c < num_classes; ++c) {
      const Vec value = at::vec::gather<sizeof(T)>(block + c, row_offsets);
      const Vec take = (value > best) | ((value != value) & (best == best));
      best = Vec::blendv(best, value, take);
      index = Vec::blendv(index, Vec(static_cast<T>(c)), take);
    }
    alignas(64) T lanes[Vec::size()];
    index.store(lanes);
    for (int j = 0; j < Vec::size(); ++j) out[r + j] = static_cast<int64_t>(lanes[j]);
  }
  for (; r < rows; ++r) {
    const T* row = x + r * num_classes;
    int64_t best = 0;
    for (int64_t c = 1; c < num_classes; ++c) {
      if (argmax_takes(row[c], row[best])) best = c;
    }
    out[r] = best;
  }
}

// Rows [0, rows) of [rows, C, S] logits.
template <typename T>
void argmax_rows(const T* logits, int64_t num_classes, int64_t inner, int64_t rows,
                 int64_t* pred) {
  if (inner == 1) {
    if (num_classes < kGatherClasses) {
      argmax_short_rows(logits, num_classes, rows, pred);
    } else {
      for (int64_t r = 0; r < rows; ++r) {
        pred[r] = argmax_row(logits + r * num_classes, num_classes);
      }
    }
    return;
  }
  // S > 1: the argmax over c runs along a whole (contiguous) row of s at once.
  constexpr int64_t kTile = 256;
  T best[kTile];
  for (int64_t n = 0; n < rows; ++n) {
    const T* sample = logits + n * num_classes * inner;
    for (int64_t s0 = 0; s0 < inner; s0 += kTile) {
      const int64_t width = std::min(kTile, inner - s0);
      int64_t* out = pred + n * inner + s0;
      for (int64_t s = 0; s < width; ++s) {
        best[s] = sample[s0 + s];
        out[s] = 0;
      }
      for (int64_t c = 1; c < num_classes; ++c) {
        const T* row = sample + c * inner + s0;
        for (int64_t s = 0; s < width; ++s) {
          const bool take = argmax_takes(row[s], best[s]);
          best[s] = take ? row[s] : best[s];
          out[s] = take ? c : out[s];
        }
      }
    }
  }
}

template <typename scalar_t>
void argmax_typed(const ArgmaxBlock& b) {
  const auto* logits =
      static_cast<const scalar_t*>(b.logits) + b.n0 * b.num_classes * b.inner;
  const int64_t rows = b.n1 - b.n0;
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    argmax_rows(logits, b.num_classes, b.inner, rows, b.pred);
  } else {
    // fp16/bf16: widen a few rows at a time to float (exact, so the argmax is unchanged).
    constexpr int64_t kBuffer = 16384;
    float converted[kBuffer];
    const int64_t row_values = b.num_classes * b.inner;
    const int64_t step = std::max<int64_t>(1, kBuffer / row_values);
    if (row_values > kBuffer) {
      // A row too long for the buffer: compare in the storage type (same order as float).
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t* sample = logits + r * row_values;
        for (int64_t s = 0; s < b.inner; ++s) {
          int64_t best = 0;
          for (int64_t c = 1; c < b.num_classes; ++c) {
            if (argmax_takes(static_cast<float>(sample[c * b.inner + s]),
                             static_cast<float>(sample[best * b.inner + s]))) {
              best = c;
            }
          }
          b.pred[r * b.inner + s] = best;
        }
      }
      return;
    }
    for (int64_t r = 0; r < rows; r += step) {
      const int64_t count = std::min(step, rows - r);
      at::vec::convert(logits + r * row_values, converted, count * row_values);
      argmax_rows(converted, b.num_classes, b.inner, count, b.pred + r * b.inner);
    }
  }
}

void argmax(const ArgmaxBlock& b) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.dtype, "confusion_argmax",
                                  [&] { argmax_typed<scalar_t>(b); });
}

}  // namespace

const KernelTable* table() {
  static const KernelTable kernels{C10_STRINGIZE(CPU_CAPABILITY), &sgd_update, &argmax};
  return &kernels;
}

}  // namespace recallprune::cpu::CPU_CAPABILITY
