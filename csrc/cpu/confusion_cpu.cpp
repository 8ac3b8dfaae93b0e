// CPU kernel of recallprune::confusion_update_: per-thread histograms (or relaxed atomic
// increments where C*C bins per thread would not fit in cache), the vectorised row argmax
// of kernels.inl, and one reduction at the end.
#include "confusion.h"
#include "kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace recallprune {
namespace {

// Logit values per unit of parallel work (and per block of predicted labels): large enough
// to amortise scheduling, small enough that a few thousand rows of 1000 classes still
// spread over the threads.
constexpr int64_t kValuesPerTask = 1 << 16;
// Largest C*C for private per-thread histograms (4 copies each, to break the store-to-load
// dependency of consecutive increments of one bin): 4 * 4096 * 8 B = 128 KiB per thread.
constexpr int64_t kPrivateBins = 4096;
constexpr int64_t kCopies = 4;
// Counts per cache line: each thread's histograms start on a line of their own, so that no
// two threads write one line.
constexpr int64_t kLineCounts = 64 / sizeof(int64_t);

// Counts entries [0, n) of a block into the kCopies private histograms at `hist` (entry i
// into copy i % kCopies), or into `shared` with atomic increments when `hist` is null;
// returns the number of invalid entries. The switches are template parameters, so that the
// loop tests none of them.
template <bool kIgnore, bool kPrivate, typename label_t, typename pred_t>
int64_t count_block(const label_t* truth, const pred_t* pred, int64_t n, int64_t num_classes,
                    int64_t ignore, int64_t* hist, int64_t bins, int64_t* shared) {
  int64_t bad = 0;
  const auto count = [&](int64_t i, int64_t* copy) {
    const int64_t t = static_cast<int64_t>(truth[i]);
    if (kIgnore && t == ignore) return;
    const int64_t p = static_cast<int64_t>(pred[i]);
    // One unsigned compare per label checks both bounds.
    if (static_cast<uint64_t>(t) >= static_cast<uint64_t>(num_classes) ||
        static_cast<uint64_t>(p) >= static_cast<uint64_t>(num_classes)) {
      ++bad;
      return;
    }
    if constexpr (kPrivate) {
      ++copy[t * num_classes + p];
    } else {
      std::atomic_ref<int64_t>(shared[t * num_classes + p])
          .fetch_add(1, std::memory_order_relaxed);
    }
  };
  int64_t i = 0;
  for (; i + kCopies <= n; i += kCopies) {
    for (int64_t k = 0; k < kCopies; ++k) count(i + k, hist + k * bins);
  }
  for (; i < n; ++i) count(i, hist);
  return bad;
}

template <typename label_t, typename pred_t>
int64_t count_block(bool has_ignore, bool private_bins, const label_t* truth, const pred_t* pred,
                    int64_t n, int64_t num_classes, int64_t ignore, int64_t* hist,
                    int64_t* shared) {
  const auto run = [&](auto with_ignore, auto with_private) {
    return count_block<decltype(with_ignore)::value, decltype(with_private)::value>(
        truth, pred, n, num_classes, ignore, hist, num_classes * num_classes, shared);
  };
  if (has_ignore) {
    return private_bins ? run(std::true_type{}, std::true_type{})
                        : run(std::true_type{}, std::false_type{});
  }
  return private_bins ? run(std::false_type{}, std::true_type{})
                      : run(std::false_type{}, std::false_type{});
}

// pred = the argmax of rows [n0, n1) of logits [N, C, S], through this CPU's kernel for their
// dtype (fp16 and bf16 as their bits).
void argmax(const cpu::KernelTable& kernels, const at::Tensor& logits, int64_t num_classes,
            int64_t inner, int64_t n0, int64_t n1, int64_t* pred) {
  const auto rows = [&](auto kernel, const auto* data) {
    kernel({data, num_classes, inner, n0, n1, pred});
  };
  const void* data = logits.const_data_ptr();
  switch (logits.scalar_type()) {
    case at::kFloat:
      return rows(kernels.argmax_float, static_cast<const float*>(data));
    case at::kDouble:
      return rows(kernels.argmax_double, static_cast<const double*>(data));
    case at::kHalf:
      return rows(kernels.argmax_half, static_cast<const uint16_t*>(data));
    case at::kBFloat16:
      return rows(kernels.argmax_bfloat16, static_cast<const uint16_t*>(data));
    default:  // check_confusion_args lets no other dtype through
      TORCH_CHECK(false, "confusion_update_ (CPU kernel): no argmax for ", logits.scalar_type());
  }
}

template <typename label_t>
void update_cpu(at::Tensor& counts, at::Tensor& invalid, const at::Tensor& input,
                const label_t* target, int64_t num_classes, std::optional<int64_t> ignore_index) {
  const int64_t rows = input.size(0);
  const int64_t inner = input.dim() == 3 ? input.size(2) : input.size(1);
  const int64_t bins = num_classes * num_classes;
  const bool private_bins = bins <= kPrivateBins;
  const int threads = at::get_num_threads();
  const int64_t per_thread = (kCopies * bins + kLineCounts - 1) / kLineCounts * kLineCounts;
  std::vector<int64_t> storage(private_bins ? threads * per_thread + kLineCounts : 0);
  int64_t* histograms = reinterpret_cast<int64_t*>(
      (reinterpret_cast<uintptr_t>(storage.data()) + 63) & ~static_cast<uintptr_t>(63));
  std::vector<int64_t> invalid_per_thread(threads * kLineCounts, 0);
  int64_t* shared_counts = counts.data_ptr<int64_t>();
  const bool logits = at::isFloatingType(input.scalar_type());
  const bool has_ignore = ignore_index.has_value();
  const int64_t ignore = ignore_index.value_or(0);
  const auto& kernels = cpu::kernels();

  const int64_t values_per_row = (logits ? num_classes : 1) * inner;
  const int64_t block_rows = std::max<int64_t>(1, kValuesPerTask / values_per_row);
  at::parallel_for(0, rows, block_rows, [&](int64_t r0, int64_t r1) {
    const int thread = at::get_thread_num();
    int64_t* hist = private_bins ? histograms + thread * per_thread : nullptr;
    int64_t bad = 0;
    std::vector<int64_t> pred;
    for (int64_t b0 = r0; b0 < r1; b0 += block_rows) {
      const int64_t b1 = std::min(r1, b0 + block_rows);
      const int64_t entries = (b1 - b0) * inner;
      const label_t* truth = target + b0 * inner;
      const auto count = [&](const auto* labels) {
        return count_block(has_ignore, private_bins, truth, labels, entries, num_classes, ignore,
                           hist, shared_counts);
      };
      if (logits) {
        pred.resize(entries);
        argmax(kernels, input, num_classes, inner, b0, b1, pred.data());
        bad += count(pred.data());
      } else if (input.scalar_type() == at::kLong) {
        bad += count(input.const_data_ptr<int64_t>() + b0 * inner);
      } else {
        bad += count(input.const_data_ptr<int32_t>() + b0 * inner);
      }
    }
    invalid_per_thread[thread * kLineCounts] += bad;
  });

  if (private_bins) {
    for (int thread = 0; thread < threads; ++thread) {
      for (int64_t copy = 0; copy < kCopies; ++copy) {
        const int64_t* hist = histograms + thread * per_thread + copy * bins;
        for (int64_t bin = 0; bin < bins; ++bin) shared_counts[bin] += hist[bin];
      }
    }
  }
  int64_t bad = 0;
  for (int thread = 0; thread < threads; ++thread) bad += invalid_per_thread[thread * kLineCounts];
  invalid.data_ptr<int64_t>()[0] += bad;
}

void confusion_update_cpu_(at::Tensor& counts, at::Tensor& invalid, const at::Tensor& input,
                           const at::Tensor& target, int64_t num_classes,
                           std::optional<int64_t> ignore_index) {
  check_confusion_args(counts, invalid, input, target, num_classes);
  TORCH_CHECK(counts.device().is_cpu(), "confusion_update_ (CPU kernel): expected CPU tensors, got ",
              counts.device());
  if (target.numel() == 0) return;
  if (target.scalar_type() == at::kLong) {
    update_cpu<int64_t>(counts, invalid, input, target.const_data_ptr<int64_t>(), num_classes,
                        ignore_index);
  } else {
    update_cpu<int32_t>(counts, invalid, input, target.const_data_ptr<int32_t>(), num_classes,
                        ignore_index);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(recallprune, CPU, m) {
  m.impl("confusion_update_", &confusion_update_cpu_);
}

}  // namespace recallprune
