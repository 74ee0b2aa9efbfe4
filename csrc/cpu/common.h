// Shared helpers of the CPU kernels: argument checks, a row-major GEMM on BLAS, and exact-GELU math
// written so that GCC vectorises it, compiled twice (baseline x86-64 and AVX2+FMA) and picked at run
// time, so the binary runs on any x86-64 machine and uses AVX2 where the CPU has it.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace unispeech_fast {

// ---------------------------------------------------------------------------------------------- checks
// Every check names the op and the argument, and says what was expected.
inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64 on CPU, got ", t.scalar_type());
}

inline void check_cpu_contiguous(const at::Tensor& t, const char* op, const char* name, int64_t ndim) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == ndim, op, ": ", name, " must have ", ndim, " dims, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (strides ", t.strides(), ")");
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                             const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* op, const char* name) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ", t.sizes());
}

// ---------------------------------------------------------------------------------------------- GEMM
// C[M, N] = alpha * op(A)[M, K] @ op(B)[K, N] + beta * C, all row-major with leading dims lda/ldb/ldc
// (op = transpose when trans_*). Single-threaded when called inside at::parallel_for (MKL runs
// nested calls on one thread). Uses the Fortran BLAS that libtorch exports (MKL on x86-64 wheels);
// where it does not export one, a plain loop nest computes the same sums.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

template <typename T>
inline void gemm_fallback(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
                          const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    for (int64_t p = 0; p < K; ++p) {
      const T a = alpha * (ta ? A[p * lda + i] : A[i * lda + p]);
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] += a * (tb ? B[j * ldb + p] : B[p * ldb + j]);
    }
  }
}

template <typename T>
inline void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
                    const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands.
  const char ca = tb ? 'T' : 'N', cb = ta ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int l_a = static_cast<int>(ldb), l_b = static_cast<int>(lda), l_c = static_cast<int>(ldc);
  if (K == 0) {
    gemm_fallback(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) {
      sgemm_(&ca, &cb, &m, &n, &k, &alpha, B, &l_a, A, &l_b, &beta, C, &l_c);
      return;
    }
  } else {
    if (dgemm_ != nullptr) {
      dgemm_(&ca, &cb, &m, &n, &k, &alpha, B, &l_a, A, &l_b, &beta, C, &l_c);
      return;
    }
  }
  gemm_fallback(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

// ---------------------------------------------------------------------------------------------- math
#define USF_INLINE inline __attribute__((always_inline))

// exp(x) for float: x = n ln2 + r, |r| <= ln2/2, exp(r) by the Cephes degree-7 polynomial, 2^n by
// building the exponent bits. Relative error about 1 ulp on [-87, 88]; clamps outside.
USF_INLINE float exp_f32(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float fx = x * 1.44269504088896341f;
  const int32_t ni = static_cast<int32_t>(fx + (fx >= 0.0f ? 0.5f : -0.5f));
  const float n = static_cast<float>(ni);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  return p * std::bit_cast<float>((ni + 127) << 23);
}

// erf(x) for float by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7), the same approximation
// PyTorch's vectorised CPU erf uses.
USF_INLINE float erf_f32(float x) {
  const float ax = std::fabs(x);
  const float t = 1.0f / (1.0f + 0.3275911f * ax);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const float y = 1.0f - p * t * exp_f32(-ax * ax);
  return x < 0.0f ? -y : y;
}

// Exact GELU: gelu(x) = x Phi(x) = x/2 (1 + erf(x / sqrt 2)); gelu'(x) = Phi(x) + x phi(x).
USF_INLINE float gelu_val(float x) { return 0.5f * x * (1.0f + erf_f32(x * 0.70710678118654752f)); }
USF_INLINE double gelu_val(double x) { return 0.5 * x * (1.0 + std::erf(x * 0.70710678118654752)); }
USF_INLINE float gelu_grad(float x) {
  return 0.5f * (1.0f + erf_f32(x * 0.70710678118654752f)) + x * 0.3989422804014327f * exp_f32(-0.5f * x * x);
}
USF_INLINE double gelu_grad(double x) {
  return 0.5 * (1.0 + std::erf(x * 0.70710678118654752)) + x * 0.3989422804014327 * std::exp(-0.5 * x * x);
}

// ---------------------------------------------------------------------------------------------- ISA
inline bool cpu_has_avx2_fma() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

#if defined(__x86_64__) || defined(__i386__)
#define USF_TARGET_AVX2 __attribute__((target("avx2,fma")))
// Defines NAME(params) calling IMPL(args), compiled for baseline x86-64 and for AVX2+FMA, choosing
// at run time. IMPL must be declared USF_INLINE so each copy inlines (and vectorises) its own body.
#define USF_MULTIVERSION(NAME, IMPL, PARAMS, ARGS)                                    \
  static void NAME##_base PARAMS { IMPL ARGS; }                                       \
  USF_TARGET_AVX2 static void NAME##_avx2 PARAMS { IMPL ARGS; }                       \
  static void NAME PARAMS {                                                           \
    if (::unispeech_fast::cpu_has_avx2_fma()) NAME##_avx2 ARGS; else NAME##_base ARGS; \
  }
#else
#define USF_MULTIVERSION(NAME, IMPL, PARAMS, ARGS) \
  static void NAME PARAMS { IMPL ARGS; }
#endif

}  // namespace unispeech_fast
