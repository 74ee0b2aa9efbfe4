"""``unispeech-fast finetune --task ctc|classify|xvector`` and ``unispeech-fast pretrain``: training
from a manifest, one process or many under ``torchrun`` (DDP; gloo on CPU, nccl on CUDA). See
:mod:`unispeech_fast.train.loop` for the loop, :mod:`unispeech_fast.train.pretrain` for the
pre-training objective and README "Training" for the commands.

Exit codes as in :mod:`unispeech_fast.cli`: 0 the run reached its last step (files that could not be
read were skipped and are listed in ``failures.json``); 1 runtime failure (a NaN/Inf loss, which
names the step and the batch's files and keeps the last good checkpoint; a corrupt checkpoint; no
usable audio); 2 usage error (bad options, manifest, labels or checkpoint for the task, a non-empty
``--output-dir`` without ``--resume``); 130 interrupted (SIGINT: one ``error:`` line naming the last
finished step and checkpoint; the checkpoints, ``metrics.jsonl`` and ``failures.json`` written so far stay).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..cli.common import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from ..cli.common import non_negative as _non_negative, positive as _positive

__all__ = ["add_parsers", "run_finetune", "run_pretrain", "TASK_HEADS", "PRETRAIN_HEADS"]


# task -> {model_type: class name}
TASK_HEADS = {
    "ctc": {"unispeech": "UniSpeechForCTC", "unispeech-sat": "UniSpeechSatForCTC"},
    "classify": {"unispeech": "UniSpeechForSequenceClassification",
                 "unispeech-sat": "UniSpeechSatForSequenceClassification"},
    "xvector": {"unispeech-sat": "UniSpeechSatForXVector"},
}
PRETRAIN_HEADS = {"unispeech": "UniSpeechForPreTraining", "unispeech-sat": "UniSpeechSatForPreTraining"}


def add_parsers(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune a CTC, classification or x-vector head from a manifest (torchrun for DDP)",
        description="Fine-tune from a manifest (JSONL/TSV of path, duration, label; or a fairseq .tsv with "
                    "--labels). Run under `torchrun --nproc_per_node N` for DDP.",
    )
    p.add_argument("--task", required=True, choices=tuple(TASK_HEADS), help="the head to train")
    p.add_argument("--labels", metavar="FILE", default=None,
                   help="labels parallel to a fairseq .tsv (.ltr, .wrd, .km), one line per audio line")
    p.add_argument("--vocab", metavar="FILE", default=None,
                   help="ctc: vocab.json token -> id (default: the --model directory's vocab.json)")
    _common_options(p, lr=5e-5, freeze=True)
    p.set_defaults(func=run_finetune)

    p = subparsers.add_parser(
        "pretrain", help="pre-train UniSpeech / UniSpeech-SAT from a manifest (torchrun for DDP)",
        description="Pre-train with the authors' objectives (README \"Pre-training\") from a manifest (the "
                    "authors' fairseq .tsv, or JSONL/TSV); UniSpeech-SAT needs --labels (.km cluster ids), "
                    "UniSpeech takes optional --labels (.phn/.ltr phones) for its CTC branch. Run under "
                    "`torchrun --nproc_per_node N` for DDP.",
    )
    p.add_argument("--labels", metavar="FILE", default=None,
                   help="labels parallel to the manifest: .km frame cluster ids (UniSpeech-SAT, required) or "
                        ".phn/.ltr phones (UniSpeech, optional: adds the CTC branch)")
    p.add_argument("--vocab", metavar="FILE", default=None,
                   help="UniSpeech phone labels: vocab.json phone -> id (default: the --model directory's)")
    p.add_argument("--gumbel-temperature", nargs=3, type=float, metavar=("MAX", "MIN", "DECAY"),
                   default=(2.0, 0.5, 0.999995),
                   help="Gumbel temperature max(MAX * DECAY^updates, MIN) (default: 2 0.5 0.999995)")
    p.add_argument("--mixing-prob", type=float, default=None,
                   help="UniSpeech-SAT utterance mixing probability per row, 0 = off (default: 0.5)")
    _common_options(p, lr=5e-4, freeze=False)
    p.set_defaults(func=run_pretrain)


def _common_options(p, lr: float, freeze: bool) -> None:

    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (a backbone or a head)")
    p.add_argument("--manifest", required=True, metavar="FILE", help="training manifest (.jsonl, .tsv)")
    p.add_argument("--output-dir", required=True, metavar="DIR", help="checkpoints, metrics.jsonl, final/")
    p.add_argument("--max-steps", required=True, type=_positive(int, "--max-steps"), help="optimiser steps")
    p.add_argument("--max-batch-seconds", type=_positive(float, "--max-batch-seconds"), default=60.0,
                   help="padded audio per micro-batch and rank, in seconds (default: 60)")
    p.add_argument("--grad-accum", type=_positive(int, "--grad-accum"), default=1,
                   help="micro-batches per optimiser step and rank (default: 1)")
    p.add_argument("--lr", type=_positive(float, "--lr"), default=lr, help=f"peak learning rate (default: {lr:g})")
    p.add_argument("--warmup-steps", type=_non_negative(int, "--warmup-steps"), default=0,
                   help="linear warm-up steps, then linear decay (default: 0)")
    p.add_argument("--weight-decay", type=_non_negative(float, "--weight-decay"), default=0.01,
                   help="AdamW weight decay of matrices (default: 0.01)")
    p.add_argument("--clip-norm", type=_non_negative(float, "--clip-norm"), default=1.0,
                   help="gradient norm clip, 0 = off (default: 1.0)")
    p.add_argument("--save-every", type=_non_negative(int, "--save-every"), default=0,
                   help="write checkpoint-N every N steps (default: 0, only at the end)")
    p.add_argument("--stop-after", type=_positive(int, "--stop-after"), default=None,
                   help="stop (with a checkpoint) after this step without changing the schedule; --resume goes on")
    p.add_argument("--resume", metavar="CHECKPOINT", default=None, help="a checkpoint-N directory of this run")
    p.add_argument("--seed", type=int, default=0, help="seed of data order, masks, LayerDrop, dropout (default: 0)")
    p.add_argument("--freeze-feature-encoder", action=argparse.BooleanOptionalAction, default=freeze,
                   help=f"keep the conv feature encoder fixed (default: {'on' if freeze else 'off'})")
    p.add_argument("--no-normalize", dest="normalize", action="store_false", default=None,
                   help="skip zero-mean unit-variance normalisation (default: as preprocessor_config.json says, "
                        "normalising when it is absent)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu (fp32) or cuda (bf16 autocast; under torchrun each rank takes cuda:LOCAL_RANK)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _error(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _model_type(args) -> tuple[str | None, str | None]:
    """(model_type, None) from ``--model``'s config.json once the options common to finetune and pretrain
    check out (:func:`_check_common`, first), or (None, error message)."""
    problem = _check_common(args)
    if problem is not None:
        return None, problem
    config_file = os.path.join(args.model, "config.json")
    try:
        with open(config_file, encoding="utf-8") as f:
            return json.load(f).get("model_type"), None
    except (OSError, json.JSONDecodeError) as exc:
        return None, f"--model {args.model}: cannot read config.json: {exc}"


def _vocab(args, what: str) -> tuple[dict | None, str, str | None]:
    vocab_file = args.vocab or os.path.join(args.model, "vocab.json")
    try:
        with open(vocab_file, encoding="utf-8") as f:
            return {str(k): int(v) for k, v in json.load(f).items()}, vocab_file, None
    except (OSError, json.JSONDecodeError, ValueError, AttributeError) as exc:
        return None, vocab_file, f"{what} needs a vocab.json (token -> id): {vocab_file}: {exc}"


def _preprocessor_config(model_dir: str, config, normalize: bool | None) -> dict:
    """The ``preprocessor_config.json`` of the run: ``model_dir``'s (transformers' Wav2Vec2FeatureExtractor
    defaults when it has none, with ``return_attention_mask`` on for a layer-norm feature encoder), its
    ``do_normalize`` set to what the run does (``normalize``, or the file's, True when absent) and
    ``sampling_rate`` to the 16 kHz the run reads. Every checkpoint and ``final/`` get it, so the inference
    commands prepare audio as the training did. ValueError naming the file when it cannot be read."""
    from ..cli.common import SAMPLE_RATE

    path = os.path.join(model_dir, "preprocessor_config.json")
    pre = {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1, "padding_side": "right",
           "padding_value": 0.0, "do_normalize": True,
           "return_attention_mask": getattr(config, "feat_extract_norm", "group") == "layer"}
    if os.path.isfile(path):
        from ..loading import _read_json_object

        try:
            pre = _read_json_object(path, ValueError)  # names the file when it is not a JSON object
        except OSError as exc:
            raise ValueError(f"{path}: cannot read it: {exc}") from None
    pre["do_normalize"] = bool(pre.get("do_normalize", True)) if normalize is None else bool(normalize)
    pre["sampling_rate"] = SAMPLE_RATE
    return pre


def _check_output_dir(args) -> str | None:
    """Why ``--output-dir`` cannot take this run, or None: a new run needs a new or empty directory (it never
    replaces another run's checkpoints, final/ or metrics.jsonl); ``--resume`` continues the run there."""
    out = args.output_dir
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--output-dir {out}: exists and is not a directory"
    if args.resume is None and os.path.isdir(out) and os.listdir(out):
        return (f"--output-dir {out} is not empty (it holds {', '.join(sorted(os.listdir(out))[:5])}"
                f"{', ...' if len(os.listdir(out)) > 5 else ''}); a new run needs a new or empty directory: give "
                f"another --output-dir, or --resume {os.path.join(out, 'checkpoint-N')} to continue that run")
    return None


def _check_common(args) -> str | None:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda: CUDA is not available here"
    return None


def run_finetune(args: argparse.Namespace) -> int:
    from .data import encode_labels

    model_type, problem = _model_type(args)
    if problem is not None:
        return _error(problem, EXIT_USAGE)
    heads = TASK_HEADS[args.task]
    if model_type not in heads:
        config_file = os.path.join(args.model, "config.json")
        return _error(f"--task {args.task} needs model_type in {sorted(heads)}, {config_file} has {model_type!r}",
                      EXIT_USAGE)
    extra_files = {}
    vocab = None
    if args.task == "ctc":
        vocab, vocab_file, problem = _vocab(args, "--task ctc")
        if problem is not None:
            return _error(problem, EXIT_USAGE)
        extra_files["vocab.json"] = vocab_file

    def labels(entries, model) -> None:
        encode_labels(entries, args.task, model.config, vocab)

    return _run(args, heads[model_type], labels, None, extra_files)


def run_pretrain(args: argparse.Namespace) -> int:
    from .data import ManifestError, encode_pretraining_labels
    from .pretrain import PretrainObjective

    model_type, problem = _model_type(args)
    if problem is not None:
        return _error(problem, EXIT_USAGE)
    if model_type not in PRETRAIN_HEADS:
        return _error(f"pretrain needs model_type in {sorted(PRETRAIN_HEADS)}, {args.model}/config.json has "
                      f"{model_type!r}", EXIT_USAGE)
    if model_type == "unispeech" and args.mixing_prob is not None:
        return _error("--mixing-prob is UniSpeech-SAT's utterance mixing; UniSpeech has none", EXIT_USAGE)
    mixing_prob = 0.5 if args.mixing_prob is None else args.mixing_prob
    extra_files: dict[str, str] = {}
    vocab = None

    def labels(entries, model) -> None:
        nonlocal vocab
        if all(e.label is None for e in entries):
            if model_type == "unispeech-sat":
                raise ManifestError("UniSpeech-SAT pre-training predicts k-means cluster ids: give --labels FILE.km "
                                    "(or a 'label' field of ids in the manifest)")
            return  # UniSpeech without phone labels: contrastive + diversity only
        blank = None
        if model_type == "unispeech":
            vocab, vocab_file, problem = _vocab(args, "UniSpeech phone labels")
            if problem is not None:
                raise ManifestError(problem)
            extra_files["vocab.json"] = vocab_file
            blank = model._ctc_blank()
        encode_pretraining_labels(entries, model_type, model.config, vocab, blank)

    def objective(model, seed):
        return PretrainObjective(model, seed, tuple(args.gumbel_temperature),
                                 mixing_prob if model_type == "unispeech-sat" else 0.0)

    return _run(args, PRETRAIN_HEADS[model_type], labels, objective, extra_files)


def _run(args, head: str, encode, make_objective, extra_files: dict[str, str]) -> int:
    import torch

    from .. import models
    from ..audio import AudioError
    from ..configuration import ConfigError
    from ..loading import CheckpointError
    from .data import ManifestError, read_manifest
    from .loop import NonFiniteLossError, TrainingInterrupted, TrainOptions, check_resume, train, write_run_files

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = args.device
    if world > 1:
        import torch.distributed as dist

        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            device = f"cuda:{torch.cuda.current_device()}"
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    try:
        problem = _check_output_dir(args)  # every rank looks before any rank writes (the barrier below)
        if world > 1:
            dist.barrier()
        if problem is not None:
            return _error(problem, EXIT_USAGE)
        import random

        import numpy as np

        torch.manual_seed(args.seed)  # a new head is initialised identically on every rank
        source = args.resume if args.resume is not None else args.model
        if args.resume is not None:  # another head would not even load from the checkpoint: check it first
            try:
                check_resume(args.resume, {"head": head})
            except (ValueError, FileNotFoundError) as exc:
                return _error(str(exc), EXIT_USAGE)
        try:
            model = getattr(models, head).from_pretrained(source, device=device)
        except (CheckpointError, ConfigError, OSError) as exc:
            return _error(f"cannot load {source}: {exc}", EXIT_FAILURE)
        if args.freeze_feature_encoder:
            model.freeze_feature_encoder()
        model.seed_layerdrop(args.seed)
        random.seed(args.seed + rank)  # dropout: ranks draw their own masks (README "Training")
        np.random.seed(args.seed + rank)
        torch.manual_seed(args.seed + rank)
        try:
            preprocessor = _preprocessor_config(args.model, model.config, args.normalize)
        except ValueError as exc:
            return _error(str(exc), EXIT_USAGE)
        normalize = preprocessor["do_normalize"]
        try:
            entries = read_manifest(args.manifest, args.labels)
            encode(entries, model)
            objective = make_objective(model, args.seed) if make_objective is not None else None
        except (ManifestError, ValueError) as exc:
            return _error(str(exc), EXIT_USAGE)
        opts = TrainOptions(output_dir=args.output_dir, max_steps=args.max_steps,
                            max_batch_seconds=args.max_batch_seconds, grad_accum=args.grad_accum, lr=args.lr,
                            warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, clip_norm=args.clip_norm,
                            save_every=args.save_every, stop_after=args.stop_after, seed=args.seed,
                            normalize=normalize, freeze_feature_encoder=args.freeze_feature_encoder, device=device,
                            progress=not args.quiet)
        def log(msg: str) -> None:
            print(msg, file=sys.stderr)

        try:
            os.makedirs(args.output_dir, exist_ok=True)
        except OSError as exc:
            return _error(f"--output-dir {args.output_dir}: cannot create it: {exc}", EXIT_USAGE)

        try:
            summary = train(model, entries, opts, resume=args.resume, extra_files=extra_files, log=log,
                            objective=objective, preprocessor=preprocessor)
        except NonFiniteLossError as exc:
            return _error(str(exc), EXIT_FAILURE)
        except TrainingInterrupted as exc:
            return _error(str(exc), EXIT_INTERRUPTED)
        except AudioError as exc:
            return _error(str(exc), EXIT_FAILURE)
        except (ValueError, FileNotFoundError) as exc:
            return _error(str(exc), EXIT_USAGE)
        if summary["step"] == args.max_steps and rank == 0:
            final = os.path.join(args.output_dir, "final")
            model.save_pretrained(final)
            write_run_files(final, extra_files, preprocessor)
        if summary["failed"] and rank == 0:
            print(f"{len(summary['failed'])} file(s) skipped; listed in "
                  f"{os.path.join(args.output_dir, 'failures.json')}", file=sys.stderr)
        return EXIT_OK
    except KeyboardInterrupt:  # outside the steps (loading, checking files, writing final/); files written stay
        return _error("interrupted", EXIT_INTERRUPTED)
    finally:
        if world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
