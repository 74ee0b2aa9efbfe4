"""Providers: our backends through :func:`unispeech_fast.backend`, and the peers we compare against.

Every provider answers ``not_supported_reasons(case)`` like the dispatcher does, so a provider that
cannot run here (cuda on CPU, triton on CPU, a missing extension, a missing library) becomes a
``"skipped"`` row with its reasons. Our backends call the public op functions of
:mod:`unispeech_fast.ops` inside ``unispeech_fast.backend(name)``, so the benchmark runs exactly what a
model runs, dispatch included; the static reasons come from :func:`unispeech_fast.available_backends`
and the per-call ones from the forced backend's ``BackendNotSupportedError``.
"""

from __future__ import annotations

import importlib.util
import shutil
from typing import Any, Callable

import torch

from .harness import Case, Provider

__all__ = [
    "OUR_BACKENDS",
    "SDPA_BACKENDS",
    "backend_providers",
    "sdpa_providers",
    "compile_provider",
    "compile_reasons",
    "needs_transformers",
    "leaves_of",
]

OUR_BACKENDS = ("eager", "triton", "cuda", "cpp")

#: provider name -> torch.nn.attention.SDPBackend member name
SDPA_BACKENDS = {
    "sdpa-math": "MATH",
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
}

INTERPRETER_IS_NOT_A_BENCHMARK = (
    "triton on CPU tensors runs in the Triton interpreter, a correctness tool whose timings mean nothing; "
    "benchmark it on a GPU"
)


def leaves_of(inputs: dict[str, Any]) -> list[torch.Tensor]:
    """The differentiable tensors among ``inputs`` (lists of tensors included), in order."""
    out: list[torch.Tensor] = []
    for value in inputs.values():
        items = value if isinstance(value, (list, tuple)) else [value]
        out.extend(t for t in items if isinstance(t, torch.Tensor) and t.requires_grad)
    return out


def _backend_reasons(op: str, name: str) -> Callable[[Case], list[str]]:
    def reasons(case: Case) -> list[str]:
        from .. import available_backends

        found = list(available_backends(case.device)[op][name])
        if name == "triton" and case.device.type == "cpu":
            found.append(INTERPRETER_IS_NOT_A_BENCHMARK)
        return found

    return reasons


def backend_providers(op: str, public_fn: Callable[..., Any], names: tuple[str, ...] = OUR_BACKENDS) -> list[Provider]:
    """One provider per backend, each calling ``public_fn(**inputs)`` under ``unispeech_fast.backend(name)``."""
    from .. import backend

    def make(name: str) -> Provider:
        def build(case: Case, inputs: dict[str, Any]):
            def forward():
                with backend(name):
                    return public_fn(**inputs)

            return forward, leaves_of(inputs)

        return Provider(name, build, _backend_reasons(op, name), kind="ours")

    return [make(name) for name in names]


def compile_reasons(case: Case, quick: bool) -> list[str]:
    """Why ``torch.compile`` is not benchmarked for this case (empty when it is)."""
    reasons = []
    if not torch._dynamo.is_dynamo_supported():
        reasons.append("torch.compile (dynamo) is not supported on this Python/platform")
    if case.device.type == "cpu":
        if shutil.which("g++") is None and shutil.which("c++") is None and shutil.which("clang++") is None:
            reasons.append("torch.compile on CPU needs a C++ compiler (none on PATH)")
        if quick:
            reasons.append("torch.compile on CPU spends about 30 s compiling per shape and mode here, far "
                           "longer than a --quick run; run without --quick to include it")
    if case.device.type == "cuda" and importlib.util.find_spec("triton") is None:
        reasons.append("torch.compile on CUDA needs triton, which is not installed")
    return reasons


def compile_provider(name: str, fn: Callable[..., Any], quick: bool, *, kind: str = "peer") -> Provider:
    """``torch.compile(fn)`` called as ``fn(**inputs)`` (static shapes: one compile per case)."""

    def build(case: Case, inputs: dict[str, Any]):
        torch._dynamo.reset()
        compiled = torch.compile(fn, dynamic=False)

        def forward():
            return compiled(**inputs)

        return forward, leaves_of(inputs)

    return Provider(name, build, lambda case: compile_reasons(case, quick), kind=kind)


def _sdpa_reasons(backend_name: str) -> Callable[[Case], list[str]]:
    def reasons(case: Case) -> list[str]:
        found = []
        try:
            from torch.nn.attention import SDPBackend  # noqa: F401
        except ImportError:
            return ["this torch has no torch.nn.attention.sdpa_kernel"]
        on_cuda = case.device.type == "cuda"
        if backend_name in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION") and not on_cuda:
            found.append(f"SDPA's {backend_name.lower()} backend runs only on CUDA tensors")
        if backend_name == "FLASH_ATTENTION" and on_cuda and case.dtype not in (torch.float16, torch.bfloat16):
            found.append(f"SDPA's flash backend on CUDA needs float16 or bfloat16, got {case.dtype_name}")
        if backend_name == "CUDNN_ATTENTION" and on_cuda and case.dtype not in (torch.float16, torch.bfloat16):
            found.append(f"SDPA's cuDNN backend needs float16 or bfloat16, got {case.dtype_name}")
        return found

    return reasons


def sdpa_providers() -> list[Provider]:
    """``F.scaled_dot_product_attention`` restricted to each of its backends by ``sdpa_kernel``.

    Inputs are re-laid out to SDPA's ``[B, H, N, D]`` (contiguous) once, outside the timed call; the key
    padding mask, when a case has one, becomes a boolean ``[B, 1, 1, N]`` ``attn_mask``.
    """

    def make(name: str, backend_name: str) -> Provider:
        def build(case: Case, inputs: dict[str, Any]):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            which = getattr(SDPBackend, backend_name)
            q, k, v = (inputs[n].detach().transpose(1, 2).contiguous().requires_grad_(inputs[n].requires_grad)
                       for n in ("q", "k", "v"))
            kpm = inputs.get("key_padding_mask")
            mask = None if kpm is None else kpm[:, None, None, :]
            scale = inputs.get("scale")

            def forward():
                with sdpa_kernel([which]):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

            return forward, [t for t in (q, k, v) if t.requires_grad]

        return Provider(name, build, _sdpa_reasons(backend_name), kind="peer")

    return [make(name, backend_name) for name, backend_name in SDPA_BACKENDS.items()]


def needs_transformers(case: Case) -> list[str]:
    if importlib.util.find_spec("transformers") is None:
        return ["transformers is not installed (pip install transformers)"]
    return []
