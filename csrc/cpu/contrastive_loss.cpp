// CPU kernels of the fused contrastive (InfoNCE) loss: contrastive_loss_fwd / _bwd (schemas in csrc/schemas.cpp).
//
// pred c [N, D], targ t [N, D] (the flattened B*T frames), rows [M] int64 (the masked frames), neg [M, K] int64
// (rows of targ), codes [N, G] int64 or none. For masked row r with frame i = rows[r] and candidates
// j_0 = i, j_k = neg[r, k-1]:
//   s_k = <c_i, t_{j_k}> / (max(|c_i|, eps) max(|t_{j_k}|, eps)) / tau,   s_k = -inf for k >= 1 when j_k "equals" i
//   (same code in every group when codes are given, else the same target values in every element),
//   loss = sum_r lse_r - s_0,  lse_r = log sum_k exp(s_k).
// No [M, K, D] gather: each row reads its K + 1 target rows in place. The forward saves lse [M].
// Backward (g = grad_loss, a_k = softmax_k(s) - [k == 0], chat = c / max(|c|, eps), that = t / max(|t|, eps)):
//   grad_c_i = g / tau * P_c(sum_k a_k that_{j_k}),   P_x(v) = (v - xhat <xhat, v>) / |x| (|x| >= eps), v / eps else;
//   grad_t_j = g / tau * P_t(U_j),   U_j = sum over (r, k) with j_k = j of a_k chat_i   (a scatter-add, done per
//   column chunk so that no two tasks write the same element).
// float32 computes in float with double loss accumulation; float64 in double.
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

namespace unispeech_fast {
namespace {

constexpr double kCosEps = 1e-8;  // torch.cosine_similarity's eps

struct ClDims {
  int64_t N, D, M, K, G;
};

ClDims check_cl_args(const at::Tensor& pred, const at::Tensor& targ, const at::Tensor& rows, const at::Tensor& neg,
                     const std::optional<at::Tensor>& codes, double temperature, const char* op) {
  check_cpu_contiguous(pred, op, "predictions", 2);
  check_float(pred, op, "predictions");
  check_cpu_contiguous(targ, op, "targets", 2);
  check_same_dtype(targ, pred, op, "targets", "predictions");
  check_shape(targ, pred.sizes(), op, "targets");
  check_cpu_contiguous(rows, op, "rows", 1);
  TORCH_CHECK(rows.scalar_type() == at::kLong, op, ": rows must be int64, got ", rows.scalar_type());
  check_cpu_contiguous(neg, op, "negative_indices", 2);
  TORCH_CHECK(neg.scalar_type() == at::kLong, op, ": negative_indices must be int64, got ", neg.scalar_type());
  TORCH_CHECK(neg.size(0) == rows.size(0), op, ": negative_indices must have one row per masked frame (",
              rows.size(0), "), got ", neg.sizes());
  TORCH_CHECK(temperature > 0, op, ": temperature must be positive, got ", temperature);
  int64_t G = 0;
  if (codes.has_value()) {
    check_cpu_contiguous(*codes, op, "code_indices", 2);
    TORCH_CHECK(codes->scalar_type() == at::kLong && codes->size(0) == pred.size(0), op,
                ": code_indices must be int64 [", pred.size(0), ", G], got ", codes->scalar_type(), " ",
                codes->sizes());
    G = codes->size(1);
  }
  const int64_t N = pred.size(0);
  const int64_t* rp = rows.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < rows.size(0); ++r)
    TORCH_CHECK(rp[r] >= 0 && rp[r] < N, op, ": rows must be in [0, ", N, "), got ", rp[r]);
  const int64_t* np = neg.const_data_ptr<int64_t>();
  for (int64_t e = 0; e < neg.numel(); ++e)
    TORCH_CHECK(np[e] >= 0 && np[e] < N, op, ": negative_indices must be in [0, ", N, "), got ", np[e]);
  return {N, pred.size(1), rows.size(0), neg.size(1), G};
}

template <typename T>
std::vector<T> clamped_norms(const T* x, int64_t n, int64_t d) {
  std::vector<T> out(n);
  at::parallel_for(0, n, 256, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      T acc = T(0);
      for (int64_t c = 0; c < d; ++c) acc += x[i * d + c] * x[i * d + c];
      out[i] = std::max(std::sqrt(acc), static_cast<T>(kCosEps));
    }
  });
  return out;
}

template <typename T>
bool same_target(int64_t a, int64_t b, const T* tp, int64_t D, const int64_t* cp, int64_t G) {
  if (a == b) return true;
  if (cp != nullptr) {
    for (int64_t g = 0; g < G; ++g)
      if (cp[a * G + g] != cp[b * G + g]) return false;
    return true;
  }
  for (int64_t c = 0; c < D; ++c)
    if (tp[a * D + c] != tp[b * D + c]) return false;
  return true;
}

// Scores s[0..K] of masked row r (s_k = -inf for excluded negatives).
template <typename T>
void row_scores(int64_t r, const ClDims& d, const T* pp, const T* tp, const int64_t* rp, const int64_t* np,
                const int64_t* cp, const std::vector<T>& pn, const std::vector<T>& tn, T inv_tau, T* s) {
  const int64_t i = rp[r];
  const T* c = pp + i * d.D;
  for (int64_t k = 0; k <= d.K; ++k) {
    const int64_t j = k == 0 ? i : np[r * d.K + k - 1];
    if (k > 0 && same_target(i, j, tp, d.D, cp, d.G)) {
      s[k] = -std::numeric_limits<T>::infinity();
      continue;
    }
    const T* t = tp + j * d.D;
    T dot = T(0);
    for (int64_t col = 0; col < d.D; ++col) dot += c[col] * t[col];
    s[k] = dot / (pn[i] * tn[j]) * inv_tau;
  }
}

std::tuple<at::Tensor, at::Tensor> contrastive_loss_fwd_cpu(const at::Tensor& pred, const at::Tensor& targ,
                                                            const at::Tensor& rows, const at::Tensor& neg,
                                                            const std::optional<at::Tensor>& codes,
                                                            double temperature) {
  const char* op = "contrastive_loss_fwd";
  const ClDims d = check_cl_args(pred, targ, rows, neg, codes, temperature, op);
  at::Tensor loss = at::empty({}, pred.options());
  at::Tensor lse = at::empty({d.M}, pred.options());
  AT_DISPATCH_FLOATING_TYPES(pred.scalar_type(), "contrastive_loss_fwd_cpu", [&] {
    const scalar_t* pp = pred.const_data_ptr<scalar_t>();
    const scalar_t* tp = targ.const_data_ptr<scalar_t>();
    const int64_t* rp = rows.const_data_ptr<int64_t>();
    const int64_t* np = neg.const_data_ptr<int64_t>();
    const int64_t* cp = codes.has_value() ? codes->const_data_ptr<int64_t>() : nullptr;
    const std::vector<scalar_t> pn = clamped_norms(pp, d.N, d.D), tn = clamped_norms(tp, d.N, d.D);
    const scalar_t inv_tau = static_cast<scalar_t>(1.0 / temperature);
    scalar_t* lp = lse.mutable_data_ptr<scalar_t>();
    std::vector<double> row_loss(d.M);
    at::parallel_for(0, d.M, 16, [&](int64_t b, int64_t e) {
      std::vector<scalar_t> s(d.K + 1);
      for (int64_t r = b; r < e; ++r) {
        row_scores(r, d, pp, tp, rp, np, cp, pn, tn, inv_tau, s.data());
        scalar_t mx = s[0];  // finite: the positive is never excluded
        for (int64_t k = 1; k <= d.K; ++k) mx = std::max(mx, s[k]);
        scalar_t sum = scalar_t(0);
        for (int64_t k = 0; k <= d.K; ++k) sum += std::exp(s[k] - mx);
        lp[r] = mx + std::log(sum);
        row_loss[r] = static_cast<double>(lp[r]) - static_cast<double>(s[0]);
      }
    });
    double total = 0.0;
    for (double v : row_loss) total += v;  // fixed order: deterministic
    loss.fill_(total);
  });
  return {loss, lse};
}

// P_x(v) added into out: (v - xhat <xhat, v>) / |x| for |x| >= eps, else v / eps. xhat = x / |x| by
// division, so that a unit direction is exact (at D = 1 the projection is then exactly 0).
template <typename T>
void project_out(const T* x, T norm, const T* v, int64_t D, T scale, T* out) {
  if (norm > static_cast<T>(kCosEps)) {
    T dot = T(0);
    for (int64_t c = 0; c < D; ++c) dot += (x[c] / norm) * v[c];
    for (int64_t c = 0; c < D; ++c) out[c] += scale * (v[c] - (x[c] / norm) * dot) / norm;
  } else {
    for (int64_t c = 0; c < D; ++c) out[c] += scale * v[c] / norm;
  }
}

std::tuple<at::Tensor, at::Tensor> contrastive_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& pred,
                                                            const at::Tensor& targ, const at::Tensor& rows,
                                                            const at::Tensor& neg,
                                                            const std::optional<at::Tensor>& codes,
                                                            const at::Tensor& lse, double temperature) {
  const char* op = "contrastive_loss_bwd";
  const ClDims d = check_cl_args(pred, targ, rows, neg, codes, temperature, op);
  check_cpu_contiguous(lse, op, "lse", 1);
  check_same_dtype(lse, pred, op, "lse", "predictions");
  check_shape(lse, {d.M}, op, "lse");
  TORCH_CHECK(grad_loss.numel() == 1, op, ": grad_loss must be a scalar, got shape ", grad_loss.sizes());
  at::Tensor grad_pred = at::zeros_like(pred);
  at::Tensor grad_targ = at::zeros_like(targ);
  AT_DISPATCH_FLOATING_TYPES(pred.scalar_type(), "contrastive_loss_bwd_cpu", [&] {
    const scalar_t* pp = pred.const_data_ptr<scalar_t>();
    const scalar_t* tp = targ.const_data_ptr<scalar_t>();
    const int64_t* rp = rows.const_data_ptr<int64_t>();
    const int64_t* np = neg.const_data_ptr<int64_t>();
    const int64_t* cp = codes.has_value() ? codes->const_data_ptr<int64_t>() : nullptr;
    const scalar_t* lp = lse.const_data_ptr<scalar_t>();
    const std::vector<scalar_t> pn = clamped_norms(pp, d.N, d.D), tn = clamped_norms(tp, d.N, d.D);
    const scalar_t inv_tau = static_cast<scalar_t>(1.0 / temperature);
    const scalar_t g = static_cast<scalar_t>(grad_loss.to(at::kDouble).item<double>()) * inv_tau;
    const int64_t K1 = d.K + 1;
    // a[r, k] = softmax_k(s_r) - [k == 0]: the row's gradient w.r.t. its scores (times g / tau below).
    std::vector<scalar_t> a(d.M * K1);
    scalar_t* gp = grad_pred.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, d.M, 16, [&](int64_t b, int64_t e) {
      std::vector<scalar_t> v(d.D);
      for (int64_t r = b; r < e; ++r) {
        scalar_t* ar = a.data() + r * K1;
        row_scores(r, d, pp, tp, rp, np, cp, pn, tn, inv_tau, ar);
        for (int64_t k = 0; k < K1; ++k) ar[k] = std::exp(ar[k] - lp[r]) - (k == 0 ? scalar_t(1) : scalar_t(0));
        // grad_c = g/tau * P_c(sum_k a_k that_k); rows are distinct frames, so no two tasks share an output.
        std::fill(v.begin(), v.end(), scalar_t(0));
        for (int64_t k = 0; k < K1; ++k) {
          if (ar[k] == scalar_t(0)) continue;
          const int64_t j = k == 0 ? rp[r] : np[r * d.K + k - 1];
          const scalar_t w = ar[k] / tn[j];
          for (int64_t col = 0; col < d.D; ++col) v[col] += w * tp[j * d.D + col];
        }
        const int64_t i = rp[r];
        project_out(pp + i * d.D, pn[i], v.data(), d.D, g, gp + i * d.D);
      }
    });
    // U_j = sum_{(r, k) -> j} a_rk chat_i, per column chunk (serial over rows inside a chunk).
    std::vector<scalar_t> U(d.N * d.D, scalar_t(0));
    const int64_t chunk = 16, nchunks = (d.D + chunk - 1) / chunk;
    at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t ch = b; ch < e; ++ch) {
        const int64_t c0 = ch * chunk, c1 = std::min(d.D, c0 + chunk);
        for (int64_t r = 0; r < d.M; ++r) {
          const int64_t i = rp[r];
          const scalar_t inv = scalar_t(1) / pn[i];
          for (int64_t k = 0; k < K1; ++k) {
            const scalar_t w = a[r * K1 + k];
            if (w == scalar_t(0)) continue;
            const int64_t j = k == 0 ? i : np[r * d.K + k - 1];
            for (int64_t col = c0; col < c1; ++col) U[j * d.D + col] += w * pp[i * d.D + col] * inv;
          }
        }
      }
    });
    scalar_t* gt = grad_targ.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, d.N, 64, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) project_out(tp + j * d.D, tn[j], U.data() + j * d.D, d.D, g, gt + j * d.D);
    });
  });
  return {grad_pred, grad_targ};
}

}  // namespace

TORCH_LIBRARY_IMPL(unispeech_fast, CPU, m) {
  m.impl("contrastive_loss_fwd", &contrastive_loss_fwd_cpu);
  m.impl("contrastive_loss_bwd", &contrastive_loss_bwd_cpu);
}

}  // namespace unispeech_fast
