"""The ``cpp`` backend of ``linear``: CPU float32 inference through oneDNN's matmul
(``torch.ops.mkldnn._linear_pointwise``, which ships with torch), the reduction split into chunks of at most
:data:`K_CHUNK` (see the package docstring)."""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "K_CHUNK", "linear_cpp"]

#: What oneDNN's matmul runs here (float32 inference).
DTYPES = (torch.float32,)

#: Largest reduction length one oneDNN call accumulates (see the package docstring).
K_CHUNK = 768


def _onednn_op():
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


_ONEDNN = torch.backends.mkldnn.is_available() and _onednn_op() is not None  # read once (not traceable)


def _cpp_reasons(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> list[str]:
    reasons = []
    if any(t is not None and t.dtype not in DTYPES for t in (weight, bias)):  # x: the capabilities
        reasons.append(f"the oneDNN linear runs float32 weights and biases only, got {weight.dtype}"
                       f"{'' if bias is None else ', ' + str(bias.dtype)}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        reasons.append("the oneDNN linear has no backward (an input requires grad)")
    if x.dim() < 2 or weight.dim() != 2 or x.shape[-1] != weight.shape[-1]:
        reasons.append(f"x must be [..., K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if not _ONEDNN:
        reasons.append("this torch build has no oneDNN (mkldnn) linear")
    return reasons


@torch.library.custom_op("unispeech_fast::onednn_linear", mutates_args=())
def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The cpp backend as one registered op, so torch.compile keeps it (inductor would otherwise try
    to lower ``mkldnn._linear_pointwise`` itself, which it does only for its own prepacked weights)."""
    return _linear_chunked(x, weight, bias)


@_onednn_linear.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear_cpp(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """oneDNN matmul, the reduction split into chunks of at most :data:`K_CHUNK` (inference only)."""
    return _onednn_linear(x, weight, bias)


def _linear_chunked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    op = _onednn_op()
    k = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if k <= K_CHUNK:
        out = op(x2.contiguous(), weight.contiguous(), bias, "none", [], "")
    else:
        # Equal chunks (768 | 3072 for the FFN's output layer); each call gets a fresh accumulator.
        n_chunks = -(-k // K_CHUNK)
        step = -(-k // n_chunks)
        out = None
        for start in range(0, k, step):
            stop = min(start + step, k)
            part = op(x2[:, start:stop].contiguous(), weight[:, start:stop].contiguous(),
                      bias if out is None else None, "none", [], "")
            out = part if out is None else out.add_(part)
    return out.view(*lead, weight.shape[0])

