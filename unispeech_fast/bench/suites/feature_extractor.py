"""Benchmark suite of the ``feature_extractor`` op: our backends, transformers' conv stack and ``torch.compile``."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .. import flops as F
from ..harness import Case, Provider, Suite
from ..providers import backend_providers, compile_provider, needs_transformers
from ._common import SAMPLE_RATE, _elt, _randn, op_suite


_BASE_CONV = dict(conv_dim=(512,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2))
_TINY_CONV = dict(conv_dim=(8, 8, 8), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2))


def feature_extractor(device: torch.device, dtypes: Sequence[torch.dtype], quick: bool) -> Suite:
    from ...ops import feature_extractor as fe_fn, feature_extractor_ref

    if quick:
        grid = [dict(B=1, samples=s, norm="group") for s in (400, 1000)]
        conv = _TINY_CONV
    elif device.type == "cpu":
        grid = [dict(B=1, samples=int(s * SAMPLE_RATE), norm="group") for s in (1, 2)]
        conv = _BASE_CONV
    else:
        grid = [dict(B=8, samples=int(s * SAMPLE_RATE), norm="group") for s in (1, 2, 5, 15)]
        grid += [dict(B=1, samples=600 * SAMPLE_RATE, norm="group"), dict(B=8, samples=5 * SAMPLE_RATE, norm="layer")]
        conv = _BASE_CONV

    def make_inputs(case: Case) -> dict[str, Any]:
        p = case.params
        weights, c_in = [], 1
        for c_out, k in zip(conv["conv_dim"], conv["conv_kernel"]):
            weights.append(_randn(case, c_out, c_in, k, grad=True, scale=(c_in * k) ** -0.5))
            c_in = c_out
        n = len(weights)
        with_norm = [i == 0 or p["norm"] == "layer" for i in range(n)]
        return dict(
            x=_randn(case, p["B"], p["samples"]),
            conv_weights=weights,
            conv_biases=[None] * n,
            norm_weights=[_randn(case, w.shape[0], grad=True) if with_norm[i] else None for i, w in enumerate(weights)],
            norm_biases=[_randn(case, w.shape[0], grad=True) if with_norm[i] else None for i, w in enumerate(weights)],
            conv_strides=list(conv["conv_stride"]),
            norm_type=p["norm"],
        )

    def hf_build(case: Case, inputs: dict[str, Any]):
        import transformers
        from transformers.models.unispeech_sat import modeling_unispeech_sat as hf

        config = transformers.UniSpeechSatConfig(feat_extract_norm=case.params["norm"], conv_bias=False, **conv)
        module = hf.UniSpeechSatFeatureEncoder(config).to(case.device, case.dtype).eval()
        with torch.no_grad():
            for i, layer in enumerate(module.conv_layers):
                layer.conv.weight.copy_(inputs["conv_weights"][i])
                if inputs["norm_weights"][i] is not None:
                    layer.layer_norm.weight.copy_(inputs["norm_weights"][i])
                    layer.layer_norm.bias.copy_(inputs["norm_biases"][i])
        x = inputs["x"]
        return (lambda: module(x)), list(module.parameters())

    providers = backend_providers("feature_extractor", fe_fn)
    providers.append(Provider("transformers-conv", hf_build, needs_transformers, kind="peer"))
    providers.append(compile_provider("torch.compile", feature_extractor_ref, quick))
    args = lambda c: (c.params["B"], c.params["samples"], conv["conv_dim"], conv["conv_kernel"], conv["conv_stride"])  # noqa: E731
    return op_suite(
        "feature_extractor", device, dtypes, quick, grid, "samples", providers, make_inputs,
        flops=lambda c, m: F.feature_extractor_flops(*args(c), m),
        bytes=lambda c, m: F.feature_extractor_bytes(*args(c), _elt(c), m),
        notes=["feature_extractor: transformers-conv is transformers' FeatureEncoder (cuDNN convs on CUDA); "
           "gradients are for the weights (the waveform needs none)"],
    )

