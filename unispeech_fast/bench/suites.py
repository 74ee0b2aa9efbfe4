"""The benchmark declarations: per op (and for the whole models) the shape grid, the inputs and the providers.

``benchmarks/bench_<op>.py`` and ``unispeech-fast bench`` both take their suites from here, so pytest
and the CLI measure the same cases. Grids: ``quick`` (tiny shapes, for tests and smoke runs), the full
grid on CUDA, and a trimmed grid on CPU (the full one would take hours there; each suite says so in its
``notes``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch

from . import flops as F
from .harness import Case, Provider, Suite
from .providers import (
    backend_providers,
    leaves_of,
    compile_provider,
    compile_reasons,
    needs_transformers,
    sdpa_providers,
)

__all__ = ["SUITES", "OPS", "make_suite", "attention", "pos_conv", "feature_extractor", "gumbel_quantizer",
           "linear", "contrastive_loss", "transformers_contrastive_loss", "models", "MODEL_GRID", "MODEL_CONFIGS"]

SAMPLE_RATE = 16_000


def _elt(case: Case) -> int:
    return torch.empty((), dtype=case.dtype).element_size()


def _cases(op: str, grid: Sequence[dict[str, Any]], dtypes: Sequence[torch.dtype], device: torch.device,
           x_key: str) -> list[Case]:
    return [Case(op, dict(params), dtype, device, x_key) for dtype in dtypes for params in grid]


def _cpu_note(device: torch.device, quick: bool, what: str) -> list[str]:
    if quick:
        return [f"{what}: --quick grid (tiny shapes, timings are not meaningful)"]
    if device.type == "cpu":
        return [f"{what}: CPU grid trimmed to what finishes in minutes (the full grid is for GPUs)"]
    return []


def _randn(case: Case, *shape: int, grad: bool = False, scale: float = 1.0) -> torch.Tensor:
    t = torch.randn(*shape, device=case.device, dtype=torch.float32).mul_(scale).to(case.dtype)
    return t.requires_grad_(grad)


# ---------------------------------------------------------------------------------------------- attention
def attention(device: torch.device, dtypes: Sequence[torch.dtype], quick: bool) -> Suite:
    from ..ops import attention as attention_fn, attention_ref

    if quick:
        grid = [dict(B=1, H=2, N=n, D=16) for n in (16, 33)]
    elif device.type == "cpu":
        grid = [dict(B=1, H=12, N=n, D=64) for n in (128, 256, 512)]
    else:  # base (12 heads) across lengths, plus 10 minutes of audio (30000 frames) at batch 1
        grid = [dict(B=8, H=12, N=n, D=64) for n in (128, 256, 512, 750, 1024, 2048, 4096)]
        grid += [dict(B=1, H=12, N=30000, D=64), dict(B=8, H=16, N=750, D=64)]

    def make_inputs(case: Case) -> dict[str, Any]:
        p = case.params
        q, k, v = (_randn(case, p["B"], p["N"], p["H"], p["D"], grad=True) for _ in range(3))
        return dict(q=q, k=k, v=v, scale=p["D"] ** -0.5)

    def ref(q, k, v, scale):
        return attention_ref(q, k, v, scale=scale)[0]

    providers = backend_providers("attention", lambda **kw: attention_fn(**kw)[0])
    providers += sdpa_providers()
    providers.append(compile_provider("torch.compile", ref, quick))
    p = lambda c: c.params  # noqa: E731
    return Suite(
        op="attention",
        cases=_cases("attention", grid, dtypes, device, "N"),
        providers=providers,
        make_inputs=make_inputs,
        flops=lambda c, m: F.attention_flops(p(c)["B"], p(c)["H"], p(c)["N"], p(c)["D"], m),
        bytes=lambda c, m: F.attention_bytes(p(c)["B"], p(c)["H"], p(c)["N"], p(c)["D"], _elt(c), m),
        notes=_cpu_note(device, quick, "attention") + ["attention: no key padding mask (every key valid)"],
    )


# ---------------------------------------------------------------------------------------------- pos_conv
def pos_conv(device: torch.device, dtypes: Sequence[torch.dtype], quick: bool) -> Suite:
    from ..ops import pos_conv as pos_conv_fn, pos_conv_ref

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
    return Suite(
        op="pos_conv",
        cases=_cases("pos_conv", grid, dtypes, device, "T"),
        providers=providers,
        make_inputs=make_inputs,
        flops=lambda c, m: F.pos_conv_flops(p(c)["B"], p(c)["T"], p(c)["H"], p(c)["G"], p(c)["K"], m),
        bytes=lambda c, m: F.pos_conv_bytes(p(c)["B"], p(c)["T"], p(c)["H"], p(c)["G"], p(c)["K"], _elt(c), m),
        notes=_cpu_note(device, quick, "pos_conv")
        + ["pos_conv: transformers-conv is transformers' PositionalConvEmbedding plus the residual "
           "(cuDNN conv on CUDA)"],
    )


# ---------------------------------------------------------------------------------------------- feature extractor
_BASE_CONV = dict(conv_dim=(512,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2))
_TINY_CONV = dict(conv_dim=(8, 8, 8), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2))


def feature_extractor(device: torch.device, dtypes: Sequence[torch.dtype], quick: bool) -> Suite:
    from ..ops import feature_extractor as fe_fn, feature_extractor_ref

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
    return Suite(
        op="feature_extractor",
        cases=_cases("feature_extractor", grid, dtypes, device, "samples"),
        providers=providers,
        make_inputs=make_inputs,
        flops=lambda c, m: F.feature_extractor_flops(*args(c), m),
        bytes=lambda c, m: F.feature_extractor_bytes(*args(c), _elt(c), m),
        notes=_cpu_note(device, quick, "feature_extractor")
        + ["feature_extractor: transformers-conv is transformers' FeatureEncoder (cuDNN convs on CUDA); "
           "gradients are for the weights (the waveform needs none)"],
    )


# ---------------------------------------------------------------------------------------------- gumbel quantizer
def gumbel_quantizer(device: torch.device, dtypes: Sequence[torch.dtype], quick: bool) -> Suite:
    from ..ops import gumbel_quantizer as gq_fn, gumbel_quantizer_ref

    if quick:
        grid = [dict(B=1, T=t, G=2, V=5, D=8, sample=True) for t in (7, 20)]
    elif device.type == "cpu":
        grid = [dict(B=1, T=t, G=2, V=320, D=256, sample=s) for s in (True, False) for t in (100, 500)]
    else:
        grid = [dict(B=8, T=t, G=2, V=320, D=256, sample=s) for s in (True, False) for t in (100, 250, 750, 1500)]

    def make_inputs(case: Case) -> dict[str, Any]:
        p = case.params
        return dict(
            logits=_randn(case, p["B"], p["T"], p["G"] * p["V"], grad=p["sample"]),
            codevectors=_randn(case, 1, p["G"] * p["V"], p["D"] // p["G"], grad=True),
            num_groups=p["G"],
            temperature=2.0,
            sample=p["sample"],
        )

    p = lambda c: c.params  # noqa: E731
    providers = backend_providers("gumbel_quantizer", gq_fn)
    providers.append(compile_provider("torch.compile", gumbel_quantizer_ref, quick))
    return Suite(
        op="gumbel_quantizer",
        cases=_cases("gumbel_quantizer", grid, dtypes, device, "T"),
        providers=providers,
        make_inputs=make_inputs,
        bytes=lambda c, m: F.gumbel_quantizer_bytes(p(c)["B"], p(c)["T"], p(c)["G"], p(c)["V"], p(c)["D"], _elt(c), m),
        notes=_cpu_note(device, quick, "gumbel_quantizer")
        + ["gumbel_quantizer: memory-bound, GB/s only (no FLOP count); sample=False has gradients for the "
           "codebook only"],
    )


# ---------------------------------------------------------------------------------------------- linear
def linear(device: torch.device, dtypes: Sequence[torch.dtype], quick: bool) -> Suite:
    from ..ops import linear as linear_fn, linear_ref

    if quick:
        grid = [dict(T=t, K=16, N=24) for t in (7, 20)]
    elif device.type == "cpu":  # the base encoder's layers at 10 s of audio (499 frames)
        grid = [dict(T=499, K=768, N=2304), dict(T=499, K=768, N=3072), dict(T=499, K=3072, N=768)]
    else:  # batch 8 x 15 s of audio (8 x 749 frames), base and large widths
        grid = [dict(T=5992, K=768, N=2304), dict(T=5992, K=768, N=3072), dict(T=5992, K=3072, N=768),
                dict(T=5992, K=1024, N=4096), dict(T=5992, K=4096, N=1024)]

    def make_inputs(case: Case) -> dict[str, Any]:
        p = case.params
        return dict(x=_randn(case, 1, p["T"], p["K"], grad=True),
                    weight=_randn(case, p["N"], p["K"], grad=True, scale=p["K"] ** -0.5),
                    bias=_randn(case, p["N"], grad=True))

    p = lambda c: c.params  # noqa: E731
    providers = backend_providers("linear", linear_fn)
    providers.append(compile_provider("torch.compile", linear_ref, quick))
    return Suite(
        op="linear",
        cases=_cases("linear", grid, dtypes, device, "T"),
        providers=providers,
        make_inputs=make_inputs,
        flops=lambda c, m: F.linear_flops(p(c)["T"], p(c)["K"], p(c)["N"], m),
        bytes=lambda c, m: F.linear_bytes(p(c)["T"], p(c)["K"], p(c)["N"], _elt(c), m),
        notes=_cpu_note(device, quick, "linear")
        + ["linear: the encoder's dense layers; cpp is oneDNN's matmul (inference only: its bwd rows are "
           "skipped)"],
    )


# ---------------------------------------------------------------------------------------------- contrastive loss
def transformers_contrastive_loss(predictions, targets, negative_indices, mask_time_indices, temperature,
                                  code_indices=None):
    """The loss as transformers' ``Wav2Vec2ForPreTraining.forward`` computes it (its own
    ``compute_contrastive_logits``; negatives ``[K, B, T, D]`` gathered over every frame), for comparison."""
    from transformers import Wav2Vec2ForPreTraining

    batch, frames, dim = targets.shape
    negatives = targets.view(-1, dim)[negative_indices.long().view(-1)]
    negatives = negatives.view(batch, frames, -1, dim).permute(2, 0, 1, 3)
    logits = Wav2Vec2ForPreTraining.compute_contrastive_logits(targets[None, :], negatives, predictions, temperature)
    neg_is_pos = (targets == negatives).all(-1)
    if neg_is_pos.any():
        logits[1:][neg_is_pos] = float("-inf")
    logits = logits.transpose(0, 2).reshape(-1, logits.size(0))
    target = ((1 - mask_time_indices.long()) * -100).transpose(0, 1).flatten()
    return torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum")


def contrastive_loss(device: torch.device, dtypes: Sequence[torch.dtype], quick: bool) -> Suite:
    """The pre-training InfoNCE loss: our backends against transformers' formulation (the issue's
    target case is B=8 x 15 s (749 frames), K=100, D=256, about half the frames masked)."""
    from ..ops import contrastive_loss as cl_fn
    from ..pretraining import sample_negative_indices

    if quick:
        grid = [dict(B=2, T=t, K=5, D=16) for t in (11, 20)]
    else:
        grid = [dict(B=8, T=749, K=100, D=256)]

    def make_inputs(case: Case) -> dict[str, Any]:
        p = case.params
        g = torch.Generator().manual_seed(0)
        mask = torch.rand(p["B"], p["T"], generator=g) < 0.5
        mask[:, :2] = True
        negatives = sample_negative_indices(mask, p["K"], generator=g).to(case.device)
        targets = _randn(case, p["B"], p["T"], p["D"], grad=True)
        return dict(predictions=_randn(case, p["B"], p["T"], p["D"], grad=True), targets=targets,
                    negative_indices=negatives, mask_time_indices=mask.to(case.device), temperature=0.1)

    def peer(case: Case, inputs: dict[str, Any]):
        return (lambda: transformers_contrastive_loss(**inputs)), leaves_of(inputs)

    providers = backend_providers("contrastive_loss", cl_fn)
    providers.append(Provider("transformers", peer, needs_transformers, kind="peer"))
    return Suite(
        op="contrastive_loss",
        cases=_cases("contrastive_loss", grid, dtypes, device, "T"),
        providers=providers,
        make_inputs=make_inputs,
        notes=_cpu_note(device, quick, "contrastive_loss")
        + ["contrastive_loss: transformers = Wav2Vec2ForPreTraining's formulation ([K+1, B, T, D] negatives); "
           "no FLOP/byte formula (gather-bound)"],
    )


# ---------------------------------------------------------------------------------------------- models
#: (batch, seconds) of the end-to-end grid.
MODEL_GRID: tuple[tuple[int, float], ...] = ((1, 2.0), (8, 15.0), (32, 5.0), (1, 600.0))
#: config overrides per size; every run uses layerdrop 0 so both implementations do the same work.
MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "base": dict(),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True),
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4),
}
MODEL_FAMILIES = ("UniSpeech", "UniSpeechSat")


def _config_kwargs(size: str) -> dict[str, Any]:
    return dict(MODEL_CONFIGS[size], layerdrop=0.0, vocab_size=32)


def _our_config(family: str, size: str):
    from .. import UniSpeechConfig, UniSpeechSatConfig

    return (UniSpeechConfig if family == "UniSpeech" else UniSpeechSatConfig)(**_config_kwargs(size))


def models(device: torch.device, dtypes: Sequence[torch.dtype], quick: bool) -> Suite:
    """End to end: ``<family>ForCTC`` inference (eval, ``torch.inference_mode``) and one fine-tuning step
    (train mode, feature encoder frozen, CTC loss, backward, SGD step), ours per backend vs transformers."""
    if quick:
        grid = [dict(model=f, config="tiny", B=1, seconds=0.5) for f in MODEL_FAMILIES]
    elif device.type == "cpu":
        grid = [dict(model=f, config="base", B=1, seconds=2.0) for f in MODEL_FAMILIES]
    else:
        grid = [dict(model=f, config=size, B=b, seconds=s)
                for f in MODEL_FAMILIES for size in ("base", "large") for b, s in MODEL_GRID]

    def make_inputs(case: Case) -> dict[str, Any]:
        p = case.params
        samples = int(p["seconds"] * SAMPLE_RATE)
        frames = _our_config(p["model"], p["config"]).output_length(samples)
        labels = torch.randint(1, 32, (p["B"], max(1, frames // 4)), device=case.device)
        return dict(input_values=_randn(case, p["B"], samples), labels=labels)

    def ours(name: str) -> Provider:
        def build(case: Case, inputs: dict[str, Any]):
            import unispeech_fast as uf

            cls = getattr(uf, case.params["model"] + "ForCTC")
            model = cls(_our_config(case.params["model"], case.params["config"])).to(case.device, case.dtype)
            return model, name

        def reasons(case: Case) -> list[str]:
            if name == "auto":
                return []
            from .. import available_backends

            table = available_backends(case.device)
            absent = f"no {name} implementation"
            found = sorted({r for op in table for r in table[op][name] if not r.startswith(absent)})
            missing = [op for op in table if any(r.startswith(absent) for r in table[op][name])]
            if name == "triton" and case.device.type == "cpu":
                found.append("the Triton interpreter is not a benchmark")
            if missing:
                found.append(f"no {name} implementation of {', '.join(missing)} (a forced backend must run every op)")
            return found

        return Provider(f"ours-{name}", build, reasons, kind="ours")

    def hf(attn: str, compiled: bool = False) -> Provider:
        def build(case: Case, inputs: dict[str, Any]):
            import transformers

            family = case.params["model"]
            config = getattr(transformers, family + "Config")(**_config_kwargs(case.params["config"]))
            config._attn_implementation = attn
            model = getattr(transformers, family + "ForCTC")(config).to(case.device, case.dtype)
            if compiled:
                torch._dynamo.reset()
                model.forward = torch.compile(model.forward, dynamic=False)
            return model, None

        def reasons(case: Case) -> list[str]:
            found = needs_transformers(case)
            if compiled:
                found += compile_reasons(case, quick)
                if case.device.type == "cpu" and not quick:
                    found.append("torch.compile of a whole model on CPU compiles for many minutes here")
            return found

        name = f"hf-{attn}" + ("-compile" if compiled else "")
        return Provider(name, build, reasons, kind="peer")

    providers = [ours(n) for n in ("auto", "eager", "triton", "cuda", "cpp")]
    providers += [hf("eager"), hf("sdpa"), hf("sdpa", compiled=True)]

    def step(built, case: Case, inputs: dict[str, Any], mode: str) -> Callable[[], Any]:
        from .. import backend

        model, name = built
        wave, labels = inputs["input_values"], inputs["labels"]
        ctx = (lambda: backend(name)) if name is not None else contextlib.nullcontext
        if mode == "inference":
            model.eval()

            def run_inference():
                with torch.inference_mode(), ctx():
                    return model(wave).logits
            return run_inference
        if mode == "finetune":
            model.train()
            model.freeze_feature_encoder()
            opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=1e-7)

            def run_finetune():
                with ctx():
                    loss = model(wave, labels=labels).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss
            return run_finetune
        raise ValueError(f"models: unknown mode {mode!r}; expected 'inference' or 'finetune'")

    def model_flops(case: Case, mode: str) -> float:
        p = case.params
        return F.model_flops(_our_config(p["model"], p["config"]), p["B"], int(p["seconds"] * SAMPLE_RATE), mode)

    return Suite(
        op="models",
        cases=_cases("models", grid, dtypes, device, "seconds"),
        providers=providers,
        make_inputs=make_inputs,
        modes=("inference", "finetune"),
        flops=model_flops,
        step=step,
        warmup=1,
        reps=3 if device.type == "cpu" else 5,
        notes=_cpu_note(device, quick, "models")
        + ["models: <family>ForCTC, random weights, layerdrop 0; finetune = forward with CTC labels, backward, "
           "SGD step, feature encoder frozen, dropout and SpecAugment on (train mode)"],
    )


SUITES: dict[str, Callable[[torch.device, Sequence[torch.dtype], bool], Suite]] = {
    "feature_extractor": feature_extractor,
    "pos_conv": pos_conv,
    "attention": attention,
    "gumbel_quantizer": gumbel_quantizer,
    "linear": linear,
    "contrastive_loss": contrastive_loss,
    "models": models,
}
OPS = tuple(SUITES)


def make_suite(op: str, device: str | torch.device = "cpu", dtypes: Sequence[str | torch.dtype] = ("float32",),
               quick: bool = False) -> Suite:
    """The suite for ``op`` (one of :data:`OPS`) on ``device`` in ``dtypes``."""
    if op not in SUITES:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    dev = torch.device(device)
    resolved = []
    for d in dtypes:
        dt = getattr(torch, d, None) if isinstance(d, str) else d
        if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
            raise ValueError(f"dtypes must name torch floating dtypes (float16, bfloat16, float32), got {d!r}")
        resolved.append(dt)
    suite = SUITES[op](dev, resolved, quick)
    suite.origin = {"op": op, "quick": quick}
    return suite
