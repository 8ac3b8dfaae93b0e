// The CPU kernels compiled for AVX-512 (chosen at run time where torch uses AVX-512), with the
// flags of the [avx512] section of csrc/sources.txt, which setup.py and CMakeLists.txt add on
// x86-64 only.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && defined(__FMA__) && defined(__F16C__)
#if defined(__GNUC__) && !defined(__clang__)
// GCC flags its own AVX-512 intrinsics (the undefined-vector idiom) as maybe-uninitialized,
// and its shuffles of 128-bit lanes (_mm512_shuffle_f32x4) as uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "kernels.inl"
#elif defined(__x86_64__)
#error "kernels_avx512.cpp needs the flags of the [avx512] section of csrc/sources.txt"
#else
// Another architecture: torch has no AVX-512 kernels there either.
#include "kernels.h"
namespace recallprune::cpu::AVX512 {
const KernelTable* table() { return DEFAULT::table(); }
}  // namespace recallprune::cpu::AVX512
#endif
