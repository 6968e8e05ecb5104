// tp_runtime's own CPU kernels (AVX2 + FMA) for the few rows of a decode step (batch rows as activations, fp32
// in and out): weight-only int4 / int8 matmuls, an fp32 GEMV, and decode attention over the KV cache.
//
// Built on first use by tp_runtime/native.py (torch.utils.cpp_extension, -O3 -mavx2 -mfma) and registered as
// torch operators, so torch.compile graphs call them like any aten op:
//
//   tp_woq::int4_mm(x, packed, scale, minimum) -> y         y[n, o] = sum_i x[n, i] * w[o, i]
//       w[o, i] = code[o, i] * scale[o, h] + minimum[o, h],  h = i / 32      (Q4_1's form; a symmetric or
//       integer-zero weight has minimum = -zero * scale; a group of 32k inputs repeats its pair k times)
//       packed (out, in / 2) uint8: each block of 64 inputs is 32 bytes = 8 little-endian uint32 lanes, nibble
//       k (bits 4k..4k+3) of lane j holding input 8k + j (pack_int4 in native.py)
//   tp_woq::int8_mm(x, q, scale) -> y                         w[o, i] = q[o, i] * scale[o], scale (out,); or
//       w[o, i] = q[o, i] * scale[o, g], scale (out, groups), g the group of 32k inputs (GGUF's Q8_0)
//   tp_woq::int4_mm_q8(x, tiles, scale, zero, parts) -> y     w[o, i] = (code[o, i] - zero[o, g]) * scale[o, g], g
//       the group of 32k inputs (zero empty: 8 for all); the activations rounded to int8
//       per 32 inputs (one float step each, llama.cpp's Q8_0; ONNX Runtime's int4 accuracy level 4), in its
//       own layout of 8 output rows per tile (see q8_tile) so 8-bit integer dot products (vpdpbusd where the
//       CPU has VNNI, vpmaddubsw + vpmaddwd on AVX2) serve 8 rows per instruction; a float scale and a byte
//       zero per group (not repeated per 32, no float minimum: fewer bytes to read); parts = 2 adds the
//       rounding error as a second int8 part
//   tp_woq::f32_mm(x, w) -> y                                 w (out, in) float32
//   tp_woq::decode_attn(q, cache_k, cache_v, tables, visible)  one new token's attention per batch row, paged
//
// x is (rows, in) float32, contiguous. A few activation rows (int4: 2, int8 and fp32: 4) share each decoded
// weight vector (the weight is read once per that many rows: these are decode kernels), and output rows are
// split across torch's intra-op threads (over_outputs).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}


// One output row o of int4 for NB activation rows. A 64-input block is one 32-byte load seen as 8 lanes of
// 8 nibbles: nibble k of lane j is input 8k + j, so `v & (15 << 4k)` holds 8 codes times 16^k, which
// widen to floats exactly and meet inputs pre-multiplied by 16^-k (xs; exact too: powers of two).
// Nibbles 0-3 are the block's first 32 inputs, 4-7 its last 32, each half with its own scale and minimum
// (a group of 64k inputs repeats its scale per half: one code path, measured faster than folding per group).
template <int NB>
void int4_row(const float* xs, int64_t in, const uint8_t* wrow, const float* scale, const float* minimum,
              const float* xsum, float* y, int64_t out, int64_t o) {
  __m256 total[NB];
  for (int n = 0; n < NB; ++n) total[n] = _mm256_setzero_ps();
  for (int64_t blk = 0; blk < in / 64; ++blk) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow + blk * 32));
    const float* xb = xs + blk * 64;
#define TP_NIBBLE(k) _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15 << (4 * (k)))))
    const __m256 w0 = TP_NIBBLE(0), w1 = TP_NIBBLE(1), w2 = TP_NIBBLE(2), w3 = TP_NIBBLE(3);
    const __m256 w4 = TP_NIBBLE(4), w5 = TP_NIBBLE(5), w6 = TP_NIBBLE(6);
    const __m256 w7 = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 28));  // (the top nibble alone: unsigned)
#undef TP_NIBBLE
    const __m256 sa = _mm256_set1_ps(scale[2 * blk]), sb = _mm256_set1_ps(scale[2 * blk + 1]);
    for (int n = 0; n < NB; ++n) {
      const float* xn = xb + n * in;
      __m256 a0 = _mm256_mul_ps(w0, _mm256_loadu_ps(xn));  // inputs 0-31 in two chains, 32-63 in two
      __m256 a1 = _mm256_mul_ps(w1, _mm256_loadu_ps(xn + 8));
      __m256 b0 = _mm256_mul_ps(w4, _mm256_loadu_ps(xn + 32));
      __m256 b1 = _mm256_mul_ps(w5, _mm256_loadu_ps(xn + 40));
      a0 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xn + 16), a0);
      a1 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xn + 24), a1);
      b0 = _mm256_fmadd_ps(w6, _mm256_loadu_ps(xn + 48), b0);
      b1 = _mm256_fmadd_ps(w7, _mm256_loadu_ps(xn + 56), b1);
      total[n] = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), sa, total[n]);
      total[n] = _mm256_fmadd_ps(_mm256_add_ps(b0, b1), sb, total[n]);
    }
  }
  for (int n = 0; n < NB; ++n) {
    float acc = hsum(total[n]);
    const float* xsn = xsum + n * (in / 32);
    for (int64_t h = 0; h < in / 32; ++h) acc += minimum[h] * xsn[h];
    y[n * out + o] = acc;
  }
}

// int4 x int8 activations, for tiles of 8 output rows (int4_mm_q8). A tile's 32-input block is 128 bytes:
// 4 vectors of 32 bytes, byte 4r + j of vector v holding row r's input 4v + j in its low nibble and input
// 16 + 4v + j in its high nibble (pack_int4_tiles in native.py). So after masking, one 32-byte vector holds
// 4 inputs of each of the 8 rows, and a u8 x s8 dot of 4 products per 32-bit lane against the 4 matching
// activation bytes broadcast gives each row its partial sum in its own lane: no horizontal sums.
// Dot policies: the 8 vectors of a block against the block's 8 words of 4 activation bytes -> int32 sums.
struct DotMaddubs {  // AVX2: vpmaddubsw (2 products into 16 bits) then vpmaddwd; |8 x 2 x 15 x 127| < 2^15
  static inline __m256i block(const __m256i* u, const int8_t* xb) {
    __m256i a = _mm256_setzero_si256(), b = _mm256_setzero_si256();
    for (int s = 0; s < 8; s += 2) {
      a = _mm256_add_epi16(a, _mm256_maddubs_epi16(u[s], word(xb, s)));
      b = _mm256_add_epi16(b, _mm256_maddubs_epi16(u[s + 1], word(xb, s + 1)));
    }
    return _mm256_madd_epi16(_mm256_add_epi16(a, b), _mm256_set1_epi16(1));
  }
  static inline __m256i word(const int8_t* xb, int s) {  // activation bytes 4s..4s+3 in every lane
    int32_t w;
    std::memcpy(&w, xb + 4 * s, 4);
    return _mm256_set1_epi32(w);
  }
};

// vpdpbusd (VNNI): the 4 products and their sum in one instruction; AVX-VNNI's encoding, or AVX512-VNNI's VL one
// on CPUs that have only that.
#define TP_DOT_VNNI(NAME, TARGET, DPBUSD)                                                               \
  struct NAME {                                                                                         \
    __attribute__((target(TARGET))) static inline __m256i block(const __m256i* u, const int8_t* xb) {  \
      __m256i a = _mm256_setzero_si256(), b = _mm256_setzero_si256();                                   \
      for (int s = 0; s < 8; s += 2) {                                                                  \
        a = DPBUSD(a, u[s], DotMaddubs::word(xb, s));                                                   \
        b = DPBUSD(b, u[s + 1], DotMaddubs::word(xb, s + 1));                                           \
      }                                                                                                 \
      return _mm256_add_epi32(a, b);                                                                    \
    }                                                                                                   \
  };
#if defined(__GNUC__) && (__GNUC__ >= 11 || defined(__clang__))
#define TP_HAVE_AVXVNNI 1
TP_DOT_VNNI(DotAvxVnni, "avx2,avxvnni", _mm256_dpbusd_avx_epi32)
#endif
TP_DOT_VNNI(DotAvx512Vnni, "avx2,avx512vnni,avx512vl", _mm256_dpbusd_epi32)
#undef TP_DOT_VNNI

#ifndef TP_PF_DIST
#define TP_PF_DIST 1024
#endif
#if TP_PF_DIST > 0
#define TP_PREFETCH(p) do { _mm_prefetch(reinterpret_cast<const char*>(p) + TP_PF_DIST, _MM_HINT_T0); \
  _mm_prefetch(reinterpret_cast<const char*>(p) + TP_PF_DIST + 64, _MM_HINT_T0); } while (0)
#else
#define TP_PREFETCH(p) do {} while (0)
#endif

// One tile t (output rows 8t .. 8t + 7) for NB activation rows of P int8 parts each (see quantize_rows_q8).
// Per 32 inputs b of row n and part p: the integer sum times that part's step dx[n][p][b]; per group g of 32k
// inputs: minus the rows' zeros times the group's (rounded) input sum, times the rows' scales.
// xq: (NB, P, in) codes, dx: (NB, P, in / 32); scale, zero: (groups, 8) of this tile (zero null: all 8).
template <int NB, int P, class Dot>
__attribute__((always_inline)) inline void q8_tile(const int8_t* xq, const float* dx, const float* xsum,
                                                   int64_t in, int64_t groups, const uint8_t* wt,
                                                   const float* scale, const uint8_t* zero, float* y,
                                                   int64_t out, int64_t t) {
  const int64_t blocks = in / 32, per_group = blocks / groups;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m256 acc[NB];
  for (int n = 0; n < NB; ++n) acc[n] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 part[NB];
    for (int n = 0; n < NB; ++n) part[n] = _mm256_setzero_ps();
    for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
      __m256i u[8];
      TP_PREFETCH(wt + b * 128);
      for (int v = 0; v < 4; ++v) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt + b * 128 + 32 * v));
        u[v] = _mm256_and_si256(w, low4);
        u[v + 4] = _mm256_and_si256(_mm256_srli_epi16(w, 4), low4);
      }
      for (int n = 0; n < NB; ++n) {
        for (int p = 0; p < P; ++p) {
          const __m256i s = Dot::block(u, xq + (n * P + p) * in + b * 32);
          part[n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(dx[(n * P + p) * blocks + b]), part[n]);
        }
      }
    }
    const __m256 sc = _mm256_loadu_ps(scale + g * 8);
    __m256 zf = _mm256_set1_ps(8.0f);
    if (zero != nullptr) {
      int64_t z8;
      std::memcpy(&z8, zero + g * 8, 8);
      zf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(z8)));
    }
    for (int n = 0; n < NB; ++n)  // acc += scale * (sum of x q - zero * sum of x)
      acc[n] = _mm256_fmadd_ps(_mm256_fnmadd_ps(zf, _mm256_set1_ps(xsum[n * groups + g]), part[n]), sc, acc[n]);
  }
  for (int n = 0; n < NB; ++n) _mm256_storeu_ps(y + n * out + t * 8, acc[n]);
}

// The tiles begin..end for activation rows r.. (NB of them), compiled once per instruction set.
struct Q8Args {
  const int8_t* xq; const float* dx; const float* xsum; int64_t in, groups; const uint8_t* w;
  const float* scale; const uint8_t* zero; float* y; int64_t out;
};
#define TP_Q8_TILES(NAME, DOT, TARGET)                                                                  \
  template <int NB, int P>                                                                              \
  TARGET void NAME(const Q8Args& a, int64_t r, int64_t begin, int64_t end) {                            \
    const int64_t tile_bytes = a.in * 4, tile_floats = a.groups * 8;                                    \
    for (int64_t t = begin; t < end; ++t)                                                               \
      q8_tile<NB, P, DOT>(a.xq + r * P * a.in, a.dx + r * P * (a.in / 32), a.xsum + r * a.groups, a.in,  \
                          a.groups, a.w + t * tile_bytes, a.scale + t * tile_floats,                   \
                          a.zero ? a.zero + t * tile_floats : nullptr, a.y + r * a.out, a.out, t);     \
  }
TP_Q8_TILES(q8_tiles_avx2, DotMaddubs, )
#ifdef TP_HAVE_AVXVNNI
TP_Q8_TILES(q8_tiles_avxvnni, DotAvxVnni, __attribute__((target("avx2,avxvnni"))))
#endif
TP_Q8_TILES(q8_tiles_avx512vnni, DotAvx512Vnni, __attribute__((target("avx2,avx512vnni,avx512vl"))))
#undef TP_Q8_TILES

// Which dot instruction int4_mm_q8 uses: 2 AVX-VNNI, 1 AVX512-VNNI (its VL encoding), 0 AVX2's two-step dot;
// the best this CPU has unless tp_woq::q8_isa set one (tests and benchmarks run every path on one machine).
int best_q8_isa() {
#ifdef TP_HAVE_AVXVNNI
  if (__builtin_cpu_supports("avxvnni")) return 2;
#endif
  if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl")) return 1;
  return 0;
}
std::atomic<int> q8_isa_used{-1};

int64_t q8_isa(int64_t force) {  // force < 0: only report; else use min(force, best) from now on
  const int best = best_q8_isa();
  if (force >= 0) q8_isa_used = static_cast<int>(std::min<int64_t>(force, best));
  if (q8_isa_used < 0) q8_isa_used = best;
  return q8_isa_used;
}

// Activations of `rows` rows rounded to int8 per 32 inputs (llama.cpp's Q8_0): step d = max |x| / 127,
// codes round-to-nearest-even(x / d). With P = 2 the rounding error is rounded the same way again (its step
// is at most d / 254), so the two parts together carry ~15 bits per block. Writes xq (rows, P, in), the
// steps dx (rows, P, in / 32), and xsum (rows, groups): each weight group's sum of the rounded inputs (not
// of the exact ones), so the result is the rounded activations times the true weights and the rounding
// error meets weights centred on zero instead of the codes 0..15 (measured ~2x smaller on SmolLM2).
template <int P>
void quantize_rows_q8(const float* x, int64_t rows, int64_t in, int64_t groups, int8_t* xq, float* dx,
                      float* xsum) {
  const int64_t blocks = in / 32, per_group = blocks / groups;
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < groups; ++g) {
      __m256 gsum = _mm256_setzero_ps();
      for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b) {
        __m256 v[4];
        for (int k = 0; k < 4; ++k) v[k] = _mm256_loadu_ps(x + r * in + b * 32 + 8 * k);
        for (int p = 0; p < P; ++p) {  // part p rounds what the parts before it left over
          __m256 amax = _mm256_setzero_ps();
          for (int k = 0; k < 4; ++k) amax = _mm256_max_ps(amax, _mm256_and_ps(v[k], abs_mask));
          __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
          m = _mm_max_ps(m, _mm_movehl_ps(m, m));
          m = _mm_max_ss(m, _mm_movehdup_ps(m));
          const float top = _mm_cvtss_f32(m), d = top / 127.0f;
          dx[(r * P + p) * blocks + b] = d;
          const __m256 inv = _mm256_set1_ps(top > 0.0f ? 127.0f / top : 0.0f), step = _mm256_set1_ps(d);
          __m256i q[4];  // |x / d| <= 127: the packs below never saturate
          for (int k = 0; k < 4; ++k) {
            q[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], inv));  // nearest even
            v[k] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(q[k]), step, v[k]);  // the rest, for the next part
          }
          const __m256i qs = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
          gsum = _mm256_fmadd_ps(_mm256_cvtepi32_ps(qs), step, gsum);
          // packs work within 128-bit halves: the dword permutation puts the 32 bytes back in input order
          const __m256i q16 = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + (r * P + p) * in + b * 32),
                              _mm256_permutevar8x32_epi32(q16, order));
        }
      }
      xsum[r * groups + g] = hsum(gsum);
    }
  }
}

// Eight weights from w[0..7] as floats: fp32 as they are, int8 codes widened.
inline __m256 load8(const float* w) { return _mm256_loadu_ps(w); }
inline __m256 load8(const int8_t* w) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
}

// One output row of an fp32 or int8 weight (times its per-channel scale) for NB activation rows; 4
// independent sums per row hide the FMA latency.
template <int NB, class W>
void dot_row(const float* x, int64_t in, const W* wrow, float scale, float* y, int64_t out, int64_t o) {
  __m256 a[NB][4];
  for (int n = 0; n < NB; ++n) a[n][0] = a[n][1] = a[n][2] = a[n][3] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= in; i += 32) {
    const __m256 w0 = load8(wrow + i), w1 = load8(wrow + i + 8), w2 = load8(wrow + i + 16), w3 = load8(wrow + i + 24);
    for (int n = 0; n < NB; ++n) {
      const float* xn = x + n * in + i;
      a[n][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xn), a[n][0]);
      a[n][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xn + 8), a[n][1]);
      a[n][2] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xn + 16), a[n][2]);
      a[n][3] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xn + 24), a[n][3]);
    }
  }
  for (int n = 0; n < NB; ++n) {
    float acc = hsum(_mm256_add_ps(_mm256_add_ps(a[n][0], a[n][1]), _mm256_add_ps(a[n][2], a[n][3])));
    for (int64_t j = i; j < in; ++j) acc += float(wrow[j]) * x[n * in + j];
    y[n * out + o] = acc * scale;
  }
}

// One output row of an int8 weight with a scale per group of `group` inputs (a multiple of 32) for NB
// activation rows: per group, two chains of products over its 32-input steps, then times the group's scale
// into the row's total.
template <int NB>
void int8_group_row(const float* x, int64_t in, const int8_t* wrow, const float* scale, int64_t group, float* y,
                    int64_t out, int64_t o) {
  __m256 total[NB];
  for (int n = 0; n < NB; ++n) total[n] = _mm256_setzero_ps();
  for (int64_t g = 0; g < in / group; ++g) {
    __m256 a[NB][2];
    for (int n = 0; n < NB; ++n) a[n][0] = a[n][1] = _mm256_setzero_ps();
    for (int64_t i = g * group; i < (g + 1) * group; i += 32) {
      const __m256 w0 = load8(wrow + i), w1 = load8(wrow + i + 8), w2 = load8(wrow + i + 16), w3 = load8(wrow + i + 24);
      for (int n = 0; n < NB; ++n) {
        const float* xn = x + n * in + i;
        a[n][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xn), a[n][0]);
        a[n][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xn + 8), a[n][1]);
        a[n][0] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xn + 16), a[n][0]);
        a[n][1] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xn + 24), a[n][1]);
      }
    }
    const __m256 sc = _mm256_set1_ps(scale[g]);
    for (int n = 0; n < NB; ++n) total[n] = _mm256_fmadd_ps(_mm256_add_ps(a[n][0], a[n][1]), sc, total[n]);
  }
  for (int n = 0; n < NB; ++n) y[n * out + o] = hsum(total[n]);
}

void check_x(const at::Tensor& x, int64_t in, const char* op) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              op, ": x must be a contiguous (rows, in) float32 CPU tensor");
  TORCH_CHECK(x.size(1) == in, op, ": x has ", x.size(1), " inputs, the weight ", in);
}

void check_int4(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& minimum, int64_t out,
                int64_t in) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "int4_mm: packed must be uint8");
  TORCH_CHECK(in % 64 == 0, "int4_mm: ", in, " inputs: needs inputs in blocks of 64");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.size(0) == out &&
              scale.size(1) == in / 32, "int4_mm: scale must be (out, in / 32) float32");
  TORCH_CHECK(minimum.scalar_type() == at::kFloat && minimum.is_contiguous() && minimum.sizes() == scale.sizes(),
              "int4_mm: minimum must be (out, in / 32) float32");
}

// Output rows split over torch's threads; activation rows in passes of up to MaxNB (each pass reads the
// weight once). row(nb, r, o) computes output o of activation rows r .. r + nb - 1, nb a compile-time count.
template <int MaxNB, class Row>
void over_outputs(int64_t rows, int64_t out, const Row& row) {
  at::parallel_for(0, out, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = 0; r < rows; r += MaxNB) {
      const int64_t nb = std::min<int64_t>(MaxNB, rows - r);
      for (int64_t o = begin; o < end; ++o) {
        if (nb == MaxNB) {
          row(std::integral_constant<int, MaxNB>{}, r, o);
        } else if (nb == 1) {
          row(std::integral_constant<int, 1>{}, r, o);
        } else if constexpr (MaxNB > 3) {
          if (nb == 2) row(std::integral_constant<int, 2>{}, r, o);
          else row(std::integral_constant<int, 3>{}, r, o);
        }
      }
    }
  });
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                   const at::Tensor& minimum) {
  const int64_t out = packed.size(0), in = packed.size(1) * 2, halves = in / 32;
  check_x(x, in, "tp_woq::int4_mm");
  check_int4(packed, scale, minimum, out, in);
  const int64_t rows = x.size(0);
  at::Tensor y = at::empty({rows, out}, x.options());
  if (rows == 0) return y;
  // Per activation row: the inputs times 16^-k for nibble k (see int4_row), and the sum of each 32
  // inputs, which meets their minimum.
  at::Tensor xs = at::empty({rows, in}, x.options());
  at::Tensor xsum = at::empty({rows, halves}, x.options());
  const float* xp = x.data_ptr<float>();
  float* xsp = xs.data_ptr<float>();
  float* xsump = xsum.data_ptr<float>();
  static const float mult[8] = {1.0f, 1.0f / 16, 1.0f / 256, 1.0f / 4096, 1.0f / 65536, 1.0f / 1048576,
                                1.0f / 16777216, 1.0f};
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t h = 0; h < halves; ++h) {
      const float* xh = xp + r * in + h * 32;
      float* xsh = xsp + r * in + h * 32;
      float sum = 0.0f;
      for (int j = 0; j < 32; ++j) {
        xsh[j] = xh[j] * mult[(h % 2) * 4 + j / 8];
        sum += xh[j];
      }
      xsump[r * halves + h] = sum;
    }
  }
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* mp = minimum.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  over_outputs<2>(rows, out, [&](auto nb, int64_t r, int64_t o) {
    int4_row<decltype(nb)::value>(xsp + r * in, in, wp + o * (in / 2), sp + o * halves, mp + o * halves,
                                  xsump + r * halves, yp + r * out, out, o);
  });
  return y;
}

template <int P>
void run_q8(const Q8Args& args, int64_t rows, int64_t tiles) {
  const int isa = static_cast<int>(q8_isa(-1));
  at::parallel_for(0, tiles, 2, [&](int64_t begin, int64_t end) {
    for (int64_t r = 0; r < rows; r += 2) {
      const bool two = rows - r >= 2;
#ifdef TP_HAVE_AVXVNNI
      if (isa == 2) {
        two ? q8_tiles_avxvnni<2, P>(args, r, begin, end) : q8_tiles_avxvnni<1, P>(args, r, begin, end);
        continue;
      }
#endif
      if (isa == 1) {
        two ? q8_tiles_avx512vnni<2, P>(args, r, begin, end) : q8_tiles_avx512vnni<1, P>(args, r, begin, end);
      } else {
        two ? q8_tiles_avx2<2, P>(args, r, begin, end) : q8_tiles_avx2<1, P>(args, r, begin, end);
      }
    }
  });
}

at::Tensor int4_mm_q8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                      const at::Tensor& zero, int64_t parts) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 3 &&
              packed.size(2) == 128, "int4_mm_q8: packed must be (out / 8, in / 32, 128) uint8");
  TORCH_CHECK(parts == 1 || parts == 2, "int4_mm_q8: parts must be 1 or 2");
  const int64_t tiles = packed.size(0), out = tiles * 8, in = packed.size(1) * 32;
  check_x(x, in, "tp_woq::int4_mm_q8");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.dim() == 3 &&
              scale.size(0) == tiles && scale.size(2) == 8 && scale.size(1) > 0 && (in / 32) % scale.size(1) == 0,
              "int4_mm_q8: scale must be (out / 8, groups, 8) float32, groups of 32k inputs");
  TORCH_CHECK(zero.numel() == 0 || (zero.scalar_type() == at::kByte && zero.is_contiguous() &&
                                    zero.sizes() == scale.sizes()),
              "int4_mm_q8: zero must be uint8 shaped like scale, or empty (8 for every group)");
  const int64_t rows = x.size(0), groups = scale.size(1);
  at::Tensor y = at::empty({rows, out}, x.options());
  if (rows == 0) return y;
  // The rounded activations live in the calling thread's scratch, reused by every call (a SmolLM2 decode
  // step makes 121: three tensor allocations each were ~0.1 ms of the step).
  thread_local std::vector<int8_t> xq;
  thread_local std::vector<float> dx, xsum;
  xq.resize(rows * parts * in);
  dx.resize(rows * parts * (in / 32));
  xsum.resize(rows * groups);
  const Q8Args args{xq.data(), dx.data(), xsum.data(), in, groups, packed.data_ptr<uint8_t>(),
                    scale.data_ptr<float>(), zero.numel() ? zero.data_ptr<uint8_t>() : nullptr,
                    y.data_ptr<float>(), out};
  auto run = [&](auto p) {  // p: the parts, as a compile-time count
    quantize_rows_q8<decltype(p)::value>(x.data_ptr<float>(), rows, in, groups, xq.data(), dx.data(),
                                         xsum.data());
    run_q8<decltype(p)::value>(args, rows, tiles);
  };
  if (parts == 1) run(std::integral_constant<int, 1>{});
  else run(std::integral_constant<int, 2>{});
  return y;
}

at::Tensor f32_mm(const at::Tensor& x, const at::Tensor& w) {
  const int64_t out = w.size(0), in = w.size(1);
  check_x(x, in, "tp_woq::f32_mm");
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.dim() == 2,
              "f32_mm: w must be a contiguous (out, in) float32 tensor");
  const int64_t rows = x.size(0);
  at::Tensor y = at::empty({rows, out}, x.options());
  if (rows == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  over_outputs<4>(rows, out, [&](auto nb, int64_t r, int64_t o) {
    dot_row<decltype(nb)::value>(xp + r * in, in, wp + o * in, 1.0f, yp + r * out, out, o);
  });
  return y;
}

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  const int64_t out = q.size(0), in = q.size(1);
  check_x(x, in, "tp_woq::int8_mm");
  TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous(), "int8_mm: q must be contiguous int8");
  const bool grouped = scale.dim() == 2 && scale.size(1) > 1;
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.size(0) == out &&
                  (grouped ? in % scale.size(1) == 0 && (in / scale.size(1)) % 32 == 0 : scale.numel() == out),
              "int8_mm: scale must be (out,) float32, or (out, groups) with groups of 32k inputs");
  const int64_t rows = x.size(0);
  at::Tensor y = at::empty({rows, out}, x.options());
  if (rows == 0) return y;
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (grouped) {
    const int64_t groups = scale.size(1), group = in / groups;
    over_outputs<4>(rows, out, [&](auto nb, int64_t r, int64_t o) {
      int8_group_row<decltype(nb)::value>(xp + r * in, in, wp + o * in, sp + o * groups, group, yp + r * out, out,
                                          o);
    });
    return y;
  }
  over_outputs<4>(rows, out, [&](auto nb, int64_t r, int64_t o) {
    dot_row<decltype(nb)::value>(xp + r * in, in, wp + o * in, sp[o], yp + r * out, out, o);
  });
  return y;
}

// e^x for 8 floats (x <= 0 here: scores minus their maximum): x = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-6
// polynomial (Cephes' coefficients), 2^n built in the exponent bits; about 1 ulp; exactly 0 below -87 (and
// for -inf: masked positions).
inline __m256 exp8(__m256 x0) {
  const __m256 x = _mm256_max_ps(x0, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts: exact n * hi
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)),
                       _mm256_cmp_ps(x0, _mm256_set1_ps(-87.0f), _CMP_GE_OQ));
}

// The sums of 8 vectors, one per lane: lane j = the sum of a[j]'s 8 floats.
inline __m256 hsum8x8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

// One query head's attention: scores of 8 positions at a time (8 accumulators, summed across lanes
// together), the softmax over the visible positions (an all-masked row gives zeros), then the weighted sum
// of the value rows in chunks of up to 64 of the head's D outputs. Position t's key row is kb + rows[t], its
// value row vb + rows[t] (the rows' offsets, through the block table).
void attend_one(const float* qg, const float* kb, const float* vb, const int64_t* rows, const bool* mb,
                int64_t S, int64_t D, float scale, float* sg, float* og) {
  float best = -INFINITY;
  int64_t s = 0;
  for (; s + 8 <= S; s += 8) {
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 qv = _mm256_loadu_ps(qg + d);
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kb + rows[s + j] + d), acc[j]);
    }
    _mm256_storeu_ps(sg + s, _mm256_mul_ps(hsum8x8(acc), _mm256_set1_ps(scale)));
  }
  for (; s < S; ++s) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8)
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(qg + d), _mm256_loadu_ps(kb + rows[s] + d), acc);
    sg[s] = hsum(acc) * scale;
  }
  for (s = 0; s < S; ++s) {
    if (!mb[s]) sg[s] = -INFINITY;
    best = std::max(best, sg[s]);
  }
  const float top = std::isinf(best) ? 0.0f : best;
  __m256 tot = _mm256_setzero_ps();
  for (s = 0; s + 8 <= S; s += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + s), _mm256_set1_ps(top)));
    _mm256_storeu_ps(sg + s, e);
    tot = _mm256_add_ps(tot, e);
  }
  float total = hsum(tot);
  for (; s < S; ++s) {
    sg[s] = std::isinf(sg[s]) ? 0.0f : std::exp(sg[s] - top);
    total += sg[s];
  }
  const __m256 inv = _mm256_set1_ps(total > 0.0f ? 1.0f / total : 0.0f);
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    const int nv = static_cast<int>(std::min<int64_t>(64, D - d0) / 8);
    __m256 acc[8];
    for (int j = 0; j < nv; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t t = 0; t < S; ++t) {
      if (sg[t] == 0.0f) continue;
      const __m256 p = _mm256_set1_ps(sg[t]);
      const float* vr = vb + rows[t] + d0;
      for (int j = 0; j < nv; ++j) acc[j] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + 8 * j), acc[j]);
    }
    for (int j = 0; j < nv; ++j) _mm256_storeu_ps(og + d0 + 8 * j, _mm256_mul_ps(acc[j], inv));
  }
}

// Attention of one new token per batch row over its blocks of the paged KV cache (decode steps), fp32:
//   q (B, kv_heads, G, D); cache_k / cache_v (blocks, kv_heads, block_size, D), D contiguous, the same strides;
//   tables (B, NB) int64: position t of row b is row t % block_size of block tables[b, t / block_size];
//   visible (B, S) bool over positions 0..S-1, S <= NB * block_size
//   -> out (B, kv_heads, G, D) = softmax(q k^T / sqrt(D), masked) v
// One query head per task across torch's threads (the G heads of a KV head read the same rows, from cache
// after the first), when the tasks hold enough work to pay for waking a thread.
at::Tensor decode_attn(const at::Tensor& q, const at::Tensor& cache_k, const at::Tensor& cache_v,
                       const at::Tensor& tables, const at::Tensor& visible) {
  TORCH_CHECK(q.dim() == 4 && cache_k.dim() == 4 && cache_v.dim() == 4 && tables.dim() == 2 && visible.dim() == 2,
              "decode_attn: q, cache_k, cache_v are 4-D, tables and visible 2-D");
  const int64_t B = q.size(0), H = q.size(1), G = q.size(2), D = q.size(3), S = visible.size(1);
  const int64_t bs = cache_k.size(2), NB = tables.size(1);
  TORCH_CHECK(q.scalar_type() == at::kFloat && cache_k.scalar_type() == at::kFloat &&
                  cache_v.scalar_type() == at::kFloat && tables.scalar_type() == at::kLong &&
                  visible.scalar_type() == at::kBool,
              "decode_attn: float32 q / caches, int64 block tables and a bool mask");
  TORCH_CHECK(D % 8 == 0 && cache_k.size(1) == H && cache_k.size(3) == D && cache_v.sizes() == cache_k.sizes() &&
                  tables.size(0) == B && visible.size(0) == B && S <= NB * bs,
              "decode_attn: shapes do not match");
  TORCH_CHECK(cache_k.stride(3) == 1 && cache_k.strides() == cache_v.strides(),
              "decode_attn: the caches need D contiguous and equal strides");
  const at::Tensor qc = q.contiguous(), vis = visible.contiguous(), tc = tables.contiguous();
  at::Tensor out = at::empty({B, H, G, D}, q.options());
  if (B * H * G == 0) return out;
  // each row's key/value row offsets, position by position, through its block table
  std::vector<int64_t> rows(B * S);
  const int64_t* tp = tc.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < S; ++t) {
      const int64_t block = tp[b * NB + t / bs];
      TORCH_CHECK(block >= 0 && block < cache_k.size(0), "decode_attn: block ", block, " is not in the cache");
      rows[b * S + t] = block * cache_k.stride(0) + (t % bs) * cache_k.stride(2);
    }
  const float* qp = qc.data_ptr<float>();
  const float* kp = cache_k.data_ptr<float>();
  const float* vp = cache_v.data_ptr<float>();
  const bool* mp = vis.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(S * D * 2, 1));
  at::parallel_for(0, B * H * G, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(S + 8);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (H * G), h = task / G % H;
      attend_one(qp + task * D, kp + h * cache_k.stride(1), vp + h * cache_v.stride(1), rows.data() + b * S,
                 mp + b * S, S, D, scale, scores.data(), op + task * D);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(tp_woq, m) {
  m.def("int4_mm(Tensor x, Tensor packed, Tensor scale, Tensor minimum) -> Tensor");
  m.def("int8_mm(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("int4_mm_q8(Tensor x, Tensor tiles, Tensor scale, Tensor zero, int parts) -> Tensor");
  m.def("f32_mm(Tensor x, Tensor w) -> Tensor");
  m.def("q8_isa(int force) -> int");
  m.def("decode_attn(Tensor q, Tensor cache_k, Tensor cache_v, Tensor tables, Tensor visible) -> Tensor");
}

TORCH_LIBRARY_IMPL(tp_woq, CPU, m) {
  m.impl("int4_mm", &int4_mm);
  m.impl("int8_mm", &int8_mm);
  m.impl("int4_mm_q8", &int4_mm_q8);
  m.impl("f32_mm", &f32_mm);
  m.impl("decode_attn", &decode_attn);
}

TORCH_LIBRARY_IMPL(tp_woq, CompositeExplicitAutograd, m) {
  m.impl("q8_isa", &q8_isa);
}
