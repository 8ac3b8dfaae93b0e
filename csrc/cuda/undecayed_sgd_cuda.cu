// CUDA kernel of recallprune::undecayed_sgd_: one launch per list of tensors (per dtype)
// through the multi-tensor chunker; fp32 math for fp16/bf16; vectorised loads where
// every pointer of a chunk is aligned.
#include "multi_tensor_apply.cuh"
#include "pack.cuh"
#include "undecayed_sgd.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <map>
#include <string>

namespace recallprune {
namespace {

using cuda::Pack;
using cuda::TensorListMetadata;

constexpr int kILP = 4;  // elements per thread per iteration

// The functor's lists, in order.
enum List : int {
  kParam = 0,           // scalar_t, updated in place
  kGrad = 1,            // scalar_t, read only
  kMomentumBuffer = 2,  // scalar_t, nullptr when momentum == 0
  kKeepMask = 3,        // uint8 (bool), nullptr where the parameter has no keep mask
  kDecayMask = 4,       // uint8 (bool), nullptr where the parameter has no decay mask
  kGradSum = 5,         // opmath_t, nullptr unless the undecayed gradient is summed
  kNumLists = 6,
};

// A hyper-parameter of undecayed_sgd_.tensor that the kernel reads on the device; data is
// nullptr where SgdScalars holds the value already (a float, or a tensor on the CPU).
struct DeviceScalar {
  const void* data = nullptr;
  bool is_double = false;

  DeviceScalar() = default;
  explicit DeviceScalar(const at::Tensor* value)
      : data(value != nullptr ? value->const_data_ptr() : nullptr),
        is_double(value != nullptr && value->scalar_type() == at::kDouble) {}

  // Rounded as SgdScalars rounds a double: through the tensor's own type.
  template <typename opmath_t>
  __device__ __forceinline__ opmath_t read() const {
    return is_double ? static_cast<opmath_t>(*static_cast<const double*>(data))
                     : static_cast<opmath_t>(*static_cast<const float*>(data));
  }
};

template <typename T>
__device__ __forceinline__ bool is_aligned(const T* pointer) {
  return pointer == nullptr || reinterpret_cast<uintptr_t>(pointer) % (sizeof(T) * kILP) == 0;
}

template <typename T>
__device__ __forceinline__ void load(T (&out)[kILP], const T* base, int64_t i) {
  const auto pack = reinterpret_cast<const Pack<T, kILP>*>(base)[i];
#pragma unroll
  for (int j = 0; j < kILP; ++j) {
    out[j] = pack.value[j];
  }
}

template <typename T>
__device__ __forceinline__ void store(T* base, int64_t i, const T (&in)[kILP]) {
  Pack<T, kILP> pack;
#pragma unroll
  for (int j = 0; j < kILP; ++j) {
    pack.value[j] = in[j];
  }
  reinterpret_cast<Pack<T, kILP>*>(base)[i] = pack;
}

template <typename scalar_t>
struct UndecayedSgdFunctor {
  using opmath_t = at::opmath_type<scalar_t>;

  __device__ __forceinline__ void operator()(const TensorListMetadata<kNumLists>& meta, int tensor,
                                             int64_t begin, int64_t count,
                                             SgdScalars<opmath_t> s, const float* grad_scale,
                                             const float* found_inf, DeviceScalar lr,
                                             DeviceScalar weight_decay) {
    if (found_inf != nullptr && *found_inf != 0.0f) {
      return;  // AMP overflow: the step changes nothing
    }
    if (lr.data != nullptr) {
      s.neg_lr = -lr.read<opmath_t>();  // -(opmath_t)lr == (opmath_t)-lr, as SgdScalars has it
    }
    if (weight_decay.data != nullptr) {
      s.weight_decay = weight_decay.read<opmath_t>();
      s.has_weight_decay = s.weight_decay != opmath_t(0);
    }
    if (grad_scale != nullptr) {
      s.grad_scale = static_cast<opmath_t>(*grad_scale);
      s.has_grad_scale = true;
    }
    const auto offset = [&](int list, auto* typed) -> decltype(typed) {
      auto* base = static_cast<decltype(typed)>(meta.addresses[list][tensor]);
      return base == nullptr ? nullptr : base + begin;
    };
    scalar_t* param = offset(kParam, static_cast<scalar_t*>(nullptr));
    const scalar_t* grad = offset(kGrad, static_cast<scalar_t*>(nullptr));
    scalar_t* buf = offset(kMomentumBuffer, static_cast<scalar_t*>(nullptr));
    const uint8_t* keep = offset(kKeepMask, static_cast<uint8_t*>(nullptr));
    const uint8_t* decay = offset(kDecayMask, static_cast<uint8_t*>(nullptr));
    opmath_t* grad_sum = offset(kGradSum, static_cast<opmath_t*>(nullptr));

    const bool vectorized = count % kILP == 0 && is_aligned(param) && is_aligned(grad) &&
                            is_aligned(buf) && is_aligned(keep) && is_aligned(decay) &&
                            is_aligned(grad_sum);
    if (vectorized) {
      for (int64_t i = threadIdx.x; i * kILP < count; i += blockDim.x) {
        scalar_t w[kILP], g[kILP], b[kILP] = {};
        uint8_t k[kILP] = {1, 1, 1, 1}, d[kILP] = {1, 1, 1, 1};
        opmath_t gs[kILP] = {};
        load(w, param, i);
        load(g, grad, i);
        if (buf != nullptr && !s.is_first_step) load(b, buf, i);
        if (keep != nullptr) load(k, keep, i);
        if (decay != nullptr) load(d, decay, i);
        if (grad_sum != nullptr) load(gs, grad_sum, i);
#pragma unroll
        for (int j = 0; j < kILP; ++j) {
          // gs in every case (stored back only where there are sums): a pointer chosen at
          // run time would keep the array out of registers.
          undecayed_sgd_update<scalar_t, opmath_t>(j, w, g, b, gs, k[j] != 0, d[j] != 0, s);
        }
        store(param, i, w);
        if (buf != nullptr) store(buf, i, b);
        if (grad_sum != nullptr) store(grad_sum, i, gs);
      }
      return;
    }
    for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
      undecayed_sgd_update<scalar_t, opmath_t>(i, param, grad, buf, grad_sum,
                                               keep == nullptr || keep[i] != 0,
                                               decay == nullptr || decay[i] != 0, s);
    }
  }
};

// Both overloads: `device_lr` / `device_weight_decay` (CUDA tensors), when given, replace
// `lr` / `weight_decay`.
void launch_undecayed_sgd(at::TensorList params, at::TensorList grads,
                          at::TensorList momentum_buffers,
                          const c10::List<std::optional<at::Tensor>>& keep_masks,
                          const c10::List<std::optional<at::Tensor>>& decay_masks,
                          at::TensorList grad_sums, double lr, const at::Tensor* device_lr,
                          double momentum, double dampening, double weight_decay,
                          const at::Tensor* device_weight_decay, bool nesterov, bool maximize,
                          bool is_first_step, const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf, bool keep_masks_packed) {
  // Bit-packed keep masks save the CPU's single core a stream of bytes; on a GPU the byte
  // masks cost 5% of the traffic, and the kernel reads bytes.
  TORCH_CHECK(!keep_masks_packed,
              "undecayed_sgd_ (CUDA kernel): keep_masks_packed is taken by the CPU kernel only; "
              "pass one bool/uint8 byte per element");
  check_undecayed_sgd_args(params, grads, momentum_buffers, keep_masks, decay_masks, grad_sums,
                           momentum, grad_scale, found_inf, keep_masks_packed);
  if (params.empty()) {
    return;
  }
  TORCH_CHECK(params[0].is_cuda(), "undecayed_sgd_ (CUDA kernel): expected CUDA tensors, got ",
              params[0].device());
  const DeviceScalar lr_on_device(device_lr);
  const DeviceScalar weight_decay_on_device(device_weight_decay);
  const c10::cuda::CUDAGuard device_guard(params[0].device());
  const float* grad_scale_ptr =
      grad_scale.has_value() ? grad_scale->const_data_ptr<float>() : nullptr;
  const float* found_inf_ptr = found_inf.has_value() ? found_inf->const_data_ptr<float>() : nullptr;

  // One launch sequence per dtype present in the lists.
  std::map<at::ScalarType, std::vector<size_t>> by_dtype;
  for (size_t i = 0; i < params.size(); ++i) {
    by_dtype[params[i].scalar_type()].push_back(i);
  }
  for (const auto& [dtype, indices] : by_dtype) {
    std::vector<std::array<void*, kNumLists>> addresses;
    std::vector<int64_t> numels;
    addresses.reserve(indices.size());
    numels.reserve(indices.size());
    for (const size_t i : indices) {
      addresses.push_back({params[i].data_ptr(), const_cast<void*>(grads[i].const_data_ptr()),
                           momentum_buffers.empty() ? nullptr : momentum_buffers[i].data_ptr(),
                           const_cast<uint8_t*>(mask_data(keep_masks, i)),
                           const_cast<uint8_t*>(mask_data(decay_masks, i)),
                           grad_sums.empty() ? nullptr : grad_sums[i].data_ptr()});
      numels.push_back(params[i].numel());
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "undecayed_sgd_cuda_", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      const SgdScalars<opmath_t> scalars(lr, momentum, dampening, weight_decay, nesterov,
                                         maximize, is_first_step);
      cuda::multi_tensor_apply<kNumLists>(addresses, numels, UndecayedSgdFunctor<scalar_t>(),
                                          scalars, grad_scale_ptr, found_inf_ptr, lr_on_device,
                                          weight_decay_on_device);
    });
  }
}

void undecayed_sgd_cuda_(at::TensorList params, at::TensorList grads,
                         at::TensorList momentum_buffers,
                         const c10::List<std::optional<at::Tensor>>& keep_masks,
                         const c10::List<std::optional<at::Tensor>>& decay_masks,
                         at::TensorList grad_sums, double lr, double momentum, double dampening,
                         double weight_decay, bool nesterov, bool maximize, bool is_first_step,
                         const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf, bool keep_masks_packed) {
  launch_undecayed_sgd(params, grads, momentum_buffers, keep_masks, decay_masks, grad_sums, lr,
                       nullptr, momentum, dampening, weight_decay, nullptr, nesterov, maximize,
                       is_first_step, grad_scale, found_inf, keep_masks_packed);
}

void undecayed_sgd_cuda_tensor_(at::TensorList params, at::TensorList grads,
                                at::TensorList momentum_buffers,
                                const c10::List<std::optional<at::Tensor>>& keep_masks,
                                const c10::List<std::optional<at::Tensor>>& decay_masks,
                                at::TensorList grad_sums, const at::Tensor& lr, double momentum,
                                double dampening, const at::Tensor& weight_decay, bool nesterov,
                                bool maximize, bool is_first_step,
                                const std::optional<at::Tensor>& grad_scale,
                                const std::optional<at::Tensor>& found_inf,
                                bool keep_masks_packed) {
  check_scalar_tensor(lr, "lr", params);
  check_scalar_tensor(weight_decay, "weight_decay", params);
  // A CPU tensor is read on the host at no cost, as torch's fused SGD reads its lr.
  const at::Tensor* device_lr = lr.is_cpu() ? nullptr : &lr;
  const at::Tensor* device_weight_decay = weight_decay.is_cpu() ? nullptr : &weight_decay;
  launch_undecayed_sgd(params, grads, momentum_buffers, keep_masks, decay_masks, grad_sums,
                       lr.is_cpu() ? lr.item<double>() : 0.0, device_lr, momentum, dampening,
                       weight_decay.is_cpu() ? weight_decay.item<double>() : 0.0,
                       device_weight_decay, nesterov, maximize, is_first_step, grad_scale,
                       found_inf, keep_masks_packed);
}

// recallprune::cuda_kernel_image_problem: "" when this build holds code that runs on device
// `device_index` (an image for its architecture, or PTX the driver compiles for it), else the
// CUDA runtime's reason. Every CUDA source is compiled for the same architectures, so one of
// the library's kernels answers for all of them. Without this check a GPU of another
// architecture would fail at the first launch ("no kernel image is available"), after the
// library had chosen its kernels over the reference.
std::string cuda_kernel_image_problem(int64_t device_index) {
  const c10::cuda::CUDAGuard device_guard(static_cast<c10::DeviceIndex>(device_index));
  cudaFuncAttributes attributes;
  // The fp32 step's kernel, as launch_undecayed_sgd launches it.
  void (*kernel)(TensorListMetadata<kNumLists>, UndecayedSgdFunctor<float>, SgdScalars<float>,
                 const float*, const float*, DeviceScalar, DeviceScalar) =
      &cuda::multi_tensor_kernel<kNumLists, UndecayedSgdFunctor<float>>;
  const cudaError_t status =
      cudaFuncGetAttributes(&attributes, reinterpret_cast<const void*>(kernel));
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

TORCH_LIBRARY_IMPL(recallprune, CUDA, m) {
  m.impl("undecayed_sgd_", &undecayed_sgd_cuda_);
  m.impl("undecayed_sgd_.tensor", &undecayed_sgd_cuda_tensor_);
}

}  // namespace recallprune
