// The split-K engine's compiled CPU kernel: the decoding forward ("flash-decoding"), few
// query rows against a long KV cache.
//
//   q: (*B, Hq, Lq, E)  k: (*B, Hkv, Lk, E)  v: (*B, Hkv, Lk, Ev), one storage type (float,
//      double, bfloat16), leading dims broadcast, any strides with k and v's last dim
//      contiguous (a KV cache's views are read in place). The G = Hq/Hkv query heads of a kv
//      head are stacked into R = G·Lq rows, so each key and value is read once per kv head.
//   lo, hi: int64 row spans that broadcast to (*B, Hq, Lq) (or none: every key), row r may
//      attend keys lo <= j < hi
//   softcap: scores -> softcap·tanh(score/softcap) before the softmax (0: none)
//   stats: also return each row's monitor figures, (N, Hq, Lq, STATS) (common.h): each part
//      adds up its rows' ScoreSums as it goes, and the merge combines them by lse
//   returns out (N, Hq, Lq, Ev) and lse (N, Hq, Lq) in the compute type: each part of the
//      keys' softmax, merged by lse here (merge_parts), and whether some output is not finite
//      (garbage a row saw: the caller reruns the problem on an engine that marks it exactly).
//
// Task (n, hk, s) takes the s-th of S equal parts of [min lo, max hi), the keys some row of
// (n, hk) may attend: keys that no row sees (left padding) are never read and no part sits
// idle on them. It calls no BLAS: with a handful of rows a GEMM call is mostly overhead.
// Instead register-blocked loops (4 rows x 1 key for the scores, 4 rows x 2 vectors for
// the values) read each key and value tile from memory once, for every row.

#include "common.h"
#include "kernels.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace dotattn {
namespace {

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
// accumulators at once. AVX-512 first adds each vector's 256-bit halves, which leaves the
// AVX2 problem; the other lanes of its result are 0.
#if defined(__AVX2__)
inline __m256 sums8_256(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // 128-bit halves' sums
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

inline vfloat sums8(const vfloat* a) {
#if defined(__AVX512F__)
  __m256 h[8];
  for (int i = 0; i < 8; ++i) h[i] = _mm256_add_ps(_mm512_castps512_ps256(a[i]), _mm512_extractf32x8_ps(a[i], 1));
  return _mm512_zextps256_ps512(sums8_256(h));
#elif defined(__AVX2__)
  return sums8_256(a);
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
  int c = 0;
  for (; c + kW <= n; c += kW) acc += vload(x + c);
  if (c < n) acc += vload_part(x + c, n - c, 0.0f);
  return hsum(acc);
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

// What a part leaves per row for the statistics: Σ p·s over its keys (p normalised within
// the part), its max logit, Σ s, Σ s², allowed keys, and the logit of key 0 (-inf where the
// part does not hold it or the row does not see it).
constexpr int kPartStats = 6;

// The STATS figures of each row from its parts' (S, rows, kPartStats) and lse (S, rows), and
// its merged lse (rows): Σ p·s is the parts' weighted by exp(part lse - lse).
template <typename T>
void merge_part_stats(const T* ps, const T* l, const T* lse, int64_t S, int64_t rows, T* stats) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    ScoreSums<T> sums;
    T mean_ps = 0, m = neg_inf, first = neg_inf;
    for (int64_t s = 0; s < S; ++s) {
      const T* p = ps + (s * rows + r) * kPartStats;
      if (l[s * rows + r] > neg_inf) mean_ps += std::exp(l[s * rows + r] - lse[r]) * p[0];
      m = std::max(m, p[1]);
      sums = {0, sums.sum + p[2], sums.sq + p[3], sums.count + p[4]};
      first = std::max(first, p[5]);
    }
    write_row_stats(stats + r * STATS, lse[r] > neg_inf, lse[r], mean_ps, sums, m, first);
  }
}

// The leading (batch) dims of q, k, v (*B, H, L, E), broadcast.
std::vector<int64_t> batch_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  auto lead = [](const at::Tensor& t) { return t.sizes().slice(0, t.dim() - 3); };
  return at::infer_size(at::infer_size(lead(q), lead(k)), lead(v));
}

template <typename In, typename T>
bool split_k_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& lo,
                  const c10::optional<at::Tensor>& hi, const std::vector<int64_t>& batch, at::Tensor& out,
                  at::Tensor& lse, double scale_, int64_t S, double softcap, T* stats_p) {
  const int64_t N = out.size(0), Hq = q.size(-3), Lq = q.size(-2), Hkv = k.size(-3), Lk = k.size(-2);
  const int64_t G = Hq / Hkv, R = G * Lq;
  const int E = static_cast<int>(q.size(-1)), Ev = static_cast<int>(v.size(-1));
  const T scale = static_cast<T>(scale_), cap = static_cast<T>(softcap);
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
  at::Tensor part_stats = stats_p ? at::empty({S, N * Hkv * R, kPartStats}, out.options()) : at::Tensor();
  T* part_stats_p = stats_p ? part_stats.data_ptr<T>() : nullptr;
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
  // A span outside [0, Lk] (padding lengths longer than the keys, which no check read before
  // a compiled call) is reported after the parallel region: no exception may leave it.
  std::atomic<bool> bad_span{false};

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
    std::vector<ScoreSums<T>> sums_i(stats_p ? R : 0);  // Σ p·s rescaled like l_i, then Σ s, Σ s², count
    std::vector<T> first_i(stats_p ? R : 0);
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
        if (row_lo[r] < 0 || row_hi[r] > Lk) {
          bad_span = true;
          row_lo[r] = row_hi[r] = 0;
        }
        const In* src = q_p + Qb.at(n, h, i);
        T* dst = qh.data() + r * E;
        if (interleaved) {
          for (int e = 0; e < E; ++e) dst[e] = static_cast<T>(src[(e - e % 16 + bf16_lane(e % 16)) * q_step]);
        } else if (q_step == 1) {
          for (int e = 0; e < E; ++e) dst[e] = static_cast<T>(src[e]);
        } else {
          for (int e = 0; e < E; ++e) dst[e] = static_cast<T>(src[e * q_step]);
        }
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
      std::fill(sums_i.begin(), sums_i.end(), ScoreSums<T>{});
      std::fill(first_i.begin(), first_i.end(), neg_inf);
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
          if (cap > 0) {  // logit soft-capping, c·tanh(s/c), on the scores the row sees (NaN stays NaN)
            for (int j = a; j < b; ++j) sr[j] = cap * std::tanh(sr[j] / cap);
          }
          // A NaN or inf among the scores a row sees came from garbage in q or a key it may
          // attend: the row's result becomes NaN, and Python reruns the problem on the tiled
          // engine, which marks exactly the rows that saw garbage.
          if (!std::isfinite(finite_sum(sr + a, b - a))) seen_garbage[r] = 1;
          if (stats_p && j0 + a == 0) first_i[r] = sr[0];
          // Online softmax: new row max, rescale factor, P~ = exp(S - m) in place, row sum.
          const T m_new = std::max(m_i[r], row_max(sr + a, b - a));
          const T m_safe = m_new == neg_inf ? T(0) : m_new;
          const T alpha = exp_nonpos(m_i[r] - m_safe);
          T sum;
          if (stats_p) {  // every score in [a, b) is one the row sees
            ScoreSums<T> add;
            sum = exp_sum_stats(sr + a, b - a, m_safe, add, true);
            ScoreSums<T>& to = sums_i[r];
            to = {to.ps * alpha + add.ps, to.sum + add.sum, to.sq + add.sq, to.count + add.count};
          } else {
            sum = exp_sum(sr + a, b - a, m_safe);
          }
          l_i[r] = l_i[r] * alpha + sum;
          const bool first_keys = m_i[r] == neg_inf;  // the row's accumulator is still 0
          m_i[r] = m_new;
          if (alpha != T(1) && !first_keys) {
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
        T* dst = out_rows + r * Ev;
        const T* src = acc.data() + r * Ev;
        if (interleaved) {  // interleaved accumulators go back in order
          for (int e = 0; e < Ev; ++e) dst[e - e % 16 + bf16_lane(e % 16)] = src[e] * inv;
        } else {
          for (int e = 0; e < Ev; ++e) dst[e] = src[e] * inv;
        }
        lse_rows[r] = seen_garbage[r] ? inv : alive ? m_i[r] + std::log(l_i[r]) : neg_inf;
        if (stats_p) {
          T* st = part_stats_p + ((part * N * Hkv + nh) * R + r) * kPartStats;
          const ScoreSums<T>& sums = sums_i[r];
          st[0] = alive ? sums.ps / l_i[r] : T(0);
          st[1] = m_i[r], st[2] = sums.sum, st[3] = sums.sq, st[4] = sums.count, st[5] = first_i[r];
        }
      }
    }
  }
  TORCH_CHECK_VALUE(!bad_span, "split_k_attention: a row span lies outside the ", Lk,
                    " keys (0 <= lo, hi <= Lk); are the padding lengths longer than the key length?");
  if (S > 1)
    merge_parts(part_out.data_ptr<T>(), part_lse.data_ptr<T>(), S, N * Hkv * R, Ev, out.data_ptr<T>(),
                lse.data_ptr<T>());
  // Rows (n, hk, g·Lq + i) are rows (n, hk·G + g, i) of (N, Hq, Lq): the same order.
  if (stats_p)
    merge_part_stats(part_stats_p, part_lse.data_ptr<T>(), lse.data_ptr<T>(), S, N * Hkv * R, stats_p);
  // Garbage a row saw among its scores made its output NaN above; garbage among the values
  // it read reached only its output. So the output alone tells.
  return any_garbage(out.data_ptr<T>(), out.numel());
}

}  // namespace

// The split-K engine's forward ("flash-decoding"), all of it in one call, so that a step
// against a short cache pays no Python and no ATen reshaping per stage.
//   q (*B, Hq, Lq, E) in any strides; k (*B, Hkv, Lk, E), v (*B, Hkv, Lk, Ev) read in place
//   where their last dim is contiguous (a KV cache's views), else copied; leading dims broadcast.
//   lo, hi: int64 row spans broadcastable to (*B, Hq, Lq) (Mask.row_spans), or None for
//   every key. parts: how many parts each (batch, kv head)'s keys are cut into.
// Returns out (N, Hq, Lq, Ev) and lse (N, Hq, Lq) in the compute dtype, N the flattened *B,
// whether some row saw NaN or inf (its result is NaN, and the caller reruns the problem on an
// engine that marks exactly those rows), and with stats each row's monitor figures
// (N, Hq, Lq, STATS), else an undefined tensor (None).
std::tuple<at::Tensor, at::Tensor, bool, at::Tensor> split_k_attention(
    const at::Tensor& q, const at::Tensor& k_, const at::Tensor& v_, const c10::optional<at::Tensor>& lo,
    const c10::optional<at::Tensor>& hi, double scale, int64_t parts, double softcap, bool stats) {
  const auto st = k_.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16,
              "split_k_attention takes float32, float64 or bfloat16 inputs");
  TORCH_CHECK(q.scalar_type() == st && v_.scalar_type() == st, "q, k, v dtypes differ");
  TORCH_CHECK(q.dim() >= 3 && k_.dim() >= 3 && v_.dim() >= 3, "q, k, v must be (*B, H, L, E)");
  const at::Tensor k = k_.stride(-1) == 1 ? k_ : k_.contiguous(), v = v_.stride(-1) == 1 ? v_ : v_.contiguous();
  TORCH_CHECK(q.size(-1) == k.size(-1) && k.size(-2) == v.size(-2) && k.size(-3) == v.size(-3) &&
                  q.size(-3) % k.size(-3) == 0, "q, k, v sizes do not fit (*B, Hq, Lq, E), (*B, Hkv, Lk, E), "
                  "(*B, Hkv, Lk, Ev) with Hq a multiple of Hkv");
  TORCH_CHECK(lo.has_value() == hi.has_value(), "give both row spans lo and hi, or neither");
  TORCH_CHECK(!lo.has_value() || (lo->scalar_type() == at::kLong && hi->scalar_type() == at::kLong),
              "row spans must be int64");
  TORCH_CHECK(parts >= 1, "parts must be >= 1");
  const std::vector<int64_t> batch = batch_of(q, k, v);
  const int64_t N = c10::multiply_integers(batch);
  const auto options = q.options().dtype(compute_type(q));
  at::Tensor out = at::empty({N, q.size(-3), q.size(-2), v.size(-1)}, options);
  at::Tensor lse = at::empty({N, q.size(-3), q.size(-2)}, options);
  at::Tensor row_stats = stats ? at::empty({N, q.size(-3), q.size(-2), STATS}, options) : at::Tensor();
  bool garbage;
  switch (st) {
    case at::kFloat:
      garbage = split_k_impl<float, float>(q, k, v, lo, hi, batch, out, lse, scale, parts, softcap,
                                           stats ? row_stats.data_ptr<float>() : nullptr);
      break;
    case at::kDouble:
      garbage = split_k_impl<double, double>(q, k, v, lo, hi, batch, out, lse, scale, parts, softcap,
                                             stats ? row_stats.data_ptr<double>() : nullptr);
      break;
    default:
      garbage = split_k_impl<at::BFloat16, float>(q, k, v, lo, hi, batch, out, lse, scale, parts, softcap,
                                                  stats ? row_stats.data_ptr<float>() : nullptr);
  }
  return {out, lse, garbage, row_stats};
}

int64_t split_k_parts(int64_t tasks, int64_t Lk, int64_t parts_per_thread, int64_t min_part_keys) {
  const int64_t slots = parts_per_thread * at::get_num_threads();
  return std::max<int64_t>(1, std::min<int64_t>((slots + tasks - 1) / std::max<int64_t>(tasks, 1), Lk / min_part_keys));
}

namespace {

// split_k_attention with this machine's parts: out (*B, Hq, Lq, Ev) in q's dtype and lse
// (*B, Hq, Lq), or nullopt where some row saw garbage (the caller reruns on an engine that
// marks exactly those rows).
std::optional<std::tuple<at::Tensor, at::Tensor>> split_k_shaped(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& lo,
    const c10::optional<at::Tensor>& hi, double scale, double softcap, int64_t parts_per_thread,
    int64_t min_part_keys) {
  std::vector<int64_t> shape = batch_of(q, k, v);
  const int64_t tasks = c10::multiply_integers(shape) * k.size(-3);
  const int64_t parts = split_k_parts(tasks, k.size(-2), parts_per_thread, min_part_keys);
  auto [out, lse, garbage, unused] = split_k_attention(q, k, v, lo, hi, scale, parts, softcap, false);
  if (garbage) return std::nullopt;
  shape.insert(shape.end(), {q.size(-3), q.size(-2)});
  lse = lse.view(shape);
  shape.push_back(v.size(-1));
  return std::make_tuple(out.view(shape).to(q.scalar_type()), lse);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> split_k_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const c10::optional<at::Tensor>& lo,
                                              const c10::optional<at::Tensor>& hi, double scale, double softcap,
                                              int64_t parts_per_thread, int64_t min_part_keys,
                                              at::TensorList mask_tensors, c10::string_view mask_spec,
                                              bool enable_gqa) {
  auto result = split_k_shaped(q, k, v, lo, hi, scale, softcap, parts_per_thread, min_part_keys);
  if (result) return *result;
  // Garbage some row may see: the tiled engine marks exactly those rows (split_k.py's fallback).
  static auto attention =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("dotattn::attention", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    at::TensorList, c10::string_view, double, double,
                                                    const at::Tensor&, bool, c10::string_view, bool, double)>();
  return attention.call(q, k, v, mask_tensors, mask_spec, scale, 0.0, at::zeros({}, q.options().dtype(at::kLong)),
                        enable_gqa, "tiled", false, softcap);
}

c10::optional<at::Tensor> split_k_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       c10::optional<double> scale, c10::optional<double> softcap, bool enable_gqa,
                                       int64_t causal, const c10::optional<at::Tensor>& kv_lengths,
                                       bool padding_left, int64_t max_rows, int64_t parts_per_thread,
                                       int64_t min_part_keys) {
  // What prepare() and the registry would check, as facts of the three tensors' headers; any
  // doubt answers "not the usual step", and the full path decides (and says what is wrong).
  const auto st = q.scalar_type();
  if (!(st == at::kFloat || st == at::kDouble || st == at::kBFloat16) || k.scalar_type() != st ||
      v.scalar_type() != st)
    return c10::nullopt;
  for (const at::Tensor* t : {&q, &k, &v})
    if (!t->is_cpu() || t->layout() != at::kStrided) return c10::nullopt;
  const int64_t D = q.dim();
  if (D < 3 || k.dim() != D || v.dim() != D) return c10::nullopt;
  for (int64_t d = 0; d < D - 3; ++d)
    if (k.size(d) != q.size(d) || v.size(d) != q.size(d)) return c10::nullopt;
  const int64_t Hq = q.size(-3), Lq = q.size(-2), E = q.size(-1), Hkv = k.size(-3), Lk = k.size(-2);
  if (q.numel() == 0 || k.numel() == 0 || v.numel() == 0) return c10::nullopt;  // empty: the full path
  if (k.size(-1) != E || v.size(-2) != Lk || v.size(-3) != Hkv || Hq % Hkv != 0 ||
      (Hq != Hkv && Hkv != 1 && !enable_gqa))
    return c10::nullopt;
  if (at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad()))
    return c10::nullopt;
  if (max_rows >= 0 && Hq / Hkv * Lq > max_rows) return c10::nullopt;
  if ((scale && !std::isfinite(*scale)) || (softcap && !(std::isfinite(*softcap) && *softcap > 0)))
    return c10::nullopt;
  // The row spans (Mask.row_spans) of causal (1: top-left, 2: bottom-right; row i sees keys
  // j < i + start, as Causal._row_spans), left out where it hides nothing (Causal.simplified:
  // a decoding step's one query), ANDed with padding: row b's real keys are its first
  // kv_lengths[b] or, with padding_left, its last (Padding._row_spans).
  const int64_t start = (causal == 2 ? Lk - Lq : 0) + 1;
  const bool causal_hides = causal != 0 && Lk > start;
  at::Tensor lengths;  // int64 (B,), or undefined without padding (every row's keys real)
  if (kv_lengths) {
    const at::Tensor& n = *kv_lengths;
    if (D != 4 || !n.is_cpu() || n.dim() != 1 || !(n.size(0) == 1 || n.size(0) == q.size(0)) ||
        !at::isIntegralType(n.scalar_type(), /*includeBool=*/false))
      return c10::nullopt;
    lengths = n.to(at::kLong).contiguous();
  }
  c10::optional<at::Tensor> lo, hi;
  if (lengths.defined() || causal_hides) {
    // lo (B, 1, 1) and hi (B, 1, Lq) per batch row with padding; lo () and hi (Lq,) without
    const auto longs = q.options().dtype(at::kLong);
    const int64_t B = lengths.defined() ? lengths.size(0) : 1;
    const int64_t* len = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
    lo = lengths.defined() ? at::empty({B, 1, 1}, longs) : at::empty({}, longs);
    hi = lengths.defined() ? at::empty({B, 1, Lq}, longs) : at::empty({Lq}, longs);
    int64_t *lo_p = lo->data_ptr<int64_t>(), *hi_p = hi->data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      const int64_t real = len ? len[b] : Lk;
      if (real < 0 || real > Lk) return c10::nullopt;  // the full path says what is wrong
      lo_p[b] = padding_left ? Lk - real : 0;
      const int64_t end = padding_left ? Lk : real;
      for (int64_t i = 0; i < Lq; ++i)
        hi_p[b * Lq + i] = causal_hides ? std::min(end, std::clamp<int64_t>(i + start, 0, Lk)) : end;
    }
  }
  auto result = split_k_shaped(q, k, v, lo, hi, scale ? *scale : 1.0 / std::sqrt(static_cast<double>(E)),
                               softcap ? *softcap : 0.0, parts_per_thread, min_part_keys);
  if (!result) return c10::nullopt;
  return std::get<0>(*result);
}

void split_k_no_grad(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto args = torch::jit::last(*stack, op.schema().arguments().size());
  TORCH_CHECK(!(at::GradMode::is_enabled() && (args[0].toTensor().requires_grad() ||
                                                args[1].toTensor().requires_grad() ||
                                                args[2].toTensor().requires_grad())),
              "dotattn::split_k has no backward: an input requires grad; call "
              "dotattn.scaled_dot_product_attention, which runs such a call on an engine that has one");
  at::AutoDispatchBelowADInplaceOrView below;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

}  // namespace dotattn
