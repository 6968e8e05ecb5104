// tp_runtime's W8A8 (SmoothQuant) CPU kernel, AVX2: int8 activations times int8 weights, summed in int32.
//
//   tp_woq::w8a8_mm(x, q, scale, act_scale) -> y
//       y[n, o] = sx[n] * scale[o] * sum_i xq[n, i] * q[o, i]
//       xq[n, i] = clamp(round(x[n, i] / sx[n]), -127, 127)      symmetric, one step per activation row:
//       sx[n] = max_i |x[n, i]| / 127 (per token), or act_scale[0] when act_scale has one element (static)
//
// x (rows, in) float32 contiguous; q (out, in_padded) int8 with in_padded a multiple of 16 (zeros past `in`);
// scale (out,) float32. The activations are rounded once per call into int16 rows padded to in_padded.
// Products are formed exactly: both operands widened to 16 bits, then vpmaddwd multiplies 16 pairs and adds
// neighbours into 8 int32 lanes (|2 x 127 x 127| < 2^15, and the int32 lanes hold any K below 2^16 blocks).
// AVX2's vpmaddubsw (u8 x s8 pairs summed into a saturating int16) is never used: with full-range 8-bit
// activations its pair sums overflow.
//
// Blocking: output rows are split over torch's threads; each thread walks its outputs in blocks of OB, and
// for each block the activation rows in groups of up to 4, each group against output pairs (4 x 2 int32
// accumulators): a weight vector widened once serves 4 rows, an activation vector serves 2 outputs.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t OB = 32;  // outputs per block: 32 rows of int8 weights stay in L2 while the rows pass

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// NR activation rows (int16, stride inp) against NO weight rows (int8, stride inp), k over [0, inp).
template <int NR, int NO>
void block(const int16_t* x, const int8_t* w, int64_t inp, const float* sx, const float* scale, float* y,
           int64_t out) {
  __m256i acc[NR][NO];
  for (int n = 0; n < NR; ++n)
    for (int j = 0; j < NO; ++j) acc[n][j] = _mm256_setzero_si256();
  for (int64_t k = 0; k < inp; k += 16) {
    __m256i wv[NO];
    for (int j = 0; j < NO; ++j)
      wv[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * inp + k)));
    for (int n = 0; n < NR; ++n) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + n * inp + k));
      for (int j = 0; j < NO; ++j) acc[n][j] = _mm256_add_epi32(acc[n][j], _mm256_madd_epi16(xv, wv[j]));
    }
  }
  for (int n = 0; n < NR; ++n)
    for (int j = 0; j < NO; ++j) y[n * out + j] = float(hsum_epi32(acc[n][j])) * sx[n] * scale[j];
}

// Rows r .. r + nr - 1 (nr <= 4) against outputs [o0, o1): pairs, then a last single output.
template <int NR>
void rows_block(const int16_t* x, const int8_t* q, int64_t inp, const float* sx, const float* scale, float* y,
                int64_t out, int64_t o0, int64_t o1) {
  int64_t o = o0;
  if (NR == 1) {  // decode: 4 outputs per pass, more independent sums per weight stream
    for (; o + 4 <= o1; o += 4) block<1, 4>(x, q + o * inp, inp, sx, scale + o, y + o, out);
  }
  for (; o + 2 <= o1; o += 2) block<NR, 2>(x, q + o * inp, inp, sx, scale + o, y + o, out);
  if (o < o1) block<NR, 1>(x, q + o * inp, inp, sx, scale + o, y + o, out);
}

// Per-row steps sx and int16 codes (rows, inp), zero past `in`.
void quantize_rows(const float* x, int64_t rows, int64_t in, int64_t inp, const float* act_scale, int16_t* xq,
                   float* sx) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = x + r * in;
      float step;
      if (act_scale != nullptr) {
        step = *act_scale;
      } else {
        float m = 0.f;
        for (int64_t i = 0; i < in; ++i) m = std::max(m, std::fabs(xr[i]));
        step = m / 127.f;
      }
      const float inv = step > 0.f ? 1.f / step : 0.f;
      sx[r] = step;
      int16_t* qr = xq + r * inp;
      for (int64_t i = 0; i < in; ++i) {
        const float v = std::nearbyint(xr[i] * inv);  // round half to even, as torch.round
        qr[i] = int16_t(std::min(127.f, std::max(-127.f, v)));
      }
      for (int64_t i = in; i < inp; ++i) qr[i] = 0;
    }
  });
}

at::Tensor w8a8_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& act_scale) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "tp_woq::w8a8_mm: x must be a contiguous (rows, in) float32 CPU tensor");
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && q.is_contiguous() && q.size(1) % 16 == 0,
              "tp_woq::w8a8_mm: q must be contiguous (out, in padded to 16) int8");
  const int64_t rows = x.size(0), in = x.size(1), out = q.size(0), inp = q.size(1);
  TORCH_CHECK(in <= inp && inp < in + 16, "tp_woq::w8a8_mm: x has ", in, " inputs, the weight ", inp, " (padded)");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == out,
              "tp_woq::w8a8_mm: scale must be (out,) float32");
  TORCH_CHECK(act_scale.numel() <= 1 && (act_scale.numel() == 0 || act_scale.scalar_type() == at::kFloat),
              "tp_woq::w8a8_mm: act_scale must be empty (per token) or one float32");
  at::Tensor y = at::empty({rows, out}, x.options());
  if (rows == 0) return y;
  std::vector<int16_t> xq(rows * inp);
  std::vector<float> sx(rows);
  const float* as = act_scale.numel() ? act_scale.data_ptr<float>() : nullptr;
  quantize_rows(x.data_ptr<float>(), rows, in, inp, as, xq.data(), sx.data());
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, out, OB, [&](int64_t begin, int64_t end) {
    for (int64_t o0 = begin; o0 < end; o0 += OB) {
      const int64_t o1 = std::min(end, o0 + OB);
      for (int64_t r = 0; r < rows; r += 4) {
        const int16_t* xr = xq.data() + r * inp;
        float* yr = yp + r * out;
        switch (std::min<int64_t>(4, rows - r)) {
          case 4: rows_block<4>(xr, qp, inp, sx.data() + r, sp, yr, out, o0, o1); break;
          case 3: rows_block<3>(xr, qp, inp, sx.data() + r, sp, yr, out, o0, o1); break;
          case 2: rows_block<2>(xr, qp, inp, sx.data() + r, sp, yr, out, o0, o1); break;
          default: rows_block<1>(xr, qp, inp, sx.data() + r, sp, yr, out, o0, o1);
        }
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tp_woq, m) {
  m.def("w8a8_mm(Tensor x, Tensor q, Tensor scale, Tensor act_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(tp_woq, CPU, m) {
  m.impl("w8a8_mm", &w8a8_mm);
}
