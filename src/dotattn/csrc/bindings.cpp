// The Python modules dotattn._tiled_cpu_<level> (one per instruction-set level, setup.py):
// the tiled kernel (tiled.cpp), the split-K decoding kernel (split_k.cpp) and the row spans of a
// boolean mask tensor (spans.cpp).

#include <torch/extension.h>

#include "kernels.h"

namespace {

// Code that runs before the CPU is known to have this module's instructions is compiled for
// any x86-64 CPU, whatever -march the module's level is built with (setup.py).
#if defined(__x86_64__)
#define DOTATTN_ANY_CPU __attribute__((target("arch=x86-64")))
#else
#define DOTATTN_ANY_CPU
#endif

// The first instruction set this module was compiled for that the CPU lacks, or nullptr.
DOTATTN_ANY_CPU const char* missing_instructions() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#if defined(__AVX512F__)
  if (!__builtin_cpu_supports("avx512f")) return "AVX-512F";
#endif
#if defined(__AVX512BW__)
  if (!__builtin_cpu_supports("avx512bw")) return "AVX-512BW";
#endif
#if defined(__AVX512DQ__)
  if (!__builtin_cpu_supports("avx512dq")) return "AVX-512DQ";
#endif
#if defined(__AVX512VL__)
  if (!__builtin_cpu_supports("avx512vl")) return "AVX-512VL";
#endif
#if defined(__AVX2__)
  if (!__builtin_cpu_supports("avx2")) return "AVX2";
#endif
#if defined(__FMA__)
  if (!__builtin_cpu_supports("fma")) return "FMA";
#endif
#if defined(__BMI2__)
  if (!__builtin_cpu_supports("bmi2")) return "BMI2";
#endif
#if defined(__SSE4_2__)
  if (!__builtin_cpu_supports("sse4.2")) return "SSE4.2";
#endif
#if defined(__POPCNT__)
  if (!__builtin_cpu_supports("popcnt")) return "POPCNT";
#endif
#endif
  return nullptr;
}

// The kernel of dotattn::split_k, the operator a compiled graph calls for a decoding step that
// split_k runs (dotattn/_ops.py defines it and decides while tracing): no Python between the
// graph and the kernel. Registered when Python asks (register_ops), on the one level it loads,
// with its autograd kernel (split_k_no_grad, split_k.cpp): the operator has no backward, and
// this says so where one is needed, which is cheaper than torch's fallback for an operator
// without one. The libraries live as long as the process.
void register_ops() {
  static torch::Library* cpu = nullptr;
  if (cpu != nullptr) return;
  cpu = new torch::Library(torch::Library::IMPL, "dotattn", c10::DispatchKey::CPU, __FILE__, __LINE__);
  cpu->impl("split_k", TORCH_FN(dotattn::split_k_op));
  auto* autograd = new torch::Library(torch::Library::IMPL, "dotattn", c10::DispatchKey::Autograd, __FILE__, __LINE__);
  autograd->impl("split_k", torch::CppFunction::makeFromBoxedFunction<&dotattn::split_k_no_grad>());
}

}  // namespace

// The module's contents, under an inner name; Python enters through PyInit_<TORCH_EXTENSION_NAME>
// below, which checks the CPU first.
PYBIND11_MODULE(dotattn_kernel, m) {
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
  m.def("register_ops", &register_ops,
        "register this module's kernel of the dotattn::split_k operator (CPU and Autograd); once per process");
  m.attr("EMPTY_TILE") = dotattn::EMPTY_TILE;
  m.attr("FULL_TILE") = dotattn::FULL_TILE;
}

// Importing a level the CPU cannot run (a documentation tool walking the package does) raises
// ImportError: this entry point and the check are the only code that runs before it is known
// the CPU can, and nothing runs when the library is loaded (register_ops, not a static
// registration).
#define DOTATTN_CONCAT_(a, b) a##b
#define DOTATTN_CONCAT(a, b) DOTATTN_CONCAT_(a, b)
extern "C" PYBIND11_EXPORT DOTATTN_ANY_CPU PyObject* DOTATTN_CONCAT(PyInit_, TORCH_EXTENSION_NAME)() {
  if (const char* missing = missing_instructions()) {
    PyErr_Format(PyExc_ImportError,
                 "this CPU lacks %s, which this level of dotattn's compiled kernel needs (it is built once per "
                 "instruction-set level); import dotattn, which loads the level this CPU runs", missing);
    return nullptr;
  }
  return PyInit_dotattn_kernel();
}
