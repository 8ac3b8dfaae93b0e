// CUDA kernels of recallprune::confusion_update_ and confusion_update_stacked_: the argmax
// fused with the counting, block-private shared-memory histograms where C*C 32-bit counters
// fit and a block counts enough entries to pay for them, global 64-bit atomics otherwise;
// int32 or int64 labels read as they are; 64-bit indices; the current stream; no host
// synchronisation. A stack of B models is one launch: the grid's y index is the model.
#include "confusion.h"
#include "pack.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <type_traits>

namespace recallprune {
namespace {

using cuda::Pack;

constexpr int kThreads = 256;
constexpr int kWarp = 32;
// Largest C*C kept in shared memory: 32-bit counters in the 48 KiB a block may use without
// opting in, less room for the kernels' static shared variables.
constexpr int64_t kSharedBytes = 48 * 1024 - 256;
constexpr int64_t kSharedBins = kSharedBytes / sizeof(unsigned int);
static_assert(kSharedBins * sizeof(unsigned int) + sizeof(unsigned int) <= 48 * 1024,
              "the histogram and block_invalid must fit in 48 KiB of shared memory");
// Rows of at least this many classes (S == 1) are read by a group of lanes each, so that a
// warp's loads are contiguous; a thread reads a shorter row alone (its few cache lines stay
// in L1 while it does).
constexpr int64_t kGroupRowClasses = 32;
// Rows of at least this many classes get a whole warp each; shorter ones kNarrowGroupLanes.
constexpr int64_t kWarpRowClasses = 128;
constexpr int kNarrowGroupLanes = 8;
// Up to this many classes, the lanes of a warp that hit the same bin add together, one
// shared atomic per distinct bin: at C = 2, 32 lanes would otherwise queue on 4 counters.
constexpr int64_t kAggregateClasses = 32;

struct Counting {
  unsigned long long* counts;   // [C*C], int64 storage
  unsigned long long* invalid;  // [1]
  int64_t num_classes;
  bool has_ignore;
  int64_t ignore_index;
  bool shared;  // block-private histogram in shared memory

  // The counters of model `model` of a stack (their [B, C*C] and [B] rows).
  __device__ __forceinline__ Counting for_model(int64_t model) const {
    Counting k = *this;
    k.counts += model * num_classes * num_classes;
    k.invalid += model;
    return k;
  }
};

// Elements between one model's batch and the next in a stack: logits (or predicted
// labels) and targets.
struct ModelStrides {
  int64_t input;
  int64_t target;
};

// Integer labels of either width, read as int64: an int32 target needs no converted copy.
struct Labels {
  const void* data;
  bool is_int32;

  __device__ __forceinline__ int64_t operator[](int64_t i) const {
    return is_int32 ? static_cast<int64_t>(static_cast<const int32_t*>(data)[i])
                    : static_cast<const int64_t*>(data)[i];
  }

  // The labels from element `offset` on.
  __host__ __device__ __forceinline__ Labels shifted(int64_t offset) const {
    const int64_t bytes = offset * (is_int32 ? 4 : 8);
    return {static_cast<const char*>(data) + bytes, is_int32};
  }
};

Labels labels_of(const at::Tensor& labels) {
  return {labels.const_data_ptr(), labels.scalar_type() == at::kInt};
}

__device__ __forceinline__ bool ignored(const Counting& k, int64_t truth) {
  return k.has_ignore && truth == k.ignore_index;
}

// The bin of a (target, predicted) pair, or -1 (and one more in `bad`) when either label
// is outside [0, C).
__device__ __forceinline__ int64_t bin_of(const Counting& k, int64_t truth, int64_t pred,
                                          unsigned int& bad) {
  const auto classes = static_cast<uint64_t>(k.num_classes);
  if (static_cast<uint64_t>(truth) >= classes || static_cast<uint64_t>(pred) >= classes) {
    ++bad;
    return -1;
  }
  return truth * k.num_classes + pred;
}

__device__ __forceinline__ void add_one(const Counting& k, unsigned int* hist, int64_t bin) {
  if (k.shared) {
    atomicAdd(hist + bin, 1u);
  } else {
    atomicAdd(k.counts + bin, 1ull);
  }
}

// Called by every lane of the warp (bin < 0: nothing to count); lanes with equal bins add
// together through the lowest of them. Shared histograms only (bins < 2^31).
__device__ __forceinline__ void add_aggregated(unsigned int* hist, int64_t bin) {
  const int key = static_cast<int>(bin);
  const unsigned int peers = __match_any_sync(0xffffffffu, key);
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  if (key >= 0 && lane == __ffs(peers) - 1) {
    atomicAdd(hist + key, static_cast<unsigned int>(__popc(peers)));
  }
}

__device__ __forceinline__ void init_block(const Counting& k, unsigned int* hist,
                                           unsigned int* block_invalid) {
  if (threadIdx.x == 0) *block_invalid = 0;
  if (k.shared) {
    for (int64_t b = threadIdx.x; b < k.num_classes * k.num_classes; b += blockDim.x) hist[b] = 0;
  }
  __syncthreads();
}

__device__ __forceinline__ void flush_block(const Counting& k, unsigned int* hist,
                                            unsigned int* block_invalid, unsigned int bad) {
  if (bad != 0) atomicAdd(block_invalid, bad);
  __syncthreads();
  if (k.shared) {
    for (int64_t b = threadIdx.x; b < k.num_classes * k.num_classes; b += blockDim.x) {
      if (hist[b] != 0) atomicAdd(k.counts + b, static_cast<unsigned long long>(hist[b]));
    }
  }
  if (threadIdx.x == 0 && *block_invalid != 0) {
    atomicAdd(k.invalid, static_cast<unsigned long long>(*block_invalid));
  }
}

// The argmax of entry (n, s) read by one thread: kVec classes per load where rows are
// contiguous (S == 1) and aligned, strided scalar loads otherwise.
template <typename scalar_t, int kVec>
__device__ __forceinline__ int64_t thread_argmax(const scalar_t* __restrict__ logits, int64_t m,
                                                 int64_t classes, int64_t inner) {
  using opmath_t = at::opmath_type<scalar_t>;
  int64_t best_index = 0;
  if (inner == 1) {
    const auto* row = reinterpret_cast<const Pack<scalar_t, kVec>*>(logits + m * classes);
    opmath_t best = static_cast<opmath_t>(logits[m * classes]);
    for (int64_t v = 0; v < classes / kVec; ++v) {
      const Pack<scalar_t, kVec> pack = row[v];
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const opmath_t value = static_cast<opmath_t>(pack.value[j]);
        if (argmax_takes(value, best)) {
          best = value;
          best_index = v * kVec + j;
        }
      }
    }
    return best_index;
  }
  const int64_t n = m / inner;
  const scalar_t* sample = logits + n * classes * inner + (m - n * inner);
  opmath_t best = static_cast<opmath_t>(sample[0]);
  for (int64_t c = 1; c < classes; ++c) {
    const opmath_t value = static_cast<opmath_t>(sample[c * inner]);
    if (argmax_takes(value, best)) {
      best = value;
      best_index = c;
    }
  }
  return best_index;
}

// One thread per entry (n, s): short rows (C < 32) and every [N, C, S] batch with S > 1,
// where neighbouring threads read neighbouring s. Whole warps iterate together (the loop
// bound is the warp's first entry), as add_aggregated needs every lane.
template <typename scalar_t, int kVec, bool kAggregate>
__global__ void __launch_bounds__(kThreads)
    confusion_thread_kernel(const scalar_t* __restrict__ logits, Labels target, int64_t entries,
                            int64_t inner, Counting k, ModelStrides strides) {
  logits += blockIdx.y * strides.input;
  target = target.shifted(blockIdx.y * strides.target);
  k = k.for_model(blockIdx.y);
  extern __shared__ unsigned int hist[];
  __shared__ unsigned int block_invalid;
  init_block(k, hist, &block_invalid);
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  unsigned int bad = 0;
  for (int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + (threadIdx.x - lane);
       first < entries; first += stride) {
    const int64_t m = first + lane;
    int64_t bin = -1;
    if (m < entries) {
      const int64_t truth = target[m];
      if (!ignored(k, truth)) {
        bin = bin_of(k, truth, thread_argmax<scalar_t, kVec>(logits, m, k.num_classes, inner),
                     bad);
      }
    }
    if constexpr (kAggregate) {
      add_aggregated(hist, bin);
    } else if (bin >= 0) {
      add_one(k, hist, bin);
    }
  }
  flush_block(k, hist, &block_invalid, bad);
}

// A group of 2^lane_shift lanes per row of a contiguous [N, C] batch (S == 1), each lane
// reading kVec classes at a time: the group's loads are contiguous. A reduction within the
// group then keeps the first index among equal maxima. Whole warps iterate together (the
// shuffles need every lane).
template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    confusion_group_kernel(const scalar_t* __restrict__ logits, Labels target, int64_t rows,
                           int lane_shift, Counting k, ModelStrides strides) {
  logits += blockIdx.y * strides.input;
  target = target.shifted(blockIdx.y * strides.target);
  k = k.for_model(blockIdx.y);
  extern __shared__ unsigned int hist[];
  __shared__ unsigned int block_invalid;
  init_block(k, hist, &block_invalid);
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t classes = k.num_classes;
  const int64_t packs = classes / kVec;
  const int lanes = 1 << lane_shift;
  const int groups_per_warp = kWarp >> lane_shift;
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  const int member = lane & (lanes - 1);
  const int64_t warps_per_grid = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  unsigned int bad = 0;
  for (int64_t first = (blockIdx.x * static_cast<int64_t>(blockDim.x / kWarp) +
                        threadIdx.x / kWarp) * groups_per_warp;
       first < rows; first += warps_per_grid * groups_per_warp) {
    const int64_t r = first + (lane >> lane_shift);
    bool counted = false;
    int64_t truth = 0;
    if (r < rows) {
      truth = target[r];
      counted = !ignored(k, truth);
    }
    opmath_t best = 0;
    int64_t best_index = 0;
    if (counted) {
      const scalar_t* row = logits + r * classes;
      const auto* row_packs = reinterpret_cast<const Pack<scalar_t, kVec>*>(row);
      best = static_cast<opmath_t>(row[0]);
      for (int64_t p = member; p < packs; p += lanes) {
        const Pack<scalar_t, kVec> pack = row_packs[p];
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const opmath_t value = static_cast<opmath_t>(pack.value[j]);
          if (argmax_takes(value, best)) {
            best = value;
            best_index = p * kVec + j;
          }
        }
      }
    }
    for (int offset = lanes / 2; offset > 0; offset /= 2) {
      const opmath_t other = __shfl_down_sync(0xffffffffu, best, offset, lanes);
      const int64_t other_index = __shfl_down_sync(0xffffffffu, best_index, offset, lanes);
      if (argmax_takes(other, best) || (!argmax_takes(best, other) && other_index < best_index)) {
        best = other;
        best_index = other_index;
      }
    }
    if (member == 0 && counted) {
      const int64_t bin = bin_of(k, truth, best_index, bad);
      if (bin >= 0) add_one(k, hist, bin);
    }
  }
  flush_block(k, hist, &block_invalid, bad);
}

// Predicted labels given directly.
template <bool kAggregate>
__global__ void __launch_bounds__(kThreads)
    confusion_labels_kernel(Labels pred, Labels target, int64_t entries, Counting k,
                            ModelStrides strides) {
  pred = pred.shifted(blockIdx.y * strides.input);
  target = target.shifted(blockIdx.y * strides.target);
  k = k.for_model(blockIdx.y);
  extern __shared__ unsigned int hist[];
  __shared__ unsigned int block_invalid;
  init_block(k, hist, &block_invalid);
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  unsigned int bad = 0;
  for (int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + (threadIdx.x - lane);
       first < entries; first += stride) {
    const int64_t m = first + lane;
    int64_t bin = -1;
    if (m < entries) {
      const int64_t truth = target[m];
      if (!ignored(k, truth)) bin = bin_of(k, truth, pred[m], bad);
    }
    if constexpr (kAggregate) {
      add_aggregated(hist, bin);
    } else if (bin >= 0) {
      add_one(k, hist, bin);
    }
  }
  flush_block(k, hist, &block_invalid, bad);
}

// Blocks to launch: enough to fill the GPU, and enough that no block counts more than
// 2^30 entries (its 32-bit shared counters cannot overflow). torch caches the device's
// properties: updates are frequent.
int64_t grid_size(int64_t work_items, int64_t items_per_block, c10::DeviceIndex device) {
  const int sms = at::cuda::getDeviceProperties(device)->multiProcessorCount;
  const int64_t needed = (work_items + items_per_block - 1) / items_per_block;
  const int64_t floor_for_counters = (work_items >> 30) + 1;
  return std::max<int64_t>(1, std::max(floor_for_counters, std::min<int64_t>(needed, sms * 8)));
}

// Classes per vector load: the widest of 16, 8 and 4 bytes that divides the row and the
// base address (1 when none does).
int vector_width(const void* data, int64_t row_bytes, int64_t element_bytes) {
  for (const int bytes : {16, 8, 4}) {
    if (row_bytes % bytes == 0 && reinterpret_cast<uintptr_t>(data) % bytes == 0 &&
        bytes >= element_bytes) {
      return static_cast<int>(bytes / element_bytes);
    }
  }
  return 1;
}

// Calls f(std::integral_constant<int, kVec>) for the width chosen, instantiating only the
// widths of at most 16 bytes.
template <typename scalar_t, typename F>
void with_vector_width(int width, const F& f) {
  const auto call = [&](auto vec) {
    if constexpr (decltype(vec)::value * sizeof(scalar_t) <= 16) {
      f(vec);
    } else {
      TORCH_CHECK(false, "confusion_update_ (CUDA kernel): no ", decltype(vec)::value,
                  "-wide loads of ", sizeof(scalar_t), "-byte logits");
    }
  };
  switch (width) {
    case 8: call(std::integral_constant<int, 8>{}); break;
    case 4: call(std::integral_constant<int, 4>{}); break;
    case 2: call(std::integral_constant<int, 2>{}); break;
    default: call(std::integral_constant<int, 1>{}); break;
  }
}

// Counts a stack of `models` batches stored one after another: logits [B, N, C, S] or
// labels [B, N, S], target [B, N, S], counts [B, C*C], invalid [B] (confusion_update_ is
// B = 1). The arguments are checked. One launch per 65,535 models (the grid's y limit).
void launch_confusion(at::Tensor& counts, at::Tensor& invalid, const at::Tensor& input,
                      const at::Tensor& target, int64_t models, int64_t num_classes,
                      std::optional<int64_t> ignore_index, const char* op) {
  TORCH_CHECK(counts.is_cuda(), op, " (CUDA kernel): expected CUDA tensors, got ",
              counts.device());
  if (models == 0 || target.numel() == 0) return;
  const int64_t entries = target.numel() / models;  // per model
  const c10::cuda::CUDAGuard device_guard(counts.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t bins = num_classes * num_classes;
  const bool logits_given = at::isFloatingType(input.scalar_type());
  const int64_t inner = logits_given ? input.size(input.dim() - 1) : 1;
  const ModelStrides strides{input.numel() / models, entries};
  const bool grouped = logits_given && inner == 1 && num_classes >= kGroupRowClasses;
  const int lane_shift = num_classes >= kWarpRowClasses ? 5 : 3;
  static_assert(kNarrowGroupLanes == 1 << 3, "lane_shift 3 is kNarrowGroupLanes");
  const int64_t blocks =
      grouped ? grid_size(entries, (kThreads / kWarp) * (kWarp >> lane_shift), counts.get_device())
              : grid_size(entries, kThreads, counts.get_device());
  // A block-private histogram pays off when a block counts more entries than it has bins
  // to clear and flush; small C always (the aggregated counting needs it).
  const bool shared = bins <= kSharedBins &&
                      (num_classes <= kAggregateClasses || entries >= blocks * bins / 2);
  const bool aggregate = shared && num_classes <= kAggregateClasses;
  const size_t shared_bytes = shared ? static_cast<size_t>(bins) * sizeof(unsigned int) : 0;
  auto* all_counts = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
  auto* all_invalid = reinterpret_cast<unsigned long long*>(invalid.data_ptr<int64_t>());
  constexpr int64_t kMaxModelsPerLaunch = 65535;

  for (int64_t first = 0; first < models; first += kMaxModelsPerLaunch) {
    const dim3 grid(static_cast<unsigned int>(blocks),
                    static_cast<unsigned int>(std::min(kMaxModelsPerLaunch, models - first)));
    const Counting k{all_counts + first * bins,   all_invalid + first,     num_classes,
                     ignore_index.has_value(),    ignore_index.value_or(0), shared};
    const Labels truth = labels_of(target).shifted(first * strides.target);
    if (!logits_given) {
      const Labels pred = labels_of(input).shifted(first * strides.input);
      if (aggregate) {
        confusion_labels_kernel<true>
            <<<grid, kThreads, shared_bytes, stream>>>(pred, truth, entries, k, strides);
      } else {
        confusion_labels_kernel<false>
            <<<grid, kThreads, shared_bytes, stream>>>(pred, truth, entries, k, strides);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      continue;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                    "confusion_logits", [&] {
      const scalar_t* logits = input.const_data_ptr<scalar_t>() + first * strides.input;
      // A row's alignment is the same in every model's batch: each batch is whole rows.
      const int width =
          inner == 1 ? vector_width(logits, num_classes * sizeof(scalar_t), sizeof(scalar_t))
                     : 1;
      if (grouped) {
        with_vector_width<scalar_t>(width, [&](auto vec) {
          confusion_group_kernel<scalar_t, decltype(vec)::value>
              <<<grid, kThreads, shared_bytes, stream>>>(logits, truth, entries, lane_shift, k,
                                                         strides);
        });
      } else if (aggregate) {
        with_vector_width<scalar_t>(width, [&](auto vec) {
          confusion_thread_kernel<scalar_t, decltype(vec)::value, true>
              <<<grid, kThreads, shared_bytes, stream>>>(logits, truth, entries, inner, k,
                                                         strides);
        });
      } else {
        // Only S > 1 comes here (C <= 32 with S == 1 aggregates): scalar strided loads.
        confusion_thread_kernel<scalar_t, 1, false>
            <<<grid, kThreads, shared_bytes, stream>>>(logits, truth, entries, inner, k, strides);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

void confusion_update_cuda_(at::Tensor& counts, at::Tensor& invalid, const at::Tensor& input,
                            const at::Tensor& target, int64_t num_classes,
                            std::optional<int64_t> ignore_index) {
  check_confusion_args(counts, invalid, input, target, num_classes);
  launch_confusion(counts, invalid, input, target, 1, num_classes, ignore_index,
                   "confusion_update_");
}

void confusion_update_stacked_cuda_(at::Tensor& counts, at::Tensor& invalid,
                                    const at::Tensor& input, const at::Tensor& target,
                                    int64_t num_classes, std::optional<int64_t> ignore_index) {
  const int64_t models = check_stacked_confusion_args(counts, invalid, input, target, num_classes);
  launch_confusion(counts, invalid, input, target, models, num_classes, ignore_index,
                   "confusion_update_stacked_");
}

}  // namespace

TORCH_LIBRARY_IMPL(recallprune, CUDA, m) {
  m.impl("confusion_update_", &confusion_update_cuda_);
  m.impl("confusion_update_stacked_", &confusion_update_stacked_cuda_);
}

}  // namespace recallprune
