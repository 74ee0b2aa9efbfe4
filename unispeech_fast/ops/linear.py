"""The encoder's dense layers: ``y = x W^T + b``.

Backends: ``eager`` (:func:`linear_ref`, ``F.linear``: on CPU that is MKL's sgemm) and ``cpp`` (CPU
float32 inference through oneDNN's matmul, ``torch.ops.mkldnn._linear_pointwise``, which ships with
torch; on the AMD EPYC development machine MKL's sgemm ran at about 210 GFLOP/s against oneDNN's
about 460 at the base model's shapes, see ``benchmarks/results/``).

The models route their plain ``nn.Linear`` layers through this op only under ``backend("auto")`` and
``backend("cpp")`` (:func:`unispeech_fast.modules.dense`); under a forced ``eager``, ``triton`` or
``cuda`` backend the dense layers are ``F.linear``, as they are not among those backends' kernels.

Accuracy: a plain oneDNN matmul accumulates the whole reduction dim in one fp32 sum; measured against
fp64, its max error at K = 3072 was about 3x MKL's, which blocks the reduction. The ``cpp`` backend
therefore splits K into chunks of at most :data:`K_CHUNK` (each with its own accumulator, summed in
fp32), which brings the error to within about 2x of MKL's at every base-model shape
(``tests/test_linear.py`` checks this against an fp64 reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dispatch

__all__ = ["linear", "linear_ref", "K_CHUNK"]

#: Largest reduction length one oneDNN call accumulates (see the module docstring).
K_CHUNK = 768


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Eager reference: ``F.linear(x, weight, bias)``; ``x`` ``[..., K]``, ``weight`` ``[N, K]``."""
    return F.linear(x, weight, bias)


dispatch.register("linear", "eager")(linear_ref)


def _onednn_op():
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


_ONEDNN = torch.backends.mkldnn.is_available() and _onednn_op() is not None  # read once (not traceable)


def _cpp_reasons(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> list[str]:
    reasons = []
    if x.device.type != "cpu" or weight.device.type != "cpu":
        reasons.append(f"the oneDNN linear serves CPU tensors, got {x.device.type}")
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or (bias is not None and bias.dtype != torch.float32):
        reasons.append(f"the oneDNN linear runs float32 only, got {x.dtype}")
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


dispatch.register("linear", "cpp", not_supported_reasons=_cpp_reasons)(linear_cpp)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + b`` on the current backend (see :mod:`unispeech_fast.dispatch`)."""
    return dispatch.call("linear", x=x, weight=weight, bias=bias)
