// CPU kernel of one feature-extractor layer (conv_norm_gelu_fwd, schema in csrc/schemas.cpp):
//   z[b, o, t] = bias[o] + sum_{c, k} W[o, c, k] x[b, c, t*stride + k]
//   norm_kind 0: y = gelu(z)
//   norm_kind 1: y = gelu((z - mu[b, o]) / sqrt(var[b, o] + eps) * gamma[o] + beta[o]), mean/variance
//                (biased) over t: GroupNorm with one group per channel
//   norm_kind 2: y = gelu((z - mu[b, t]) / sqrt(var[b, t] + eps) * gamma[o] + beta[o]), over o: LayerNorm
// Implicit GEMM per (batch, tile of kTileFrames output frames): the tile's columns
// cols[(c, k), i] = x[b, c, (t0 + i)*stride + k] are gathered (cache-sized), z_tile = W @ cols is written
// straight into the output ([C_out, tile] with row stride T_out), and bias, LayerNorm and GELU are applied
// while the tile is in cache. GroupNorm needs the whole time axis: the tile pass stores z and each tile's
// per-channel (count, mean, M2), merged with Chan's parallel-variance formula; a second streaming pass
// normalises and applies GELU in place. Tasks run on at::parallel_for; each GEMM is single-threaded.
// No backward here: unispeech_fast/ops/feature_extractor/extension.py differentiates by recomputing the eager layer.
#include <torch/library.h>

#include <optional>
#include <vector>

#include "common.h"

namespace unispeech_fast {
namespace {

constexpr int64_t kTileFrames = 128;  // output frames per tile: [C_in*K, 128] columns (768 KiB at 512x3)

// cols[(c*K + k) * ld + i] = x[c, (t0 + i)*stride + k], x is [C_in, T_in] for one batch.
template <typename T>
void gather_cols(const T* x, int64_t Cin, int64_t Tin, int64_t K, int64_t stride, int64_t t0, int64_t rows,
                 T* cols, int64_t ld) {
  for (int64_t c = 0; c < Cin; ++c) {
    const T* xr = x + c * Tin + t0 * stride;
    for (int64_t k = 0; k < K; ++k) {
      T* dst = cols + (c * K + k) * ld;
      if (stride == 1) {
        std::memcpy(dst, xr + k, sizeof(T) * rows);
      } else {
        for (int64_t i = 0; i < rows; ++i) dst[i] = xr[i * stride + k];
      }
    }
  }
}

// Kernel 3, stride 2 (the 512->512 layers): per pair of outputs (t, t+1) with e0, e1, e2 = x[2t],
// x[2t+2], x[2t+4] and o0, o1 = x[2t+1], x[2t+3], and W = [A | C | B] over the taps:
//   y[t] = A e0 + C o0 + B e1 = (A (e0 - e1) + C o0) + (A + B) e1
//   y[t+1] = A e1 + C o1 + B e2 = (B (e2 - e1) + C o1) + (A + B) e1
// a Winograd F(2,2)-style split of the even taps: three GEMMs with inner sizes 2C, C, 2C per two
// frames instead of 3C + 3C (5/6 of the multiplications).
template <typename T>
struct Polyphase32 {
  std::vector<T> w_ac, w_ab, w_bc;  // [C_out, 2 C_in], [C_out, C_in], [C_out, 2 C_in]
  Polyphase32(const T* w, int64_t Cout, int64_t Cin) : w_ac(Cout * 2 * Cin), w_ab(Cout * Cin), w_bc(Cout * 2 * Cin) {
    for (int64_t o = 0; o < Cout; ++o)
      for (int64_t c = 0; c < Cin; ++c) {
        const T a = w[(o * Cin + c) * 3], cc = w[(o * Cin + c) * 3 + 1], b = w[(o * Cin + c) * 3 + 2];
        w_ac[o * 2 * Cin + c] = a;
        w_ac[o * 2 * Cin + Cin + c] = cc;
        w_ab[o * Cin + c] = a + b;
        w_bc[o * 2 * Cin + c] = b;
        w_bc[o * 2 * Cin + Cin + c] = cc;
      }
  }
};

// One tile of `rows` frames from t0 through the polyphase split; writes z (no bias) into y (row stride ld).
template <typename T>
void polyphase_tile(const Polyphase32<T>& pw, const T* x, int64_t Cin, int64_t Tin, int64_t Cout, int64_t t0,
                    int64_t rows, T* y, int64_t ld, T* scratch) {
  const int64_t n = (rows + 1) / 2, P = kTileFrames / 2;
  T* c1 = scratch;                  // [2 Cin, P]: e0 - e1 ; o0
  T* c2 = c1 + 2 * Cin * P;         // [Cin, P]:   e1
  T* c3 = c2 + Cin * P;             // [2 Cin, P]: e2 - e1 ; o1
  T* g1 = c3 + 2 * Cin * P;         // [Cout, P] each
  T* g2 = g1 + Cout * P;
  T* g3 = g2 + Cout * P;
  for (int64_t c = 0; c < Cin; ++c) {
    const T* xr = x + c * Tin;
    for (int64_t u = 0; u < n; ++u) {
      const int64_t b = 2 * (t0 + 2 * u);
      auto at = [&](int64_t i) { return i < Tin ? xr[i] : T(0); };
      const T e0 = at(b), o0 = at(b + 1), e1 = at(b + 2), o1 = at(b + 3), e2 = at(b + 4);
      c1[c * P + u] = e0 - e1;
      c1[(Cin + c) * P + u] = o0;
      c2[c * P + u] = e1;
      c3[c * P + u] = e2 - e1;
      c3[(Cin + c) * P + u] = o1;
    }
  }
  gemm_rm<T>(false, false, Cout, n, 2 * Cin, T(1), pw.w_ac.data(), 2 * Cin, c1, P, T(0), g1, P);
  gemm_rm<T>(false, false, Cout, n, Cin, T(1), pw.w_ab.data(), Cin, c2, P, T(0), g2, P);
  gemm_rm<T>(false, false, Cout, n, 2 * Cin, T(1), pw.w_bc.data(), 2 * Cin, c3, P, T(0), g3, P);
  for (int64_t o = 0; o < Cout; ++o) {
    T* yr = y + o * ld;
    const T* a = g1 + o * P;
    const T* m = g2 + o * P;
    const T* d = g3 + o * P;
    for (int64_t u = 0; u < n; ++u) {
      yr[2 * u] = a[u] + m[u];
      if (2 * u + 1 < rows) yr[2 * u + 1] = d[u] + m[u];
    }
  }
}

// y[o, i] = gelu(y[o, i] + bias[o]) on a [C, rows] tile with row stride ld.
template <typename T>
USF_INLINE void bias_gelu_impl(T* y, int64_t C, int64_t rows, int64_t ld, const T* bias) {
  for (int64_t o = 0; o < C; ++o) {
    T* r = y + o * ld;
    const T bo = bias ? bias[o] : T(0);
    for (int64_t i = 0; i < rows; ++i) r[i] = gelu_val(r[i] + bo);
  }
}
USF_MULTIVERSION(bias_gelu_f32, bias_gelu_impl, (float* y, int64_t C, int64_t rows, int64_t ld, const float* bias),
                 (y, C, rows, ld, bias))

// LayerNorm over the C rows of each column i, then GELU; acc1/acc2 are scratch of rows values.
template <typename T>
USF_INLINE void layer_norm_gelu_impl(T* y, int64_t C, int64_t rows, int64_t ld, const T* bias, const T* gamma,
                                     const T* beta, T eps, T* mean, T* rstd) {
  for (int64_t i = 0; i < rows; ++i) mean[i] = T(0);
  for (int64_t o = 0; o < C; ++o) {
    T* r = y + o * ld;
    const T bo = bias ? bias[o] : T(0);
    for (int64_t i = 0; i < rows; ++i) {
      r[i] += bo;
      mean[i] += r[i];
    }
  }
  const T inv_c = T(1) / static_cast<T>(C);
  for (int64_t i = 0; i < rows; ++i) {
    mean[i] *= inv_c;
    rstd[i] = T(0);
  }
  for (int64_t o = 0; o < C; ++o) {
    const T* r = y + o * ld;
    for (int64_t i = 0; i < rows; ++i) {
      const T d = r[i] - mean[i];
      rstd[i] += d * d;
    }
  }
  for (int64_t i = 0; i < rows; ++i) rstd[i] = T(1) / std::sqrt(rstd[i] * inv_c + eps);
  for (int64_t o = 0; o < C; ++o) {
    T* r = y + o * ld;
    const T g = gamma[o], bt = beta[o];
    for (int64_t i = 0; i < rows; ++i) r[i] = gelu_val((r[i] - mean[i]) * rstd[i] * g + bt);
  }
}
USF_MULTIVERSION(layer_norm_gelu_f32, layer_norm_gelu_impl,
                 (float* y, int64_t C, int64_t rows, int64_t ld, const float* bias, const float* gamma,
                  const float* beta, float eps, float* mean, float* rstd),
                 (y, C, rows, ld, bias, gamma, beta, eps, mean, rstd))

// Adds bias and records per-row (mean, M2) of the tile into stats[o] = {mean, M2} (count = rows).
template <typename T>
USF_INLINE void bias_row_stats_impl(T* y, int64_t C, int64_t rows, int64_t ld, const T* bias, double* stats) {
  for (int64_t o = 0; o < C; ++o) {
    T* r = y + o * ld;
    const T bo = bias ? bias[o] : T(0);
    T s = T(0);
    for (int64_t i = 0; i < rows; ++i) {
      r[i] += bo;
      s += r[i];
    }
    const T m = s / static_cast<T>(rows);
    T q = T(0);
    for (int64_t i = 0; i < rows; ++i) {
      const T d = r[i] - m;
      q += d * d;
    }
    stats[2 * o] = m;
    stats[2 * o + 1] = q;
  }
}
USF_MULTIVERSION(bias_row_stats_f32, bias_row_stats_impl,
                 (float* y, int64_t C, int64_t rows, int64_t ld, const float* bias, double* stats),
                 (y, C, rows, ld, bias, stats))

// y = gelu(y * a + c) over n values (GroupNorm's folded affine, then GELU).
template <typename T>
USF_INLINE void affine_gelu_impl(T* y, int64_t n, T a, T c) {
  for (int64_t i = 0; i < n; ++i) y[i] = gelu_val(y[i] * a + c);
}
USF_MULTIVERSION(affine_gelu_f32, affine_gelu_impl, (float* y, int64_t n, float a, float c), (y, n, a, c))

template <typename T>
void bias_gelu(T* y, int64_t C, int64_t rows, int64_t ld, const T* bias) {
  if constexpr (std::is_same_v<T, float>) bias_gelu_f32(y, C, rows, ld, bias);
  else bias_gelu_impl(y, C, rows, ld, bias);
}
template <typename T>
void layer_norm_gelu(T* y, int64_t C, int64_t rows, int64_t ld, const T* bias, const T* gamma, const T* beta, T eps,
                     T* mean, T* rstd) {
  if constexpr (std::is_same_v<T, float>) layer_norm_gelu_f32(y, C, rows, ld, bias, gamma, beta, eps, mean, rstd);
  else layer_norm_gelu_impl(y, C, rows, ld, bias, gamma, beta, eps, mean, rstd);
}
template <typename T>
void bias_row_stats(T* y, int64_t C, int64_t rows, int64_t ld, const T* bias, double* stats) {
  if constexpr (std::is_same_v<T, float>) bias_row_stats_f32(y, C, rows, ld, bias, stats);
  else bias_row_stats_impl(y, C, rows, ld, bias, stats);
}
template <typename T>
void affine_gelu(T* y, int64_t n, T a, T c) {
  if constexpr (std::is_same_v<T, float>) affine_gelu_f32(y, n, a, c);
  else affine_gelu_impl(y, n, a, c);
}

at::Tensor conv_norm_gelu_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  const std::optional<at::Tensor>& norm_weight,
                                  const std::optional<at::Tensor>& norm_bias, int64_t stride, int64_t norm_kind,
                                  double eps) {
  const char* op = "conv_norm_gelu_fwd";
  check_cpu_contiguous(x, op, "x", 3);
  check_float(x, op, "x");
  check_cpu_contiguous(weight, op, "weight", 3);
  check_same_dtype(weight, x, op, "weight", "x");
  const int64_t B = x.size(0), Cin = x.size(1), Tin = x.size(2), Cout = weight.size(0), K = weight.size(2);
  TORCH_CHECK(weight.size(1) == Cin, op, ": weight must have shape [C_out, ", Cin, ", K] (C_in of x), got ",
              weight.sizes());
  TORCH_CHECK(K > 0 && Cout > 0, op, ": weight must have nonzero C_out and K, got ", weight.sizes());
  TORCH_CHECK(stride > 0, op, ": stride must be positive, got ", stride);
  TORCH_CHECK(norm_kind >= 0 && norm_kind <= 2, op, ": norm_kind must be 0 (none), 1 (group) or 2 (layer), got ",
              norm_kind);
  TORCH_CHECK(Tin >= K, op, ": x has ", Tin, " frames, fewer than the kernel size ", K);
  TORCH_CHECK(eps >= 0, op, ": eps must be non-negative, got ", eps);
  auto check_vec = [&](const std::optional<at::Tensor>& t, const char* name) {
    if (!t.has_value()) return;
    check_cpu_contiguous(*t, op, name, 1);
    check_same_dtype(*t, x, op, name, "x");
    check_shape(*t, {Cout}, op, name);
  };
  check_vec(bias, "bias");
  if (norm_kind != 0) {
    TORCH_CHECK(norm_weight.has_value() && norm_bias.has_value(), op,
                ": norm_weight and norm_bias are required when norm_kind != 0");
    check_vec(norm_weight, "norm_weight");
    check_vec(norm_bias, "norm_bias");
  }
  const int64_t Tout = (Tin - K) / stride + 1, CK = Cin * K;
  at::Tensor out = at::empty({B, Cout, Tout}, x.options());
  if (out.numel() == 0) return out;
  const int64_t ntiles = (Tout + kTileFrames - 1) / kTileFrames;
  std::vector<double> tile_stats(norm_kind == 1 ? B * ntiles * Cout * 2 : 0);

  // The polyphase split pays off where the GEMM dominates (many input channels).
  const bool polyphase = K == 3 && stride == 2 && Cin >= 64;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_norm_gelu_fwd_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = weight.const_data_ptr<scalar_t>();
    std::optional<Polyphase32<scalar_t>> pw;
    if (polyphase) pw.emplace(wp, Cout, Cin);
    const scalar_t* bp = bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* gp = norm_kind != 0 ? norm_weight->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* btp = norm_kind != 0 ? norm_bias->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, B * ntiles, 1, [&](int64_t begin, int64_t end) {
      const int64_t P = kTileFrames / 2;
      std::vector<scalar_t> cols(polyphase ? (5 * Cin + 3 * Cout) * P : CK * kTileFrames), s1(kTileFrames),
          s2(kTileFrames);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / ntiles, tile = item % ntiles, t0 = tile * kTileFrames;
        const int64_t rows = std::min(kTileFrames, Tout - t0);
        scalar_t* y = yp + b * Cout * Tout + t0;
        if (polyphase) {
          polyphase_tile<scalar_t>(*pw, xp + b * Cin * Tin, Cin, Tin, Cout, t0, rows, y, Tout, cols.data());
        } else {
          gather_cols(xp + b * Cin * Tin, Cin, Tin, K, stride, t0, rows, cols.data(), kTileFrames);
          gemm_rm<scalar_t>(false, false, Cout, rows, CK, scalar_t(1), wp, CK, cols.data(), kTileFrames, scalar_t(0),
                            y, Tout);
        }
        if (norm_kind == 0) {
          bias_gelu<scalar_t>(y, Cout, rows, Tout, bp);
        } else if (norm_kind == 2) {
          layer_norm_gelu<scalar_t>(y, Cout, rows, Tout, bp, gp, btp, static_cast<scalar_t>(eps), s1.data(), s2.data());
        } else {
          bias_row_stats<scalar_t>(y, Cout, rows, Tout, bp, tile_stats.data() + (b * ntiles + tile) * Cout * 2);
        }
      }
    });
    if (norm_kind == 1) {
      at::parallel_for(0, B * Cout, 1, [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const int64_t b = item / Cout, o = item % Cout;
          // Chan et al.: merge the tiles' (count, mean, M2).
          double n = 0.0, mean = 0.0, m2 = 0.0;
          for (int64_t tile = 0; tile < ntiles; ++tile) {
            const double* st = tile_stats.data() + ((b * ntiles + tile) * Cout + o) * 2;
            const double nb = static_cast<double>(std::min(kTileFrames, Tout - tile * kTileFrames));
            const double delta = st[0] - mean, tot = n + nb;
            mean += delta * nb / tot;
            m2 += st[1] + delta * delta * n * nb / tot;
            n = tot;
          }
          const double rstd = 1.0 / std::sqrt(m2 / n + eps);
          const double a = rstd * static_cast<double>(gp[o]);
          const double c = static_cast<double>(btp[o]) - mean * a;
          affine_gelu<scalar_t>(yp + item * Tout, Tout, static_cast<scalar_t>(a), static_cast<scalar_t>(c));
        }
      });
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(unispeech_fast, CPU, m) { m.impl("conv_norm_gelu_fwd", &conv_norm_gelu_fwd_cpu); }

}  // namespace unispeech_fast
