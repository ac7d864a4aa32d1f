// The compiled kernel's entry points, which bindings.cpp exports as dotattn._tiled_cpu_<level>.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
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
                                const c10::optional<at::Tensor>& hi, double scale, int64_t bq, int64_t bk,
                                double dropout_p, int64_t seed, double softcap, bool stats);
std::vector<at::Tensor> backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& d_out, const at::Tensor& lse, const at::Tensor& delta,
                                 const c10::optional<at::Tensor>& index, const c10::optional<at::Tensor>& allowed,
                                 const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& lo,
                                 const c10::optional<at::Tensor>& hi, double scale, int64_t bq, int64_t bk,
                                 double dropout_p, int64_t seed, double softcap,
                                 const c10::optional<at::Tensor>& ds_index, const c10::optional<at::Tensor>& ds_tiles);
bool has_blas();
std::vector<double> tile_gemm_seconds(int64_t bq, int64_t bk, int64_t E, int64_t repeats);

// split_k.cpp: split-K decoding
std::tuple<at::Tensor, at::Tensor, bool, at::Tensor> split_k_attention(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& lo,
    const c10::optional<at::Tensor>& hi, double scale, int64_t parts, double softcap, bool stats);

}  // namespace dotattn
