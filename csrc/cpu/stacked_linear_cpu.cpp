// CPU kernels of recallprune::stacked_linear, recallprune::stacked_linear_backward and
// recallprune::stacked_mlp_grads (a whole training step's gradients of stacked MLPs): one
// at::parallel_for per call, each thread running every product for its share of the models;
// the loops over a model's rows and its loss, for this CPU's instruction set, are in
// linear_kernels.inl.
#include "kernels.h"
#include "stacked_linear.h"

#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <numeric>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace recallprune {
namespace {

template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

// Runs body(b) for every model b, the models shared out among the threads as they go, the
// costliest first (cost(b): model b's): each thread runs the whole work of each model it
// takes, so that a model's weights and activations stay in its core's cache from one pass to
// the next, and a call is one parallel region. A model's results do not depend on the thread
// that computes it. body(b) returns false where model b's lists are bad.
template <typename Cost, typename Body>
bool for_each_model(int64_t models, const Cost& cost, const Body& body) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), models));
  std::vector<int64_t> order(models);
  std::iota(order.begin(), order.end(), 0);
  if (threads > 1) {
    std::vector<double> costs(models);
    for (int64_t b = 0; b < models; ++b) costs[b] = cost(b);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t c) { return costs[a] > costs[c]; });
  }
  std::atomic<int64_t> next{0};
  std::atomic<bool> ok{true};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < models; i = next.fetch_add(1)) {
      if (!body(order[i])) ok.store(false);
    }
  });
  return ok.load();
}

// A layer's cost for model b: its kept weights (a dense layer's all), and per row and column.
double layer_cost(const LinearShape& s, const int64_t* ptr, int64_t b) {
  const int64_t kept = ptr != nullptr ? ptr[(b + 1) * s.out] - ptr[b * s.out] : s.out * s.in;
  return static_cast<double>(kept + s.out + s.in);
}

template <typename Body>
bool for_each_model(const LinearShape& s, const int64_t* ptr, const Body& body) {
  return for_each_model(s.models, [&](int64_t b) { return layer_cost(s, ptr, b); }, body);
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

// Model b's slice of a stacked layer, as the per-model kernels take it: a dense weight's
// [out, in] block, or a compact weight's values (every model's) with the model's row offsets
// (and column offsets, where given). Builds each kernel's task for activations of s.n samples.
struct LayerSlice {
  const LinearShape& s;
  const float* weight;
  const int64_t* row_ptr;  // compact: every model's [B * out + 1]; dense: nullptr
  const int32_t* row_cols;
  const int64_t* col_ptr;  // or nullptr where the input gradient is not taken
  const int32_t* col_rows;
  const int64_t* col_vals;
  int64_t b;
  double dense_above;

  bool compact() const { return row_ptr != nullptr; }
  const float* model_weight() const { return compact() ? weight : weight + b * s.out * s.in; }
  const int64_t* rows() const { return compact() ? row_ptr + b * s.out : nullptr; }
  // Where the model's weights (and their gradients, momentum...) lie among the parameter's.
  int64_t begin() const { return compact() ? row_ptr[b * s.out] : b * s.out * s.in; }
  int64_t end() const { return compact() ? row_ptr[(b + 1) * s.out] : (b + 1) * s.out * s.in; }

  cpu::LinearForward forward(const float* input, const float* bias, bool relu,
                             float* output) const {
    return {input, model_weight(), bias, rows(), row_cols, s.in, s.out, s.n, dense_above,
            relu,  0,              s.out, output};
  }
  // grad_weight: the whole parameter's gradient (the model's part is written).
  cpu::LinearWeightGrad weight_grad(const float* grad, const float* input, const float* input_t,
                                    float* grad_weight) const {
    return {grad,  input, input_t, rows(), row_cols, s.in, s.out, s.n, dense_above, 0, s.out,
            compact() ? grad_weight : grad_weight + b * s.out * s.in};
  }
  cpu::LinearInputGrad input_grad(const float* grad, float* grad_input) const {
    return {grad, model_weight(), rows(), col_ptr != nullptr ? col_ptr + b * s.in : nullptr,
            col_rows, col_vals, s.in, s.out, s.n, dense_above, 0, s.in, grad_input};
  }
};

constexpr const char* kBadRows =
    "each row of row_cols must list ascending columns below the input's features, without "
    "repeats";
constexpr const char* kBadColumns =
    "each column of col_rows must list ascending rows below the output's features, without "
    "repeats, and col_vals the positions of their values among the model's";

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
    const LayerSlice slice{s, w, ptr, cols, nullptr, nullptr, nullptr, b, dense_above};
    return kernels.linear_forward(
        slice.forward(x + b * s.in * s.n, bias_data != nullptr ? bias_data + b * s.out : nullptr,
                      relu, y + b * s.out * s.n));
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
    check_column_lists(op, "", s, weight, col_ptr, col_rows, col_vals);
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
    const LayerSlice slice{s, w, ptr, cols, cptr, rows, vals, b, dense_above};
    if (output_mask[1] && s.out * s.in > 0) {
      const bool dense = s.n > 0 && dense_somewhere(s, ptr, b, dense_above,
                                                    kernels.linear_block_rows);
      if (dense) kernels.linear_transpose(x + b * s.in * s.n, s.in, s.n, xt + b * s.n * s.in);
      if (!kernels.linear_weight_grad(slice.weight_grad(
              dz + out_n, x + b * s.in * s.n, dense ? xt + b * s.n * s.in : nullptr, gw))) {
        rows_bad.store(true);
      }
    }
    if (output_mask[0] && s.in * s.n > 0) {
      if (!kernels.linear_input_grad(slice.input_grad(dz + out_n, gi + b * s.in * s.n))) {
        cols_bad.store(true);
      }
    }
    return true;
  });
  TORCH_CHECK(!rows_bad.load(), op, ": ", kBadRows);
  TORCH_CHECK(!cols_bad.load(), op, ": ", kBadColumns);
  const auto none = [&] { return at::empty({0}, grad.options()); };
  return {grad_input.defined() ? grad_input : none(), grad_weight.defined() ? grad_weight : none(),
          grad_bias.defined() ? grad_bias : none()};
}

// One layer of stacked_mlp_grads: its shape and data (the lists nullptr where dense).
struct MlpLayer {
  LinearShape s;
  const float* weight;
  const float* bias;
  const int64_t* row_ptr;
  const int32_t* row_cols;
  const int64_t* col_ptr;
  const int32_t* col_rows;
  const int64_t* col_vals;
  float* grad_weight;
  float* grad_bias;
  // stacked_mlp_step_ only: the momentum buffers, the weight's keep mask (bytes, or nullptr)
  // and each parameter's step.
  float* weight_momentum = nullptr;
  float* bias_momentum = nullptr;
  const uint8_t* keep = nullptr;
  cpu::SgdHyper weight_step{}, bias_step{};

  LayerSlice slice(int64_t b, double dense_above) const {
    return {s, weight, row_ptr, row_cols, col_ptr, col_rows, col_vals, b, dense_above};
  }
};

// The SGD step of stacked_mlp_step_ (nullptr for stacked_mlp_grads): the momentum buffers,
// keep masks and hyper-parameters, per layer.
struct MlpUpdate {
  at::TensorList weight_momenta, bias_momenta;
  const c10::List<std::optional<at::Tensor>>* keep_masks;
  c10::ArrayRef<double> lr, weight_decay;
  double momentum, dampening;
  bool nesterov, maximize, check_lists;
};

// Whether model b's index lists are well formed (the kernels check them too, as they read
// them; stacked_mlp_step_ checks them all before it changes any parameter).
bool model_lists_valid(const std::vector<MlpLayer>& net, int64_t b) {
  const auto ascending = [](const int32_t* idx, int64_t k0, int64_t k1, int64_t limit) {
    for (int64_t k = k0, previous = -1; k < k1; previous = idx[k++]) {
      if (idx[k] <= previous || idx[k] >= limit) return false;
    }
    return true;
  };
  for (size_t l = 0; l < net.size(); ++l) {
    const MlpLayer& layer = net[l];
    const LinearShape& s = layer.s;
    if (layer.row_ptr == nullptr) continue;
    for (int64_t r = b * s.out; r < (b + 1) * s.out; ++r) {
      if (!ascending(layer.row_cols, layer.row_ptr[r], layer.row_ptr[r + 1], s.in)) return false;
    }
    if (layer.col_ptr == nullptr) continue;
    const int64_t low = layer.row_ptr[b * s.out], high = layer.row_ptr[(b + 1) * s.out];
    for (int64_t c = b * s.in; c < (b + 1) * s.in; ++c) {
      if (!ascending(layer.col_rows, layer.col_ptr[c], layer.col_ptr[c + 1], s.out)) return false;
      for (int64_t k = layer.col_ptr[c]; k < layer.col_ptr[c + 1]; ++k) {
        if (layer.col_vals[k] < low || layer.col_vals[k] >= high) return false;
      }
    }
  }
  return true;
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> stacked_mlp_impl(
    const char* op, const at::Tensor& x, const at::Tensor& y, const at::Tensor& batch,
    at::TensorList weights, at::TensorList biases,
    const c10::List<std::optional<at::Tensor>>& lists, double dense_above,
    const MlpUpdate* update) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous() &&
                  x.device().is_cpu(),
              op, ": x must be a contiguous float32 [N, features] CPU tensor, got ",
              x.scalar_type(), " of shape ", x.sizes(), " on ", x.device());
  TORCH_CHECK(y.scalar_type() == at::kLong && y.dim() == 1 && y.size(0) == x.size(0) &&
                  y.is_contiguous() && y.device().is_cpu(),
              op, ": y must be a contiguous int64 CPU tensor of x's ", x.size(0),
              " targets, got ", y.scalar_type(), " of shape ", y.sizes(), " on ", y.device());
  TORCH_CHECK(batch.scalar_type() == at::kLong && batch.dim() == 2 && batch.size(1) >= 1 &&
                  batch.device().is_cpu(),
              op, ": batch must be an int64 [B, n] CPU tensor of sample indices "
              "with n >= 1, got ", batch.scalar_type(), " of shape ", batch.sizes(), " on ",
              batch.device());
  const int64_t layers = static_cast<int64_t>(weights.size());
  TORCH_CHECK(layers >= 1 && static_cast<int64_t>(biases.size()) == layers, op,
              ": weights and biases must list the same layers (at least one), got ", layers,
              " weights and ", biases.size(), " biases");
  TORCH_CHECK(lists.empty() || static_cast<int64_t>(lists.size()) == 5 * layers, op,
              ": lists must hold 5 entries per layer (row_ptr, row_cols, col_ptr, col_rows, "
              "col_vals; None for a dense weight) or none, got ", lists.size(), " for ", layers,
              " layers");
  const int64_t models = batch.size(0), n = batch.size(1);
  const auto list = [&](int64_t l, int64_t k) -> std::optional<at::Tensor> {
    return lists.empty() ? std::nullopt : lists.get(5 * l + k);
  };
  std::vector<MlpLayer> net(layers);
  std::vector<at::Tensor> grad_weights, grad_biases;
  int64_t features = x.size(1);
  for (int64_t l = 0; l < layers; ++l) {
    const std::string name = "layer " + std::to_string(l) + ": ";
    TORCH_CHECK(weights[l].device().is_cpu(), op, ": ", name, "the weight must be on the CPU, got ",
                weights[l].device());
    const std::optional<at::Tensor> bias = biases[l];
    TORCH_CHECK(bias->defined(), op, ": ", name, "a bias is needed");
    const LinearShape s = check_stacked_weight(op, name.c_str(), models, features, weights[l],
                                               bias, list(l, 0), list(l, 1), dense_above);
    if (s.compact && l > 0) {
      check_column_lists(op, name.c_str(), s, weights[l], list(l, 2), list(l, 3), list(l, 4));
    }
    grad_weights.push_back(at::empty(weights[l].sizes(), weights[l].options()));
    grad_biases.push_back(at::empty({models, s.out}, weights[l].options()));
    MlpLayer& layer = net[l];
    layer.s = s;
    layer.s.n = n;
    layer.weight = weights[l].const_data_ptr<float>();
    layer.bias = bias->const_data_ptr<float>();
    layer.row_ptr = data_or_null<int64_t>(list(l, 0));
    layer.row_cols = data_or_null<int32_t>(list(l, 1));
    const bool by_column = s.compact && l > 0;
    layer.col_ptr = by_column ? data_or_null<int64_t>(list(l, 2)) : nullptr;
    layer.col_rows = by_column ? data_or_null<int32_t>(list(l, 3)) : nullptr;
    layer.col_vals = by_column ? data_or_null<int64_t>(list(l, 4)) : nullptr;
    layer.grad_weight = grad_weights.back().data_ptr<float>();
    layer.grad_bias = grad_biases.back().data_ptr<float>();
    features = s.out;
    if (update == nullptr) continue;
    const auto state = [&](const at::Tensor& t, const at::Tensor& param, const char* what) {
      TORCH_CHECK(t.scalar_type() == at::kFloat && t.sizes() == param.sizes() &&
                      t.is_contiguous() && t.device().is_cpu(),
                  op, ": ", name, what, " must be a contiguous float32 CPU tensor of shape ",
                  param.sizes(), ", got ", t.scalar_type(), " of shape ", t.sizes(), " on ",
                  t.device());
      return t.data_ptr<float>();
    };
    layer.weight_momentum = state(update->weight_momenta[l], weights[l], "the weight's momentum");
    layer.bias_momentum = state(update->bias_momenta[l], biases[l], "the bias's momentum");
    const std::optional<at::Tensor> keep = update->keep_masks->get(l);
    if (keep.has_value()) {
      TORCH_CHECK(!s.compact, op, ": ", name,
                  "a compact weight holds its kept weights alone: it takes no keep mask");
      TORCH_CHECK(keep->scalar_type() == at::kBool && keep->sizes() == weights[l].sizes() &&
                      keep->is_contiguous() && keep->device().is_cpu(),
                  op, ": ", name, "the keep mask must be a contiguous bool CPU tensor of the ",
                  "weight's shape ", weights[l].sizes(), ", got ", keep->scalar_type(),
                  " of shape ", keep->sizes());
      layer.keep = static_cast<const uint8_t*>(keep->const_data_ptr());
    }
    const auto hyper = [&](int64_t index) {
      return cpu::SgdHyper{update->lr[index], update->momentum, update->dampening,
                           update->weight_decay[index], update->nesterov, update->maximize,
                           false, nullptr};
    };
    layer.weight_step = hyper(l);
    layer.bias_step = hyper(layers + l);
  }
  const int64_t classes = features, samples = x.size(0);
  TORCH_CHECK(classes >= 1, op, ": the last layer must have at least one output");
  at::Tensor losses = at::empty({models, n}, x.options());
  if (models == 0) return {losses, grad_weights, grad_biases};

  // Per thread: the gathered inputs [n, in], every activation [features, n], the gradients of
  // two of them and of a pre-activation, a transposed input, the targets.
  int64_t widest = x.size(1), activations = x.size(1);
  for (const MlpLayer& layer : net) {
    widest = std::max(widest, layer.s.out);
    activations += layer.s.out;
  }
  const int64_t scratch_size = n * (x.size(1) + activations + 4 * widest);
  const auto& kernels = cpu::kernels();
  const float* xs = x.const_data_ptr<float>();
  const int64_t* ys = y.const_data_ptr<int64_t>();
  const int64_t* order = batch.const_data_ptr<int64_t>();
  float* loss_data = losses.data_ptr<float>();
  std::atomic<bool> bad_sample{false}, bad_target{false}, bad_rows{false}, bad_cols{false};
  const auto cost = [&](int64_t b) {
    double total = 0;
    for (const MlpLayer& layer : net) total += layer_cost(layer.s, layer.row_ptr, b);
    return total;
  };
  if (update != nullptr) {
    // Every model's samples, targets and lists first: a call that fails changes nothing.
    for (int64_t b = 0; b < models; ++b) {
      for (int64_t j = 0; j < n; ++j) {
        const int64_t sample = order[b * batch.stride(0) + j * batch.stride(1)];
        TORCH_CHECK(sample >= 0 && sample < samples, op,
                    ": every entry of batch must index a sample of x, in [0, ", samples, ")");
        TORCH_CHECK(ys[sample] >= 0 && ys[sample] < classes, op,
                    ": every target of the batch's samples must be a class in [0, ", classes,
                    ") (the last layer's outputs)");
      }
    }
    TORCH_CHECK(!update->check_lists || for_each_model(models, cost, [&](int64_t b) {
                  return model_lists_valid(net, b);
                }),
                op, ": the index lists must be well formed (", kBadRows, "; ", kBadColumns, ")");
  }
  for_each_model(models, cost, [&](int64_t b) {
    thread_local std::vector<float> scratch;
    thread_local std::vector<int64_t> targets;
    if (static_cast<int64_t>(scratch.size()) < scratch_size) scratch.resize(scratch_size);
    targets.resize(n);
    float* rows = scratch.data();  // [n, in]: layer 0's input transposed
    std::vector<float*> act(layers + 1);
    act[0] = rows + n * x.size(1);
    for (int64_t l = 0; l < layers; ++l) act[l + 1] = act[l] + n * net[l].s.in;
    float* grad = act[layers] + n * classes;
    float* grad_next = grad + n * widest;
    float* pre = grad_next + n * widest;
    float* transposed = pre + n * widest;
    const int64_t in0 = x.size(1);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t sample = order[b * batch.stride(0) + j * batch.stride(1)];
      if (sample < 0 || sample >= samples) {
        bad_sample.store(true);
        return true;
      }
      std::copy(xs + sample * in0, xs + (sample + 1) * in0, rows + j * in0);
      targets[j] = ys[sample];
    }
    kernels.linear_transpose(rows, n, in0, act[0]);
    for (int64_t l = 0; l < layers; ++l) {
      const MlpLayer& layer = net[l];
      const cpu::LinearForward task = layer.slice(b, dense_above)
                                          .forward(act[l], layer.bias + b * layer.s.out,
                                                   l + 1 < layers, act[l + 1]);
      if (!kernels.linear_forward(task)) {
        bad_rows.store(true);
        return true;
      }
    }
    if (!kernels.softmax_loss({act[layers], targets.data(), classes, n, loss_data + b * n, grad})) {
      bad_target.store(true);
      return true;
    }
    for (int64_t l = layers - 1; l >= 0; --l) {
      const MlpLayer& layer = net[l];
      const LinearShape& s = layer.s;
      const bool relu = l + 1 < layers;
      // grad: the gradient of this layer's output; through its relu, that of its sum.
      kernels.linear_bias_grad({grad, relu ? act[l + 1] : nullptr, n, 0, s.out,
                                relu ? pre : nullptr, layer.grad_bias + b * s.out});
      const float* dz = relu ? pre : grad;
      const float* input_t = rows;
      if (l > 0) {
        input_t = nullptr;
        if (dense_somewhere(s, layer.row_ptr, b, dense_above, kernels.linear_block_rows)) {
          kernels.linear_transpose(act[l], s.in, n, transposed);
          input_t = transposed;
        }
      }
      const LayerSlice slice = layer.slice(b, dense_above);
      const cpu::LinearWeightGrad weight_task =
          slice.weight_grad(dz, act[l], input_t, layer.grad_weight);
      if (!kernels.linear_weight_grad(weight_task)) {
        bad_rows.store(true);
        return true;
      }
      if (l == 0) break;
      const cpu::LinearInputGrad input_task = slice.input_grad(dz, grad_next);
      if (!kernels.linear_input_grad(input_task)) {
        bad_cols.store(true);
        return true;
      }
      std::swap(grad, grad_next);
    }
    if (update == nullptr) return true;
    for (const MlpLayer& layer : net) {  // model b's step, while its gradients are in cache
      const LinearShape& s = layer.s;
      const LayerSlice slice = layer.slice(b, dense_above);
      const int64_t numel =
          slice.compact() ? layer.row_ptr[s.models * s.out] : s.models * s.out * s.in;
      float* weight = const_cast<float*>(layer.weight);
      float* bias = const_cast<float*>(layer.bias);
      kernels.sgd_float_part({weight, layer.grad_weight, layer.weight_momentum, layer.keep, false,
                              nullptr, nullptr, slice.begin(), slice.end()},
                             layer.weight_step, numel);
      kernels.sgd_float_part({bias, layer.grad_bias, layer.bias_momentum, nullptr, false, nullptr,
                              nullptr, b * s.out, (b + 1) * s.out},
                             layer.bias_step, s.models * s.out);
    }
    return true;
  });
  TORCH_CHECK(!bad_sample.load(), op, ": every entry of batch must index a sample of x, in [0, ",
              samples, ")");
  TORCH_CHECK(!bad_target.load(), op, ": every target of the batch's samples must be a class in "
              "[0, ", classes, ") (the last layer's outputs)");
  TORCH_CHECK(!bad_rows.load(), op, ": ", kBadRows);
  TORCH_CHECK(!bad_cols.load(), op, ": ", kBadColumns);
  return {losses, grad_weights, grad_biases};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> stacked_mlp_grads_cpu(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& batch, at::TensorList weights,
    at::TensorList biases, const c10::List<std::optional<at::Tensor>>& lists,
    double dense_above) {
  return stacked_mlp_impl("stacked_mlp_grads", x, y, batch, weights, biases, lists, dense_above,
                          nullptr);
}

at::Tensor stacked_mlp_step_cpu(
    const at::Tensor& x, const at::Tensor& y, const at::Tensor& batch, at::TensorList weights,
    at::TensorList biases, const c10::List<std::optional<at::Tensor>>& lists,
    at::TensorList weight_momenta, at::TensorList bias_momenta,
    const c10::List<std::optional<at::Tensor>>& keep_masks, c10::ArrayRef<double> lr,
    c10::ArrayRef<double> weight_decay, double momentum, double dampening, bool nesterov,
    bool maximize, bool check_lists, double dense_above) {
  constexpr const char* op = "stacked_mlp_step_";
  const size_t layers = weights.size();
  TORCH_CHECK(weight_momenta.size() == layers && bias_momenta.size() == layers &&
                  keep_masks.size() == layers && lr.size() == 2 * layers &&
                  weight_decay.size() == 2 * layers,
              op, ": per layer a weight and a bias momentum buffer and a keep mask (or None), "
              "and lr and weight_decay per parameter (the weights', then the biases'), got ",
              weight_momenta.size(), ", ", bias_momenta.size(), ", ", keep_masks.size(), ", ",
              lr.size(), " and ", weight_decay.size(), " for ", layers, " layers");
  TORCH_CHECK(momentum != 0.0, op, ": momentum must not be 0 (the step reads the buffers)");
  const MlpUpdate update{weight_momenta, bias_momenta, &keep_masks, lr,         weight_decay,
                         momentum,       dampening,    nesterov,    maximize, check_lists};
  return std::get<0>(
      stacked_mlp_impl(op, x, y, batch, weights, biases, lists, dense_above, &update));
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
  m.impl("stacked_mlp_grads", &stacked_mlp_grads_cpu);
  m.impl("stacked_mlp_step_", &stacked_mlp_step_cpu);
}

}  // namespace recallprune
