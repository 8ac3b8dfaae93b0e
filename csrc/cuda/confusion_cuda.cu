// CUDA kernel of recallprune::confusion_update_: the argmax fused with the counting,
// block-private shared-memory histograms where C*C 32-bit counters fit, global 64-bit
// atomics otherwise; 64-bit indices; the current stream; no host synchronisation.
#include "confusion.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <array>
#include <atomic>

namespace recallprune {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
// Largest C*C kept in shared memory: 32-bit counters in the 48 KiB a block may use without
// opting in, less room for the kernels' static shared variables.
constexpr int64_t kSharedBytes = 48 * 1024 - 256;
constexpr int64_t kSharedBins = kSharedBytes / sizeof(unsigned int);
static_assert(kSharedBins * sizeof(unsigned int) + sizeof(unsigned int) <= 48 * 1024,
              "the histogram and block_invalid must fit in 48 KiB of shared memory");
// Rows of at least this many classes get a warp each; shorter rows a thread each.
constexpr int64_t kWarpPerRowClasses = 128;

struct Counting {
  unsigned long long* counts;   // [C*C], int64 storage
  unsigned long long* invalid;  // [1]
  int64_t num_classes;
  bool has_ignore;
  int64_t ignore_index;
  bool shared;  // block-private histogram in shared memory
};

// Counts one (target, predicted) pair; returns 1 if it was invalid.
__device__ __forceinline__ int count_pair(const Counting& k, unsigned int* hist, int64_t truth,
                                          int64_t pred) {
  if (k.has_ignore && truth == k.ignore_index) return 0;
  const auto classes = static_cast<uint64_t>(k.num_classes);
  if (static_cast<uint64_t>(truth) >= classes || static_cast<uint64_t>(pred) >= classes) return 1;
  const int64_t bin = truth * k.num_classes + pred;
  if (k.shared) {
    atomicAdd(hist + bin, 1u);
  } else {
    atomicAdd(k.counts + bin, 1ull);
  }
  return 0;
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

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T value[N];
};

// One thread per entry (n, s): argmax over c of logits[n, c, s], with vector loads of
// kVec classes where rows are contiguous (S == 1) and aligned.
template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    confusion_thread_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ target,
                            int64_t entries, int64_t inner, Counting k) {
  extern __shared__ unsigned int hist[];
  __shared__ unsigned int block_invalid;
  init_block(k, hist, &block_invalid);
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t classes = k.num_classes;
  unsigned int bad = 0;
  for (int64_t m = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; m < entries;
       m += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t truth = target[m];
    if (k.has_ignore && truth == k.ignore_index) continue;
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
    } else {
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
    }
    bad += count_pair(k, hist, truth, best_index);
  }
  flush_block(k, hist, &block_invalid, bad);
}

// One warp per row of many classes (S == 1): coalesced loads, then a warp reduction that
// keeps the first index among equal maxima.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    confusion_warp_kernel(const scalar_t* __restrict__ logits, const int64_t* __restrict__ target,
                          int64_t rows, Counting k) {
  extern __shared__ unsigned int hist[];
  __shared__ unsigned int block_invalid;
  init_block(k, hist, &block_invalid);
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t classes = k.num_classes;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_per_block = blockDim.x / kWarp;
  unsigned int bad = 0;
  for (int64_t r = blockIdx.x * warps_per_block + threadIdx.x / kWarp; r < rows;
       r += static_cast<int64_t>(gridDim.x) * warps_per_block) {
    const int64_t truth = target[r];
    if (k.has_ignore && truth == k.ignore_index) continue;  // the same for the whole warp
    const scalar_t* row = logits + r * classes;
    opmath_t best = static_cast<opmath_t>(row[0]);
    int64_t best_index = 0;
    for (int64_t c = lane; c < classes; c += kWarp) {
      const opmath_t value = static_cast<opmath_t>(row[c]);
      if (argmax_takes(value, best) || (c == 0)) {
        best = value;
        best_index = c;
      }
    }
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      const opmath_t other = __shfl_down_sync(0xffffffffu, best, offset);
      const int64_t other_index = __shfl_down_sync(0xffffffffu, best_index, offset);
      if (argmax_takes(other, best) || (!argmax_takes(best, other) && other_index < best_index)) {
        best = other;
        best_index = other_index;
      }
    }
    if (lane == 0) bad += count_pair(k, hist, truth, best_index);
  }
  flush_block(k, hist, &block_invalid, bad);
}

// Predicted labels given directly.
template <typename label_t>
__global__ void __launch_bounds__(kThreads)
    confusion_labels_kernel(const label_t* __restrict__ pred, const int64_t* __restrict__ target,
                            int64_t entries, Counting k) {
  extern __shared__ unsigned int hist[];
  __shared__ unsigned int block_invalid;
  init_block(k, hist, &block_invalid);
  unsigned int bad = 0;
  for (int64_t m = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; m < entries;
       m += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    bad += count_pair(k, hist, target[m], static_cast<int64_t>(pred[m]));
  }
  flush_block(k, hist, &block_invalid, bad);
}

// Blocks to launch: enough to fill the GPU, and enough that no block counts more than
// 2^30 entries (its 32-bit shared counters cannot overflow).
int multiprocessors() {
  // Cached per device: the attribute query is not free, and updates are frequent.
  static std::array<std::atomic<int>, 64> cache{};
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device < 0 || device >= static_cast<int>(cache.size())) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return sms;
  }
  int sms = cache[device].load(std::memory_order_relaxed);
  if (sms == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(sms, std::memory_order_relaxed);
  }
  return sms;
}

int64_t grid_size(int64_t work_items, int64_t items_per_block) {
  const int sms = multiprocessors();
  const int64_t needed = (work_items + items_per_block - 1) / items_per_block;
  const int64_t floor_for_counters = (work_items >> 30) + 1;
  return std::max<int64_t>(1, std::max(floor_for_counters, std::min<int64_t>(needed, sms * 8)));
}

int vector_width(const void* data, int64_t row_bytes, int64_t element_bytes) {
  for (const int bytes : {16, 8, 4}) {
    if (row_bytes % bytes == 0 && reinterpret_cast<uintptr_t>(data) % bytes == 0 &&
        bytes >= element_bytes) {
      return static_cast<int>(bytes / element_bytes);
    }
  }
  return 1;
}

void confusion_update_cuda_(at::Tensor& counts, at::Tensor& invalid, const at::Tensor& input,
                            const at::Tensor& target, int64_t num_classes,
                            std::optional<int64_t> ignore_index) {
  check_confusion_args(counts, invalid, input, target, num_classes);
  TORCH_CHECK(counts.is_cuda(), "confusion_update_ (CUDA kernel): expected CUDA tensors, got ",
              counts.device());
  const int64_t entries = target.numel();
  if (entries == 0) return;
  const c10::cuda::CUDAGuard device_guard(counts.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor target64 = target.scalar_type() == at::kLong ? target : target.to(at::kLong);
  const int64_t bins = num_classes * num_classes;
  Counting k{reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()),
             reinterpret_cast<unsigned long long*>(invalid.data_ptr<int64_t>()),
             num_classes,
             ignore_index.has_value(),
             ignore_index.value_or(0),
             bins <= kSharedBins};
  const size_t shared_bytes = k.shared ? static_cast<size_t>(bins) * sizeof(unsigned int) : 0;
  const int64_t* truth = target64.const_data_ptr<int64_t>();

  if (!at::isFloatingType(input.scalar_type())) {
    const int64_t blocks = grid_size(entries, kThreads);
    AT_DISPATCH_INDEX_TYPES(input.scalar_type(), "confusion_labels", [&] {
      confusion_labels_kernel<index_t><<<blocks, kThreads, shared_bytes, stream>>>(
          input.const_data_ptr<index_t>(), truth, entries, k);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }
  const int64_t inner = input.size(2);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "confusion_logits", [&] {
    const scalar_t* logits = input.const_data_ptr<scalar_t>();
    if (inner == 1 && num_classes >= kWarpPerRowClasses) {
      const int64_t blocks = grid_size(entries, kThreads / kWarp);
      confusion_warp_kernel<scalar_t>
          <<<blocks, kThreads, shared_bytes, stream>>>(logits, truth, entries, k);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const int64_t blocks = grid_size(entries, kThreads);
    const int width = inner == 1 ? vector_width(logits, num_classes * sizeof(scalar_t),
                                                sizeof(scalar_t))
                                 : 1;
    const auto launch = [&](auto kernel) {
      kernel<<<blocks, kThreads, shared_bytes, stream>>>(logits, truth, entries, inner, k);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    switch (width) {
      case 8: launch(confusion_thread_kernel<scalar_t, 8>); break;
      case 4: launch(confusion_thread_kernel<scalar_t, 4>); break;
      case 2: launch(confusion_thread_kernel<scalar_t, 2>); break;
      default: launch(confusion_thread_kernel<scalar_t, 1>); break;
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(recallprune, CUDA, m) {
  m.impl("confusion_update_", &confusion_update_cuda_);
}

}  // namespace recallprune
