// CPU kernels of recallprune::stacked_linear and recallprune::stacked_linear_backward: one
// at::parallel_for per call, each thread running every product for its share of the models;
// the loops over a model's rows, for this CPU's instruction set, are in linear_kernels.inl.
#include "kernels.h"
#include "stacked_linear.h"

#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <optional>
#include <tuple>
#include <vector>

namespace recallprune {
namespace {

template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

// The models split into one contiguous range per thread, of about equal cost (a model's kept
// weights, dense ones all of theirs): each thread runs the whole product for its models, so
// that a model's weights and activations stay in its core's cache from one pass to the next,
// and a call is one parallel region.
template <typename Body>
bool for_each_model(const LinearShape& s, const int64_t* ptr, const Body& body) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), s.models));
  std::vector<int64_t> bounds(parts + 1, s.models);
  bounds[0] = 0;
  if (parts > 1) {
    std::vector<double> cost(s.models);
    double total = 0;
    for (int64_t b = 0; b < s.models; ++b) {
      const int64_t kept = ptr != nullptr ? ptr[(b + 1) * s.out] - ptr[b * s.out] : s.out * s.in;
      cost[b] = static_cast<double>(kept + s.out + s.in);  // and per row and column
      total += cost[b];
    }
    double sum = 0;
    int64_t part = 1;
    for (int64_t b = 0; b < s.models && part < parts; ++b) {
      sum += cost[b];
      if (sum >= total * static_cast<double>(part) / static_cast<double>(parts)) {
        bounds[part++] = b + 1;
      }
    }
  }
  std::atomic<bool> ok{true};
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      for (int64_t b = bounds[part]; b < bounds[part + 1]; ++b) {
        if (!body(b)) ok.store(false);
      }
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
  const bool ok = for_each_model(s, ptr, [&](int64_t b) {
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
                                  0,
                                  s.out,
                                  y + b * s.out * s.n};
    return kernels.linear_forward(task);
  });
  TORCH_CHECK(ok, "stacked_linear: ", kBadRows);
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
  const int32_t* cols = data_or_null<int32_t>(row_cols);
  const int64_t* cptr = data_or_null<int64_t>(col_ptr);
  const int32_t* rows = data_or_null<int32_t>(col_rows);
  const int64_t* vals = data_or_null<int64_t>(col_vals);
  const float* g = grad.const_data_ptr<float>();
  const float* y = data_or_null<float>(output);

  // The outputs, and the buffers: the gradient through the relu (where output is given) and
  // the transposed input of the models whose weight gradient can go dense.
  at::Tensor grad_input, grad_weight, grad_bias, pre, input_t;
  if (output_mask[0]) grad_input = at::empty({s.models, s.in, s.n}, grad.options());
  if (output_mask[1]) grad_weight = at::empty(weight.sizes(), grad.options());
  if (output_mask[2]) grad_bias = at::empty({s.models, s.out}, grad.options());
  if (output.has_value()) pre = at::empty_like(grad);
  if (output_mask[1]) input_t = at::empty({s.models, s.n, s.in}, input.options());
  float* gi = output_mask[0] ? grad_input.data_ptr<float>() : nullptr;
  float* gw = output_mask[1] ? grad_weight.data_ptr<float>() : nullptr;
  float* gb = output_mask[2] ? grad_bias.data_ptr<float>() : nullptr;
  float* pre_data = output.has_value() ? pre.data_ptr<float>() : nullptr;
  float* xt = output_mask[1] ? input_t.data_ptr<float>() : nullptr;
  const float* dz = output.has_value() ? pre_data : g;
  std::atomic<bool> rows_bad{false}, cols_bad{false};
  for_each_model(s, ptr, [&](int64_t b) {
    const int64_t out_n = b * s.out * s.n;
    if ((output.has_value() || output_mask[2]) && s.out > 0) {
      kernels.linear_bias_grad({g + out_n, y != nullptr ? y + out_n : nullptr, s.n, 0, s.out,
                                pre_data != nullptr ? pre_data + out_n : nullptr,
                                gb != nullptr ? gb + b * s.out : nullptr});
    }
    if (output_mask[1] && s.out * s.in > 0) {
      const bool dense = s.n > 0 && dense_somewhere(s, ptr, b, dense_above,
                                                    kernels.linear_block_rows);
      if (dense) kernels.linear_transpose(x + b * s.in * s.n, s.in, s.n, xt + b * s.n * s.in);
      const cpu::LinearWeightGrad task{dz + out_n,
                                       x + b * s.in * s.n,
                                       dense ? xt + b * s.n * s.in : nullptr,
                                       ptr != nullptr ? ptr + b * s.out : nullptr,
                                       cols,
                                       s.in,
                                       s.out,
                                       s.n,
                                       dense_above,
                                       0,
                                       s.out,
                                       ptr != nullptr ? gw : gw + b * s.out * s.in};
      if (!kernels.linear_weight_grad(task)) rows_bad.store(true);
    }
    if (output_mask[0] && s.in * s.n > 0) {
      const cpu::LinearInputGrad task{dz + out_n,
                                      ptr != nullptr ? w : w + b * s.out * s.in,
                                      ptr != nullptr ? ptr + b * s.out : nullptr,
                                      cptr != nullptr ? cptr + b * s.in : nullptr,
                                      rows,
                                      vals,
                                      s.in,
                                      s.out,
                                      s.n,
                                      dense_above,
                                      0,
                                      s.in,
                                      gi + b * s.in * s.n};
      if (!kernels.linear_input_grad(task)) cols_bad.store(true);
    }
    return true;
  });
  TORCH_CHECK(!rows_bad.load(), op, ": ", kBadRows);
  TORCH_CHECK(!cols_bad.load(), op, ": ",
                   "each column of col_rows must list ascending rows below the output's "
                   "features, without repeats, and col_vals the positions of their values "
                   "among the model's");
  const auto none = [&] { return at::empty({0}, grad.options()); };
  return {grad_input.defined() ? grad_input : none(), grad_weight.defined() ? grad_weight : none(),
          grad_bias.defined() ? grad_bias : none()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> kept_weight_lists_cpu(
    const at::Tensor& mask_in) {
  TORCH_CHECK(mask_in.scalar_type() == at::kBool && mask_in.dim() == 3,
              "kept_weight_lists: mask must be a bool [B, out, in] tensor, got ",
              mask_in.scalar_type(), " of shape ", mask_in.sizes());
  const at::Tensor mask = mask_in.contiguous();
  const int64_t models = mask.size(0), out = mask.size(1), in = mask.size(2);
  TORCH_CHECK(out < (int64_t{1} << 31) && in < (int64_t{1} << 31),
              "kept_weight_lists: a layer of ", out, " x ", in,
              " weights is too large for int32 indices");
  const uint8_t* m = static_cast<const uint8_t*>(mask.const_data_ptr());
  const auto long_options = mask.options().dtype(at::kLong);
  at::Tensor row_ptr = at::empty({models * out + 1}, long_options);
  at::Tensor col_ptr = at::empty({models * in + 1}, long_options);
  int64_t* rp = row_ptr.data_ptr<int64_t>();
  int64_t* cp = col_ptr.data_ptr<int64_t>();
  // Counts per row and per column, then offsets (the values are numbered row by row).
  at::parallel_for(0, models, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int64_t* columns = cp + b * in + 1;
      std::fill(columns, columns + in, 0);
      for (int64_t o = 0; o < out; ++o) {
        const uint8_t* row = m + (b * out + o) * in;
        int64_t count = 0;
        for (int64_t i = 0; i < in; ++i) {
          count += row[i] != 0;
          columns[i] += row[i] != 0;
        }
        rp[b * out + o + 1] = count;
      }
    }
  });
  rp[0] = 0;
  cp[0] = 0;
  for (int64_t r = 0; r < models * out; ++r) rp[r + 1] += rp[r];
  for (int64_t c = 0; c < models * in; ++c) cp[c + 1] += cp[c];
  const int64_t kept = rp[models * out];
  at::Tensor row_cols = at::empty({kept}, mask.options().dtype(at::kInt));
  at::Tensor col_rows = at::empty({kept}, mask.options().dtype(at::kInt));
  at::Tensor col_vals = at::empty({kept}, long_options);
  int32_t* rc = row_cols.data_ptr<int32_t>();
  int32_t* cr = col_rows.data_ptr<int32_t>();
  int64_t* cv = col_vals.data_ptr<int64_t>();
  at::parallel_for(0, models, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> next(static_cast<size_t>(in));
    for (int64_t b = begin; b < end; ++b) {
      std::copy(cp + b * in, cp + (b + 1) * in, next.begin());
      for (int64_t o = 0; o < out; ++o) {
        const uint8_t* row = m + (b * out + o) * in;
        int64_t k = rp[b * out + o];
        for (int64_t i = 0; i < in; ++i) {
          if (row[i] == 0) continue;
          rc[k] = static_cast<int32_t>(i);
          cr[next[i]] = static_cast<int32_t>(o);
          cv[next[i]++] = k++;
        }
      }
    }
  });
  return {row_ptr, row_cols, col_ptr, col_rows, col_vals};
}

}  // namespace

TORCH_LIBRARY_IMPL(recallprune, CPU, m) {
  m.impl("kept_weight_lists", &kept_weight_lists_cpu);
  m.impl("stacked_linear", &stacked_linear_cpu);
  m.impl("stacked_linear_backward", &stacked_linear_backward_cpu);
}

}  // namespace recallprune
