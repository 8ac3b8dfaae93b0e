// The inner loops of the CPU kernels, compiled once per instruction set (kernels_default.cpp,
// kernels_avx2.cpp, kernels_avx512.cpp include kernels.inl) and chosen at run time to match
// the instruction set torch itself uses (at::get_cpu_capability(), ATEN_CPU_CAPABILITY).
// The ops (parallel loops, histograms) live in undecayed_sgd_cpu.cpp and confusion_cpu.cpp.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace recallprune::cpu {

// Elements [begin, end) of one parameter and its lists; absent lists are nullptr.
struct SgdRange {
  c10::ScalarType dtype;
  void* param;
  const void* grad;
  void* momentum_buffer;
  const uint8_t* keep_mask;
  const uint8_t* decay_mask;
  void* grad_sum;  // float (double for float64 parameters)
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
struct ArgmaxBlock {
  c10::ScalarType dtype;
  const void* logits;
  int64_t num_classes;
  int64_t inner;
  int64_t n0;
  int64_t n1;
  int64_t* pred;
};

struct KernelTable {
  const char* instruction_set;
  void (*sgd_update)(const SgdRange&, const SgdHyper&);
  void (*argmax)(const ArgmaxBlock&);
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
