// The stacked masked linear layers' inner loops (see LinearForward in kernels.h), included by
// kernels.inl inside recallprune::cpu::CPU_CAPABILITY's anonymous namespace: compiled once per
// instruction set, with at::vec::Vectorized<float>.
//
// Every product is a chunk of samples: kLinearVecs vectors of one activation row. A block of
// kLinearRows output rows keeps kLinearRows x kLinearVecs sums in registers, so each input
// chunk loaded serves kLinearRows rows (the weights broadcast one at a time): on AVX-512, 24
// sums of 32 registers; elsewhere 8 of 16. A row alone (a sparse row) loads an input chunk
// per kept weight.

using VecF = at::vec::Vectorized<float>;
constexpr int kLinearVecs = 4;
constexpr int64_t kLinearChunk = kLinearVecs * VecF::size();
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kLinearRows = 6;
#else
constexpr int kLinearRows = 2;
#endif

// The lanes [0, left) of a vector at p (all of them where Full).
template <bool Full>
inline VecF load_lanes(const float* p, int64_t left) {
  if constexpr (Full) {
    return VecF::loadu(p);
  } else {
    if (left >= VecF::size()) return VecF::loadu(p);
    return left > 0 ? VecF::loadu(p, left) : VecF(0.0f);
  }
}

template <bool Full>
inline void store_lanes(float* p, int64_t left, const VecF& v) {
  if constexpr (Full) {
    v.store(p);
  } else if (left >= VecF::size()) {
    v.store(p);
  } else if (left > 0) {
    v.store(p, static_cast<int>(left));
  }
}

// out[r, n0 : n0 + V vectors] = relu?(start[r] + sum over k < depth of w[r * w_rs + k * w_ks]
// * x[k * x_stride + n0 : ...]) for the R rows r, the sum a fused multiply-add chain in k
// order; the last of the V vectors holds last lanes (all of them where Full).
template <int R, int V, bool Full>
inline void dense_chunk(const float* x, int64_t x_stride, int64_t n0, int64_t last,
                        const float* w, int64_t w_rs, int64_t w_ks, int64_t depth,
                        const float* start, bool relu, float* out, int64_t out_stride) {
  VecF acc[R][V];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < V; ++j) acc[r][j] = VecF(start != nullptr ? start[r] : 0.0f);
  }
  for (int64_t k = 0; k < depth; ++k) {
    const float* xk = x + k * x_stride + n0;
    VecF xv[V];
    for (int j = 0; j < V - 1; ++j) xv[j] = VecF::loadu(xk + j * VecF::size());
    if constexpr (Full) {
      xv[V - 1] = VecF::loadu(xk + (V - 1) * VecF::size());
    } else {
      xv[V - 1] = VecF::loadu(xk + (V - 1) * VecF::size(), last);
    }
    for (int r = 0; r < R; ++r) {
      const VecF wv(w[r * w_rs + k * w_ks]);
      for (int j = 0; j < V; ++j) acc[r][j] = at::vec::fmadd(wv, xv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* o = out + r * out_stride + n0;
    for (int j = 0; j < V; ++j) {
      const VecF v = relu ? at::vec::maximum(acc[r][j], VecF(0.0f)) : acc[r][j];
      if (Full || j < V - 1) {
        v.store(o + j * VecF::size());
      } else {
        v.store(o + j * VecF::size(), static_cast<int>(last));
      }
    }
  }
}

// dense_chunk over every chunk of the n samples (the last chunk with as many vectors as it
// needs); rows >= R go R at a time, the rest one by one.
template <int R>
inline void dense_rows(int64_t rows, const float* x, int64_t x_stride, int64_t n, const float* w,
                       int64_t w_rs, int64_t w_ks, int64_t depth, const float* start, bool relu,
                       float* out, int64_t out_stride) {
  constexpr int64_t kLanes = VecF::size();
  const int64_t whole = n / kLinearChunk * kLinearChunk;
  const int64_t tail = n - whole;
  const int64_t tail_vecs = (tail + kLanes - 1) / kLanes;
  const int64_t last = tail - (tail_vecs - 1) * kLanes;
  const auto run = [&](auto block, int64_t r) {
    constexpr int B = decltype(block)::value;
    const float* s = start != nullptr ? start + r : nullptr;
    const float* wr = w + r * w_rs;
    float* o = out + r * out_stride;
    for (int64_t n0 = 0; n0 < whole; n0 += kLinearChunk) {
      dense_chunk<B, kLinearVecs, true>(x, x_stride, n0, kLanes, wr, w_rs, w_ks, depth, s, relu,
                                        o, out_stride);
    }
    if (tail == 0) return;
    const auto tail_chunk = [&](auto vecs) {
      constexpr int V = decltype(vecs)::value;
      if (last == kLanes) {
        dense_chunk<B, V, true>(x, x_stride, whole, last, wr, w_rs, w_ks, depth, s, relu, o,
                                out_stride);
      } else {
        dense_chunk<B, V, false>(x, x_stride, whole, last, wr, w_rs, w_ks, depth, s, relu, o,
                                 out_stride);
      }
    };
    static_assert(kLinearVecs == 4, "the tail's cases below");
    switch (tail_vecs) {
      case 1: tail_chunk(std::integral_constant<int, 1>{}); break;
      case 2: tail_chunk(std::integral_constant<int, 2>{}); break;
      case 3: tail_chunk(std::integral_constant<int, 3>{}); break;
      default: tail_chunk(std::integral_constant<int, 4>{}); break;
    }
  };
  int64_t r = 0;
  for (; r + R <= rows; r += R) run(std::integral_constant<int, R>{}, r);
  for (; r < rows; ++r) run(std::integral_constant<int, 1>{}, r);
}

// A kernel's scratch block of floats (malloc'd: no container code compiled here that the rest
// of the library could share).
class Scratch {
 public:
  Scratch() = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() { std::free(data_); }

  // count floats, all 0 where zero (the contents are otherwise left as they were).
  float* get(int64_t count, bool zero) {
    if (count > size_) {
      std::free(data_);
      data_ = static_cast<float*>(std::malloc(static_cast<size_t>(count) * sizeof(float)));
      if (data_ == nullptr) throw std::bad_alloc();
      size_ = count;
    }
    if (zero) std::memset(data_, 0, static_cast<size_t>(count) * sizeof(float));
    return data_;
  }

 private:
  float* data_ = nullptr;
  int64_t size_ = 0;
};

// Whether the index list idx[k0 .. k1) is ascending and below limit.
inline bool valid_list(const int32_t* idx, int64_t k0, int64_t k1, int64_t limit) {
  int64_t previous = -1;
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t value = idx[k];
    if (value <= previous || value >= limit) return false;
    previous = value;
  }
  return true;
}

// Whether the value indices vals[k0 .. k1) lie in [low, high).
inline bool valid_values(const int64_t* vals, int64_t k0, int64_t k1, int64_t low, int64_t high) {
  for (int64_t k = k0; k < k1; ++k) {
    if (vals[k] < low || vals[k] >= high) return false;
  }
  return true;
}

// One sparse row over a chunk of samples: out[n0 : ...] = relu?(start + sum over k in [k0, k1)
// of value(k) * x[index(k) * n + n0 : ...]), in list order; index(k) must ascend below limit
// and valid(k) hold (checked where Check, the first chunk): false, having stored nothing,
// where they do not.
template <bool Full, bool Check, typename Value, typename Index, typename Valid>
inline bool sparse_chunk(const float* x, int64_t n, int64_t n0, int64_t count, int64_t k0,
                         int64_t k1, const Value& value, const Index& index, int64_t limit,
                         const Valid& valid, float start, bool relu, float* out) {
  VecF acc[kLinearVecs];
  for (int j = 0; j < kLinearVecs; ++j) acc[j] = VecF(start);
  int64_t previous = -1;
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t i = index(k);
    if constexpr (Check) {
      if (i <= previous || i >= limit || !valid(k)) return false;
      previous = i;
    }
    const VecF wv(value(k));
    const float* xi = x + i * n + n0;
    for (int j = 0; j < kLinearVecs; ++j) {
      acc[j] = at::vec::fmadd(
          wv, load_lanes<Full>(xi + j * VecF::size(), count - j * VecF::size()), acc[j]);
    }
  }
  for (int j = 0; j < kLinearVecs; ++j) {
    const VecF v = relu ? at::vec::maximum(acc[j], VecF(0.0f)) : acc[j];
    store_lanes<Full>(out + n0 + j * VecF::size(), count - j * VecF::size(), v);
  }
  return true;
}

// A row's sparse_chunk over every chunk of the n samples, its list checked on the first.
template <typename Value, typename Index, typename Valid>
inline bool sparse_row(const float* x, int64_t n, int64_t k0, int64_t k1, const Value& value,
                       const Index& index, int64_t limit, const Valid& valid, float start,
                       bool relu, float* out) {
  if (n < kLinearChunk) {
    return sparse_chunk<false, true>(x, n, 0, n, k0, k1, value, index, limit, valid, start, relu,
                                     out);
  }
  if (!sparse_chunk<true, true>(x, n, 0, kLinearChunk, k0, k1, value, index, limit, valid, start,
                                relu, out)) {
    return false;
  }
  int64_t n0 = kLinearChunk;
  for (; n0 + kLinearChunk <= n; n0 += kLinearChunk) {
    sparse_chunk<true, false>(x, n, n0, kLinearChunk, k0, k1, value, index, limit, valid, start,
                              relu, out);
  }
  if (n0 < n) {
    sparse_chunk<false, false>(x, n, n0, n - n0, k0, k1, value, index, limit, valid, start, relu,
                               out);
  }
  return true;
}

// Whether the kept fraction of rows [first, first + rows) (of depth weights each) is at least
// dense_above: then the block goes dense.
inline bool dense_block(const int64_t* ptr, int64_t first, int64_t rows, int64_t depth,
                        double dense_above) {
  if (ptr == nullptr) return true;
  const double kept = static_cast<double>(ptr[first + rows] - ptr[first]);
  return kept >= dense_above * static_cast<double>(rows * depth);
}

// Whether rows [first, first + rows) keep every one of their depth weights.
inline bool whole_rows(const int64_t* ptr, int64_t first, int64_t rows, int64_t depth) {
  return ptr == nullptr || ptr[first + rows] - ptr[first] == rows * depth;
}

bool linear_forward(const LinearForward& t) {
  Scratch scratch;
  for (int64_t r = t.begin; r < t.end; r += kLinearRows) {
    const int64_t rows = std::min<int64_t>(kLinearRows, t.end - r);
    if (!dense_block(t.ptr, r, rows, t.in, t.dense_above)) {
      for (int64_t q = r; q < r + rows; ++q) {
        if (!sparse_row(
                t.input, t.n, t.ptr[q], t.ptr[q + 1], [&](int64_t k) { return t.weight[k]; },
                [&](int64_t k) { return static_cast<int64_t>(t.cols[k]); }, t.in,
                [](int64_t) { return true; }, t.bias != nullptr ? t.bias[q] : 0.0f, t.relu,
                t.output + q * t.n)) {
          return false;
        }
      }
      continue;
    }
    const float* w = t.ptr == nullptr ? t.weight + r * t.in : t.weight + t.ptr[r];
    if (!whole_rows(t.ptr, r, rows, t.in)) {  // the rows' weights, the pruned ones 0
      float* block = scratch.get(rows * t.in, true);
      for (int64_t q = 0; q < rows; ++q) {
        const int64_t k0 = t.ptr[r + q], k1 = t.ptr[r + q + 1];
        if (!valid_list(t.cols, k0, k1, t.in)) return false;
        float* row = block + q * t.in;
        for (int64_t k = k0; k < k1; ++k) row[t.cols[k]] = t.weight[k];
      }
      w = block;
    }
    dense_rows<kLinearRows>(rows, t.input, t.n, t.n, w, t.in, 1, t.in,
                            t.bias != nullptr ? t.bias + r : nullptr, t.relu, t.output + r * t.n,
                            t.n);
  }
  return true;
}

// grad_input = W^T grad, in strips of VecF::size() inputs: a dense strip reads its columns of
// W (in place where the model's rows are whole, else copied, the pruned weights 0) and goes
// kInputRows inputs at a time.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kInputRows = 4;
#else
constexpr int kInputRows = 2;
#endif

bool linear_input_grad(const LinearInputGrad& t) {
  constexpr int64_t kStrip = VecF::size();
  const bool whole_model = whole_rows(t.row_ptr, 0, t.out, t.in);
  Scratch scratch;
  for (int64_t i = t.begin; i < t.end; i += kStrip) {
    const int64_t cols = std::min<int64_t>(kStrip, t.end - i);
    if (!dense_block(t.ptr, i, cols, t.out, t.dense_above)) {
      const int64_t low = t.row_ptr[0], high = t.row_ptr[t.out];  // the model's values
      for (int64_t c = i; c < i + cols; ++c) {
        if (!sparse_row(
                t.grad, t.n, t.ptr[c], t.ptr[c + 1], [&](int64_t k) { return t.weight[t.vals[k]]; },
                [&](int64_t k) { return static_cast<int64_t>(t.rows[k]); }, t.out,
                [&](int64_t k) { return t.vals[k] >= low && t.vals[k] < high; }, 0.0f, false,
                t.grad_input + c * t.n)) {
          return false;
        }
      }
      continue;
    }
    const float* w = (t.row_ptr != nullptr ? t.weight + t.row_ptr[0] : t.weight) + i;
    int64_t w_ks = t.in;
    if (!whole_model) {
      float* strip = scratch.get(t.out * kStrip, true);
      for (int64_t c = 0; c < cols; ++c) {
        if (!valid_list(t.rows, t.ptr[i + c], t.ptr[i + c + 1], t.out) ||
            !valid_values(t.vals, t.ptr[i + c], t.ptr[i + c + 1], t.row_ptr[0], t.row_ptr[t.out])) {
          return false;
        }
        for (int64_t k = t.ptr[i + c]; k < t.ptr[i + c + 1]; ++k) {
          strip[t.rows[k] * kStrip + c] = t.weight[t.vals[k]];
        }
      }
      w = strip;
      w_ks = kStrip;
    }
    dense_rows<kInputRows>(cols, t.grad, t.n, t.n, w, 1, w_ks, t.out, nullptr, false,
                           t.grad_input + i * t.n, t.n);
  }
  return true;
}

// The sum of a vector's lanes (a fixed tree of the instruction set's shuffles).
inline float sum_lanes(const VecF& v) {
  return at::vec::vec_reduce_all<float>([](const VecF& a, const VecF& b) { return a + b; }, v);
}

// sum over the n samples of a[:] * b[:], as vectors of lanes then the lanes' sum.
inline float dot_samples(const float* a, const float* b, int64_t n) {
  VecF acc(0.0f);
  int64_t s = 0;
  for (; s + VecF::size() <= n; s += VecF::size()) {
    acc = at::vec::fmadd(VecF::loadu(a + s), VecF::loadu(b + s), acc);
  }
  if (s < n) acc = at::vec::fmadd(VecF::loadu(a + s, n - s), VecF::loadu(b + s, n - s), acc);
  return sum_lanes(acc);
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#if defined(CPU_CAPABILITY_AVX512)
using LaneReg = __m512;
inline LaneReg lane_fmadd(LaneReg a, LaneReg b, LaneReg c) { return _mm512_fmadd_ps(a, b, c); }
inline LaneReg lane_add(LaneReg a, LaneReg b) { return _mm512_add_ps(a, b); }
#else
using LaneReg = __m256;
inline LaneReg lane_fmadd(LaneReg a, LaneReg b, LaneReg c) { return _mm256_fmadd_ps(a, b, c); }
inline LaneReg lane_add(LaneReg a, LaneReg b) { return _mm256_add_ps(a, b); }
#endif

// out[p] = dot_samples(g, input + cols[p] * n, n) for the VecF::size() weights p, bit for bit,
// at once: each dot product is the same chain of fused multiply-adds (a block of g's vectors
// held in registers while every weight's row goes by), and its lanes are summed by the same
// tree as sum_lanes' (the lanes l and l ^ half added first, then l ^ half / 2, ..., l ^ 1), the
// trees of all the weights together, a vector of partial sums per level. The levels leave
// weight p's sum in lane p where its chain ran in slot (size / 4) * (p % 4) + p / 4.
inline void dot_samples_lanes(const float* g, const float* input, int64_t n, const int32_t* cols,
                              float* out) {
  constexpr int kLanes = VecF::size();
  constexpr int kQuarter = kLanes / 4;
  const auto row = [&](int s) {
    return input + static_cast<int64_t>(cols[4 * (s % kQuarter) + s / kQuarter]) * n;
  };
  LaneReg acc[kLanes];
#pragma GCC unroll 16
  for (int s = 0; s < kLanes; ++s) acc[s] = VecF(0.0f);
  int64_t i = 0;
  for (; i + kLinearChunk <= n; i += kLinearChunk) {
    LaneReg gv[kLinearVecs];
    for (int j = 0; j < kLinearVecs; ++j) gv[j] = VecF::loadu(g + i + j * kLanes);
#pragma GCC unroll 16
    for (int s = 0; s < kLanes; ++s) {
      const float* x = row(s) + i;
      LaneReg a = acc[s];
      for (int j = 0; j < kLinearVecs; ++j) a = lane_fmadd(gv[j], VecF::loadu(x + j * kLanes), a);
      acc[s] = a;
    }
  }
  for (; i < n; i += kLanes) {
    const int64_t left = std::min<int64_t>(kLanes, n - i);
    const LaneReg gv = VecF::loadu(g + i, left);
#pragma GCC unroll 16
    for (int s = 0; s < kLanes; ++s) acc[s] = lane_fmadd(gv, VecF::loadu(row(s) + i, left), acc[s]);
  }
#if defined(CPU_CAPABILITY_AVX512)
  LaneReg c[8], e[4], f[2];
  for (int q = 0; q < 8; ++q) {  // l + (l ^ 8): halves side by side
    c[q] = lane_add(_mm512_shuffle_f32x4(acc[2 * q], acc[2 * q + 1], 0x44),
                    _mm512_shuffle_f32x4(acc[2 * q], acc[2 * q + 1], 0xEE));
  }
  for (int q = 0; q < 4; ++q) {  // l + (l ^ 4)
    e[q] = lane_add(_mm512_shuffle_f32x4(c[2 * q], c[2 * q + 1], 0x88),
                    _mm512_shuffle_f32x4(c[2 * q], c[2 * q + 1], 0xDD));
  }
  for (int q = 0; q < 2; ++q) {  // l + (l ^ 2)
    f[q] = lane_add(_mm512_shuffle_ps(e[2 * q], e[2 * q + 1], 0x44),
                    _mm512_shuffle_ps(e[2 * q], e[2 * q + 1], 0xEE));
  }
  // l + (l ^ 1)
  _mm512_storeu_ps(out, lane_add(_mm512_shuffle_ps(f[0], f[1], 0x88),
                                 _mm512_shuffle_ps(f[0], f[1], 0xDD)));
#else
  LaneReg c[4], e[2];
  for (int q = 0; q < 4; ++q) {  // l + (l ^ 4): halves side by side
    c[q] = lane_add(_mm256_permute2f128_ps(acc[2 * q], acc[2 * q + 1], 0x20),
                    _mm256_permute2f128_ps(acc[2 * q], acc[2 * q + 1], 0x31));
  }
  for (int q = 0; q < 2; ++q) {  // l + (l ^ 2)
    e[q] = lane_add(_mm256_shuffle_ps(c[2 * q], c[2 * q + 1], 0x44),
                    _mm256_shuffle_ps(c[2 * q], c[2 * q + 1], 0xEE));
  }
  // l + (l ^ 1)
  _mm256_storeu_ps(out, lane_add(_mm256_shuffle_ps(e[0], e[1], 0x88),
                                 _mm256_shuffle_ps(e[0], e[1], 0xDD)));
#endif
}
#endif

bool linear_weight_grad(const LinearWeightGrad& t) {
  Scratch scratch;
  for (int64_t r = t.begin; r < t.end; r += kLinearRows) {
    const int64_t rows = std::min<int64_t>(kLinearRows, t.end - r);
    if (t.input_t != nullptr && dense_block(t.ptr, r, rows, t.in, t.dense_above)) {
      // grad_weight[r.., i] = sum over samples s of grad[r.., s] * input_t[s, i]: the samples
      // are the depth, the inputs the chunks; kept entries only where rows are not whole.
      const bool whole = whole_rows(t.ptr, r, rows, t.in);
      float* out = t.ptr == nullptr ? t.grad_weight + r * t.in : t.grad_weight + t.ptr[r];
      if (!whole) {
        out = scratch.get(rows * t.in, false);
      }
      dense_rows<kLinearRows>(rows, t.input_t, t.in, t.in, t.grad + r * t.n, t.n, 1, t.n,
                              nullptr, false, out, t.in);
      if (whole) continue;
      for (int64_t q = 0; q < rows; ++q) {
        const int64_t k0 = t.ptr[r + q], k1 = t.ptr[r + q + 1];
        if (!valid_list(t.cols, k0, k1, t.in)) return false;
        for (int64_t k = k0; k < k1; ++k) t.grad_weight[k] = out[q * t.in + t.cols[k]];
      }
      continue;
    }
    for (int64_t q = r; q < r + rows; ++q) {
      const float* g = t.grad + q * t.n;
      if (t.ptr == nullptr) {
        float* row = t.grad_weight + q * t.in;
        for (int64_t i = 0; i < t.in; ++i) row[i] = dot_samples(g, t.input + i * t.n, t.n);
        continue;
      }
      if (!valid_list(t.cols, t.ptr[q], t.ptr[q + 1], t.in)) return false;
      int64_t k = t.ptr[q];
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
      for (; k + VecF::size() <= t.ptr[q + 1]; k += VecF::size()) {
        dot_samples_lanes(g, t.input, t.n, t.cols + k, t.grad_weight + k);
      }
#endif
      for (; k < t.ptr[q + 1]; ++k) {
        t.grad_weight[k] = dot_samples(g, t.input + t.cols[k] * t.n, t.n);
      }
    }
  }
  return true;
}

// dst [cols, rows] = src [rows, cols] transposed.
void linear_transpose(const float* src, int64_t rows, int64_t cols, float* dst) {
#if defined(CPU_CAPABILITY_AVX512)
  at::vec::transpose_mxn<float>(src, cols, dst, rows, static_cast<int>(rows),
                                static_cast<int>(cols));
#else
  constexpr int64_t kBlock = 8;
  for (int64_t r = 0; r < rows; r += kBlock) {
    for (int64_t c = 0; c < cols; c += kBlock) {
#if defined(CPU_CAPABILITY_AVX2)
      if (r + kBlock <= rows && c + kBlock <= cols) {
        at::vec::transpose_mxn<float, 8, 8>(src + r * cols + c, cols, dst + c * rows + r, rows);
        continue;
      }
#endif
      for (int64_t i = r; i < std::min(r + kBlock, rows); ++i) {
        for (int64_t j = c; j < std::min(c + kBlock, cols); ++j) dst[j * rows + i] = src[i * cols + j];
      }
    }
  }
#endif
}

void linear_bias_grad(const LinearBiasGrad& t) {
  const VecF zero(0.0f);
  for (int64_t r = t.begin; r < t.end; ++r) {
    const float* g = t.grad + r * t.n;
    const float* y = t.output != nullptr ? t.output + r * t.n : nullptr;
    float* pre = t.output != nullptr ? t.grad_pre + r * t.n : nullptr;
    VecF acc(0.0f);
    for (int64_t s = 0; s < t.n; s += VecF::size()) {
      const int64_t left = std::min<int64_t>(VecF::size(), t.n - s);
      VecF v = VecF::loadu(g + s, left);
      if (y != nullptr) {
        v = v & (VecF::loadu(y + s, left) > zero);  // 0 where the relu's output is not > 0
        v.store(pre + s, static_cast<int>(left));
      }
      acc = acc + v;
    }
    if (t.grad_bias != nullptr) {
      t.grad_bias[r] = sum_lanes(acc);
    }
  }
}

// torch's log_softmax over the classes (a dimension before the samples: the maximum, then the
// sum of exp(x - max), its log, and x - max - log, class by class in order; whole vectors of
// samples first, then the samples left over one by one with the C library's exp, their logs
// as a vector, as torch's kernel goes), nll_loss, and their backward with the mean's gradient 1 / n: grad = g -
// exp(log_softmax) * sum(g) in one rounding, g being -1 / n at the target and 0 elsewhere (so
// sum(g) = -1 / n).
bool softmax_loss(const SoftmaxLoss& t) {
  for (int64_t s = 0; s < t.n; ++s) {
    if (t.targets[s] < 0 || t.targets[s] >= t.classes) return false;
  }
  const float inv = 1.0f / static_cast<float>(t.n);
  const VecF g_target(-inv), g_sum(-inv), zero(0.0f);
  const int64_t whole = t.n - t.n % VecF::size();
  float lanes[VecF::size()];
  for (int64_t s = 0; s < whole; s += VecF::size()) {
    const auto load = [&](int64_t c) { return VecF::loadu(t.logits + c * t.n + s); };
    VecF top = load(0);
    for (int64_t c = 1; c < t.classes; ++c) top = at::vec::maximum(top, load(c));
    VecF sum(0.0f);
    for (int64_t c = 0; c < t.classes; ++c) sum = sum + (load(c) - top).exp();
    const VecF log_sum = sum.log();
    for (int64_t l = 0; l < VecF::size(); ++l) lanes[l] = static_cast<float>(t.targets[s + l]);
    const VecF target = VecF::loadu(lanes);
    VecF picked(0.0f);
    for (int64_t c = 0; c < t.classes; ++c) {
      const VecF log_p = load(c) - top - log_sum;
      const VecF is_target = target == VecF(static_cast<float>(c));
      picked = VecF::blendv(picked, log_p, is_target);
      const VecF g = VecF::blendv(zero, g_target, is_target);
      at::vec::fnmadd(log_p.exp(), g_sum, g).store(t.grad + c * t.n + s);
    }
    picked.neg().store(t.losses + s);
  }
  // The samples left over: their sums one by one, the logs of the sums as a vector.
  const int64_t tail = t.n - whole;
  if (tail == 0) return true;
  float tops[VecF::size()], log_sums[VecF::size()];
  for (int64_t j = 0; j < tail; ++j) {
    const auto at = [&](int64_t c) { return t.logits[c * t.n + whole + j]; };
    float top = at(0);
    for (int64_t c = 1; c < t.classes; ++c) top = at(c) > top ? at(c) : top;
    float sum = 0.0f;
    for (int64_t c = 0; c < t.classes; ++c) sum += std::exp(at(c) - top);
    tops[j] = top;
    log_sums[j] = sum;
  }
  VecF::loadu(log_sums, tail).log().store(log_sums, static_cast<int>(tail));
  for (int64_t j = 0; j < tail; ++j) {
    const int64_t s = whole + j;
    for (int64_t c = 0; c < t.classes; ++c) {
      const float log_p = t.logits[c * t.n + s] - tops[j] - log_sums[j];
      const bool is_target = c == t.targets[s];
      if (is_target) t.losses[s] = -log_p;
      t.grad[c * t.n + s] = std::fma(-std::exp(log_p), -inv, is_target ? -inv : 0.0f);
    }
  }
  return true;
}
