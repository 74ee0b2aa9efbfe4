"""Benchmark suite of the whole models: <family>ForCTC inference and a fine-tuning step, ours against transformers."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch

from .. import flops as F
from ..harness import Case, Provider, Suite
from ..providers import compile_reasons, needs_transformers
from ._common import SAMPLE_RATE, _randn, op_suite


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
    from ... import UniSpeechConfig, UniSpeechSatConfig

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
            from ... import available_backends

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
        from ... import backend

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

    return op_suite(
        "models", device, dtypes, quick, grid, "seconds", providers, make_inputs,
        modes=("inference", "finetune"),
        flops=model_flops,
        step=step,
        warmup=1,
        reps=3 if device.type == "cpu" else 5,
        notes=["models: <family>ForCTC, random weights, layerdrop 0; finetune = forward with CTC labels, backward, "
           "SGD step, feature encoder frozen, dropout and SpecAugment on (train mode)"],
    )

