// conv_norm_gelu_fwd on CUDA: the first feature-extractor layer (one input channel).
//
// UNVERIFIED ON HARDWARE: written and compile-checked (nvcc 13, sm_80/sm_90) on a machine without a
// GPU; tests/ops/test_feature_extractor.py compares it with the eager reference where a GPU exists.
//
// Math (forward only; the op has no backward):
//   h[b, c, t] = bias[c] + sum_k weight[c, 0, k] * x[b, 0, t * stride + k],  t < (T_in - K) / stride + 1
//   norm_kind 0: y = gelu(h)
//   norm_kind 1: y = gelu((h - mu[b, c]) * rsqrt(var[b, c] + eps) * gamma[c] + beta[c]), mu/var over t
//                (GroupNorm with one group per channel, biased variance)
//   norm_kind 2: y = gelu((h - mu[b, t]) * rsqrt(var[b, t] + eps) * gamma[c] + beta[c]), mu/var over c
//                (LayerNorm over channels per frame)
// gelu is the exact erf form. All arithmetic is fp32; x, weight and the output share one dtype.
//
// Kernels. With one input channel the conv is ~K FMAs per output, far cheaper than storing the output,
// so nothing but the output (and tiny statistics) is written and the conv is recomputed instead:
//   * frames kernel (norm_kind 0 and 2): a block owns 32 frames of one batch row; lanes map to frames,
//     warps to channels. Norm kind 2 first runs the conv once for per-frame Welford statistics (merged
//     across warps with Chan's formula), then recomputes, normalises, applies GELU and stores
//     (coalesced along time).
//   * group-norm kernels (norm_kind 1), three passes: `gn_stats` writes Welford partials (count, mean,
//     M2) per (batch, channel, chunk of 1024 frames); `gn_finalize` (one block per (batch, channel))
//     merges a channel's partials with Chan's formula into (mean, rstd); `gn_apply` reads those two
//     floats, recomputes the conv exactly as `gn_stats` did (from the bias, same order, so v - mean is
//     the same value the statistics saw: with near-zero variance a different rounding would be
//     multiplied by up to 1/sqrt(eps)), applies (v - mean) * rstd * gamma + beta, GELU and stores.
// Shared memory per block (floats; `layer0_smem_bytes` in unispeech_fast/ops/feature_extractor/extension.py restates it for
// dispatch, which compares it with the device's opt-in limit; keep the two in step):
//   frames kernel: (31 * stride + K) + C_out * (K + 3) + 8 * 32 * 3 + 32 * 2
//   gn_stats: (1023 * stride + K) + 16 * K;  gn_apply: that + 3 * 16
// C_in != 1 is refused: the 512-channel layers run on Triton/cuDNN (the Python side picks them).

#include <torch/library.h>

#include <ATen/ops/empty.h>

#include "common.cuh"

namespace unispeech_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;
constexpr int kFrameTile = 32;     // frames per block in the frames kernel
constexpr int kChunk = 1024;       // frames per block in the group-norm kernels
constexpr int kGnChannels = 16;    // channels per block in the group-norm kernels

// Loads samples [start, start + count) of one row into fp32 shared memory (zeros past the end).
template <typename T>
__device__ __forceinline__ void load_samples(float* xs, const T* __restrict__ row, int64_t start, int count,
                                             int64_t t_in) {
  for (int i = threadIdx.x; i < count; i += blockDim.x) {
    const int64_t s = start + i;
    xs[i] = s < t_in ? to_float(row[s]) : 0.f;
  }
}

__device__ __forceinline__ float conv_at(const float* xs, const float* w, float b, int local, int stride, int kernel) {
  float acc = b;
  const float* src = xs + local * stride;
  for (int k = 0; k < kernel; ++k) acc = fmaf(w[k], src[k], acc);
  return acc;
}

// norm_kind 0 (LAYER_NORM = false) and 2 (LAYER_NORM = true). Grid (frame tiles, B).
template <typename T, bool LAYER_NORM>
__global__ void __launch_bounds__(kThreads) frames_kernel(const T* __restrict__ X, const T* __restrict__ W,
                                                          const T* __restrict__ Bias, const T* __restrict__ Gamma,
                                                          const T* __restrict__ Beta, T* __restrict__ Y,
                                                          int64_t t_in, int64_t t_out, int channels, int kernel,
                                                          int stride, float eps) {
  extern __shared__ float smem[];
  const int n_samples = (kFrameTile - 1) * stride + kernel;
  float* xs = smem;                            // [n_samples]
  float* ws = xs + n_samples;                  // [channels * kernel]
  float* bs = ws + channels * kernel;          // [channels]
  float* gs = bs + channels;                   // [channels] (LAYER_NORM)
  float* betas = gs + channels;                // [channels] (LAYER_NORM)
  float* part = betas + channels;              // [kWarps][kFrameTile][3] (LAYER_NORM)
  float* stat = part + kWarps * kFrameTile * 3;  // [kFrameTile][2] mean, rstd (LAYER_NORM)

  const int64_t b = blockIdx.y;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kFrameTile;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;

  load_samples(xs, X + b * t_in, t0 * stride, n_samples, t_in);
  for (int i = threadIdx.x; i < channels * kernel; i += blockDim.x) ws[i] = to_float(W[i]);
  for (int i = threadIdx.x; i < channels; i += blockDim.x) {
    bs[i] = Bias != nullptr ? to_float(Bias[i]) : 0.f;
    if (LAYER_NORM) {
      gs[i] = to_float(Gamma[i]);
      betas[i] = to_float(Beta[i]);
    }
  }
  __syncthreads();

  const int64_t t = t0 + lane;
  float mean = 0.f, rstd = 1.f;
  if (LAYER_NORM) {
    Welford wel;
    for (int c = warp; c < channels; c += kWarps) wel.add(conv_at(xs, ws + c * kernel, bs[c], lane, stride, kernel));
    float* p = part + (warp * kFrameTile + lane) * 3;
    p[0] = wel.n;
    p[1] = wel.mean;
    p[2] = wel.m2;
    __syncthreads();
    if (warp == 0) {
      Welford total;
      for (int w = 0; w < kWarps; ++w) {
        const float* q = part + (w * kFrameTile + lane) * 3;
        total.merge(q[0], q[1], q[2]);
      }
      stat[lane * 2] = total.mean;
      stat[lane * 2 + 1] = rsqrtf(total.m2 / total.n + eps);
    }
    __syncthreads();
    mean = stat[lane * 2];
    rstd = stat[lane * 2 + 1];
  }
  if (t >= t_out) return;
  T* yrow = Y + b * channels * t_out + t;
  for (int c = warp; c < channels; c += kWarps) {
    float v = conv_at(xs, ws + c * kernel, bs[c], lane, stride, kernel);
    if (LAYER_NORM) v = (v - mean) * rstd * gs[c] + betas[c];
    yrow[static_cast<int64_t>(c) * t_out] = from_float<T>(gelu(v));
  }
}

// The tile of the group-norm kernels, grid (chunks of kChunk frames, blocks of kGnChannels channels, B): batch row
// b, frames from t0, channels c0 .. c0 + n_ch - 1, and in shared memory xs, the samples those frames read, then ws,
// the channels' weights. gn_stats and gn_apply both load their inputs here, so the apply pass recomputes the conv
// from the same values the statistics saw.
struct GnTile {
  int64_t b, t0;
  int c0, n_ch;
  float* xs;  // [(kChunk - 1) * stride + kernel]
  float* ws;  // [kGnChannels * kernel]
};

// Loads the tile's samples and weights into smem (every thread takes part; __syncthreads() before reading them).
template <typename T>
__device__ __forceinline__ GnTile load_gn_tile(float* smem, const T* __restrict__ X, const T* __restrict__ W,
                                               int64_t t_in, int channels, int kernel, int stride) {
  const int n_samples = (kChunk - 1) * stride + kernel;
  const int c0 = blockIdx.y * kGnChannels;
  const GnTile tile{blockIdx.z, static_cast<int64_t>(blockIdx.x) * kChunk, c0, min(kGnChannels, channels - c0), smem,
                    smem + n_samples};
  load_samples(tile.xs, X + tile.b * t_in, tile.t0 * stride, n_samples, t_in);
  for (int i = threadIdx.x; i < tile.n_ch * kernel; i += blockDim.x) tile.ws[i] = to_float(W[c0 * kernel + i]);
  return tile;
}

// Group norm pass 1. Grid (chunks, channel blocks, B); Partial [B, C, chunks, 3] = (count, mean, M2).
template <typename T>
__global__ void __launch_bounds__(kThreads) gn_stats_kernel(const T* __restrict__ X, const T* __restrict__ W,
                                                            const T* __restrict__ Bias, float* __restrict__ Partial,
                                                            int64_t t_in, int64_t t_out, int channels, int kernel,
                                                            int stride) {
  extern __shared__ float smem[];
  const auto [b, t0, c0, n_ch, xs, ws] = load_gn_tile(smem, X, W, t_in, channels, kernel, stride);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  __syncthreads();

  const int frames = static_cast<int>(min64(kChunk, t_out - t0));
  for (int cl = warp; cl < n_ch; cl += kWarps) {
    const float bias = Bias != nullptr ? to_float(Bias[c0 + cl]) : 0.f;
    Welford wel;
    for (int i = lane; i < frames; i += kWarp) wel.add(conv_at(xs, ws + cl * kernel, bias, i, stride, kernel));
    wel.warp_merge();
    if (lane == 0) {
      float* p = Partial + ((b * channels + c0 + cl) * gridDim.x + blockIdx.x) * 3;
      p[0] = wel.n;
      p[1] = wel.mean;
      p[2] = wel.m2;
    }
  }
}

// Group norm pass 2. Grid (C, B), one block per (batch, channel): merges that channel's chunk partials
// (Chan) into Stats [B, C, 2] = (mean, rstd), so the apply pass reads two floats instead of re-merging
// every chunk in every block (quadratic in the number of chunks).
__global__ void __launch_bounds__(kThreads) gn_finalize_kernel(const float* __restrict__ Partial,
                                                               float* __restrict__ Stats, int64_t n_chunks,
                                                               int channels, float eps) {
  __shared__ float part[kWarps][3];
  const int64_t bc = static_cast<int64_t>(blockIdx.y) * channels + blockIdx.x;
  const float* p = Partial + bc * n_chunks * 3;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  Welford wel;
  for (int64_t i = threadIdx.x; i < n_chunks; i += blockDim.x) wel.merge(p[i * 3], p[i * 3 + 1], p[i * 3 + 2]);
  wel.warp_merge();
  if (lane == 0) {
    part[warp][0] = wel.n;
    part[warp][1] = wel.mean;
    part[warp][2] = wel.m2;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    Welford total;
    for (int w = 0; w < kWarps; ++w) total.merge(part[w][0], part[w][1], part[w][2]);
    Stats[bc * 2] = total.mean;
    Stats[bc * 2 + 1] = rsqrtf(total.m2 / total.n + eps);
  }
}

// Group norm pass 3. Same grid as gn_stats_kernel. The conv is recomputed exactly as gn_stats_kernel
// computed it (conv_at from the bias, same shared-memory inputs): then y = gelu((v - mean) * s + beta).
template <typename T>
__global__ void __launch_bounds__(kThreads) gn_apply_kernel(const T* __restrict__ X, const T* __restrict__ W,
                                                            const T* __restrict__ Bias, const T* __restrict__ Gamma,
                                                            const T* __restrict__ Beta, const float* __restrict__ Stats,
                                                            T* __restrict__ Y, int64_t t_in, int64_t t_out, int channels,
                                                            int kernel, int stride) {
  extern __shared__ float smem[];
  const auto [b, t0, c0, n_ch, xs, ws] = load_gn_tile(smem, X, W, t_in, channels, kernel, stride);
  float* means = ws + kGnChannels * kernel;  // [kGnChannels]
  float* scale = means + kGnChannels;        // [kGnChannels]: gamma * rstd
  float* shift = scale + kGnChannels;        // [kGnChannels]: beta
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  for (int cl = threadIdx.x; cl < n_ch; cl += blockDim.x) {
    const float* st = Stats + (b * channels + c0 + cl) * 2;
    means[cl] = st[0];
    scale[cl] = st[1] * to_float(Gamma[c0 + cl]);
    shift[cl] = to_float(Beta[c0 + cl]);
  }
  __syncthreads();

  const int frames = static_cast<int>(min64(kChunk, t_out - t0));
  for (int cl = warp; cl < n_ch; cl += kWarps) {
    T* yrow = Y + (b * channels + c0 + cl) * t_out + t0;
    const float bias = Bias != nullptr ? to_float(Bias[c0 + cl]) : 0.f;
    const float mean = means[cl], s = scale[cl], sh = shift[cl];
    for (int i = lane; i < frames; i += kWarp) {
      const float v = conv_at(xs, ws + cl * kernel, bias, i, stride, kernel);
      yrow[i] = from_float<T>(gelu((v - mean) * s + sh));
    }
  }
}

void set_smem(const void* kernel_fn, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel_fn, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

at::Tensor conv_norm_gelu_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                   const std::optional<at::Tensor>& norm_weight,
                                   const std::optional<at::Tensor>& norm_bias, int64_t stride, int64_t norm_kind,
                                   double eps) {
  USF_CHECK_CUDA(x, "x");
  USF_CHECK_DIM(x, 3, "x");
  USF_CHECK_DIM(weight, 3, "weight");
  USF_CHECK_FLOATING(x, "x");
  USF_CHECK_SAME_DEVICE(weight, x, "weight", "x");
  TORCH_CHECK(x.size(1) == 1,
              "conv_norm_gelu_fwd (CUDA) supports only one input channel (feature-extractor layer 0); x has C_in = ",
              x.size(1), " (the other layers run on Triton/cuDNN)");
  TORCH_CHECK(weight.size(1) == 1, "weight must be [C_out, 1, K] for C_in = 1, got shape ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight must have the dtype of x (", x.scalar_type(), "), got ",
              weight.scalar_type());
  TORCH_CHECK(norm_kind >= 0 && norm_kind <= 2, "norm_kind must be 0 (none), 1 (group) or 2 (layer), got ", norm_kind);
  TORCH_CHECK(stride >= 1, "stride must be >= 1, got ", stride);
  const int64_t channels = weight.size(0), kernel = weight.size(2), t_in = x.size(2);
  TORCH_CHECK(kernel >= 1 && kernel <= 64, "weight: kernel size must be in [1, 64], got ", kernel);
  TORCH_CHECK(stride <= 64, "stride must be <= 64, got ", stride);
  TORCH_CHECK(channels >= 1 && channels <= 2048, "weight: C_out must be in [1, 2048], got ", channels);
  TORCH_CHECK(t_in >= kernel, "x has ", t_in, " samples, fewer than the kernel size ", kernel);
  auto check_vec = [&](const std::optional<at::Tensor>& t, const char* name) {
    if (!t.has_value()) return;
    USF_CHECK_SAME_DEVICE(*t, x, name, "x");
    TORCH_CHECK(t->dim() == 1 && t->size(0) == channels, name, " must be [", channels, "], got shape ", t->sizes());
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), name, " must have the dtype of x (", x.scalar_type(), "), got ",
                t->scalar_type());
  };
  check_vec(bias, "bias");
  check_vec(norm_weight, "norm_weight");
  check_vec(norm_bias, "norm_bias");
  if (norm_kind != 0) {
    TORCH_CHECK(norm_weight.has_value() && norm_bias.has_value(),
                "norm_weight and norm_bias are required when norm_kind != 0");
  }

  c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  int smem_limit = 0;  // the device's opt-in maximum of dynamic shared memory per block
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, x.device().index()));
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor gc = norm_weight.has_value() ? norm_weight->contiguous() : at::Tensor();
  const at::Tensor betac = norm_bias.has_value() ? norm_bias->contiguous() : at::Tensor();
  const int64_t t_out = (t_in - kernel) / stride + 1;
  const int64_t batch = x.size(0);
  at::Tensor y = at::empty({batch, channels, t_out}, x.options());
  if (batch == 0) return y;
  TORCH_CHECK(batch <= 65535, "x: batch must be <= 65535, got ", batch);

  USF_DISPATCH_FLOATING(x.scalar_type(), "conv_norm_gelu_fwd_cuda", [&] {
    const scalar_t* X = xc.data_ptr<scalar_t>();
    const scalar_t* W = wc.data_ptr<scalar_t>();
    const scalar_t* Bias = bc.defined() ? bc.data_ptr<scalar_t>() : nullptr;
    const scalar_t* Gamma = gc.defined() ? gc.data_ptr<scalar_t>() : nullptr;
    const scalar_t* Beta = betac.defined() ? betac.data_ptr<scalar_t>() : nullptr;
    scalar_t* Y = y.data_ptr<scalar_t>();
    const int k = static_cast<int>(kernel), s = static_cast<int>(stride), c = static_cast<int>(channels);
    if (norm_kind == 1) {
      const int64_t n_chunks = ceil_div(t_out, kChunk);
      TORCH_CHECK(n_chunks <= 65535, "x is too long: ", t_out, " frames");
      at::Tensor partial = at::empty({batch, channels, n_chunks, 3}, x.options().dtype(at::kFloat));
      at::Tensor stats = at::empty({batch, channels, 2}, x.options().dtype(at::kFloat));
      const dim3 grid(static_cast<unsigned>(n_chunks), static_cast<unsigned>(ceil_div(channels, kGnChannels)),
                      static_cast<unsigned>(batch));
      const size_t n_samples = static_cast<size_t>((kChunk - 1) * s + k);
      const size_t smem_stats = (n_samples + kGnChannels * k) * sizeof(float);
      const size_t smem_apply = smem_stats + 3 * kGnChannels * sizeof(float);
      TORCH_CHECK(smem_apply <= static_cast<size_t>(smem_limit), "stride ", s, " and kernel size ", k,
                  " need ", smem_apply, " bytes of shared memory in the CUDA group-norm kernels; the device allows ",
                  smem_limit);
      set_smem(reinterpret_cast<const void*>(&gn_stats_kernel<scalar_t>), smem_stats);
      set_smem(reinterpret_cast<const void*>(&gn_apply_kernel<scalar_t>), smem_apply);
      gn_stats_kernel<scalar_t><<<grid, kThreads, smem_stats, stream>>>(X, W, Bias, partial.data_ptr<float>(), t_in,
                                                                        t_out, c, k, s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      gn_finalize_kernel<<<dim3(static_cast<unsigned>(c), static_cast<unsigned>(batch)), kThreads, 0, stream>>>(
          partial.data_ptr<float>(), stats.data_ptr<float>(), n_chunks, c, static_cast<float>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      gn_apply_kernel<scalar_t><<<grid, kThreads, smem_apply, stream>>>(X, W, Bias, Gamma, Beta,
                                                                        stats.data_ptr<float>(), Y, t_in, t_out, c,
                                                                        k, s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const int64_t n_tiles = ceil_div(t_out, kFrameTile);
      TORCH_CHECK(n_tiles <= 0x7fffffff, "x is too long: ", t_out, " frames");
      const dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(batch));
      const size_t smem = (static_cast<size_t>((kFrameTile - 1) * s + k) + static_cast<size_t>(c) * (k + 3) +
                           kWarps * kFrameTile * 3 + kFrameTile * 2) *
                          sizeof(float);
      TORCH_CHECK(smem <= static_cast<size_t>(smem_limit), "weight [", c, ", 1, ", k, "] with stride ", s, " needs ",
                  smem, " bytes of shared memory in the CUDA feature-extractor kernel; the device allows ", smem_limit);
      if (norm_kind == 2) {
        set_smem(reinterpret_cast<const void*>(&frames_kernel<scalar_t, true>), smem);
        frames_kernel<scalar_t, true><<<grid, kThreads, smem, stream>>>(X, W, Bias, Gamma, Beta, Y, t_in, t_out, c, k,
                                                                        s, static_cast<float>(eps));
      } else {
        set_smem(reinterpret_cast<const void*>(&frames_kernel<scalar_t, false>), smem);
        frames_kernel<scalar_t, false><<<grid, kThreads, smem, stream>>>(X, W, Bias, Gamma, Beta, Y, t_in, t_out, c,
                                                                         k, s, static_cast<float>(eps));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(unispeech_fast, CUDA, m) { m.impl("conv_norm_gelu_fwd", &conv_norm_gelu_fwd_cuda); }

}  // namespace cuda
}  // namespace unispeech_fast
