// CPU kernel of recallprune::confusion_update_: per-thread histograms (or relaxed atomic
// increments where C*C bins per thread would not fit in cache), the vectorised row argmax
// of kernels.inl, and one reduction at the end.
#include "confusion.h"
#include "kernels.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
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
constexpr int kCopies = 4;

template <typename label_t>
void update_cpu(at::Tensor& counts, at::Tensor& invalid, const at::Tensor& input,
                const label_t* target, int64_t num_classes, std::optional<int64_t> ignore_index) {
  const int64_t rows = input.size(0);
  const int64_t inner = input.dim() == 3 ? input.size(2) : input.size(1);
  const int64_t bins = num_classes * num_classes;
  const bool private_bins = bins <= kPrivateBins;
  const int threads = at::get_num_threads();
  std::vector<int64_t> histograms(private_bins ? static_cast<size_t>(threads) * kCopies * bins : 0);
  std::vector<int64_t> invalid_per_thread(threads, 0);
  int64_t* shared_counts = counts.data_ptr<int64_t>();
  const bool logits = at::isFloatingType(input.scalar_type());
  const bool has_ignore = ignore_index.has_value();
  const int64_t ignore = ignore_index.value_or(0);
  const auto& kernels = cpu::kernels();

  const int64_t values_per_row = (logits ? num_classes : 1) * inner;
  const int64_t block_rows = std::max<int64_t>(1, kValuesPerTask / values_per_row);
  at::parallel_for(0, rows, block_rows, [&](int64_t r0, int64_t r1) {
    const int thread = at::get_thread_num();
    int64_t* hist = private_bins ? histograms.data() + static_cast<size_t>(thread) * kCopies * bins
                                 : nullptr;
    int64_t bad = 0;
    std::vector<int64_t> pred;
    for (int64_t b0 = r0; b0 < r1; b0 += block_rows) {
      const int64_t b1 = std::min(r1, b0 + block_rows);
      const int64_t entries = (b1 - b0) * inner;
      const int64_t* labels = nullptr;
      const int32_t* labels32 = nullptr;
      if (logits) {
        pred.resize(entries);
        kernels.argmax({input.scalar_type(), input.const_data_ptr(), num_classes, inner, b0, b1,
                        pred.data()});
        labels = pred.data();
      } else if (input.scalar_type() == at::kLong) {
        labels = input.const_data_ptr<int64_t>() + b0 * inner;
      } else {
        labels32 = input.const_data_ptr<int32_t>() + b0 * inner;
      }
      const label_t* truth = target + b0 * inner;
      for (int64_t i = 0; i < entries; ++i) {
        const int64_t t = static_cast<int64_t>(truth[i]);
        if (has_ignore && t == ignore) continue;
        const int64_t p = labels != nullptr ? labels[i] : static_cast<int64_t>(labels32[i]);
        // One unsigned compare per label checks both bounds.
        if (static_cast<uint64_t>(t) >= static_cast<uint64_t>(num_classes) ||
            static_cast<uint64_t>(p) >= static_cast<uint64_t>(num_classes)) {
          ++bad;
          continue;
        }
        const int64_t bin = t * num_classes + p;
        if (hist != nullptr) {
          ++hist[(i % kCopies) * bins + bin];
        } else {
          std::atomic_ref<int64_t>(shared_counts[bin]).fetch_add(1, std::memory_order_relaxed);
        }
      }
    }
    invalid_per_thread[thread] += bad;
  });

  if (private_bins) {
    for (int64_t copy = 0; copy < static_cast<int64_t>(threads) * kCopies; ++copy) {
      const int64_t* hist = histograms.data() + copy * bins;
      for (int64_t bin = 0; bin < bins; ++bin) shared_counts[bin] += hist[bin];
    }
  }
  int64_t bad = 0;
  for (const int64_t b : invalid_per_thread) bad += b;
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
