// moekit's native decode kernels: matrix x vector (and small batches of rows) for float32, int8 and
// int4 weights, and a fused mixture-of-experts step, for the inference runner (moekit/infer/runner.py).
//
// Legend: M activation rows (1-32 at decode), K input width, N output rows, G int4 group size.
//
// Weights, as the runner hands them over (moekit/native/__init__.py builds them once per weight):
//   kind 0, float32: w [N, K].
//   kind 1, int8 per row: q int8 [N, K], scale bfloat16 [N]; w = q * scale (symmetric, q in [-127, 127]).
//   kind 3, bfloat16: w [N, K] (float32 activations; each weight widened exactly).
//   kind 2, int4 in groups of G along K: nibbles uint8 [N, K/2] (byte j: column 2j in the low nibble,
//           2j + 1 in the high one), scale and zero bfloat16 [N, K/G]; w = (q - 8) * scale + zero.
// Quantized weights are multiplied with activations quantized to int8 per block, as llama.cpp's q8_0
// path does: int8 x int8 products summed in int32 (AVX512-VNNI vpdpbusd, or AVX2 maddubs, or plain C),
// scaled once per block in float32. Each output row is computed from its own input row only (blocks
// never span rows), so a row's result does not depend on the rest of the batch.
//
// The instruction set is chosen at run time (set_isa can force a lower one, for the tests); every path
// gives the same integer sums, and float32 sums that differ only in their order.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

enum Isa : int { SCALAR = 0, AVX2 = 1, AVX512 = 2 };

int detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vnni"))
    return AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return AVX2;
  return SCALAR;
}

const int kBestIsa = detect_isa();
int g_isa = kBestIsa;

inline float bf16(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Weight {
  int kind = 0;
  int64_t N = 0, K = 0, G = 0;
  const float* w = nullptr;      // kind 0
  const int8_t* q = nullptr;     // kind 1
  const uint8_t* nib = nullptr;  // kind 2
  const uint16_t* scale16 = nullptr;  // kind 1: bfloat16 [N] (the weight's own scales, read in place)
  const uint16_t* wb = nullptr;       // kind 3: bfloat16 [N, K]
  const uint16_t* scale = nullptr;  // kind 2: bfloat16 [N, K/G]
  const uint16_t* zero = nullptr;   // kind 2: bfloat16 [N, K/G]
};

// ------------------------------------------------------------------------------------------ activations
// One row of activations quantized to int16 for the integer dot products: q = round(x / d) with d the
// block's max |x| / 32767, so a product differs from float32's by about 1e-5 of the block's largest term
// (int8 activations, as llama.cpp's q8_0 path uses, were measured to change SmolLM2's greedy text:
// 0.3% per product over 30 layers). int16 x int8/int4 pairs sum into int32 with AVX512-VNNI's vpdpwssd
// (AVX2: vpmaddwd); a block's sum stays below 2^31 (32 values of at most 32767 x 127).
//   int8 weights: blocks of 32 consecutive columns, d [K/32].
//   int4 weights: blocks of 32 consecutive columns (d [K/32]); per 64-column chunk the row is stored
//     reordered as [even columns | odd columns] (the order the nibbles unpack in), and dlane [K/4] gives
//     each vpdpwssd lane's block scale (lanes 0-7: the chunk's first 32 columns, 8-15: the others); per weight group g,
//     corr_g = sum of d_b * 8 * sum q over its values (the "- 8" of the weights) and gsum_g = the float sum
//     of x over it (for the zeros).
struct QRow8 {
  std::vector<int16_t> q;  // [K]
  std::vector<float> d;    // [K/32]
};

struct QRow4 {
  std::vector<int16_t> q;     // [K], reordered per chunk
  std::vector<float> d;       // [K/32]
  std::vector<float> dlane;   // [K/4]
  std::vector<float> corr;    // [K/G]
  std::vector<float> gsum;    // [K/G]
  std::vector<int32_t> sidx;  // [K/64, 16]: per chunk, each lane's weight group within its block of 16 groups
};

int quantize_block16(const float* x, int n, int16_t* q, float* d) {  // returns the sum of q
  float amax = 0.f;
  for (int i = 0; i < n; i++) amax = std::max(amax, std::fabs(x[i]));
  float s = amax / 32767.f, id = s > 0.f ? 1.f / s : 0.f;
  int sum = 0;
  for (int i = 0; i < n; i++) {
    float r = std::nearbyint(x[i] * id);
    q[i] = (int16_t)std::max(-32767.f, std::min(32767.f, r));
    sum += q[i];
  }
  *d = s;
  return sum;
}

void quantize_row8(const float* x, int64_t K, QRow8& r) {
  r.q.resize(K); r.d.resize(K / 32);
  for (int64_t b = 0; b < K / 32; b++) quantize_block16(x + 32 * b, 32, r.q.data() + 32 * b, &r.d[b]);
}

void quantize_row4(const float* x, int64_t K, int64_t G, QRow4& r) {
  r.q.resize(K); r.d.resize(K / 32); r.dlane.resize(K / 2); r.corr.assign(K / G, 0.f); r.gsum.assign(K / G, 0.f);
  int16_t qb[32];
  for (int64_t b = 0; b < K / 32; b++) {  // blocks of 32 consecutive columns (within a group: G >= 32)
    const int sum = quantize_block16(x + 32 * b, 32, qb, &r.d[b]);
    const int64_t c = b / 2, h = b % 2;  // chunk, half: stored as even columns at 16h.., odd at 32 + 16h..
    for (int j = 0; j < 16; j++) {
      r.q[64 * c + 16 * h + j] = qb[2 * j];
      r.q[64 * c + 32 + 16 * h + j] = qb[2 * j + 1];
    }
    for (int l = 0; l < 8; l++) r.dlane[16 * c + 8 * h + l] = r.d[b];
    r.corr[(32 * b) / G] += r.d[b] * 8.f * (float)sum;
  }
  for (int64_t i = 0; i < K; i++) r.gsum[i / G] += x[i];
  r.sidx.resize(K / 4);
  for (int64_t c = 0; c < K / 64; c++)
    for (int l = 0; l < 16; l++) r.sidx[16 * c + l] = (int32_t)(((64 * c + 32 * (l / 8)) / G) % 16);
}

// ------------------------------------------------------------------------------------------ dot products
// float32
__attribute__((target("avx512f"))) float dot_f32_avx512(const float* a, const float* b, int64_t K) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= K; i += 32) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
  }
  for (; i + 16 <= K; i += 16) acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
  float s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  for (; i < K; i++) s += a[i] * b[i];
  return s;
}

__attribute__((target("avx2,fma"))) float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) float dot_f32_avx2(const float* a, const float* b, int64_t K) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= K; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= K; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  float s = hsum256(_mm256_add_ps(acc0, acc1));
  for (; i < K; i++) s += a[i] * b[i];
  return s;
}

float dot_f32_scalar(const float* a, const float* b, int64_t K) {
  float s = 0.f;
  for (int64_t i = 0; i < K; i++) s += a[i] * b[i];
  return s;
}

// bfloat16 [n] . float32 [n] (the per-group terms of an int4 row)
float dot_bf16_scalar(const uint16_t* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; i++) s += bf16(a[i]) * b[i];
  return s;
}

// a bfloat16 weight row . float32 activations
__attribute__((target("avx512f,avx512bw"))) float dot_bf16_avx512(const uint16_t* a, const float* b, int64_t K) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= K; i += 32) {
    const __m512i w = _mm512_loadu_si512((const void*)(a + i));  // 32 bfloat16: low 16 -> lanes of acc0
    const __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(w)), 16));
    const __m512 w1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(w, 1)), 16));
    acc0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(b + i), acc0);
    acc1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(b + i + 16), acc1);
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  for (; i < K; i++) s += bf16(a[i]) * b[i];
  return s;
}

__attribute__((target("avx2,fma"))) float dot_bf16_avx2(const uint16_t* a, const float* b, int64_t K) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= K; i += 8) {
    const __m256 w = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(a + i))), 16));
    acc = _mm256_fmadd_ps(w, _mm256_loadu_ps(b + i), acc);
  }
  float s = hsum256(acc);
  for (; i < K; i++) s += bf16(a[i]) * b[i];
  return s;
}

// int8 weights x int16 activations, blocks of 32
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni"))) float dot_i8_avx512(const int8_t* w, const QRow8& a,
                                                                                             int64_t K) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  const int16_t* q = a.q.data();
  int64_t i = 0;
  for (; i + 64 <= K; i += 64) {  // two independent chains
    __m512i s0 = _mm512_dpwssd_epi32(zero, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w + i))),
                                     _mm512_loadu_si512((const void*)(q + i)));
    __m512i s1 = _mm512_dpwssd_epi32(zero, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w + i + 32))),
                                     _mm512_loadu_si512((const void*)(q + i + 32)));
    acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), _mm512_set1_ps(a.d[i / 32]), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), _mm512_set1_ps(a.d[i / 32 + 1]), acc1);
  }
  if (i < K) {  // a last block of 32
    __m512i s0 = _mm512_dpwssd_epi32(zero, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(w + i))),
                                     _mm512_loadu_si512((const void*)(q + i)));
    acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), _mm512_set1_ps(a.d[i / 32]), acc0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

__attribute__((target("avx2,fma"))) float dot_i8_avx2(const int8_t* w, const QRow8& a, int64_t K) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  const int16_t* q = a.q.data();
  for (int64_t i = 0; i < K; i += 32) {
    __m256i s0 = _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w + i))),
                                   _mm256_loadu_si256((const __m256i*)(q + i)));
    __m256i s1 = _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w + i + 16))),
                                   _mm256_loadu_si256((const __m256i*)(q + i + 16)));
    const __m256 d = _mm256_set1_ps(a.d[i / 32]);
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), d, acc0);
    acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), d, acc1);
  }
  return hsum256(_mm256_add_ps(acc0, acc1));
}

float dot_i8_scalar(const int8_t* w, const QRow8& a, int64_t K) {
  float total = 0.f;
  for (int64_t i = 0; i < K; i += 32) {
    int64_t s = 0;
    for (int j = 0; j < 32; j++) s += (int64_t)w[i + j] * a.q[i + j];
    total += (float)s * a.d[i / 32];
  }
  return total;
}

// int4 weights (nibbles, groups of G) x int16 activations (reordered chunks, blocks of 16):
// sum over blocks of d_b * s_g * sum q * qa, minus sum_g s_g corr_g, plus sum_g z_g gsum_g.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni"))) inline __m512 bf16x16(const uint16_t* p,
                                                                                               int64_t n) {
  // n <= 16 bfloat16 values from p as float32 lanes (the rest 0)
  const __mmask16 m = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// MB rows of activations against one int4 row at once: the row is unpacked once per chunk, and each
// activation row gets the same arithmetic whatever MB is (so a row's result does not depend on the
// batch).
template <int MB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni"))) void dot_i4_avx512_rows(
    const uint8_t* nib, const uint16_t* s, const uint16_t* z, const QRow4* const* a, int64_t K, int64_t G, float* out) {
  __m512 acc0[MB], acc1[MB];
  for (int m = 0; m < MB; m++) { acc0[m] = _mm512_setzero_ps(); acc1[m] = _mm512_setzero_ps(); }
  const __m256i lo4 = _mm256_set1_epi8(0x0F);
  const __m512i zero = _mm512_setzero_si512();
  const int gshift = __builtin_ctzll((unsigned long long)G);
  const int64_t NG = K / G;
  const int32_t* sidx = a[0]->sidx.data();
  __m512 svec = _mm512_setzero_ps();
  int64_t block = -1;
  for (int64_t c = 0; c < K / 64; c++) {
    const int64_t b = ((64 * c) >> gshift) / 16;
    if (b != block) {
      block = b;
      const int64_t n = std::min<int64_t>(16, NG - 16 * b);
      svec = bf16x16(s + 16 * b, n);
      const __m512 zvec = bf16x16(z + 16 * b, n);
      const __mmask16 mk = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
      for (int m = 0; m < MB; m++) {
        acc1[m] = _mm512_fmadd_ps(zvec, _mm512_maskz_loadu_ps(mk, a[m]->gsum.data() + 16 * b), acc1[m]);
        acc1[m] = _mm512_fnmadd_ps(svec, _mm512_maskz_loadu_ps(mk, a[m]->corr.data() + 16 * b), acc1[m]);
      }
    }
    __m256i bytes = _mm256_loadu_si256((const __m256i*)(nib + 32 * c));
    const __m512i lo = _mm512_cvtepu8_epi16(_mm256_and_si256(bytes, lo4));
    const __m512i hi = _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(bytes, 4), lo4));
    const __m512 sw = _mm512_permutexvar_ps(_mm512_loadu_si512((const void*)(sidx + 16 * c)), svec);
    for (int m = 0; m < MB; m++) {
      const int16_t* q = a[m]->q.data();
      __m512i sum = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(zero, lo, _mm512_loadu_si512((const void*)(q + 64 * c))), hi,
                                        _mm512_loadu_si512((const void*)(q + 64 * c + 32)));
      acc0[m] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sum), _mm512_loadu_ps(a[m]->dlane.data() + 16 * c)), sw,
                                acc0[m]);
    }
  }
  for (int m = 0; m < MB; m++) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[m], acc1[m]));
}

void dot_i4_avx512_batch(const uint8_t* nib, const uint16_t* s, const uint16_t* z, const QRow4* const* a, int64_t M,
                         int64_t K, int64_t G, float* out) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) dot_i4_avx512_rows<4>(nib, s, z, a + m, K, G, out + m);
  for (; m + 2 <= M; m += 2) dot_i4_avx512_rows<2>(nib, s, z, a + m, K, G, out + m);
  for (; m < M; m++) dot_i4_avx512_rows<1>(nib, s, z, a + m, K, G, out + m);
}

__attribute__((target("avx2,fma"))) float dot_i4_avx2(const uint8_t* nib, const uint16_t* s, const uint16_t* z,
                                                     const QRow4& a, int64_t K, int64_t G) {
  const __m128i lo4 = _mm_set1_epi8(0x0F);
  const int gshift = __builtin_ctzll((unsigned long long)G);
  const int16_t* q = a.q.data();
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (int64_t c = 0; c < K / 64; c++) {
    for (int half = 0; half < 2; half++) {  // bytes 16 half .. + 15: columns 32 half .. + 31 (one group's part)
      __m128i b = _mm_loadu_si128((const __m128i*)(nib + 32 * c + 16 * half));
      __m256i lo = _mm256_cvtepu8_epi16(_mm_and_si128(b, lo4));
      __m256i hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(b, 4), lo4));
      __m256i se = _mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i*)(q + 64 * c + 16 * half)));
      __m256i so = _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i*)(q + 64 * c + 32 + 16 * half)));
      const float f = a.d[2 * c + half] * bf16(s[(64 * c + 32 * half) >> gshift]);  // one block of 32 columns
      const __m256 t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(se, so)), _mm256_set1_ps(f), half ? acc1 : acc0);
      if (half) acc1 = t;
      else acc0 = t;
    }
  }
  float total = hsum256(_mm256_add_ps(acc0, acc1));
  return total + dot_bf16_scalar(z, a.gsum.data(), K / G) - dot_bf16_scalar(s, a.corr.data(), K / G);
}

float dot_i4_scalar(const uint8_t* nib, const uint16_t* s, const uint16_t* z, const QRow4& a, int64_t K, int64_t G) {
  float total = 0.f;
  for (int64_t c = 0; c < K / 64; c++) {
    for (int h = 0; h < 2; h++) {  // columns 32h .. 32h + 31 of the chunk: bytes 16h .. 16h + 15, one block
      int64_t acc = 0;
      for (int j = 0; j < 16; j++) {
        const uint8_t byte = nib[32 * c + 16 * h + j];
        acc += (int64_t)(byte & 15) * a.q[64 * c + 16 * h + j] + (int64_t)(byte >> 4) * a.q[64 * c + 32 + 16 * h + j];
      }
      total += (float)acc * a.d[2 * c + h] * bf16(s[(64 * c + 32 * h) / G]);
    }
  }
  for (int64_t g = 0; g < K / G; g++) total += bf16(z[g]) * a.gsum[g] - bf16(s[g]) * a.corr[g];
  return total;
}

// ------------------------------------------------------------------------------------------ products
void check_weight(const Weight& w) {
  TORCH_CHECK(w.K % 32 == 0, "moekit native: input width ", w.K, " is not a multiple of 32");
  if (w.kind == 2) TORCH_CHECK(w.K % 64 == 0 && w.G >= 32 && (w.G & (w.G - 1)) == 0 && w.K % w.G == 0,
                               "moekit native: int4 needs K % 64 == 0 and groups of a power of two >= 32 (K=", w.K,
                               ", G=", w.G, ")");
}

// One product y[m, :] = x[m, :] @ w.T (+ bias) for m < M, rows of x ldx apart and of y ldy apart, with its
// activations quantized once (integer weights).
struct Job {
  const float* x;
  int64_t M, ldx;
  const Weight* w;
  float* y;
  int64_t ldy;
  const float* bias;
  std::vector<QRow8> a8;
  std::vector<QRow4> a4;

  void prepare() {
    if (w->kind == 1) {
      a8.resize(M);
      for (int64_t m = 0; m < M; m++) quantize_row8(x + m * ldx, w->K, a8[m]);
    } else if (w->kind == 2) {
      a4.resize(M);
      for (int64_t m = 0; m < M; m++) quantize_row4(x + m * ldx, w->K, w->G, a4[m]);
    }
  }

  // output rows [begin, end): each weight row is read once for all M rows of x
  void rows(int64_t begin, int64_t end, int isa) const {
    const Weight& W = *w;
    const int64_t K = W.K;
    if (W.kind == 2 && isa == AVX512) {  // every activation row against each weight row, unpacked once
      std::vector<const QRow4*> rows4(M);
      std::vector<float> v(M);
      for (int64_t m = 0; m < M; m++) rows4[m] = &a4[m];
      for (int64_t n = begin; n < end; n++) {
        dot_i4_avx512_batch(W.nib + n * (K / 2), W.scale + n * (K / W.G), W.zero + n * (K / W.G), rows4.data(), M, K,
                            W.G, v.data());
        for (int64_t m = 0; m < M; m++) y[m * ldy + n] = bias ? v[m] + bias[n] : v[m];
      }
      return;
    }
    for (int64_t n = begin; n < end; n++) {
      for (int64_t m = 0; m < M; m++) {
        float v;
        if (W.kind == 0) {
          const float* wr = W.w + n * K;
          const float* xr = x + m * ldx;
          v = isa == AVX512 ? dot_f32_avx512(wr, xr, K) : isa == AVX2 ? dot_f32_avx2(wr, xr, K) : dot_f32_scalar(wr, xr, K);
        } else if (W.kind == 3) {
          const uint16_t* wr = W.wb + n * K;
          const float* xr = x + m * ldx;
          v = isa == AVX512 ? dot_bf16_avx512(wr, xr, K) : isa == AVX2 ? dot_bf16_avx2(wr, xr, K) : dot_bf16_scalar(wr, xr, K);
        } else if (W.kind == 1) {
          const int8_t* wr = W.q + n * K;
          v = (isa == AVX512 ? dot_i8_avx512(wr, a8[m], K) : isa == AVX2 ? dot_i8_avx2(wr, a8[m], K)
                                                                        : dot_i8_scalar(wr, a8[m], K)) * bf16(W.scale16[n]);
        } else {
          const uint8_t* wr = W.nib + n * (K / 2);
          const uint16_t* s = W.scale + n * (K / W.G);
          const uint16_t* z = W.zero + n * (K / W.G);
          v = isa == AVX2 ? dot_i4_avx2(wr, s, z, a4[m], K, W.G) : dot_i4_scalar(wr, s, z, a4[m], K, W.G);
        }
        if (bias) v += bias[n];
        y[m * ldy + n] = v;
      }
    }
  }

  int64_t bytes_per_row() const {
    return w->kind == 0 ? 4 * w->K : w->kind == 3 ? 2 * w->K : w->kind == 1 ? w->K : w->K / 2;
  }
};

// Several products in one parallel region (one fork and join), split over all their output rows.
void run_jobs(std::vector<Job>& jobs) {
  std::vector<int64_t> start(jobs.size() + 1, 0);
  int64_t bytes = 0;
  for (size_t j = 0; j < jobs.size(); j++) {
    jobs[j].prepare();
    start[j + 1] = start[j] + jobs[j].w->N;
    bytes += jobs[j].bytes_per_row() * jobs[j].w->N * jobs[j].M;
  }
  const int64_t total = start.back();
  const int isa = g_isa;
  const int64_t grain = std::max<int64_t>(1, total * (64 << 10) / std::max<int64_t>(1, bytes));  // ~64 KB a task
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    size_t j = std::upper_bound(start.begin(), start.end(), begin) - start.begin() - 1;
    while (begin < end) {
      const int64_t stop = std::min(end, start[j + 1]);
      jobs[j].rows(begin - start[j], stop - start[j], isa);
      begin = stop;
      j++;
    }
  });
}

void linear_rows(const float* x, int64_t M, int64_t ldx, const Weight& w, float* y, int64_t ldy, const float* bias) {
  std::vector<Job> jobs(1);
  jobs[0] = Job{x, M, ldx, &w, y, ldy, bias, {}, {}};
  run_jobs(jobs);
}

Weight unpack(int64_t kind, const std::vector<at::Tensor>& t, int64_t G) {
  Weight w;
  w.kind = (int)kind;
  TORCH_CHECK(!t.empty(), "moekit native: a weight without tensors");
  for (const auto& x : t) TORCH_CHECK(x.is_contiguous() && x.device().is_cpu(), "moekit native: tensors must be contiguous, on the CPU");
  if (kind == 0) {
    TORCH_CHECK(t.size() == 1 && t[0].dim() == 2 && t[0].scalar_type() == at::kFloat, "moekit native: float32 [N, K]");
    w.N = t[0].size(0); w.K = t[0].size(1); w.w = t[0].data_ptr<float>();
  } else if (kind == 1) {
    TORCH_CHECK(t.size() == 2 && t[0].scalar_type() == at::kChar && t[1].scalar_type() == at::kBFloat16,
                "moekit native: int8 (q int8, scale bfloat16)");
    w.N = t[0].size(0); w.K = t[0].size(1); w.q = t[0].data_ptr<int8_t>();
    w.scale16 = reinterpret_cast<const uint16_t*>(t[1].data_ptr<at::BFloat16>());
    TORCH_CHECK(t[1].numel() == w.N, "moekit native: int8 scale [N]");
  } else if (kind == 2) {
    TORCH_CHECK(t.size() == 3 && t[0].scalar_type() == at::kByte && t[1].scalar_type() == at::kBFloat16 &&
                t[2].scalar_type() == at::kBFloat16, "moekit native: int4 (nibbles uint8, scale and zero bfloat16)");
    w.N = t[0].size(0); w.K = 2 * t[0].size(1); w.G = G;
    w.nib = t[0].data_ptr<uint8_t>();
    w.scale = reinterpret_cast<const uint16_t*>(t[1].data_ptr<at::BFloat16>());
    w.zero = reinterpret_cast<const uint16_t*>(t[2].data_ptr<at::BFloat16>());
    TORCH_CHECK(G > 0 && t[1].numel() == w.N * (w.K / G) && t[2].numel() == t[1].numel(), "moekit native: int4 scale/zero [N, K/G]");
  } else if (kind == 3) {
    TORCH_CHECK(t.size() == 1 && t[0].dim() == 2 && t[0].scalar_type() == at::kBFloat16, "moekit native: bfloat16 [N, K]");
    w.N = t[0].size(0); w.K = t[0].size(1); w.wb = reinterpret_cast<const uint16_t*>(t[0].data_ptr<at::BFloat16>());
  } else {
    TORCH_CHECK(false, "moekit native: unknown weight kind ", kind);
  }
  check_weight(w);
  return w;
}

// A weight held for the kernels: its tensors stay alive with it; the bias (optional) is float32 [N].
struct NWeight {
  Weight w;
  std::vector<at::Tensor> keep;
  at::Tensor bias;
  const float* b = nullptr;
};
using NWeightPtr = std::shared_ptr<NWeight>;

NWeightPtr make_weight(int64_t kind, std::vector<at::Tensor> t, int64_t G, const c10::optional<at::Tensor>& bias) {
  auto nw = std::make_shared<NWeight>();
  nw->w = unpack(kind, t, G);
  nw->keep = std::move(t);
  if (bias.has_value() && bias->defined()) {
    nw->bias = bias->contiguous();
    TORCH_CHECK(nw->bias.scalar_type() == at::kFloat && nw->bias.numel() == nw->w.N, "moekit native: bias float32 [N]");
    nw->b = nw->bias.data_ptr<float>();
  }
  return nw;
}

at::Tensor wlinear(const at::Tensor& x, const NWeight& nw) {
  const Weight& w = nw.w;
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == w.K, "moekit native: x float32 [M, K]");
  at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({x.size(0), w.N}, x.options());
  linear_rows(xc.data_ptr<float>(), x.size(0), w.K, w, y.data_ptr<float>(), w.N, nw.b);
  return y;
}

inline float silu(float v) { return v / (1.f + std::exp(-v)); }

// A layer's experts: w1[e] [2F, D] (gate rows, then up rows), w2[e] [D, F].
struct NExperts {
  std::vector<NWeightPtr> w1, w2;
};
using NExpertsPtr = std::shared_ptr<NExperts>;

NExpertsPtr make_experts(std::vector<NWeightPtr> w1, std::vector<NWeightPtr> w2) {
  TORCH_CHECK(w1.size() == w2.size() && !w1.empty(), "moekit native: as many w1 as w2, at least one");
  for (size_t e = 0; e < w1.size(); e++)
    TORCH_CHECK(w2[e]->w.N == w1[e]->w.K && 2 * w2[e]->w.K == w1[e]->w.N && !w1[e]->b && !w2[e]->b,
                "moekit native: expert ", e, " has shapes w1 [", w1[e]->w.N, ", ", w1[e]->w.K, "], w2 [", w2[e]->w.N,
                ", ", w2[e]->w.K, "] (want [2F, D] and [D, F], no bias)");
  auto ex = std::make_shared<NExperts>();
  ex->w1 = std::move(w1);
  ex->w2 = std::move(w2);
  return ex;
}

// y += the chosen experts of each row: ids [M, K] index the experts (-1: none), gates [M, K]. All the
// chosen experts' gate/up products run in one parallel region, then all their down products; each expert's
// contribution is added into its rows in increasing expert index, rows in increasing order, so every row
// sums its experts in the same order whatever else is in the batch (and whether the experts come in one
// call or one call each).
void moe_add(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& gates, const NExperts& ex, at::Tensor& y) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && y.sizes() == x.sizes() && y.is_contiguous() &&
              y.scalar_type() == at::kFloat, "moekit native: x and y float32 [M, D]");
  TORCH_CHECK(ids.scalar_type() == at::kLong && gates.scalar_type() == at::kFloat && ids.sizes() == gates.sizes() &&
              ids.dim() == 2 && ids.size(0) == x.size(0), "moekit native: ids int64 and gates float32 [M, K]");
  const int64_t M = x.size(0), D = x.size(1), Kt = ids.size(1), E = (int64_t)ex.w1.size();
  TORCH_CHECK(ex.w1[0]->w.K == D, "moekit native: experts of width ", ex.w1[0]->w.K, ", x of width ", D);
  at::Tensor xc = x.contiguous(), ic = ids.contiguous(), gc = gates.contiguous();
  const int64_t* id = ic.data_ptr<int64_t>();
  const float* g = gc.data_ptr<float>();
  const float* xp = xc.data_ptr<float>();
  for (int64_t i = 0; i < M * Kt; i++) TORCH_CHECK(id[i] >= -1 && id[i] < E, "moekit native: expert id ", id[i], " not in [0, ", E, ")");
  struct Use { int64_t e; std::vector<int64_t> rows; std::vector<float> gates; std::vector<float> xs, h, act, o; };
  std::vector<Use> uses;
  for (int64_t e = 0; e < E; e++) {
    Use u{e, {}, {}, {}, {}, {}, {}};
    for (int64_t m = 0; m < M; m++)
      for (int64_t k = 0; k < Kt; k++)
        if (id[m * Kt + k] == e) { u.rows.push_back(m); u.gates.push_back(g[m * Kt + k]); }
    if (!u.rows.empty()) uses.push_back(std::move(u));
  }
  if (uses.empty()) return;
  std::vector<Job> up, down;
  for (auto& u : uses) {
    const Weight& w1 = ex.w1[u.e]->w;
    const int64_t Me = (int64_t)u.rows.size(), F2 = w1.N;
    u.xs.resize(Me * D); u.h.resize(Me * F2); u.act.resize(Me * F2 / 2); u.o.resize(Me * D);
    for (int64_t i = 0; i < Me; i++) std::memcpy(u.xs.data() + i * D, xp + u.rows[i] * D, D * sizeof(float));
    up.push_back(Job{u.xs.data(), Me, D, &w1, u.h.data(), F2, nullptr, {}, {}});
  }
  run_jobs(up);
  for (auto& u : uses) {
    const Weight& w2 = ex.w2[u.e]->w;
    const int64_t Me = (int64_t)u.rows.size(), F = w2.K, F2 = 2 * F;
    for (int64_t i = 0; i < Me; i++)
      for (int64_t f = 0; f < F; f++) u.act[i * F + f] = silu(u.h[i * F2 + f]) * u.h[i * F2 + F + f];
    down.push_back(Job{u.act.data(), Me, F, &w2, u.o.data(), D, nullptr, {}, {}});
  }
  run_jobs(down);
  float* yp = y.data_ptr<float>();
  for (auto& u : uses)
    for (size_t i = 0; i < u.rows.size(); i++) {
      float* yr = yp + u.rows[i] * D;
      const float gg = u.gates[i];
      for (int64_t d = 0; d < D; d++) yr[d] += gg * u.o[i * D + d];
    }
}

at::Tensor moe(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& gates, const NExperts& ex) {
  at::Tensor y = at::zeros({x.size(0), x.size(1)}, x.options());
  moe_add(x, ids, gates, ex, y);
  return y;
}

// A dense SwiGLU MLP: w2 @ (silu(w1_gate @ x) * (w1_up @ x)), every row: one expert that every row
// chooses with gate 1 (0 + 1 * o is o exactly).
at::Tensor swiglu(const at::Tensor& x, const NWeightPtr& w1, const NWeightPtr& w2) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == w1->w.K, "moekit native: x float32 [M, D]");
  NExpertsPtr one = make_experts({w1}, {w2});
  at::Tensor ids = at::zeros({x.size(0), 1}, at::TensorOptions().dtype(at::kLong));
  at::Tensor gates = at::ones({x.size(0), 1}, x.options());
  at::Tensor y = at::zeros({x.size(0), w2->w.N}, x.options());
  moe_add(x, ids, gates, *one, y);
  return y;
}

// rms_norm as torch.nn.functional.rms_norm in float32: x * rsqrt(mean(x^2) + eps) * w
void rms_norm_rows(const float* x, int64_t M, int64_t D, const float* w, double eps, float* out) {
  for (int64_t m = 0; m < M; m++) {
    const float* xr = x + m * D;
    float ss = 0.f;
    for (int64_t d = 0; d < D; d++) ss += xr[d] * xr[d];
    const float r = 1.f / std::sqrt(ss / (float)D + (float)eps);
    for (int64_t d = 0; d < D; d++) out[m * D + d] = xr[d] * r * w[d];
  }
}

// One attention block of a decode step for B rows, each one token of its own sequence (slot s_b, position
// p_b), grouped-query attention without qk-norm, rotary embedding on (i, i + Dh/2) pairs written side by
// side (the runner's cache order, see _AttnPlan):
//   h = rms_norm(x) -> q, k, v -> rope -> k, v into the cache -> softmax(q k^T / sqrt(Dh)) v -> o_proj;
//   x' = x + o; h2 = rms_norm_ffn(x').  Returns (x', h2).
std::vector<at::Tensor> attn_decode(const at::Tensor& x, const at::Tensor& norm_w, double eps, const NWeight& qkv,
                                    const NWeight& o, at::Tensor& kc, at::Tensor& vc, const at::Tensor& slots,
                                    const at::Tensor& pos, const at::Tensor& cos_h, const at::Tensor& sin_h, int64_t H,
                                    int64_t G, int64_t Dh, const at::Tensor& ffn_w, double ffn_eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "moekit native: x float32 [B, D]");
  const int64_t B = x.size(0), D = x.size(1), half = Dh / 2;
  TORCH_CHECK(qkv.w.K == D && qkv.w.N == (H + 2 * G) * Dh && o.w.K == H * Dh && o.w.N == D, "moekit native: attention shapes");
  TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous() && kc.scalar_type() == at::kFloat && kc.dim() == 4 &&
              kc.size(1) == G && kc.size(3) == Dh && vc.sizes() == kc.sizes(), "moekit native: cache float32 [S, G, L, Dh]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && pos.scalar_type() == at::kLong && slots.numel() == B && pos.numel() == B,
              "moekit native: slots and positions int64 [B]");
  TORCH_CHECK(cos_h.is_contiguous() && sin_h.is_contiguous() && cos_h.size(1) == half, "moekit native: cos/sin [L, Dh/2]");
  const int64_t S = kc.size(0), L = kc.size(2), W = (H + 2 * G) * Dh;
  const int64_t* sl = slots.data_ptr<int64_t>();
  const int64_t* ps = pos.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; b++)
    TORCH_CHECK(sl[b] >= 0 && sl[b] < S && ps[b] >= 0 && ps[b] < L && ps[b] < cos_h.size(0), "moekit native: slot/position out of range");
  const float* xp = x.data_ptr<float>();
  std::vector<float> h(B * D), q(B * W), y(B * H * Dh);
  rms_norm_rows(xp, B, D, norm_w.data_ptr<float>(), eps, h.data());
  linear_rows(h.data(), B, D, qkv.w, q.data(), W, qkv.b);
  float* K = kc.data_ptr<float>();
  float* V = vc.data_ptr<float>();
  const float* co = cos_h.data_ptr<float>();
  const float* si = sin_h.data_ptr<float>();
  // rope on the H query heads and G key heads; keys and values into the cache
  std::vector<float> tmp(Dh);
  for (int64_t b = 0; b < B; b++) {
    const float* c = co + ps[b] * half;
    const float* sn = si + ps[b] * half;
    for (int64_t hh = 0; hh < H + G; hh++) {
      float* v = q.data() + b * W + hh * Dh;
      for (int64_t i = 0; i < half; i++) {
        const float a = v[i], bb = v[i + half];
        tmp[2 * i] = a * c[i] - bb * sn[i];
        tmp[2 * i + 1] = a * sn[i] + bb * c[i];
      }
      std::memcpy(v, tmp.data(), Dh * sizeof(float));
    }
    for (int64_t g = 0; g < G; g++) {
      const int64_t at_ = ((sl[b] * G + g) * L + ps[b]) * Dh;
      std::memcpy(K + at_, q.data() + b * W + (H + g) * Dh, Dh * sizeof(float));
      std::memcpy(V + at_, q.data() + b * W + (H + G + g) * Dh, Dh * sizeof(float));
    }
  }
  const float scale = 1.f / std::sqrt((float)Dh);
  const int64_t rep = H / G;
  int64_t work = 0;
  for (int64_t b = 0; b < B; b++) work += H * (ps[b] + 1) * Dh;
  at::parallel_for(0, B * H, work < (1 << 16) ? B * H : 1, [&](int64_t begin, int64_t end) {  // small: one thread
    std::vector<float> sc;
    for (int64_t bh = begin; bh < end; bh++) {
      const int64_t b = bh / H, hh = bh % H, g = hh / rep, n = ps[b] + 1;
      const float* qv = q.data() + b * W + hh * Dh;
      const float* kb = K + (sl[b] * G + g) * L * Dh;
      const float* vb = V + (sl[b] * G + g) * L * Dh;
      sc.resize(n);
      float mx = -INFINITY;
      for (int64_t t = 0; t < n; t++) {
        const float* kt = kb + t * Dh;
        float d = 0.f;
        for (int64_t i = 0; i < Dh; i++) d += qv[i] * kt[i];
        sc[t] = d * scale;
        mx = std::max(mx, sc[t]);
      }
      float sum = 0.f;
      for (int64_t t = 0; t < n; t++) { sc[t] = std::exp(sc[t] - mx); sum += sc[t]; }
      float* out = y.data() + b * H * Dh + hh * Dh;
      for (int64_t i = 0; i < Dh; i++) out[i] = 0.f;
      for (int64_t t = 0; t < n; t++) {
        const float p = sc[t] / sum;
        const float* vt = vb + t * Dh;
        for (int64_t i = 0; i < Dh; i++) out[i] += p * vt[i];
      }
    }
  });
  at::Tensor xn = at::empty({B, D}, x.options());
  float* xo = xn.data_ptr<float>();
  linear_rows(y.data(), B, H * Dh, o.w, xo, D, o.b);
  for (int64_t i = 0; i < B * D; i++) xo[i] += xp[i];
  at::Tensor h2 = at::empty({B, D}, x.options());
  rms_norm_rows(xo, B, D, ffn_w.data_ptr<float>(), ffn_eps, h2.data_ptr<float>());
  return {xn, h2};
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && w.numel() == x.size(1), "moekit native: x float32 [M, D]");
  at::Tensor xc = x.contiguous(), wc = w.contiguous();
  at::Tensor out = at::empty_like(xc);
  rms_norm_rows(xc.data_ptr<float>(), x.size(0), x.size(1), wc.data_ptr<float>(), eps, out.data_ptr<float>());
  return out;
}

// One row of the float32 weight: int8 q * scale; int4 (q - 8) * scale + zero = q * scale + (zero - 8 scale).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) void dequant_row_avx512(const Weight& w, int64_t n, float* r) {
  const int64_t K = w.K;
  if (w.kind == 1) {
    const __m512 s = _mm512_set1_ps(bf16(w.scale16[n]));
    const int8_t* q = w.q + n * K;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16)
      _mm512_storeu_ps(r + k, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + k)))), s));
    for (; k < K; k++) r[k] = (float)q[k] * bf16(w.scale16[n]);
    return;
  }
  const uint8_t* b = w.nib + n * (K / 2);
  const __m128i lo4 = _mm_set1_epi8(0x0F);
  for (int64_t k = 0; k < K; k += 32) {  // 16 bytes: 32 columns, one group (G >= 32)
    const int64_t g = k / w.G;
    const float sg = bf16(w.scale[n * (K / w.G) + g]), zg = bf16(w.zero[n * (K / w.G) + g]);
    const __m512 s = _mm512_set1_ps(sg), z = _mm512_set1_ps(zg - 8.f * sg);
    __m128i v = _mm_loadu_si128((const __m128i*)(b + k / 2));
    __m128i lo = _mm_and_si128(v, lo4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), lo4);
    __m128i a = _mm_unpacklo_epi8(lo, hi), c = _mm_unpackhi_epi8(lo, hi);  // columns 0..15, 16..31 in order
    _mm512_storeu_ps(r + k, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(a)), s, z));
    _mm512_storeu_ps(r + k + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c)), s, z));
  }
}

void dequant_row_scalar(const Weight& w, int64_t n, float* r) {
  const int64_t K = w.K;
  if (w.kind == 1) {
    const float s = bf16(w.scale16[n]);
    for (int64_t k = 0; k < K; k++) r[k] = (float)w.q[n * K + k] * s;
    return;
  }
  const uint8_t* b = w.nib + n * (K / 2);
  for (int64_t g = 0; g < K / w.G; g++) {
    const float sg = bf16(w.scale[n * (K / w.G) + g]), zg = bf16(w.zero[n * (K / w.G) + g]);
    for (int64_t k = g * w.G; k < (g + 1) * w.G; k += 2) {
      r[k] = (float)(b[k / 2] & 15) * sg + (zg - 8.f * sg);
      r[k + 1] = (float)(b[k / 2] >> 4) * sg + (zg - 8.f * sg);
    }
  }
}

// The float32 weight [N, K], for prefill chunks, where one dequantization per call and a float32 GEMM
// beat per-row kernels.
at::Tensor dequantize(const NWeight& nw) {
  const Weight& w = nw.w;
  at::Tensor out = at::empty({w.N, w.K}, at::TensorOptions().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const int64_t K = w.K;
  const int isa = g_isa;
  at::parallel_for(0, w.N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; n++) {
      if (w.kind == 0) std::memcpy(o + n * K, w.w + n * K, K * sizeof(float));
      else if (w.kind == 3) for (int64_t k = 0; k < K; k++) o[n * K + k] = bf16(w.wb[n * K + k]);
      else if (isa == AVX512) dequant_row_avx512(w, n, o + n * K);
      else dequant_row_scalar(w, n, o + n * K);
    }
  });
  return out;
}

int64_t set_isa(int64_t isa) {
  TORCH_CHECK(isa >= 0 && isa <= kBestIsa, "moekit native: instruction set ", isa, " is not available here (best: ",
              kBestIsa, ")");
  g_isa = (int)isa;
  return g_isa;
}

int64_t get_isa() { return g_isa; }
int64_t best_isa() { return kBestIsa; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moekit native decode kernels (see moekit/native/__init__.py)";
  py::class_<NWeight, NWeightPtr>(m, "Weight")
      .def(py::init(&make_weight), py::arg("kind"), py::arg("tensors"), py::arg("group_size"), py::arg("bias") = py::none())
      .def_property_readonly("shape", [](const NWeight& w) { return std::vector<int64_t>{w.w.N, w.w.K}; })
      .def_property_readonly("kind", [](const NWeight& w) { return w.w.kind; });
  py::class_<NExperts, NExpertsPtr>(m, "Experts").def(py::init(&make_experts), py::arg("w1"), py::arg("w2"));
  m.def("linear", &wlinear, "y = x @ w.T (+ bias) for x float32 [M, K]", py::arg("x"), py::arg("weight"));
  m.def("dequantize", &dequantize, "the float32 [N, K] weight", py::arg("weight"));
  m.def("moe", &moe, "the chosen experts' SwiGLU, gate-weighted and summed per row", py::arg("x"), py::arg("ids"),
        py::arg("gates"), py::arg("experts"));
  m.def("moe_add", &moe_add, "y += the chosen experts' SwiGLU, gate-weighted", py::arg("x"), py::arg("ids"),
        py::arg("gates"), py::arg("experts"), py::arg("y"));
  m.def("swiglu", &swiglu, "a dense SwiGLU MLP", py::arg("x"), py::arg("w1"), py::arg("w2"));
  m.def("rms_norm", &rms_norm, "x * rsqrt(mean(x^2) + eps) * w", py::arg("x"), py::arg("weight"), py::arg("eps"));
  m.def("attn_decode", &attn_decode, "one attention block of a decode step; returns (x', rms_norm_ffn(x'))");
  m.def("set_isa", &set_isa, "force an instruction set: 0 plain C, 1 AVX2, 2 AVX512-VNNI (at most the best here)");
  m.def("isa", &get_isa, "the instruction set in use");
  m.def("best_isa", &best_isa, "the best instruction set this CPU has");
}
