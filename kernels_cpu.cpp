// The CPU GEMV of kernels.py: one pass over the packed codes of a quantized linear for a few rows of x.
//
//   y[m, o] = sum_g  scales[o, g] * sum_{i in g} x[m, i] * q[o, i]  +  biases[o, g] * sum_{i in g} x[m, i]
//
// Codes are the layout of kernels.pack: each row an LSB-first bit stream, code j at bits [j*b, (j+1)*b).
// So 8 consecutive codes starting at a multiple of 8 are exactly b whole bytes; they are decoded to 8 floats
// (AVX2: one 64-bit load, two variable shifts; 4 and 8 bits have their own shorter sequences) and
// multiplied into per-group accumulators, fp32 throughout. 2-, 4- and 8-bit rows whose width is a multiple
// of 256 bits take the lane row instead (row_lanes: codes decoded in 32-bit lanes by shifts and masks, each
// block's scales applied once). Groups whose width is not a multiple of 8, and
// the last few columns of a row, take the scalar path. Threads split the output rows (at::parallel_for:
// PyTorch's own thread pool and thread count). The layer is read once per call whatever M is (M <= 8).
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

#ifdef QALORA_AVX2
// The lane row, for 2-, 4- and 8-bit codes (P = 32 / bits codes per 32-bit word). One 32-byte load holds
// B = 8P columns as 8 words; word d holds columns P*d .. P*d + P-1 of the block. Masking all 8 words with
// the bits of code t, (2^bits - 1) << bits*t, leaves q * 2^(bits*t) in every lane: converted to float that is
// exact, and x is read pre-multiplied by 2^-(bits*t), so each product is exactly x * q, rounded as usual
// (the top code, t = P-1, is a shift instead: the mask would take the sign bit). So 8 codes cost one AND,
// one int-to-float conversion and one FMA, with no byte shuffles (which limited the byte-unpacking decode).
// x is read in that order and scaling, made once per call (lane_order). Each lane's P columns lie in one
// group, so the block's sum of x * q stays in lanes and one FMA per block applies the scales: one broadcast
// scale when the block is inside one group (G a multiple of B), or the block's B/G scales spread over the
// lanes they cover (B a multiple of G). The bias term sum_g biases[g] * xsum[g] is a dot product over groups.
inline bool lanes_ok(int64_t bits, int64_t K, int64_t G) {
  if (bits != 2 && bits != 4 && bits != 8) return false;
  const int64_t P = 32 / bits, B = 8 * P;
  return K % B == 0 && (G % B == 0 || (B % G == 0 && G % P == 0));
}

// x [M, K] -> out [M, K] in lane order: per block of B = 8P columns, out[8t + d] = x[P*d + t] * 2^-(bits*t)
// (t < P-1; the top code's x is not scaled). A power of two: exact unless |x| < 2^-100 (subnormal).
inline void lane_order(const float* x, int64_t M, int64_t K, int64_t bits, float* out) {
  const int64_t P = 32 / bits, B = 8 * P;
  for (int64_t m = 0; m < M; m++)
    for (int64_t j = 0; j < K; j += B)
      for (int64_t t = 0; t < P; t++) {
        const float f = t < P - 1 ? std::ldexp(1.0f, -int(bits * t)) : 1.0f;
        for (int64_t d = 0; d < 8; d++) out[m * K + j + 8 * t + d] = x[m * K + j + P * d + t] * f;
      }
}

// Rows [o0, o1) of the output for M rows of x; the per-call setup is made once for all of them.
template <int BITS, int M>
void rows_lanes(const float* xl, int64_t K, const float* xsum, const uint8_t* q, int64_t row_bytes,
                const float* scales, const float* biases, int64_t ng, int64_t G, int64_t o0, int64_t o1,
                float* y, int64_t N) {
  constexpr int P = 32 / BITS, B = 8 * P;
  const bool one_group = G % B == 0;
  // B a multiple of G: lane d is in the block's group d*P/G; the first B/G lanes load the block's scales
  alignas(32) int32_t idx[8], take[8];
  for (int d = 0; d < 8; d++) idx[d] = one_group ? 0 : d * P / G, take[d] = one_group || d < B / G ? -1 : 0;
  const __m256i vidx = _mm256_load_si256((const __m256i*)idx), vtake = _mm256_load_si256((const __m256i*)take);
  // the block's first group g, advanced without a division: by B/G a block, or by 1 every G/B blocks
  const int64_t pf_groups = PF_COLS / G, per_group = one_group ? G / B : 1, step = one_group ? 1 : B / G;
  for (int64_t o = o0; o < o1; o++) {
    const uint8_t* qo = q + o * row_bytes;
    const float *so = scales + o * ng, *bo = biases + o * ng;
    __m256 tot[M][2];  // two totals per row of x (even and odd blocks: two FMA chains)
    for (int m = 0; m < M; m++) tot[m][0] = tot[m][1] = _mm256_setzero_ps();
    for (int64_t j = 0, n = 0, g = 0, k = 0; j < K; j += B, n++) {
      if ((j & 255) == 0) prefetch_ahead(qo, j, BITS, so + g, bo + g, pf_groups);
      const __m256i raw = _mm256_loadu_si256((const __m256i*)(qo + j / 8 * BITS));
      __m256 acc[M][2];
      for (int m = 0; m < M; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
      for (int t = 0; t < P; t++) {  // code t of each lane, times 2^(bits*t)
        const __m256i ct = t < P - 1 ? _mm256_and_si256(raw, _mm256_set1_epi32(((1 << BITS) - 1) << (BITS * t)))
                                     : _mm256_srli_epi32(raw, BITS * t);
        const __m256 c = _mm256_cvtepi32_ps(ct);
        for (int m = 0; m < M; m++)
          acc[m][t & 1] = _mm256_fmadd_ps(c, _mm256_loadu_ps(xl + m * K + j + 8 * t), acc[m][t & 1]);
      }
      const __m256 sv = one_group ? _mm256_set1_ps(so[g])
                                  : _mm256_permutevar8x32_ps(_mm256_maskload_ps(so + g, vtake), vidx);
      for (int m = 0; m < M; m++)
        tot[m][n & 1] = _mm256_fmadd_ps(sv, _mm256_add_ps(acc[m][0], acc[m][1]), tot[m][n & 1]);
      if (++k == per_group) k = 0, g += step;
    }
    for (int m = 0; m < M; m++) {
      __m256 bt = _mm256_setzero_ps();
      int64_t g = 0;
      for (; g + 8 <= ng; g += 8)
        bt = _mm256_fmadd_ps(_mm256_loadu_ps(bo + g), _mm256_loadu_ps(xsum + m * ng + g), bt);
      float rest = 0.f;
      for (; g < ng; g++) rest += bo[g] * xsum[m * ng + g];
      y[m * N + o] = rest + hsum(_mm256_add_ps(_mm256_add_ps(tot[m][0], tot[m][1]), bt));
    }
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

// y [M, N] = x [M, K] @ w~^T for the checked linear (qweight, scales, biases): the whole gemv on pointers.
void gemv_into(const float* xp, int64_t M, int64_t K, const at::Tensor& qweight, const at::Tensor& scales,
               const at::Tensor& biases, int64_t bits, int64_t G, float* yp) {
  const int64_t N = qweight.size(0), ng = scales.size(1);
  std::vector<float> xsum(M * ng, 0.f);  // the input's per-group sums, for the bias term
  for (int64_t m = 0; m < M; m++)
    for (int64_t g = 0; g < ng; g++)
      for (int64_t i = g * G; i < std::min(K, g * G + G); i++) xsum[m * ng + g] += xp[m * K + i];
  const uint8_t* qp = qweight.data_ptr<uint8_t>();
  const float *sp = scales.data_ptr<float>(), *bp = biases.data_ptr<float>();
  const int64_t row_bytes = qweight.size(1);
#ifdef QALORA_AVX2
  const bool lanes = lanes_ok(bits, K, G);
#else
  const bool lanes = false;
#endif
  std::vector<float> xlanes(lanes ? M * K : 0);  // x in the lane row's column order
#ifdef QALORA_AVX2
  if (lanes) lane_order(xp, M, K, bits, xlanes.data());
#endif
  const auto rows = [&](auto m_const) {
    constexpr int Mc = decltype(m_const)::value;
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
#ifdef QALORA_AVX2
      if (lanes) {
        const float* xl = xlanes.data();
        if (bits == 2) rows_lanes<2, Mc>(xl, K, xsum.data(), qp, row_bytes, sp, bp, ng, G, begin, end, yp, N);
        else if (bits == 4) rows_lanes<4, Mc>(xl, K, xsum.data(), qp, row_bytes, sp, bp, ng, G, begin, end, yp, N);
        else rows_lanes<8, Mc>(xl, K, xsum.data(), qp, row_bytes, sp, bp, ng, G, begin, end, yp, N);
        return;
      }
#endif
      float out[Mc];
      for (int64_t o = begin; o < end; o++) {
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
}

at::Tensor gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                const at::Tensor& biases, int64_t bits, int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "gemv: x must be f32 [M, K]");
  TORCH_CHECK(x.size(0) <= MAX_M, "gemv: at most ", MAX_M, " rows, got ", x.size(0));
  check_linear(qweight, scales, biases, x.size(1), bits, group_size);
  at::Tensor y = at::empty({x.size(0), qweight.size(0)}, x.options());
  gemv_into(x.data_ptr<float>(), x.size(0), x.size(1), qweight, scales, biases, bits, group_size, y.data_ptr<float>());
  return y;
}

// -----------------------------------------------------------------------------
// One decode step of a LLaMA block for one token (model.Block with a KV cache and no mask), as one call:
//
//   a = rmsnorm(h) * w1;  q, k, v = a @ Wq^T, a @ Wk^T, a @ Wv^T;  rope(q), rope(k)  (HF rotate_half)
//   cache[pos] = k, v;  y = softmax(q k^T / sqrt(hd)) v  per head (grouped-query: head i reads kv head
//   i / (H / KV));  h1 = h + y @ Wo^T;  b = rmsnorm(h1) * w2;  out = h1 + (silu(b Wg^T) * (b Wu^T)) @ Wd^T
//
// The seven linears are the gemv above. T is the activations' storage type (float or bfloat16): values are
// rounded to T where model.py's ops store them (after each norm, linear, rope, attention, product and
// residual sum), the arithmetic is fp32. generate.py calls this instead of a compiled graph per block: a
// graph's Python wrapper and dynamo's guards cost more per token than the block's arithmetic besides the
// linears.
template <class T>
inline float rnd(float v) { return float(T(v)); }  // v stored as T and read back

template <class T>
void rmsnorm(const float* x, const T* w, int64_t n, double eps, float* out) {
  double ss = 0;
  for (int64_t i = 0; i < n; i++) ss += double(x[i]) * x[i];
  const float r = 1.0f / std::sqrt(float(ss / n) + float(eps));
  for (int64_t i = 0; i < n; i++) out[i] = rnd<T>(float(w[i]) * rnd<T>(x[i] * r));
}

template <class T>
void rope(float* x, int64_t heads, int64_t hd, const T* cos, const T* sin) {
  const int64_t half = hd / 2;
  for (int64_t hh = 0; hh < heads; hh++) {
    float* v = x + hh * hd;
    for (int64_t i = 0; i < half; i++) {
      const float x1 = v[i], x2 = v[i + half];
      v[i] = rnd<T>(rnd<T>(x1 * float(cos[i])) + rnd<T>(-x2 * float(sin[i])));
      v[i + half] = rnd<T>(rnd<T>(x2 * float(cos[i + half])) + rnd<T>(x1 * float(sin[i + half])));
    }
  }
}

template <class T>
void block_step_impl(const at::Tensor& h, const at::Tensor& norm1, const at::Tensor& norm2, double eps,
                     at::TensorList qw, at::TensorList sc, at::TensorList bi, at::IntArrayRef bits,
                     at::IntArrayRef groups, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& cache_k,
                     const at::Tensor& cache_v, int64_t pos, int64_t H, at::Tensor& out) {
  const int64_t dim = h.numel(), KV = cache_k.size(1), S = cache_k.size(2), hd = cache_k.size(3);
  const int64_t hidden = qw[4].size(0);
  auto lin = [&](int i, const float* x, int64_t K, float* y) {
    gemv_into(x, 1, K, qw[i], sc[i], bi[i], bits[i], groups[i], y);
    for (int64_t o = 0; o < qw[i].size(0); o++) y[o] = rnd<T>(y[o]);
  };
  std::vector<float> x(dim), a(dim), q(H * hd), k(KV * hd), v(KV * hd), y(H * hd), o(dim), g(hidden), u(hidden);
  const T* hp = h.data_ptr<T>();
  for (int64_t i = 0; i < dim; i++) x[i] = float(hp[i]);
  rmsnorm<T>(x.data(), norm1.data_ptr<T>(), dim, eps, a.data());
  lin(0, a.data(), dim, q.data());
  lin(1, a.data(), dim, k.data());
  lin(2, a.data(), dim, v.data());
  rope<T>(q.data(), H, hd, cos.data_ptr<T>(), sin.data_ptr<T>());
  rope<T>(k.data(), KV, hd, cos.data_ptr<T>(), sin.data_ptr<T>());
  T *ck = cache_k.data_ptr<T>(), *cv = cache_v.data_ptr<T>();  // [1, KV, S, hd], row 0
  for (int64_t j = 0; j < KV; j++)
    for (int64_t i = 0; i < hd; i++) ck[(j * S + pos) * hd + i] = T(k[j * hd + i]), cv[(j * S + pos) * hd + i] = T(v[j * hd + i]);
  const float scale = 1.0f / std::sqrt(float(hd));
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> p(pos + 1);
    for (int64_t hh = h0; hh < h1; hh++) {
      const int64_t j = hh / (H / KV);
      const float* qh = q.data() + hh * hd;
      float mx = -INFINITY;
      for (int64_t s = 0; s <= pos; s++) {
        const T* kr = ck + (j * S + s) * hd;
        float d = 0.f;
        for (int64_t i = 0; i < hd; i++) d += qh[i] * float(kr[i]);
        p[s] = d * scale;
        mx = std::max(mx, p[s]);
      }
      float tot = 0.f;
      for (int64_t s = 0; s <= pos; s++) tot += (p[s] = std::exp(p[s] - mx));
      float* yh = y.data() + hh * hd;
      for (int64_t i = 0; i < hd; i++) yh[i] = 0.f;
      for (int64_t s = 0; s <= pos; s++) {
        const T* vr = cv + (j * S + s) * hd;
        const float w = p[s] / tot;
        for (int64_t i = 0; i < hd; i++) yh[i] += w * float(vr[i]);
      }
      for (int64_t i = 0; i < hd; i++) yh[i] = rnd<T>(yh[i]);
    }
  });
  lin(3, y.data(), H * hd, o.data());
  for (int64_t i = 0; i < dim; i++) x[i] = rnd<T>(x[i] + o[i]);  // h1
  rmsnorm<T>(x.data(), norm2.data_ptr<T>(), dim, eps, a.data());
  lin(4, a.data(), dim, g.data());
  lin(5, a.data(), dim, u.data());
  for (int64_t i = 0; i < hidden; i++) g[i] = rnd<T>(rnd<T>(g[i] / (1.0f + std::exp(-g[i]))) * u[i]);
  lin(6, g.data(), hidden, o.data());
  T* op = out.data_ptr<T>();
  for (int64_t i = 0; i < dim; i++) op[i] = T(x[i] + o[i]);
}

at::Tensor block_step(const at::Tensor& h, const at::Tensor& norm1, const at::Tensor& norm2, double eps,
                      at::TensorList qweights, at::TensorList scales, at::TensorList biases, at::IntArrayRef bits,
                      at::IntArrayRef groups, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& cache_k,
                      const at::Tensor& cache_v, int64_t pos, int64_t n_heads) {
  const auto T = h.scalar_type();
  TORCH_CHECK(T == at::kFloat || T == at::kBFloat16, "block_step: activations must be float32 or bfloat16");
  TORCH_CHECK(h.is_contiguous() && h.size(0) == 1, "block_step: one contiguous row of activations");
  for (const at::Tensor* t : {&norm1, &norm2, &cos, &sin, &cache_k, &cache_v})
    TORCH_CHECK(t->scalar_type() == T && t->is_contiguous(), "block_step: norms, rope and cache must be contiguous ",
                h.scalar_type());
  TORCH_CHECK(qweights.size() == 7 && scales.size() == 7 && biases.size() == 7 && bits.size() == 7 && groups.size() == 7,
              "block_step: seven linears (q, k, v, o, gate, up, down)");
  TORCH_CHECK(cache_k.dim() == 4 && cache_k.sizes() == cache_v.sizes() && cache_k.size(0) >= 1, "block_step: cache shapes");
  const int64_t dim = h.numel(), KV = cache_k.size(1), hd = cache_k.size(3), H = n_heads;
  TORCH_CHECK(H % KV == 0 && hd % 2 == 0 && cos.numel() == hd && sin.numel() == hd && norm1.numel() == dim &&
              norm2.numel() == dim && pos >= 0 && pos < cache_k.size(2), "block_step: shapes do not match");
  const int64_t hidden = qweights[4].size(0);
  const int64_t in_f[7] = {dim, dim, dim, H * hd, dim, dim, hidden};
  const int64_t out_f[7] = {H * hd, KV * hd, KV * hd, dim, hidden, hidden, dim};
  for (int i = 0; i < 7; i++) {
    check_linear(qweights[i], scales[i], biases[i], in_f[i], bits[i], groups[i]);
    TORCH_CHECK(qweights[i].size(0) == out_f[i], "block_step: linear ", i, " has ", qweights[i].size(0), " rows, not ", out_f[i]);
  }
  at::Tensor out = at::empty_like(h);
  if (T == at::kFloat)
    block_step_impl<float>(h, norm1, norm2, eps, qweights, scales, biases, bits, groups, cos, sin, cache_k, cache_v, pos, H, out);
  else
    block_step_impl<c10::BFloat16>(h, norm1, norm2, eps, qweights, scales, biases, bits, groups, cos, sin, cache_k, cache_v, pos, H, out);
  return out;
}

}  // namespace

TORCH_LIBRARY(qalora, m) {
  m.def("gemv(Tensor x, Tensor qweight, Tensor scales, Tensor biases, int bits, int group_size) -> Tensor");
  m.def("block_step(Tensor h, Tensor norm1, Tensor norm2, float eps, Tensor[] qweights, Tensor[] scales, "
        "Tensor[] biases, int[] bits, int[] groups, Tensor cos, Tensor sin, Tensor(a!) cache_k, Tensor(b!) cache_v, "
        "int pos, int n_heads) -> Tensor");
}

TORCH_LIBRARY_IMPL(qalora, CPU, m) {
  m.impl("gemv", gemv);
  m.impl("block_step", block_step);
}
