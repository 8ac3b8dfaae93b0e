// A small multi-tensor chunker: turns lists of tensors into as few launches as the
// kernel-argument space allows. Each block works on one chunk of one tensor; a tensor
// longer than a launch's blocks is carried over to the next launch.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <array>
#include <cstdint>
#include <vector>

namespace recallprune::cuda {

constexpr int kMaxTensorsPerLaunch = 24;
constexpr int kMaxBlocksPerLaunch = 320;
constexpr int64_t kChunkSize = 65536;
constexpr int kBlockSize = 512;

// The addresses of one launch: kLists lists (the functor says which is which) of up to
// kMaxTensorsPerLaunch tensors; nullptr marks an absent tensor (a parameter with no
// mask, say). Under 4 KiB, so it travels as a kernel argument.
template <int kLists>
struct TensorListMetadata {
  void* addresses[kLists][kMaxTensorsPerLaunch];
  int64_t numel[kMaxTensorsPerLaunch];
  unsigned char block_to_tensor[kMaxBlocksPerLaunch];
  int32_t block_to_chunk[kMaxBlocksPerLaunch];
};

template <int kLists, typename Functor, typename... Args>
__global__ void __launch_bounds__(kBlockSize)
    multi_tensor_kernel(TensorListMetadata<kLists> meta, Functor functor, Args... args) {
  const int tensor = meta.block_to_tensor[blockIdx.x];
  const int64_t chunk = meta.block_to_chunk[blockIdx.x];
  const int64_t begin = chunk * kChunkSize;
  const int64_t remaining = meta.numel[tensor] - begin;
  const int64_t count = remaining < kChunkSize ? remaining : kChunkSize;
  functor(meta, tensor, begin, count, args...);
}

// addresses[t][l]: the address of list l's tensor t; numels[t]: its element count.
// Launches on the current stream of the current device (the caller sets the guard).
template <int kLists, typename Functor, typename... Args>
void multi_tensor_apply(const std::vector<std::array<void*, kLists>>& addresses,
                        const std::vector<int64_t>& numels, Functor functor, Args... args) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  TensorListMetadata<kLists> meta{};
  int tensors = 0;
  int blocks = 0;
  const auto launch = [&] {
    multi_tensor_kernel<kLists><<<blocks, kBlockSize, 0, stream>>>(meta, functor, args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    blocks = 0;
  };
  for (size_t t = 0; t < addresses.size(); ++t) {
    if (numels[t] == 0) {
      continue;
    }
    for (int l = 0; l < kLists; ++l) {
      meta.addresses[l][tensors] = addresses[t][l];
    }
    meta.numel[tensors] = numels[t];
    ++tensors;
    const int64_t chunks = (numels[t] + kChunkSize - 1) / kChunkSize;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      meta.block_to_tensor[blocks] = static_cast<unsigned char>(tensors - 1);
      meta.block_to_chunk[blocks] = static_cast<int32_t>(chunk);
      ++blocks;
      const bool tensor_done = chunk == chunks - 1;
      if (blocks == kMaxBlocksPerLaunch || (tensor_done && tensors == kMaxTensorsPerLaunch)) {
        launch();
        if (tensor_done) {
          tensors = 0;
        } else {
          // Carry the unfinished tensor over as the first of the next launch.
          for (int l = 0; l < kLists; ++l) {
            meta.addresses[l][0] = meta.addresses[l][tensors - 1];
          }
          meta.numel[0] = meta.numel[tensors - 1];
          tensors = 1;
        }
      }
    }
  }
  if (blocks > 0) {
    launch();
  }
}

}  // namespace recallprune::cuda
