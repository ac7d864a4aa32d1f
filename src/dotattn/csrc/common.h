// What the compiled kernel's two halves share, the tiled forward and backward (tiled.cpp)
// and split-K decoding (split_k.cpp): the vector row kernels, the register pin, the dropout
// hash and the compute dtype. All of it is inline, so both inline it into their hot loops.
#pragma once

#include <ATen/ATen.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace dotattn {

// Row kernels written with GCC vector extensions, so they vectorise the same way on
// AVX2 and AVX-512 builds: exp, row max, and exp with the row sum.
#if defined(__AVX512F__)
inline constexpr int kW = 16;
#else
inline constexpr int kW = 8;
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

// The sum and the max of v's lanes, as a tree of halves (log2 kW dependent steps rather than
// kW): on a row of a few dozen keys the reductions of the max, the exp sum and the finite
// check are a large part of the row's work. The order of the sum differs from a lane-by-lane
// loop's; the max treats NaN as the vector compares do, and a row that saw one is garbage.
#if defined(__AVX512F__)
inline float hsum(vfloat v) { return _mm512_reduce_add_ps(v); }
inline float hmax(vfloat v) { return _mm512_reduce_max_ps(v); }
#elif defined(__AVX2__)
inline float hsum(vfloat v) {
  const __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 b = _mm_add_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_add_ss(b, _mm_movehdup_ps(b)));
}
inline float hmax(vfloat v) {
  const __m128 a = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 b = _mm_max_ps(a, _mm_movehl_ps(a, a));
  return _mm_cvtss_f32(_mm_max_ss(b, _mm_movehdup_ps(b)));
}
#else
inline float hsum(vfloat v) {
  float s = 0;
  for (int i = 0; i < kW; ++i) s += v[i];
  return s;
}
inline float hmax(vfloat v) {
  float m = v[0];
  for (int i = 1; i < kW; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
#endif

// x[0:n] for n < kW as a vector whose other lanes hold `pad`, and the first n lanes of v
// stored to x. AVX-512 and AVX2 use masked loads and stores, which touch only those lanes;
// a copy through a buffer (what the baseline build does) called memcpy twice and spilled
// the vector registers around it, which on a 21-key row was the costliest part of the row.
#if defined(__AVX512F__)
inline vfloat vload_part(const float* x, int n, float pad) {
  return _mm512_mask_loadu_ps(_mm512_set1_ps(pad), static_cast<__mmask16>((1u << n) - 1), x);
}
inline void vstore_part(float* x, vfloat v, int n) {
  _mm512_mask_storeu_ps(x, static_cast<__mmask16>((1u << n) - 1), v);
}
#elif defined(__AVX2__)
inline __m256i lanes_below(int n) {  // lane i all ones where i < n
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline vfloat vload_part(const float* x, int n, float pad) {
  const __m256i m = lanes_below(n);
  return _mm256_blendv_ps(_mm256_set1_ps(pad), _mm256_maskload_ps(x, m), _mm256_castsi256_ps(m));
}
inline void vstore_part(float* x, vfloat v, int n) { _mm256_maskstore_ps(x, lanes_below(n), v); }
#else
inline vfloat vload_part(const float* x, int n, float pad) {
  float buf[kW];
  std::fill(buf, buf + kW, pad);
  std::copy(x, x + n, buf);
  return vload(buf);
}
inline void vstore_part(float* x, vfloat v, int n) {
  for (int i = 0; i < n; ++i) x[i] = v[i];
}
#endif

// Runs f on x[0:n] a vector at a time; the ragged end is padded with `pad`.
template <typename F>
inline void for_vectors(float* x, int n, float pad, F f) {
  int c = 0;
  for (; c + kW <= n; c += kW) vstore(x + c, f(vload(x + c)));
  if (c < n) vstore_part(x + c, f(vload_part(x + c, n - c, pad)), n - c);
}

inline float row_max(float* x, int n) {
  vfloat m = vfloat{} - std::numeric_limits<float>::infinity();
  for_vectors(x, n, -std::numeric_limits<float>::infinity(), [&](vfloat v) {
    m = v > m ? v : m;
    return v;
  });
  return hmax(m);
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

// What a monitored row adds up over its allowed keys (finite scores), for the statistics
// a Monitor reports: Σ e·s with e = exp(s - sub) (rescaled like the row sum), Σ s, Σ s², count.
template <typename T>
struct ScoreSums {
  T ps = 0, sum = 0, sq = 0, count = 0;
};

// exp_sum that also adds the row's ScoreSums; masked scores (-inf) add nothing to any of them.
// full: no score is masked (a FULL tile), so none needs testing.
inline float exp_sum_stats(float* x, int n, float sub, ScoreSums<float>& out, bool full) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  vfloat acc = {}, ps = {}, sum = {}, sq = {}, count = {};
  if (full && n % kW == 0) {
    for (int c = 0; c < n; c += kW) {
      const vfloat s = vload(x + c);
      const vfloat e = vexp_nonpos(s - sub);
      acc += e;
      ps += e * s;
      sum += s;
      sq += s * s;
      vstore(x + c, e);
    }
    out = {hsum(ps), hsum(sum), hsum(sq), static_cast<float>(n)};
    return hsum(acc);
  }
  for_vectors(x, n, neg_inf, [&](vfloat v) {
    const vint seen = v > neg_inf;
    const vfloat s = seen ? v : vfloat{};  // 0 where masked, so that 0·s stays 0
    const vfloat e = vexp_nonpos(v - sub);
    acc += e;
    ps += e * s;
    sum += s;
    sq += s * s;
    count += seen ? vfloat{} + 1.0f : vfloat{};
    return e;
  });
  out = {hsum(ps), hsum(sum), hsum(sq), hsum(count)};
  return hsum(acc);
}

inline float exp_nonpos(float x) { return vexp_nonpos(vfloat{} + x)[0]; }

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

inline double exp_sum_stats(double* x, int n, double sub, ScoreSums<double>& out, bool /*full*/) {
  double total = 0;
  out = {};
  for (int c = 0; c < n; ++c) {
    const double v = x[c];
    total += (x[c] = std::exp(v - sub));
    if (v > -std::numeric_limits<double>::infinity()) out = {out.ps + x[c] * v, out.sum + v, out.sq + v * v, out.count + 1};
  }
  return total;
}

inline double exp_nonpos(double x) { return std::exp(x); }

// The per-row statistics a monitored forward writes (tiled.cpp and split_k.cpp alike),
// (N, Hq, Lq, STATS) in the compute type, in the order of AttentionStats.sums
// (dotattn/diagnostics.py): a Monitor sums columns 0-9 over the rows and maximises 10, so
// that a call's statistics are two reductions. s is the logit the softmax sees (scaled,
// soft-capped, plus a float mask), p its probability:
//   0 1 (the row sees a key)   1 1 (it sees none)   2 0 (non-finite rows: Python's to count)
//   3 allowed keys   4 Σ s   5 Σ s²   6 entropy = lse - Σ p·s
//   7 entropy / log(allowed keys), 0 for one key   8 max p = exp(max s - lse)   9 p of key 0
//   10 max s
// A row with no allowed key gets 0 but in column 1, and -inf in 10.
constexpr int STATS = 11;

// Writes one row's STATS figures from its lse, mean_ps = Σ p·s (p normalised), its ScoreSums
// (whose ps is not read), its max logit m and the logit of key 0 (-inf where it is masked).
template <typename T>
inline void write_row_stats(T* st, bool alive, T lse, T mean_ps, const ScoreSums<T>& sums, T m, T first) {
  const T entropy = alive ? lse - mean_ps : T(0);
  st[0] = alive ? T(1) : T(0);
  st[1] = alive ? T(0) : T(1);
  st[2] = 0;
  st[3] = sums.count;
  st[4] = sums.sum;
  st[5] = sums.sq;
  st[6] = entropy;
  st[7] = alive && sums.count > 1 ? entropy / std::log(sums.count) : T(0);
  st[8] = alive ? std::exp(m - lse) : T(0);
  st[9] = alive ? std::exp(first - lse) : T(0);
  st[10] = alive ? m : -std::numeric_limits<T>::infinity();
}

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

// float32 for bfloat16 storage, else the storage type itself.
inline at::ScalarType compute_type(const at::Tensor& q) {
  return q.scalar_type() == at::kBFloat16 ? at::kFloat : q.scalar_type();
}

}  // namespace dotattn
