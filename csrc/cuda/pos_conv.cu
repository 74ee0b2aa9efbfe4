// pos_conv_fwd / pos_conv_bwd on CUDA: the grouped positional convolution with bias, GELU and residual.
//
// UNVERIFIED ON HARDWARE: written and compile-checked (nvcc 13, sm_80/sm_90) on a machine without a
// GPU; tests/ops/test_pos_conv.py compares it with the eager reference where a GPU exists.
//
// Shapes: x [B, T, H], weight [H, Cg, K] with Cg = H / groups (weight norm already folded in), bias [H].
// pad = K / 2; for even K the conv yields T + 1 frames and the last is dropped, so every t < T below.
// Forward, for output channel o in group g (input channels c of the same group):
//   pre[b, t, o] = bias[o] + sum_{c, k} W[o, c, k] x[b, t + k - pad, c]     (x = 0 outside [0, T))
//   out = x + gelu(pre)
// Backward (VJP), with gp = grad_out * gelu'(pre) (fp32):
//   grad_x[b, s, c] = grad_out[b, s, c] + sum_{o, k} W[o, c, k] gp[b, s - k + pad, o]
//                   = grad_out + sum_{o, k'} W[o, c, K - 1 - k'] gp[b, s + k' - (K - 1 - pad), o]
//   grad_W[o, c, k] = sum_{b, t} gp[b, t, o] x[b, t + k - pad, c]
//   grad_bias[o]    = sum_{b, t} gp[b, t, o]
// The forward and the grad_x conv share one kernel (the latter is the same conv with the taps flipped,
// the weight's channel dims swapped and another shift). All accumulation is fp32; preact is stored in
// the dtype of x.
//
// Tiling (CUDA cores; no tensor cores yet): a block of 16x16 threads owns 64 frames x the Cg (<= 64)
// output channels of one group of one batch row; each thread accumulates a 4x4 register tile. Input
// channels and taps are walked in chunks of 8 x 16: the chunk's input window [8][64 + 15] and weights
// [8][16][64] are staged in shared memory as fp32. grad_W: a block owns 4 taps x Cg x Cg of one group
// (a 4x4x4 register tile per thread), walks 32-frame tiles of a slice of all B*T frames and adds its
// partial sums into an fp32 buffer with atomics (so grad_W's summation order is not deterministic).

#include <torch/library.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include "common.cuh"

namespace unispeech_fast {
namespace cuda {
namespace {

constexpr int kTileT = 64;
constexpr int kChunkC = 8;
constexpr int kChunkK = 16;
constexpr int kMaxCg = 64;
constexpr int kConvThreads = 256;

// MODE 0: forward (Src = x, out = x + gelu(acc + bias), optional preact).
// MODE 1: grad_x (Src = gp fp32, out = grad_out + acc), weights transposed and flipped.
template <typename T, typename Src, int MODE>
__global__ void __launch_bounds__(kConvThreads) grouped_conv_kernel(
    const Src* __restrict__ In, const T* __restrict__ W, const T* __restrict__ Bias, const T* __restrict__ Resid,
    T* __restrict__ Out, T* __restrict__ Preact, int64_t seq, int hidden, int cg, int kernel, int shift) {
  __shared__ float xs[kChunkC][kTileT + kChunkK - 1];
  __shared__ float ws[kChunkC][kChunkK][kMaxCg];

  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kTileT;
  const int g = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t row_base = b * seq * hidden;
  const int ch0 = g * cg;

  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

  for (int c0 = 0; c0 < cg; c0 += kChunkC) {
    for (int k0 = 0; k0 < kernel; k0 += kChunkK) {
      __syncthreads();
      constexpr int kWin = kTileT + kChunkK - 1;
      for (int i = threadIdx.x; i < kChunkC * kWin; i += blockDim.x) {
        const int c = i / kWin, tt = i % kWin;
        const int64_t t = t0 + tt + k0 + shift;
        float v = 0.f;
        if (c0 + c < cg && t >= 0 && t < seq) v = to_float(In[row_base + t * hidden + ch0 + c0 + c]);
        xs[c][tt] = v;
      }
      for (int i = threadIdx.x; i < kChunkC * kChunkK * kMaxCg; i += blockDim.x) {
        const int o = i % kMaxCg, k = (i / kMaxCg) % kChunkK, c = i / (kMaxCg * kChunkK);
        float v = 0.f;
        if (o < cg && c0 + c < cg && k0 + k < kernel) {
          if (MODE == 0) {
            v = to_float(W[(static_cast<int64_t>(ch0 + o) * cg + c0 + c) * kernel + k0 + k]);
          } else {  // output channel o of grad_x is input channel o of the forward; c is a forward output
            v = to_float(W[(static_cast<int64_t>(ch0 + c0 + c) * cg + o) * kernel + (kernel - 1 - (k0 + k))]);
          }
        }
        ws[c][k][o] = v;
      }
      __syncthreads();
#pragma unroll 2
      for (int c = 0; c < kChunkC; ++c) {
#pragma unroll 4
        for (int k = 0; k < kChunkK; ++k) {
          float xv[4], wv[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) xv[i] = xs[c][ty + 16 * i + k];
#pragma unroll
          for (int j = 0; j < 4; ++j) wv[j] = ws[c][k][tx + 16 * j];
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(xv[i], wv[j], acc[i][j]);
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t t = t0 + ty + 16 * i;
    if (t >= seq) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int o = tx + 16 * j;
      if (o >= cg) continue;
      const int64_t idx = row_base + t * hidden + ch0 + o;
      if (MODE == 0) {
        const float pre = acc[i][j] + (Bias != nullptr ? to_float(Bias[ch0 + o]) : 0.f);
        if (Preact != nullptr) Preact[idx] = from_float<T>(pre);
        Out[idx] = from_float<T>(to_float(Resid[idx]) + gelu(pre));
      } else {
        Out[idx] = from_float<T>(to_float(Resid[idx]) + acc[i][j]);
      }
    }
  }
}

// gp = grad_out * gelu'(preact), fp32.
template <typename T>
__global__ void gelu_grad_kernel(const T* __restrict__ GradOut, const T* __restrict__ Preact, float* __restrict__ Gp,
                                 int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    Gp[i] = to_float(GradOut[i]) * gelu_grad(to_float(Preact[i]));
  }
}

constexpr int kWTaps = 4;
constexpr int kWFrames = 32;

// grad_W[o, c, k] += sum over this block's frames of gp[b, t, o] x[b, t + k - pad, c]. Grid (ceil(K / 4),
// groups, splits); frame tiles (b, 32 frames) are dealt to the splits round-robin.
template <typename T>
__global__ void __launch_bounds__(kConvThreads) grad_weight_kernel(const float* __restrict__ Gp, const T* __restrict__ X,
                                                                   float* __restrict__ GradW, int64_t batch, int64_t seq,
                                                                   int hidden, int cg, int kernel, int pad) {
  __shared__ float gps[kWFrames][kMaxCg];
  __shared__ float xs[kWFrames + kWTaps - 1][kMaxCg + 1];
  const int k0 = blockIdx.x * kWTaps;
  const int g = blockIdx.y;
  const int ch0 = g * cg;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t tiles_per_row = ceil_div(seq, kWFrames);
  const int64_t n_tiles = batch * tiles_per_row;

  float acc[4][4][kWTaps];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int kk = 0; kk < kWTaps; ++kk) acc[i][j][kk] = 0.f;

  for (int64_t tile = blockIdx.z; tile < n_tiles; tile += gridDim.z) {
    const int64_t b = tile / tiles_per_row;
    const int64_t t0 = (tile % tiles_per_row) * kWFrames;
    const int64_t row_base = b * seq * hidden;
    __syncthreads();
    for (int i = threadIdx.x; i < kWFrames * kMaxCg; i += blockDim.x) {
      const int tt = i / kMaxCg, o = i % kMaxCg;
      const int64_t t = t0 + tt;
      gps[tt][o] = (o < cg && t < seq) ? Gp[row_base + t * hidden + ch0 + o] : 0.f;
    }
    for (int i = threadIdx.x; i < (kWFrames + kWTaps - 1) * kMaxCg; i += blockDim.x) {
      const int tt = i / kMaxCg, c = i % kMaxCg;
      const int64_t t = t0 + tt + k0 - pad;
      xs[tt][c] = (c < cg && t >= 0 && t < seq) ? to_float(X[row_base + t * hidden + ch0 + c]) : 0.f;
    }
    __syncthreads();
#pragma unroll 4
    for (int tt = 0; tt < kWFrames; ++tt) {
      float gv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) gv[i] = gps[tt][ty + 16 * i];
#pragma unroll
      for (int kk = 0; kk < kWTaps; ++kk) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float xv = xs[tt + kk][tx + 16 * j];
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[i][j][kk] = fmaf(gv[i], xv, acc[i][j][kk]);
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int o = ty + 16 * i;
    if (o >= cg) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int c = tx + 16 * j;
      if (c >= cg) continue;
#pragma unroll
      for (int kk = 0; kk < kWTaps; ++kk) {
        if (k0 + kk < kernel) atomicAdd(&GradW[(static_cast<int64_t>(ch0 + o) * cg + c) * kernel + k0 + kk], acc[i][j][kk]);
      }
    }
  }
}

struct ConvShape {
  int64_t batch, seq, hidden, cg, kernel;
};

ConvShape check_conv_args(const at::Tensor& x, const at::Tensor& weight, int64_t groups) {
  USF_CHECK_CUDA(x, "x");
  USF_CHECK_DIM(x, 3, "x");
  USF_CHECK_FLOATING(x, "x");
  USF_CHECK_DIM(weight, 3, "weight");
  USF_CHECK_SAME_DEVICE(weight, x, "weight", "x");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight must have the dtype of x (", x.scalar_type(), "), got ",
              weight.scalar_type());
  const int64_t hidden = x.size(2);
  TORCH_CHECK(groups >= 1 && hidden % groups == 0, "groups must divide hidden (", hidden, "), got ", groups);
  const int64_t cg = hidden / groups;
  TORCH_CHECK(cg <= kMaxCg, "the CUDA pos_conv supports at most ", kMaxCg, " channels per group, got hidden / groups = ",
              cg);
  TORCH_CHECK(weight.size(0) == hidden && weight.size(1) == cg, "weight must be [", hidden, ", ", cg, ", K], got shape ",
              weight.sizes());
  TORCH_CHECK(groups <= 65535 && x.size(0) <= 65535, "x: batch and groups must be <= 65535");
  TORCH_CHECK(hidden <= 0x7fffffff && weight.size(2) <= 0x7fffffff, "weight is too large");
  return {x.size(0), x.size(1), hidden, cg, weight.size(2)};
}

std::tuple<at::Tensor, at::Tensor> pos_conv_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                     const std::optional<at::Tensor>& bias, int64_t groups,
                                                     bool save_preact) {
  const ConvShape s = check_conv_args(x, weight, groups);
  if (bias.has_value()) {
    USF_CHECK_SAME_DEVICE(*bias, x, "bias", "x");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.hidden, "bias must be [", s.hidden, "], got shape ",
                bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "bias must have the dtype of x (", x.scalar_type(), "), got ",
                bias->scalar_type());
  }
  c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty_like(xc);
  at::Tensor preact = save_preact ? at::empty_like(xc) : at::empty({0}, x.options());
  if (xc.numel() == 0) return {out, preact};
  const dim3 grid(static_cast<unsigned>(ceil_div(s.seq, kTileT)), static_cast<unsigned>(groups),
                  static_cast<unsigned>(s.batch));
  USF_DISPATCH_FLOATING(x.scalar_type(), "pos_conv_fwd_cuda", [&] {
    grouped_conv_kernel<scalar_t, scalar_t, 0><<<grid, kConvThreads, 0, stream>>>(
        xc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), bc.defined() ? bc.data_ptr<scalar_t>() : nullptr,
        xc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), save_preact ? preact.data_ptr<scalar_t>() : nullptr, s.seq,
        static_cast<int>(s.hidden), static_cast<int>(s.cg), static_cast<int>(s.kernel),
        -static_cast<int>(s.kernel / 2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, preact};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pos_conv_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                                 const at::Tensor& weight, const at::Tensor& preact,
                                                                 int64_t groups, bool bias_grad) {
  const ConvShape s = check_conv_args(x, weight, groups);
  USF_CHECK_SAME_DEVICE(grad_out, x, "grad_out", "x");
  USF_CHECK_SAME_DEVICE(preact, x, "preact", "x");
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "grad_out must have the shape of x ", x.sizes(), ", got ",
              grad_out.sizes());
  TORCH_CHECK(preact.sizes() == x.sizes(),
              "preact must have the shape of x (call pos_conv_fwd with save_preact=True), got shape ", preact.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type() && preact.scalar_type() == x.scalar_type(),
              "grad_out and preact must have the dtype of x (", x.scalar_type(), "), got ", grad_out.scalar_type(),
              " and ", preact.scalar_type());
  c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous(), go = grad_out.contiguous(), pc = preact.contiguous();
  at::Tensor grad_x = at::empty_like(xc);
  at::Tensor grad_w32 = at::zeros(weight.sizes(), weight.options().dtype(at::kFloat));
  at::Tensor gp = at::empty(xc.sizes(), xc.options().dtype(at::kFloat));
  const int64_t n = xc.numel();
  if (n == 0) {
    at::Tensor gb = bias_grad ? at::zeros({s.hidden}, weight.options()) : at::empty({0}, weight.options());
    return {grad_x, grad_w32.to(weight.scalar_type()), gb};
  }
  USF_DISPATCH_FLOATING(x.scalar_type(), "pos_conv_bwd_cuda", [&] {
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>(ceil_div(n, threads), 65535 * 8);
    gelu_grad_kernel<scalar_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        go.data_ptr<scalar_t>(), pc.data_ptr<scalar_t>(), gp.data_ptr<float>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const int pad = static_cast<int>(s.kernel / 2);
    const dim3 grid(static_cast<unsigned>(ceil_div(s.seq, kTileT)), static_cast<unsigned>(groups),
                    static_cast<unsigned>(s.batch));
    grouped_conv_kernel<scalar_t, float, 1><<<grid, kConvThreads, 0, stream>>>(
        gp.data_ptr<float>(), wc.data_ptr<scalar_t>(), nullptr, go.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(),
        nullptr, s.seq, static_cast<int>(s.hidden), static_cast<int>(s.cg), static_cast<int>(s.kernel),
        -static_cast<int>(s.kernel - 1 - pad));
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    const int64_t n_tiles = s.batch * ceil_div(s.seq, kWFrames);
    const int64_t splits = std::min<int64_t>(n_tiles, 16);
    const dim3 wgrid(static_cast<unsigned>(ceil_div(s.kernel, kWTaps)), static_cast<unsigned>(groups),
                     static_cast<unsigned>(splits));
    grad_weight_kernel<scalar_t><<<wgrid, kConvThreads, 0, stream>>>(gp.data_ptr<float>(), xc.data_ptr<scalar_t>(),
                                                                     grad_w32.data_ptr<float>(), s.batch, s.seq,
                                                                     static_cast<int>(s.hidden),
                                                                     static_cast<int>(s.cg), static_cast<int>(s.kernel),
                                                                     pad);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor grad_bias = bias_grad ? gp.sum(at::IntArrayRef{0, 1}).to(weight.scalar_type())
                                   : at::empty({0}, weight.options());
  return {grad_x, grad_w32.to(weight.scalar_type()), grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(unispeech_fast, CUDA, m) {
  m.impl("pos_conv_fwd", &pos_conv_fwd_cuda);
  m.impl("pos_conv_bwd", &pos_conv_bwd_cuda);
}

}  // namespace cuda
}  // namespace unispeech_fast
