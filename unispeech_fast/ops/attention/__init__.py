"""Bidirectional multi-head attention with a key-padding mask and a per-head mask.

``out[b, t, h] = sum_s m_h * softmax_s(scale * q[b,t,h] . k[b,s,h] + mask[b,s]) v[b,s,h]`` where
``mask`` is 0 for valid keys and -inf-like for padded ones, and ``m_h`` is ``head_mask[h]`` (which
multiplies that head's attention probabilities, so 0 removes the head). Padded *query* rows are not
masked: like transformers, their outputs are defined (they attend to the valid keys) but carry no
meaning. A batch row with no valid key follows transformers' additive-mask semantics on every backend:
all its scores are equal, so it attends to every key uniformly (``out = m_h * mean_s v[b, s, h]``) and
its q and k get no gradient from it (the reference's ``masked_fill``; the eager backend and cpp compute
it, triton and cuda refuse such a row in dispatch). Tensors use the ``[batch, frames, heads, head_dim]``
layout that a fused QKV projection produces without transposes.
"""

from __future__ import annotations

import torch

from ... import dispatch
from ...dispatch import Capabilities
from . import extension, triton  # neither imports triton nor loads the extension
from .padding import mask_lengths, padding_checked_once, padding_mask_reasons, right_padded_lengths
from .reference import attention_eager, attention_ref

__all__ = [
    "CAPABILITIES", "attention", "attention_ref", "mask_lengths", "padding_checked_once", "padding_mask_reasons",
    "right_padded_lengths",
]

_served_by_reference = lambda need_weights=False, **_: bool(need_weights)  # noqa: E731  (logged once)
#: What each backend supports, as data: dispatch's one base check reads it; each backend's own
#: ``not_supported_reasons`` adds only the limits of the call (shapes, head_dim, masks, dropout). The triton and
#: C++ dtype checks stay there (they also require q, k and v alike, in wording that tests pin), and triton's
#: devices are dispatch's (CUDA, or CPU under the interpreter): it declares nothing more.
CAPABILITIES = {
    "cpp": Capabilities("the C++ attention", devices=("cpu",), kernels=("attention_fwd",), unless=_served_by_reference),
    "cuda": Capabilities("the CUDA attention", devices=("cuda",), dtypes=extension.CUDA_DTYPES,
                         kernels=("attention_fwd",)),
}

_dropout = lambda dropout_p=0.0, **_: dropout_p > 0.0  # noqa: E731  (dropout draws random numbers)
dispatch.register("attention", "eager", is_stochastic=_dropout)(attention_eager)
dispatch.register("attention", "triton", is_stochastic=_dropout,
                  not_supported_reasons=triton._triton_reasons)(triton._attention_triton)
dispatch.register("attention", "cpp", capabilities=CAPABILITIES["cpp"],
                  not_supported_reasons=extension._cpp_reasons)(extension.attention_cpp)
dispatch.register("attention", "cuda", capabilities=CAPABILITIES["cuda"],
                  not_supported_reasons=extension._cuda_reasons)(extension.attention_cuda)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    head_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    need_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention on the selected backend; see :func:`attention_ref` for the arguments."""
    return dispatch.call(
        "attention",
        q=q,
        k=k,
        v=v,
        key_padding_mask=key_padding_mask,
        head_mask=head_mask,
        dropout_p=dropout_p,
        scale=scale,
        need_weights=need_weights,
    )
