// attention_fwd on CPU (schema in csrc/schemas.cpp): flash attention with an online softmax, tiled
// for cache, fp32 / bf16 / fp64. Forward only; the autograd formula recomputes the eager reference
// (unispeech_fast/ops/_attention_cpp.py).
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
// picked at run time. Working set per task: S (64 x 256 fp32, 64 KiB), the K and V blocks
// (2 x 256 x D) and the accumulator (64 x D): within L2 for D <= 128.
//
// Precision: fp32 inputs compute in fp32; bf16 (and fp16) inputs are widened to fp32 once (exact),
// so the products, the softmax statistics and the accumulator are fp32, and the output is rounded to
// the input dtype once at the end; fp64 computes in fp64 (a reference-accuracy path).
#include <torch/library.h>

#include <limits>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "common.h"

namespace unispeech_fast {
namespace {

constexpr int64_t kBlockM = 64;   // queries per task
constexpr int64_t kBlockN = 256;  // keys per tile

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

template <typename T>
void attention_kernel(const T* q, Strided sq, const T* k, Strided sk, const T* v, Strided sv, T* out, Strided so,
                      int64_t B, int64_t N, int64_t H, int64_t D, const int32_t* lens, const T* head_mask, T scale) {
  const int64_t n_qblocks = (N + kBlockM - 1) / kBlockM;
  at::parallel_for(0, B * H * n_qblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> S(kBlockM * kBlockN), acc(kBlockM * D), m(kBlockM), l(kBlockM);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % n_qblocks, bh = task / n_qblocks, h = bh % H, b = bh / H;
      const int64_t t0 = qb * kBlockM, rows = std::min(kBlockM, N - t0);
      const int64_t L = lens == nullptr ? N : lens[b];
      const T hm = head_mask == nullptr ? T(1) : head_mask[h];
      const T* qp = q + b * sq.b + t0 * sq.t + h * sq.h;
      const T* kp = k + b * sk.b + h * sk.h;
      const T* vp = v + b * sv.b + h * sv.h;
      T* op = out + b * so.b + t0 * so.t + h * so.h;
      if (L == 0) {  // every key padded: uniform attention over all N keys
        std::fill(acc.begin(), acc.begin() + D, T(0));
        for (int64_t j = 0; j < N; ++j)
          for (int64_t d = 0; d < D; ++d) acc[d] += vp[j * sv.t + d];
        const T w = hm / static_cast<T>(N);
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t d = 0; d < D; ++d) op[i * so.t + d] = acc[d] * w;
        continue;
      }
      std::fill(m.begin(), m.end(), -std::numeric_limits<T>::infinity());
      std::fill(l.begin(), l.end(), T(0));
      for (int64_t j0 = 0; j0 < L; j0 += kBlockN) {
        const int64_t cols = std::min(kBlockN, L - j0);
        // S[rows, cols] = scale * Q[rows, D] K[j0:j0+cols, D]^T
        gemm_rm<T>(false, true, rows, cols, D, scale, qp, sq.t, kp + j0 * sk.t, sk.t, T(0), S.data(), kBlockN);
        for (int64_t i = 0; i < rows; ++i) {
          T alpha, sum;
          softmax_row(S.data() + i * kBlockN, cols, &m[i], &alpha, &sum);
          l[i] = l[i] * alpha + sum;
          T* a = acc.data() + i * D;
          if (j0 == 0) {
            std::fill(a, a + D, T(0));
          } else if (alpha != T(1)) {
            for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
          }
        }
        // acc[rows, D] += P[rows, cols] V[j0:j0+cols, D]
        gemm_rm<T>(false, false, rows, D, cols, T(1), S.data(), kBlockN, vp + j0 * sv.t, sv.t, T(1), acc.data(), D);
      }
      for (int64_t i = 0; i < rows; ++i) {
        const T w = hm / l[i];
        const T* a = acc.data() + i * D;
        T* o = op + i * so.t;
        for (int64_t d = 0; d < D; ++d) o[d] = a[d] * w;
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

  // bf16/fp16: widen once to fp32 (exact); the product tiles and the softmax then run in fp32.
  const bool narrow = q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf;
  const at::Tensor qc = narrow ? q.to(compute) : q, kc = narrow ? k.to(compute) : k, vc = narrow ? v.to(compute) : v;
  at::Tensor out = at::empty({B, N, H, D}, q.options().dtype(compute));
  if (out.numel() == 0) return narrow ? out.to(q.scalar_type()) : out;
  const int32_t* lens_ptr = lens.defined() ? lens.data_ptr<int32_t>() : nullptr;
  if (wide) {
    attention_kernel<double>(qc.data_ptr<double>(), strides_of(qc), kc.data_ptr<double>(), strides_of(kc),
                             vc.data_ptr<double>(), strides_of(vc), out.data_ptr<double>(), strides_of(out), B, N, H,
                             D, lens_ptr, hmask.defined() ? hmask.data_ptr<double>() : nullptr, scale);
  } else {
    attention_kernel<float>(qc.data_ptr<float>(), strides_of(qc), kc.data_ptr<float>(), strides_of(kc),
                            vc.data_ptr<float>(), strides_of(vc), out.data_ptr<float>(), strides_of(out), B, N, H, D,
                            lens_ptr, hmask.defined() ? hmask.data_ptr<float>() : nullptr, static_cast<float>(scale));
  }
  return narrow ? out.to(q.scalar_type()) : out;
}

}  // namespace

TORCH_LIBRARY_IMPL(unispeech_fast, CPU, m) { m.impl("attention_fwd", &attention_fwd_cpu); }

}  // namespace unispeech_fast
