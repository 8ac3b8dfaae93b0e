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

// Stacked linear layers (float32), one model's slice, samples last ("feature-major": an
// activation is [features, n], row f holding feature f of the n samples). A layer's weights
// are dense ([out, in]) or compact: the kept weights' values alone, row by row, with index
// lists (row o's values are weight[ptr[o] .. ptr[o + 1]), at the columns cols[ptr[o]] < ... <
// cols[ptr[o + 1] - 1]; ptr holds offsets into the values of every model). A block of rows
// whose kept fraction is at least dense_above is computed with every weight of the rows (the
// pruned ones 0: read in place where the rows are whole, i.e. keep all in weights, whose lists
// are then not read; else copied to a scratch block);
// other rows visit only their kept weights. Both give the same sums (each output a fused
// multiply-add chain over the kept inputs in ascending order), so the choice changes the
// speed only (the weight gradient's dot products excepted: see LinearWeightGrad). A kernel
// returns false where an index list it reads is out of range or out of order, having
// written nothing outside its rows.

// output[o, :] = relu?(bias[o] + sum over kept i of weight[o, i] * input[i, :]), o in [begin, end).
struct LinearForward {
  const float* input;   // [in, n]
  const float* weight;  // dense: this model's [out, in]; compact: every model's values
  const float* bias;    // [out] or nullptr
  const int64_t* ptr;   // compact: this model's [out + 1]; dense: nullptr
  const int32_t* cols;
  int64_t in, out, n;
  double dense_above;
  bool relu;
  int64_t begin, end;
  float* output;  // [out, n]
};

// grad_input[i, :] = sum over o keeping i of weight[o, i] * grad[o, :], i in [begin, end).
// Compact: the kept weights by column (ptr [in + 1] offsets into rows and vals: column i is
// kept by the rows rows[ptr[i]] < ..., its values at weight[vals[...]]), and row_ptr, the
// model's row offsets (a model whose rows are all whole is read in place).
struct LinearInputGrad {
  const float* grad;    // [out, n]
  const float* weight;  // as LinearForward's
  const int64_t* row_ptr;
  const int64_t* ptr;  // compact: [in + 1]; dense: nullptr
  const int32_t* rows;
  const int64_t* vals;
  int64_t in, out, n;
  double dense_above;
  int64_t begin, end;
  float* grad_input;  // [in, n]
};

// grad_weight[o, i] = sum over the samples of grad[o, :] * input[i, :] at the kept weights, in
// the weight's form (dense: [out, in]; compact: every model's values), o in [begin, end).
// Dense blocks sum the samples in order, from input_t (the input transposed, [n, in]); other
// rows as a dot product of vectors.
struct LinearWeightGrad {
  const float* grad;     // [out, n]
  const float* input;    // [in, n]
  const float* input_t;  // [n, in]; needed only where a block can go dense
  const int64_t* ptr;
  const int32_t* cols;
  int64_t in, out, n;
  double dense_above;
  int64_t begin, end;
  float* grad_weight;
};

// Rows [begin, end) of [rows, n]: grad_pre = grad * (output > 0) where output is given (the
// gradient through a relu), else grad itself; grad_bias[r] = the sum of row r of grad_pre.
struct LinearBiasGrad {
  const float* grad;
  const float* output;  // or nullptr
  int64_t n;
  int64_t begin, end;
  float* grad_pre;   // written where output is given
  float* grad_bias;  // or nullptr
};

// The mean softmax cross-entropy of one model's logits [classes, n] (samples last) over its n
// samples, as torch computes log_softmax over the classes, nll_loss and their gradients:
// losses[s] = -log_softmax(logits[:, s])[targets[s]], grad [classes, n] the gradient of the
// mean of the losses. Returns false, having written nothing, where a target is not in
// [0, classes).
struct SoftmaxLoss {
  const float* logits;
  const int64_t* targets;  // [n]
  int64_t classes, n;
  float* losses;  // [n]
  float* grad;    // [classes, n]
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
  int linear_block_rows;  // the rows of a dense block of linear_forward and linear_weight_grad
  bool (*linear_forward)(const LinearForward&);
  bool (*linear_input_grad)(const LinearInputGrad&);
  bool (*linear_weight_grad)(const LinearWeightGrad&);
  void (*linear_bias_grad)(const LinearBiasGrad&);
  // dst [cols, rows] = src [rows, cols] transposed.
  void (*linear_transpose)(const float* src, int64_t rows, int64_t cols, float* dst);
  bool (*softmax_loss)(const SoftmaxLoss&);
  // Elements [begin, end) of a float parameter of numel elements (keep masks as bytes, no
  // gradient sums or scale), with the same bits as sgd_float over the whole parameter.
  void (*sgd_float_part)(const SgdRange<float, float>&, const SgdHyper&, int64_t numel);
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
