// Several elements loaded or stored as one aligned vector access (16 bytes at most), for the
// CUDA kernels of both ops.
#pragma once

namespace recallprune::cuda {

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T value[N];
};

}  // namespace recallprune::cuda
