// The CPU kernels compiled for AVX-512 (chosen at run time where torch uses AVX-512).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// The standard headers first, compiled without the target pragma: GCC 13 refuses to inline
// their functions into code of another target ("target specific option mismatch").
#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cmath>
#include <complex>
#include <cstdint>
#include <cstring>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <ostream>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <variant>
#include <vector>
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
// The pragma enables the instructions but not their feature macros, which the ATen and
// Sleef headers test: define them for this file only.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __BMI__ 1
#define __BMI2__ 1
#define __LZCNT__ 1
#define __POPCNT__ 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
// GCC flags its own intrinsics headers (the undefined-vector idiom) as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "kernels.inl"
#else
#include "kernels.h"
namespace recallprune::cpu::AVX512 {
const KernelTable* table() { return DEFAULT::table(); }
}  // namespace recallprune::cpu::AVX512
#endif
