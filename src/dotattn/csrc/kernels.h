// The compiled kernel's entry points, which bindings.cpp exports as dotattn._tiled_cpu_<level>.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace dotattn {

// A tile's code in the mask's tile index (see tiled.cpp); a code p >= 0 is PARTIAL tile p.
inline constexpr int32_t EMPTY_TILE = -2;
inline constexpr int32_t FULL_TILE = -1;

// tiled.cpp: the tiled forward and backward, and what Python asks of the machine
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const c10::optional<at::Tensor>& index, const c10::optional<at::Tensor>& allowed,
                                const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& lo,
                                const c10::optional<at::Tensor>& hi, const c10::optional<at::Tensor>& slopes,
                                int64_t alibi_off, double scale, int64_t bq, int64_t bk,
                                double dropout_p, int64_t seed, double softcap, bool stats);
std::vector<at::Tensor> backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& d_out, const at::Tensor& lse, const at::Tensor& delta,
                                 const c10::optional<at::Tensor>& index, const c10::optional<at::Tensor>& allowed,
                                 const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& lo,
                                 const c10::optional<at::Tensor>& hi, const c10::optional<at::Tensor>& slopes,
                                 int64_t alibi_off, double scale, int64_t bq, int64_t bk,
                                 double dropout_p, int64_t seed, double softcap,
                                 const c10::optional<at::Tensor>& ds_index, const c10::optional<at::Tensor>& ds_tiles);
bool has_blas();
std::vector<double> tile_gemm_seconds(int64_t bq, int64_t bk, int64_t E, int64_t repeats);

// split_k.cpp: split-K decoding
std::tuple<at::Tensor, at::Tensor, bool, at::Tensor> split_k_attention(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& lo,
    const c10::optional<at::Tensor>& hi, double scale, int64_t parts, double softcap, bool stats);
// How many parts split_k_attention cuts each of `tasks` (batch, kv head) pairs' Lk keys into:
// parts_per_thread per thread over the tasks, each of at least min_part_keys keys, at least one.
int64_t split_k_parts(int64_t tasks, int64_t Lk, int64_t parts_per_thread, int64_t min_part_keys);
// The operator dotattn::split_k (bindings.cpp): split_k_attention as a compiled graph calls it,
// out (*B, Hq, Lq, Ev) in q's dtype and lse (*B, Hq, Lq); where some row saw garbage, the
// problem (mask_tensors, mask_spec: dotattn._ops) reruns as dotattn::attention on the tiled engine.
std::tuple<at::Tensor, at::Tensor> split_k_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const c10::optional<at::Tensor>& lo,
                                              const c10::optional<at::Tensor>& hi, double scale, double softcap,
                                              int64_t parts_per_thread, int64_t min_part_keys,
                                              at::TensorList mask_tensors, c10::string_view mask_spec,
                                              bool enable_gqa);
// The eager decoding step's usual call in one Python call (dotattn.engines.split_k.eager_step):
// out (*B, Hq, Lq, Ev) in q's dtype where the three CPU tensors' headers show that the full
// path would run split_k_attention on them, with no mask, causal (1: top-left, 2: bottom-right)
// and/or padding (kv_lengths (B,) per batch row, the real keys first or, padding_left, last),
// at most max_rows query rows per kv head (-1: any); nullopt where they do not, or where some
// row saw garbage: the full path then decides.
c10::optional<at::Tensor> split_k_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       c10::optional<double> scale, c10::optional<double> softcap, bool enable_gqa,
                                       int64_t causal, const c10::optional<at::Tensor>& kv_lengths,
                                       bool padding_left, int64_t max_rows, int64_t parts_per_thread,
                                       int64_t min_part_keys);
// dotattn::split_k's autograd kernel (boxed): raises where grad mode is on and an input
// requires grad (a compiled graph calls the operator only where none does), else runs the
// operator below autograd.
void split_k_no_grad(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack);

// spans.cpp: lo, hi int64 (...) when each row of a bool tensor (..., C) allows one run of
// columns lo <= j < hi (lo = hi = 0 for a row that allows none); nullopt otherwise.
std::optional<std::tuple<at::Tensor, at::Tensor>> interval_rows(const at::Tensor& allowed);

}  // namespace dotattn
