// Uniform floats from random bits, shared by the CUDA kernels and a host-compiled CPU test
// (tests/ops/test_gumbel_quantizer.py compiles this header with the host compiler and checks all 2^23 outputs).
// Plain C++: no CUDA or torch headers, so the host compiler builds it unchanged.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define USF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define USF_HOST_DEVICE inline
#endif

namespace unispeech_fast {

// u in [2^-24, 1 - 2^-24], never 0 or 1, from the top 23 bits of `bits`: u = (2 k + 1) / 2^24 with
// k = bits >> 9, exactly representable in fp32 (at most 24 significant bits), so -log(-log(u)) is finite.
// (Rounding (bits >> 8) + 0.5f instead would map the top code to 2^24 / 2^24 = 1 and give +inf.)
USF_HOST_DEVICE float uniform_open01(uint32_t bits) {
  return static_cast<float>(((bits >> 9) << 1) | 1u) * (1.0f / 16777216.0f);
}

}  // namespace unispeech_fast
