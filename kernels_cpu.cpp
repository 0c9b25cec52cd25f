// The CPU GEMV of kernels.py: one pass over the packed codes of a quantized linear for a few rows of x.
//
//   y[m, o] = sum_g  scales[o, g] * sum_{i in g} x[m, i] * q[o, i]  +  biases[o, g] * sum_{i in g} x[m, i]
//
// Codes are the layout of kernels.pack: each row an LSB-first bit stream, code j at bits [j*b, (j+1)*b).
// 2-, 4- and 8-bit rows whose width is a multiple of 256 bits take the lane rows (codes decoded in 32- or
// 16-bit lanes by masks, each block's scales applied once; float32 x in float, bfloat16 x as 16-bit fixed
// point with integer multiply-adds: see "The lane rows" below). Other rows: 8 consecutive codes starting at a
// multiple of 8 are exactly b whole bytes, decoded to 8 floats (AVX2: one 64-bit load, two variable shifts; 4
// and 8 bits have their own shorter sequences) and multiplied into per-group accumulators, fp32 throughout;
// groups whose width is not a multiple of 8, and the last few columns of a row, take the scalar path. Threads
// (PyTorch's thread count, OpenMP) take chunks of output rows. The layer is read once per call whatever M is
// (M <= 8). decode_step, at the end, runs a whole stack of LLaMA blocks for one token on these rows.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cstdint>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define QALORA_AVX2 1
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
// at more bits, which the hardware prefetcher then follows). pf_groups = PF_COLS / G, computed once per row.
constexpr int64_t PF_COLS = 4096;
inline void prefetch_ahead(const uint8_t* q, int64_t col, int bits, const float* s, const float* b, int64_t pf_groups) {
  const char* p = (const char*)(q + (col + PF_COLS) * bits / 8);
  _mm_prefetch(p, _MM_HINT_T0);
  _mm_prefetch(p + 64, _MM_HINT_T0);
  _mm_prefetch((const char*)(s + pf_groups), _MM_HINT_T0);
  _mm_prefetch((const char*)(b + pf_groups), _MM_HINT_T0);
}
#endif

// Checks one quantized linear's tensors against an input width K.
void check_linear(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& biases, int64_t K,
                  int64_t bits, int64_t G) {
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kByte && qweight.is_contiguous(),
              "gemv: qweight must be uint8 [N, packed]");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && biases.scalar_type() == at::kFloat && scales.is_contiguous() &&
              biases.is_contiguous(), "gemv: scales and biases must be contiguous f32");
  TORCH_CHECK(bits >= 1 && bits <= 8 && G >= 1, "gemv: bits must be 1..8 and the group size positive");
  const int64_t N = qweight.size(0);
  TORCH_CHECK(qweight.size(1) == (K * bits + 7) / 8 && scales.dim() == 2 && scales.size(0) == N &&
              biases.sizes() == scales.sizes() && scales.size(1) == (K + G - 1) / G, "gemv: shapes do not match");
}

// A checked quantized linear as pointers and sizes: N rows of K codes of `bits` bits, ng groups of G.
struct Linear {
  const uint8_t* q;
  const float *s, *b;
  int64_t N, K, row_bytes, ng, bits, G;
  Linear(const at::Tensor& qw, const at::Tensor& sc, const at::Tensor& bi, int64_t K_, int64_t bits_, int64_t G_)
      : q(qw.data_ptr<uint8_t>()), s(sc.data_ptr<float>()), b(bi.data_ptr<float>()), N(qw.size(0)), K(K_),
        row_bytes(qw.size(1)), ng(sc.size(1)), bits(bits_), G(G_) {}
};

// The lane rows, for 2-, 4- and 8-bit codes (P = 32 / bits codes per 32-bit word). One 32-byte load holds
// B = 8P columns as 8 words; word d holds columns P*d .. P*d + P-1 of the block. Each lane's P columns lie in
// one group, so the block's sum of x * q stays in lanes and one FMA per block applies the scales: one
// broadcast scale when the block is inside one group (G a multiple of B), or the block's B/G scales spread
// over the lanes they cover (B a multiple of G). The bias term sum_g biases[g] * xsum[g] is a dot product
// over groups. Two ways to form the block's sum of x * q, no byte shuffles in either:
//
// - float32 x: masking all 8 words with the bits of code t, (2^bits - 1) << bits*t, leaves
//   q * 2^(bits*t) in every lane: converted to float that is exact, and x is read pre-multiplied by
//   2^-(bits*t), so each product is exactly x * q, rounded as usual (the top code is a shift instead: the
//   mask would take the sign bit). 8 codes cost one AND, one int-to-float conversion and one FMA.
// - bfloat16 x (Input::fixed): x as 16-bit integers n with one power-of-two factor f per block (x ~ f * n,
//   |n| < 2^15), and the codes in 16-bit lanes (P/2 a lane, code t masked to q * 2^(bits*t) as above):
//   one integer multiply-add (vpmaddwd) gives q * n for 16 codes, summed in pairs into the 32-bit lanes,
//   exact; shifted right by bits*t (exact: a multiple of 2^(bits*t)) and added, then one conversion and one
//   FMA per block. About half the vector instructions of the float row. A bf16 value has 8 significant bits,
//   so n holds every element within 2^-7 of its block's largest exactly; smaller ones are rounded to
//   2^-15 of the largest (an error at most that of rounding a 2^-7-of-the-largest element to bf16).
inline bool lanes_ok(int64_t bits, int64_t K, int64_t G) {
  if (bits != 2 && bits != 4 && bits != 8) return false;
  const int64_t P = 32 / bits, B = 8 * P;
  return K % B == 0 && (G % B == 0 || (B % G == 0 && G % P == 0));
}

// x [M, K] -> out [M, K] in lane order: per block of B = 8P columns, out[8t + d] = x[P*d + t] * 2^-(bits*t)
// (t < P-1; the top code's x is not scaled). A power of two: exact unless |x| < 2^-100 (subnormal).
inline void lane_order(const float* x, int64_t M, int64_t K, int64_t bits, float* out) {
  const int64_t P = 32 / bits, B = 8 * P;
  float f[16];
  for (int64_t t = 0; t < P; t++) f[t] = t < P - 1 ? std::ldexp(1.0f, -int(bits * t)) : 1.0f;
  for (int64_t m = 0; m < M; m++)
    for (int64_t j = 0; j < K; j += B)
      for (int64_t t = 0; t < P; t++)
        for (int64_t d = 0; d < 8; d++) out[m * K + j + 8 * t + d] = x[m * K + j + P * d + t] * f[t];
}

// x [M, K] -> n [M, K] int16 in 16-bit lane order and f [M, K / B], x ~ f * n per block of B = 8P columns:
// n[16t + l] = round(x[P/2 * l + t] / f), f the power of two that puts the block's largest |x| in [2^14, 2^15).
inline void fixed_order(const float* x, int64_t M, int64_t K, int64_t bits, int16_t* n, float* f) {
  const int64_t H = 16 / bits, B = 16 * H;  // H codes per 16-bit lane
  for (int64_t m = 0; m < M; m++)
    for (int64_t j = 0; j < K; j += B) {
      const float* xb = x + m * K + j;
      float mx = 0.f;
      for (int64_t i = 0; i < B; i++) mx = std::max(mx, std::fabs(xb[i]));
      int e = 0;
      std::frexp(mx, &e);  // mx < 2^e (mx = 0: e = 0)
      const float up = std::ldexp(1.0f, 15 - e);
      f[(m * K + j) / B] = std::ldexp(1.0f, e - 15);
      for (int64_t t = 0; t < H; t++)
        for (int64_t l = 0; l < 16; l++)
          n[m * K + j + 16 * t + l] = int16_t(std::min(32767.f, std::max(-32767.f, std::nearbyint(xb[H * l + t] * up))));
    }
}

// M rows of x as a linear's rows read them: their per-group sums (for the bias term) and, for the lane rows,
// x in lane order (float32) or as 16-bit fixed point (`fixed`: the caller's activations are bfloat16).
// Buffers are kept between set() calls.
struct Input {
  const float* x = nullptr;
  int64_t M = 0, K = 0, bits = 0, G = 0;
  bool lanes = false, fixed = false;
  std::vector<float> xsum, xl, xf;
  std::vector<int16_t> xn;
  void set(const float* x_, int64_t M_, const Linear& L, bool fixed_) {
    x = x_, M = M_, K = L.K, bits = L.bits, G = L.G;
    xsum.assign(M * L.ng, 0.f);
    for (int64_t m = 0; m < M; m++)
      for (int64_t g = 0; g < L.ng; g++)
        for (int64_t i = g * L.G; i < std::min(L.K, g * L.G + L.G); i++) xsum[m * L.ng + g] += x[m * L.K + i];
#ifdef QALORA_AVX2
    lanes = lanes_ok(L.bits, L.K, L.G);
    fixed = lanes && fixed_;
    if (fixed) xn.resize(M * L.K), xf.resize(M * L.K * L.bits / 256), fixed_order(x, M, L.K, L.bits, xn.data(), xf.data());
    else if (lanes) xl.resize(M * L.K), lane_order(x, M, L.K, L.bits, xl.data());
#endif
  }
};

// Does `in` (made for another linear from the same x) serve L as it is?
inline bool same_input(const Input& in, const Linear& L) { return in.K == L.K && in.bits == L.bits && in.G == L.G; }

#ifdef QALORA_AVX2
// tot's lanes plus the bias term sum_g biases[g] * xsum[g]
inline float row_total(__m256 tot, const float* bo, const float* xsum, int64_t ng) {
  __m256 bt = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= ng; g += 8) bt = _mm256_fmadd_ps(_mm256_loadu_ps(bo + g), _mm256_loadu_ps(xsum + g), bt);
  float rest = 0.f;
  for (; g < ng; g++) rest += bo[g] * xsum[g];
  return rest + hsum(_mm256_add_ps(tot, bt));
}

// The block's NSC = B/G scales (NSC > 1: G divides B) spread over its 8 lanes: lane d covers group d*NSC/8.
template <int NSC>
inline __m256 block_scales(const float* s) {
  static_assert(NSC == 2 || NSC == 4 || NSC == 8, "NSC is 2, 4 or 8");
  if constexpr (NSC == 8) return _mm256_loadu_ps(s);
  const __m256i lane_group = NSC == 2 ? _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1) : _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
  const __m256 v = NSC == 2 ? _mm256_castpd_ps(_mm256_broadcast_sd((const double*)s))
                            : _mm256_castps128_ps256(_mm_loadu_ps(s));  // reads exactly NSC floats
  return _mm256_permutevar8x32_ps(v, lane_group);
}

// Rows [o0, o1) of y for M rows of x from row m0 of `in`: FIXED = in.fixed (x as 16-bit fixed point), else
// float32 x in lane order. The two differ only in how a block's sum of x * q is formed. The scale layout is a
// compile-time case, so the block loop has no branches but the prefetch's: one broadcast scale per group when
// a group spans whole blocks (NSC = 1: the loop runs group by group), else B/G scales per block.
template <int BITS, int M, bool FIXED>
void rows_lanes(const Input& in, int64_t m0, const Linear& L, int64_t o0, int64_t o1, float* y) {
  constexpr int P = 32 / BITS, B = 8 * P, H = P / 2;  // H codes per 16-bit lane
  const int64_t K = L.K, ng = L.ng, nb = K / B, G = L.G, pf_groups = PF_COLS / G;
  const float* xl = FIXED ? nullptr : in.xl.data() + m0 * K;
  const int16_t* xn = FIXED ? in.xn.data() + m0 * K : nullptr;
  const float* xf = FIXED ? in.xf.data() + m0 * nb : nullptr;
  __m256i mask[P];  // code t's bits in every 32-bit lane (float), or in every 16-bit lane (fixed: t < H)
  for (int t = 0; t < P; t++)
    mask[t] = FIXED ? _mm256_set1_epi16(int16_t(((1u << BITS) - 1) << (BITS * (t % H))))
                    : _mm256_set1_epi32(int32_t(((1u << BITS) - 1) << (BITS * t)));
  // tot[m] += sv * (the block at column j's x * q, in lanes)
  const auto block = [&](const uint8_t* qo, int64_t j, __m256 sv, __m256* tot) __attribute__((always_inline)) {
    const __m256i raw = _mm256_loadu_si256((const __m256i*)(qo + j / 8 * BITS));
    if constexpr (FIXED) {
      __m256i acc[M];
#pragma GCC unroll 16
      for (int t = 0; t < H; t++) {  // code t of each 16-bit lane, times 2^(bits*t)
        const __m256i ct = t < H - 1 ? _mm256_and_si256(raw, mask[t]) : _mm256_srli_epi16(raw, BITS * t);
        for (int m = 0; m < M; m++) {
          __m256i p = _mm256_madd_epi16(ct, _mm256_loadu_si256((const __m256i*)(xn + m * K + j + 16 * t)));
          if (t > 0 && t < H - 1) p = _mm256_srai_epi32(p, BITS * t);
          acc[m] = t == 0 ? p : _mm256_add_epi32(acc[m], p);
        }
      }
      for (int m = 0; m < M; m++)
        tot[m] = _mm256_fmadd_ps(_mm256_mul_ps(sv, _mm256_broadcast_ss(xf + m * nb + j / B)),
                                 _mm256_cvtepi32_ps(acc[m]), tot[m]);
    } else {
      constexpr int A = M == 1 ? 2 : 1;  // FMA chains per row of x (more rows are more chains)
      __m256 acc[M][A];
#pragma GCC unroll 16
      for (int t = 0; t < P; t++) {  // code t of each 32-bit lane, times 2^(bits*t)
        const __m256i ct = t < P - 1 ? _mm256_and_si256(raw, mask[t]) : _mm256_srli_epi32(raw, BITS * t);
        const __m256 c = _mm256_cvtepi32_ps(ct);
        for (int m = 0; m < M; m++) {
          const __m256 xv = _mm256_loadu_ps(xl + m * K + j + 8 * t);
          acc[m][t % A] = t < A ? _mm256_mul_ps(c, xv) : _mm256_fmadd_ps(c, xv, acc[m][t % A]);
        }
      }
      for (int m = 0; m < M; m++)
        tot[m] = _mm256_fmadd_ps(sv, A == 1 ? acc[m][0] : _mm256_add_ps(acc[m][0], acc[m][A - 1]), tot[m]);
    }
  };
  const auto rows = [&](auto nsc) {
    constexpr int NSC = decltype(nsc)::value;
    for (int64_t o = o0; o < o1; o++) {
      const uint8_t* qo = L.q + o * L.row_bytes;
      const float *so = L.s + o * ng, *bo = L.b + o * ng;
      __m256 tot[M];
      for (int m = 0; m < M; m++) tot[m] = _mm256_setzero_ps();
      if constexpr (NSC == 1) {
        for (int64_t g = 0, j = 0; g < ng; g++) {
          const __m256 sv = _mm256_broadcast_ss(so + g);
          for (const int64_t end = std::min(j + G, K); j < end; j += B) {
            if ((j & 255) == 0) prefetch_ahead(qo, j, BITS, so + g, bo + g, pf_groups);
            block(qo, j, sv, tot);
          }
        }
      } else {
        for (int64_t j = 0, g = 0; j < K; j += B, g += NSC) {
          if ((j & 255) == 0) prefetch_ahead(qo, j, BITS, so + g, bo + g, pf_groups);
          block(qo, j, block_scales<NSC>(so + g), tot);
        }
      }
      for (int m = 0; m < M; m++) y[m * L.N + o] = row_total(tot[m], bo, in.xsum.data() + (m0 + m) * ng, ng);
    }
  };
  switch (G % B == 0 ? 1 : B / G) {
    case 1: rows(std::integral_constant<int, 1>()); break;
    case 2: rows(std::integral_constant<int, 2>()); break;
    case 4: rows(std::integral_constant<int, 4>()); break;
    default: rows(std::integral_constant<int, 8>()); break;
  }
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
  const int64_t pf_groups = PF_COLS / G;
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
    if ((g & 7) == 0) prefetch_ahead(q, start, bits, scales + g, biases + g, pf_groups);
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

// Output rows [o0, o1) of y [M, N] = x @ w~^T.
template <int M>
void rows_of(const Input& in, const Linear& L, int64_t o0, int64_t o1, float* y) {
#ifdef QALORA_AVX2
  if (in.lanes) {
    // at most 4 rows of x a pass (more accumulators spill out of the 16 vector registers); the second pass
    // rereads 16 rows' codes from L1
    const auto run = [&](auto bits_const) {
      constexpr int BITS = decltype(bits_const)::value, M1 = M < 4 ? M : 4;
      const auto pass = in.fixed ? rows_lanes<BITS, M1, true> : rows_lanes<BITS, M1, false>;
      for (int64_t a = o0; a < o1; a += 16) {
        const int64_t b = std::min(a + 16, o1);
        pass(in, 0, L, a, b, y);
        if constexpr (M > 4) (in.fixed ? rows_lanes<BITS, M - 4, true> : rows_lanes<BITS, M - 4, false>)(in, 4, L, a, b, y + 4 * L.N);
      }
    };
    if (L.bits == 2) run(std::integral_constant<int, 2>());
    else if (L.bits == 4) run(std::integral_constant<int, 4>());
    else run(std::integral_constant<int, 8>());
    return;
  }
#endif
  float out[M];
  for (int64_t o = o0; o < o1; o++) {
    row<M>(in.x, L.K, in.xsum.data(), L.q + o * L.row_bytes, L.row_bytes, L.s + o * L.ng, L.b + o * L.ng, L.ng,
           L.G, (int)L.bits, out);
    for (int m = 0; m < M; m++) y[m * L.N + o] = out[m];
  }
}

void gemv_rows(const Input& in, const Linear& L, int64_t o0, int64_t o1, float* y) {
  switch (in.M) {
    case 1: rows_of<1>(in, L, o0, o1, y); break;
    case 2: rows_of<2>(in, L, o0, o1, y); break;
    case 3: rows_of<3>(in, L, o0, o1, y); break;
    case 4: rows_of<4>(in, L, o0, o1, y); break;
    case 5: rows_of<5>(in, L, o0, o1, y); break;
    case 6: rows_of<6>(in, L, o0, o1, y); break;
    case 7: rows_of<7>(in, L, o0, o1, y); break;
    case 8: rows_of<8>(in, L, o0, o1, y); break;
  }
}

// y [M, N] float32 = x [M, K] @ w~^T; x float32, or bfloat16 (read as 16-bit fixed point by the lane rows)
at::Tensor gemv(const at::Tensor& x_, const at::Tensor& qweight, const at::Tensor& scales,
                const at::Tensor& biases, int64_t bits, int64_t group_size) {
  const bool bf16 = x_.scalar_type() == at::kBFloat16;
  TORCH_CHECK(x_.dim() == 2 && (x_.scalar_type() == at::kFloat || bf16) && x_.is_contiguous(),
              "gemv: x must be contiguous f32 or bf16 [M, K]");
  TORCH_CHECK(x_.size(0) <= MAX_M, "gemv: at most ", MAX_M, " rows, got ", x_.size(0));
  check_linear(qweight, scales, biases, x_.size(1), bits, group_size);
  const at::Tensor x = x_.to(at::kFloat);
  at::Tensor y = at::empty({x.size(0), qweight.size(0)}, x.options());
  const Linear L(qweight, scales, biases, x.size(1), bits, group_size);
  Input in;
  in.set(x.data_ptr<float>(), x.size(0), L, bf16);
  float* yp = y.data_ptr<float>();
  // Threads take chunks of rows as they finish (a shared VM's second core is sometimes much slower: static
  // halves then wait for it): about 256 KB of weights a chunk, the count a multiple of the threads so that
  // equal cores share evenly; a small layer is one chunk a thread.
  const int64_t nt = at::get_num_threads(), bytes = L.N * (L.row_bytes + 8 * L.ng);
  const int64_t n_chunks = nt * std::max<int64_t>(1, (bytes + nt * (256 << 10) - 1) / (nt * (256 << 10)));
  const int64_t rows = (L.N + n_chunks - 1) / n_chunks;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt) if (nt > 1 && n_chunks > 1)
  for (int64_t c = 0; c < n_chunks; c++) gemv_rows(in, L, c * rows, std::min(L.N, c * rows + rows), yp);
  return y;
}

// -----------------------------------------------------------------------------
// w~ = scales * q + biases for the dequantize-then-BLAS path of kernels.py (prefill, evaluation, training), in
// its "planes" column order: P uint8 [N, ng, G/c] holds c = 8/e codes a byte (e = 2, 4 or 8 bits, LSB first),
// and column g*G + t*(G/c) + j of the output is code c*j + t of group g: plane t of a group is the t-th code
// of each of its bytes, a contiguous run. 8 outputs cost one byte-to-int widening, a shift, an AND, one
// conversion and one FMA; the whole is bound by writing 4 bytes a weight.
at::Tensor dequant(const at::Tensor& P, const at::Tensor& scales, const at::Tensor& biases, int64_t e) {
  TORCH_CHECK(P.dim() == 3 && P.scalar_type() == at::kByte && P.is_contiguous(), "dequant: codes must be uint8 [N, ng, G/c]");
  TORCH_CHECK(e == 2 || e == 4 || e == 8, "dequant: 2, 4 or 8 bits a code");
  const int64_t N = P.size(0), ng = P.size(1), Gc = P.size(2), c = 8 / e, G = Gc * c;
  TORCH_CHECK(scales.scalar_type() == at::kFloat && biases.scalar_type() == at::kFloat && scales.is_contiguous() &&
              biases.is_contiguous() && scales.dim() == 2 && scales.size(0) == N && scales.size(1) == ng &&
              biases.sizes() == scales.sizes(), "dequant: scales and biases must be contiguous f32 [N, ng]");
  at::Tensor out = at::empty({N, ng * G}, scales.options());
  const uint8_t* pp = P.data_ptr<uint8_t>();
  const float *sp = scales.data_ptr<float>(), *bp = biases.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const uint32_t mask = (1u << e) - 1;
  at::parallel_for(0, N * ng, 64, [&](int64_t begin, int64_t end) {
    for (int64_t rg = begin; rg < end; rg++) {  // one (row, group)
      const uint8_t* q = pp + rg * Gc;
      const float s = sp[rg], b = bp[rg];
      for (int64_t t = 0; t < c; t++) {
        float* o = op + rg * G + t * Gc;
        int64_t j = 0;
#ifdef QALORA_AVX2
        const __m256 vs = _mm256_set1_ps(s), vb = _mm256_set1_ps(b);
        const __m256i vm = _mm256_set1_epi32(int32_t(mask));
        for (; j + 8 <= Gc; j += 8) {
          const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(q + j)));
          const __m256i code = _mm256_and_si256(_mm256_srli_epi32(v, int(e * t)), vm);
          _mm256_storeu_ps(o + j, _mm256_fmadd_ps(vs, _mm256_cvtepi32_ps(code), vb));
        }
#endif
        for (; j < Gc; j++) o[j] = std::fma(s, float((q[j] >> (e * t)) & mask), b);
      }
    }
  });
  return out;
}

// -----------------------------------------------------------------------------
// One decode step of a stack of LLaMA blocks for one token (model.Block with a KV cache and no mask), as one
// call. Per block:
//
//   a = rmsnorm(h) * w1;  q, k, v = a @ Wq^T, a @ Wk^T, a @ Wv^T;  rope(q), rope(k)  (HF rotate_half)
//   cache[pos] = k, v;  y = softmax(q k^T / sqrt(hd)) v  per head (grouped-query: head i reads kv head
//   i / (H / KV));  h1 = h + y @ Wo^T;  b = rmsnorm(h1) * w2;  h = h1 + (silu(b Wg^T) * (b Wu^T)) @ Wd^T
//
// The linears are the gemv above. T is the activations' storage type (float or bfloat16): values are rounded
// to T where model.py's ops store them (after each norm, linear, rope, attention, product and residual
// sum), the arithmetic is fp32 (bf16: the gemv's fixed-point rows). The whole stack runs in one parallel
// region: the threads share each linear's rows, each a contiguous run of them (one sequential stream per
// thread, which the prefetchers follow; q, k and v as one list, gate and up side by side), then the heads;
// between them a barrier. The small
// serial parts (norms, residual sums) every thread computes for itself, identically. generate.py calls this
// once per token: a call per block (or a compiled graph per block) costs more in Python, dispatch and
// thread wake-ups than the block's arithmetic besides the linears.
template <class T>
inline float rnd(float v) { return float(T(v)); }  // v stored as T and read back

template <class T>
void rmsnorm(const float* x, const T* w, int64_t n, double eps, float* out) {
  double ss = 0;
  for (int64_t i = 0; i < n; i++) ss += double(x[i]) * x[i];
  const float r = 1.0f / std::sqrt(float(ss / n) + float(eps));
  for (int64_t i = 0; i < n; i++) out[i] = rnd<T>(float(w[i]) * rnd<T>(x[i] * r));
}

// One head's rope, in place (x [hd]; cos, sin [hd]).
template <class T>
void rope(float* v, int64_t hd, const T* cos, const T* sin) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; i++) {
    const float x1 = v[i], x2 = v[i + half];
    v[i] = rnd<T>(rnd<T>(x1 * float(cos[i])) + rnd<T>(-x2 * float(sin[i])));
    v[i + half] = rnd<T>(rnd<T>(x2 * float(cos[i + half])) + rnd<T>(x1 * float(sin[i + half])));
  }
}

#ifdef QALORA_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {  // bf16 is the top half of an fp32
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
#endif

template <class T>
float dot(const float* a, const T* b, int64_t n) {
  int64_t i = 0;
  float tot = 0.f;
#ifdef QALORA_AVX2
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), s0);
  tot = hsum(_mm256_add_ps(s0, s1));
#endif
  for (; i < n; i++) tot += a[i] * float(b[i]);
  return tot;
}

template <class T>
void axpy(float w, const T* v, float* y, int64_t n) {  // y += w * v
  int64_t i = 0;
#ifdef QALORA_AVX2
  const __m256 wv = _mm256_set1_ps(w);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(wv, load8(v + i), _mm256_loadu_ps(y + i)));
#endif
  for (; i < n; i++) y[i] += w * float(v[i]);
}

// The tensors of L blocks: norms [2L] (input, post-attention), caches [2L] (k, v: [1, KV, S, hd]), linears
// [7L] (q, k, v, o, gate, up, down). A norm after the last pair is the model's final norm, applied to the output.
template <class T>
void decode_step_impl(const at::Tensor& h, at::TensorList norms, at::TensorList caches,
                      const std::vector<Linear>& lins, const at::Tensor& cos, const at::Tensor& sin, double eps,
                      int64_t pos, int64_t H, at::Tensor& out) {
  const int64_t L = norms.size() / 2, dim = h.numel(), KV = caches[0].size(1), S = caches[0].size(2);
  const int64_t hd = caches[0].size(3), hidden = lins[4].N, qn = H * hd, kvn = KV * hd, rep = H / KV;
  constexpr int64_t CH = 16;  // rows per work item
  std::vector<float> qkv(qn + 2 * kvn), y(qn), o(dim), g(hidden), u(hidden);  // shared between the threads
  const T *hp = h.data_ptr<T>(), *cp = cos.data_ptr<T>(), *sp = sin.data_ptr<T>();
  const float scale = 1.0f / std::sqrt(float(hd));
  const auto chunks = [](int64_t n) { return (n + CH - 1) / CH; };
  constexpr bool fixed = std::is_same<T, c10::BFloat16>::value;  // bf16 activations: the 16-bit fixed-point rows
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> x(dim), a(dim), p(pos + 1), qh(hd), kh(hd);
    Input in[3];
    for (int64_t i = 0; i < dim; i++) x[i] = float(hp[i]);
    for (int64_t l = 0; l < L; l++) {
      const Linear* W = lins.data() + 7 * l;
      T *ck = caches[2 * l].data_ptr<T>(), *cv = caches[2 * l + 1].data_ptr<T>();  // [1, KV, S, hd], row 0
      rmsnorm<T>(x.data(), norms[2 * l].data_ptr<T>(), dim, eps, a.data());
      in[0].set(a.data(), 1, W[0], fixed);  // k and v read a the way q does (same bits and groups), else their own
      const Input& ik = same_input(in[0], W[1]) ? in[0] : (in[1].set(a.data(), 1, W[1], fixed), in[1]);
      const Input& iv = same_input(in[0], W[2]) ? in[0] : (in[2].set(a.data(), 1, W[2], fixed), in[2]);
      const Input* qkv_in[3] = {&in[0], &ik, &iv};
      const int64_t cq = chunks(W[0].N), ckv = chunks(W[1].N);
#pragma omp for schedule(static)
      for (int64_t c = 0; c < cq + 2 * ckv; c++) {  // the rows of q, k and v as one list
        const int i = c < cq ? 0 : c < cq + ckv ? 1 : 2;
        const int64_t o0 = (c - (i == 0 ? 0 : cq + (i - 1) * ckv)) * CH, o1 = std::min(o0 + CH, W[i].N);
        float* dst = qkv.data() + (i == 0 ? 0 : qn + (i - 1) * kvn);
        gemv_rows(*qkv_in[i], W[i], o0, o1, dst);
        for (int64_t r = o0; r < o1; r++) dst[r] = rnd<T>(dst[r]);
      }
#pragma omp for schedule(static)
      for (int64_t hh = 0; hh < H; hh++) {  // attention, one head per item
        const int64_t j = hh / rep;
        const float *kj = qkv.data() + qn + j * hd, *vj = qkv.data() + qn + kvn + j * hd;
        std::copy(kj, kj + hd, kh.begin());
        rope<T>(kh.data(), hd, cp, sp);
        if (hh % rep == 0)  // the first head of a group stores its kv head's k, v (read from the next token on)
          for (int64_t i = 0; i < hd; i++) ck[(j * S + pos) * hd + i] = T(kh[i]), cv[(j * S + pos) * hd + i] = T(vj[i]);
        std::copy(qkv.data() + hh * hd, qkv.data() + (hh + 1) * hd, qh.begin());
        rope<T>(qh.data(), hd, cp, sp);
        float mx = -INFINITY;
        for (int64_t s = 0; s <= pos; s++) {
          p[s] = (s < pos ? dot(qh.data(), ck + (j * S + s) * hd, hd) : dot(qh.data(), kh.data(), hd)) * scale;
          mx = std::max(mx, p[s]);
        }
        float tot = 0.f;
        for (int64_t s = 0; s <= pos; s++) tot += (p[s] = std::exp(p[s] - mx));
        float* yh = y.data() + hh * hd;
        std::fill(yh, yh + hd, 0.f);
        for (int64_t s = 0; s < pos; s++) axpy(p[s] / tot, cv + (j * S + s) * hd, yh, hd);
        axpy(p[pos] / tot, vj, yh, hd);
        for (int64_t i = 0; i < hd; i++) yh[i] = rnd<T>(yh[i]);
      }
      in[0].set(y.data(), 1, W[3], fixed);
#pragma omp for schedule(static)
      for (int64_t c = 0; c < chunks(dim); c++) gemv_rows(in[0], W[3], c * CH, std::min(c * CH + CH, dim), o.data());
      for (int64_t i = 0; i < dim; i++) x[i] = rnd<T>(x[i] + rnd<T>(o[i]));  // h1
      rmsnorm<T>(x.data(), norms[2 * l + 1].data_ptr<T>(), dim, eps, a.data());
      in[0].set(a.data(), 1, W[4], fixed);
      const Input& iu = same_input(in[0], W[5]) ? in[0] : (in[1].set(a.data(), 1, W[5], fixed), in[1]);
#pragma omp for schedule(static)
      for (int64_t c = 0; c < chunks(hidden); c++) {  // gate and up rows side by side, then silu(gate) * up
        const int64_t o0 = c * CH, o1 = std::min(o0 + CH, hidden);
        gemv_rows(in[0], W[4], o0, o1, g.data());
        gemv_rows(iu, W[5], o0, o1, u.data());
        for (int64_t r = o0; r < o1; r++) {
          const float gr = rnd<T>(g[r]);
          g[r] = rnd<T>(rnd<T>(gr / (1.0f + std::exp(-gr))) * rnd<T>(u[r]));
        }
      }
      in[0].set(g.data(), 1, W[6], fixed);
#pragma omp for schedule(static)
      for (int64_t c = 0; c < chunks(dim); c++) gemv_rows(in[0], W[6], c * CH, std::min(c * CH + CH, dim), o.data());
      for (int64_t i = 0; i < dim; i++) x[i] = rnd<T>(x[i] + rnd<T>(o[i]));
      // no barrier: the next write to o (the next block's o projection) is two barriers away
    }
#pragma omp single
    {
      if (norms.size() > 2 * L) rmsnorm<T>(x.data(), norms[2 * L].data_ptr<T>(), dim, eps, a.data()), x.swap(a);
      T* op = out.data_ptr<T>();
      for (int64_t i = 0; i < dim; i++) op[i] = T(x[i]);
    }
  }
}

at::Tensor decode_step(const at::Tensor& h, at::TensorList norms, at::TensorList caches, at::TensorList qweights,
                       at::TensorList scales, at::TensorList biases, at::IntArrayRef bits, at::IntArrayRef groups,
                       const at::Tensor& cos, const at::Tensor& sin, double eps, int64_t pos, int64_t n_heads) {
  const auto T = h.scalar_type();
  TORCH_CHECK(T == at::kFloat || T == at::kBFloat16, "decode_step: activations must be float32 or bfloat16");
  TORCH_CHECK(h.is_contiguous() && h.size(0) == 1, "decode_step: one contiguous row of activations");
  const int64_t L = norms.size() / 2;
  TORCH_CHECK(L >= 1 && norms.size() <= 2 * L + 1 && caches.size() == 2 * L,
              "decode_step: two norms and two caches a block (and optionally the final norm)");
  TORCH_CHECK(qweights.size() == 7 * L && scales.size() == 7 * L && biases.size() == 7 * L && bits.size() == 7 * L &&
              groups.size() == 7 * L, "decode_step: seven linears a block (q, k, v, o, gate, up, down)");
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->scalar_type() == T && t->is_contiguous(), "decode_step: rope must be contiguous ", T);
  for (const auto& t : norms)
    TORCH_CHECK(t.scalar_type() == T && t.is_contiguous(), "decode_step: norms must be contiguous ", T);
  const at::Tensor& c0 = caches[0];
  TORCH_CHECK(c0.dim() == 4 && c0.size(0) >= 1, "decode_step: caches must be [B, KV, S, head_dim]");
  for (const auto& t : caches)
    TORCH_CHECK(t.scalar_type() == T && t.is_contiguous() && t.sizes() == c0.sizes(),
                "decode_step: caches must be contiguous ", T, " of one shape");
  const int64_t dim = h.numel(), KV = c0.size(1), hd = c0.size(3), H = n_heads;
  TORCH_CHECK(H >= 1 && H % KV == 0 && hd % 2 == 0 && cos.numel() == hd && sin.numel() == hd && pos >= 0 &&
              pos < c0.size(2), "decode_step: shapes do not match");
  const int64_t hidden = qweights[4].size(0);
  const int64_t in_f[7] = {dim, dim, dim, H * hd, dim, dim, hidden};
  const int64_t out_f[7] = {H * hd, KV * hd, KV * hd, dim, hidden, hidden, dim};
  std::vector<Linear> lins;
  for (const auto& t : norms) TORCH_CHECK(t.numel() == dim, "decode_step: a norm has the wrong size");
  for (int64_t l = 0; l < L; l++) {
    for (int i = 0; i < 7; i++) {
      const int64_t k = 7 * l + i;
      check_linear(qweights[k], scales[k], biases[k], in_f[i], bits[k], groups[k]);
      TORCH_CHECK(qweights[k].size(0) == out_f[i], "decode_step: linear ", i, " of block ", l, " has ",
                  qweights[k].size(0), " rows, not ", out_f[i]);
      lins.emplace_back(qweights[k], scales[k], biases[k], in_f[i], bits[k], groups[k]);
    }
  }
  at::Tensor out = at::empty_like(h);
  if (T == at::kFloat)
    decode_step_impl<float>(h, norms, caches, lins, cos, sin, eps, pos, H, out);
  else
    decode_step_impl<c10::BFloat16>(h, norms, caches, lins, cos, sin, eps, pos, H, out);
  return out;
}

}  // namespace

TORCH_LIBRARY(qalora, m) {
  m.def("gemv(Tensor x, Tensor qweight, Tensor scales, Tensor biases, int bits, int group_size) -> Tensor");
  m.def("dequant(Tensor planes, Tensor scales, Tensor biases, int e) -> Tensor");
  m.def("decode_step(Tensor h, Tensor[] norms, Tensor(a!)[] caches, Tensor[] qweights, Tensor[] scales, "
        "Tensor[] biases, int[] bits, int[] groups, Tensor cos, Tensor sin, float eps, int pos, int n_heads) -> Tensor");
}

TORCH_LIBRARY_IMPL(qalora, CPU, m) {
  m.impl("gemv", gemv);
  m.impl("dequant", dequant);
  m.impl("decode_step", decode_step);
}
