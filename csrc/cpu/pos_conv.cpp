// CPU kernels of the grouped positional conv (pos_conv_fwd / pos_conv_bwd, schemas in csrc/schemas.cpp).
//
// Forward, per batch b and group g (Cg = H / groups channels, K taps, P = K // 2):
//   pre[t, o] = bias[o] + sum_{c, k} W[o, c, k] x[t + k - P, c]      (x = 0 outside [0, T))
//   out[t, o] = x[t, o] + gelu(pre[t, o])                             (exact erf GELU)
// computed as an implicit GEMM: for a tile of output frames the rows cols[t, c*K + k] = x[t + k - P, c]
// are gathered from a zero-padded, transposed copy of the group's input (L2-sized), and
// pre_tile = cols @ W_g^T with W_g = weight[g] viewed as [Cg, Cg*K] (no weight repacking); bias,
// GELU and the residual are applied to the tile while it is in cache.
//
// Backward (VJP), with d = grad_out * gelu'(pre):
//   grad_x[t', c]      = grad_out[t', c] + sum_{o, k} d[t' + P - k, o] W[o, c, k]
//                        (a correlation of d with the tap-flipped, channel-transposed weight, left pad K-1-P)
//   grad_W[o, c, k]    = sum_{b, t} d[t, o] x[t + k - P, c]            (= d_tile^T @ cols, summed over tiles)
//   grad_bias[o]       = sum_{b, t} d[t, o]
// Work is split over (batch, group) pairs (forward, grad_x) and groups (grad_W) with at::parallel_for;
// the GEMMs run single-threaded inside each task.
#include <torch/library.h>

#include <vector>

#include "common.h"

namespace unispeech_fast {
namespace {

constexpr int64_t kTileFrames = 32;  // output frames per im2col tile (32 x 6144 floats = 768 KiB at H=768)

// xt[c, p] = in[p - pad, c0 + c] for 0 <= p - pad < T, else 0; in is [T, H]; xt is [Cg, Tp].
template <typename T>
void load_group_transposed(const T* in, int64_t frames, int64_t H, int64_t c0, int64_t Cg, int64_t pad,
                           int64_t Tp, T* xt) {
  std::fill(xt, xt + Cg * Tp, T(0));
  for (int64_t t = 0; t < frames; ++t) {
    const int64_t p = t + pad;
    if (p < 0 || p >= Tp) continue;
    const T* row = in + t * H + c0;
    for (int64_t c = 0; c < Cg; ++c) xt[c * Tp + p] = row[c];
  }
}

// cols[i, c*K + k] = xt[c, t0 + i + k] for i < rows.
template <typename T>
void im2col_tile(const T* xt, int64_t Tp, int64_t Cg, int64_t K, int64_t t0, int64_t rows, T* cols) {
  for (int64_t i = 0; i < rows; ++i) {
    T* dst = cols + i * Cg * K;
    for (int64_t c = 0; c < Cg; ++c) std::memcpy(dst + c * K, xt + c * Tp + t0 + i, sizeof(T) * K);
  }
}

// Forward epilogue on one tile: pre = acc + bias; out = x + gelu(pre); pre saved when pre_out.
template <typename T>
USF_INLINE void fwd_epilogue_impl(const T* acc, int64_t rows, int64_t Cg, const T* bias, const T* x, T* out,
                                  T* pre_out, int64_t H) {
  for (int64_t i = 0; i < rows; ++i) {
    const T* a = acc + i * Cg;
    const T* xr = x + i * H;
    T* orow = out + i * H;
    T* prow = pre_out ? pre_out + i * H : nullptr;
    if (prow) {
      for (int64_t o = 0; o < Cg; ++o) prow[o] = a[o] + (bias ? bias[o] : T(0));
      for (int64_t o = 0; o < Cg; ++o) orow[o] = xr[o] + gelu_val(prow[o]);
    } else if (bias) {
      for (int64_t o = 0; o < Cg; ++o) orow[o] = xr[o] + gelu_val(a[o] + bias[o]);
    } else {
      for (int64_t o = 0; o < Cg; ++o) orow[o] = xr[o] + gelu_val(a[o]);
    }
  }
}
USF_MULTIVERSION(fwd_epilogue_f32, fwd_epilogue_impl,
                 (const float* acc, int64_t rows, int64_t Cg, const float* bias, const float* x, float* out,
                  float* pre_out, int64_t H),
                 (acc, rows, Cg, bias, x, out, pre_out, H))

template <typename T>
void fwd_epilogue(const T* acc, int64_t rows, int64_t Cg, const T* bias, const T* x, T* out, T* pre_out,
                  int64_t H) {
  if constexpr (std::is_same_v<T, float>) {
    fwd_epilogue_f32(acc, rows, Cg, bias, x, out, pre_out, H);
  } else {
    fwd_epilogue_impl(acc, rows, Cg, bias, x, out, pre_out, H);
  }
}

// d = grad_out * gelu'(pre), elementwise over n values.
template <typename T>
USF_INLINE void gelu_bwd_impl(const T* g, const T* pre, T* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = g[i] * gelu_grad(pre[i]);
}
USF_MULTIVERSION(gelu_bwd_f32, gelu_bwd_impl, (const float* g, const float* pre, float* d, int64_t n), (g, pre, d, n))

template <typename T>
void gelu_bwd(const T* g, const T* pre, T* d, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    gelu_bwd_f32(g, pre, d, n);
  } else {
    gelu_bwd_impl(g, pre, d, n);
  }
}

// For every (b, g): acc_tile = cols(in, pad) @ Wg^T over frame tiles, handed to epi(b, g, t0, rows, acc).
template <typename T, typename Epi>
void grouped_correlate(const T* in, int64_t B, int64_t frames, int64_t H, int64_t groups, int64_t K, int64_t pad,
                       const T* weight, const Epi& epi) {
  const int64_t Cg = H / groups, CK = Cg * K, Tp = frames + K - 1;
  at::parallel_for(0, B * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> xt(Cg * Tp), cols(kTileFrames * CK), acc(kTileFrames * Cg);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / groups, g = item % groups;
      load_group_transposed(in + b * frames * H, frames, H, g * Cg, Cg, pad, Tp, xt.data());
      const T* wg = weight + g * Cg * CK;
      for (int64_t t0 = 0; t0 < frames; t0 += kTileFrames) {
        const int64_t rows = std::min(kTileFrames, frames - t0);
        im2col_tile(xt.data(), Tp, Cg, K, t0, rows, cols.data());
        gemm_rm<T>(false, true, rows, Cg, CK, T(1), cols.data(), CK, wg, CK, T(0), acc.data(), Cg);
        epi(b, g, t0, rows, acc.data());
      }
    }
  });
}

void check_pos_conv_args(const at::Tensor& x, const at::Tensor& weight, int64_t groups, const char* op) {
  check_cpu_contiguous(x, op, "x", 3);
  check_float(x, op, "x");
  check_cpu_contiguous(weight, op, "weight", 3);
  check_same_dtype(weight, x, op, "weight", "x");
  const int64_t H = x.size(2);
  TORCH_CHECK(groups > 0 && H % groups == 0, op, ": groups must be positive and divide the hidden size ", H,
              ", got ", groups);
  TORCH_CHECK(weight.size(0) == H && weight.size(1) == H / groups && weight.size(2) > 0, op,
              ": weight must have shape [", H, ", ", H / groups, ", K], got ", weight.sizes());
}

std::tuple<at::Tensor, at::Tensor> pos_conv_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                    const std::optional<at::Tensor>& bias, int64_t groups,
                                                    bool save_preact) {
  const char* op = "pos_conv_fwd";
  check_pos_conv_args(x, weight, groups, op);
  const int64_t B = x.size(0), frames = x.size(1), H = x.size(2), K = weight.size(2), Cg = H / groups;
  if (bias.has_value()) {
    check_cpu_contiguous(*bias, op, "bias", 1);
    check_same_dtype(*bias, x, op, "bias", "x");
    check_shape(*bias, {H}, op, "bias");
  }
  at::Tensor out = at::empty_like(x);
  at::Tensor preact = save_preact ? at::empty_like(x) : at::empty({0}, x.options());
  if (x.numel() == 0) return {out, preact};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pos_conv_fwd_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    scalar_t* pp = save_preact ? preact.mutable_data_ptr<scalar_t>() : nullptr;
    grouped_correlate<scalar_t>(xp, B, frames, H, groups, K, K / 2, weight.const_data_ptr<scalar_t>(),
                                [&](int64_t b, int64_t g, int64_t t0, int64_t rows, const scalar_t* acc) {
                                  const int64_t off = (b * frames + t0) * H + g * Cg;
                                  fwd_epilogue<scalar_t>(acc, rows, Cg, bp ? bp + g * Cg : nullptr, xp + off,
                                                         op_ + off, pp ? pp + off : nullptr, H);
                                });
  });
  return {out, preact};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pos_conv_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                                const at::Tensor& weight, const at::Tensor& preact,
                                                                int64_t groups, bool bias_grad) {
  const char* op = "pos_conv_bwd";
  check_pos_conv_args(x, weight, groups, op);
  check_cpu_contiguous(grad_out, op, "grad_out", 3);
  check_same_dtype(grad_out, x, op, "grad_out", "x");
  check_shape(grad_out, x.sizes(), op, "grad_out");
  TORCH_CHECK(preact.numel() != 0 || x.numel() == 0, op,
              ": preact is empty; call pos_conv_fwd with save_preact=True when gradients are needed");
  check_cpu_contiguous(preact, op, "preact", 3);
  check_same_dtype(preact, x, op, "preact", "x");
  check_shape(preact, x.sizes(), op, "preact");
  const int64_t B = x.size(0), frames = x.size(1), H = x.size(2), K = weight.size(2), Cg = H / groups;
  const int64_t CK = Cg * K;
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_w = at::zeros_like(weight);
  at::Tensor grad_b = bias_grad ? at::zeros({H}, x.options()) : at::empty({0}, x.options());
  if (x.numel() == 0) return {grad_x, grad_w, grad_b};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pos_conv_bwd_cpu", [&] {
    const int64_t n = x.numel();
    at::Tensor d = at::empty_like(x);
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    scalar_t* dp = d.mutable_data_ptr<scalar_t>();
    const scalar_t* prep = preact.const_data_ptr<scalar_t>();
    at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
      gelu_bwd<scalar_t>(gp + begin, prep + begin, dp + begin, end - begin);
    });
    if (bias_grad) {
      scalar_t* gb = grad_b.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, H, 64, [&](int64_t h0, int64_t h1) {
        std::vector<double> s(h1 - h0, 0.0);
        for (int64_t r = 0; r < B * frames; ++r) {
          const scalar_t* row = dp + r * H;
          for (int64_t h = h0; h < h1; ++h) s[h - h0] += row[h];
        }
        for (int64_t h = h0; h < h1; ++h) gb[h] = static_cast<scalar_t>(s[h - h0]);
      });
    }
    // grad_W[g] [Cg, Cg*K] = sum over batches and tiles of d_tile^T @ cols(x).
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* gw = grad_w.mutable_data_ptr<scalar_t>();
    const int64_t Tp = frames + K - 1, pad = K / 2;
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
      std::vector<scalar_t> xt(Cg * Tp), cols(kTileFrames * CK);
      for (int64_t g = g0; g < g1; ++g) {
        for (int64_t b = 0; b < B; ++b) {
          load_group_transposed(xp + b * frames * H, frames, H, g * Cg, Cg, pad, Tp, xt.data());
          for (int64_t t0 = 0; t0 < frames; t0 += kTileFrames) {
            const int64_t rows = std::min(kTileFrames, frames - t0);
            im2col_tile(xt.data(), Tp, Cg, K, t0, rows, cols.data());
            gemm_rm<scalar_t>(true, false, Cg, CK, rows, scalar_t(1), dp + (b * frames + t0) * H + g * Cg, H,
                              cols.data(), CK, scalar_t(1), gw + g * Cg * CK, CK);
          }
        }
      }
    });
    // grad_x = grad_out + correlate(d, Wf, pad K-1-P) with Wf[g][c, o*K + k] = W[g*Cg + o, c, K-1-k].
    at::Tensor wf = at::empty_like(weight);
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    scalar_t* wfp = wf.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g)
        for (int64_t o = 0; o < Cg; ++o)
          for (int64_t c = 0; c < Cg; ++c) {
            const scalar_t* src = wp + ((g * Cg + o) * Cg + c) * K;
            scalar_t* dst = wfp + ((g * Cg + c) * Cg + o) * K;
            for (int64_t k = 0; k < K; ++k) dst[k] = src[K - 1 - k];
          }
    });
    scalar_t* gx = grad_x.mutable_data_ptr<scalar_t>();
    grouped_correlate<scalar_t>(dp, B, frames, H, groups, K, K - 1 - pad, wfp,
                                [&](int64_t b, int64_t g, int64_t t0, int64_t rows, const scalar_t* acc) {
                                  for (int64_t i = 0; i < rows; ++i) {
                                    const int64_t off = (b * frames + t0 + i) * H + g * Cg;
                                    for (int64_t c = 0; c < Cg; ++c) gx[off + c] = gp[off + c] + acc[i * Cg + c];
                                  }
                                });
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(unispeech_fast, CPU, m) {
  m.impl("pos_conv_fwd", &pos_conv_fwd_cpu);
  m.impl("pos_conv_bwd", &pos_conv_bwd_cpu);
}

}  // namespace unispeech_fast
