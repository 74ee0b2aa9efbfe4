// gumbel_quantizer_fwd / gumbel_quantizer_bwd on CUDA: the Gumbel product vector quantizer.
//
// UNVERIFIED ON HARDWARE: written and compile-checked (nvcc 13, sm_80/sm_90) on a machine without a
// GPU; tests/ops/test_gumbel_quantizer.py compares it with the eager reference where a GPU exists.
//
// Shapes: logits [N, G*V], codevectors [G*V, Dg] (same dtype), quantized [N, G*Dg].
// Forward, per row n and group g (l = logits[n, g, :]):
//   z = l + noise (sample) or z = l (eval); idx = argmax_v z (lowest index on ties)
//   quantized[n, g] = codevectors[g*V + idx];  soft[n, g] = softmax(z / tau) (fp32, sample only)
//   m[g] = mean_n softmax(l[n, g]) (sample) or mean_n onehot(idx) (eval)
//   perplexity = sum_g exp(-sum_v m log m)   (0 log 0 = 0)
//   With mask (bool [N]) the mean runs over the rows where it is true: m = (sum of those rows) / count,
//   as csrc/cpu/gumbel_quantizer.cpp; count = 0 gives a NaN perplexity (and no perplexity gradient), and so
//   does N = 0 without a mask (eager's mean of no row).
// Noise: the given gumbels, or, when None, n = -log(-log(u)) with u in (0, 1) from Philox4x32-10 keyed by
// `seed` with the counter (element index n*G*V + g*V + v as two 32-bit words, `offset` as two words);
// u = (2 (top 23 bits) + 1) / 2^24 in [2^-24, 1 - 2^-24] (uniform.h). (The CI toolkit has no curand headers, so Philox is written out here;
// the stream is deterministic in (seed, offset) but not the same numbers as torch's or curand's.)
// Backward (straight-through: y = onehot - soft.detach() + soft, so y = onehot in value):
//   gs[n, g, v] = grad_q[n, g] . codevectors[g*V + v]                      (ATen bmm, fp32)
//   grad_l = soft (gs - sum_v soft gs) / tau + p (c - sum_v p c),  p = softmax(l[n, g]),
//   c[g, v] = grad_perplexity * exp(H_g) * (-(log m[g, v] + 1)) / N  with H_g = -sum_v m log m
//            (c = 0 where m = 0: such a v has p = 0 in every row); with mask, N is its count and the
//            second term is added on the rows in the mask only
//   grad_codevectors[g*V + idx[n, g]] += grad_q[n, g]   (fp32 atomics);  eval: grad_l = 0.
//
// Kernels: one warp per (row, group), lanes striding over V and Dg. The marginal is accumulated per
// block in shared memory (fp32) and added to a [G, V] fp32 buffer with one atomic per code and block;
// a one-block kernel turns it into the perplexity (and the coefficients c for the backward).

#include <torch/library.h>

#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <limits>

#include "common.cuh"
#include "uniform.h"

namespace unispeech_fast {
namespace cuda {
namespace {

constexpr int kGqThreads = 256;
constexpr int kGqWarps = kGqThreads / kWarp;
constexpr int kMaxGroups = 32;

// The rows of the (row blocks, G) kernels, one warp per row: warp w of block x takes row x * kGqWarps + w, then
// every row_stride()-th row after it (for (int64_t n = first_row(); n < rows; n += row_stride())).
__device__ __forceinline__ int64_t first_row() {
  return static_cast<int64_t>(blockIdx.x) * kGqWarps + threadIdx.x / kWarp;
}
__device__ __forceinline__ int64_t row_stride() { return static_cast<int64_t>(gridDim.x) * kGqWarps; }

// Philox4x32-10 (Salmon et al., SC'11); returns the first output word.
__device__ __forceinline__ uint32_t philox_first(uint64_t seed, uint64_t counter_lo, uint64_t counter_hi) {
  uint32_t c0 = static_cast<uint32_t>(counter_lo), c1 = static_cast<uint32_t>(counter_lo >> 32);
  uint32_t c2 = static_cast<uint32_t>(counter_hi), c3 = static_cast<uint32_t>(counter_hi >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

__device__ __forceinline__ float gumbel_noise(uint64_t seed, uint64_t offset, uint64_t element) {
  const uint32_t bits = philox_first(seed, element, offset);
  const float u = uniform_open01(bits);  // in [2^-24, 1 - 2^-24]: the noise is finite
  return -logf(-logf(u));
}

struct NoiseSource {
  const float* gumbels;  // [N, G*V] fp32, or nullptr for Philox
  uint64_t seed, offset;
  __device__ __forceinline__ float at(int64_t element) const {
    return gumbels != nullptr ? gumbels[element] : gumbel_noise(seed, offset, static_cast<uint64_t>(element));
  }
};

// Per (row, group): argmax, gather, indices and (sample) soft. Grid (row blocks, G), rows strided.
template <typename T>
__global__ void __launch_bounds__(kGqThreads) select_kernel(const T* __restrict__ Logits, const T* __restrict__ Code,
                                                            T* __restrict__ Quant, int64_t* __restrict__ Indices,
                                                            float* __restrict__ Soft, NoiseSource noise, int64_t rows,
                                                            int groups, int codes, int dg, float inv_tau, bool sample) {
  const int g = blockIdx.y;
  const int lane = threadIdx.x % kWarp;
  const int64_t gv = static_cast<int64_t>(groups) * codes;
  for (int64_t n = first_row(); n < rows; n += row_stride()) {
    const int64_t base = n * gv + static_cast<int64_t>(g) * codes;
    float best = -INFINITY;
    int best_v = codes;  // beyond any valid index
    for (int v = lane; v < codes; v += kWarp) {
      float z = to_float(Logits[base + v]);
      if (sample) z += noise.at(base + v);
      if (z > best || (best_v == codes && z == z)) {  // first non-NaN value, then strictly larger
        best = z;
        best_v = v;
      }
    }
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int ov = __shfl_xor_sync(0xffffffffu, best_v, o);
      if (ob > best || (ob == best && ov < best_v)) {
        best = ob;
        best_v = ov;
      }
    }
    const int idx = best_v < codes ? best_v : 0;  // all-NaN row: code 0
    if (lane == 0) Indices[n * groups + g] = idx;
    const T* src = Code + (static_cast<int64_t>(g) * codes + idx) * dg;
    T* dst = Quant + n * groups * dg + static_cast<int64_t>(g) * dg;
    for (int d = lane; d < dg; d += kWarp) dst[d] = src[d];
    if (sample) {
      // As eager on CUDA (z / tau with a host scalar is z * (1/tau), then softmax): x = z * inv_tau, its max
      // is best * inv_tau (a positive factor keeps the order), soft = exp(x - max) / sum. ((z - best) * inv_tau
      // and a multiplication by 1/sum rounded differently and twice.)
      const float mx = best * inv_tau;
      float sum = 0.f;
      for (int v = lane; v < codes; v += kWarp) {
        const float z = to_float(Logits[base + v]) + noise.at(base + v);
        sum += expf(z * inv_tau - mx);
      }
      sum = warp_sum(sum);
      for (int v = lane; v < codes; v += kWarp) {
        const float z = to_float(Logits[base + v]) + noise.at(base + v);
        Soft[base + v] = expf(z * inv_tau - mx) / sum;
      }
    }
  }
}

// Marg[g, v] += sum over rows of softmax(l[n, g])_v (sample) or onehot(idx[n, g])_v (eval), over the rows
// where Keep is true (every row when Keep is nullptr). Grid (row blocks, G); dynamic shared memory: V floats.
template <typename T>
__global__ void __launch_bounds__(kGqThreads) marginal_kernel(const T* __restrict__ Logits,
                                                              const int64_t* __restrict__ Indices,
                                                              const bool* __restrict__ Keep,
                                                              float* __restrict__ Marg, int64_t rows, int groups,
                                                              int codes, bool sample) {
  extern __shared__ float marg[];
  const int g = blockIdx.y;
  const int lane = threadIdx.x % kWarp;
  for (int v = threadIdx.x; v < codes; v += blockDim.x) marg[v] = 0.f;
  __syncthreads();
  const int64_t gv = static_cast<int64_t>(groups) * codes;
  for (int64_t n = first_row(); n < rows; n += row_stride()) {
    if (Keep != nullptr && !Keep[n]) continue;  // one row per warp: the whole warp skips it
    if (sample) {
      const T* l = Logits + n * gv + static_cast<int64_t>(g) * codes;
      float mx = -INFINITY;
      for (int v = lane; v < codes; v += kWarp) mx = fmaxf(mx, to_float(l[v]));
      mx = warp_max(mx);
      float sum = 0.f;
      for (int v = lane; v < codes; v += kWarp) sum += expf(to_float(l[v]) - mx);
      const float inv = 1.f / warp_sum(sum);
      for (int v = lane; v < codes; v += kWarp) atomicAdd(&marg[v], expf(to_float(l[v]) - mx) * inv);
    } else if (lane == 0) {
      atomicAdd(&marg[Indices[n * groups + g]], 1.f);
    }
  }
  __syncthreads();
  for (int v = threadIdx.x; v < codes; v += blockDim.x) atomicAdd(&Marg[static_cast<int64_t>(g) * codes + v], marg[v]);
}

// One block of G warps: perplexity = sum_g exp(H_g) with m = Marg / rows; when Coef is given, also the
// backward coefficients Coef[g, v] = grad_perp * exp(H_g) * (-(log m + 1)) / rows (0 where m = 0).
// With Count (the number of rows in the mask, int64 on the device) it replaces rows; a count of 0 gives
// a NaN perplexity and zero coefficients (the CPU kernel's rule).
__global__ void perplexity_kernel(const float* __restrict__ Marg, float* __restrict__ Perp,
                                  const float* __restrict__ GradPerp, float* __restrict__ Coef,
                                  const int64_t* __restrict__ Count, int64_t rows, int groups, int codes) {
  __shared__ float per_group[kMaxGroups];
  const int g = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t count = Count != nullptr ? Count[0] : rows;
  if (count == 0) {
    if (Coef != nullptr)
      for (int v = lane; v < codes; v += kWarp) Coef[static_cast<int64_t>(g) * codes + v] = 0.f;
    if (threadIdx.x == 0 && Perp != nullptr) Perp[0] = NAN;
    return;
  }
  const float inv_rows = 1.f / static_cast<float>(count);
  const float* m = Marg + static_cast<int64_t>(g) * codes;
  float acc = 0.f;
  for (int v = lane; v < codes; v += kWarp) {
    const float p = m[v] * inv_rows;
    if (p > 0.f) acc -= p * logf(p);
  }
  const float e = expf(warp_sum(acc));
  if (lane == 0) per_group[g] = e;
  if (Coef != nullptr) {
    const float scale = GradPerp[0] * e * inv_rows;
    for (int v = lane; v < codes; v += kWarp) {
      const float p = m[v] * inv_rows;
      Coef[static_cast<int64_t>(g) * codes + v] = p > 0.f ? -scale * (logf(p) + 1.f) : 0.f;
    }
  }
  __syncthreads();
  if (threadIdx.x == 0 && Perp != nullptr) {
    float total = 0.f;
    for (int i = 0; i < groups; ++i) total += per_group[i];
    Perp[0] = total;
  }
}

// grad_codevectors (all modes) and grad_logits (sample; the perplexity term only on rows where Keep is
// true, every row when Keep is nullptr). Grid (row blocks, G).
template <typename T>
__global__ void __launch_bounds__(kGqThreads) backward_kernel(
    const T* __restrict__ GradQ, const T* __restrict__ Logits, const int64_t* __restrict__ Indices,
    const float* __restrict__ Soft, const float* __restrict__ Gs, const float* __restrict__ Coef,
    const bool* __restrict__ Keep, float* __restrict__ GradCode, T* __restrict__ GradLogits, int64_t rows,
    int groups, int codes, int dg, float inv_tau, bool sample) {
  const int g = blockIdx.y;
  const int lane = threadIdx.x % kWarp;
  const int64_t gv = static_cast<int64_t>(groups) * codes;
  for (int64_t n = first_row(); n < rows; n += row_stride()) {
    const int64_t idx = Indices[n * groups + g];
    const T* gq = GradQ + n * groups * dg + static_cast<int64_t>(g) * dg;
    float* gc = GradCode + (static_cast<int64_t>(g) * codes + idx) * dg;
    for (int d = lane; d < dg; d += kWarp) atomicAdd(&gc[d], to_float(gq[d]));
    if (!sample) continue;
    const int64_t base = n * gv + static_cast<int64_t>(g) * codes;
    const float* soft = Soft + base;
    const float* gs = Gs + (static_cast<int64_t>(g) * rows + n) * codes;  // [G, N, V]
    const float* coef = Coef + static_cast<int64_t>(g) * codes;
    const T* l = Logits + base;
    float sg = 0.f, mx = -INFINITY;
    for (int v = lane; v < codes; v += kWarp) {
      sg += soft[v] * gs[v];
      mx = fmaxf(mx, to_float(l[v]));
    }
    sg = warp_sum(sg);
    mx = warp_max(mx);
    if (Keep != nullptr && !Keep[n]) {  // warp-uniform: no perplexity term on rows outside the mask
      for (int v = lane; v < codes; v += kWarp)
        GradLogits[base + v] = from_float<T>(soft[v] * (gs[v] - sg) * inv_tau);
      continue;
    }
    float se = 0.f, sec = 0.f;
    for (int v = lane; v < codes; v += kWarp) {
      const float e = expf(to_float(l[v]) - mx);
      se += e;
      sec += e * coef[v];
    }
    se = warp_sum(se);
    sec = warp_sum(sec);
    const float inv_se = 1.f / se, pc = sec * inv_se;
    for (int v = lane; v < codes; v += kWarp) {
      const float p = expf(to_float(l[v]) - mx) * inv_se;
      GradLogits[base + v] = from_float<T>(soft[v] * (gs[v] - sg) * inv_tau + p * (coef[v] - pc));
    }
  }
}

struct GqShape {
  int64_t rows, groups, codes, dg;
};

GqShape check_gq(const at::Tensor& logits, const at::Tensor& codevectors, int64_t num_groups) {
  USF_CHECK_CUDA(logits, "logits");
  USF_CHECK_DIM(logits, 2, "logits");
  USF_CHECK_FLOATING(logits, "logits");
  USF_CHECK_DIM(codevectors, 2, "codevectors");
  USF_CHECK_SAME_DEVICE(codevectors, logits, "codevectors", "logits");
  TORCH_CHECK(codevectors.scalar_type() == logits.scalar_type(), "codevectors must have the dtype of logits (",
              logits.scalar_type(), "), got ", codevectors.scalar_type());
  TORCH_CHECK(num_groups >= 1 && num_groups <= kMaxGroups, "num_groups must be in [1, ", kMaxGroups, "], got ",
              num_groups);
  TORCH_CHECK(logits.size(1) % num_groups == 0, "logits: last dim ", logits.size(1), " is not divisible by num_groups ",
              num_groups);
  TORCH_CHECK(codevectors.size(0) == logits.size(1), "codevectors must be [", logits.size(1),
              ", D/G] (one row per code), got shape ", codevectors.sizes());
  const int64_t codes = logits.size(1) / num_groups;
  TORCH_CHECK(codes >= 1 && codes <= 12288, "codes per group (V) must be in [1, 12288], got ", codes);
  TORCH_CHECK(codevectors.size(1) <= 0x7fffffff, "codevectors: D/G is too large");
  return {logits.size(0), num_groups, codes, codevectors.size(1)};
}

// The perplexity mask: bool [rows] on the device of logits, made contiguous; undefined when not given.
at::Tensor check_row_mask(const std::optional<at::Tensor>& mask, const at::Tensor& logits, int64_t rows,
                          const char* op) {
  if (!mask.has_value()) return at::Tensor();
  TORCH_CHECK(mask->device() == logits.device() && mask->scalar_type() == at::kBool && mask->dim() == 1 &&
                  mask->size(0) == rows,
              op, ": mask must be a bool tensor of shape [", rows, "] on ", logits.device(), ", got ",
              mask->scalar_type(), " ", mask->sizes(), " on ", mask->device());
  return mask->contiguous();
}

unsigned row_blocks(int64_t rows) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(rows, kGqWarps), 4096)));
}

// 1 / tau as torch computes it for z / tau with a Python float on CUDA: in float, from tau rounded to float.
inline float inv_temperature(double temperature) { return 1.f / static_cast<float>(temperature); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gumbel_quantizer_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& codevectors, int64_t num_groups, double temperature, bool sample,
    const std::optional<at::Tensor>& gumbels, int64_t seed, int64_t offset, const std::optional<at::Tensor>& mask) {
  const GqShape s = check_gq(logits, codevectors, num_groups);
  TORCH_CHECK(temperature > 0.0, "temperature must be > 0, got ", temperature);
  const at::Tensor keep = check_row_mask(mask, logits, s.rows, "gumbel_quantizer_fwd");
  at::Tensor noise;
  if (sample && gumbels.has_value()) {
    USF_CHECK_SAME_DEVICE(*gumbels, logits, "gumbels", "logits");
    TORCH_CHECK(gumbels->sizes() == logits.sizes(), "gumbels must have the shape of logits ", logits.sizes(),
                ", got ", gumbels->sizes());
    noise = gumbels->to(at::kFloat).contiguous();
  }
  c10::cuda::CUDAGuard guard(logits.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor lc = logits.contiguous(), cc = codevectors.contiguous();
  at::Tensor quantized = at::empty({s.rows, s.groups * s.dg}, logits.options());
  at::Tensor indices = at::empty({s.rows, s.groups}, logits.options().dtype(at::kLong));
  at::Tensor soft = sample ? at::empty({s.rows, s.groups, s.codes}, logits.options().dtype(at::kFloat))
                           : at::empty({0}, logits.options());  // empty, in the dtype the fake function gives
  at::Tensor perplexity = at::zeros({}, logits.options().dtype(at::kFloat));
  if (s.rows == 0) {  // the mean of no row: NaN, as eager (and the CPU kernel), with or without a mask
    perplexity.fill_(std::numeric_limits<double>::quiet_NaN());
    return {quantized, indices, soft, perplexity};
  }
  at::Tensor marg = at::zeros({s.groups, s.codes}, logits.options().dtype(at::kFloat));
  const at::Tensor count = keep.defined() ? at::sum(keep, at::kLong) : at::Tensor();  // stays on the device
  const NoiseSource src{noise.defined() ? noise.data_ptr<float>() : nullptr, static_cast<uint64_t>(seed),
                        static_cast<uint64_t>(offset)};
  const dim3 grid(row_blocks(s.rows), static_cast<unsigned>(s.groups));
  USF_DISPATCH_FLOATING(logits.scalar_type(), "gumbel_quantizer_fwd_cuda", [&] {
    select_kernel<scalar_t><<<grid, kGqThreads, 0, stream>>>(
        lc.data_ptr<scalar_t>(), cc.data_ptr<scalar_t>(), quantized.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(),
        sample ? soft.data_ptr<float>() : nullptr, src, s.rows, static_cast<int>(s.groups), static_cast<int>(s.codes),
        static_cast<int>(s.dg), inv_temperature(temperature), sample);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    marginal_kernel<scalar_t><<<grid, kGqThreads, s.codes * sizeof(float), stream>>>(
        lc.data_ptr<scalar_t>(), indices.data_ptr<int64_t>(), keep.defined() ? keep.data_ptr<bool>() : nullptr,
        marg.data_ptr<float>(), s.rows, static_cast<int>(s.groups), static_cast<int>(s.codes), sample);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  perplexity_kernel<<<1, static_cast<unsigned>(s.groups * kWarp), 0, stream>>>(
      marg.data_ptr<float>(), perplexity.data_ptr<float>(), nullptr, nullptr,
      count.defined() ? count.data_ptr<int64_t>() : nullptr, s.rows, static_cast<int>(s.groups),
      static_cast<int>(s.codes));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {quantized, indices, soft, perplexity};
}

std::tuple<at::Tensor, at::Tensor> gumbel_quantizer_bwd_cuda(const at::Tensor& grad_quantized,
                                                             const at::Tensor& grad_perplexity,
                                                             const at::Tensor& logits, const at::Tensor& codevectors,
                                                             const at::Tensor& indices, const at::Tensor& soft,
                                                             int64_t num_groups, double temperature, bool sample,
                                                             const std::optional<at::Tensor>& mask) {
  const GqShape s = check_gq(logits, codevectors, num_groups);
  TORCH_CHECK(temperature > 0.0, "temperature must be > 0, got ", temperature);
  const at::Tensor keep = check_row_mask(mask, logits, s.rows, "gumbel_quantizer_bwd");
  USF_CHECK_SAME_DEVICE(grad_quantized, logits, "grad_quantized", "logits");
  TORCH_CHECK(grad_quantized.dim() == 2 && grad_quantized.size(0) == s.rows && grad_quantized.size(1) == s.groups * s.dg,
              "grad_quantized must be [", s.rows, ", ", s.groups * s.dg, "], got shape ", grad_quantized.sizes());
  TORCH_CHECK(grad_quantized.scalar_type() == logits.scalar_type(), "grad_quantized must have the dtype of logits (",
              logits.scalar_type(), "), got ", grad_quantized.scalar_type());
  USF_CHECK_SAME_DEVICE(indices, logits, "indices", "logits");
  TORCH_CHECK(indices.scalar_type() == at::kLong && indices.dim() == 2 && indices.size(0) == s.rows &&
                  indices.size(1) == s.groups,
              "indices must be int64 [", s.rows, ", ", s.groups, "], got ", indices.scalar_type(), " ",
              indices.sizes());
  if (sample) {
    USF_CHECK_SAME_DEVICE(soft, logits, "soft", "logits");
    TORCH_CHECK(soft.scalar_type() == at::kFloat && soft.dim() == 3 && soft.size(0) == s.rows &&
                    soft.size(1) == s.groups && soft.size(2) == s.codes,
                "soft must be float32 [", s.rows, ", ", s.groups, ", ", s.codes, "] when sample, got ",
                soft.scalar_type(), " ", soft.sizes());
    USF_CHECK_SAME_DEVICE(grad_perplexity, logits, "grad_perplexity", "logits");
    TORCH_CHECK(grad_perplexity.numel() == 1, "grad_perplexity must hold one value, got shape ",
                grad_perplexity.sizes());
  }
  c10::cuda::CUDAGuard guard(logits.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor lc = logits.contiguous(), cc = codevectors.contiguous(), gq = grad_quantized.contiguous();
  const at::Tensor ic = indices.contiguous();
  at::Tensor grad_logits = at::zeros_like(lc);
  at::Tensor grad_code32 = at::zeros(cc.sizes(), cc.options().dtype(at::kFloat));
  if (s.rows == 0) return {grad_logits, grad_code32.to(cc.scalar_type())};
  at::Tensor sc, gs, coef;
  const dim3 grid(row_blocks(s.rows), static_cast<unsigned>(s.groups));
  if (sample) {
    sc = soft.contiguous();
    // gs[g, n, v] = grad_q[n, g] . codevectors[g, v]
    const at::Tensor gq3 = gq.to(at::kFloat).view({s.rows, s.groups, s.dg}).transpose(0, 1);
    const at::Tensor cv3 = cc.to(at::kFloat).view({s.groups, s.codes, s.dg}).transpose(1, 2);
    gs = at::bmm(gq3, cv3).contiguous();
    at::Tensor marg = at::zeros({s.groups, s.codes}, lc.options().dtype(at::kFloat));
    coef = at::empty({s.groups, s.codes}, lc.options().dtype(at::kFloat));
    const at::Tensor gp = grad_perplexity.to(at::kFloat).contiguous();
    const at::Tensor count = keep.defined() ? at::sum(keep, at::kLong) : at::Tensor();  // stays on the device
    USF_DISPATCH_FLOATING(lc.scalar_type(), "gumbel_quantizer_marginal_cuda", [&] {
      marginal_kernel<scalar_t><<<grid, kGqThreads, s.codes * sizeof(float), stream>>>(
          lc.data_ptr<scalar_t>(), ic.data_ptr<int64_t>(), keep.defined() ? keep.data_ptr<bool>() : nullptr,
          marg.data_ptr<float>(), s.rows, static_cast<int>(s.groups), static_cast<int>(s.codes), true);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    perplexity_kernel<<<1, static_cast<unsigned>(s.groups * kWarp), 0, stream>>>(
        marg.data_ptr<float>(), nullptr, gp.data_ptr<float>(), coef.data_ptr<float>(),
        count.defined() ? count.data_ptr<int64_t>() : nullptr, s.rows, static_cast<int>(s.groups),
        static_cast<int>(s.codes));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  USF_DISPATCH_FLOATING(lc.scalar_type(), "gumbel_quantizer_bwd_cuda", [&] {
    backward_kernel<scalar_t><<<grid, kGqThreads, 0, stream>>>(
        gq.data_ptr<scalar_t>(), lc.data_ptr<scalar_t>(), ic.data_ptr<int64_t>(),
        sample ? sc.data_ptr<float>() : nullptr, sample ? gs.data_ptr<float>() : nullptr,
        sample ? coef.data_ptr<float>() : nullptr, keep.defined() ? keep.data_ptr<bool>() : nullptr,
        grad_code32.data_ptr<float>(), grad_logits.data_ptr<scalar_t>(),
        s.rows, static_cast<int>(s.groups), static_cast<int>(s.codes), static_cast<int>(s.dg),
        inv_temperature(temperature), sample);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_logits, grad_code32.to(cc.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(unispeech_fast, CUDA, m) {
  m.impl("gumbel_quantizer_fwd", &gumbel_quantizer_fwd_cuda);
  m.impl("gumbel_quantizer_bwd", &gumbel_quantizer_bwd_cuda);
}

}  // namespace cuda
}  // namespace unispeech_fast
