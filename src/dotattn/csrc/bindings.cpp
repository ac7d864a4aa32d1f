// The Python modules dotattn._tiled_cpu_<level> (one per instruction-set level, setup.py):
// the tiled kernel (tiled.cpp), the split-K decoding kernel (split_k.cpp) and the row spans of a
// boolean mask tensor (spans.cpp).

#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dotattn's tiled CPU attention kernel (see dotattn/engines/tiled.py)";
  m.attr("torch_version") = DOTATTN_TORCH_VERSION;  // the torch this module was built against
  m.def("forward", &dotattn::forward,
        "out, lse[, row_stats] = forward(q, k, v, index, allowed, bias, lo, hi, slopes, alibi_off, scale, bq, bk, "
        "dropout_p, seed, "
        "softcap, stats); with stats, row_stats (N, Hq, Lq, 11) holds each row's monitor figures (common.h)");
  m.def("backward", &dotattn::backward,
        "dq, dk, dv = backward(q, k, v, d_out, lse, delta, index, allowed, bias, lo, hi, slopes, alibi_off, scale, bq, "
        "bk, dropout_p, "
        "seed, softcap, ds_index, ds_tiles); ds_tiles receives the score gradient of the partial tiles");
  m.def("split_k_attention", &dotattn::split_k_attention,
        "out, lse, garbage, row_stats = split_k_attention(q, k, v, lo, hi, scale, parts, softcap, stats): the split-K "
        "forward, merged; with stats, row_stats (N, Hq, Lq, 11) as forward's, else None (split_k.cpp)");
  m.def("split_k_parts", &dotattn::split_k_parts,
        "parts = split_k_parts(tasks, Lk, parts_per_thread, min_part_keys): how many parts split_k_attention "
        "cuts each (batch, kv head)'s keys into on this many threads");
  m.def("split_k_step", &dotattn::split_k_step,
        "out or None = split_k_step(q, k, v, scale, softcap, enable_gqa, causal, kv_lengths, padding_left, "
        "max_rows, parts_per_thread, min_part_keys): a decoding step's usual call, checked and run in one call; None where the full path "
        "must decide (split_k.cpp)");
  m.def("interval_rows", &dotattn::interval_rows,
        "(lo, hi) int64 (...) or None = interval_rows(allowed): each row of a CPU bool tensor (..., C) as one "
        "run of columns lo <= j < hi, or None when some row is not one run (spans.cpp)");
  m.def("has_blas", &dotattn::has_blas, "whether torch exports the BLAS (MKL) GEMM the kernel calls");
  m.def("tile_gemm_seconds", &dotattn::tile_gemm_seconds,
        "[float32 s, bfloat16 s] per call of a tile's two GEMMs (bfloat16 absent without MKL's bf16 GEMM)");
  m.attr("EMPTY_TILE") = dotattn::EMPTY_TILE;
  m.attr("FULL_TILE") = dotattn::FULL_TILE;
}

// The kernel of dotattn::split_k, the operator a compiled graph calls for a decoding step that
// split_k runs (dotattn/_ops.py defines it and decides while tracing): no Python between the
// graph and the kernel. Only the kernel is registered here, so a second level loaded into one
// process overrides it (a warning) rather than defining the operator twice (an abort).
TORCH_LIBRARY_IMPL(dotattn, CPU, m) { m.impl("split_k", TORCH_FN(dotattn::split_k_op)); }
// Its autograd kernel (split_k_no_grad, split_k.cpp): the operator has no backward, and this
// says so where one is needed, which is cheaper than torch's fallback for an operator without one.
TORCH_LIBRARY_IMPL(dotattn, Autograd, m) {
  m.impl("split_k", torch::CppFunction::makeFromBoxedFunction<&dotattn::split_k_no_grad>());
}
