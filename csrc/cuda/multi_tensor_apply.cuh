// A small multi-tensor chunker: turns lists of tensors into as few launches as the
// kernel-argument space allows. Each block works on one chunk of one tensor; a launch
// holds up to kMaxTensorsPerLaunch tensors and all of their chunks, so that a list of a
// few large tensors runs in a few large grids (no tail between small launches).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <array>
#include <cstdint>
#include <limits>
#include <vector>

namespace recallprune::cuda {

constexpr int kMaxTensorsPerLaunch = 48;
constexpr int64_t kChunkSize = 65536;
constexpr int kBlockSize = 512;

// The addresses of one launch: kLists lists (the functor says which is which) of up to
// kMaxTensorsPerLaunch tensors; nullptr marks an absent tensor (a parameter with no
// mask, say). Tensor t owns blocks [first_block[t], first_block[t + 1]), one per chunk.
// Under 4 KiB for six lists, so it travels as a kernel argument.
template <int kLists>
struct TensorListMetadata {
  void* addresses[kLists][kMaxTensorsPerLaunch];
  int64_t numel[kMaxTensorsPerLaunch];
  int32_t first_block[kMaxTensorsPerLaunch + 1];
  int32_t tensors;
};
static_assert(sizeof(TensorListMetadata<6>) <= 3584,
              "the metadata must leave room for the functor's arguments in 4 KiB");

template <int kLists, typename Functor, typename... Args>
__global__ void __launch_bounds__(kBlockSize)
    multi_tensor_kernel(TensorListMetadata<kLists> meta, Functor functor, Args... args) {
  // The tensor whose block range holds this block: the last t with first_block[t] <= block.
  const int32_t block = static_cast<int32_t>(blockIdx.x);
  int lo = 0;
  int hi = meta.tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (meta.first_block[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const int tensor = lo;
  const int64_t begin = static_cast<int64_t>(block - meta.first_block[tensor]) * kChunkSize;
  const int64_t remaining = meta.numel[tensor] - begin;
  const int64_t count = remaining < kChunkSize ? remaining : kChunkSize;
  functor(meta, tensor, begin, count, args...);
}

// addresses[t][l]: the address of list l's tensor t; numels[t]: its element count.
// Launches on the current stream of the current device (the caller sets the guard).
template <int kLists, typename Functor, typename... Args>
void multi_tensor_apply(const std::vector<std::array<void*, kLists>>& addresses,
                        const std::vector<int64_t>& numels, Functor functor, Args... args) {
  constexpr int64_t kMaxBlocks = std::numeric_limits<int32_t>::max();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  TensorListMetadata<kLists> meta{};
  int tensors = 0;
  int64_t blocks = 0;
  const auto launch = [&] {
    meta.tensors = tensors;
    meta.first_block[tensors] = static_cast<int32_t>(blocks);
    multi_tensor_kernel<kLists>
        <<<static_cast<unsigned int>(blocks), kBlockSize, 0, stream>>>(meta, functor, args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    tensors = 0;
    blocks = 0;
  };
  for (size_t t = 0; t < addresses.size(); ++t) {
    if (numels[t] == 0) {
      continue;
    }
    const int64_t chunks = (numels[t] + kChunkSize - 1) / kChunkSize;
    TORCH_CHECK(chunks <= kMaxBlocks, "multi_tensor_apply: a tensor of ", numels[t],
                " elements needs more than ", kMaxBlocks, " blocks");
    if (tensors == kMaxTensorsPerLaunch || blocks + chunks > kMaxBlocks) {
      launch();
    }
    for (int l = 0; l < kLists; ++l) {
      meta.addresses[l][tensors] = addresses[t][l];
    }
    meta.numel[tensors] = numels[t];
    meta.first_block[tensors] = static_cast<int32_t>(blocks);
    ++tensors;
    blocks += chunks;
  }
  if (blocks > 0) {
    launch();
  }
}

}  // namespace recallprune::cuda
