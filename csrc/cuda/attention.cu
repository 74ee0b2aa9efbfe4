// attention_fwd on CUDA: flash-attention forward with tensor cores (WMMA 16x16x16), fp16/bf16,
// head dim 64 or 128, key padding by sequence length, per-head mask. Forward only (inference).
//
// UNVERIFIED ON HARDWARE: written and compile-checked (nvcc 13, sm_80/sm_90) on a machine without a
// GPU; tests/ops/test_attention.py compares it with the eager reference where a GPU exists.
//
// Math, per batch b, head h and query t (L = seqlens[b] clamped to [0, T], or T without seqlens):
//   s[t, j] = scale * q[b, t, h] . k[b, j, h]                 for keys j < L
//   out[b, t, h] = head_mask[h] * sum_{j < L} softmax_j(s[t, :L]) v[b, j, h]
// computed blockwise with the online softmax: per key block, m' = max(m, max_j s), l' = l e^{m - m'} +
// sum_j e^{s_j - m'}, acc' = acc e^{m - m'} + e^{s - m'} V, and out = acc / l at the end (exp2 with the
// scale folded into log2(e)). Key blocks at or past L are never loaded, and the padded rows of the
// last partial block are zero-filled (not read). A row with L = 0 uses L = T and score scale 0: it
// attends to all T keys uniformly, which is what the reference (masked_fill with finfo.min) computes.
// Padded query rows are computed like any other row (their values carry no meaning).
//
// Work split: a block of 4 warps owns 64 queries of one (b, h); each warp owns 16 query rows. Per key
// block of 64: the block loads K and V into shared memory; each warp computes its 16x64 scores with
// WMMA into fp32 shared memory, runs the online softmax on them (two columns per lane, warp
// shuffles), writes P in the input dtype, rescales its fp32 accumulator rows (kept in shared memory,
// because WMMA fragments have no defined row mapping) and accumulates P V with WMMA. Accumulation,
// the softmax statistics and the final division are fp32.

#include <torch/library.h>

#include <ATen/ops/empty.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <type_traits>

#include "common.cuh"

namespace unispeech_fast {
namespace cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kBlockM = 64;
constexpr int kBlockN = 64;
constexpr int kAttnWarps = 4;
constexpr int kAttnThreads = kAttnWarps * kWarp;
constexpr int kPadHalf = 8;   // keeps 16-bit rows 16-byte aligned and tiles 32-byte aligned
constexpr int kPadFloat = 4;  // same for fp32 rows

template <typename T>
struct Cvt;
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};

template <int D>
struct AttnSmem {
  static constexpr int ld_qkv = D + kPadHalf;        // in elements of T
  static constexpr int ld_p = kBlockN + kPadHalf;
  static constexpr int ld_s = kBlockN + kPadFloat;   // fp32
  static constexpr int ld_o = D + kPadFloat;         // fp32
  static constexpr size_t bytes_16 = (size_t)(kBlockM * ld_qkv + 2 * kBlockN * ld_qkv + kBlockM * ld_p) * 2;
  static constexpr size_t bytes = bytes_16 + (size_t)(kBlockM * ld_s + kBlockM * ld_o) * 4;
  // Opt-in dynamic shared memory per block: 163 KB on sm_80, 227 KB on sm_90.
  static_assert(bytes <= 163 * 1024, "attention tile does not fit the shared memory of sm_80");
};

// Copies rows [row0, row0 + ROWS) of one (b, h) slice ([T, D] with row stride stride_t elements) into
// shared memory with leading dimension ld; rows at or past n_rows are zero-filled.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void load_rows(T* dst, int ld, const T* __restrict__ src, int64_t stride_t, int64_t row0,
                                          int64_t n_rows, bool vec) {
  constexpr int kVec = 8;  // 8 x 16-bit = 16 bytes
  constexpr int kPerRow = D / kVec;
  for (int i = threadIdx.x; i < ROWS * kPerRow; i += blockDim.x) {
    const int r = i / kPerRow, c = (i % kPerRow) * kVec;
    const int64_t row = row0 + r;
    T* d = dst + r * ld + c;
    if (row < n_rows) {
      const T* s = src + row * stride_t + c;
      if (vec) {
        *reinterpret_cast<uint4*>(d) = __ldg(reinterpret_cast<const uint4*>(s));
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) d[e] = s[e];
      }
    } else {
      *reinterpret_cast<uint4*>(d) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// One warp: C[16 x N] = A[16 x K] B[K x N] (+ C when ACCUMULATE) on tensor cores, 16x16x16 WMMA tiles with fp32
// accumulators; all three in shared memory. A is row-major (leading dimension lda), B row- or column-major
// (BLayout, leading dimension ldb: a column-major B is the transpose of a row-major [N x K]), C fp32 row-major.
template <typename T, int N, int K, typename BLayout, bool ACCUMULATE>
__device__ __forceinline__ void warp_mma(float* C, int ldc, const T* A, int lda, const T* B, int ldb) {
#pragma unroll
  for (int n = 0; n < N / 16; ++n) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    if constexpr (ACCUMULATE) {
      wmma::load_matrix_sync(acc, C + n * 16, ldc, wmma::mem_row_major);
    } else {
      wmma::fill_fragment(acc, 0.f);
    }
#pragma unroll
    for (int k = 0; k < K / 16; ++k) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> b;
      wmma::load_matrix_sync(a, A + k * 16, lda);
      if constexpr (std::is_same_v<BLayout, wmma::row_major>) {
        wmma::load_matrix_sync(b, B + k * 16 * ldb + n * 16, ldb);
      } else {
        wmma::load_matrix_sync(b, B + n * 16 * ldb + k * 16, ldb);
      }
      wmma::mma_sync(acc, a, b, acc);
    }
    wmma::store_matrix_sync(C + n * 16, acc, ldc, wmma::mem_row_major);
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kAttnThreads) attention_fwd_kernel(
    const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V, const int* __restrict__ Seqlens,
    const float* __restrict__ HeadMask, T* __restrict__ Out, int64_t seq, int64_t stride_qb, int64_t stride_qt,
    int64_t stride_qh, int64_t stride_kb, int64_t stride_kt, int64_t stride_kh, int64_t stride_vb, int64_t stride_vt,
    int64_t stride_vh, int64_t stride_ob, int64_t stride_ot, int64_t stride_oh, float scale_log2, bool vec) {
  using Smem = AttnSmem<D>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* Ks = Qs + kBlockM * Smem::ld_qkv;
  T* Vs = Ks + kBlockN * Smem::ld_qkv;
  T* Ps = Vs + kBlockN * Smem::ld_qkv;
  float* Ss = reinterpret_cast<float*>(smem_raw + Smem::bytes_16);
  float* Os = Ss + kBlockM * Smem::ld_s;

  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kBlockM;
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;

  // L = 0: every key is padding; the reference (masked_fill with the dtype's min on every key) then
  // averages all T keys uniformly, which is L = T with score scale 0.
  int64_t kv_len = seq;
  if (Seqlens != nullptr) {
    const int64_t L = Seqlens[b];
    kv_len = (L <= 0) ? seq : (L < seq ? L : seq);
    if (L <= 0) scale_log2 = 0.f;
  }

  const T* q_base = Q + b * stride_qb + h * stride_qh;
  const T* k_base = K + b * stride_kb + h * stride_kh;
  const T* v_base = V + b * stride_vb + h * stride_vh;
  load_rows<T, D, kBlockM>(Qs, Smem::ld_qkv, q_base, stride_qt, q0, seq, vec);
  for (int i = threadIdx.x; i < kBlockM * Smem::ld_o; i += blockDim.x) Os[i] = 0.f;

  float m_row[16], l_row[16];
#pragma unroll
  for (int r = 0; r < 16; ++r) {
    m_row[r] = -INFINITY;
    l_row[r] = 0.f;
  }
  const int row_base = warp * 16;
  T* Pw = Ps + row_base * Smem::ld_p;
  float* Sw = Ss + row_base * Smem::ld_s;
  float* Ow = Os + row_base * Smem::ld_o;
  const T* Qw = Qs + row_base * Smem::ld_qkv;

  for (int64_t n0 = 0; n0 < kv_len; n0 += kBlockN) {
    __syncthreads();  // everyone is done with the previous K/V tiles (and Q/O are initialised)
    // Keys at or past kv_len are padding: zero-filled, never read, so a NaN there cannot reach P V as 0 * NaN.
    load_rows<T, D, kBlockN>(Ks, Smem::ld_qkv, k_base, stride_kt, n0, kv_len, vec);
    load_rows<T, D, kBlockN>(Vs, Smem::ld_qkv, v_base, stride_vt, n0, kv_len, vec);
    __syncthreads();

    // S_w = Q_w K^T (16 x 64), fp32: K's [64 x D] rows read column-major are K^T.
    warp_mma<T, kBlockN, D, wmma::col_major, false>(Sw, Smem::ld_s, Qw, Smem::ld_qkv, Ks, Smem::ld_qkv);
    __syncwarp();

    // Online softmax over the 64 columns of each of the warp's 16 rows; lanes own columns lane, lane+32.
    const bool valid0 = n0 + lane < kv_len, valid1 = n0 + lane + 32 < kv_len;
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      const float s0 = valid0 ? Sw[r * Smem::ld_s + lane] * scale_log2 : -INFINITY;
      const float s1 = valid1 ? Sw[r * Smem::ld_s + lane + 32] * scale_log2 : -INFINITY;
      const float m_new = fmaxf(m_row[r], warp_max(fmaxf(s0, s1)));  // finite: column n0 is valid
      const float p0 = exp2f(s0 - m_new), p1 = exp2f(s1 - m_new);
      const float alpha = exp2f(m_row[r] - m_new);  // 0 on the first block
      l_row[r] = l_row[r] * alpha + warp_sum(p0 + p1);
      m_row[r] = m_new;
      Pw[r * Smem::ld_p + lane] = Cvt<T>::from(p0);
      Pw[r * Smem::ld_p + lane + 32] = Cvt<T>::from(p1);
      for (int c = lane; c < D; c += kWarp) Ow[r * Smem::ld_o + c] *= alpha;
    }
    __syncwarp();

    // O_w += P_w V (16 x D).
    warp_mma<T, D, kBlockN, wmma::row_major, true>(Ow, Smem::ld_o, Pw, Smem::ld_p, Vs, Smem::ld_qkv);
    __syncwarp();
  }

  const float hm = HeadMask != nullptr ? HeadMask[h] : 1.f;
#pragma unroll
  for (int r = 0; r < 16; ++r) {
    const int64_t t = q0 + row_base + r;
    if (t >= seq) break;
    const float inv = hm / l_row[r];
    T* o = Out + b * stride_ob + t * stride_ot + h * stride_oh;
    for (int c = lane; c < D; c += kWarp) o[c] = Cvt<T>::from(Ow[r * Smem::ld_o + c] * inv);
  }
}

template <typename T, int D>
void launch_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int* seqlens,
                      const float* head_mask, at::Tensor& out, float scale, cudaStream_t stream) {
  const int64_t batch = q.size(0), seq = q.size(1), heads = q.size(2);
  auto aligned = [](const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
           t.stride(2) % 8 == 0;
  };
  const bool vec = aligned(q) && aligned(k) && aligned(v);
  const size_t smem = AttnSmem<D>::bytes;
  C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(&attention_fwd_kernel<T, D>),
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>(ceil_div(seq, kBlockM)), static_cast<unsigned>(heads),
                  static_cast<unsigned>(batch));
  const float scale_log2 = scale * 1.4426950408889634f;
  attention_fwd_kernel<T, D><<<grid, kAttnThreads, smem, stream>>>(
      reinterpret_cast<const T*>(q.data_ptr()), reinterpret_cast<const T*>(k.data_ptr()),
      reinterpret_cast<const T*>(v.data_ptr()), seqlens, head_mask, reinterpret_cast<T*>(out.data_ptr()), seq,
      q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
      v.stride(2), out.stride(0), out.stride(1), out.stride(2), scale_log2, vec);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& seqlens, const std::optional<at::Tensor>& head_mask,
                              double scale) {
  const char* names[3] = {"q", "k", "v"};
  const at::Tensor* qkv[3] = {&q, &k, &v};
  for (int i = 0; i < 3; ++i) {
    const at::Tensor& t = *qkv[i];
    USF_CHECK_CUDA(t, names[i]);
    USF_CHECK_DIM(t, 4, names[i]);
    TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, names[i],
                " must be float16 or bfloat16 (the CUDA attention uses tensor cores), got ", t.scalar_type());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), names[i], " must have the dtype of q (", q.scalar_type(),
                "), got ", t.scalar_type());
    TORCH_CHECK(t.sizes() == q.sizes(), names[i], " must have the shape of q ", q.sizes(), ", got ", t.sizes());
    TORCH_CHECK(t.stride(3) == 1, names[i], " must have a contiguous last dim, got strides ", t.strides());
    USF_CHECK_SAME_DEVICE(t, q, names[i], "q");
  }
  const int64_t batch = q.size(0), seq = q.size(1), heads = q.size(2), head_dim = q.size(3);
  TORCH_CHECK(head_dim == 64 || head_dim == 128, "q: head_dim must be 64 or 128 for the CUDA attention, got ",
              head_dim);
  TORCH_CHECK(heads <= 65535 && batch <= 65535, "q: batch and heads must be <= 65535, got shape ", q.sizes());
  at::Tensor lens, hmask;
  if (seqlens.has_value()) {
    USF_CHECK_SAME_DEVICE(*seqlens, q, "seqlens", "q");
    TORCH_CHECK(seqlens->scalar_type() == at::kInt, "seqlens must be int32, got ", seqlens->scalar_type());
    TORCH_CHECK(seqlens->dim() == 1 && seqlens->size(0) == batch, "seqlens must be [", batch, "], got shape ",
                seqlens->sizes());
    lens = seqlens->contiguous();
  }
  if (head_mask.has_value()) {
    USF_CHECK_SAME_DEVICE(*head_mask, q, "head_mask", "q");
    TORCH_CHECK(head_mask->dim() == 1 && head_mask->size(0) == heads, "head_mask must be [", heads, "], got shape ",
                head_mask->sizes());
    hmask = head_mask->to(at::kFloat).contiguous();
  }

  c10::cuda::CUDAGuard guard(q.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor out = at::empty({batch, seq, heads, head_dim}, q.options());
  if (out.numel() == 0) return out;
  const int* lens_ptr = lens.defined() ? lens.data_ptr<int>() : nullptr;
  const float* hm_ptr = hmask.defined() ? hmask.data_ptr<float>() : nullptr;
  const float s = static_cast<float>(scale);
  if (q.scalar_type() == at::kHalf) {
    if (head_dim == 64) launch_attention<__half, 64>(q, k, v, lens_ptr, hm_ptr, out, s, stream);
    else launch_attention<__half, 128>(q, k, v, lens_ptr, hm_ptr, out, s, stream);
  } else {
    if (head_dim == 64) launch_attention<__nv_bfloat16, 64>(q, k, v, lens_ptr, hm_ptr, out, s, stream);
    else launch_attention<__nv_bfloat16, 128>(q, k, v, lens_ptr, hm_ptr, out, s, stream);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(unispeech_fast, CUDA, m) { m.impl("attention_fwd", &attention_fwd_cuda); }

}  // namespace cuda
}  // namespace unispeech_fast
