// The tiled engine's compiled CPU kernel: flash-style attention, forward and backward.
//
// Shape legend: N flattened batch, Hq query heads, Hkv key/value heads (G = Hq / Hkv
// query heads share one), Lq/Lk lengths, E head dim, Ev value dim, bq x bk a tile.
//
//   q: (N, Hq, Lq, E)  k: (N, Hkv, Lk, E)  v: (N, Hkv, Lk, Ev)   last dim contiguous
//   out: (N, Hq, Lq, Ev)  lse: (N, Hq, Lq)
//
// The mask arrives already classified per tile (Python's masks.block_map):
//   index: int32 (Nm, Hm, nQ, nK), Nm in {1, N}, Hm in {1, Hq}
//          EMPTY_TILE  skipped: its keys are never read
//          FULL_TILE   no mask work
//          p >= 0      PARTIAL: tile p of `allowed` (uint8) or `bias` (additive, -inf = masked)
//   allowed / bias: (P, bq, bk), each tile stored at the full tile size; or bias is a
//          whole float mask (Nm, Hm, Lq or 1, Lk or 1) read in place; or instead
//   lo / hi: int32 (Nm, Hm, Lq), row spans: query i may attend keys lo[i] <= j < hi[i]
//   slopes: ALiBi's (Hq,) in the compute type: slope_h · (j - i - alibi_off) added to every
//          PARTIAL tile (an additive mask has no FULL tiles), after the spans and any bias
//
// Every GEMM goes to the BLAS that torch links (MKL's SGEMM/DGEMM), one thread each,
// inside our own OpenMP loop over (batch x heads, query blocks) in the forward and
// (batch x kv heads, key-tile ranges) in the backward. The softmax is fused into the
// tile loop and runs on the tile while it is in cache. Storage types: float32, float64,
// and bfloat16 with MKL's bf16 GEMMs (scores, softmax and accumulators in float32; P
// rounded to bfloat16 for the GEMMs, dS split into two bfloat16 parts). Python picks bf16 GEMMs or converts bfloat16 to
// float32 by timing tile_gemm_seconds() on the machine.

#include "common.h"
#include "kernels.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

extern "C" {
// Fortran BLAS entry points exported by libtorch_cpu (MKL). Weak: a torch built
// without them leaves these null, and has_blas() tells Python to use torch ops.
void SGEMM(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
           const int*, const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void DGEMM(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
           const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
// MKL's bfloat16 GEMM with float32 accumulation and output (uint16 holds a bfloat16).
void GEMM_BF16BF16F32(const char*, const char*, const int*, const int*, const int*, const float*, const uint16_t*,
                      const int*, const uint16_t*, const int*, const float*, float*, const int*) __attribute__((weak));
}

namespace dotattn {
namespace {

// Row-major C (M x N, ldc) = alpha op(A) op(B) + beta C, with op(A) M x K and op(B) K x N.
// Column-major BLAS sees every row-major matrix transposed, so it computes Cᵀ = op(B)ᵀ op(A)ᵀ.
inline void gemm(bool ta, bool tb, int M, int N, int K, float alpha, const float* A, int lda,
                 const float* B, int ldb, float beta, float* C, int ldc) {
  const char a = ta ? 'T' : 'N', b = tb ? 'T' : 'N';
  SGEMM(&b, &a, &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}

inline void gemm(bool ta, bool tb, int M, int N, int K, double alpha, const double* A, int lda,
                 const double* B, int ldb, double beta, double* C, int ldc) {
  const char a = ta ? 'T' : 'N', b = tb ? 'T' : 'N';
  DGEMM(&b, &a, &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}

inline void gemm(bool ta, bool tb, int M, int N, int K, float alpha, const at::BFloat16* A, int lda,
                 const at::BFloat16* B, int ldb, float beta, float* C, int ldc) {
  const char a = ta ? 'T' : 'N', b = tb ? 'T' : 'N';
  GEMM_BF16BF16F32(&b, &a, &N, &M, &K, &alpha, reinterpret_cast<const uint16_t*>(B), &ldb,
                   reinterpret_cast<const uint16_t*>(A), &lda, &beta, C, &ldc);
}

// A rows x cols tile (leading dim ld) as a GEMM of In takes it: the tile itself when In is
// its type T, else converted into `buf` (same leading dim).
template <typename In, typename T>
inline const In* gemm_input(const T* tile, In* buf, int ld, int rows, int cols) {
  if constexpr (std::is_same_v<In, T>) {
    return tile;
  } else {
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < cols; ++c)
        buf[static_cast<int64_t>(r) * ld + c] = static_cast<In>(tile[static_cast<int64_t>(r) * ld + c]);
    return buf;
  }
}

// What gemm_input's rounding lost: buf (holding In(tile)) becomes In(tile - buf), so the
// two GEMM inputs together carry tile to about twice In's precision.
template <typename In, typename T>
inline const In* gemm_residual(const T* tile, In* buf, int ld, int rows, int cols) {
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) {
      In& b = buf[static_cast<int64_t>(r) * ld + c];
      b = static_cast<In>(tile[static_cast<int64_t>(r) * ld + c] - static_cast<T>(b));
    }
  return buf;
}

// The per-tile mask, as classified in Python.
template <typename T>
struct TileMask {
  const int32_t* index = nullptr;  // null: no mask, every tile FULL
  int64_t sn = 0, sh = 0;          // strides of index over (n, h); 0 where broadcast
  int nK = 0;
  const uint8_t* allowed = nullptr;
  const T* bias = nullptr;
  const int32_t *lo = nullptr, *hi = nullptr;  // row spans (Nm, Hm, Lq): keys lo <= j < hi
  const T* dense = nullptr;                     // a float mask read in place, (Nm, Hm, R, C)
  const T* slopes = nullptr;                    // ALiBi: slope_h · (j - i - alibi_off) added, (Hq,)
  int64_t alibi_off = 0;
  int64_t d_sn = 0, d_sh = 0, d_sq = 0, d_sk = 0;  // its strides; 0 where it broadcasts
  int64_t span_sn = 0, span_sh = 0;
  int bq = 0, bk = 0;

  int32_t code(int64_t n, int64_t h, int qi, int kj) const {
    if (index == nullptr) return FULL_TILE;
    return index[n * sn + h * sh + static_cast<int64_t>(qi) * nK + kj];
  }

  // With row spans, shrink a PARTIAL tile's key range [k0, k0 + cols) to the keys some row
  // of the block [q0, q0 + rows) may attend, so the GEMMs skip the rest (cols may become <= 0).
  void narrow(int64_t n, int64_t h, int64_t q0, int rows, int64_t& k0, int& cols) const {
    if (lo == nullptr) return;
    const int64_t off = n * span_sn + h * span_sh + q0;
    int64_t a = std::numeric_limits<int64_t>::max(), b = 0;
    for (int r = 0; r < rows; ++r) {
      if (lo[off + r] >= hi[off + r]) continue;  // a row that sees nothing
      a = std::min<int64_t>(a, lo[off + r]);
      b = std::max<int64_t>(b, hi[off + r]);
    }
    const int64_t start = std::max(k0, a), stop = std::min(k0 + cols, b);
    k0 = start;
    cols = static_cast<int>(std::max<int64_t>(stop - start, 0));
  }

  // Mask the scores s (rows x cols, ld) of PARTIAL tile p at (n, h, q0, k0): -inf where
  // masked, bias added. Row spans, a bias read in place and ALiBi slopes may come together
  // (causal plus ALiBi or a learned bias): the spans mask, then the biases add.
  void apply(int32_t p, T* s, int ld, int rows, int cols, int64_t n, int64_t h, int64_t q0, int64_t k0) const {
    const T neg_inf = -std::numeric_limits<T>::infinity();
    if (lo != nullptr) {  // spans: two fills per row, no mask memory
      const int64_t off = n * span_sn + h * span_sh + q0;
      for (int r = 0; r < rows; ++r) {
        T* sr = s + static_cast<int64_t>(r) * ld;
        const int a = static_cast<int>(std::clamp<int64_t>(lo[off + r] - k0, 0, cols));
        const int b = static_cast<int>(std::clamp<int64_t>(hi[off + r] - k0, a, cols));
        std::fill(sr, sr + a, neg_inf);
        std::fill(sr + b, sr + cols, neg_inf);
      }
    }
    if (dense != nullptr) {  // the bias where it lies: no copy (-inf stays -inf)
      for (int r = 0; r < rows; ++r) {
        T* sr = s + static_cast<int64_t>(r) * ld;
        const T* br = dense + n * d_sn + h * d_sh + (q0 + r) * d_sq + k0 * d_sk;
        if (d_sk == 1) {
          for (int c = 0; c < cols; ++c) sr[c] = br[c] == neg_inf ? neg_inf : sr[c] + br[c];
        } else {  // one value per row
          for (int c = 0; c < cols; ++c) sr[c] = br[0] == neg_inf ? neg_inf : sr[c] + br[0];
        }
      }
    }
    if (slopes != nullptr) {  // ALiBi from its slope: one multiply-add per score, no bias memory
      const T slope = slopes[h];
      for (int r = 0; r < rows; ++r) {
        T* sr = s + static_cast<int64_t>(r) * ld;
        const T row = slope * static_cast<T>(k0 - (q0 + r + alibi_off));  // the bias at key k0
        for (int c = 0; c < cols; ++c) sr[c] += row + slope * static_cast<T>(c);  // -inf stays -inf
      }
    }
    if (lo != nullptr || dense != nullptr || slopes != nullptr) return;
    const int64_t base = static_cast<int64_t>(p) * bq * bk;
    for (int r = 0; r < rows; ++r) {
      T* sr = s + static_cast<int64_t>(r) * ld;
      if (bias != nullptr) {
        const T* br = bias + base + static_cast<int64_t>(r) * bk;
        for (int c = 0; c < cols; ++c) sr[c] = br[c] == neg_inf ? neg_inf : sr[c] + br[c];
      } else {
        const uint8_t* ar = allowed + base + static_cast<int64_t>(r) * bk;
        for (int c = 0; c < cols; ++c) sr[c] = ar[c] ? sr[c] : neg_inf;
      }
    }
  }
};

template <typename T>
TileMask<T> tile_mask(const c10::optional<at::Tensor>& index, const c10::optional<at::Tensor>& allowed,
                      const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& lo,
                      const c10::optional<at::Tensor>& hi, const c10::optional<at::Tensor>& slopes,
                      int64_t alibi_off, int bq, int bk) {
  TileMask<T> m;
  m.bq = bq;
  m.bk = bk;
  if (!index.has_value()) return m;
  const at::Tensor& ix = *index;
  TORCH_CHECK(ix.dim() == 4 && ix.scalar_type() == at::kInt && ix.stride(3) == 1 && ix.stride(2) == ix.size(3),
              "tile index must be int32 (Nm, Hm, nQ, nK) with contiguous (nQ, nK)");
  m.index = ix.data_ptr<int32_t>();
  m.sn = ix.size(0) == 1 ? 0 : ix.stride(0);
  m.sh = ix.size(1) == 1 ? 0 : ix.stride(1);
  m.nK = static_cast<int>(ix.size(3));
  if (allowed.has_value()) m.allowed = allowed->data_ptr<uint8_t>();
  if (bias.has_value() && bias->dim() == 4) {  // a whole float mask, (Nm, Hm, Lq or 1, Lk or 1)
    const at::Tensor& d = *bias;
    TORCH_CHECK(d.stride(3) == 1 || d.size(3) == 1, "a dense float mask needs its last dim contiguous");
    m.dense = d.data_ptr<T>();
    m.d_sn = d.size(0) == 1 ? 0 : d.stride(0);
    m.d_sh = d.size(1) == 1 ? 0 : d.stride(1);
    m.d_sq = d.size(2) == 1 ? 0 : d.stride(2);
    m.d_sk = d.size(3) == 1 ? 0 : 1;
  } else if (bias.has_value()) {
    m.bias = bias->data_ptr<T>();
  }
  if (slopes.has_value()) {
    TORCH_CHECK(slopes->dim() == 1 && slopes->is_contiguous() && slopes->scalar_type() == c10::CppTypeToScalarType<T>::value,
                "ALiBi slopes must be contiguous (Hq,) in the compute dtype");
    m.slopes = slopes->data_ptr<T>();
    m.alibi_off = alibi_off;
  }
  if (lo.has_value()) {
    TORCH_CHECK(lo->dim() == 3 && lo->scalar_type() == at::kInt && lo->is_contiguous() && hi->sizes() == lo->sizes() &&
                    hi->is_contiguous(), "row spans must be contiguous int32 (Nm, Hm, Lq)");
    m.lo = lo->data_ptr<int32_t>();
    m.hi = hi->data_ptr<int32_t>();
    m.span_sn = lo->size(0) == 1 ? 0 : lo->stride(0);
    m.span_sh = lo->size(1) == 1 ? 0 : lo->stride(1);
  }
  return m;
}

// Strided view of one (n, h) slice of a (N, H, L, D) tensor whose last dim is contiguous.
template <typename T>
struct Rows {
  T* base;
  int64_t sn, sh, sl;
  Rows(const at::Tensor& t)
      : base(t.data_ptr<T>()), sn(t.size(0) == 1 ? 0 : t.stride(0)), sh(t.stride(1)), sl(t.stride(2)) {
    TORCH_CHECK(t.stride(3) == 1 || t.size(3) <= 1, "the last dim must be contiguous");
  }
  T* at(int64_t n, int64_t h, int64_t l) const { return base + n * sn + h * sh + l * sl; }
  int ld() const { return static_cast<int>(sl); }
};

int cdiv(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// The problem's sizes, in the names of the shape legend, and its tile counts.
struct Sizes {
  int64_t N, Hq, Lq, E, Hkv, Lk, Ev, G;
  int nQ, nK;

  static Sizes of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int bq, int bk) {
    return {q.size(0), q.size(1), q.size(2), q.size(3), k.size(1), k.size(2), v.size(3),
            q.size(1) / k.size(1), cdiv(q.size(2), bq), cdiv(k.size(2), bk)};
  }
};

// Logit soft-capping (Gemma 2): scores s -> c·tanh(s/c) on a rows x cols tile (leading dim
// ld), before the mask is applied; with deriv, also 1 - tanh(s/c)², which backward
// multiplies into dS to reach the uncapped scores. c <= 0: no capping.
template <typename T>
void soft_cap(T* s, int ld, int rows, int cols, T c, T* deriv) {
  for (int r = 0; r < rows; ++r) {
    T* sr = s + static_cast<int64_t>(r) * ld;
    for (int j = 0; j < cols; ++j) {
      const T t = std::tanh(sr[j] / c);
      sr[j] = c * t;
      if (deriv != nullptr) deriv[static_cast<int64_t>(r) * ld + j] = T(1) - t * t;
    }
  }
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

// In is the storage type of q, k, v (float, double, or bfloat16 computed with bfloat16
// GEMMs into float32); T the compute type of scores, softmax, accumulator and out (which
// backward's delta = rowsum(dO·O) reads: rounded to bfloat16, it cost dk the 2x rule).
// stats_p: null, or where the STATS figures of each row go (common.h).
template <typename In, typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                  at::Tensor& lse, const TileMask<T>& mask, double scale_, int bq, int bk,
                  const Dropout& dropout, double softcap, T* stats_p) {
  const auto [N, Hq, Lq, E, Hkv, Lk, Ev, G, nQ, nK] = Sizes::of(q, k, v, bq, bk);
  const T scale = static_cast<T>(scale_), cap = static_cast<T>(softcap);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const Rows<In> Q(q), K(k), V(v);
  const Rows<T> O(out);
  T* lse_p = lse.data_ptr<T>();  // contiguous (N, Hq, Lq)
  const int64_t tasks = N * Hq * nQ;
  constexpr bool narrow_gemm = !std::is_same_v<In, T>;  // P goes to the second GEMM as In

#pragma omp parallel num_threads(at::get_num_threads())
  {
    // Per-thread workspace: one score tile, the accumulator and the running row state.
    std::vector<T> s(static_cast<size_t>(bq) * bk), acc(static_cast<size_t>(bq) * Ev);
    std::vector<In> p_in(narrow_gemm ? static_cast<size_t>(bq) * bk : 0);
    std::vector<T> m_i(bq), l_i(bq), alpha(bq);
    std::vector<ScoreSums<T>> sums_i(stats_p ? bq : 0);  // Σ p·s rescaled like l_i, then Σ s, Σ s², count
    std::vector<T> first_i(stats_p ? bq : 0);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int qi = static_cast<int>(t % nQ);
      const int64_t h = (t / nQ) % Hq, n = t / (nQ * Hq), hk = h / G;
      const int64_t q0 = static_cast<int64_t>(qi) * bq;
      const int rows = static_cast<int>(std::min<int64_t>(bq, Lq - q0));
      std::fill(m_i.begin(), m_i.end(), neg_inf);
      std::fill(l_i.begin(), l_i.end(), T(0));
      std::fill(sums_i.begin(), sums_i.end(), ScoreSums<T>{});
      std::fill(first_i.begin(), first_i.end(), neg_inf);
      bool first = true;
      for (int kj = 0; kj < nK; ++kj) {
        const int32_t code = mask.code(n, h, qi, kj);
        if (code == EMPTY_TILE) continue;  // off-band tile: no work, keys never read
        int64_t k0 = static_cast<int64_t>(kj) * bk;
        int cols = static_cast<int>(std::min<int64_t>(bk, Lk - k0));
        if (code != FULL_TILE) {
          mask.narrow(n, h, q0, rows, k0, cols);
          if (cols <= 0) continue;
        }
        // S = scale Q Kᵀ  (rows x cols)
        gemm(false, true, rows, cols, static_cast<int>(E), scale, Q.at(n, h, q0), Q.ld(), K.at(n, hk, k0),
             K.ld(), T(0), s.data(), bk);
        if (cap > 0) soft_cap<T>(s.data(), bk, rows, cols, cap, nullptr);
        if (code != FULL_TILE) mask.apply(code, s.data(), bk, rows, cols, n, h, q0, k0);  // partial tile: mask
        if (stats_p && k0 == 0) {
          for (int r = 0; r < rows; ++r) first_i[r] = s[static_cast<int64_t>(r) * bk];
        }
        // Online softmax: new row max, rescale factor, P~ = exp(S - m) in place, row sums.
        for (int r = 0; r < rows; ++r) {
          T* sr = s.data() + static_cast<int64_t>(r) * bk;
          const T m_new = std::max(m_i[r], row_max(sr, cols));
          const T m_safe = m_new == neg_inf ? T(0) : m_new;
          alpha[r] = exp_nonpos(m_i[r] - m_safe);
          if (stats_p) {
            ScoreSums<T> add;
            l_i[r] = l_i[r] * alpha[r] + exp_sum_stats(sr, cols, m_safe, add, code == FULL_TILE);
            ScoreSums<T>& to = sums_i[r];
            to = {to.ps * alpha[r] + add.ps, to.sum + add.sum, to.sq + add.sq, to.count + add.count};
          } else {
            l_i[r] = l_i[r] * alpha[r] + exp_sum(sr, cols, m_safe);
          }
          m_i[r] = m_new;
        }
        if (dropout.on) dropout.apply(s.data(), bk, n * Hq + h, q0, rows, k0, cols);
        if (!first) {
          for (int r = 0; r < rows; ++r) {
            if (alpha[r] == T(1)) continue;  // the row max held: nothing to rescale
            T* ar = acc.data() + r * Ev;
            for (int64_t c = 0; c < Ev; ++c) ar[c] *= alpha[r];
          }
        }
        // acc += P~ V  (rows x Ev)
        const In* p_tile = gemm_input(s.data(), p_in.data(), bk, rows, cols);
        gemm(false, false, rows, static_cast<int>(Ev), cols, T(1), p_tile, bk, V.at(n, hk, k0), V.ld(),
             first ? T(0) : T(1), acc.data(), static_cast<int>(Ev));
        first = false;
      }
      // Normalise; a row with no allowed key gives 0 and lse -inf.
      T* lse_row = lse_p + (n * Hq + h) * Lq + q0;
      for (int r = 0; r < rows; ++r) {
        T* orow = O.at(n, h, q0 + r);
        const bool alive = !first && l_i[r] > 0;
        const T inv = alive ? T(1) / l_i[r] : T(0);
        for (int64_t c = 0; c < Ev; ++c) orow[c] = alive ? acc[r * Ev + c] * inv : T(0);
        lse_row[r] = alive ? m_i[r] + std::log(l_i[r]) : neg_inf;
        if (stats_p) {
          write_row_stats(stats_p + ((n * Hq + h) * Lq + q0 + r) * STATS, alive, lse_row[r],
                          alive ? sums_i[r].ps * inv : T(0), sums_i[r], m_i[r], first_i[r]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Backward (FlashAttention-2): recompute P from lse tile by tile.
// ---------------------------------------------------------------------------

// In as in forward_impl; dq, dk, dv accumulate in T.
template <typename In, typename T>
void backward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& d_out,
                   const at::Tensor& lse, const at::Tensor& delta, at::Tensor& dq, at::Tensor& dk,
                   at::Tensor& dv, const TileMask<T>& mask, double scale_, int bq, int bk,
                   const Dropout& dropout, double softcap, int splits, const c10::optional<at::Tensor>& ds_index,
                   const c10::optional<at::Tensor>& ds_tiles) {
  const auto [N, Hq, Lq, E, Hkv, Lk, Ev, G, nQ, nK] = Sizes::of(q, k, v, bq, bk);
  const T scale = static_cast<T>(scale_), cap = static_cast<T>(softcap);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const Rows<In> Q(q), K(k), V(v), dO(d_out);
  const Rows<T> dK(dk), dV(dv);
  constexpr bool narrow_gemm = !std::is_same_v<In, T>;  // P and dS go to the GEMMs as In
  const T* lse_p = lse.data_ptr<T>();      // (N, Hq, Lq) contiguous
  const T* delta_p = delta.data_ptr<T>();  // (N, Hq, Lq) contiguous
  // dq: (splits, N, Hq, Lq, E) contiguous; split s of the key tiles adds into slice s.
  T* dq_p = dq.data_ptr<T>();
  const int64_t dq_split = N * Hq * Lq * E;
  const int64_t tasks = N * Hkv * splits;
  const int per_split = cdiv(nK, splits);
  // Score gradients of the PARTIAL tiles, for a float mask's gradient: ds_index (N, Hq, nQ, nK)
  // gives each (n, h, tile) its own slot of ds_tiles (P', bq, bk), or -1.
  const int32_t* ds_slot = ds_index.has_value() ? ds_index->data_ptr<int32_t>() : nullptr;
  T* ds_out = ds_tiles.has_value() ? ds_tiles->data_ptr<T>() : nullptr;

#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<T> p(static_cast<size_t>(bq) * bk), dp(static_cast<size_t>(bq) * bk);
    std::vector<T> p_drop(dropout.on ? static_cast<size_t>(bq) * bk : 0);
    std::vector<T> d_cap(cap > 0 ? static_cast<size_t>(bq) * bk : 0);  // 1 - tanh², soft-capping's derivative
    std::vector<In> p_in(narrow_gemm ? static_cast<size_t>(bq) * bk : 0), ds_in(p_in.size());
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int split = static_cast<int>(t % splits);
      const int64_t hk = (t / splits) % Hkv, n = t / (splits * Hkv);
      const int kj_end = std::min(nK, (split + 1) * per_split);
      for (int kj = split * per_split; kj < kj_end; ++kj) {
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = hk * G + g;
          for (int qi = 0; qi < nQ; ++qi) {
            const int32_t code = mask.code(n, h, qi, kj);
            if (code == EMPTY_TILE) continue;
            const int64_t q0 = static_cast<int64_t>(qi) * bq;
            const int rows = static_cast<int>(std::min<int64_t>(bq, Lq - q0));
            int64_t k0 = static_cast<int64_t>(kj) * bk;
            int cols = static_cast<int>(std::min<int64_t>(bk, Lk - k0));
            if (code != FULL_TILE) {
              mask.narrow(n, h, q0, rows, k0, cols);
              if (cols <= 0) continue;
            }
            const T* lse_row = lse_p + (n * Hq + h) * Lq + q0;
            const T* delta_row = delta_p + (n * Hq + h) * Lq + q0;
            // P = exp(scale Q Kᵀ + mask - lse)
            gemm(false, true, rows, cols, static_cast<int>(E), scale, Q.at(n, h, q0), Q.ld(), K.at(n, hk, k0),
                 K.ld(), T(0), p.data(), bk);
            if (cap > 0) soft_cap<T>(p.data(), bk, rows, cols, cap, d_cap.data());
            if (code != FULL_TILE) mask.apply(code, p.data(), bk, rows, cols, n, h, q0, k0);
            for (int r = 0; r < rows; ++r) {
              T* pr = p.data() + static_cast<int64_t>(r) * bk;
              const T l = lse_row[r];
              if (l == neg_inf) {  // a row with no allowed key: P = 0, so no gradient
                std::fill(pr, pr + cols, T(0));
                continue;
              }
              exp_sum(pr, cols, l);
            }
            const T* pd = p.data();
            if (dropout.on) {
              for (int r = 0; r < rows; ++r)
                std::copy(p.data() + r * bk, p.data() + r * bk + cols, p_drop.data() + r * bk);
              dropout.apply(p_drop.data(), bk, n * Hq + h, q0, rows, k0, cols);
              pd = p_drop.data();
            }
            // dV_j += P_dropᵀ dO_i
            const In* pd_in = gemm_input(pd, p_in.data(), bk, rows, cols);
            gemm(true, false, cols, static_cast<int>(Ev), rows, T(1), pd_in, bk, dO.at(n, h, q0), dO.ld(), T(1),
                 dV.at(n, hk, k0), dV.ld());
            // dP = dO_i V_jᵀ, then dS = P ∘ (dP ∘ keep/(1-p) - delta)
            gemm(false, true, rows, cols, static_cast<int>(Ev), T(1), dO.at(n, h, q0), dO.ld(), V.at(n, hk, k0),
                 V.ld(), T(0), dp.data(), bk);
            if (dropout.on) dropout.apply(dp.data(), bk, n * Hq + h, q0, rows, k0, cols);
            for (int r = 0; r < rows; ++r) {
              T* dr = dp.data() + static_cast<int64_t>(r) * bk;
              const T* pr = p.data() + static_cast<int64_t>(r) * bk;
              const T d = delta_row[r];
              for (int c = 0; c < cols; ++c) dr[c] = pr[c] * (dr[c] - d);
            }
            if (ds_slot != nullptr) {
              const int32_t slot = ds_slot[((n * Hq + h) * nQ + qi) * nK + kj];
              if (slot >= 0) {  // at the narrowed keys' place in the tile (row spans may start inside it)
                T* dst = ds_out + static_cast<int64_t>(slot) * bq * bk + (k0 - static_cast<int64_t>(kj) * bk);
                for (int r = 0; r < rows; ++r)
                  std::copy(dp.data() + r * bk, dp.data() + r * bk + cols, dst + r * bk);
              }
            }
            if (cap > 0) {  // dS of the capped scores (a float mask's gradient) -> of scale Q Kᵀ
              for (int r = 0; r < rows; ++r)
                for (int c = 0; c < cols; ++c) dp[static_cast<int64_t>(r) * bk + c] *= d_cap[static_cast<int64_t>(r) * bk + c];
            }
            // dQ_i += scale dS K_j ;  dK_j += scale dSᵀ Q_i. Narrow GEMMs take dS as two parts,
            // hi = In(dS) and lo = In(dS - hi): dS is a difference of nearly equal terms, and
            // rounding it once to bfloat16 made dk break the 2x rule where torch's did not.
            T* dq_rows = dq_p + split * dq_split + ((n * Hq + h) * Lq + q0) * E;
            for (int part = 0; part < (narrow_gemm ? 2 : 1); ++part) {
              const In* ds = part == 0 ? gemm_input(dp.data(), ds_in.data(), bk, rows, cols)
                                       : gemm_residual(dp.data(), ds_in.data(), bk, rows, cols);
              gemm(false, false, rows, static_cast<int>(E), cols, scale, ds, bk, K.at(n, hk, k0), K.ld(), T(1),
                   dq_rows, static_cast<int>(E));
              gemm(true, false, cols, static_cast<int>(E), rows, scale, ds, bk, Q.at(n, h, q0), Q.ld(), T(1),
                   dK.at(n, hk, k0), dK.ld());
            }
          }
        }
      }
    }
  }
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || (dt == at::kBFloat16 && GEMM_BF16BF16F32 != nullptr),
              "the tiled kernel takes float32, float64, or bfloat16 where MKL's bf16 GEMM is present");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D (N, H, L, E)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "q, k, v dtypes differ");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "Hq must be a multiple of Hkv");
  TORCH_CHECK(q.device().is_cpu(), "the tiled kernel runs on CPU tensors");
}

}  // namespace

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const c10::optional<at::Tensor>& index, const c10::optional<at::Tensor>& allowed,
                                const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& lo,
                                const c10::optional<at::Tensor>& hi, const c10::optional<at::Tensor>& slopes,
                                int64_t alibi_off, double scale, int64_t bq, int64_t bk,
                                double dropout_p, int64_t seed, double softcap, bool stats) {
  check_inputs(q, k, v);
  const int64_t N = q.size(0), Hq = q.size(1), Lq = q.size(2), Ev = v.size(3);
  at::Tensor out = at::empty({N, Hq, Lq, Ev}, q.options().dtype(compute_type(q)));
  at::Tensor lse = at::empty({N, Hq, Lq}, q.options().dtype(compute_type(q)));
  at::Tensor row_stats = stats ? at::empty({N, Hq, Lq, STATS}, q.options().dtype(compute_type(q))) : at::Tensor();
  const Dropout dropout(dropout_p, seed);
  switch (q.scalar_type()) {
    case at::kFloat:
      forward_impl<float, float>(q, k, v, out, lse, tile_mask<float>(index, allowed, bias, lo, hi, slopes, alibi_off, bq, bk), scale, bq,
                                 bk, dropout, softcap, stats ? row_stats.data_ptr<float>() : nullptr);
      break;
    case at::kDouble:
      forward_impl<double, double>(q, k, v, out, lse, tile_mask<double>(index, allowed, bias, lo, hi, slopes, alibi_off, bq, bk), scale,
                                   bq, bk, dropout, softcap, stats ? row_stats.data_ptr<double>() : nullptr);
      break;
    default:  // bfloat16, checked by check_inputs
      forward_impl<at::BFloat16, float>(q, k, v, out, lse, tile_mask<float>(index, allowed, bias, lo, hi, slopes, alibi_off, bq, bk),
                                        scale, bq, bk, dropout, softcap, stats ? row_stats.data_ptr<float>() : nullptr);
  }
  if (stats) return {out, lse, row_stats};
  return {out, lse};
}

std::vector<at::Tensor> backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& d_out, const at::Tensor& lse, const at::Tensor& delta,
                                 const c10::optional<at::Tensor>& index, const c10::optional<at::Tensor>& allowed,
                                 const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& lo,
                                 const c10::optional<at::Tensor>& hi, const c10::optional<at::Tensor>& slopes,
                                 int64_t alibi_off, double scale, int64_t bq, int64_t bk,
                                 double dropout_p, int64_t seed, double softcap,
                                 const c10::optional<at::Tensor>& ds_index, const c10::optional<at::Tensor>& ds_tiles) {
  check_inputs(q, k, v);
  TORCH_CHECK(lse.is_contiguous() && delta.is_contiguous(), "lse and delta must be contiguous");
  TORCH_CHECK(ds_index.has_value() == ds_tiles.has_value(), "ds_index and ds_tiles go together");
  if (ds_index.has_value()) {
    TORCH_CHECK(ds_index->is_contiguous() && ds_index->scalar_type() == at::kInt && ds_tiles->is_contiguous() &&
                    ds_tiles->scalar_type() == compute_type(q),
                "ds_index must be contiguous int32 (N, Hq, nQ, nK) and ds_tiles contiguous (P', bq, bk) in the compute dtype");
  }
  const int64_t N = q.size(0), Hkv = k.size(1), Lk = k.size(2);
  const int nK = cdiv(Lk, bk);
  // Split the key tiles of each (batch, kv head) when there are too few of those to keep
  // every thread busy; each split then adds its dq into a slice of its own.
  const int64_t threads = at::get_num_threads();
  const int splits = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nK, (2 * threads + N * Hkv - 1) / (N * Hkv))));
  const auto acc = q.options().dtype(compute_type(q));  // gradients accumulate in the compute dtype
  at::Tensor dq = at::zeros({splits, N, q.size(1), q.size(2), q.size(3)}, acc);
  at::Tensor dk = at::zeros(k.sizes(), acc);
  at::Tensor dv = at::zeros(v.sizes(), acc);
  const Dropout dropout(dropout_p, seed);
  switch (q.scalar_type()) {
    case at::kFloat:
      backward_impl<float, float>(q, k, v, d_out, lse, delta, dq, dk, dv,
                                  tile_mask<float>(index, allowed, bias, lo, hi, slopes, alibi_off, bq, bk), scale, bq, bk, dropout, softcap, splits,
                                  ds_index, ds_tiles);
      break;
    case at::kDouble:
      backward_impl<double, double>(q, k, v, d_out, lse, delta, dq, dk, dv,
                                    tile_mask<double>(index, allowed, bias, lo, hi, slopes, alibi_off, bq, bk), scale, bq, bk, dropout,
                                    softcap, splits, ds_index, ds_tiles);
      break;
    default:
      backward_impl<at::BFloat16, float>(q, k, v, d_out, lse, delta, dq, dk, dv,
                                         tile_mask<float>(index, allowed, bias, lo, hi, slopes, alibi_off, bq, bk), scale, bq, bk, dropout,
                                         softcap, splits, ds_index, ds_tiles);
  }
  return {splits == 1 ? dq[0] : dq.sum(0), dk, dv};
}

bool has_blas() { return SGEMM != nullptr && DGEMM != nullptr; }

// Seconds per call of the kernel's two tile GEMMs (S = Q Kᵀ, then P V; bq x bk tiles, head
// dim E), in float32 and in bfloat16 with float32 accumulation, on one thread: which one a
// bfloat16 problem should compute in is decided from these, measured on this machine.
std::vector<double> tile_gemm_seconds(int64_t bq, int64_t bk, int64_t E, int64_t repeats) {
  std::vector<float> q(bq * E, 0.5f), k(bk * E, 0.25f), v(bk * E, 0.125f), s(bq * bk), acc(bq * E);
  std::vector<at::BFloat16> qb(q.begin(), q.end()), kb(k.begin(), k.end()), vb(v.begin(), v.end()), pb(bq * bk);
  const int M = bq, N = bk, D = E;
  const bool bf16 = GEMM_BF16BF16F32 != nullptr;
  // Best of `repeats` for each, the two interleaved call by call so that a burst of load
  // from elsewhere on the machine hits both alike; three rounds warm up.
  std::vector<double> best(bf16 ? 2 : 1, std::numeric_limits<double>::infinity());
  auto time = [&](double& best_s, auto&& step, bool counted) {
    const double start = omp_get_wtime();
    step();
    if (counted) best_s = std::min(best_s, omp_get_wtime() - start);
  };
#pragma omp parallel num_threads(1)
  for (int64_t r = -3; r < repeats; ++r) {
    time(best[0], [&] {
      gemm(false, true, M, N, D, 1.0f, q.data(), D, k.data(), D, 0.0f, s.data(), N);
      gemm(false, false, M, D, N, 1.0f, s.data(), N, v.data(), D, 0.0f, acc.data(), D);
    }, r >= 0);
    if (bf16)
      time(best[1], [&] {
        gemm(false, true, M, N, D, 1.0f, qb.data(), D, kb.data(), D, 0.0f, s.data(), N);
        gemm(false, false, M, D, N, 1.0f, pb.data(), N, vb.data(), D, 0.0f, acc.data(), D);
      }, r >= 0);
  }
  return best;
}

}  // namespace dotattn
