"""Benchmark suite of the ``pos_conv`` op: our backends, transformers' conv and ``torch.compile`` of the reference."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .. import flops as F
from ..harness import Case, Provider, Suite
from ..providers import backend_providers, compile_provider, needs_transformers
from ._common import _elt, _randn, op_suite


def pos_conv(device: torch.device, dtypes: Sequence[torch.dtype], quick: bool) -> Suite:
    from ...ops import pos_conv as pos_conv_fn, pos_conv_ref

    if quick:
        grid = [dict(B=1, T=t, H=32, G=4, K=8) for t in (17, 40)]
    elif device.type == "cpu":
        grid = [dict(B=1, T=t, H=768, G=16, K=128) for t in (100, 250)]
    else:
        grid = [dict(B=8, T=t, H=768, G=16, K=128) for t in (100, 250, 500, 750, 1500)]
        grid += [dict(B=1, T=30000, H=768, G=16, K=128), dict(B=8, T=750, H=1024, G=16, K=128)]

    def make_inputs(case: Case) -> dict[str, Any]:
        p = case.params
        return dict(
            x=_randn(case, p["B"], p["T"], p["H"], grad=True),
            weight_g=_randn(case, 1, 1, p["K"], grad=True),
            weight_v=_randn(case, p["H"], p["H"] // p["G"], p["K"], grad=True, scale=0.02),
            bias=_randn(case, p["H"], grad=True, scale=0.02),
            groups=p["G"],
        )

    def hf_build(case: Case, inputs: dict[str, Any]):
        import transformers
        from transformers.models.unispeech_sat import modeling_unispeech_sat as hf

        p = case.params
        config = transformers.UniSpeechSatConfig(hidden_size=p["H"], num_attention_heads=1,
                                                 num_conv_pos_embeddings=p["K"], num_conv_pos_embedding_groups=p["G"])
        module = hf.UniSpeechSatPositionalConvEmbedding(config).to(case.device, case.dtype)
        with torch.no_grad():
            module.conv.parametrizations.weight.original0.copy_(inputs["weight_g"])
            module.conv.parametrizations.weight.original1.copy_(inputs["weight_v"])
            module.conv.bias.copy_(inputs["bias"])
        x = inputs["x"]

        def forward():
            return x + module(x)

        return forward, [x] + list(module.parameters())

    providers = backend_providers("pos_conv", pos_conv_fn)
    providers.append(Provider("transformers-conv", hf_build, needs_transformers, kind="peer"))
    providers.append(compile_provider("torch.compile", pos_conv_ref, quick))
    p = lambda c: c.params  # noqa: E731
    return op_suite(
        "pos_conv", device, dtypes, quick, grid, "T", providers, make_inputs,
        flops=lambda c, m: F.pos_conv_flops(p(c)["B"], p(c)["T"], p(c)["H"], p(c)["G"], p(c)["K"], m),
        bytes=lambda c, m: F.pos_conv_bytes(p(c)["B"], p(c)["T"], p(c)["H"], p(c)["G"], p(c)["K"], _elt(c), m),
        notes=["pos_conv: transformers-conv is transformers' PositionalConvEmbedding plus the residual "
           "(cuDNN conv on CUDA)"],
    )

