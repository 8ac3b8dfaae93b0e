// CPU kernels of recallprune::stacked_linear and recallprune::stacked_linear_backward: one
// at::parallel_for over (model, block of rows) per product; the loops over a block, for this
// CPU's instruction set, are in linear_kernels.inl.
#include "kernels.h"
#include "stacked_linear.h"

#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <optional>
#include <tuple>
#include <vector>

namespace recallprune {
namespace {

// Rows per unit of parallel work: a multiple of every instruction set's dense block (rows: 6
// or 2; the input gradient's strips: 16 or 8).
constexpr int64_t kTaskRows = 48;

template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

// body(b, begin, end) over every model b and block [begin, end) of its rows rows;
// false where any call returned false.
template <typename Body>
bool for_each_block(int64_t models, int64_t rows, const Body& body) {
  const int64_t blocks = (rows + kTaskRows - 1) / kTaskRows;
  std::atomic<bool> ok{true};
  at::parallel_for(0, models * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / blocks;
      const int64_t r0 = (t % blocks) * kTaskRows;
      if (!body(b, r0, std::min(r0 + kTaskRows, rows))) ok.store(false);
    }
  });
  return ok.load();
}

// Whether some block of model b's weight gradient goes dense (and so needs its input
// transposed).
bool dense_somewhere(const LinearShape& s, const int64_t* ptr, int64_t b, double dense_above,
                     int block) {
  if (ptr == nullptr) return true;
  for (int64_t o = 0; o < s.out; o += block) {
    const int64_t rows = std::min<int64_t>(block, s.out - o);
    const int64_t first = b * s.out + o;
    const double kept = static_cast<double>(ptr[first + rows] - ptr[first]);
    if (kept >= dense_above * static_cast<double>(rows * s.in)) return true;
  }
  return false;
}

void check_lists_read(bool ok, const char* op, const char* what) {
  TORCH_CHECK(ok, op, ": ", what);
}

constexpr const char* kBadRows =
    "each row of row_cols must list ascending columns below the input's features, without "
    "repeats";

at::Tensor stacked_linear_cpu(const at::Tensor& input, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& row_ptr,
                              const std::optional<at::Tensor>& row_cols, bool relu,
                              double dense_above) {
  const LinearShape s = check_stacked_linear_args("stacked_linear", input, weight, bias, row_ptr,
                                                  row_cols, dense_above);
  at::Tensor output = at::empty({s.models, s.out, s.n}, input.options());
  if (output.numel() == 0) return output;
  const auto& kernels = cpu::kernels();
  const float* x = input.const_data_ptr<float>();
  const float* w = weight.const_data_ptr<float>();
  const float* bias_data = data_or_null<float>(bias);
  const int64_t* ptr = data_or_null<int64_t>(row_ptr);
  const int32_t* cols = data_or_null<int32_t>(row_cols);
  float* y = output.data_ptr<float>();
  const bool ok = for_each_block(s.models, s.out, [&](int64_t b, int64_t begin, int64_t end) {
    const cpu::LinearForward task{x + b * s.in * s.n,
                                  ptr != nullptr ? w : w + b * s.out * s.in,
                                  bias_data != nullptr ? bias_data + b * s.out : nullptr,
                                  ptr != nullptr ? ptr + b * s.out : nullptr,
                                  cols,
                                  s.in,
                                  s.out,
                                  s.n,
                                  dense_above,
                                  relu,
                                  begin,
                                  end,
                                  y + b * s.out * s.n};
    return kernels.linear_forward(task);
  });
  check_lists_read(ok, "stacked_linear", kBadRows);
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stacked_linear_backward_cpu(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& output, const std::optional<at::Tensor>& row_ptr,
    const std::optional<at::Tensor>& row_cols, const std::optional<at::Tensor>& col_ptr,
    const std::optional<at::Tensor>& col_rows, const std::optional<at::Tensor>& col_vals,
    std::array<bool, 3> output_mask, double dense_above) {
  constexpr const char* op = "stacked_linear_backward";
  const LinearShape s =
      check_stacked_linear_args(op, input, weight, std::nullopt, row_ptr, row_cols, dense_above);
  TORCH_CHECK(grad.scalar_type() == at::kFloat && grad.dim() == 3 && grad.size(0) == s.models &&
                  grad.size(1) == s.out && grad.size(2) == s.n && grad.is_contiguous() &&
                  grad.device() == weight.device(),
              op, ": grad must be a contiguous float32 [B, out, n] tensor of shape [", s.models,
              ", ", s.out, ", ", s.n, "] on the weight's device, got ", grad.scalar_type(),
              " of shape ", grad.sizes(), " on ", grad.device());
  if (output.has_value()) {
    TORCH_CHECK(output->scalar_type() == at::kFloat && output->sizes() == grad.sizes() &&
                    output->is_contiguous() && output->device() == weight.device(),
                op, ": output must be a contiguous float32 tensor of grad's shape ", grad.sizes(),
                " on the weight's device, got ", output->scalar_type(), " of shape ",
                output->sizes(), " on ", output->device());
  }
  const bool by_column = col_ptr.has_value() || col_rows.has_value() || col_vals.has_value();
  if (by_column || (output_mask[0] && s.compact)) {
    TORCH_CHECK(s.compact && col_ptr.has_value() && col_rows.has_value() && col_vals.has_value(),
                op,
                ": the input gradient of a compact weight needs its kept weights by column "
                "(col_ptr, col_rows and col_vals), and those need a compact weight");
    TORCH_CHECK(col_ptr->device() == weight.device(), op,
                ": col_ptr must be on the weight's device, got ", col_ptr->device());
    check_kept_lists(op, "col_ptr", "col_rows", *col_ptr, *col_rows, s.models * s.in);
    TORCH_CHECK(col_rows->numel() == weight.numel() && col_vals->scalar_type() == at::kLong &&
                    col_vals->dim() == 1 && col_vals->numel() == weight.numel() &&
                    col_vals->is_contiguous() && col_vals->device() == weight.device(),
                op, ": col_rows and col_vals must list the ", weight.numel(),
                " kept weights (col_vals as contiguous int64), got ", col_rows->numel(), " and ",
                col_vals->scalar_type(), " of shape ", col_vals->sizes());
  }
  const auto& kernels = cpu::kernels();
  const float* w = weight.const_data_ptr<float>();
  const float* x = input.const_data_ptr<float>();
  const int64_t* ptr = data_or_null<int64_t>(row_ptr);

  // The gradient through the relu (where output is given) and the bias gradient.
  at::Tensor pre = grad;
  at::Tensor grad_bias;
  if (output_mask[2]) grad_bias = at::empty({s.models, s.out}, grad.options());
  if ((output.has_value() || output_mask[2]) && grad.numel() > 0) {
    if (output.has_value()) pre = at::empty_like(grad);
    const float* g = grad.const_data_ptr<float>();
    const float* y = data_or_null<float>(output);
    float* pre_data = output.has_value() ? pre.data_ptr<float>() : nullptr;
    float* gb = output_mask[2] ? grad_bias.data_ptr<float>() : nullptr;
    at::parallel_for(0, s.models * s.out, kTaskRows, [&](int64_t begin, int64_t end) {
      kernels.linear_bias_grad({g, y, s.n, begin, end, pre_data, gb});
    });
  } else if (output_mask[2]) {
    grad_bias.zero_();  // no samples
  }
  const float* dz = pre.const_data_ptr<float>();

  at::Tensor grad_weight;
  if (output_mask[1]) {
    grad_weight = at::empty(weight.sizes(), grad.options());
    if (s.n == 0) {
      grad_weight.zero_();
    } else if (grad_weight.numel() > 0) {
      // The transposed input of the models whose blocks can go dense, empty for the others.
      at::Tensor input_t = at::empty({s.models, s.n, s.in}, input.options());
      std::vector<uint8_t> transposed(s.models);
      float* xt = input_t.data_ptr<float>();
      at::parallel_for(0, s.models, 1, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          transposed[b] = dense_somewhere(s, ptr, b, dense_above, kernels.linear_block_rows);
          if (transposed[b]) {
            kernels.linear_transpose(x + b * s.in * s.n, s.in, s.n, xt + b * s.n * s.in);
          }
        }
      });
      const int32_t* cols = data_or_null<int32_t>(row_cols);
      float* gw = grad_weight.data_ptr<float>();
      const bool ok = for_each_block(s.models, s.out, [&](int64_t b, int64_t begin, int64_t end) {
        const cpu::LinearWeightGrad task{dz + b * s.out * s.n,
                                         x + b * s.in * s.n,
                                         transposed[b] ? xt + b * s.n * s.in : nullptr,
                                         ptr != nullptr ? ptr + b * s.out : nullptr,
                                         cols,
                                         s.in,
                                         s.out,
                                         s.n,
                                         dense_above,
                                         begin,
                                         end,
                                         ptr != nullptr ? gw : gw + b * s.out * s.in};
        return kernels.linear_weight_grad(task);
      });
      check_lists_read(ok, op, kBadRows);
    }
  }

  at::Tensor grad_input;
  if (output_mask[0]) {
    grad_input = at::empty({s.models, s.in, s.n}, grad.options());
    if (grad_input.numel() > 0) {
      const int64_t* cptr = data_or_null<int64_t>(col_ptr);
      const int32_t* rows = data_or_null<int32_t>(col_rows);
      const int64_t* vals = data_or_null<int64_t>(col_vals);
      float* gi = grad_input.data_ptr<float>();
      const bool ok = for_each_block(s.models, s.in, [&](int64_t b, int64_t begin, int64_t end) {
        const cpu::LinearInputGrad task{dz + b * s.out * s.n,
                                        ptr != nullptr ? w : w + b * s.out * s.in,
                                        ptr != nullptr ? ptr + b * s.out : nullptr,
                                        cptr != nullptr ? cptr + b * s.in : nullptr,
                                        rows,
                                        vals,
                                        s.in,
                                        s.out,
                                        s.n,
                                        dense_above,
                                        begin,
                                        end,
                                        gi + b * s.in * s.n};
        return kernels.linear_input_grad(task);
      });
      check_lists_read(ok, op,
                       "each column of col_rows must list ascending rows below the output's "
                       "features, without repeats, and col_vals the positions of their values "
                       "among the model's");
    }
  }
  const auto none = [&] { return at::empty({0}, grad.options()); };
  return {grad_input.defined() ? grad_input : none(), grad_weight.defined() ? grad_weight : none(),
          grad_bias.defined() ? grad_bias : none()};
}

}  // namespace

TORCH_LIBRARY_IMPL(recallprune, CPU, m) {
  m.impl("stacked_linear", &stacked_linear_cpu);
  m.impl("stacked_linear_backward", &stacked_linear_backward_cpu);
}

}  // namespace recallprune
