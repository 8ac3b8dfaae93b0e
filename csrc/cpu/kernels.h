// The inner loops of the CPU kernels, compiled once per instruction set (kernels_default.cpp,
// kernels_avx2.cpp, kernels_avx512.cpp include kernels.inl; the last two with the flags of
// their sections in csrc/sources.txt) and chosen at run time to match the instruction set
// torch itself uses (at::get_cpu_capability(), ATEN_CPU_CAPABILITY). The ops (argument
// checks, the dtype switch, parallel loops, histograms) live in undecayed_sgd_cpu.cpp and
// confusion_cpu.cpp, compiled for the baseline instruction set.
//
// Plain C++ only: the per-instruction-set files include this header, and any inline code
// they share with the rest of the library could end up, in the linked library, as their
// copy, with their instructions.
#pragma once

#include <cstdint>

namespace recallprune::cpu {

// Elements [begin, end) of one parameter and its lists; absent lists are nullptr.
// fp16 and bf16 tensors travel as their bits (uint16_t), with float sums. The keep mask holds
// a byte per element, or with keep_bits a bit (bit e % 8 of byte e / 8); begin is then a
// multiple of 64.
template <typename scalar_t, typename opmath_t>
struct SgdRange {
  scalar_t* param;
  const scalar_t* grad;
  scalar_t* momentum_buffer;
  const uint8_t* keep_mask;
  bool keep_bits;
  const uint8_t* decay_mask;
  opmath_t* grad_sum;
  int64_t begin;
  int64_t end;
};

struct SgdHyper {
  double lr;
  double momentum;
  double dampening;
  double weight_decay;
  bool nesterov;
  bool maximize;
  bool is_first_step;
  const float* grad_scale;  // nullptr unless AMP-scaled
};

// Rows [n0, n1) of contiguous logits [N, C, S]: pred[(n - n0) * S + s] = argmax over C.
// fp16 and bf16 logits travel as their bits (uint16_t).
template <typename scalar_t>
struct ArgmaxBlock {
  const scalar_t* logits;
  int64_t num_classes;
  int64_t inner;
  int64_t n0;
  int64_t n1;
  int64_t* pred;
};

template <typename scalar_t, typename opmath_t = scalar_t>
using SgdKernel = void (*)(const SgdRange<scalar_t, opmath_t>&, const SgdHyper&);
template <typename scalar_t>
using ArgmaxKernel = void (*)(const ArgmaxBlock<scalar_t>&);

// One instruction set's kernels, one per dtype.
struct KernelTable {
  const char* instruction_set;
  SgdKernel<float> sgd_float;
  SgdKernel<double> sgd_double;
  SgdKernel<uint16_t, float> sgd_half;
  SgdKernel<uint16_t, float> sgd_bfloat16;
  ArgmaxKernel<float> argmax_float;
  ArgmaxKernel<double> argmax_double;
  ArgmaxKernel<uint16_t> argmax_half;
  ArgmaxKernel<uint16_t> argmax_bfloat16;
};

// The table for this CPU.
const KernelTable& kernels();

// One table per instruction set; where a set cannot be compiled, its table is DEFAULT's.
namespace DEFAULT {
const KernelTable* table();
}
namespace AVX2 {
const KernelTable* table();
}
namespace AVX512 {
const KernelTable* table();
}

}  // namespace recallprune::cpu
