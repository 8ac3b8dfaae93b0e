// The CPU kernels compiled for AVX2 + FMA (chosen at run time where torch uses AVX2), with the
// flags of the [avx2] section of csrc/sources.txt, which setup.py and CMakeLists.txt add on
// x86-64 only.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernels.inl"
#elif defined(__x86_64__)
#error "kernels_avx2.cpp needs the flags of the [avx2] section of csrc/sources.txt"
#else
// Another architecture: torch has no AVX2 kernels there either.
#include "kernels.h"
namespace recallprune::cpu::AVX2 {
const KernelTable* table() { return DEFAULT::table(); }
}  // namespace recallprune::cpu::AVX2
#endif
