// Shared helpers of the CUDA kernels of unispeech_fast._C: argument checks that name the argument,
// dtype conversion to fp32, exact GELU, warp reductions and Welford/Chan statistics.
//
// Light headers only: no torch/extension.h (slow) and no ATen/cuda/CUDAContext.h (it pulls cuBLAS
// headers the CI toolkit lacks); streams and guards come from c10/cuda.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <cstdint>

// Argument checks; `name` may be a literal or a runtime C string.
#define USF_CHECK_CUDA(x, name) TORCH_CHECK((x).is_cuda(), name, " must be a CUDA tensor, got device ", (x).device())
#define USF_CHECK_CONTIGUOUS(x, name) TORCH_CHECK((x).is_contiguous(), name, " must be contiguous")
#define USF_CHECK_DIM(x, n, name) \
  TORCH_CHECK((x).dim() == (n), name, " must have ", (n), " dims, got shape ", (x).sizes())
#define USF_CHECK_FLOATING(x, name)                                                                       \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf ||                        \
                  (x).scalar_type() == at::kBFloat16,                                                     \
              name, " must be float32, float16 or bfloat16, got ", (x).scalar_type())
#define USF_CHECK_SAME_DEVICE(x, y, xname, yname)                                                  \
  TORCH_CHECK((x).device() == (y).device(), xname, " and ", yname, " must be on the same device, got ", \
              (x).device(), " and ", (y).device())

// Dispatch over the three supported dtypes only (AT_DISPATCH_FLOATING_TYPES_AND2 would add double).
#define USF_DISPATCH_FLOATING(TYPE, NAME, ...)                                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                        \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)                     \
                                         AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace unispeech_fast {
namespace cuda {

constexpr int kWarp = 32;

template <typename T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v) {
  return static_cast<T>(v);
}

// Exact GELU: 0.5 x (1 + erf(x / sqrt(2))), and its derivative Phi(x) + x phi(x).
__device__ __forceinline__ float gelu(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

__device__ __forceinline__ float gelu_grad(float x) {
  const float cdf = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
  const float pdf = 0.39894228040143268f * expf(-0.5f * x * x);
  return cdf + x * pdf;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Running statistics of a set of values: count n, mean, and M2 = sum (x - mean)^2.
struct Welford {
  float n = 0.f, mean = 0.f, m2 = 0.f;

  __device__ __forceinline__ void add(float x) {
    n += 1.f;
    const float d = x - mean;
    mean += d / n;
    m2 += d * (x - mean);
  }

  // Chan et al.: merge the statistics of another disjoint set.
  __device__ __forceinline__ void merge(float n2, float mean2, float m22) {
    if (n2 == 0.f) return;
    const float total = n + n2;
    const float d = mean2 - mean;
    const float w = n2 / total;
    mean += d * w;
    m2 += m22 + d * d * n * w;
    n = total;
  }

  __device__ __forceinline__ void warp_merge() {
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) {
      const float n2 = __shfl_xor_sync(0xffffffffu, n, o);
      const float mean2 = __shfl_xor_sync(0xffffffffu, mean, o);
      const float m22 = __shfl_xor_sync(0xffffffffu, m2, o);
      merge(n2, mean2, m22);
    }
  }
};

__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cuda
}  // namespace unispeech_fast
