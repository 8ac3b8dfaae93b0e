// recallprune::cuda_kernel_image_problem: whether this build holds code that runs on a given
// CUDA device. Every CUDA source is compiled for the same architectures (TORCH_CUDA_ARCH_LIST
// at build time), so one kernel of this library answers for all of them. Without it, a GPU
// of another architecture would fail at the first launch ("no kernel image is available"),
// after the library had already chosen its kernels over the reference.
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <string>

namespace recallprune {
namespace {

__global__ void probe_kernel() {}

// "" when the library's kernels can run on device `device_index` (an image for its
// architecture, or PTX the driver compiles for it), else the CUDA runtime's reason.
std::string cuda_kernel_image_problem(int64_t device_index) {
  const c10::cuda::CUDAGuard device_guard(static_cast<c10::DeviceIndex>(device_index));
  cudaFuncAttributes attributes;
  const cudaError_t status = cudaFuncGetAttributes(&attributes, probe_kernel);
  if (status == cudaSuccess) {
    return "";
  }
  (void)cudaGetLastError();  // the error is not sticky: clear it for the next CUDA call
  return cudaGetErrorString(status);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(recallprune, m) {
  m.def("cuda_kernel_image_problem(int device_index) -> str", &cuda_kernel_image_problem);
}

}  // namespace recallprune
