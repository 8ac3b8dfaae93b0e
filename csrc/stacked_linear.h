// Device-independent parts of the stacked linear ops (stacked_linear.cpp): the argument checks.
// The layout is samples last: input [B, in, n], output [B, out, n]; the weight dense
// [B, out, in] or compact (the kept weights' values, with their index lists).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace recallprune {

struct LinearShape {
  int64_t models, in, out, n;
  bool compact;
};

// Checks stacked_linear's arguments (op names the op in the messages): float32 contiguous
// input [B, in, n]; without row lists a float32 contiguous weight [B, out, in]; with them
// (row_ptr int64 [B * out + 1] offsets, row_cols int32, both well formed, B >= 1) the weight
// the kept values, float32 contiguous [nnz] with nnz = row_cols' length; bias [B, out] if
// given; all on one device; dense_above not negative.
LinearShape check_stacked_linear_args(const char* op, const at::Tensor& input,
                                      const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& row_ptr,
                                      const std::optional<at::Tensor>& row_cols,
                                      double dense_above);

// Checks one stacked weight (dense or compact, as check_stacked_linear_args) of B = models
// layers with in inputs each, and its bias; layer prefixes the messages (say "layer 2: ", or
// ""). The shape's n is left 0.
LinearShape check_stacked_weight(const char* op, const char* layer, int64_t models, int64_t in,
                                 const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& row_ptr,
                                 const std::optional<at::Tensor>& row_cols, double dense_above);

// Checks a compact weight's lists by column (col_ptr int64 [B * in + 1], col_rows int32,
// col_vals int64, one entry per kept weight), which its input gradient needs: an error where
// the weight of shape s is not compact or a list is missing.
void check_column_lists(const char* op, const char* layer, const LinearShape& s,
                        const at::Tensor& weight, const std::optional<at::Tensor>& col_ptr,
                        const std::optional<at::Tensor>& col_rows,
                        const std::optional<at::Tensor>& col_vals);

// Checks one pair of index lists: ptr contiguous int64 [rows + 1] of offsets into idx,
// starting at 0, never decreasing, ending at idx's length; idx contiguous int32 [nnz]. The
// entries of idx are checked by the kernels as they read them.
void check_kept_lists(const char* op, const char* ptr_name, const char* idx_name,
                      const at::Tensor& ptr, const at::Tensor& idx, int64_t rows);

}  // namespace recallprune
