"""What every Triton launcher shares: ``cdiv``, the device guard and the fp32 precision policy.

One fp32 precision policy for every Triton kernel: follow ``torch.get_float32_matmul_precision()``.

``"highest"`` (torch's default) keeps fp32 dots in IEEE fp32; ``"high"`` or ``"medium"`` lets them use TF32
tensor cores, as torch's own fp32 matmuls then may. fp16/bf16 dots are unaffected (fp32 accumulation
always). Read per launch, so ``torch.set_float32_matmul_precision`` applies to the next call. On CPU tensors
(the Triton interpreter, which computes exact fp32 whatever it is told) the answer is always ``"ieee"``.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["cdiv", "device_guard", "fp32_dot_precision"]


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for the launchers' grid sizes (``triton.cdiv`` without importing triton)."""
    return -(-a // b)


def device_guard(device: torch.device):
    """Make ``device`` current while launching: Triton launches on the current CUDA device, so a tensor on
    another GPU of a multi-GPU machine would otherwise be read from the wrong device."""
    device = torch.device(device)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def fp32_dot_precision(device: torch.device) -> str:
    """``"ieee"`` or ``"tf32"``: the ``input_precision`` of the Triton kernels' fp32 dots on ``device``."""
    if torch.device(device).type != "cuda":
        return "ieee"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
