// attention_fwd on CPU (schema in csrc/schemas.cpp): flash attention with an online softmax, tiled
// for cache, fp32 / bf16 / fp64. Forward only; the autograd formula recomputes the eager reference
// (unispeech_fast/ops/attention/extension.py).
//
// Math, per batch b, head h and query t (L = seqlens[b], or T without seqlens):
//   s[t, j] = scale * q[b, t, h] . k[b, j, h]                       for keys j < L
//   out[b, t, h] = head_mask[h] * sum_{j < L} softmax_j(s[t, :L]) v[b, j, h]
// A row with L = 0 attends to all T keys uniformly (out = head_mask[h] * mean_j v[b, j, h]): that is
// what the eager reference computes (masked_fill with finfo.min makes every score equal). Padded
// query rows are computed like any other row (their values carry no meaning).
//
// Online softmax per key block (rows i of the query block, keys j of the block):
//   m' = max(m, max_j s_ij),  p_ij = e^{s_ij - m'},  l' = l e^{m - m'} + sum_j p_ij,
//   acc' = acc e^{m - m'} + P V,  and at the end out = head_mask[h] * acc / l.
// Key blocks at or past L are never touched.
//
// Work split: at::parallel_for over batch x heads x query blocks of kBlockM rows; per task a loop over
// key blocks of kBlockN keys. Two implementations of the tile loop:
// - attention_kernel_avx512 (fp32 on AVX-512 CPUs, bf16 on AVX512_BF16 CPUs): both products on
//   register-tiled microkernels (6 rows x 64 columns of fp32 accumulators; FMA, or VDPBF16PS on pairs of
//   bf16) over K^T and V packed once per thread and (batch, head), the softmax pass vectorised and fused
//   with the bf16 rounding of the probabilities. Blocks kAvx512BlockM x kAvx512BlockN (128 x 256).
// - attention_kernel (fp64, and fp32 / bf16 elsewhere): the two products per tile (S = scale Q K^T and
//   acc += P V) are BLAS GEMMs on the strided [B, T, H, D] views (one thread each inside parallel_for);
//   the softmax pass over S is explicit AVX-512 where the CPU has it, else compiled for AVX2+FMA or
//   baseline x86-64 and picked at run time. Working set per task: S (128 x 384 fp32, 192 KiB), the K and
//   V blocks (2 x 384 x D) and the accumulator (128 x D): about 420 KiB at D = 64, within a 1 MiB L2.
//
// Precision: fp32 inputs compute in fp32; fp64 in fp64 (a reference-accuracy path). bf16 inputs use bf16
// products with fp32 accumulation for both products (VDPBF16PS, or MKL's bf16 GEMM on CPUs without
// AVX512_BF16), with the scores, softmax statistics and accumulator in fp32 and the probabilities rounded
// to bf16 for the P V product (as ATen's CPU flash attention does); the output is rounded to bf16 once.
// fp16 inputs, and bf16 where neither exists, are widened to fp32 once (exact) and computed in fp32.
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "common.h"

namespace unispeech_fast {
namespace {

// Measured (interleaved with ATen's SDPA at B=1, 12 heads, head_dim 64, T=500 and 1500, fp32) among
// 32..256 x 256..1024 on the 2-core AVX-512 development machine: 128 x 256..512 was best, 64 rows ~10% slower.
constexpr int64_t kBlockM = 128;  // queries per task
constexpr int64_t kBlockN = 384;  // keys per tile
static_assert(kBlockN % 16 == 0, "the softmax pass writes whole 16-lane chunks");
// The AVX-512 path (attention_kernel_avx512), measured the same way (2026-11-30, fp32 and bf16, T = 500 and
// 1500, interleaved, under load): 128 x 256 to 128 x 512 within noise of each other; 64 rows and 256 x 256
// up to 10% slower at T = 500.
constexpr int64_t kAvx512BlockM = 128;
constexpr int64_t kAvx512BlockN = 256;

// ---------------------------------------------------------------------------------------------- GEMMs
// MKL's bf16 x bf16 -> fp32 GEMM (column-major, Fortran calling convention), exported by libtorch on
// x86-64 wheels; AVX512_BF16 dot products where the CPU has them. Weak: null where libtorch lacks it,
// and then bf16 inputs take the widening path (see attention_fwd_cpu).
extern "C" void gemm_bf16bf16f32(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                                 const float* alpha, const uint16_t* a, const int* lda, const uint16_t* b,
                                 const int* ldb, const float* beta, float* c, const int* ldc) __attribute__((weak));

bool has_bf16_gemm() { return gemm_bf16bf16f32 != nullptr; }

// Row-major C[M, N] = alpha op(A)[M, K] op(B)[K, N] + beta C (op(B) = B^T when tb), per input type.
inline void tile_gemm(bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                      const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  gemm_rm<float>(false, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
inline void tile_gemm(bool tb, int64_t M, int64_t N, int64_t K, double alpha, const double* A, int64_t lda,
                      const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  gemm_rm<double>(false, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}
inline void tile_gemm(bool tb, int64_t M, int64_t N, int64_t K, float alpha, const c10::BFloat16* A, int64_t lda,
                      const c10::BFloat16* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  // Row-major C = A op(B) is column-major C^T = op(B)^T A^T: swap the operands (as gemm_rm does).
  const char ca = tb ? 'T' : 'N', cb = 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int l_a = static_cast<int>(ldb), l_b = static_cast<int>(lda), l_c = static_cast<int>(ldc);
  gemm_bf16bf16f32(&ca, &cb, &m, &n, &k, &alpha, reinterpret_cast<const uint16_t*>(B), &l_a,
                   reinterpret_cast<const uint16_t*>(A), &l_b, &beta, C, &l_c);
}

// ---------------------------------------------------------------------------------------------- softmax pass
// One row of one tile: s[0, n) holds scores. Replaces them with p = e^{s - m'} and returns
// (alpha = e^{m - m'}, sum_j p) through the out-parameters, updating m to m'.
USF_INLINE void softmax_row_impl(float* s, int64_t n, float* m, float* alpha, float* sum) {
  float mx = *m;
  for (int64_t j = 0; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
  float acc = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    const float p = exp_f32(s[j] - mx);
    s[j] = p;
    acc += p;
  }
  *alpha = *m == -std::numeric_limits<float>::infinity() ? 0.0f : exp_f32(*m - mx);
  *m = mx;
  *sum = acc;
}

USF_MULTIVERSION(softmax_row_generic, softmax_row_impl, (float* s, int64_t n, float* m, float* alpha, float* sum),
                 (s, n, m, alpha, sum))

#if defined(__x86_64__) || defined(__i386__)
#define USF_TARGET_AVX512 __attribute__((target("avx512f")))

// exp_f32 of common.h on 16 lanes (same reduction and polynomial; 2^n by scalef). x <= 0 here, except in
// lanes the caller masks out afterwards.
USF_TARGET_AVX512 inline __m512 exp_avx512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f),
                                   _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

#define USF_TARGET_AVX512_ALL __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

inline bool cpu_has_avx512_all() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
}
// fp32 -> bf16 on 16 lanes, round to nearest even (finite inputs: these are probabilities in [0, 1]).
USF_TARGET_AVX512_ALL inline __m256i bf16_of(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}

// The softmax pass of one row (as softmax_row) writing p to `out` (fp32, in place allowed, or bf16) and
// zeros to out[n, n_pad): the padding columns the microkernels read. The sum is of the fp32 p.
template <typename TOut>
USF_TARGET_AVX512_ALL void softmax_row_to(const float* s, TOut* out, int64_t n, int64_t n_pad, float* m, float* alpha,
                                          float* sum) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 vmax = neg_inf;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(s + j));
  const __mmask16 tail = static_cast<__mmask16>((1u << (n - j)) - 1u);
  if (j < n) vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(neg_inf, tail, s + j));
  const float mx = std::max(*m, _mm512_reduce_max_ps(vmax));
  const __m512 vm = _mm512_set1_ps(mx);
  __m512 vsum = _mm512_setzero_ps();
  for (j = 0; j < n_pad; j += 16) {  // n_pad is a multiple of 16; lanes at or past n become 0
    const __mmask16 live = j + 16 <= n ? static_cast<__mmask16>(0xFFFF) : j < n ? tail : static_cast<__mmask16>(0);
    const __m512 p = _mm512_maskz_mov_ps(live, exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + j), vm)));
    if constexpr (std::is_same_v<TOut, float>) {
      _mm512_storeu_ps(out + j, p);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), bf16_of(p));
    }
    vsum = _mm512_add_ps(vsum, p);
  }
  *alpha = *m == -std::numeric_limits<float>::infinity() ? 0.0f : exp_f32(*m - mx);
  *m = mx;
  *sum = _mm512_reduce_add_ps(vsum);
}
#endif

void softmax_row(float* s, int64_t n, float* m, float* alpha, float* sum) {
#if defined(__x86_64__) || defined(__i386__)
  // In place; zeros s[n, roundup(n, 16)) (every caller's row has room: kBlockN is a multiple of 16).
  if (cpu_has_avx512_all()) return softmax_row_to<float>(s, s, n, (n + 15) / 16 * 16, m, alpha, sum);
#endif
  softmax_row_generic(s, n, m, alpha, sum);
}

inline float exp_of(float x) { return exp_f32(x); }
inline double exp_of(double x) { return std::exp(x); }

void softmax_row(double* s, int64_t n, double* m, double* alpha, double* sum) {
  double mx = *m;
  for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
  double acc = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = std::exp(s[j] - mx);
    acc += s[j];
  }
  *alpha = std::exp(*m - mx);  // exp(-inf) = 0 on the first block
  *m = mx;
  *sum = acc;
}

// ---------------------------------------------------------------------------------------------- kernel
struct Strided {
  int64_t b, t, h;  // element strides of a [B, T, H, D] tensor with unit stride along D
};

#if defined(__x86_64__) || defined(__i386__)
// ---------------------------------------------------------------------------------------------- AVX-512 path
// fp32 and bf16 on CPUs with AVX-512 (bf16: AVX512_BF16): both products on register-tiled microkernels
// over operands packed once per thread and (batch, head), the softmax pass fused with the bf16 rounding of
// the probabilities. Why not BLAS: MKL's bf16 GEMM ran at fp32 speed on the AMD development machine (no
// AVX512_BF16 code path there), and every BLAS call repacks its operands: K and V were repacked once per
// query block.
#define USF_TARGET_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

inline bool cpu_has_avx512_bf16() {
  static const bool has = cpu_has_avx512_all() && __builtin_cpu_supports("avx512bf16");
  return has;
}

// C[R, 16 NC] (row stride ldc) = alpha A[R, K] B[K, 16 NC], or C += A B (accumulate; alpha unused), with A
// rows of K units (stride lda), B rows of 16 NC units (stride ldb). A unit is one float (fp32: FMA with a
// broadcast a) or two bf16 along the reduction (VDPBF16PS: each fp32 lane adds a0 b0 + a1 b1).
#define USF_MICRO_BODY(BCAST, LOAD, FMA)                                                                     \
  __m512 c[R][NC];                                                                                           \
  for (int r = 0; r < R; ++r)                                                                                \
    for (int n = 0; n < NC; ++n) c[r][n] = accumulate ? _mm512_loadu_ps(C + r * ldc + 16 * n) : _mm512_setzero_ps(); \
  for (int64_t p = 0; p < K; ++p) {                                                                          \
    decltype(LOAD(B)) b[NC];                                                                                 \
    for (int n = 0; n < NC; ++n) b[n] = LOAD(B + p * ldb + 16 * n);                                          \
    for (int r = 0; r < R; ++r) {                                                                            \
      const auto a = BCAST(A[r * lda + p]);                                                                  \
      for (int n = 0; n < NC; ++n) c[r][n] = FMA(c[r][n], a, b[n]);                                          \
    }                                                                                                        \
  }                                                                                                          \
  const __m512 va = _mm512_set1_ps(alpha);                                                                   \
  for (int r = 0; r < R; ++r)                                                                                \
    for (int n = 0; n < NC; ++n)                                                                             \
      _mm512_storeu_ps(C + r * ldc + 16 * n, accumulate ? c[r][n] : _mm512_mul_ps(c[r][n], va));

struct MicroF32 {
  using Unit = float;
  template <int R, int NC>
  USF_TARGET_AVX512_ALL static void micro(int64_t K, const Unit* A, int64_t lda, const Unit* B, int64_t ldb, float* C,
                                          int64_t ldc, float alpha, bool accumulate) {
#define USF_LOAD_F32(ptr) _mm512_loadu_ps(ptr)
#define USF_FMA_F32(acc, a, bv) _mm512_fmadd_ps(a, bv, acc)
    USF_MICRO_BODY(_mm512_set1_ps, USF_LOAD_F32, USF_FMA_F32)
  }
};
struct MicroBF16 {
  using Unit = uint32_t;  // two bf16, the lower one first
  template <int R, int NC>
  USF_TARGET_AVX512_BF16 static void micro(int64_t K, const Unit* A, int64_t lda, const Unit* B, int64_t ldb, float* C,
                                           int64_t ldc, float alpha, bool accumulate) {
#define USF_BCAST_BF16(x) (__m512bh) _mm512_set1_epi32(static_cast<int>(x))
#define USF_LOAD_BF16(ptr) (__m512bh) _mm512_loadu_si512(ptr)
    USF_MICRO_BODY(USF_BCAST_BF16, USF_LOAD_BF16, _mm512_dpbf16_ps)
  }
};
#undef USF_MICRO_BODY

// C[M, 16 N16] = alpha A[M, K] B[K, 16 N16] (or += A B): rows in tiles of 6 (24 accumulators + 4 B vectors
// fit the 32 registers), columns in tiles of 64.
template <class Mk, int R>
void micro_rows(int64_t N16, int64_t K, const typename Mk::Unit* A, int64_t lda, const typename Mk::Unit* B,
                int64_t ldb, float* C, int64_t ldc, float alpha, bool accumulate) {
  int64_t n = 0;
  for (; n + 4 <= N16; n += 4) Mk::template micro<R, 4>(K, A, lda, B + 16 * n, ldb, C + 16 * n, ldc, alpha, accumulate);
  switch (N16 - n) {
    case 3: Mk::template micro<R, 3>(K, A, lda, B + 16 * n, ldb, C + 16 * n, ldc, alpha, accumulate); break;
    case 2: Mk::template micro<R, 2>(K, A, lda, B + 16 * n, ldb, C + 16 * n, ldc, alpha, accumulate); break;
    case 1: Mk::template micro<R, 1>(K, A, lda, B + 16 * n, ldb, C + 16 * n, ldc, alpha, accumulate); break;
    default: break;
  }
}

template <class Mk>
void micro_gemm(int64_t M, int64_t N16, int64_t K, const typename Mk::Unit* A, int64_t lda, const typename Mk::Unit* B,
                int64_t ldb, float* C, int64_t ldc, float alpha, bool accumulate) {
  constexpr int kRows = 6;
  int64_t i = 0;
  for (; i + kRows <= M; i += kRows)
    micro_rows<Mk, kRows>(N16, K, A + i * lda, lda, B, ldb, C + i * ldc, ldc, alpha, accumulate);
  const auto* a = A + i * lda;
  float* c = C + i * ldc;
  switch (M - i) {
    case 5: micro_rows<Mk, 5>(N16, K, a, lda, B, ldb, c, ldc, alpha, accumulate); break;
    case 4: micro_rows<Mk, 4>(N16, K, a, lda, B, ldb, c, ldc, alpha, accumulate); break;
    case 3: micro_rows<Mk, 3>(N16, K, a, lda, B, ldb, c, ldc, alpha, accumulate); break;
    case 2: micro_rows<Mk, 2>(N16, K, a, lda, B, ldb, c, ldc, alpha, accumulate); break;
    case 1: micro_rows<Mk, 1>(N16, K, a, lda, B, ldb, c, ldc, alpha, accumulate); break;
    default: break;
  }
}

inline uint32_t bf16_pair(c10::BFloat16 lo, c10::BFloat16 hi) {
  return static_cast<uint32_t>(lo.x) | (static_cast<uint32_t>(hi.x) << 16);
}

// Tin float or bf16. Per thread, K and V of the (batch, head) its tasks are on are packed once (tasks are
// ordered batch, head, query block, so a thread's contiguous range of tasks repacks only when the head
// changes): Kp = K^T per key block [block][unit of D][kAvx512BlockN keys], Vp [unit of keys][Dp] (bf16: pairs of
// consecutive keys), zero past the valid length up to a multiple of 16 keys and past D up to Dp =
// roundup(D, 16). Working memory per thread: that packing (2 L Dp units) plus the tile buffers.
template <typename Tin>
void attention_kernel_avx512(const Tin* q, Strided sq, const Tin* k, Strided sk, const Tin* v, Strided sv, Tin* out,
                             Strided so, int64_t B, int64_t N, int64_t H, int64_t D, const int32_t* lens,
                             const float* head_mask, float scale) {
  constexpr bool kF32 = std::is_same_v<Tin, float>;
  using Mk = std::conditional_t<kF32, MicroF32, MicroBF16>;
  using U = typename Mk::Unit;
  constexpr int64_t BM = kAvx512BlockM, BN = kAvx512BlockN, kPerUnit = kF32 ? 1 : 2;
  static_assert(BN % 32 == 0, "whole 16-lane chunks of keys and of key pairs");
  const int64_t n_qblocks = (N + BM - 1) / BM, n_kblocks = (N + BN - 1) / BN;
  const int64_t Dp = (D + 15) / 16 * 16, Du = (D + kPerUnit - 1) / kPerUnit;  // Du: units of the Q K^T reduction
  const Tin zero = static_cast<Tin>(0.0f);
  at::parallel_for(0, B * H * n_qblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> S(BM * BN), acc(BM * Dp), m(BM), l(BM);
    std::vector<Tin> P(kF32 ? 0 : BM * BN);
    std::vector<U> Qp(kF32 ? 0 : BM * Du), Kp(n_kblocks * Du * BN), Vp(n_kblocks * (BN / kPerUnit) * Dp);
    int64_t packed = -1;  // the (batch, head) whose K and V are in Kp, Vp
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % n_qblocks, bh = task / n_qblocks, h = bh % H, b = bh / H;
      const int64_t t0 = qb * BM, rows = std::min(BM, N - t0);
      const int64_t L = lens == nullptr ? N : lens[b];
      const float hm = head_mask == nullptr ? 1.0f : head_mask[h];
      const Tin* qp = q + b * sq.b + t0 * sq.t + h * sq.h;
      const Tin* kp = k + b * sk.b + h * sk.h;
      const Tin* vp = v + b * sv.b + h * sv.h;
      Tin* op = out + b * so.b + t0 * so.t + h * so.h;
      if (L == 0) {  // every key padded: uniform attention over all N keys (as attention_kernel)
        std::fill(acc.begin(), acc.begin() + D, 0.0f);
        for (int64_t j = 0; j < N; ++j)
          for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<float>(vp[j * sv.t + d]);
        const float w = hm / static_cast<float>(N);
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t d = 0; d < D; ++d) op[i * so.t + d] = static_cast<Tin>(acc[d] * w);
        continue;
      }
      if (packed != bh) {
        packed = bh;
        for (int64_t j0 = 0; j0 < L; j0 += BN) {
          const int64_t cols = std::min(BN, L - j0), cols16 = (cols + 15) / 16 * 16;
          U* kb = Kp.data() + (j0 / BN) * Du * BN;
          for (int64_t j = 0; j < cols16; ++j) {
            const Tin* kr = kp + (j0 + j) * sk.t;
            for (int64_t u = 0; u < Du; ++u) {
              if constexpr (kF32) {
                kb[u * BN + j] = j < cols ? kr[u] : 0.0f;
              } else {
                kb[u * BN + j] = j < cols ? bf16_pair(kr[2 * u], 2 * u + 1 < D ? kr[2 * u + 1] : zero) : 0u;
              }
            }
          }
          for (int64_t u = 0; u < cols16 / kPerUnit; ++u) {
            U* dst = Vp.data() + (j0 / kPerUnit + u) * Dp;
            const int64_t j = u * kPerUnit;
            const Tin* v0 = vp + (j0 + j) * sv.t;
            for (int64_t d = 0; d < D; ++d) {
              if constexpr (kF32) {
                dst[d] = j < cols ? v0[d] : 0.0f;
              } else {
                dst[d] = bf16_pair(j < cols ? v0[d] : zero, j + 1 < cols ? v0[sv.t + d] : zero);
              }
            }
            std::fill(dst + D, dst + Dp, U(0));
          }
        }
      }
      const U* qa;  // the query block as rows of Du units
      int64_t ldq;
      if constexpr (kF32) {
        qa = qp;
        ldq = sq.t;
      } else {
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t u = 0; u < Du; ++u)
            Qp[i * Du + u] = bf16_pair(qp[i * sq.t + 2 * u], 2 * u + 1 < D ? qp[i * sq.t + 2 * u + 1] : zero);
        qa = Qp.data();
        ldq = Du;
      }
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.0f);
      std::fill(acc.begin(), acc.begin() + rows * Dp, 0.0f);
      for (int64_t j0 = 0; j0 < L; j0 += BN) {
        const int64_t cols = std::min(BN, L - j0), cols16 = (cols + 15) / 16 * 16;
        // S[rows, cols16] = scale * Q K^T (columns past cols see zero keys: score 0, masked below)
        micro_gemm<Mk>(rows, cols16 / 16, Du, qa, ldq, Kp.data() + (j0 / BN) * Du * BN, BN, S.data(), BN, scale, false);
        for (int64_t i = 0; i < rows; ++i) {
          float alpha, sum;
          float* srow = S.data() + i * BN;
          if constexpr (kF32) {
            softmax_row_to<float>(srow, srow, cols, cols16, &m[i], &alpha, &sum);
          } else {
            softmax_row_to<Tin>(srow, P.data() + i * BN, cols, cols16, &m[i], &alpha, &sum);
          }
          l[i] = l[i] * alpha + sum;
          if (alpha != 1.0f) {
            float* a = acc.data() + i * Dp;
            for (int64_t d = 0; d < Dp; ++d) a[d] *= alpha;
          }
        }
        // acc[rows, Dp] += P[rows, cols16] V[j0:j0+cols16, Dp] (P is 0 past cols, V is 0 past L)
        const U* pa;
        if constexpr (kF32) pa = S.data(); else pa = reinterpret_cast<const U*>(P.data());
        micro_gemm<Mk>(rows, Dp / 16, cols16 / kPerUnit, pa, BN / kPerUnit, Vp.data() + (j0 / kPerUnit) * Dp, Dp,
                       acc.data(), Dp, 1.0f, true);
      }
      for (int64_t i = 0; i < rows; ++i) {
        const float w = hm / l[i];
        const float* a = acc.data() + i * Dp;
        Tin* o = op + i * so.t;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<Tin>(a[d] * w);
      }
    }
  });
}
#endif  // x86

// Tin: the element type of q, k, v and out (float, double, or bf16 with MKL's bf16 GEMM); T: the
// compute type of the scores, softmax statistics and accumulator (float for float/bf16, double).
template <typename Tin, typename T>
void attention_kernel(const Tin* q, Strided sq, const Tin* k, Strided sk, const Tin* v, Strided sv, Tin* out,
                      Strided so, int64_t B, int64_t N, int64_t H, int64_t D, const int32_t* lens, const T* head_mask,
                      T scale) {
  constexpr bool kSame = std::is_same_v<Tin, T>;
  const int64_t BM = kBlockM, BN = kBlockN;
  const int64_t n_qblocks = (N + BM - 1) / BM;
  at::parallel_for(0, B * H * n_qblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> S(BM * BN), acc(BM * D), m(BM), l(BM);
    std::vector<Tin> P(kSame ? 0 : BM * BN);  // bf16: the probabilities rounded for the P V product
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % n_qblocks, bh = task / n_qblocks, h = bh % H, b = bh / H;
      const int64_t t0 = qb * BM, rows = std::min(BM, N - t0);
      const int64_t L = lens == nullptr ? N : lens[b];
      const T hm = head_mask == nullptr ? T(1) : head_mask[h];
      const Tin* qp = q + b * sq.b + t0 * sq.t + h * sq.h;
      const Tin* kp = k + b * sk.b + h * sk.h;
      const Tin* vp = v + b * sv.b + h * sv.h;
      Tin* op = out + b * so.b + t0 * so.t + h * so.h;
      if (L == 0) {  // every key padded: uniform attention over all N keys
        std::fill(acc.begin(), acc.begin() + D, T(0));
        for (int64_t j = 0; j < N; ++j)
          for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<T>(vp[j * sv.t + d]);
        const T w = hm / static_cast<T>(N);
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t d = 0; d < D; ++d) op[i * so.t + d] = static_cast<Tin>(acc[d] * w);
        continue;
      }
      std::fill(m.begin(), m.end(), -std::numeric_limits<T>::infinity());
      std::fill(l.begin(), l.end(), T(0));
      for (int64_t j0 = 0; j0 < L; j0 += BN) {
        const int64_t cols = std::min(BN, L - j0);
        // S[rows, cols] = scale * Q[rows, D] K[j0:j0+cols, D]^T
        tile_gemm(true, rows, cols, D, scale, qp, sq.t, kp + j0 * sk.t, sk.t, T(0), S.data(), BN);
        for (int64_t i = 0; i < rows; ++i) {
          T alpha, sum;
          T* srow = S.data() + i * BN;
          softmax_row(srow, cols, &m[i], &alpha, &sum);
          l[i] = l[i] * alpha + sum;
          if constexpr (!kSame) {
            Tin* prow = P.data() + i * BN;
            for (int64_t j = 0; j < cols; ++j) prow[j] = static_cast<Tin>(srow[j]);
          }
          T* a = acc.data() + i * D;
          if (j0 == 0) {
            std::fill(a, a + D, T(0));
          } else if (alpha != T(1)) {
            for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
          }
        }
        // acc[rows, D] += P[rows, cols] V[j0:j0+cols, D]
        const Tin* pp;
        if constexpr (kSame) pp = S.data(); else pp = P.data();
        tile_gemm(false, rows, D, cols, T(1), pp, BN, vp + j0 * sv.t, sv.t, T(1), acc.data(), D);
      }
      for (int64_t i = 0; i < rows; ++i) {
        const T w = hm / l[i];
        const T* a = acc.data() + i * D;
        Tin* o = op + i * so.t;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<Tin>(a[d] * w);
      }
    }
  });
}

Strided strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// Checks shared by attention_fwd and attention_bwd; each names the op and the argument.
void check_like_q(const char* op, const at::Tensor& q, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be [batch, frames, heads, head_dim], got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have the dtype of q (", q.scalar_type(),
              "), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == q.sizes(), op, ": ", name, " must have the shape of q ", q.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, op, ": ", name, " must have a contiguous last dim, got strides ",
              t.strides());
}

void check_blas_size(const char* op, const at::Tensor& q) {
  TORCH_CHECK(q.size(1) * q.size(2) * q.size(3) <= std::numeric_limits<int>::max() && q.size(3) <= 1024, op,
              ": q is too large for the BLAS calls (frames * heads * head_dim must fit in int32, head_dim <= 1024), "
              "got shape ", q.sizes());
}

// seqlens as a contiguous int32 [B] with values in [0, N], or undefined.
at::Tensor checked_lens(const char* op, const std::optional<at::Tensor>& seqlens, int64_t B, int64_t N) {
  if (!seqlens.has_value()) return at::Tensor();
  TORCH_CHECK(seqlens->device().is_cpu(), op, ": seqlens must be a CPU tensor, got device ", seqlens->device());
  TORCH_CHECK(seqlens->scalar_type() == at::kInt, op, ": seqlens must be int32, got ", seqlens->scalar_type());
  TORCH_CHECK(seqlens->dim() == 1 && seqlens->size(0) == B, op, ": seqlens must be [", B, "], got shape ",
              seqlens->sizes());
  at::Tensor lens = seqlens->contiguous();
  const int32_t* lp = lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lp[b] >= 0 && lp[b] <= N, op, ": seqlens[", b, "] must be in [0, ", N, "] (valid keys), got ", lp[b]);
  return lens;
}

// head_mask as a contiguous [H] tensor of the compute dtype, or undefined.
at::Tensor checked_head_mask(const char* op, const std::optional<at::Tensor>& head_mask, int64_t H,
                             at::ScalarType compute) {
  if (!head_mask.has_value()) return at::Tensor();
  TORCH_CHECK(head_mask->device().is_cpu(), op, ": head_mask must be a CPU tensor, got device ", head_mask->device());
  TORCH_CHECK(head_mask->dim() == 1 && head_mask->size(0) == H, op, ": head_mask must be [", H, "], got shape ",
              head_mask->sizes());
  TORCH_CHECK(at::isFloatingType(head_mask->scalar_type()), op, ": head_mask must be floating point, got ",
              head_mask->scalar_type());
  return head_mask->to(compute).contiguous();
}

at::Tensor attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const std::optional<at::Tensor>& seqlens, const std::optional<at::Tensor>& head_mask,
                             double scale) {
  constexpr const char* op = "attention_fwd";
  const char* names[3] = {"q", "k", "v"};
  const at::Tensor* qkv[3] = {&q, &k, &v};
  for (int i = 0; i < 3; ++i) {
    const at::Tensor& t = *qkv[i];
    check_like_q(op, q, t, names[i]);
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble || t.scalar_type() == at::kBFloat16 ||
                    t.scalar_type() == at::kHalf,
                op, ": ", names[i], " must be float32, float64, bfloat16 or float16 on CPU, got ", t.scalar_type());
  }
  check_blas_size(op, q);
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3);
  const bool wide = q.scalar_type() == at::kDouble;
  const at::ScalarType compute = wide ? at::kDouble : at::kFloat;
  const at::Tensor lens = checked_lens(op, seqlens, B, N);
  const at::Tensor hmask = checked_head_mask(op, head_mask, H, compute);

  const int32_t* lens_ptr = lens.defined() ? lens.data_ptr<int32_t>() : nullptr;
#if defined(__x86_64__) || defined(__i386__)
  if (q.scalar_type() == at::kBFloat16 && cpu_has_avx512_bf16()) {
    // bf16 products with fp32 accumulation (VDPBF16PS); scores, softmax statistics and the accumulator in
    // fp32; the probabilities rounded to bf16 for the P V product; the output rounded once.
    at::Tensor out = at::empty({B, N, H, D}, q.options());
    if (out.numel() == 0) return out;
    attention_kernel_avx512<c10::BFloat16>(
        q.data_ptr<c10::BFloat16>(), strides_of(q), k.data_ptr<c10::BFloat16>(), strides_of(k),
        v.data_ptr<c10::BFloat16>(), strides_of(v), out.data_ptr<c10::BFloat16>(), strides_of(out), B, N, H, D,
        lens_ptr, hmask.defined() ? hmask.data_ptr<float>() : nullptr, static_cast<float>(scale));
    return out;
  }
#endif
  if (q.scalar_type() == at::kBFloat16 && has_bf16_gemm()) {
    // bf16 products with fp32 accumulation (MKL); scores, softmax statistics and the accumulator in
    // fp32; the probabilities rounded to bf16 for the P V product; the output rounded once.
    at::Tensor out = at::empty({B, N, H, D}, q.options());
    if (out.numel() == 0) return out;
    attention_kernel<c10::BFloat16, float>(
        q.data_ptr<c10::BFloat16>(), strides_of(q), k.data_ptr<c10::BFloat16>(), strides_of(k),
        v.data_ptr<c10::BFloat16>(), strides_of(v), out.data_ptr<c10::BFloat16>(), strides_of(out), B, N, H, D,
        lens_ptr, hmask.defined() ? hmask.data_ptr<float>() : nullptr, static_cast<float>(scale));
    return out;
  }
  // fp16 (and bf16 without MKL's bf16 GEMM): widen once to fp32 (exact); everything then runs in fp32.
  const bool narrow = q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf;
  const at::Tensor qc = narrow ? q.to(compute) : q, kc = narrow ? k.to(compute) : k, vc = narrow ? v.to(compute) : v;
  at::Tensor out = at::empty({B, N, H, D}, q.options().dtype(compute));
  if (out.numel() == 0) return narrow ? out.to(q.scalar_type()) : out;
  if (wide) {
    attention_kernel<double, double>(qc.data_ptr<double>(), strides_of(qc), kc.data_ptr<double>(), strides_of(kc),
                             vc.data_ptr<double>(), strides_of(vc), out.data_ptr<double>(), strides_of(out), B, N, H,
                             D, lens_ptr, hmask.defined() ? hmask.data_ptr<double>() : nullptr, scale);
  } else {
#if defined(__x86_64__) || defined(__i386__)
    if (cpu_has_avx512_all()) {
      attention_kernel_avx512<float>(qc.data_ptr<float>(), strides_of(qc), kc.data_ptr<float>(), strides_of(kc),
                                     vc.data_ptr<float>(), strides_of(vc), out.data_ptr<float>(), strides_of(out), B, N,
                                     H, D, lens_ptr, hmask.defined() ? hmask.data_ptr<float>() : nullptr,
                                     static_cast<float>(scale));
      return narrow ? out.to(q.scalar_type()) : out;
    }
#endif
    attention_kernel<float, float>(qc.data_ptr<float>(), strides_of(qc), kc.data_ptr<float>(), strides_of(kc),
                            vc.data_ptr<float>(), strides_of(vc), out.data_ptr<float>(), strides_of(out), B, N, H, D,
                            lens_ptr, hmask.defined() ? hmask.data_ptr<float>() : nullptr, static_cast<float>(scale));
  }
  return narrow ? out.to(q.scalar_type()) : out;
}

// ---------------------------------------------------------------------------------------------- backward
// attention_bwd: gradients of out = hm_h softmax(s) V (s = scale q k^T over the valid keys) for fp32 / fp64,
// recomputing the probabilities (two passes per (batch, head): the row logsumexp, then the gradients):
//   dO' = hm_h dO,  delta_i = sum_d dO'[i, d] O'[i, d] = sum_d dO[i, d] out[i, d]  (O' = out / hm_h),
//   P = e^{s - lse},  dV = P^T dO',  dP = dO' V^T,  dS = P (dP - delta),  dQ = scale dS K,  dK = scale dS^T Q.
// Keys at or past L get no gradient; every query row (padded ones too) contributes, as in the reference. A
// row with L = 0 attends uniformly to all N keys: dQ = dK = 0 and dV[j] = hm_h / N sum_i dO[i]. The gradient
// of head_mask is not computed here (the autograd formula takes another path when it is needed). One task
// per (batch, head), so dQ, dK and dV are written without races; BLAS GEMMs on one thread each, their
// tile results summed in fp64 (working memory per thread: 3 N D doubles).
template <typename T>
void attention_bwd_kernel(const T* dout, const T* q, Strided sq, const T* k, Strided sk, const T* v, Strided sv,
                          const T* out, Strided so, Strided sd, T* dq, T* dk, T* dv, int64_t B, int64_t N, int64_t H,
                          int64_t D, const int32_t* lens, const T* head_mask, T scale) {
  const int64_t BM = kBlockM, BN = kBlockN;
  const Strided sg{N * H * D, H * D, D};  // dq, dk, dv: contiguous [B, N, H, D]
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> S(BM * BN), dP(BM * BN), dO(BM * D), lse(N), delta(BM), part(std::max(BM, BN) * D);
    // dq, dk, dv of the task's (batch, head) summed in fp64 over the tiles (each tile's product is a BLAS
    // GEMM in T): the sums over up to N query rows would otherwise add T's rounding once per query block.
    std::vector<double> gq(N * D), gk(N * D), gv(N * D);
    const auto add_to = [&](double* acc, int64_t n_rows) {
      for (int64_t x = 0; x < n_rows * D; ++x) acc[x] += static_cast<double>(part[x]);
    };
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t h = bh % H, b = bh / H;
      const int64_t L = lens == nullptr ? N : lens[b];
      const T hm = head_mask == nullptr ? T(1) : head_mask[h];
      const T* qp = q + b * sq.b + h * sq.h;
      const T* kp = k + b * sk.b + h * sk.h;
      const T* vp = v + b * sv.b + h * sv.h;
      const T* op = out + b * so.b + h * so.h;
      const T* gp = dout + b * sd.b + h * sd.h;
      T* dqp = dq + b * sg.b + h * sg.h;
      T* dkp = dk + b * sg.b + h * sg.h;
      T* dvp = dv + b * sg.b + h * sg.h;
      if (L == 0) {
        std::vector<double> colsum(D, 0.0);
        for (int64_t i = 0; i < N; ++i)
          for (int64_t d = 0; d < D; ++d) colsum[d] += static_cast<double>(gp[i * sd.t + d]);
        for (int64_t j = 0; j < N; ++j)
          for (int64_t d = 0; d < D; ++d) dvp[j * sg.t + d] = static_cast<T>(colsum[d] * hm / static_cast<double>(N));
        continue;  // dq, dk stay zero
      }
      // Pass 1: lse_i = m_i + log l_i over the valid keys.
      for (int64_t t0 = 0; t0 < N; t0 += BM) {
        const int64_t rows = std::min(BM, N - t0);
        std::vector<T> m(rows, -std::numeric_limits<T>::infinity()), l(rows, T(0));
        for (int64_t j0 = 0; j0 < L; j0 += BN) {
          const int64_t cols = std::min(BN, L - j0);
          gemm_rm<T>(false, true, rows, cols, D, scale, qp + t0 * sq.t, sq.t, kp + j0 * sk.t, sk.t, T(0), S.data(), BN);
          for (int64_t i = 0; i < rows; ++i) {
            T alpha, sum;
            softmax_row(S.data() + i * BN, cols, &m[i], &alpha, &sum);
            l[i] = l[i] * alpha + sum;
          }
        }
        for (int64_t i = 0; i < rows; ++i) lse[t0 + i] = m[i] + std::log(l[i]);
      }
      // Pass 2: the gradients, per tile.
      std::fill(gq.begin(), gq.end(), 0.0);
      std::fill(gk.begin(), gk.begin() + L * D, 0.0);
      std::fill(gv.begin(), gv.begin() + L * D, 0.0);
      for (int64_t t0 = 0; t0 < N; t0 += BM) {
        const int64_t rows = std::min(BM, N - t0);
        for (int64_t i = 0; i < rows; ++i) {
          T dl = T(0);
          for (int64_t d = 0; d < D; ++d) {
            const T g = gp[(t0 + i) * sd.t + d];
            dO[i * D + d] = hm * g;
            dl += g * op[(t0 + i) * so.t + d];
          }
          delta[i] = dl;
        }
        for (int64_t j0 = 0; j0 < L; j0 += BN) {
          const int64_t cols = std::min(BN, L - j0);
          gemm_rm<T>(false, true, rows, cols, D, scale, qp + t0 * sq.t, sq.t, kp + j0 * sk.t, sk.t, T(0), S.data(), BN);
          for (int64_t i = 0; i < rows; ++i) {
            T* srow = S.data() + i * BN;
            for (int64_t j = 0; j < cols; ++j) srow[j] = exp_of(srow[j] - lse[t0 + i]);
          }
          // dV[j0:, D] += P^T dO'
          gemm_rm<T>(true, false, cols, D, rows, T(1), S.data(), BN, dO.data(), D, T(0), part.data(), D);
          add_to(gv.data() + j0 * D, cols);
          // dP = dO' V^T, then dS = P (dP - delta) in place
          gemm_rm<T>(false, true, rows, cols, D, T(1), dO.data(), D, vp + j0 * sv.t, sv.t, T(0), dP.data(), BN);
          for (int64_t i = 0; i < rows; ++i) {
            const T* prow = S.data() + i * BN;
            T* drow = dP.data() + i * BN;
            for (int64_t j = 0; j < cols; ++j) drow[j] = prow[j] * (drow[j] - delta[i]);
          }
          // dQ += scale dS K,  dK += scale dS^T Q
          gemm_rm<T>(false, false, rows, D, cols, scale, dP.data(), BN, kp + j0 * sk.t, sk.t, T(0), part.data(), D);
          add_to(gq.data() + t0 * D, rows);
          gemm_rm<T>(true, false, cols, D, rows, scale, dP.data(), BN, qp + t0 * sq.t, sq.t, T(0), part.data(), D);
          add_to(gk.data() + j0 * D, cols);
        }
      }
      for (int64_t t = 0; t < N; ++t)
        for (int64_t d = 0; d < D; ++d) {
          dqp[t * sg.t + d] = static_cast<T>(gq[t * D + d]);
          if (t < L) {
            dkp[t * sg.t + d] = static_cast<T>(gk[t * D + d]);
            dvp[t * sg.t + d] = static_cast<T>(gv[t * D + d]);
          }
        }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const std::optional<at::Tensor>& seqlens, const std::optional<at::Tensor>& head_mask, double scale) {
  constexpr const char* op = "attention_bwd";
  const char* names[5] = {"grad_out", "q", "k", "v", "out"};
  const at::Tensor* ts[5] = {&grad_out, &q, &k, &v, &out};
  for (int i = 0; i < 5; ++i) {
    check_like_q(op, q, *ts[i], names[i]);
    TORCH_CHECK(ts[i]->scalar_type() == at::kFloat || ts[i]->scalar_type() == at::kDouble, op, ": ", names[i],
                " must be float32 or float64 (the backward of half inputs runs elsewhere), got ",
                ts[i]->scalar_type());
  }
  check_blas_size(op, q);
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3);
  const at::Tensor lens = checked_lens(op, seqlens, B, N);
  const at::Tensor hmask = checked_head_mask(op, head_mask, H, q.scalar_type());
  at::Tensor dq = at::zeros({B, N, H, D}, q.options()), dk = at::zeros_like(dq), dv = at::zeros_like(dq);
  if (dq.numel() == 0) return {dq, dk, dv};
  const int32_t* lens_ptr = lens.defined() ? lens.data_ptr<int32_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attention_bwd", [&] {
    attention_bwd_kernel<scalar_t>(grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), strides_of(q),
                                   k.data_ptr<scalar_t>(), strides_of(k), v.data_ptr<scalar_t>(), strides_of(v),
                                   out.data_ptr<scalar_t>(), strides_of(out), strides_of(grad_out),
                                   dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), B, N, H,
                                   D,
                                   lens_ptr, hmask.defined() ? hmask.data_ptr<scalar_t>() : nullptr,
                                   static_cast<scalar_t>(scale));
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(unispeech_fast, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace unispeech_fast
