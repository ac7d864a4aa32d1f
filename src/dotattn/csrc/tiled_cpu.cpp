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
//
// Every GEMM goes to the BLAS that torch links (MKL's SGEMM/DGEMM), one thread each,
// inside our own OpenMP loop over (batch x heads, query blocks) in the forward and
// (batch x kv heads, key-tile ranges) in the backward. The softmax is fused into the
// tile loop and runs on the tile while it is in cache. Storage types: float32, float64,
// and bfloat16 with MKL's bf16 GEMMs (scores, softmax and accumulators in float32; P
// rounded to bfloat16 for the GEMMs, dS split into two bfloat16 parts). Python picks bf16 GEMMs or converts bfloat16 to
// float32 by timing tile_gemm_seconds() on the machine.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
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

namespace {

constexpr int32_t EMPTY_TILE = -2;
constexpr int32_t FULL_TILE = -1;

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

// Row kernels written with GCC vector extensions, so they vectorise the same way on
// AVX2 and AVX-512 builds: exp, row max, and exp with the row sum.
#if defined(__AVX512F__)
constexpr int kW = 16;
#else
constexpr int kW = 8;
#endif
typedef float vfloat __attribute__((vector_size(kW * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kW * sizeof(float))));

// Keeps a loaded vector in a register. Where one load feeds several FMAs, GCC otherwise
// folds it into each of them as a memory operand, and the loop loads it again for every
// use (perf: the values pass loaded 12 times per 8 FMAs). Without AVX a vector spans two
// registers, which the constraint cannot name; those builds keep the folded loads.
inline void in_register(vfloat& v) {
#if defined(__AVX__)
  asm("" : "+x"(v));
#else
  (void)v;
#endif
}

inline vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }

// exp(x) for x <= 0 (softmax arguments are s - max), -inf -> 0: x = n ln2 + r with n
// rounded to nearest by the 1.5·2^23 trick (which leaves n in t's low mantissa bits, so
// 2^n is an integer add and shift), r by one fused multiply-add (setup.py compiles with
// -ffp-contract=fast), then a degree-5 polynomial fitted for relative error on
// |r| <= ln2/2: at most 6 ulp over [-87, 0], 4 ulp over [-10, 0] (torch's exp_u20: 20).
inline vfloat vexp_nonpos(vfloat x) {
  const float lo = -87.33654f;  // ln(FLT_MIN): below it the result is 0
  const vint tiny = x < lo;
  const vfloat xc = tiny ? vfloat{} + lo : x;
  const vfloat t = xc * 1.44269504088896341f + 12582912.0f;
  const vfloat n = t - 12582912.0f;
  const vfloat r = xc - n * 0.693147180559945f;
  vfloat y = r * 8.34644e-3f + 4.192711e-2f;
  y = y * r + 1.6666783e-1f;
  y = y * r + 4.9998863e-1f;
  y = y * (r * r) + r + 1.0f;
  // A cast between vector types of one size reinterprets the bits (GCC's vector extension),
  // without the aliasing of a reference cast.
  const vint bits = ((vint)t + 127) << 23;
  return tiny ? vfloat{} : y * (vfloat)bits;
}

inline float hsum(vfloat v) {
  float s = 0;
  for (int i = 0; i < kW; ++i) s += v[i];
  return s;
}

// Runs f on x[0:n] a vector at a time; the ragged end goes through a buffer padded with `pad`.
template <typename F>
inline void for_vectors(float* x, int n, float pad, F f) {
  int c = 0;
  for (; c + kW <= n; c += kW) vstore(x + c, f(vload(x + c)));
  if (c < n) {
    float buf[kW];
    std::fill(buf, buf + kW, pad);
    std::copy(x + c, x + n, buf);
    vstore(buf, f(vload(buf)));
    std::copy(buf, buf + (n - c), x + c);
  }
}

inline float row_max(float* x, int n) {
  vfloat m = vfloat{} - std::numeric_limits<float>::infinity();
  for_vectors(x, n, -std::numeric_limits<float>::infinity(), [&](vfloat v) {
    m = v > m ? v : m;
    return v;
  });
  float out = m[0];
  for (int i = 1; i < kW; ++i) out = m[i] > out ? m[i] : out;
  return out;
}

// x = exp(x - sub) in place; returns the sum. Padding is -inf, so it adds 0.
inline float exp_sum(float* x, int n, float sub) {
  vfloat acc = {};
  for_vectors(x, n, -std::numeric_limits<float>::infinity(), [&](vfloat v) {
    const vfloat e = vexp_nonpos(v - sub);
    acc += e;
    return e;
  });
  return hsum(acc);
}

inline float exp_nonpos(float x) {
  float buf = x;
  exp_sum(&buf, 1, 0.0f);
  return buf;
}

// float64 is for testing: plain loops.
inline double row_max(double* x, int n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int c = 0; c < n; ++c) m = x[c] > m ? x[c] : m;
  return m;
}

inline double exp_sum(double* x, int n, double sub) {
  double sum = 0;
  for (int c = 0; c < n; ++c) sum += (x[c] = std::exp(x[c] - sub));
  return sum;
}

inline double exp_nonpos(double x) { return std::exp(x); }

// The dropout pattern shared with Python (dotattn/_dropout.py): lowbias32 on uint32.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

struct Dropout {
  bool on = false;
  uint32_t seed = 0;
  uint64_t threshold = 0;  // keep when hash >= threshold
  double inv_keep = 1.0;   // 1 / (1 - p)

  Dropout(double p, int64_t seed_) : on(p > 0), seed(static_cast<uint32_t>(seed_)) {
    threshold = static_cast<uint64_t>(std::llround(p * 4294967296.0));
    inv_keep = on ? 1.0 / (1.0 - p) : 1.0;
  }

  // Multiply a tile (rows x cols, ld) by keep(bh, i, j) / (1 - p).
  template <typename T>
  void apply(T* x, int ld, int64_t bh, int64_t i0, int rows, int64_t j0, int cols) const {
    const uint32_t head_key = mix32(static_cast<uint32_t>(bh) ^ seed);
    const T scale = static_cast<T>(inv_keep);
    for (int r = 0; r < rows; ++r) {
      const uint32_t row_key = mix32(head_key ^ mix32(static_cast<uint32_t>(i0 + r)));
      T* xr = x + static_cast<int64_t>(r) * ld;
      for (int c = 0; c < cols; ++c) {
        const uint32_t u = mix32(row_key ^ static_cast<uint32_t>(j0 + c));
        xr[c] = u >= threshold ? xr[c] * scale : T(0);
      }
    }
  }
};

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
  // masked, bias added.
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
      return;
    }
    if (dense != nullptr) {  // the bias where it lies: no copy
      for (int r = 0; r < rows; ++r) {
        T* sr = s + static_cast<int64_t>(r) * ld;
        const T* br = dense + n * d_sn + h * d_sh + (q0 + r) * d_sq + k0 * d_sk;
        if (d_sk == 1) {
          for (int c = 0; c < cols; ++c) sr[c] = br[c] == neg_inf ? neg_inf : sr[c] + br[c];
        } else {  // one value per row
          for (int c = 0; c < cols; ++c) sr[c] = br[0] == neg_inf ? neg_inf : sr[c] + br[0];
        }
      }
      return;
    }
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
                      const c10::optional<at::Tensor>& hi, int bq, int bk) {
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

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

// In is the storage type of q, k, v (float, double, or bfloat16 computed with bfloat16
// GEMMs into float32); T the compute type of scores, softmax, accumulator and out (which
// backward's delta = rowsum(dO·O) reads: rounded to bfloat16, it cost dk the 2x rule).
template <typename In, typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                  at::Tensor& lse, const TileMask<T>& mask, double scale_, int bq, int bk,
                  const Dropout& dropout) {
  const auto [N, Hq, Lq, E, Hkv, Lk, Ev, G, nQ, nK] = Sizes::of(q, k, v, bq, bk);
  const T scale = static_cast<T>(scale_);
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
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int qi = static_cast<int>(t % nQ);
      const int64_t h = (t / nQ) % Hq, n = t / (nQ * Hq), hk = h / G;
      const int64_t q0 = static_cast<int64_t>(qi) * bq;
      const int rows = static_cast<int>(std::min<int64_t>(bq, Lq - q0));
      std::fill(m_i.begin(), m_i.end(), neg_inf);
      std::fill(l_i.begin(), l_i.end(), T(0));
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
        if (code != FULL_TILE) mask.apply(code, s.data(), bk, rows, cols, n, h, q0, k0);  // partial tile: mask
        // Online softmax: new row max, rescale factor, P~ = exp(S - m) in place, row sums.
        for (int r = 0; r < rows; ++r) {
          T* sr = s.data() + static_cast<int64_t>(r) * bk;
          const T m_new = std::max(m_i[r], row_max(sr, cols));
          const T m_safe = m_new == neg_inf ? T(0) : m_new;
          const T sum = exp_sum(sr, cols, m_safe);
          alpha[r] = exp_nonpos(m_i[r] - m_safe);
          l_i[r] = l_i[r] * alpha[r] + sum;
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
                   const Dropout& dropout, int splits, const c10::optional<at::Tensor>& ds_index,
                   const c10::optional<at::Tensor>& ds_tiles) {
  const auto [N, Hq, Lq, E, Hkv, Lk, Ev, G, nQ, nK] = Sizes::of(q, k, v, bq, bk);
  const T scale = static_cast<T>(scale_);
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
              if (slot >= 0) {
                T* dst = ds_out + static_cast<int64_t>(slot) * bq * bk;
                for (int r = 0; r < rows; ++r)
                  std::copy(dp.data() + r * bk, dp.data() + r * bk + cols, dst + r * bk);
              }
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

// float32 for bfloat16 storage, else the storage type itself.
at::ScalarType compute_type(const at::Tensor& q) {
  return q.scalar_type() == at::kBFloat16 ? at::kFloat : q.scalar_type();
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

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const c10::optional<at::Tensor>& index, const c10::optional<at::Tensor>& allowed,
                                const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& lo,
                                const c10::optional<at::Tensor>& hi, double scale, int64_t bq, int64_t bk,
                                double dropout_p, int64_t seed) {
  check_inputs(q, k, v);
  const int64_t N = q.size(0), Hq = q.size(1), Lq = q.size(2), Ev = v.size(3);
  at::Tensor out = at::empty({N, Hq, Lq, Ev}, q.options().dtype(compute_type(q)));
  at::Tensor lse = at::empty({N, Hq, Lq}, q.options().dtype(compute_type(q)));
  const Dropout dropout(dropout_p, seed);
  switch (q.scalar_type()) {
    case at::kFloat:
      forward_impl<float, float>(q, k, v, out, lse, tile_mask<float>(index, allowed, bias, lo, hi, bq, bk), scale, bq,
                                 bk, dropout);
      break;
    case at::kDouble:
      forward_impl<double, double>(q, k, v, out, lse, tile_mask<double>(index, allowed, bias, lo, hi, bq, bk), scale,
                                   bq, bk, dropout);
      break;
    default:  // bfloat16, checked by check_inputs
      forward_impl<at::BFloat16, float>(q, k, v, out, lse, tile_mask<float>(index, allowed, bias, lo, hi, bq, bk),
                                        scale, bq, bk, dropout);
  }
  return {out, lse};
}

std::vector<at::Tensor> backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& d_out, const at::Tensor& lse, const at::Tensor& delta,
                                 const c10::optional<at::Tensor>& index, const c10::optional<at::Tensor>& allowed,
                                 const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& lo,
                                const c10::optional<at::Tensor>& hi, double scale, int64_t bq, int64_t bk,
                                 double dropout_p, int64_t seed, const c10::optional<at::Tensor>& ds_index,
                                 const c10::optional<at::Tensor>& ds_tiles) {
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
                                  tile_mask<float>(index, allowed, bias, lo, hi, bq, bk), scale, bq, bk, dropout, splits,
                                  ds_index, ds_tiles);
      break;
    case at::kDouble:
      backward_impl<double, double>(q, k, v, d_out, lse, delta, dq, dk, dv,
                                    tile_mask<double>(index, allowed, bias, lo, hi, bq, bk), scale, bq, bk, dropout,
                                    splits, ds_index, ds_tiles);
      break;
    default:
      backward_impl<at::BFloat16, float>(q, k, v, d_out, lse, delta, dq, dk, dv,
                                         tile_mask<float>(index, allowed, bias, lo, hi, bq, bk), scale, bq, bk, dropout,
                                         splits, ds_index, ds_tiles);
  }
  return {splits == 1 ? dq[0] : dq.sum(0), dk, dv};
}

// ---------------------------------------------------------------------------
// Split-K decoding forward ("flash-decoding"): few query rows against a long KV cache.
// ---------------------------------------------------------------------------
//
//   q: (N, Hkv, R, E) compute type, contiguous; R = G·Lq, the query heads that share a kv
//      head stacked into rows, so each key and value is read once per kv head
//   k: (N, Hkv, Lk, E)  v: (N, Hkv, Lk, Ev) storage type (float, double, bfloat16), any
//      strides with the last dim contiguous (a KV cache's views are read in place)
//   lo, hi: int32 (N, Hkv, R) contiguous, row r may attend keys lo <= j < hi
//   out: (S, N, Hkv, R, Ev), lse: (S, N, Hkv, R) compute type: the softmax of each part of
//      the keys on its own, which Python merges by lse.
//
// Task (n, hk, s) takes the s-th of S equal parts of [min lo, max hi), the keys some row of
// (n, hk) may attend: keys that no row sees (left padding) are never read and no part sits
// idle on them. It calls no BLAS: with a handful of rows a GEMM call is mostly overhead.
// Instead register-blocked loops (4 rows x 1 key for the scores, 4 rows x 2 vectors for
// the values) read each key and value tile from memory once, for every row.

// Keys per tile: the tile's scores stay in L1, its keys and values in L2, while the rows use
// them (128 measured 5-10% faster than 64 for bfloat16, the same for float32).
constexpr int kDecodeTile = 128;
// Keys per step of the scores pass, whose value rows are prefetched as the keys are read.
constexpr int kDecodeChunk = 2;
// Problems below this many bytes of keys and values and this many multiply-adds run on one
// thread (see split_k_impl).
constexpr int64_t kDecodeMinParallelBytes = 1 << 20;
constexpr int64_t kDecodeMinParallelMacs = 1 << 21;

// Asks for rows x n elements of x (leading dim ld) to be brought into the cache.
//
// Why: the scores pass streams the keys and the values pass then reads the same keys'
// values. Left to the hardware prefetcher the value rows arrive late and the values pass
// waits on memory (half the samples of a profile sat on its first load); asking for each
// key's value row as the key is read makes the two streams advance together, one row after
// another, which is how this machine's cores reach their read bandwidth while computing:
// one core reads float32 K+V at 14.9 GB/s, 8.6 before (benchmarks/decode.py --one-core).
// Prefetching whole tiles instead, 64 to 512 keys ahead, into any cache level, gained nothing.
template <typename In>
inline void prefetch_rows(const In* x, int64_t ld, int rows, int n) {
  for (int r = 0; r < rows; ++r)
    for (int64_t b = 0; b < static_cast<int64_t>(n) * static_cast<int64_t>(sizeof(In)); b += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(x + r * ld) + b, 0, 3);
}

// x[0:kW] as float: a plain load, or bfloat16 widened (its bits are a float's upper half).
inline vfloat vload_f(const float* x) { return vload(x); }

inline vfloat vload_f(const at::BFloat16* x) {
  typedef uint16_t vu16 __attribute__((vector_size(kW * sizeof(uint16_t))));
  typedef uint32_t vu32 __attribute__((vector_size(kW * sizeof(uint32_t))));
  vu16 h;
  std::memcpy(&h, x, sizeof(h));
  const vu32 w = __builtin_convertvector(h, vu32) << 16;
  vfloat f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}

// rows x n of src (leading dim ld) into dst (leading dim n) as float; bfloat16 widens exactly.
template <typename In>
inline void widen(const In* src, int64_t ld, int rows, int n, float* dst) {
  for (int r = 0; r < rows; ++r) {
    const In* sr = src + r * ld;
    float* dr = dst + static_cast<int64_t>(r) * n;
    int e = 0;
    for (; e + kW <= n; e += kW) vstore(dr + e, vload_f(sr + e));
    for (; e < n; ++e) dr[e] = static_cast<float>(sr[e]);
  }
}

// Lane i of the result is the sum of a[i]'s lanes (i < 8): the horizontal sums of eight
// accumulators at once.
inline vfloat sums8(const vfloat* a) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // 128-bit halves' sums
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
#else
  vfloat out = {};
  for (int i = 0; i < 8; ++i) out[i] = hsum(a[i]);
  return out;
#endif
}

// s[r * lds + c] = scale · q_r · key_c for r < rows, c < cols; q contiguous (rows, E), keys
// float rows of leading dim ldk. Rows in blocks of 4 take one key at a time, so the keys are
// read in order, as the hardware prefetcher follows them from memory (blocks of 2 rows x 4
// keys, which read four key rows at once, left a third of the time waiting on those loads);
// the rows left over go in blocks of 2 rows x 4 keys, which share every load. With 8 rows or
// more (MQA, several queries per head) each key feeds enough rows that compute, not memory,
// sets the pace: blocks of 4 rows x 2 keys then load less per multiply-add (6 loads per 8,
// against 10) and sum across lanes half as often. With tile_values' registers, float32 MQA
// on one core went from 49-51 to 61-63 GFLOP/s.
inline void tile_scores(const float* q, int E, int rows, const float* keys, int64_t ldk, int cols, float scale,
                        float* s, int lds) {
  const bool blocked = E % kW == 0;
  int r = 0;
  for (; rows >= 8 && blocked && cols % 2 == 0 && r + 4 <= rows; r += 4) {
    const float* q0 = q + static_cast<int64_t>(r) * E;
    const float* qr[4] = {q0, q0 + E, q0 + 2 * E, q0 + 3 * E};  // as in tile_values
    for (int c = 0; c < cols; c += 2) {
      const float* k0 = keys + c * ldk;
      const float* k1 = k0 + ldk;
      vfloat a[8] = {};
      for (int64_t e = 0; e < E; e += kW) {
        vfloat y0 = vload(k0 + e), y1 = vload(k1 + e);
        in_register(y0), in_register(y1);
        for (int i = 0; i < 4; ++i) {
          vfloat x = vload(qr[i] + e);
          in_register(x);
          a[2 * i] += x * y0;
          a[2 * i + 1] += x * y1;
        }
      }
      const vfloat d = sums8(a) * scale;
      for (int i = 0; i < 4; ++i) {
        s[(r + i) * lds + c] = d[2 * i];
        s[(r + i) * lds + c + 1] = d[2 * i + 1];
      }
    }
  }
  for (; E % (2 * kW) == 0 && r + 4 <= rows; r += 4) {
    const float* q0 = q + static_cast<int64_t>(r) * E;
    for (int c = 0; c < cols; ++c) {
      const float* kc = keys + c * ldk;
      vfloat a[8] = {};
      for (int e = 0; e < E; e += 2 * kW) {
        const vfloat y0 = vload(kc + e), y1 = vload(kc + e + kW);
        for (int i = 0; i < 4; ++i) {
          a[2 * i] += vload(q0 + i * E + e) * y0;
          a[2 * i + 1] += vload(q0 + i * E + e + kW) * y1;
        }
      }
      const vfloat d = sums8(a);
      for (int i = 0; i < 4; ++i) s[(r + i) * lds + c] = scale * (d[2 * i] + d[2 * i + 1]);
    }
  }
  for (; blocked && r + 2 <= rows; r += 2) {
    const float* q0 = q + static_cast<int64_t>(r) * E;
    const float* q1 = q0 + E;
    int c = 0;
    for (; c + 4 <= cols; c += 4) {
      const float* k0 = keys + c * ldk;
      vfloat a[8] = {};
      for (int e = 0; e < E; e += kW) {
        const vfloat x0 = vload(q0 + e), x1 = vload(q1 + e);
        const vfloat y0 = vload(k0 + e), y1 = vload(k0 + ldk + e), y2 = vload(k0 + 2 * ldk + e),
                     y3 = vload(k0 + 3 * ldk + e);
        a[0] += x0 * y0, a[1] += x0 * y1, a[2] += x0 * y2, a[3] += x0 * y3;
        a[4] += x1 * y0, a[5] += x1 * y1, a[6] += x1 * y2, a[7] += x1 * y3;
      }
      const vfloat d = sums8(a) * scale;
      for (int i = 0; i < 4; ++i) {
        s[r * lds + c + i] = d[i];
        s[(r + 1) * lds + c + i] = d[4 + i];
      }
    }
    for (; c < cols; ++c) {
      vfloat a0 = {}, a1 = {};
      for (int e = 0; e < E; e += kW) {
        const vfloat y = vload(keys + c * ldk + e);
        a0 += vload(q0 + e) * y;
        a1 += vload(q1 + e) * y;
      }
      s[r * lds + c] = scale * hsum(a0);
      s[(r + 1) * lds + c] = scale * hsum(a1);
    }
  }
  for (; r < rows; ++r) {  // a last odd row, or a head dim the vectors do not divide
    const float* qr = q + static_cast<int64_t>(r) * E;
    for (int c = 0; c < cols; ++c) {
      const float* kc = keys + c * ldk;
      vfloat a = {};
      int e = 0;
      for (; e + kW <= E; e += kW) a += vload(qr + e) * vload(kc + e);
      float d = hsum(a);
      for (; e < E; ++e) d += qr[e] * kc[e];
      s[r * lds + c] = scale * d;
    }
  }
}

// acc_r[0:Ev] += sum over c < cols of p_r[c] · value_c for `rows` rows (acc leading dim Ev,
// p leading dim lds, values float rows of leading dim ldv). Blocks of 4 rows x 2 vectors
// share every load; pass rows = 4 only for rows whose keys are the same.
inline void tile_values(float* acc, int Ev, int rows, const float* p, int lds, const float* values, int64_t ldv,
                        int cols) {
  int e = 0;
  if (rows == 4) {
    for (; e + 2 * kW <= Ev; e += 2 * kW) {
      vfloat a[8];
      for (int r = 0; r < 4; ++r) a[2 * r] = vload(acc + r * Ev + e), a[2 * r + 1] = vload(acc + r * Ev + e + kW);
      // Row pointers and a 64-bit key index, so the loop is loads and FMAs, with no index
      // arithmetic for the compiler to redo per key (perf showed a third of its instructions were).
      const float* pr[4] = {p, p + lds, p + 2 * lds, p + 3 * lds};
      const float* vc = values + e;
      for (int64_t c = 0; c < cols; ++c, vc += ldv) {
        vfloat y0 = vload(vc), y1 = vload(vc + kW);
        in_register(y0), in_register(y1);
        for (int r = 0; r < 4; ++r) {
          const float pc = pr[r][c];
          a[2 * r] += pc * y0;
          a[2 * r + 1] += pc * y1;
        }
      }
      for (int r = 0; r < 4; ++r) vstore(acc + r * Ev + e, a[2 * r]), vstore(acc + r * Ev + e + kW, a[2 * r + 1]);
    }
  }
  for (int r = 0; r < rows; ++r) {
    float* ar = acc + r * Ev;
    const float* pr = p + r * lds;
    int f = e;
    for (; f + kW <= Ev; f += kW) {
      vfloat a = vload(ar + f);
      for (int c = 0; c < cols; ++c) a += pr[c] * vload(values + c * ldv + f);
      vstore(ar + f, a);
    }
    for (; f < Ev; ++f) {
      float a = ar[f];
      for (int c = 0; c < cols; ++c) a += pr[c] * values[c * ldv + f];
      ar[f] = a;
    }
  }
}

#if defined(__AVX2__) && !defined(__AVX512F__)
// bfloat16 keys and values read without widening them into a buffer first: 16 of them load
// as one 256-bit vector, and an interleave with zeros makes two float vectors of it, holding
// elements 0..3, 8..11 and 4..7, 12..15 (bf16_lane). A dot product does not care about the
// order when q is stored in it too, and the value accumulators are put back in order at the
// end, so each bfloat16 costs half an instruction to widen.
constexpr bool kBf16Interleaved = true;

inline int bf16_lane(int p) { return (p & 3) | ((p & 4) << 1) | ((p & 8) >> 1); }

inline void vload_bf16x16(const at::BFloat16* x, vfloat& lo, vfloat& hi) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  const __m256i z = _mm256_setzero_si256();
  lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, h));
  hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, h));
}

// tile_scores for bfloat16 keys with q (rows, E) stored in bf16_lane order, E % 16 == 0.
// Blocks of 4 rows x 2 keys: each key is widened once for four rows.
inline void tile_scores_bf16(const float* q, int E, int rows, const at::BFloat16* keys, int64_t ldk, int cols,
                             float scale, float* s, int lds) {
  auto dot = [&](const float* qr, const at::BFloat16* kc) {
    vfloat a = {};
    for (int e = 0; e < E; e += 16) {
      vfloat lo, hi;
      vload_bf16x16(kc + e, lo, hi);
      a += vload(qr + e) * lo;
      a += vload(qr + e + 8) * hi;
    }
    return hsum(a);
  };
  int r = 0;
  for (; r + 4 <= rows; r += 4) {
    const float* q0 = q + static_cast<int64_t>(r) * E;
    int c = 0;
    for (; c + 2 <= cols; c += 2) {
      const at::BFloat16* k0 = keys + c * ldk;
      vfloat a[8] = {};
      for (int e = 0; e < E; e += 16) {
        vfloat x0, x1, y0, y1;
        vload_bf16x16(k0 + e, x0, x1);
        vload_bf16x16(k0 + ldk + e, y0, y1);
        for (int i = 0; i < 4; ++i) {
          const vfloat qa = vload(q0 + i * E + e), qb = vload(q0 + i * E + e + 8);
          a[2 * i] += qa * x0;
          a[2 * i] += qb * x1;
          a[2 * i + 1] += qa * y0;
          a[2 * i + 1] += qb * y1;
        }
      }
      const vfloat d = sums8(a) * scale;
      for (int i = 0; i < 4; ++i) {
        s[(r + i) * lds + c] = d[2 * i];
        s[(r + i) * lds + c + 1] = d[2 * i + 1];
      }
    }
    for (; c < cols; ++c)
      for (int i = 0; i < 4; ++i) s[(r + i) * lds + c] = scale * dot(q0 + i * E, keys + c * ldk);
  }
  for (; r < rows; ++r)
    for (int c = 0; c < cols; ++c) s[r * lds + c] = scale * dot(q + static_cast<int64_t>(r) * E, keys + c * ldk);
}

// tile_values for bfloat16 values, acc in bf16_lane order, Ev % 16 == 0; rows is 4 (rows
// with the same keys, each value widened once for four) or 1.
inline void tile_values_bf16(float* acc, int Ev, int rows, const float* p, int lds, const at::BFloat16* values,
                             int64_t ldv, int cols) {
  for (int e = 0; e < Ev; e += 16) {
    if (rows == 4) {
      vfloat a[8];
      for (int i = 0; i < 4; ++i) a[2 * i] = vload(acc + i * Ev + e), a[2 * i + 1] = vload(acc + i * Ev + e + 8);
      const float* pr[4] = {p, p + lds, p + 2 * lds, p + 3 * lds};  // as in tile_values
      const at::BFloat16* vc = values + e;
      for (int64_t c = 0; c < cols; ++c, vc += ldv) {
        vfloat lo, hi;
        vload_bf16x16(vc, lo, hi);
        for (int i = 0; i < 4; ++i) {
          const float pc = pr[i][c];
          a[2 * i] += pc * lo;
          a[2 * i + 1] += pc * hi;
        }
      }
      for (int i = 0; i < 4; ++i) vstore(acc + i * Ev + e, a[2 * i]), vstore(acc + i * Ev + e + 8, a[2 * i + 1]);
    } else {
      vfloat a0 = vload(acc + e), a1 = vload(acc + e + 8);
      for (int c = 0; c < cols; ++c) {
        vfloat lo, hi;
        vload_bf16x16(values + c * ldv + e, lo, hi);
        a0 += p[c] * lo;
        a1 += p[c] * hi;
      }
      vstore(acc + e, a0), vstore(acc + e + 8, a1);
    }
  }
}
#else
constexpr bool kBf16Interleaved = false;
inline int bf16_lane(int p) { return p; }
inline void tile_scores_bf16(const float*, int, int, const at::BFloat16*, int64_t, int, float, float*, int) {}
inline void tile_values_bf16(float*, int, int, const float*, int, const at::BFloat16*, int64_t, int) {}
#endif

// float64 is for testing: plain loops.
inline void tile_scores(const double* q, int E, int rows, const double* keys, int64_t ldk, int cols, double scale,
                        double* s, int lds) {
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) {
      double d = 0;
      for (int e = 0; e < E; ++e) d += q[static_cast<int64_t>(r) * E + e] * keys[c * ldk + e];
      s[r * lds + c] = scale * d;
    }
}

inline void tile_values(double* acc, int Ev, int rows, const double* p, int lds, const double* values, int64_t ldv,
                        int cols) {
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c)
      for (int e = 0; e < Ev; ++e) acc[r * Ev + e] += p[r * lds + c] * values[c * ldv + e];
}

// The sum of x[0:n]: finite exactly when every entry is (or an overflow, which is rare and
// only costs a rerun).
inline float finite_sum(const float* x, int n) {
  vfloat acc = {};
  for (int c = 0; c + kW <= n; c += kW) acc += vload(x + c);
  float sum = hsum(acc);
  for (int c = n - n % kW; c < n; ++c) sum += x[c];
  return sum;
}

inline double finite_sum(const double* x, int n) {
  double sum = 0;
  for (int c = 0; c < n; ++c) sum += x[c];
  return sum;
}

// Element offsets into a tensor whose dims, right-aligned, broadcast against (*batch, A, B)
// (and a last dim C that the caller steps through itself): dims that are missing or of
// size 1 step by 0, and the flattened batch index n is unravelled over *batch. It lets
// split_k_attention read a KV cache's views, an expanded query or (B, 1, 1) row spans in
// place, with no ATen call to bring them to one layout.
struct Broadcast {
  std::vector<int64_t> batch, strides;  // the batch sizes and the tensor's steps along them
  int64_t sa = 0, sb = 0;

  Broadcast(const at::Tensor& t, const std::vector<int64_t>& batch_, bool has_last_dim) : batch(batch_) {
    const int64_t D = static_cast<int64_t>(batch.size()) + 2, dims = t.dim() - (has_last_dim ? 1 : 0);
    auto step = [&](int64_t target) -> int64_t {  // target dim in (*batch, A, B)
      const int64_t d = target - (D - dims);
      return d < 0 || t.size(d) == 1 ? 0 : t.stride(d);
    };
    for (int64_t i = 0; i < D - 2; ++i) strides.push_back(step(i));
    sa = step(D - 2), sb = step(D - 1);
  }
  int64_t at(int64_t n, int64_t a, int64_t b) const {
    int64_t offset = a * sa + b * sb;
    for (int64_t d = static_cast<int64_t>(batch.size()) - 1; d >= 0; --d) {
      offset += n % batch[d] * strides[d];
      n /= batch[d];
    }
    return offset;
  }
};

// Merges the S parts' softmaxes by their lse, row by row: out (S, rows, Ev), lse (S, rows) ->
// (rows, Ev), (rows). A part whose row saw no key has lse -inf and adds nothing; a row that no
// part saw gives 0 and -inf. The rule of engines/_merge.py (which ring attention merges its
// ranks' blocks with, in torch ops), here so that a decoding step stays one call. A part's
// NaN or inf (garbage it saw) reaches the row's merged output.
template <typename T>
void merge_parts(const T* o, const T* l, int64_t S, int64_t rows, int64_t Ev, T* mo, T* ml) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  std::vector<T> w(S);
  for (int64_t r = 0; r < rows; ++r) {
    T m = neg_inf;
    for (int64_t s = 0; s < S; ++s) m = std::max(m, l[s * rows + r]);
    const T m_safe = m == neg_inf ? T(0) : m;
    T total = 0;
    for (int64_t s = 0; s < S; ++s) total += w[s] = std::exp(l[s * rows + r] - m_safe);
    const T inv = total > 0 ? T(1) / total : T(0);
    T* dst = mo + r * Ev;
    std::fill(dst, dst + Ev, T(0));
    for (int64_t s = 0; s < S; ++s) {  // a part with weight 0 still passes its NaN or inf on
      const T ws = w[s] * inv;
      const T* src = o + (s * rows + r) * Ev;
      for (int64_t e = 0; e < Ev; ++e) dst[e] += ws * src[e];
    }
    ml[r] = total > 0 ? m_safe + std::log(total) : neg_inf;
  }
}

// Whether some entry of x[0:n] is NaN or inf: x · 0 is NaN just for those. In vectors, four
// apart: a scalar sum, which the compiler may not reorder, took 3 cycles an element (perf:
// 40 us of a B 8 decoding step, half of a small 8-query one).
inline bool any_garbage(const float* x, int64_t n) {
  vfloat check[4] = {};
  int64_t i = 0;
  for (; i + 4 * kW <= n; i += 4 * kW)
    for (int j = 0; j < 4; ++j) check[j] += vload(x + i + j * kW) * 0.0f;
  float rest = 0;
  for (; i < n; ++i) rest += x[i] * 0.0f;
  return std::isnan(hsum(check[0] + check[1] + check[2] + check[3]) + rest);
}

inline bool any_garbage(const double* x, int64_t n) {  // float64 is for testing
  double check = 0;
  for (int64_t i = 0; i < n; ++i) check += x[i] * 0.0;
  return std::isnan(check);
}

template <typename In, typename T>
bool split_k_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& lo,
                  const c10::optional<at::Tensor>& hi, const std::vector<int64_t>& batch, at::Tensor& out,
                  at::Tensor& lse, double scale_, int64_t S) {
  const int64_t N = out.size(0), Hq = q.size(-3), Lq = q.size(-2), Hkv = k.size(-3), Lk = k.size(-2);
  const int64_t G = Hq / Hkv, R = G * Lq;
  const int E = static_cast<int>(q.size(-1)), Ev = static_cast<int>(v.size(-1));
  const T scale = static_cast<T>(scale_);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const Broadcast Qb(q, batch, true), Kb(k, batch, true), Vb(v, batch, true);
  const int64_t q_step = q.stride(-1);
  const In* q_p = q.data_ptr<In>();
  const In* k_p = k.data_ptr<In>();
  const In* v_p = v.data_ptr<In>();
  const int ldk = static_cast<int>(Kb.sb), ldv_in = static_cast<int>(Vb.sb);
  c10::optional<Broadcast> Lo, Hi;
  const int64_t* lo_p = nullptr;
  const int64_t* hi_p = nullptr;
  if (lo.has_value()) {
    Lo.emplace(*lo, batch, false), Hi.emplace(*hi, batch, false);
    lo_p = lo->data_ptr<int64_t>(), hi_p = hi->data_ptr<int64_t>();
  }
  // One part writes the output in place; more parts write theirs aside for merge_parts.
  at::Tensor part_out = S == 1 ? out : at::empty({S, N * Hkv * R, Ev}, out.options());
  at::Tensor part_lse = S == 1 ? lse : at::empty({S, N * Hkv * R}, lse.options());
  T* out_p = part_out.data_ptr<T>();
  T* lse_p = part_lse.data_ptr<T>();
  const int64_t tasks = N * Hkv * S;
  // bfloat16 is read in place, interleaved (see vload_bf16x16), where the head dims allow;
  // otherwise each tile is widened to float once.
  const bool interleaved = std::is_same_v<In, at::BFloat16> && kBf16Interleaved && E % 16 == 0 && Ev % 16 == 0;
  const bool widened = !std::is_same_v<In, T> && !interleaved;
  // Waking the other threads costs tens of microseconds, more than a step against a short
  // cache takes on one: below kDecodeMinParallelBytes of keys and values, one thread runs it,
  // unless the rows make it kDecodeMinParallelMacs of work (many rows per kv head).
  const int64_t elements = N * Hkv * Lk * (E + Ev);
  const bool small = elements * static_cast<int64_t>(sizeof(In)) < kDecodeMinParallelBytes &&
                     elements * R < kDecodeMinParallelMacs;
  const int threads = small ? 1 : static_cast<int>(std::min<int64_t>(at::get_num_threads(), tasks));

#pragma omp parallel num_threads(threads)
  {
    // Per-thread workspace: the task's query rows, one tile's scores (and widened keys and
    // values), the accumulators and the running row state.
    std::vector<T> qh(static_cast<size_t>(R) * E);
    std::vector<T> s(static_cast<size_t>(R) * kDecodeTile), acc(static_cast<size_t>(R) * Ev);
    std::vector<T> k_tile(widened ? static_cast<size_t>(kDecodeTile) * E : 0);
    std::vector<T> v_tile(widened ? static_cast<size_t>(kDecodeTile) * Ev : 0);
    std::vector<T> m_i(R), l_i(R);
    std::vector<int64_t> row_lo(R), row_hi(R);
    std::vector<int> a_r(R), b_r(R);
    std::vector<uint8_t> seen_garbage(R);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t part = t % S, nh = t / S, n = nh / Hkv, hk = nh % Hkv;
      const In* keys = k_p + Kb.at(n, hk, 0);
      const In* vals = v_p + Vb.at(n, hk, 0);
      std::fill(seen_garbage.begin(), seen_garbage.end(), 0);
      // Row r = g·Lq + i is query i of query head hk·G + g: its span and its query, in the
      // compute dtype (for interleaved bfloat16 in the order the interleaved keys come in).
      for (int64_t r = 0; r < R; ++r) {
        const int64_t h = hk * G + r / Lq, i = r % Lq;
        row_lo[r] = lo_p ? lo_p[Lo->at(n, h, i)] : 0;
        row_hi[r] = hi_p ? hi_p[Hi->at(n, h, i)] : Lk;
        const In* src = q_p + Qb.at(n, h, i);
        for (int e = 0; e < E; ++e)
          qh[r * E + e] = static_cast<T>(src[(interleaved ? e - e % 16 + bf16_lane(e % 16) : e) * q_step]);
      }
      // The keys some row sees, then this task's part of them.
      int64_t first = Lk, last = 0;
      for (int64_t r = 0; r < R; ++r) {
        if (row_lo[r] >= row_hi[r]) continue;
        first = std::min(first, row_lo[r]);
        last = std::max(last, row_hi[r]);
      }
      const int64_t per_part = last > first ? (last - first + S - 1) / S : 0;
      const int64_t j_begin = first + part * per_part;
      const int64_t j_end = std::min(last, j_begin + per_part);
      std::fill(m_i.begin(), m_i.end(), neg_inf);
      std::fill(l_i.begin(), l_i.end(), T(0));
      std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t j0 = j_begin; j0 < j_end; j0 += kDecodeTile) {
        const int cols = static_cast<int>(std::min<int64_t>(kDecodeTile, j_end - j0));
        const T* values = nullptr;
        int64_t ldv = Ev;
        // S = scale Q Kᵀ for every row against the tile's keys (rows x cols), a few keys at a
        // time, prefetching those keys' value rows as their keys are read ...
        for (int c0 = 0; c0 < cols; c0 += kDecodeChunk) {
          const int cn = std::min(kDecodeChunk, cols - c0);
          const In* kc = keys + (j0 + c0) * ldk;
          prefetch_rows(vals + (j0 + c0) * ldv_in, ldv_in, cn, Ev);
          T* sc = s.data() + c0;
          if constexpr (std::is_same_v<In, at::BFloat16>) {
            if (interleaved) {
              tile_scores_bf16(qh.data(), E, static_cast<int>(R), kc, ldk, cn, scale, sc, kDecodeTile);
            } else {
              widen(kc, ldk, cn, E, k_tile.data());
              tile_scores(qh.data(), E, static_cast<int>(R), k_tile.data(), E, cn, scale, sc, kDecodeTile);
            }
          } else {
            tile_scores(qh.data(), E, static_cast<int>(R), kc, ldk, cn, scale, sc, kDecodeTile);
          }
        }
        // ... then each row keeps only its span: a key outside it, garbage or not, gets
        // weight 0 here (its score is never read), so only a value it holds can reach the row.
        bool any = false;
        for (int64_t r = 0; r < R; ++r) {
          T* sr = s.data() + r * kDecodeTile;
          const int a = static_cast<int>(std::clamp<int64_t>(row_lo[r] - j0, 0, cols));
          const int b = static_cast<int>(std::clamp<int64_t>(row_hi[r] - j0, a, cols));
          a_r[r] = a, b_r[r] = b;
          std::fill(sr, sr + a, T(0));
          std::fill(sr + b, sr + cols, T(0));
          if (a == b) continue;  // the row sees nothing here: its state stays as it is
          any = true;
          // A NaN or inf among the scores a row sees came from garbage in q or a key it may
          // attend: the row's result becomes NaN, and Python reruns the problem on the tiled
          // engine, which marks exactly the rows that saw garbage.
          if (!std::isfinite(finite_sum(sr + a, b - a))) seen_garbage[r] = 1;
          // Online softmax: new row max, rescale factor, P~ = exp(S - m) in place, row sum.
          const T m_new = std::max(m_i[r], row_max(sr + a, b - a));
          const T m_safe = m_new == neg_inf ? T(0) : m_new;
          const T sum = exp_sum(sr + a, b - a, m_safe);
          const T alpha = exp_nonpos(m_i[r] - m_safe);
          l_i[r] = l_i[r] * alpha + sum;
          m_i[r] = m_new;
          if (alpha != T(1)) {
            T* ar = acc.data() + r * Ev;
            for (int e = 0; e < Ev; ++e) ar[e] *= alpha;
          }
        }
        if (!any) continue;
        if constexpr (std::is_same_v<In, T>) {
          values = vals + j0 * ldv_in, ldv = ldv_in;
        } else if (widened) {
          widen(vals + j0 * ldv_in, ldv_in, cols, Ev, v_tile.data());
          values = v_tile.data();
        }
        // acc += P~ V, rows four at a time over the keys any of the four sees (a row's weight
        // is 0 outside its own span): a decoding step's query heads see the same keys, and
        // the queries of a causal block nearly so. A value outside a row's span reaches it
        // only as 0 · value, which is NaN just when the value is garbage: then the output
        // holds NaN, and Python reruns the problem on the tiled engine, which marks exactly
        // the rows that saw garbage. Causal, window and padding spans leave no key between
        // two rows' spans, so there it takes garbage that some row does see.
        for (int64_t r = 0; r < R;) {
          const int rows = r + 4 <= R ? 4 : 1;
          int a = a_r[r], b = b_r[r];
          for (int i = 1; i < rows; ++i) a = std::min(a, a_r[r + i]), b = std::max(b, b_r[r + i]);
          if (b > a) {
            if constexpr (std::is_same_v<In, at::BFloat16>) {
              if (interleaved) {
                tile_values_bf16(acc.data() + r * Ev, Ev, rows, s.data() + r * kDecodeTile + a, kDecodeTile,
                                 vals + (j0 + a) * ldv_in, ldv_in, b - a);
                r += rows;
                continue;
              }
            }
            tile_values(acc.data() + r * Ev, Ev, rows, s.data() + r * kDecodeTile + a, kDecodeTile, values + a * ldv,
                        ldv, b - a);
          }
          r += rows;
        }
      }
      // Normalise; a part where a row sees no key gives 0 and lse -inf.
      T* out_rows = out_p + (part * N * Hkv + nh) * R * Ev;
      T* lse_rows = lse_p + part * N * Hkv * R + nh * R;
      for (int64_t r = 0; r < R; ++r) {
        const bool alive = l_i[r] > 0;
        const T inv = seen_garbage[r] ? std::numeric_limits<T>::quiet_NaN() : alive ? T(1) / l_i[r] : T(0);
        for (int e = 0; e < Ev; ++e)  // interleaved accumulators go back in order
          out_rows[r * Ev + (interleaved ? e - e % 16 + bf16_lane(e % 16) : e)] = acc[r * Ev + e] * inv;
        lse_rows[r] = seen_garbage[r] ? inv : alive ? m_i[r] + std::log(l_i[r]) : neg_inf;
      }
    }
  }
  if (S > 1)
    merge_parts(part_out.data_ptr<T>(), part_lse.data_ptr<T>(), S, N * Hkv * R, Ev, out.data_ptr<T>(),
                lse.data_ptr<T>());
  // Garbage a row saw among its scores made its output NaN above; garbage among the values
  // it read reached only its output. So the output alone tells.
  return any_garbage(out.data_ptr<T>(), out.numel());
}

// The split-K engine's forward ("flash-decoding"), all of it in one call, so that a step
// against a short cache pays no Python and no ATen reshaping per stage.
//   q (*B, Hq, Lq, E) in any strides; k (*B, Hkv, Lk, E), v (*B, Hkv, Lk, Ev) with a
//   contiguous last dim, read in place (a KV cache's views); leading dims broadcast.
//   lo, hi: int64 row spans broadcastable to (*B, Hq, Lq) (Mask.row_spans), or None for
//   every key. parts: how many parts each (batch, kv head)'s keys are cut into.
// Returns out (N, Hq, Lq, Ev) and lse (N, Hq, Lq) in the compute dtype, N the flattened *B,
// and whether some row saw NaN or inf: its result is NaN, and the caller reruns the problem
// on an engine that marks exactly those rows.
std::tuple<at::Tensor, at::Tensor, bool> split_k_attention(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, const c10::optional<at::Tensor>& lo,
                                                           const c10::optional<at::Tensor>& hi, double scale,
                                                           int64_t parts) {
  const auto st = k.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16,
              "split_k_attention takes float32, float64 or bfloat16 inputs");
  TORCH_CHECK(q.scalar_type() == st && v.scalar_type() == st, "q, k, v dtypes differ");
  TORCH_CHECK(q.dim() >= 3 && k.dim() >= 3 && v.dim() >= 3, "q, k, v must be (*B, H, L, E)");
  TORCH_CHECK(k.stride(-1) == 1 && v.stride(-1) == 1, "k and v need a contiguous last dim");
  TORCH_CHECK(q.size(-1) == k.size(-1) && k.size(-2) == v.size(-2) && k.size(-3) == v.size(-3) &&
                  q.size(-3) % k.size(-3) == 0, "q, k, v sizes do not fit (*B, Hq, Lq, E), (*B, Hkv, Lk, E), "
                  "(*B, Hkv, Lk, Ev) with Hq a multiple of Hkv");
  TORCH_CHECK(lo.has_value() == hi.has_value(), "give both row spans lo and hi, or neither");
  TORCH_CHECK(!lo.has_value() || (lo->scalar_type() == at::kLong && hi->scalar_type() == at::kLong),
              "row spans must be int64");
  TORCH_CHECK(parts >= 1, "parts must be >= 1");
  auto lead = [](const at::Tensor& t) { return t.sizes().slice(0, t.dim() - 3); };
  const std::vector<int64_t> batch = at::infer_size(at::infer_size(lead(q), lead(k)), lead(v));
  const int64_t N = c10::multiply_integers(batch);
  const auto options = q.options().dtype(compute_type(q));
  at::Tensor out = at::empty({N, q.size(-3), q.size(-2), v.size(-1)}, options);
  at::Tensor lse = at::empty({N, q.size(-3), q.size(-2)}, options);
  bool garbage;
  switch (st) {
    case at::kFloat:
      garbage = split_k_impl<float, float>(q, k, v, lo, hi, batch, out, lse, scale, parts);
      break;
    case at::kDouble:
      garbage = split_k_impl<double, double>(q, k, v, lo, hi, batch, out, lse, scale, parts);
      break;
    default:
      garbage = split_k_impl<at::BFloat16, float>(q, k, v, lo, hi, batch, out, lse, scale, parts);
  }
  return {out, lse, garbage};
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dotattn's tiled CPU attention kernel (see dotattn/engines/tiled.py)";
  m.def("forward", &forward, "out, lse = forward(q, k, v, index, allowed, bias, lo, hi, scale, bq, bk, dropout_p, seed)");
  m.def("backward", &backward,
        "dq, dk, dv = backward(q, k, v, d_out, lse, delta, index, allowed, bias, lo, hi, scale, bq, bk, dropout_p, "
        "seed, ds_index, ds_tiles); ds_tiles receives the score gradient of the partial tiles");
  m.def("split_k_attention", &split_k_attention,
        "out, lse, garbage = split_k_attention(q, k, v, lo, hi, scale, parts): the split-K forward, merged");
  m.def("has_blas", &has_blas, "whether torch exports the BLAS (MKL) GEMM the kernel calls");
  m.def("tile_gemm_seconds", &tile_gemm_seconds,
        "[float32 s, bfloat16 s] per call of a tile's two GEMMs (bfloat16 absent without MKL's bf16 GEMM)");
  m.attr("EMPTY_TILE") = EMPTY_TILE;
  m.attr("FULL_TILE") = FULL_TILE;
}
