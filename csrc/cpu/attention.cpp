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
// key blocks of kBlockN keys. The two products per tile (S = scale Q K^T and acc += P V) are BLAS
// GEMMs on the strided [B, T, H, D] views (one thread each inside parallel_for); the softmax pass over
// S is explicit AVX-512 where the CPU has it, else compiled for AVX2+FMA or baseline x86-64 and
// picked at run time. Working set per task: S (128 x 384 fp32, 192 KiB), the K and V blocks
// (2 x 384 x D) and the accumulator (128 x D): about 420 KiB at D = 64, within a 1 MiB L2.
//
// Precision: fp32 inputs compute in fp32; fp64 in fp64 (a reference-accuracy path). bf16 inputs use
// MKL's bf16 GEMM (bf16 products, fp32 accumulation) for both products, with the scores, softmax
// statistics and accumulator in fp32 and the probabilities rounded to bf16 for the P V product (as
// ATen's CPU flash attention does); the output is rounded to bf16 once. fp16 inputs, and bf16 where
// libtorch exports no bf16 GEMM, are widened to fp32 once (exact) and computed in fp32.
#include <torch/library.h>

#include <limits>
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

inline bool cpu_has_avx512f() {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
}

// exp_f32 of common.h on 16 lanes (same reduction and polynomial; 2^n by scalef). x <= 0 here.
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

USF_TARGET_AVX512 void softmax_row_avx512(float* s, int64_t n, float* m, float* alpha, float* sum) {
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 vmax = neg_inf;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(s + j));
  const __mmask16 tail = static_cast<__mmask16>((1u << (n - j)) - 1u);
  if (j < n) vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(neg_inf, tail, s + j));
  const float mx = std::max(*m, _mm512_reduce_max_ps(vmax));
  const __m512 vm = _mm512_set1_ps(mx);
  __m512 vsum = _mm512_setzero_ps();
  j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 p = exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(s + j), vm));
    _mm512_storeu_ps(s + j, p);
    vsum = _mm512_add_ps(vsum, p);
  }
  if (j < n) {
    const __m512 p = exp_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + j), vm));
    _mm512_mask_storeu_ps(s + j, tail, p);
    vsum = _mm512_mask_add_ps(vsum, tail, vsum, p);
  }
  *alpha = *m == -std::numeric_limits<float>::infinity() ? 0.0f : exp_f32(*m - mx);
  *m = mx;
  *sum = _mm512_reduce_add_ps(vsum);
}
#endif

void softmax_row(float* s, int64_t n, float* m, float* alpha, float* sum) {
#if defined(__x86_64__) || defined(__i386__)
  if (cpu_has_avx512f()) return softmax_row_avx512(s, n, m, alpha, sum);
#endif
  softmax_row_generic(s, n, m, alpha, sum);
}

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

at::Tensor attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const std::optional<at::Tensor>& seqlens, const std::optional<at::Tensor>& head_mask,
                             double scale) {
  constexpr const char* op = "attention_fwd";
  const char* names[3] = {"q", "k", "v"};
  const at::Tensor* qkv[3] = {&q, &k, &v};
  for (int i = 0; i < 3; ++i) {
    const at::Tensor& t = *qkv[i];
    TORCH_CHECK(t.device().is_cpu(), op, ": ", names[i], " must be a CPU tensor, got device ", t.device());
    TORCH_CHECK(t.dim() == 4, op, ": ", names[i], " must be [batch, frames, heads, head_dim], got shape ", t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble || t.scalar_type() == at::kBFloat16 ||
                    t.scalar_type() == at::kHalf,
                op, ": ", names[i], " must be float32, float64, bfloat16 or float16 on CPU, got ", t.scalar_type());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", names[i], " must have the dtype of q (",
                q.scalar_type(), "), got ", t.scalar_type());
    TORCH_CHECK(t.sizes() == q.sizes(), op, ": ", names[i], " must have the shape of q ", q.sizes(), ", got ",
                t.sizes());
    TORCH_CHECK(t.size(3) <= 1 || t.stride(3) == 1, op, ": ", names[i],
                " must have a contiguous last dim, got strides ", t.strides());
  }
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3);
  TORCH_CHECK(N * H * D <= std::numeric_limits<int>::max() && D <= 1024, op,
              ": q is too large for the BLAS calls (frames * heads * head_dim must fit in int32, head_dim <= 1024), "
              "got shape ", q.sizes());
  const bool wide = q.scalar_type() == at::kDouble;
  const at::ScalarType compute = wide ? at::kDouble : at::kFloat;

  at::Tensor lens;
  if (seqlens.has_value()) {
    TORCH_CHECK(seqlens->device().is_cpu(), op, ": seqlens must be a CPU tensor, got device ", seqlens->device());
    TORCH_CHECK(seqlens->scalar_type() == at::kInt, op, ": seqlens must be int32, got ", seqlens->scalar_type());
    TORCH_CHECK(seqlens->dim() == 1 && seqlens->size(0) == B, op, ": seqlens must be [", B, "], got shape ",
                seqlens->sizes());
    lens = seqlens->contiguous();
    const int32_t* lp = lens.data_ptr<int32_t>();
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(lp[b] >= 0 && lp[b] <= N, op, ": seqlens[", b, "] must be in [0, ", N, "] (valid keys), got ",
                  lp[b]);
  }
  at::Tensor hmask;
  if (head_mask.has_value()) {
    TORCH_CHECK(head_mask->device().is_cpu(), op, ": head_mask must be a CPU tensor, got device ",
                head_mask->device());
    TORCH_CHECK(head_mask->dim() == 1 && head_mask->size(0) == H, op, ": head_mask must be [", H, "], got shape ",
                head_mask->sizes());
    TORCH_CHECK(at::isFloatingType(head_mask->scalar_type()), op, ": head_mask must be floating point, got ",
                head_mask->scalar_type());
    hmask = head_mask->to(compute).contiguous();
  }

  const int32_t* lens_ptr = lens.defined() ? lens.data_ptr<int32_t>() : nullptr;
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
    attention_kernel<float, float>(qc.data_ptr<float>(), strides_of(qc), kc.data_ptr<float>(), strides_of(kc),
                            vc.data_ptr<float>(), strides_of(vc), out.data_ptr<float>(), strides_of(out), B, N, H, D,
                            lens_ptr, hmask.defined() ? hmask.data_ptr<float>() : nullptr, static_cast<float>(scale));
  }
  return narrow ? out.to(q.scalar_type()) : out;
}

}  // namespace

TORCH_LIBRARY_IMPL(unispeech_fast, CPU, m) { m.impl("attention_fwd", &attention_fwd_cpu); }

}  // namespace unispeech_fast
