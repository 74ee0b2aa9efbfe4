// CPU kernels of the Gumbel product quantizer (gumbel_quantizer_fwd / _bwd, schemas in csrc/schemas.cpp).
//
// logits l [N, G*V] (G groups of V codes), codevectors C [G*V, Dg]. Forward per row n and group g:
//   sample:  z = (l + gumbels) / tau, s = softmax(z), i = argmax s     (gumbels given: the Python layer
//            draws them from torch's RNG exactly as F.gumbel_softmax, so the stream matches eager;
//            the Philox seed/offset arguments are for the CUDA kernel and unused here)
//   eval:    i = argmax l
//   quantized[n, g*Dg:(g+1)*Dg] = C[g*V + i]                          (a gather, no one-hot product)
//   perplexity = sum_g exp(-sum_v m_gv log m_gv), m = mean_n softmax(l[n, g]) (sample) or the mean one-hot;
//            with mask (bool [N]) the mean runs over the rows where it is true (N below is then their count)
// Backward (sample; the forward value is the straight-through y = onehot - s.detach() + s):
//   dy[n, g, v] = <grad_q[n, g], C[g*V + v]>,  grad_l = s * (dy - <s, dy>) / tau
//                 + p * (e - <p, e>) with p = softmax(l[n, g]), e_v = grad_perp * exp(H_g) * -(log m_gv + 1) / N
//                 (the second term only on rows in the mask, when one is given)
//   grad_C[g*V + v] = sum_{n : i[n, g] = v} grad_q[n, g]
// eval: grad_l = 0 (argmax has no gradient), grad_C as above.
// Float logits compute in float (as eager's gumbel_softmax); float64 logits in double (then soft and
// the perplexity are float64 too).
#include <torch/library.h>

#include <vector>

#include "common.h"

namespace unispeech_fast {
namespace {

struct Dims {
  int64_t N, G, V, Dg;
};

Dims check_gumbel_args(const at::Tensor& logits, const at::Tensor& codevectors, int64_t num_groups, double temperature,
                       const char* op) {
  check_cpu_contiguous(logits, op, "logits", 2);
  check_float(logits, op, "logits");
  check_cpu_contiguous(codevectors, op, "codevectors", 2);
  check_same_dtype(codevectors, logits, op, "codevectors", "logits");
  TORCH_CHECK(num_groups > 0 && logits.size(1) % num_groups == 0 && logits.size(1) > 0, op,
              ": num_groups must be positive and divide logits.size(1) = ", logits.size(1), ", got ", num_groups);
  TORCH_CHECK(codevectors.size(0) == logits.size(1), op, ": codevectors must have shape [", logits.size(1),
              ", D/G] (G*V rows), got ", codevectors.sizes());
  TORCH_CHECK(temperature > 0, op, ": temperature must be positive, got ", temperature);
  return {logits.size(0), num_groups, logits.size(1) / num_groups, codevectors.size(1)};
}

// Softmax of one row l[0, V) into out: e_v = exp(l_v - max) in T (as eager), their sum in double and
// p_v = e_v / sum rounded once to T. (A serial T sum and a multiplication by 1/sum gave float rows of 320
// codes about 4x eager's error against fp64; eager's vectorised sum has 8-16 partial sums.)
template <typename T>
void softmax_row(const T* l, int64_t V, T* out) {
  T mx = l[0];
  for (int64_t v = 1; v < V; ++v) mx = std::max(mx, l[v]);
  double sum = 0.0;
  for (int64_t v = 0; v < V; ++v) {
    out[v] = std::exp(l[v] - mx);
    sum += static_cast<double>(out[v]);
  }
  for (int64_t v = 0; v < V; ++v) out[v] = static_cast<T>(static_cast<double>(out[v]) / sum);
}

// Rows in the perplexity mask (all rows without one): pointer to bool [N] or nullptr, and their count.
struct RowMask {
  const bool* keep;
  int64_t count;
  bool has(int64_t n) const { return keep == nullptr || keep[n]; }
};

RowMask check_row_mask(const std::optional<at::Tensor>& mask, int64_t N, const char* op) {
  if (!mask.has_value()) return {nullptr, N};
  TORCH_CHECK(mask->device().is_cpu() && mask->scalar_type() == at::kBool && mask->is_contiguous() &&
                  mask->dim() == 1 && mask->size(0) == N,
              op, ": mask must be a contiguous CPU bool tensor of shape [", N, "], got ", mask->scalar_type(), " ",
              mask->sizes(), " on ", mask->device());
  const bool* keep = mask->const_data_ptr<bool>();
  int64_t count = 0;
  for (int64_t n = 0; n < N; ++n) count += keep[n] ? 1 : 0;
  return {keep, count};
}

// m[g, v] = mean over the rows in the mask of softmax(l[n, g])_v, accumulated in double.
template <typename T>
std::vector<double> marginal_softmax(const T* lp, const Dims& d, const RowMask& rows) {
  const int64_t GV = d.G * d.V;
  const int nthreads = at::get_num_threads();
  std::vector<double> parts(static_cast<size_t>(nthreads) * GV, 0.0);
  at::parallel_for(0, d.N, 64, [&](int64_t begin, int64_t end) {
    double* acc = parts.data() + static_cast<size_t>(at::get_thread_num()) * GV;
    std::vector<T> p(d.V);
    for (int64_t n = begin; n < end; ++n)
      for (int64_t g = 0; g < d.G && rows.has(n); ++g) {
        softmax_row(lp + n * GV + g * d.V, d.V, p.data());
        for (int64_t v = 0; v < d.V; ++v) acc[g * d.V + v] += p[v];
      }
  });
  std::vector<double> m(GV, 0.0);
  for (int t = 0; t < nthreads; ++t)
    for (int64_t j = 0; j < GV; ++j) m[j] += parts[static_cast<size_t>(t) * GV + j];
  for (auto& v : m) v /= static_cast<double>(rows.count);
  return m;
}

double perplexity_of(const std::vector<double>& m, const Dims& d) {
  double total = 0.0;
  for (int64_t g = 0; g < d.G; ++g) {
    double h = 0.0;
    for (int64_t v = 0; v < d.V; ++v) {
      const double x = m[g * d.V + v];
      if (x > 0) h -= x * std::log(x);
    }
    total += std::exp(h);
  }
  return total;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gumbel_quantizer_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& codevectors, int64_t num_groups, double temperature, bool sample,
    const std::optional<at::Tensor>& gumbels, int64_t seed, int64_t offset, const std::optional<at::Tensor>& mask) {
  const char* op = "gumbel_quantizer_fwd";
  const Dims d = check_gumbel_args(logits, codevectors, num_groups, temperature, op);
  const RowMask rows = check_row_mask(mask, d.N, op);
  const at::ScalarType acc_type = logits.scalar_type();  // float -> float32 soft/perplexity, double -> float64
  at::Tensor gum;
  if (sample) {
    TORCH_CHECK(gumbels.has_value(), op,
                ": gumbels is required in sample mode on CPU (drawing noise from seed/offset is CUDA-only)");
    TORCH_CHECK(gumbels->device().is_cpu() && gumbels->sizes() == logits.sizes(), op,
                ": gumbels must be a CPU tensor of the shape of logits ", logits.sizes(), ", got ", gumbels->sizes(),
                " on ", gumbels->device());
    check_float(*gumbels, op, "gumbels");
    gum = gumbels->to(acc_type).contiguous();
  }
  const int64_t N = d.N, G = d.G, V = d.V, Dg = d.Dg, GV = G * V;
  at::Tensor quantized = at::empty({N, G * Dg}, codevectors.options());
  at::Tensor indices = at::empty({N, G}, logits.options().dtype(at::kLong));
  at::Tensor soft = sample ? at::empty({N, G, V}, logits.options().dtype(acc_type)) : at::empty({0}, logits.options());
  at::Tensor perplexity = at::empty({}, logits.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "gumbel_quantizer_fwd_cpu", [&] {
    const scalar_t* lp = logits.const_data_ptr<scalar_t>();
    const scalar_t* cp = codevectors.const_data_ptr<scalar_t>();
    const scalar_t* gp = sample ? gum.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* qp = quantized.mutable_data_ptr<scalar_t>();
    int64_t* ip = indices.mutable_data_ptr<int64_t>();
    scalar_t* sp = sample ? soft.mutable_data_ptr<scalar_t>() : nullptr;
    const scalar_t tau = static_cast<scalar_t>(temperature);
    at::parallel_for(0, N * G, 16, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> z(V);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / G, g = item % G;
        const scalar_t* l = lp + n * GV + g * V;
        int64_t best = 0;
        if (sample) {
          const scalar_t* gu = gp + n * GV + g * V;
          for (int64_t v = 0; v < V; ++v) z[v] = (l[v] + gu[v]) / tau;
          scalar_t* s = sp + item * V;
          softmax_row(z.data(), V, s);
          for (int64_t v = 1; v < V; ++v)
            if (s[v] > s[best]) best = v;
        } else {
          for (int64_t v = 1; v < V; ++v)
            if (l[v] > l[best]) best = v;
        }
        ip[item] = best;
        std::memcpy(qp + n * G * Dg + g * Dg, cp + (g * V + best) * Dg, sizeof(scalar_t) * Dg);
      }
    });
    std::vector<double> m;
    if (sample) {
      m = marginal_softmax(lp, d, rows);
    } else {
      m.assign(GV, 0.0);
      for (int64_t item = 0; item < N * G; ++item)
        if (rows.has(item / G)) m[(item % G) * V + ip[item]] += 1.0;
      for (auto& v : m) v /= static_cast<double>(rows.count);
    }
    perplexity.fill_(rows.count > 0 ? perplexity_of(m, d) : std::nan(""));
  });
  return {quantized, indices, soft, perplexity};
}

std::tuple<at::Tensor, at::Tensor> gumbel_quantizer_bwd_cpu(const at::Tensor& grad_quantized,
                                                           const at::Tensor& grad_perplexity, const at::Tensor& logits,
                                                           const at::Tensor& codevectors, const at::Tensor& indices,
                                                           const at::Tensor& soft, int64_t num_groups,
                                                           double temperature, bool sample,
                                                           const std::optional<at::Tensor>& mask) {
  const char* op = "gumbel_quantizer_bwd";
  const Dims d = check_gumbel_args(logits, codevectors, num_groups, temperature, op);
  const RowMask rows = check_row_mask(mask, d.N, op);
  const int64_t N = d.N, G = d.G, V = d.V, Dg = d.Dg, GV = G * V;
  check_cpu_contiguous(grad_quantized, op, "grad_quantized", 2);
  check_same_dtype(grad_quantized, codevectors, op, "grad_quantized", "codevectors");
  check_shape(grad_quantized, {N, G * Dg}, op, "grad_quantized");
  check_cpu_contiguous(indices, op, "indices", 2);
  TORCH_CHECK(indices.scalar_type() == at::kLong, op, ": indices must be int64, got ", indices.scalar_type());
  check_shape(indices, {N, G}, op, "indices");
  TORCH_CHECK(grad_perplexity.numel() == 1, op, ": grad_perplexity must be a scalar, got shape ",
              grad_perplexity.sizes());
  if (sample) {
    check_cpu_contiguous(soft, op, "soft", 3);
    check_same_dtype(soft, logits, op, "soft", "logits");
    check_shape(soft, {N, G, V}, op, "soft");
  }
  at::Tensor grad_logits = at::zeros_like(logits);
  at::Tensor grad_cv = at::zeros_like(codevectors);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "gumbel_quantizer_bwd_cpu", [&] {
    const scalar_t* gq = grad_quantized.const_data_ptr<scalar_t>();
    const scalar_t* cp = codevectors.const_data_ptr<scalar_t>();
    const int64_t* ip = indices.const_data_ptr<int64_t>();
    scalar_t* gc = grad_cv.mutable_data_ptr<scalar_t>();
    const int64_t chunk = 64, nchunks = (Dg + chunk - 1) / chunk;
    // grad_C: per (group, column chunk) a serial scatter-add over rows; no two tasks share an output.
    at::parallel_for(0, G * nchunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t g = item / nchunks, c0 = (item % nchunks) * chunk, c1 = std::min(Dg, c0 + chunk);
        for (int64_t n = 0; n < N; ++n) {
          const int64_t v = ip[n * G + g];
          TORCH_CHECK(v >= 0 && v < V, op, ": indices out of range [0, ", V, "): ", v);
          const scalar_t* src = gq + n * G * Dg + g * Dg;
          scalar_t* dst = gc + (g * V + v) * Dg;
          for (int64_t c = c0; c < c1; ++c) dst[c] += src[c];
        }
      }
    });
    if (!sample || N == 0) return;
    // dy[n, g, :] = grad_q[n, g] @ C_g^T, one GEMM per group.
    std::vector<scalar_t> dy(N * GV);
    for (int64_t g = 0; g < G; ++g)
      gemm_rm<scalar_t>(false, true, N, V, Dg, scalar_t(1), gq + g * Dg, G * Dg, cp + g * V * Dg, Dg, scalar_t(0),
                        dy.data() + g * V, GV);
    const scalar_t* lp = logits.const_data_ptr<scalar_t>();
    const scalar_t* sp = soft.const_data_ptr<scalar_t>();
    scalar_t* gl = grad_logits.mutable_data_ptr<scalar_t>();
    const double gperp = grad_perplexity.to(at::kDouble).item<double>();
    std::vector<scalar_t> coef(GV, scalar_t(0));
    const bool perp_grad = gperp != 0.0 && rows.count > 0;
    if (perp_grad) {
      const std::vector<double> m = marginal_softmax(lp, d, rows);
      for (int64_t g = 0; g < G; ++g) {
        double h = 0.0;
        for (int64_t v = 0; v < V; ++v) {
          const double x = m[g * V + v];
          if (x > 0) h -= x * std::log(x);
        }
        const double scale = gperp * std::exp(h) / static_cast<double>(rows.count);
        for (int64_t v = 0; v < V; ++v) {
          const double x = m[g * V + v];
          coef[g * V + v] = static_cast<scalar_t>(x > 0 ? -scale * (std::log(x) + 1.0) : 0.0);
        }
      }
    }
    const scalar_t inv_tau = scalar_t(1) / static_cast<scalar_t>(temperature);
    at::parallel_for(0, N * G, 16, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> p(V);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / G, g = item % G;
        const scalar_t* s = sp + item * V;
        const scalar_t* dyr = dy.data() + n * GV + g * V;
        scalar_t* out = gl + n * GV + g * V;
        scalar_t dot = scalar_t(0);
        for (int64_t v = 0; v < V; ++v) dot += s[v] * dyr[v];
        for (int64_t v = 0; v < V; ++v) out[v] = s[v] * (dyr[v] - dot) * inv_tau;
        if (perp_grad && rows.has(n)) {
          softmax_row(lp + n * GV + g * V, V, p.data());
          const scalar_t* e = coef.data() + g * V;
          scalar_t pe = scalar_t(0);
          for (int64_t v = 0; v < V; ++v) pe += p[v] * e[v];
          for (int64_t v = 0; v < V; ++v) out[v] += p[v] * (e[v] - pe);
        }
      }
    });
  });
  return {grad_logits, grad_cv};
}

}  // namespace

TORCH_LIBRARY_IMPL(unispeech_fast, CPU, m) {
  m.impl("gumbel_quantizer_fwd", &gumbel_quantizer_fwd_cpu);
  m.impl("gumbel_quantizer_bwd", &gumbel_quantizer_bwd_cpu);
}

}  // namespace unispeech_fast
