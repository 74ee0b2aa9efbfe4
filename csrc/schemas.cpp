// The operator schemas of unispeech_fast._C, shared by the CPU (csrc/cpu) and CUDA (csrc/cuda)
// implementations, which register kernels for them with TORCH_LIBRARY_IMPL(unispeech_fast, CPU|CUDA).
// Python reaches them as torch.ops.unispeech_fast.<name>; fake (meta) implementations for
// torch.compile live in unispeech_fast/ops/<op>/extension.py. Changing a schema here means changing
// every implementation and the fake function with it.
//
// Conventions: activations are exact (erf) GELU; every tensor argument is contiguous unless stated;
// accumulation is in fp32 for half inputs.

#include <torch/library.h>

TORCH_LIBRARY(unispeech_fast, m) {
  // Grouped positional conv with the residual: out = x + gelu(conv1d(x^T, weight, bias, padding=K//2,
  // groups)[..., :T])^T. x [B, T, H]; weight [H, H/groups, K], weight norm already folded in; bias [H].
  // preact is conv + bias, [B, T, H], when save_preact (for the backward), else an empty tensor.
  m.def("pos_conv_fwd(Tensor x, Tensor weight, Tensor? bias, int groups, bool save_preact) -> (Tensor, Tensor)");
  // Gradients of pos_conv_fwd: grad_x (residual included) [B, T, H], grad_weight [H, H/groups, K],
  // grad_bias [H] (an empty tensor when not bias_grad).
  m.def("pos_conv_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor preact, int groups, bool bias_grad) "
        "-> (Tensor, Tensor, Tensor)");

  // One feature-extractor layer: y = gelu(norm(conv1d(x, weight, bias, stride))). x [B, C_in, T_in],
  // weight [C_out, C_in, K], y [B, C_out, (T_in - K) // stride + 1]. norm_kind 0: none; 1: GroupNorm
  // with one group per channel (statistics over the whole time axis); 2: LayerNorm over channels for
  // each frame. norm_weight/norm_bias [C_out] are required when norm_kind != 0.
  m.def("conv_norm_gelu_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? norm_weight, Tensor? norm_bias, "
        "int stride, int norm_kind, float eps) -> Tensor");

  // Gumbel product quantizer. logits [N, G*V]; codevectors [G*V, D/G].
  // sample=False: per group the argmax code (eval). sample=True: argmax of logits + gumbels, where
  // gumbels [N, G*V] is given noise (-log(Exp(1)) draws), or, when None, drawn in the kernel from
  // Philox(seed, offset). Returns quantized [N, D] (the selected codevectors, concatenated over groups),
  // indices int64 [N, G], soft = softmax((logits + gumbels) / temperature) as [N, G, V] in fp32 when
  // sample (saved for the backward) else an empty tensor, and the fp32 scalar perplexity
  // sum_g exp(-sum_v m log m) with m the mean over N of softmax(logits) (sample) or of the one-hots;
  // mask (bool [N], optional) restricts that mean to the rows where it is true.
  m.def("gumbel_quantizer_fwd(Tensor logits, Tensor codevectors, int num_groups, float temperature, bool sample, "
        "Tensor? gumbels, int seed, int offset, Tensor? mask=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // Gradients of gumbel_quantizer_fwd: grad_logits [N, G*V] (straight-through via soft plus the
  // perplexity term when sample, over the rows of mask if given; zeros otherwise) and grad_codevectors [G*V, D/G].
  m.def("gumbel_quantizer_bwd(Tensor grad_quantized, Tensor grad_perplexity, Tensor logits, Tensor codevectors, "
        "Tensor indices, Tensor soft, int num_groups, float temperature, bool sample, Tensor? mask=None) "
        "-> (Tensor, Tensor)");

  // Fused contrastive (InfoNCE) loss, CPU. predictions, targets [N, D] (the flattened B*T frames); rows int64 [M]
  // (the masked frames); negative_indices int64 [M, K] (rows of targets); code_indices int64 [N, G] or None.
  // Returns the loss summed over the M rows (0-d) and the per-row logsumexp [M] (saved for the backward).
  // Formulas: csrc/cpu/contrastive_loss.cpp; eager reference: unispeech_fast/ops/contrastive_loss/reference.py.
  m.def("contrastive_loss_fwd(Tensor predictions, Tensor targets, Tensor rows, Tensor negative_indices, "
        "Tensor? code_indices, float temperature) -> (Tensor, Tensor)");
  // Gradients of contrastive_loss_fwd: grad_predictions and grad_targets, both [N, D].
  m.def("contrastive_loss_bwd(Tensor grad_loss, Tensor predictions, Tensor targets, Tensor rows, "
        "Tensor negative_indices, Tensor? code_indices, Tensor lse, float temperature) -> (Tensor, Tensor)");

  // Attention forward (CPU: csrc/cpu/attention.cpp, CUDA: csrc/cuda/attention.cu). q, k, v
  // [B, T, heads, head_dim] with a contiguous last dim (views of a fused QKV projection are fine);
  // seqlens int32 [B]: keys at positions >= seqlens[b] are masked (a row with seqlens[b] = 0 attends
  // to all T keys uniformly, as the eager reference does); head_mask [heads] multiplies each head's
  // probabilities. Returns out [B, T, heads, head_dim]. Its autograd formula
  // (unispeech_fast/ops/attention/extension.py) runs attention_bwd where it can (CPU, fp32 / fp64).
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? seqlens, Tensor? head_mask, float scale) -> Tensor");
  // Gradients of attention_fwd for q, k and v (CPU only, float32 / float64; not head_mask), recomputing the
  // probabilities from q and k; out is attention_fwd's output. Returns (grad_q, grad_k, grad_v), contiguous.
  m.def("attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor? seqlens, "
        "Tensor? head_mask, float scale) -> (Tensor, Tensor, Tensor)");
}
