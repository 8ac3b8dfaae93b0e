// The inner loops of the CPU kernels, written once with at::vec::Vectorized and intrinsics
// and compiled per instruction set: the including file defines CPU_CAPABILITY (and, for
// AVX2/AVX-512, CPU_CAPABILITY_AVX2 / CPU_CAPABILITY_AVX512) and is compiled with that
// instruction set's flags (csrc/sources.txt). Everything here lives in
// recallprune::cpu::CPU_CAPABILITY or has internal linkage, so the copies never mix; and it
// includes only at::vec (whose code lives in at::vec::CPU_CAPABILITY), headers of plain
// C++ and the per-element math (c10/macros only): no code it shares with the rest of the
// library can be compiled here with the wider instructions. The dtype switch is the
// caller's (undecayed_sgd_cpu.cpp, confusion_cpu.cpp): the table holds one kernel per dtype.
#include "confusion_element.h"
#include "kernels.h"
#include "undecayed_sgd_element.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstring>
#include <cstdlib>
#include <new>
#include <type_traits>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace recallprune::cpu::CPU_CAPABILITY {
namespace {

// ---- UndecayedSGD ---------------------------------------------------------------------

// Bytes of a bool mask (0 or 1) -> a lane mask (all bits set where the byte is 1). The
// widening loop has no branch, so the compiler turns it into a few vector instructions and
// the cost does not depend on the mask's values.
template <typename T>
inline at::vec::Vectorized<T> load_mask(const uint8_t* mask) {
  using Vec = at::vec::Vectorized<T>;
  alignas(64) T lanes[Vec::size()];
  for (int j = 0; j < Vec::size(); ++j) {
    lanes[j] = static_cast<T>(mask[j]);
  }
  return Vec::loadu(lanes) != Vec(T(0));
}

// The same with the instruction set's own byte-to-lane widening.
#if defined(CPU_CAPABILITY_AVX512)
template <>
inline at::vec::Vectorized<float> load_mask<float>(const uint8_t* mask) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(mask));
  return _mm512_castsi512_ps(_mm512_movm_epi32(_mm_test_epi8_mask(bytes, bytes)));
}
template <>
inline at::vec::Vectorized<double> load_mask<double>(const uint8_t* mask) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(mask));
  return _mm512_castsi512_pd(
      _mm512_movm_epi64(static_cast<__mmask8>(_mm_test_epi8_mask(bytes, bytes))));
}
#elif defined(CPU_CAPABILITY_AVX2)
template <>
inline at::vec::Vectorized<float> load_mask<float>(const uint8_t* mask) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(mask));
  const __m256i lanes = _mm256_cvtepu8_epi32(bytes);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(lanes, _mm256_setzero_si256()));
}
template <>
inline at::vec::Vectorized<double> load_mask<double>(const uint8_t* mask) {
  int32_t word;
  std::memcpy(&word, mask, sizeof(word));
  const __m256i lanes = _mm256_cvtepu8_epi64(_mm_cvtsi32_si128(word));
  return _mm256_castsi256_pd(_mm256_cmpgt_epi64(lanes, _mm256_setzero_si256()));
}
#endif

// Bits of a packed keep mask (bit e % 8 of byte e / 8 for element e) -> the lane mask of
// elements [i, i + size), i a multiple of the vector's size: its bits lie in one byte, or in
// whole bytes.
template <typename T>
inline at::vec::Vectorized<T> load_mask_bits(const uint8_t* bits, int64_t i) {
  using Vec = at::vec::Vectorized<T>;
  alignas(64) T lanes[Vec::size()];
  for (int j = 0; j < Vec::size(); ++j) {
    const int64_t e = i + j;
    lanes[j] = static_cast<T>((bits[e >> 3] >> (e & 7)) & 1);
  }
  return Vec::loadu(lanes) != Vec(T(0));
}

#if defined(CPU_CAPABILITY_AVX512)
// Sixteen or eight bits are an AVX-512 mask register as they are.
template <>
inline at::vec::Vectorized<float> load_mask_bits<float>(const uint8_t* bits, int64_t i) {
  uint16_t word;
  std::memcpy(&word, bits + (i >> 3), sizeof(word));
  return _mm512_castsi512_ps(_mm512_movm_epi32(_cvtu32_mask16(word)));
}
template <>
inline at::vec::Vectorized<double> load_mask_bits<double>(const uint8_t* bits, int64_t i) {
  return _mm512_castsi512_pd(_mm512_movm_epi64(_cvtu32_mask8(bits[i >> 3])));
}
#elif defined(CPU_CAPABILITY_AVX2)
// Eight bits -> eight 32-bit lanes through a table (8 KiB): one load, as cheap as widening
// eight bytes, where spreading the bits over the lanes takes four instructions.
struct alignas(32) BitLanes {
  int32_t lane[8];
};
constexpr std::array<BitLanes, 256> make_bit_lanes() {
  std::array<BitLanes, 256> table{};
  for (int byte = 0; byte < 256; ++byte) {
    for (int j = 0; j < 8; ++j) {
      table[byte].lane[j] = (byte >> j) & 1 ? -1 : 0;
    }
  }
  return table;
}
alignas(64) constexpr std::array<BitLanes, 256> kBitLanes = make_bit_lanes();

template <>
inline at::vec::Vectorized<float> load_mask_bits<float>(const uint8_t* bits, int64_t i) {
  const auto* lanes = reinterpret_cast<const __m256i*>(kBitLanes[bits[i >> 3]].lane);
  return _mm256_castsi256_ps(_mm256_load_si256(lanes));
}
template <>
inline at::vec::Vectorized<double> load_mask_bits<double>(const uint8_t* bits, int64_t i) {
  const __m256i select = _mm256_setr_epi64x(1, 2, 4, 8);
  const int64_t nibble = (bits[i >> 3] >> (i & 4)) & 15;
  const __m256i set = _mm256_and_si256(_mm256_set1_epi64x(nibble), select);
  return _mm256_castsi256_pd(_mm256_cmpeq_epi64(set, select));
}
#endif

// The vector type of the update loop. at::vec's DEFAULT Vectorized is an array the compiler
// walks lane by lane (with a branch per lane in its blendv), so on x86-64 without AVX2 the
// loop takes SSE2 registers of its own instead: the same operations, four floats or two
// doubles at a time, multiply and add rounded apart as DEFAULT's fmadd does.
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512) || !defined(__SSE2__)
template <typename T>
using SgdVec = at::vec::Vectorized<T>;

template <typename T>
inline SgdVec<T> mul_add(const SgdVec<T>& a, const SgdVec<T>& b, const SgdVec<T>& c) {
  return at::vec::fmadd(a, b, c);
}

template <typename T>
inline SgdVec<T> load_keep(const uint8_t* mask) {
  return load_mask<T>(mask);
}

template <typename T>
inline SgdVec<T> load_keep_bits(const uint8_t* bits, int64_t i) {
  return load_mask_bits<T>(bits, i);
}
#else
template <typename T>
struct Sse2Ops;

template <>
struct Sse2Ops<float> {
  using Reg = __m128;
  static constexpr int kSize = 4;
  static Reg broadcast(float v) { return _mm_set1_ps(v); }
  static Reg load(const float* p) { return _mm_loadu_ps(p); }
  static void store(float* p, Reg v) { _mm_storeu_ps(p, v); }
  static Reg add(Reg a, Reg b) { return _mm_add_ps(a, b); }
  static Reg mul(Reg a, Reg b) { return _mm_mul_ps(a, b); }
  static Reg div(Reg a, Reg b) { return _mm_div_ps(a, b); }
  static Reg bit_xor(Reg a, Reg b) { return _mm_xor_ps(a, b); }
  static Reg bit_and(Reg a, Reg b) { return _mm_and_ps(a, b); }
  static Reg select(Reg m, Reg a, Reg b) {  // b where m is set
    return _mm_or_ps(_mm_andnot_ps(m, a), _mm_and_ps(m, b));
  }
  // Four mask bytes (0 or 1) -> four lanes, all bits set where the byte is 1.
  static Reg lanes(const uint8_t* mask) {
    int32_t word;
    std::memcpy(&word, mask, sizeof(word));
    const __m128i zero = _mm_setzero_si128();
    const __m128i bytes = _mm_cvtsi32_si128(word);
    const __m128i words = _mm_unpacklo_epi16(_mm_unpacklo_epi8(bytes, zero), zero);
    return _mm_castsi128_ps(_mm_cmpgt_epi32(words, zero));
  }
  // The half byte of packed bits of elements [i, i + 4), each lane testing its own bit.
  static Reg lane_bits(const uint8_t* bits, int64_t i) {
    const __m128i select = _mm_setr_epi32(1, 2, 4, 8);
    const int nibble = (bits[i >> 3] >> (i & 4)) & 15;
    const __m128i set = _mm_and_si128(_mm_set1_epi32(nibble), select);
    return _mm_castsi128_ps(_mm_cmpeq_epi32(set, select));
  }
};

template <>
struct Sse2Ops<double> {
  using Reg = __m128d;
  static constexpr int kSize = 2;
  static Reg broadcast(double v) { return _mm_set1_pd(v); }
  static Reg load(const double* p) { return _mm_loadu_pd(p); }
  static void store(double* p, Reg v) { _mm_storeu_pd(p, v); }
  static Reg add(Reg a, Reg b) { return _mm_add_pd(a, b); }
  static Reg mul(Reg a, Reg b) { return _mm_mul_pd(a, b); }
  static Reg div(Reg a, Reg b) { return _mm_div_pd(a, b); }
  static Reg bit_xor(Reg a, Reg b) { return _mm_xor_pd(a, b); }
  static Reg bit_and(Reg a, Reg b) { return _mm_and_pd(a, b); }
  static Reg select(Reg m, Reg a, Reg b) {
    return _mm_or_pd(_mm_andnot_pd(m, a), _mm_and_pd(m, b));
  }
  // Two mask bytes -> two 64-bit lanes: widened to 32 bits, compared, each word doubled.
  static Reg lanes(const uint8_t* mask) {
    uint16_t pair;
    std::memcpy(&pair, mask, sizeof(pair));
    const __m128i zero = _mm_setzero_si128();
    const __m128i bytes = _mm_cvtsi32_si128(pair);
    const __m128i words = _mm_unpacklo_epi16(_mm_unpacklo_epi8(bytes, zero), zero);
    const __m128i set = _mm_cmpgt_epi32(words, zero);
    return _mm_castsi128_pd(_mm_shuffle_epi32(set, _MM_SHUFFLE(1, 1, 0, 0)));
  }
  // Two packed bits of elements [i, i + 2) -> two 64-bit lanes.
  static Reg lane_bits(const uint8_t* bits, int64_t i) {
    const int pair = (bits[i >> 3] >> (i & 6)) & 3;
    const int low = -(pair & 1);
    const int high = -((pair >> 1) & 1);
    return _mm_castsi128_pd(_mm_set_epi32(high, high, low, low));
  }
};

// The part of at::vec::Vectorized's interface that sgd_vectorized uses.
template <typename T>
class SgdVec {
  using Ops = Sse2Ops<T>;

 public:
  typename Ops::Reg reg;

  SgdVec() = default;
  explicit SgdVec(typename Ops::Reg r) : reg(r) {}
  explicit SgdVec(T value) : reg(Ops::broadcast(value)) {}
  static constexpr int size() { return Ops::kSize; }
  static SgdVec loadu(const T* p) { return SgdVec(Ops::load(p)); }
  void store(T* p) const { Ops::store(p, reg); }
  SgdVec operator+(const SgdVec& o) const { return SgdVec(Ops::add(reg, o.reg)); }
  SgdVec operator*(const SgdVec& o) const { return SgdVec(Ops::mul(reg, o.reg)); }
  SgdVec operator/(const SgdVec& o) const { return SgdVec(Ops::div(reg, o.reg)); }
  SgdVec operator&(const SgdVec& o) const { return SgdVec(Ops::bit_and(reg, o.reg)); }
  SgdVec neg() const { return SgdVec(Ops::bit_xor(reg, Ops::broadcast(T(-0.0)))); }
  static SgdVec blendv(const SgdVec& a, const SgdVec& b, const SgdVec& mask) {
    return SgdVec(Ops::select(mask.reg, a.reg, b.reg));
  }
};

template <typename T>
inline SgdVec<T> mul_add(const SgdVec<T>& a, const SgdVec<T>& b, const SgdVec<T>& c) {
  return a * b + c;
}

template <typename T>
inline SgdVec<T> load_keep(const uint8_t* mask) {
  return SgdVec<T>(Sse2Ops<T>::lanes(mask));
}

template <typename T>
inline SgdVec<T> load_keep_bits(const uint8_t* bits, int64_t i) {
  return SgdVec<T>(Sse2Ops<T>::lane_bits(bits, i));
}
#endif

// Vectorised body for float and double: the same steps as undecayed_sgd_element, with
// fused multiply-adds where torch's CPU kernels use them. The common switches (a keep mask,
// momentum, weight decay) are template parameters, so the hot loop carries no test of them.
// Returns where it stopped.
template <typename T, bool kMasked, bool kBits, bool kMomentum, bool kDecay>
int64_t sgd_vectorized(T* param, const T* grad, T* momentum_buffer, const uint8_t* keep_mask,
                       const uint8_t* decay_mask, T* grad_sum, int64_t begin, int64_t end,
                       const SgdScalars<T>& s, const T* grad_scale) {
  using Vec = SgdVec<T>;
  const Vec neg_lr(s.neg_lr), momentum(s.momentum), one_minus_dampening(s.one_minus_dampening),
      weight_decay(s.weight_decay);
  int64_t i = begin;
  for (; i + Vec::size() <= end; i += Vec::size()) {
    Vec g = Vec::loadu(grad + i);
    if (grad_scale != nullptr) {
      g = g / Vec(*grad_scale);
    }
    const Vec w = Vec::loadu(param + i);
    Vec keep;
    if constexpr (kMasked && kBits) {
      keep = load_keep_bits<T>(keep_mask, i);
    } else if constexpr (kMasked) {
      keep = load_keep<T>(keep_mask + i);
    }
    if (grad_sum != nullptr) {
      const Vec old_sum = Vec::loadu(grad_sum + i);
      const Vec new_sum = old_sum + g;
      if constexpr (kMasked) {
        Vec::blendv(old_sum, new_sum, keep).store(grad_sum + i);
      } else {
        new_sum.store(grad_sum + i);
      }
    }
    if (s.maximize) {
      g = g.neg();
    }
    if constexpr (kDecay) {
      const Vec decayed = mul_add<T>(w, weight_decay, g);
      g = decay_mask != nullptr ? Vec::blendv(g, decayed, load_keep<T>(decay_mask + i)) : decayed;
    }
    if constexpr (kMomentum) {
      Vec buf = s.is_first_step
                    ? g
                    : mul_add<T>(g, one_minus_dampening, Vec::loadu(momentum_buffer + i) * momentum);
      g = s.nesterov ? mul_add<T>(buf, momentum, g) : buf;
      if constexpr (kMasked) {
        buf = buf & keep;  // zero where pruned: the lane mask is all bits or none
      }
      buf.store(momentum_buffer + i);
    }
    Vec new_w = mul_add<T>(g, neg_lr, w);
    if constexpr (kMasked) {
      new_w = new_w & keep;
    }
    new_w.store(param + i);
  }
  return i;
}

// Picks the instantiation of sgd_vectorized for the switches of this step.
template <typename T>
int64_t sgd_vectorized_dispatch(T* param, const T* grad, T* momentum_buffer,
                                const uint8_t* keep_mask, bool keep_bits,
                                const uint8_t* decay_mask, T* grad_sum, int64_t begin,
                                int64_t end, const SgdScalars<T>& s, const T* grad_scale) {
  const auto run = [&](auto masked, auto bits, auto with_momentum, auto decay) {
    return sgd_vectorized<T, decltype(masked)::value, decltype(bits)::value,
                          decltype(with_momentum)::value, decltype(decay)::value>(
        param, grad, momentum_buffer, keep_mask, decay_mask, grad_sum, begin, end, s,
        grad_scale);
  };
  const auto with_decay = [&](auto masked, auto bits, auto with_momentum) {
    return s.has_weight_decay ? run(masked, bits, with_momentum, std::true_type{})
                              : run(masked, bits, with_momentum, std::false_type{});
  };
  const auto with_momentum = [&](auto masked, auto bits) {
    return s.has_momentum ? with_decay(masked, bits, std::true_type{})
                          : with_decay(masked, bits, std::false_type{});
  };
  if (keep_mask == nullptr) {
    return with_momentum(std::false_type{}, std::false_type{});
  }
  return keep_bits ? with_momentum(std::true_type{}, std::true_type{})
                   : with_momentum(std::true_type{}, std::false_type{});
}

// The element type of the table's pointers for a dtype: fp16 and bf16 travel as their bits,
// and are read here as the c10 types that convert them to and from float.
template <typename scalar_t>
struct TableElement {
  using type = scalar_t;
};
template <>
struct TableElement<c10::Half> {
  using type = uint16_t;
};
template <>
struct TableElement<c10::BFloat16> {
  using type = uint16_t;
};

// One range of one parameter: the vectorised body for float and double, then the scalar
// tail (the whole range for fp16/bf16, computed in float) one element at a time.
template <typename scalar_t, typename opmath_t>
void sgd(const SgdRange<typename TableElement<scalar_t>::type, opmath_t>& r, const SgdHyper& h) {
  auto* param = reinterpret_cast<scalar_t*>(r.param);
  const auto* grad = reinterpret_cast<const scalar_t*>(r.grad);
  auto* momentum_buffer = reinterpret_cast<scalar_t*>(r.momentum_buffer);
  opmath_t* grad_sum = r.grad_sum;
  SgdScalars<opmath_t> s(h.lr, h.momentum, h.dampening, h.weight_decay, h.nesterov, h.maximize,
                         h.is_first_step);
  if (h.grad_scale != nullptr) {
    s.grad_scale = static_cast<opmath_t>(*h.grad_scale);
    s.has_grad_scale = true;
  }
  int64_t i = r.begin;
  // Packed bits are read a vector at a time from a whole byte: the range starts on one.
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    if (!r.keep_bits || r.begin % 64 == 0) {
      i = sgd_vectorized_dispatch<scalar_t>(param, grad, momentum_buffer, r.keep_mask,
                                            r.keep_bits, r.decay_mask, grad_sum, r.begin, r.end,
                                            s, s.has_grad_scale ? &s.grad_scale : nullptr);
    }
  }
  for (; i < r.end; ++i) {
    const bool keep = r.keep_mask == nullptr ||
                      (r.keep_bits ? (r.keep_mask[i >> 3] >> (i & 7)) & 1 : r.keep_mask[i]);
    undecayed_sgd_update<scalar_t, opmath_t>(i, param, grad, momentum_buffer, grad_sum, keep,
                                             r.decay_mask == nullptr || r.decay_mask[i], s);
  }
}

// Elements [r.begin, r.end) of a float parameter of numel elements, updated as sgd() updates
// them when it runs over the whole parameter (undecayed_sgd_'s CPU kernel): the elements below
// the last whole vector of the parameter by the vectorised body (a range's last, partial
// vector through a buffer of one vector, so that each element takes the same path, and the
// same bits, whatever range it falls in), the parameter's last few by the scalar loop. Keep
// masks are bytes here; no gradient sums, no gradient scale.
void sgd_float_part(const SgdRange<float, float>& r, const SgdHyper& h, int64_t numel) {
  const SgdScalars<float> s(h.lr, h.momentum, h.dampening, h.weight_decay, h.nesterov,
                            h.maximize, h.is_first_step);
  constexpr int64_t kLanes = SgdVec<float>::size();
  const int64_t vector_end = numel - numel % kLanes;
  const int64_t stop = std::min(r.end, vector_end);
  int64_t i = r.begin;
  if (i < stop) {
    i = sgd_vectorized_dispatch<float>(r.param, r.grad, r.momentum_buffer, r.keep_mask, false,
                                       r.decay_mask, nullptr, i, stop, s, nullptr);
  }
  if (i < stop) {
    const int64_t left = stop - i;
    float param[kLanes] = {}, grad[kLanes] = {}, buffer[kLanes] = {};
    uint8_t keep[kLanes] = {}, decay[kLanes] = {};
    std::copy(r.param + i, r.param + stop, param);
    std::copy(r.grad + i, r.grad + stop, grad);
    if (r.momentum_buffer != nullptr) std::copy(r.momentum_buffer + i, r.momentum_buffer + stop, buffer);
    if (r.keep_mask != nullptr) std::copy(r.keep_mask + i, r.keep_mask + stop, keep);
    if (r.decay_mask != nullptr) std::copy(r.decay_mask + i, r.decay_mask + stop, decay);
    sgd_vectorized_dispatch<float>(param, grad, r.momentum_buffer != nullptr ? buffer : nullptr,
                                   r.keep_mask != nullptr ? keep : nullptr, false,
                                   r.decay_mask != nullptr ? decay : nullptr, nullptr, 0, kLanes,
                                   s, nullptr);
    std::copy(param, param + left, r.param + i);
    if (r.momentum_buffer != nullptr) std::copy(buffer, buffer + left, r.momentum_buffer + i);
    i = stop;
  }
  for (i = std::max(i, r.begin); i < r.end; ++i) {
    const bool keep = r.keep_mask == nullptr || r.keep_mask[i];
    undecayed_sgd_update<float, float>(i, r.param, r.grad, r.momentum_buffer, nullptr, keep,
                                       r.decay_mask == nullptr || r.decay_mask[i], s);
  }
}

// ---- argmax ---------------------------------------------------------------------------
//
// The first index of the largest value of each row, NaN counted as the largest (the first
// NaN wins), as torch.argmax. Per number of classes C:
//  * two classes: the first and second values of the rows in two vectors are split apart
//    with shuffles and compared lane by lane.
//  * row scans, for rows of at least a vector: pass 1 takes the row's maximum with
//    contiguous loads into four accumulators, NaN noted on the side; pass 2 finds the first
//    lane equal to it while the row is still in L1, 64 lanes at a time without a branch
//    (in long rows after skipping, four vectors at a time, those without it).
//  * column blocks, for other rows shorter than about a vector: a block of rows is copied,
//    transposed, into a buffer in L1 with sequential reads, then compared one class at a
//    time with a row in each vector lane, branch-free. Gathers would save the copy but
//    stall when the rows stream in from DRAM, and they are slow on AMD's cores.

// The vector operations the argmax needs, on the widest registers of the instruction set
// this copy is compiled for: AVX-512, AVX2, SSE2 (DEFAULT on x86-64), else one lane.
// `Mask` holds a truth value per lane; `select(m, a, b)` takes b where m is true;
// `largest(v)` is the largest lane of a vector without NaN; `equal_bits` is `bits(equal)`.
// kColumnClasses: the largest C that takes column blocks. Row scans need C >= kSize, and
// measured faster from there or a little above (AMD EPYC, Zen 4, one thread, N = 65,536).
template <typename T>
struct Lanes;

#if defined(CPU_CAPABILITY_AVX512)
template <>
struct Lanes<float> {
  using Reg = __m512;
  using Mask = __mmask16;
  static constexpr int64_t kSize = 16;
  static constexpr int64_t kColumnClasses = 15;
  static Reg load(const float* p) { return _mm512_loadu_ps(p); }
  static Reg broadcast(float v) { return _mm512_set1_ps(v); }
  static void store(float* p, Reg v) { _mm512_storeu_ps(p, v); }
  static Reg max_of_numbers(Reg a, Reg b) { return _mm512_max_ps(a, b); }
  static Mask either_nan(Reg a, Reg b) { return _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q); }
  static Mask either(Mask a, Mask b) { return a | b; }
  static Mask replaces(Reg value, Reg best) {
    return _mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(best, best, _CMP_ORD_Q), value, best,
                                   _CMP_NLE_UQ);
  }
  static Reg select(Mask m, Reg a, Reg b) { return _mm512_mask_blend_ps(m, a, b); }
  static uint64_t bits(Mask m) { return m; }
  static uint64_t equal_bits(Reg a, Reg b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  static Mask equal(Reg a, Reg b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  static void split_pairs(Reg a, Reg b, Reg& first, Reg& second) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                           28, 30);
    first = _mm512_permutex2var_ps(a, even, b);
    second = _mm512_permutex2var_ps(a, _mm512_add_epi32(even, _mm512_set1_epi32(1)), b);
  }
  static float largest(Reg v) { return _mm512_reduce_max_ps(v); }
};
template <>
struct Lanes<double> {
  using Reg = __m512d;
  using Mask = __mmask8;
  static constexpr int64_t kSize = 8;
  static constexpr int64_t kColumnClasses = 11;
  static Reg load(const double* p) { return _mm512_loadu_pd(p); }
  static Reg broadcast(double v) { return _mm512_set1_pd(v); }
  static void store(double* p, Reg v) { _mm512_storeu_pd(p, v); }
  static Reg max_of_numbers(Reg a, Reg b) { return _mm512_max_pd(a, b); }
  static Mask either_nan(Reg a, Reg b) { return _mm512_cmp_pd_mask(a, b, _CMP_UNORD_Q); }
  static Mask either(Mask a, Mask b) { return a | b; }
  static Mask replaces(Reg value, Reg best) {
    return _mm512_mask_cmp_pd_mask(_mm512_cmp_pd_mask(best, best, _CMP_ORD_Q), value, best,
                                   _CMP_NLE_UQ);
  }
  static Reg select(Mask m, Reg a, Reg b) { return _mm512_mask_blend_pd(m, a, b); }
  static uint64_t bits(Mask m) { return m; }
  static uint64_t equal_bits(Reg a, Reg b) { return _mm512_cmp_pd_mask(a, b, _CMP_EQ_OQ); }
  static Mask equal(Reg a, Reg b) { return _mm512_cmp_pd_mask(a, b, _CMP_EQ_OQ); }
  static void split_pairs(Reg a, Reg b, Reg& first, Reg& second) {
    const __m512i even = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
    first = _mm512_permutex2var_pd(a, even, b);
    second = _mm512_permutex2var_pd(a, _mm512_add_epi64(even, _mm512_set1_epi64(1)), b);
  }
  static double largest(Reg v) { return _mm512_reduce_max_pd(v); }
};
#elif defined(CPU_CAPABILITY_AVX2)
// _CMP_NLE_UQ (not less-or-equal) is true for a NaN value; _CMP_ORD_Q of best keeps a NaN
// that is already there.
template <>
struct Lanes<float> {
  using Reg = __m256;
  using Mask = __m256;
  static constexpr int64_t kSize = 8;
  static constexpr int64_t kColumnClasses = 9;
  static Reg load(const float* p) { return _mm256_loadu_ps(p); }
  static Reg broadcast(float v) { return _mm256_set1_ps(v); }
  static void store(float* p, Reg v) { _mm256_storeu_ps(p, v); }
  static Reg max_of_numbers(Reg a, Reg b) { return _mm256_max_ps(a, b); }
  static Mask either_nan(Reg a, Reg b) { return _mm256_cmp_ps(a, b, _CMP_UNORD_Q); }
  static Mask either(Mask a, Mask b) { return _mm256_or_ps(a, b); }
  static Mask replaces(Reg value, Reg best) {
    return _mm256_and_ps(_mm256_cmp_ps(value, best, _CMP_NLE_UQ),
                         _mm256_cmp_ps(best, best, _CMP_ORD_Q));
  }
  static Reg select(Mask m, Reg a, Reg b) { return _mm256_blendv_ps(a, b, m); }
  static uint64_t bits(Mask m) { return static_cast<uint32_t>(_mm256_movemask_ps(m)); }
  static uint64_t equal_bits(Reg a, Reg b) { return bits(_mm256_cmp_ps(a, b, _CMP_EQ_OQ)); }
  static Mask equal(Reg a, Reg b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
  static void split_pairs(Reg a, Reg b, Reg& first, Reg& second) {
    // shuffle_ps works within 128-bit halves: pairs 0 1 4 5 2 3 6 7, then the halves swap.
    const auto in_order = [](__m256 v) {
      return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(v), 0xD8));
    };
    first = in_order(_mm256_shuffle_ps(a, b, 0x88));
    second = in_order(_mm256_shuffle_ps(a, b, 0xDD));
  }
  static float largest(Reg v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
  }
};
template <>
struct Lanes<double> {
  using Reg = __m256d;
  using Mask = __m256d;
  static constexpr int64_t kSize = 4;
  static constexpr int64_t kColumnClasses = 9;
  static Reg load(const double* p) { return _mm256_loadu_pd(p); }
  static Reg broadcast(double v) { return _mm256_set1_pd(v); }
  static void store(double* p, Reg v) { _mm256_storeu_pd(p, v); }
  static Reg max_of_numbers(Reg a, Reg b) { return _mm256_max_pd(a, b); }
  static Mask either_nan(Reg a, Reg b) { return _mm256_cmp_pd(a, b, _CMP_UNORD_Q); }
  static Mask either(Mask a, Mask b) { return _mm256_or_pd(a, b); }
  static Mask replaces(Reg value, Reg best) {
    return _mm256_and_pd(_mm256_cmp_pd(value, best, _CMP_NLE_UQ),
                         _mm256_cmp_pd(best, best, _CMP_ORD_Q));
  }
  static Reg select(Mask m, Reg a, Reg b) { return _mm256_blendv_pd(a, b, m); }
  static uint64_t bits(Mask m) { return static_cast<uint32_t>(_mm256_movemask_pd(m)); }
  static uint64_t equal_bits(Reg a, Reg b) { return bits(_mm256_cmp_pd(a, b, _CMP_EQ_OQ)); }
  static Mask equal(Reg a, Reg b) { return _mm256_cmp_pd(a, b, _CMP_EQ_OQ); }
  static void split_pairs(Reg a, Reg b, Reg& first, Reg& second) {
    // unpack works within 128-bit halves: pairs 0 2 1 3.
    first = _mm256_permute4x64_pd(_mm256_unpacklo_pd(a, b), 0xD8);
    second = _mm256_permute4x64_pd(_mm256_unpackhi_pd(a, b), 0xD8);
  }
  static double largest(Reg v) {
    const __m128d m = _mm_max_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_max_sd(m, _mm_unpackhi_pd(m, m)));
  }
};
#elif defined(__SSE2__)
// cmpnle is true for a NaN value; cmpord of best keeps a NaN that is already there. SSE2
// has no blend instruction: select is and/andnot/or.
template <>
struct Lanes<float> {
  using Reg = __m128;
  using Mask = __m128;
  static constexpr int64_t kSize = 4;
  static constexpr int64_t kColumnClasses = 7;
  static Reg load(const float* p) { return _mm_loadu_ps(p); }
  static Reg broadcast(float v) { return _mm_set1_ps(v); }
  static void store(float* p, Reg v) { _mm_storeu_ps(p, v); }
  static Reg max_of_numbers(Reg a, Reg b) { return _mm_max_ps(a, b); }
  static Mask either_nan(Reg a, Reg b) { return _mm_cmpunord_ps(a, b); }
  static Mask either(Mask a, Mask b) { return _mm_or_ps(a, b); }
  static Mask replaces(Reg value, Reg best) {
    return _mm_and_ps(_mm_cmpnle_ps(value, best), _mm_cmpord_ps(best, best));
  }
  static Reg select(Mask m, Reg a, Reg b) {
    return _mm_or_ps(_mm_andnot_ps(m, a), _mm_and_ps(m, b));
  }
  static uint64_t bits(Mask m) { return static_cast<uint32_t>(_mm_movemask_ps(m)); }
  static uint64_t equal_bits(Reg a, Reg b) { return bits(_mm_cmpeq_ps(a, b)); }
  static Mask equal(Reg a, Reg b) { return _mm_cmpeq_ps(a, b); }
  static void split_pairs(Reg a, Reg b, Reg& first, Reg& second) {
    first = _mm_shuffle_ps(a, b, 0x88);
    second = _mm_shuffle_ps(a, b, 0xDD);
  }
  static float largest(Reg v) {
    const __m128 m = _mm_max_ps(v, _mm_movehl_ps(v, v));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
  }
};
template <>
struct Lanes<double> {
  using Reg = __m128d;
  using Mask = __m128d;
  static constexpr int64_t kSize = 2;
  static constexpr int64_t kColumnClasses = 7;
  static Reg load(const double* p) { return _mm_loadu_pd(p); }
  static Reg broadcast(double v) { return _mm_set1_pd(v); }
  static void store(double* p, Reg v) { _mm_storeu_pd(p, v); }
  static Reg max_of_numbers(Reg a, Reg b) { return _mm_max_pd(a, b); }
  static Mask either_nan(Reg a, Reg b) { return _mm_cmpunord_pd(a, b); }
  static Mask either(Mask a, Mask b) { return _mm_or_pd(a, b); }
  static Mask replaces(Reg value, Reg best) {
    return _mm_and_pd(_mm_cmpnle_pd(value, best), _mm_cmpord_pd(best, best));
  }
  static Reg select(Mask m, Reg a, Reg b) {
    return _mm_or_pd(_mm_andnot_pd(m, a), _mm_and_pd(m, b));
  }
  static uint64_t bits(Mask m) { return static_cast<uint32_t>(_mm_movemask_pd(m)); }
  static uint64_t equal_bits(Reg a, Reg b) { return bits(_mm_cmpeq_pd(a, b)); }
  static Mask equal(Reg a, Reg b) { return _mm_cmpeq_pd(a, b); }
  static void split_pairs(Reg a, Reg b, Reg& first, Reg& second) {
    first = _mm_unpacklo_pd(a, b);
    second = _mm_unpackhi_pd(a, b);
  }
  static double largest(Reg v) { return _mm_cvtsd_f64(_mm_max_sd(v, _mm_unpackhi_pd(v, v))); }
};
#endif

#if !defined(CPU_CAPABILITY_AVX512) && !defined(CPU_CAPABILITY_AVX2) && !defined(__SSE2__)
template <typename T>
struct Lanes {
  using Reg = T;
  using Mask = bool;
  static constexpr int64_t kSize = 1;
  static constexpr int64_t kColumnClasses = 0;
  static Reg load(const T* p) { return *p; }
  static Reg broadcast(T v) { return v; }
  static void store(T* p, Reg v) { *p = v; }
  static Reg max_of_numbers(Reg a, Reg b) { return b > a ? b : a; }
  static Mask either_nan(Reg a, Reg b) { return std::isnan(a) || std::isnan(b); }
  static Mask either(Mask a, Mask b) { return a || b; }
  static Mask replaces(Reg value, Reg best) { return argmax_takes(value, best); }
  static Reg select(Mask m, Reg a, Reg b) { return m ? b : a; }
  static uint64_t bits(Mask m) { return m; }
  static uint64_t equal_bits(Reg a, Reg b) { return a == b; }
  static Mask equal(Reg a, Reg b) { return a == b; }
  static void split_pairs(Reg a, Reg b, Reg& first, Reg& second) {
    first = a;
    second = b;
  }
  static T largest(Reg v) { return v; }
};
#endif

template <typename T>
int64_t argmax_row_scalar(const T* x, int64_t n) {
  int64_t best = 0;
  for (int64_t c = 1; c < n; ++c) {
    if (argmax_takes(x[c], x[best])) best = c;
  }
  return best;
}

// Rows longer than this look for the maximum's index four vectors at a time first.
constexpr int64_t kLongRow = 256;

// Row scan of one row of n >= Lanes<T>::kSize values.
template <typename T>
int64_t argmax_row_scan(const T* x, int64_t n) {
  using L = Lanes<T>;
  constexpr int64_t kSize = L::kSize;
  // Pass 1: four accumulators hide the latency of the max; a tail shorter than a vector is
  // covered by a load that overlaps the previous one (neither max nor NaN minds).
  typename L::Reg top0 = L::load(x), top1 = top0, top2 = top0, top3 = top0;
  typename L::Mask nan01 = L::either_nan(top0, top0), nan23 = nan01;
  int64_t c = 0;
  for (; c + 4 * kSize <= n; c += 4 * kSize) {
    const auto a = L::load(x + c), b = L::load(x + c + kSize);
    const auto d = L::load(x + c + 2 * kSize), e = L::load(x + c + 3 * kSize);
    top0 = L::max_of_numbers(top0, a);
    top1 = L::max_of_numbers(top1, b);
    top2 = L::max_of_numbers(top2, d);
    top3 = L::max_of_numbers(top3, e);
    nan01 = L::either(nan01, L::either_nan(a, b));
    nan23 = L::either(nan23, L::either_nan(d, e));
  }
  for (; c + kSize <= n; c += kSize) {
    const auto a = L::load(x + c);
    top0 = L::max_of_numbers(top0, a);
    nan01 = L::either(nan01, L::either_nan(a, a));
  }
  if (c < n) {
    const auto a = L::load(x + n - kSize);
    top1 = L::max_of_numbers(top1, a);
    nan23 = L::either(nan23, L::either_nan(a, a));
  }
  if (L::bits(L::either(nan01, nan23)) != 0) {
    for (int64_t i = 0; i < n; ++i) {
      if (std::isnan(x[i])) return i;
    }
  }
  const T top = L::largest(
      L::max_of_numbers(L::max_of_numbers(top0, top1), L::max_of_numbers(top2, top3)));
  // Pass 2 (the row is in L1 now): the first lane equal to the maximum, found 64 lanes at
  // a time with no branch inside (where the maximum lies is random: a branch per vector
  // would be mispredicted); the last, partial vector is shifted past the lanes it shares
  // with the one before.
  const auto target = L::broadcast(top);
  const int64_t partial = n % kSize;
  const int64_t full = n - partial;
  int64_t start = 0;
  if (n > kLongRow) {
    // Long rows: one test per four vectors up to those holding the maximum, where one
    // mispredicted branch costs less than the bits of every lane.
    for (; start + 4 * kSize <= full; start += 4 * kSize) {
      const auto a = L::equal(L::load(x + start), target);
      const auto b = L::equal(L::load(x + start + kSize), target);
      const auto d = L::equal(L::load(x + start + 2 * kSize), target);
      const auto e = L::equal(L::load(x + start + 3 * kSize), target);
      if (L::bits(L::either(L::either(a, b), L::either(d, e))) != 0) break;
    }
  }
  for (int64_t i0 = start; i0 < n; i0 += 64) {
    uint64_t equal = 0;
    for (int64_t i = i0; i < std::min(i0 + 64, full); i += kSize) {
      equal |= L::equal_bits(L::load(x + i), target) << (i - i0);
    }
    if (partial != 0 && n <= i0 + 64) {
      const uint64_t last = L::equal_bits(L::load(x + n - kSize), target);
      equal |= (last >> (kSize - partial)) << (full - i0);
    }
    if (equal != 0) return i0 + std::countr_zero(equal);
  }
  return 0;  // unreachable: top is one of the row's values
}

// Two classes: the rows of two vectors split into their first and second values, compared
// lane by lane.
template <typename T>
void argmax_pairs(const T* x, int64_t rows, int64_t* out) {
  using L = Lanes<T>;
  int64_t r = 0;
  for (; r + L::kSize <= rows; r += L::kSize) {
    typename L::Reg first, second;
    L::split_pairs(L::load(x + 2 * r), L::load(x + 2 * r + L::kSize), first, second);
    const uint64_t second_wins = L::bits(L::replaces(second, first));
    for (int64_t j = 0; j < L::kSize; ++j) out[r + j] = (second_wins >> j) & 1;
  }
  for (; r < rows; ++r) out[r] = argmax_takes(x[2 * r + 1], x[2 * r]) ? 1 : 0;
}

// Column blocks: kColumnRegisters vectors of rows per block, so that their best values and
// indices stay in registers and several compare chains run at once.
constexpr int64_t kColumnRegisters = 4;

template <typename T>
struct ColumnBlock {
  static constexpr int64_t kRows = kColumnRegisters * Lanes<T>::kSize;
  static constexpr int64_t kValues = kRows * std::max<int64_t>(1, Lanes<T>::kColumnClasses);
  static_assert(Lanes<T>::kColumnClasses >= Lanes<T>::kSize - 1,
                "row scans need rows of at least one vector");
};

// Argmax of ColumnBlock<T>::kRows rows whose class c is at column[c * kRows + row].
template <typename T>
void argmax_columns(const T* column, int64_t num_classes, int64_t* out) {
  using L = Lanes<T>;
  constexpr int64_t kRows = ColumnBlock<T>::kRows;
  typename L::Reg best[kColumnRegisters], index[kColumnRegisters];
  for (int64_t k = 0; k < kColumnRegisters; ++k) {
    best[k] = L::load(column + k * L::kSize);
    index[k] = L::broadcast(T(0));  // class indices (up to kColumnClasses) are exact in T
  }
  for (int64_t c = 1; c < num_classes; ++c) {
    const auto class_index = L::broadcast(static_cast<T>(c));
    for (int64_t k = 0; k < kColumnRegisters; ++k) {
      const auto value = L::load(column + c * kRows + k * L::kSize);
      const auto take = L::replaces(value, best[k]);
      best[k] = L::select(take, best[k], value);
      index[k] = L::select(take, index[k], class_index);
    }
  }
  alignas(64) T lanes[kRows];
  for (int64_t k = 0; k < kColumnRegisters; ++k) L::store(lanes + k * L::kSize, index[k]);
  for (int64_t j = 0; j < kRows; ++j) out[j] = static_cast<int64_t>(lanes[j]);
}

template <typename T>
void argmax_column_blocks(const T* x, int64_t num_classes, int64_t rows, int64_t* out) {
  constexpr int64_t kRows = ColumnBlock<T>::kRows;
  alignas(64) T column[ColumnBlock<T>::kValues];
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows) {
    const T* block = x + r * num_classes;
    for (int64_t j = 0; j < kRows; ++j) {
      for (int64_t c = 0; c < num_classes; ++c) {
        column[c * kRows + j] = block[j * num_classes + c];
      }
    }
    argmax_columns(column, num_classes, out + r);
  }
  for (; r < rows; ++r) out[r] = argmax_row_scalar(x + r * num_classes, num_classes);
}

// Rows [0, rows) of [rows, C, S] logits.
template <typename T>
void argmax_rows(const T* logits, int64_t num_classes, int64_t inner, int64_t rows,
                 int64_t* pred) {
  if (inner == 1) {
    if (num_classes == 2) {
      argmax_pairs(logits, rows, pred);
    } else if (num_classes <= Lanes<T>::kColumnClasses) {
      argmax_column_blocks(logits, num_classes, rows, pred);
    } else {
      for (int64_t r = 0; r < rows; ++r) {
        pred[r] = argmax_row_scan(logits + r * num_classes, num_classes);
      }
    }
    return;
  }
  // S > 1: the argmax over c runs along a whole (contiguous) row of s at once.
  constexpr int64_t kTile = 256;
  T best[kTile];
  for (int64_t n = 0; n < rows; ++n) {
    const T* sample = logits + n * num_classes * inner;
    for (int64_t s0 = 0; s0 < inner; s0 += kTile) {
      const int64_t width = std::min(kTile, inner - s0);
      int64_t* out = pred + n * inner + s0;
      for (int64_t s = 0; s < width; ++s) {
        best[s] = sample[s0 + s];
        out[s] = 0;
      }
      for (int64_t c = 1; c < num_classes; ++c) {
        const T* row = sample + c * inner + s0;
        for (int64_t s = 0; s < width; ++s) {
          const bool take = argmax_takes(row[s], best[s]);
          best[s] = take ? row[s] : best[s];
          out[s] = take ? c : out[s];
        }
      }
    }
  }
}

#if !defined(CPU_CAPABILITY_AVX512) && !defined(CPU_CAPABILITY_AVX2) && defined(__SSE2__)
// fp16 -> float without F16C, four at a time: c10's fp16_ieee_to_fp32_value in SSE2, for
// fp16 bits in the upper half of each 32-bit lane.
inline __m128 fp16_to_float(__m128i w) {
  const __m128i sign = _mm_and_si128(w, _mm_set1_epi32(static_cast<int>(0x80000000u)));
  const __m128i two_w = _mm_add_epi32(w, w);
  // Normal numbers, infinities and NaN: move exponent and mantissa into place, then scale
  // the exponent by 2**-112.
  const __m128 normalized = _mm_mul_ps(
      _mm_castsi128_ps(_mm_add_epi32(_mm_srli_epi32(two_w, 4), _mm_set1_epi32(0xE0 << 23))),
      _mm_castsi128_ps(_mm_set1_epi32(15 << 23)));
  // Subnormal numbers: the mantissa as the low bits of a float of known exponent, minus it.
  const __m128 subnormal = _mm_sub_ps(
      _mm_castsi128_ps(_mm_or_si128(_mm_srli_epi32(two_w, 17), _mm_set1_epi32(126 << 23))),
      _mm_set1_ps(0.5f));
  // two_w < 2**27, unsigned: a signed compare after flipping the top bits.
  const __m128i flip = _mm_set1_epi32(static_cast<int>(0x80000000u));
  const __m128i cutoff = _mm_set1_epi32(static_cast<int>((1u << 27) ^ 0x80000000u));
  const __m128i is_subnormal = _mm_cmplt_epi32(_mm_xor_si128(two_w, flip), cutoff);
  const __m128i magnitude =
      _mm_or_si128(_mm_and_si128(is_subnormal, _mm_castps_si128(subnormal)),
                   _mm_andnot_si128(is_subnormal, _mm_castps_si128(normalized)));
  return _mm_castsi128_ps(_mm_or_si128(sign, magnitude));
}
#endif

// fp16 / bf16 -> float, exact (so the argmax is unchanged), with the instruction set's own
// widening (bf16 is the upper half of a float; F16C converts fp16; SSE2 as above).
template <typename scalar_t>
void widen_to_float(const scalar_t* src, float* dst, int64_t n) {
  constexpr bool kBFloat16 = std::is_same_v<scalar_t, c10::BFloat16>;
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512)
  for (; i + 16 <= n; i += 16) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    _mm512_storeu_ps(dst + i, kBFloat16 ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                              _mm512_cvtepu16_epi32(bits), 16))
                                        : _mm512_cvtph_ps(bits));
  }
#elif defined(CPU_CAPABILITY_AVX2)
  for (; i + 8 <= n; i += 8) {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, kBFloat16 ? _mm256_castsi256_ps(_mm256_slli_epi32(
                                              _mm256_cvtepu16_epi32(bits), 16))
                                        : _mm256_cvtph_ps(bits));
  }
#elif defined(__SSE2__)
  for (; i + 8 <= n; i += 8) {
    const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    const __m128i zero = _mm_setzero_si128();
    // The 16 bits of each value in the upper half of a 32-bit lane.
    const __m128i low = _mm_unpacklo_epi16(zero, bits), high = _mm_unpackhi_epi16(zero, bits);
    if constexpr (kBFloat16) {
      _mm_storeu_ps(dst + i, _mm_castsi128_ps(low));
      _mm_storeu_ps(dst + i + 4, _mm_castsi128_ps(high));
    } else {
      _mm_storeu_ps(dst + i, fp16_to_float(low));
      _mm_storeu_ps(dst + i + 4, fp16_to_float(high));
    }
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename scalar_t>
void argmax(const ArgmaxBlock<typename TableElement<scalar_t>::type>& b) {
  const auto* logits =
      reinterpret_cast<const scalar_t*>(b.logits) + b.n0 * b.num_classes * b.inner;
  const int64_t rows = b.n1 - b.n0;
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    argmax_rows(logits, b.num_classes, b.inner, rows, b.pred);
  } else {
    // fp16/bf16: widen a few rows at a time to float, into a buffer that stays in L1.
    constexpr int64_t kBuffer = 4096;
    alignas(64) float widened[kBuffer];
    const int64_t row_values = b.num_classes * b.inner;
    if (row_values > kBuffer) {
      // A row too long for the buffer: compare in the storage type (same order as float).
      for (int64_t r = 0; r < rows; ++r) {
        const scalar_t* sample = logits + r * row_values;
        for (int64_t s = 0; s < b.inner; ++s) {
          int64_t best = 0;
          for (int64_t c = 1; c < b.num_classes; ++c) {
            if (argmax_takes(static_cast<float>(sample[c * b.inner + s]),
                             static_cast<float>(sample[best * b.inner + s]))) {
              best = c;
            }
          }
          b.pred[r * b.inner + s] = best;
        }
      }
      return;
    }
    // Whole column blocks per buffer where they fit, so that no rows are left over.
    int64_t step = kBuffer / row_values;
    if (step > ColumnBlock<float>::kRows) step -= step % ColumnBlock<float>::kRows;
    for (int64_t r = 0; r < rows; r += step) {
      const int64_t count = std::min(step, rows - r);
      widen_to_float(logits + r * row_values, widened, count * row_values);
      argmax_rows(widened, b.num_classes, b.inner, count, b.pred + r * b.inner);
    }
  }
}

#include "linear_kernels.inl"

}  // namespace

constexpr KernelTable kTable{C10_STRINGIZE(CPU_CAPABILITY),
                             &sgd<float, float>,
                             &sgd<double, double>,
                             &sgd<c10::Half, float>,
                             &sgd<c10::BFloat16, float>,
                             &argmax<float>,
                             &argmax<double>,
                             &argmax<c10::Half>,
                             &argmax<c10::BFloat16>,
                             kLinearRows,
                             &linear_forward,
                             &linear_input_grad,
                             &linear_weight_grad,
                             &linear_bias_grad,
                             &linear_transpose,
                             &softmax_loss,
                             &sgd_float_part};

const KernelTable* table() { return &kTable; }

}  // namespace recallprune::cpu::CPU_CAPABILITY
