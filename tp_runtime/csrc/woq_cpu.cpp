// Weight-only int4 / int8 matmuls for CPUs with AVX2 + FMA: tp_runtime's own kernels for the few rows of a
// decode step (batch rows as activations, fp32 in and out).
//
// Built on first use by tp_runtime/native.py (torch.utils.cpp_extension, -O3 -mavx2 -mfma) and registered as
// torch operators, so torch.compile graphs call them like any aten op:
//
//   tp_woq::int4_mm(x, packed, scale, minimum) -> y         y[n, o] = sum_i x[n, i] * w[o, i]
//       w[o, i] = code[o, i] * scale[o, h] + minimum[o, h],  h = i / 32      (Q4_1's form; a symmetric or
//       integer-zero weight has minimum = -zero * scale; a group of 32k inputs repeats its pair k times)
//       packed (out, in / 2) uint8: each block of 64 inputs is 32 bytes = 8 little-endian uint32 lanes, nibble
//       k (bits 4k..4k+3) of lane j holding input 8k + j (pack_int4 in native.py)
//   tp_woq::int8_mm(x, q, scale) -> y                         w[o, i] = q[o, i] * scale[o]
//   tp_woq::int4_mm_q8(x, packed, scale, minimum) -> y        int4_mm with the activations rounded to int8
//       per 32 inputs (one float step each, llama.cpp's Q8_0; ONNX Runtime's int4 accuracy level 4): the
//       codes meet them in 8-bit integer multiply-adds (vpmaddubsw), 4x fewer instructions than widening
//       every code to float; the minimum's term uses the exact fp32 sums of the inputs
//
// x is (rows, in) float32, contiguous. A few activation rows (int4: 2, int8 and fp32: 4) share each decoded
// weight vector (the weight is read once per that many rows: these are decode kernels), and output rows are
// split across torch's intra-op threads (over_outputs).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Eight codes (bytes) from the low 8 bytes of v as floats.
inline __m256 bytes_to_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }
inline __m256 sbytes_to_ps(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }

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

// One output row of int4 against int8 activations for NB rows. The bytes of a 64-input block (see int4_row)
// hold input 16p + j in the low nibble and 16p + 8 + j in the high nibble of byte 4j + p, so the activations
// are stored in that order (xq: per block 32 bytes for the low nibbles, then 32 for the high ones).
// vpmaddubsw adds the products of bytes p = 0, 1 (inputs < 32) into the even 16-bit lanes and p = 2, 3
// (inputs >= 32) into the odd ones (|sum| <= 4 x 15 x 127, no saturation); two vpmaddwd split the halves.
template <int NB>
void int4q8_row(const int8_t* xq, const float* dx, int64_t in, const uint8_t* wrow, const float* scale,
                const float* minimum, const float* xsum, float* y, int64_t out, int64_t o) {
  const int64_t halves = in / 32;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i even = _mm256_set1_epi32(0x00000001), odd = _mm256_set1_epi32(0x00010000);
  __m256 total[NB];
  for (int n = 0; n < NB; ++n) total[n] = _mm256_setzero_ps();
  for (int64_t blk = 0; blk < in / 64; ++blk) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow + blk * 32));
    const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    for (int n = 0; n < NB; ++n) {
      const int8_t* xb = xq + n * in + blk * 64;
      const __m256i s = _mm256_add_epi16(
          _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb))),
          _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 32))));
      const float* d = dx + n * halves + 2 * blk;
      total[n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s, even)),
                                 _mm256_set1_ps(scale[2 * blk] * d[0]), total[n]);
      total[n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s, odd)),
                                 _mm256_set1_ps(scale[2 * blk + 1] * d[1]), total[n]);
    }
  }
  for (int n = 0; n < NB; ++n) {
    const float* xsn = xsum + n * halves;
    __m256 m = _mm256_setzero_ps();
    int64_t h = 0;
    for (; h + 8 <= halves; h += 8) m = _mm256_fmadd_ps(_mm256_loadu_ps(minimum + h), _mm256_loadu_ps(xsn + h), m);
    float acc = hsum(_mm256_add_ps(total[n], m));
    for (; h < halves; ++h) acc += minimum[h] * xsn[h];
    y[n * out + o] = acc;
  }
}

// One output row of int8 (per-channel scale) for NB activation rows.
template <int NB>
void int8_row(const float* x, int64_t in, const int8_t* wrow, float scale, float* y, int64_t out, int64_t o) {
  __m256 a[NB][4];  // 4 independent sums per row hide the FMA latency
  for (int n = 0; n < NB; ++n) a[n][0] = a[n][1] = a[n][2] = a[n][3] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= in; i += 32) {
    const __m128i r0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wrow + i));
    const __m128i r1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wrow + i + 16));
    const __m256 w0 = sbytes_to_ps(r0), w1 = sbytes_to_ps(_mm_srli_si128(r0, 8));
    const __m256 w2 = sbytes_to_ps(r1), w3 = sbytes_to_ps(_mm_srli_si128(r1, 8));
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

// One output row of an fp32 weight for NB activation rows (4 independent sums per row hide the FMA latency).
template <int NB>
void f32_row(const float* x, int64_t in, const float* wrow, float* y, int64_t out, int64_t o) {
  __m256 a[NB][4];
  for (int n = 0; n < NB; ++n) a[n][0] = a[n][1] = a[n][2] = a[n][3] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= in; i += 32) {
    const __m256 w0 = _mm256_loadu_ps(wrow + i), w1 = _mm256_loadu_ps(wrow + i + 8);
    const __m256 w2 = _mm256_loadu_ps(wrow + i + 16), w3 = _mm256_loadu_ps(wrow + i + 24);
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
    for (int64_t j = i; j < in; ++j) acc += wrow[j] * x[n * in + j];
    y[n * out + o] = acc;
  }
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

at::Tensor int4_mm_q8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                      const at::Tensor& minimum) {
  const int64_t out = packed.size(0), in = packed.size(1) * 2, halves = in / 32;
  check_x(x, in, "tp_woq::int4_mm_q8");
  check_int4(packed, scale, minimum, out, in);
  const int64_t rows = x.size(0);
  at::Tensor y = at::empty({rows, out}, x.options());
  if (rows == 0) return y;
  // Per activation row and 32 inputs: the step d = max |x| / 127, the codes round(x / d) in int4q8_row's
  // order, and the exact sum of the inputs.
  at::Tensor xq = at::empty({rows, in}, x.options().dtype(at::kChar));
  at::Tensor dx = at::empty({rows, halves}, x.options());
  at::Tensor xsum = at::empty({rows, halves}, x.options());
  const float* xp = x.data_ptr<float>();
  int8_t* xqp = xq.data_ptr<int8_t>();
  float* dxp = dx.data_ptr<float>();
  float* xsump = xsum.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t h = 0; h < halves; ++h) {
      const float* xh = xp + r * in + h * 32;
      float amax = 0.0f, sum = 0.0f;
      for (int j = 0; j < 32; ++j) {
        amax = std::max(amax, std::fabs(xh[j]));
        sum += xh[j];
      }
      const float d = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
      dxp[r * halves + h] = d;
      xsump[r * halves + h] = sum;
      // input t = 32 (h % 2) + u of its 64-block sits at byte 4j + p of the low (u % 16 < 8) or high half,
      // with u = 16p + j (low) or 16p + 8 + j (high): p = u / 16 + 2 (h % 2), j = u % 8
      int8_t* xb = xqp + r * in + (h / 2) * 64;
      for (int u = 0; u < 32; ++u) {
        const int p = u / 16 + 2 * (h % 2), j = u % 8;
        const int q = static_cast<int>(std::nearbyint(xh[u] * inv));
        xb[(u % 16 < 8 ? 0 : 32) + 4 * j + p] = static_cast<int8_t>(std::max(-127, std::min(127, q)));
      }
    }
  }
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* mp = minimum.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  over_outputs<2>(rows, out, [&](auto nb, int64_t r, int64_t o) {
    int4q8_row<decltype(nb)::value>(xqp + r * in, dxp + r * halves, in, wp + o * (in / 2), sp + o * halves,
                                    mp + o * halves, xsump + r * halves, yp + r * out, out, o);
  });
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
    f32_row<decltype(nb)::value>(xp + r * in, in, wp + o * in, yp + r * out, out, o);
  });
  return y;
}

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  const int64_t out = q.size(0), in = q.size(1);
  check_x(x, in, "tp_woq::int8_mm");
  TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous(), "int8_mm: q must be contiguous int8");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == out, "int8_mm: scale must be (out,) float32");
  const int64_t rows = x.size(0);
  at::Tensor y = at::empty({rows, out}, x.options());
  if (rows == 0) return y;
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  over_outputs<4>(rows, out, [&](auto nb, int64_t r, int64_t o) {
    int8_row<decltype(nb)::value>(xp + r * in, in, wp + o * in, sp[o], yp + r * out, out, o);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(tp_woq, m) {
  m.def("int4_mm(Tensor x, Tensor packed, Tensor scale, Tensor minimum) -> Tensor");
  m.def("int8_mm(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("int4_mm_q8(Tensor x, Tensor packed, Tensor scale, Tensor minimum) -> Tensor");
  m.def("f32_mm(Tensor x, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(tp_woq, CPU, m) {
  m.impl("int4_mm", &int4_mm);
  m.impl("int8_mm", &int8_mm);
  m.impl("int4_mm_q8", &int4_mm_q8);
  m.impl("f32_mm", &f32_mm);
}
