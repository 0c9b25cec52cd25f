// The CPU GEMV of kernels.py: one pass over the packed codes of a quantized linear for a few rows of x.
//
//   y[m, o] = sum_g  scales[o, g] * sum_{i in g} x[m, i] * q[o, i]  +  biases[o, g] * sum_{i in g} x[m, i]
//
// Codes are the layout of kernels.pack: each row an LSB-first bit stream, code j at bits [j*b, (j+1)*b).
// So 8 consecutive codes starting at a multiple of 8 are exactly b whole bytes; they are decoded to 8 floats
// (AVX2: one 64-bit load, two variable shifts; 4 and 8 bits have their own shorter sequences) and
// multiplied into per-group accumulators, fp32 throughout. With AVX-512, 4- and 8-bit rows in groups of
// multiples of 32 take a 16-wide path that applies each group's scale once. Groups whose width is not a multiple of 8, and
// the last few columns of a row, take the scalar path. Threads split the output rows (at::parallel_for:
// PyTorch's own thread pool and thread count). The layer is read once per call whatever M is (M <= 8),
// which is what makes it memory-bound rather than compute-bound at M = 1.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define QALORA_AVX2 1
#endif
#if defined(QALORA_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__)
#define QALORA_AVX512 1
#endif

namespace {

constexpr int MAX_M = 8;

// Code j of a row (any j, any bits): the bits may straddle two bytes.
inline int code_at(const uint8_t* row, int64_t j, int bits) {
  int64_t bit = j * bits;
  uint32_t w = row[bit >> 3];
  if ((bit & 7) + bits > 8) w |= uint32_t(row[(bit >> 3) + 1]) << 8;
  return (w >> (bit & 7)) & ((1u << bits) - 1);
}

#ifdef QALORA_AVX2
// The 8 codes held by the `bits` bytes at p, as floats in column order. `tail`: fewer than 8 bytes of the
// row follow p, so only `bits` of them may be read.
inline __m256 decode8(const uint8_t* p, int bits, bool tail) {
  if (bits == 8) return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)));
  uint64_t w = 0;
  if (tail)
    for (int k = 0; k < bits; k++) w |= uint64_t(p[k]) << (8 * k);
  else
    std::memcpy(&w, p, 8);
  const __m256i v = _mm256_set1_epi64x((long long)w);
  const __m256i lo = _mm256_srlv_epi64(v, _mm256_setr_epi64x(0, bits, 2 * bits, 3 * bits));
  const __m256i hi = _mm256_srlv_epi64(v, _mm256_setr_epi64x(4 * bits, 5 * bits, 6 * bits, 7 * bits));
  // the low 32 bits of each 64-bit lane, in order: lanes 0,2,4,6 of lo then of hi
  const __m256i idx = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
  const __m128i a = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(lo, idx));
  const __m128i b = _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(hi, idx));
  const __m256i q = _mm256_and_si256(_mm256_set_m128i(b, a), _mm256_set1_epi32((1 << bits) - 1));
  return _mm256_cvtepi32_ps(q);
}

// 4 bits, 32 codes in 16 bytes: byte k holds codes 2k (low nibble) and 2k+1 (high nibble).
inline void decode32_4bit(const uint8_t* p, __m256 out[4]) {
  const __m128i raw = _mm_loadu_si128((const __m128i*)p);
  const __m128i m = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(raw, m), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m);
  const __m128i c0 = _mm_unpacklo_epi8(lo, hi), c1 = _mm_unpackhi_epi8(lo, hi);  // codes 0-15, 16-31
  out[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c0));
  out[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c0, 8)));
  out[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c1));
  out[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c1, 8)));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

#ifdef QALORA_AVX2
// Software prefetch PF_COLS columns ahead in the three streams a row reads (codes, scales, biases). Rows are
// contiguous, so near a row's end this reaches into the next row. Without it this VM's hardware prefetch
// leaves the kernel at a quarter of the streaming bandwidth once the weights are out of cache. Called every
// 8 groups; it covers the codes those groups consume (2 lines: 8 groups of 32 at 4 bits, fewer columns
// at more bits, which the hardware prefetcher then follows).
constexpr int64_t PF_COLS = 4096;
inline void prefetch_ahead(const uint8_t* q, int64_t col, int bits, const float* s, const float* b, int64_t G) {
  const char* p = (const char*)(q + (col + PF_COLS) * bits / 8);
  _mm_prefetch(p, _MM_HINT_T0);
  _mm_prefetch(p + 64, _MM_HINT_T0);
  _mm_prefetch((const char*)(s + PF_COLS / G), _MM_HINT_T0);
  _mm_prefetch((const char*)(b + PF_COLS / G), _MM_HINT_T0);
}
#endif

#ifdef QALORA_AVX512
// 32 codes from column j (a multiple of 32) of a 4- or 8-bit row, as two vectors of 16 floats.
inline void decode32_512(const uint8_t* q, int64_t j, int bits, __m512& a, __m512& b) {
  if (bits == 4) {
    const __m128i raw = _mm_loadu_si128((const __m128i*)(q + j / 2));
    const __m128i m = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(raw, m), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m);
    a = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)));
    b = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(lo, hi)));
  } else {
    a = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(q + j))));
    b = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(q + j + 16))));
  }
}

// A row's result for each row m of x: its two totals of scale-weighted group dot products, plus the bias term
// sum_g biases[g] * xsum[m, g] as a dot product over the groups.
template <int M>
inline void finish512(const __m512 (&tot)[M][2], const float* biases, const float* xsum, int64_t ng, float* out) {
  for (int m = 0; m < M; m++) {
    __m512 bt = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 16 <= ng; g += 16)
      bt = _mm512_fmadd_ps(_mm512_loadu_ps(biases + g), _mm512_loadu_ps(xsum + m * ng + g), bt);
    float rest = 0.f;
    for (; g < ng; g++) rest += biases[g] * xsum[m * ng + g];
    out[m] = rest + _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(tot[m][0], tot[m][1]), bt));
  }
}

// The AVX-512 row for 4- and 8-bit codes whose groups are all multiples of 32 wide: sum_i x_i q_i per group
// in two vector accumulators, then one FMA by the group's scale into the row's total (no per-weight
// multiply by the scale, no horizontal sum per group).
template <int M>
void row512(const float* x, int64_t K, const float* xsum, const uint8_t* q, const float* scales,
            const float* biases, int64_t ng, int64_t G, int bits, float* out) {
  // Two totals per row of x (even and odd groups: two independent FMA chains across groups); the bias
  // term sum_g biases[g] * xsum[g] is a separate dot product over the groups.
  __m512 tot[M][2];
  for (int m = 0; m < M; m++) tot[m][0] = tot[m][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; g++) {
    const int64_t start = g * G, end = start + G < K ? start + G : K;
    if ((g & 7) == 0) prefetch_ahead(q, start, bits, scales + g, biases + g, G);
    __m512 v0[M], v1[M];
    {
      __m512 a, b;
      decode32_512(q, start, bits, a, b);
      for (int m = 0; m < M; m++) {
        v0[m] = _mm512_mul_ps(a, _mm512_loadu_ps(x + m * K + start));
        v1[m] = _mm512_mul_ps(b, _mm512_loadu_ps(x + m * K + start + 16));
      }
    }
    for (int64_t j = start + 32; j < end; j += 32) {
      __m512 a, b;
      decode32_512(q, j, bits, a, b);
      for (int m = 0; m < M; m++) {
        v0[m] = _mm512_fmadd_ps(a, _mm512_loadu_ps(x + m * K + j), v0[m]);
        v1[m] = _mm512_fmadd_ps(b, _mm512_loadu_ps(x + m * K + j + 16), v1[m]);
      }
    }
    const __m512 vs = _mm512_set1_ps(scales[g]);
    for (int m = 0; m < M; m++) tot[m][g & 1] = _mm512_fmadd_ps(vs, _mm512_add_ps(v0[m], v1[m]), tot[m][g & 1]);
  }
  finish512<M>(tot, biases, xsum, ng, out);
}

// 4 bits, K % 64 == 0, G % 32 == 0: 64 codes are 32 bytes; their low nibbles are the even columns and the
// high nibbles the odd ones, so with x permuted once per call into that order (xp: per 64 columns, the even
// ones then the odd ones) no interleaving shuffle is needed: one AND and one shift give 2 x 32 codes.
template <int M>
void row512_q4(const float* xp, int64_t K, const float* xsum, const uint8_t* q, const float* scales,
               const float* biases, int64_t ng, int64_t G, float* out) {
  __m512 tot[M][2], vg[M];
  for (int m = 0; m < M; m++) tot[m][0] = tot[m][1] = vg[m] = _mm512_setzero_ps();
  const __m256i mask = _mm256_set1_epi8(0x0F);
  for (int64_t j = 0; j < K; j += 64) {
    const int64_t g = j / G;
    if ((j & 255) == 0) prefetch_ahead(q, j, 4, scales + g, biases + g, G);
    const __m256i raw = _mm256_loadu_si256((const __m256i*)(q + j / 2));
    const __m256i lo = _mm256_and_si256(raw, mask), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
    // even columns j, j+2, .., j+30 | j+32, .., j+62 and odd columns likewise
    const __m512 e0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(lo)));
    const __m512 e1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(lo, 1)));
    const __m512 o0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(hi)));
    const __m512 o1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(hi, 1)));
    for (int m = 0; m < M; m++) {
      const float* x = xp + m * K + j;  // [even 0..30 | even 32..62 | odd 1..31 | odd 33..63]
      const __m512 a = _mm512_fmadd_ps(o0, _mm512_loadu_ps(x + 32), _mm512_mul_ps(e0, _mm512_loadu_ps(x)));
      const __m512 b = _mm512_fmadd_ps(o1, _mm512_loadu_ps(x + 48), _mm512_mul_ps(e1, _mm512_loadu_ps(x + 16)));
      if (G == 32) {  // columns j..j+31 are group g, j+32..j+63 group g+1
        tot[m][0] = _mm512_fmadd_ps(_mm512_set1_ps(scales[g]), a, tot[m][0]);
        tot[m][1] = _mm512_fmadd_ps(_mm512_set1_ps(scales[g + 1]), b, tot[m][1]);
      } else {        // G a multiple of 64: both halves are group g
        vg[m] = _mm512_add_ps(vg[m], _mm512_add_ps(a, b));
        if ((j + 64) % G == 0 || j + 64 == K) {
          tot[m][0] = _mm512_fmadd_ps(_mm512_set1_ps(scales[g]), vg[m], tot[m][0]);
          vg[m] = _mm512_setzero_ps();
        }
      }
    }
  }
  finish512<M>(tot, biases, xsum, ng, out);
}
#endif

// One output row for M rows of x (M a compile-time constant, so the accumulators stay in registers). The
// decoded codes are multiplied by their group's scale once and then into A independent accumulators per row
// of x (A = 4 for one row: four FMA chains hide the FMA latency; more rows give independent chains anyway).
template <int M>
void row(const float* x, int64_t K, const float* xsum, const uint8_t* q, int64_t row_bytes, const float* scales,
         const float* biases, int64_t ng, int64_t G, int bits, float* out) {
  float acc[M] = {0};  // the scalar parts and the bias term
#ifdef QALORA_AVX2
  constexpr int A = M == 1 ? 4 : M == 2 ? 2 : 1;
  __m256 vacc[M][A];
  for (int m = 0; m < M; m++)
    for (int a = 0; a < A; a++) vacc[m][a] = _mm256_setzero_ps();
#endif
  for (int64_t g = 0; g < ng; g++) {
    const int64_t start = g * G, end = start + G < K ? start + G : K;
    const float s = scales[g];
    int64_t j = start;
#ifdef QALORA_AVX2
    if ((g & 7) == 0) prefetch_ahead(q, start, bits, scales + g, biases + g, G);
    if (start % 8 == 0) {
      const __m256 vs = _mm256_set1_ps(s);
      if (bits == 4) {
        for (; j + 32 <= end; j += 32) {
          __m256 c[4];
          decode32_4bit(q + j / 2, c);
          for (int k = 0; k < 4; k++) {
            const __m256 sc = _mm256_mul_ps(c[k], vs);
            for (int m = 0; m < M; m++)
              vacc[m][k % A] = _mm256_fmadd_ps(sc, _mm256_loadu_ps(x + m * K + j + 8 * k), vacc[m][k % A]);
          }
        }
      }
      for (; j + 8 <= end; j += 8) {
        const int64_t at = j / 8 * bits;
        const __m256 sc = _mm256_mul_ps(decode8(q + at, bits, at + 8 > row_bytes), vs);
        for (int m = 0; m < M; m++)
          vacc[m][0] = _mm256_fmadd_ps(sc, _mm256_loadu_ps(x + m * K + j), vacc[m][0]);
      }
    }
#endif
    float t[M] = {0};
    for (; j < end; j++) {  // columns the vector loop did not take
      const float c = (float)code_at(q, j, bits);
      for (int m = 0; m < M; m++) t[m] += x[m * K + j] * c;
    }
    for (int m = 0; m < M; m++) acc[m] += s * t[m] + biases[g] * xsum[m * ng + g];
  }
  for (int m = 0; m < M; m++) {
#ifdef QALORA_AVX2
    __m256 v = vacc[m][0];
    for (int a = 1; a < A; a++) v = _mm256_add_ps(v, vacc[m][a]);
    out[m] = acc[m] + hsum(v);
#else
    out[m] = acc[m];
#endif
  }
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                const at::Tensor& biases, int64_t bits, int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "gemv: x must be f32 [M, K]");
  TORCH_CHECK(x.size(0) <= MAX_M, "gemv: at most ", MAX_M, " rows, got ", x.size(0));
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous(), "gemv: qweight must be uint8");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && biases.scalar_type() == at::kFloat && scales.is_contiguous() &&
              biases.is_contiguous(), "gemv: scales and biases must be contiguous f32");
  TORCH_CHECK(bits >= 1 && bits <= 8, "gemv: bits must be 1..8");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0), ng = scales.size(1);
  const int64_t G = group_size;
  TORCH_CHECK(qweight.size(1) == (K * bits + 7) / 8 && scales.size(0) == N && biases.sizes() == scales.sizes() &&
              ng == (K + G - 1) / G, "gemv: shapes do not match");
  at::Tensor y = at::empty({M, N}, x.options());
  std::vector<float> xsum(M * ng, 0.f);  // the input's per-group sums, for the bias term
  const float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < M; m++)
    for (int64_t i = 0; i < K; i++) xsum[m * ng + i / G] += xp[m * K + i];
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  const float *sp = scales.data_ptr<float>(), *bp = biases.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t row_bytes = qweight.size(1);
#ifdef QALORA_AVX512
  const bool q4 = bits == 4 && (G == 32 || G % 64 == 0) && K % 64 == 0;
  const bool wide = !q4 && (bits == 4 || bits == 8) && G % 32 == 0 && K % 32 == 0;
  std::vector<float> xperm(q4 ? M * K : 0);  // x in row512_q4's column order
  if (q4)
    for (int64_t m = 0; m < M; m++)
      for (int64_t j = 0; j < K; j += 64)
        for (int64_t t = 0; t < 32; t++) {
          xperm[m * K + j + t] = xp[m * K + j + 2 * t];
          xperm[m * K + j + 32 + t] = xp[m * K + j + 2 * t + 1];
        }
#else
  const bool q4 = false, wide = false;
#endif
  const auto rows = [&](auto m_const) {
    constexpr int Mc = decltype(m_const)::value;
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      float out[Mc];
      for (int64_t o = begin; o < end; o++) {
#ifdef QALORA_AVX512
        if (q4) {
          row512_q4<Mc>(xperm.data(), K, xsum.data(), qp + o * row_bytes, sp + o * ng, bp + o * ng, ng, G, out);
          for (int m = 0; m < Mc; m++) yp[m * N + o] = out[m];
          continue;
        }
        if (wide) {
          row512<Mc>(xp, K, xsum.data(), qp + o * row_bytes, sp + o * ng, bp + o * ng, ng, G, (int)bits, out);
          for (int m = 0; m < Mc; m++) yp[m * N + o] = out[m];
          continue;
        }
#endif
        row<Mc>(xp, K, xsum.data(), qp + o * row_bytes, row_bytes, sp + o * ng, bp + o * ng, ng, G, (int)bits, out);
        for (int m = 0; m < Mc; m++) yp[m * N + o] = out[m];
      }
    });
  };
  switch (M) {
    case 1: rows(std::integral_constant<int, 1>()); break;
    case 2: rows(std::integral_constant<int, 2>()); break;
    case 3: rows(std::integral_constant<int, 3>()); break;
    case 4: rows(std::integral_constant<int, 4>()); break;
    case 5: rows(std::integral_constant<int, 5>()); break;
    case 6: rows(std::integral_constant<int, 6>()); break;
    case 7: rows(std::integral_constant<int, 7>()); break;
    case 8: rows(std::integral_constant<int, 8>()); break;
  }
  return y;
}

}  // namespace

TORCH_LIBRARY(qalora, m) {
  m.def("gemv(Tensor x, Tensor qweight, Tensor scales, Tensor biases, int bits, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(qalora, CPU, m) { m.impl("gemv", gemv); }
