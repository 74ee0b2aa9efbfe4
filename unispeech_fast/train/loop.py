"""The training loop of ``unispeech-fast finetune``: DDP through ``torchrun`` (gloo on CPU, nccl on
CUDA), AdamW with the authors' defaults, warm-up then linear decay, gradient accumulation and
clipping, bf16 autocast on CUDA, exact checkpoints (model, optimiser, scheduler, every RNG, data
position), a bad-file list and a NaN stop.

Data split: each optimiser step takes ``world_size x grad_accum`` consecutive batches of the epoch's
plan (:func:`~unispeech_fast.train.data.plan_batches`); rank ``r`` takes micro-batch ``a`` at
``a * world_size + r``. Batches left over at the end of an epoch (fewer than one step's worth) are
not used that epoch; the run logs how many (the next epoch's plan is shuffled afresh). A batch's
*plan index* (``batch + a * world_size + r``) is therefore the same whatever the number of ranks.

An *objective* (``unispeech-fast pretrain``'s :class:`~unispeech_fast.train.pretrain.PretrainObjective`)
adapts the loop to a head: ``check(entry, example)`` names why a loaded example cannot be used (the
file is then skipped and listed), ``prepare(batch, step, plan_index)`` adds inputs to the collated
batch, ``loss(out, batch)`` is the loss to minimise, ``start_step(model, step)`` runs before each
step and returns extra metrics, ``settings()`` the options a resume must repeat (kept in the
checkpoint), ``collator_options()`` keyword arguments of the batches'
:class:`~unispeech_fast.training.SpeechDataCollator`. Without one, the loss is the model's ``loss``.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..audio import SAMPLE_RATE, AudioError
from .data import Entry, check_audio, load_example, plan_batches

__all__ = ["TrainOptions", "NonFiniteLossError", "TrainingInterrupted", "train", "lr_lambda", "write_run_files",
           "STATE_FILE", "RESUME_SETTINGS", "check_resume"]

STATE_FILE = "training_state.pt"


class TrainingInterrupted(Exception):
    """SIGINT (KeyboardInterrupt) during the steps; the message names the last finished step and checkpoint."""


class NonFiniteLossError(RuntimeError):
    """The loss of a step was NaN or infinite; the message names the step and the batch's files."""


@dataclass
class TrainOptions:
    output_dir: str
    max_steps: int
    max_batch_seconds: float = 60.0
    grad_accum: int = 1
    lr: float = 5e-5
    warmup_steps: int = 0
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-6
    clip_norm: float = 1.0
    save_every: int = 0  # 0: only at the end
    stop_after: int | None = None
    seed: int = 0
    normalize: bool = True
    freeze_feature_encoder: bool = False  # recorded for --resume; the caller freezes the model
    device: str = "cpu"
    progress: bool = True


def lr_lambda(warmup_steps: int, max_steps: int):
    """fairseq's ``polynomial_decay`` with power 1: linear warm-up to the peak, then linear to 0."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        remaining = max_steps - step
        return max(0.0, remaining / max(1, max_steps - warmup_steps))

    return factor


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _rng_state(model) -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])),
        "torch": torch.get_rng_state(),
        "layerdrop": [m.layerdrop_generator.get_state() if m.layerdrop_generator is not None else None
                      for m in model.modules() if hasattr(m, "layerdrop_generator")],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(model, state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    owners = [m for m in model.modules() if hasattr(m, "layerdrop_generator")]
    for module, gen_state in zip(owners, state["layerdrop"]):
        if gen_state is not None:
            module.layerdrop_generator.set_state(gen_state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather(obj):
    dist = _dist()
    if dist is None:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _write_failures(output_dir: str, failed: list[dict], total: int) -> None:
    if not failed:
        return
    report = {"failed": sorted(failed, key=lambda f: f["input"]), "succeeded": total - len(failed), "total": total}
    tmp = os.path.join(output_dir, "failures.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, os.path.join(output_dir, "failures.json"))


def write_run_files(directory: str, extra_files: dict[str, str], preprocessor: dict | None) -> None:
    """Beside a checkpoint's weights: copies of ``extra_files`` (name -> source path, e.g. ``vocab.json``) and,
    when given, ``preprocessor`` as ``preprocessor_config.json`` (how the run prepared its audio)."""
    for name, src in extra_files.items():
        shutil.copyfile(src, os.path.join(directory, name))
    if preprocessor is not None:
        with open(os.path.join(directory, "preprocessor_config.json"), "w", encoding="utf-8") as f:
            json.dump(preprocessor, f, indent=2, sort_keys=True)
            f.write("\n")


def _save_checkpoint(model, optimizer, scheduler, position: dict, opts: TrainOptions, rank: int, world: int,
                     extra_files: dict[str, str], objective_settings: dict | None = None,
                     preprocessor: dict | None = None) -> str:
    dist = _dist()
    final = os.path.join(opts.output_dir, f"checkpoint-{position['step']}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        write_run_files(tmp, extra_files, preprocessor)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "position": position, **_settings(model, opts, world, objective_settings)},
                   os.path.join(tmp, STATE_FILE))
    if dist is not None:
        dist.barrier()
    torch.save(_rng_state(model), os.path.join(tmp, f"rng-rank{rank}.pt"))
    if dist is not None:
        dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    if dist is not None:
        dist.barrier()
    return final


#: The settings a checkpoint records and ``--resume`` compares, with the option that sets each: a resumed run
#: continues the same run only if they match (the optimiser and scheduler state would otherwise keep the old
#: learning rate and weight decay, or fail on other parameter groups, and the rest would change silently).
RESUME_SETTINGS = {
    "world_size": "the number of ranks", "seed": "--seed", "grad_accum": "--grad-accum",
    "max_batch_seconds": "--max-batch-seconds", "max_steps": "--max-steps",
    "objective": "--gumbel-temperature, --mixing-prob", "head": "--task, or the --model's model_type", "lr": "--lr",
    "warmup_steps": "--warmup-steps", "weight_decay": "--weight-decay", "clip_norm": "--clip-norm",
    "normalize": "--no-normalize, or the --model's preprocessor_config.json",
    "freeze_feature_encoder": "--[no-]freeze-feature-encoder",
}


def _settings(model, opts: TrainOptions, world: int, objective_settings: dict | None) -> dict:
    """The values of :data:`RESUME_SETTINGS` for this run."""
    return {"world_size": world, "seed": opts.seed, "grad_accum": opts.grad_accum,
            "max_batch_seconds": opts.max_batch_seconds, "max_steps": opts.max_steps,
            "objective": objective_settings, "head": type(model).__name__, "lr": opts.lr,
            "warmup_steps": opts.warmup_steps, "weight_decay": opts.weight_decay, "clip_norm": opts.clip_norm,
            "normalize": opts.normalize, "freeze_feature_encoder": opts.freeze_feature_encoder}


def check_resume(checkpoint: str, settings: dict) -> dict:
    """The training state of ``checkpoint`` after checking that it records ``settings`` (some of
    :data:`RESUME_SETTINGS`: name -> this run's value). FileNotFoundError when it holds no state,
    ValueError naming the first setting that differs or that it does not record."""
    path = os.path.join(checkpoint, STATE_FILE)
    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"--resume {checkpoint}: no such directory (give a checkpoint-N directory of the run)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume {checkpoint}: no {STATE_FILE} (not a checkpoint this command wrote)")
    state = torch.load(path, weights_only=True)
    for key, value in settings.items():
        option = RESUME_SETTINGS[key]
        if key not in state:
            raise ValueError(f"--resume {checkpoint}: the checkpoint does not record {key} ({option}; written by an "
                             "earlier version), so an exact resume cannot be checked; start a new run from its weights")
        if state[key] != value:
            raise ValueError(f"--resume {checkpoint}: the checkpoint was written with {key}={state[key]!r} ({option}), "
                             f"this run has {value!r}; an exact resume needs the same value")
    return state


def train(model, entries: list[Entry], opts: TrainOptions, *, resume: str | None = None,
          extra_files: dict[str, str] | None = None, log=print, objective=None,
          preprocessor: dict | None = None) -> dict:
    """Train ``model`` (already on ``opts.device``, weights identical on every rank) on ``entries``.

    ``extra_files`` (name -> path) are copied and ``preprocessor`` (a dict) is written as
    ``preprocessor_config.json`` into every checkpoint (:func:`write_run_files`).

    Returns a summary dict. Raises :class:`NonFiniteLossError` on a NaN/Inf loss (no checkpoint is
    written for that step or after it) and :class:`TrainingInterrupted` on a KeyboardInterrupt (SIGINT)
    during the steps (what was written stays; with one process ``failures.json`` is written first).

    A CPU run repeats itself bit for bit (and so resumes exactly) with PyTorch's default algorithms:
    the models avoid the CPU kernel that two compared 2-thread runs found adding in thread order, the
    backward of advanced-indexing gathers with repeated indices (``index_put_`` with
    ``accumulate=True`` uses atomic float adds on float32 tensors of 32768+ elements with more than
    one thread); see :func:`unispeech_fast.ops.contrastive_loss.reference.gather_rows`.
    """
    from ..audio import _min_samples
    from ..training import SpeechDataCollator, _frames, sample_seed

    dist = _dist()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)
    extra_files = extra_files or {}
    objective_settings = objective.settings() if objective is not None else None
    os.makedirs(opts.output_dir, exist_ok=True)

    # Bad files are found before any step from their headers (every rank checks its share, all agree).
    min_samples = _min_samples(model)
    reasons = [(e.index, check_audio(e, min_samples)) for e in entries[rank::world]]
    failed: dict[int, str] = {}
    for part in _gather([(i, r) for i, r in reasons if r is not None]):
        failed.update(dict(part))
    for i in sorted(failed):
        if rank == 0:
            log(f"skipped: {failed[i]}")
    usable = [e for e in entries if e.index not in failed]
    if not usable:
        raise AudioError("no usable audio file in the manifest")
    durations = {e.index: e.duration for e in usable}
    by_index = {e.index: e for e in usable}

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() > 1]
    no_decay = [p for p in params if p.dim() <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=opts.lr, betas=opts.adam_betas, eps=opts.adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(opts.warmup_steps, opts.max_steps))
    position = {"step": 0, "epoch": 0, "batch": 0}
    if resume is not None:
        state = check_resume(resume, _settings(model, opts, world, objective_settings))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        position = dict(state["position"])

    net = model
    if dist is not None:
        # find_unused_parameters: LayerDrop, a SAT model without SpecAugment (masked_spec_embed) and the
        # silent stand-in batch of a rank whose files all failed leave parameters without a gradient
        net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    if resume is not None:
        _set_rng_state(model, torch.load(os.path.join(resume, f"rng-rank{rank}.pt"), weights_only=True))

    collator = SpeechDataCollator(model, **(objective.collator_options() if objective is not None else {}))
    per_step = world * opts.grad_accum
    device = torch.device(opts.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None
    last_checkpoint = resume
    metrics_path = os.path.join(opts.output_dir, "metrics.jsonl")
    if resume is not None and rank == 0:
        _drop_metrics_after(metrics_path, position["step"])
    bar = None
    if rank == 0 and opts.progress:
        from tqdm import tqdm

        bar = tqdm(total=opts.max_steps, initial=position["step"], unit="step", file=sys.stderr, dynamic_ncols=True)
    def epoch_plan(epoch: int) -> list[list[int]]:  # the usable files only; skipped ones never enter a batch
        plan = plan_batches([durations.get(i, 0.0) for i in range(len(entries))], opts.max_batch_seconds,
                            opts.seed, epoch)
        return [kept for kept in ([i for i in b if i in by_index] for b in plan) if kept]

    plan = epoch_plan(position["epoch"])
    stop_at = opts.max_steps if opts.stop_after is None else min(opts.max_steps, opts.stop_after)
    model.train()
    t0 = time.perf_counter()
    try:
        while position["step"] < stop_at:
            if position["batch"] + per_step > len(plan):
                left = len(plan) - position["batch"]
                if rank == 0 and left:
                    log(f"epoch {position['epoch']}: {left} batch(es) left unused (fewer than one step of {per_step})")
                if position["batch"] == 0:
                    raise ValueError(f"the manifest gives {len(plan)} batch(es) per epoch, fewer than one step needs "
                                     f"(world_size x grad_accum = {per_step}); lower --max-batch-seconds")
                position = {"step": position["step"], "epoch": position["epoch"] + 1, "batch": 0}
                plan = epoch_plan(position["epoch"])
                continue
            step = position["step"] + 1
            optimizer.zero_grad(set_to_none=True)
            extra_metrics = objective.start_step(model, step) if objective is not None else {}
            loss_sum, audio_seconds, ppl, files = 0.0, 0.0, None, []
            for a in range(opts.grad_accum):
                plan_index = position["batch"] + a * world + rank
                batch_ids = plan[plan_index]
                examples = []
                for i in batch_ids:
                    entry = by_index[i]
                    try:
                        example = load_example(entry, opts.normalize, sample_seed(opts.seed, i, position["epoch"]))
                    except AudioError as exc:
                        failed[i] = str(exc)
                        log(f"skipped: {exc}")
                        continue
                    reason = objective.check(entry, example) if objective is not None else None
                    if reason is not None:
                        failed[i] = reason
                        log(f"skipped: {reason}")
                        continue
                    examples.append(example)
                    files.append(entry.path)
                    audio_seconds += examples[-1]["input_values"].numel() / SAMPLE_RATE
                sync = a == opts.grad_accum - 1 or dist is None
                ctx = net.no_sync() if not sync else _null()
                with ctx:
                    if examples:
                        batch = collator(examples)
                        if objective is not None:
                            batch = objective.prepare(batch, step, plan_index)
                        batch = {k: v.to(device) for k, v in batch.items()}
                        with autocast if autocast is not None else _null():
                            out = net(**batch)
                        loss = objective.loss(out, batch) if objective is not None else out.loss
                        if getattr(out, "codevector_perplexity", None) is not None:
                            ppl = float(out.codevector_perplexity.detach())
                    else:  # every file of this micro-batch failed: a silent input with a zero loss keeps
                        # the ranks in step (DDP needs a forward on every rank) and adds nothing
                        silent = SpeechDataCollator(model)([{"input_values": torch.zeros(min_samples)}])
                        silent = {k: v.to(device) for k, v in silent.items()}
                        out = net(**silent, mask_time_indices=torch.zeros(1, _frames(model.config, min_samples),
                                                                         dtype=torch.bool, device=device))
                        stand_in = getattr(out, "logits", None)
                        stand_in = out.projected_states if stand_in is None else stand_in
                        loss = stand_in.float().sum() * 0.0
                    (loss.float() / opts.grad_accum).backward()
                loss_sum += float(loss.detach())
            finite = torch.tensor([1.0 if math.isfinite(loss_sum) else 0.0])
            if dist is not None:
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if finite.item() < 1:
                named = [f for part in _gather(files) for f in part]
                _report_failures(failed, entries, opts.output_dir, rank)
                raise NonFiniteLossError(
                    f"step {step}: the loss is not finite (rank {rank}: {loss_sum}); batch files: {named}; "
                    f"last good checkpoint: {last_checkpoint or 'none (no checkpoint yet)'}"
                )
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, opts.clip_norm)) if opts.clip_norm > 0 else None
            lr = scheduler.get_last_lr()[0]  # the rate this step uses
            optimizer.step()
            scheduler.step()
            position = {"step": step, "epoch": position["epoch"], "batch": position["batch"] + per_step}
            totals = torch.tensor([loss_sum / opts.grad_accum, audio_seconds], dtype=torch.float64)
            if dist is not None:
                dist.all_reduce(totals)
                totals[0] /= world
            elapsed = time.perf_counter() - t0
            record = {"step": step, "epoch": position["epoch"], "loss": float(totals[0]), "lr": lr,
                      "grad_norm": grad_norm, "audio_seconds": float(totals[1]), "elapsed_s": elapsed}
            if ppl is not None:
                record["perplexity"] = ppl
            record.update(extra_metrics)
            if rank == 0:
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                if bar is not None:
                    bar.update(1)
                    rate = record["audio_seconds"] / max(elapsed, 1e-9)  # audio-seconds per second = hours per hour
                    post = {"loss": f"{record['loss']:.4g}", "audio-h/h": f"{rate:.1f}"}
                    if ppl is not None:
                        post["ppl"] = f"{ppl:.1f}"
                    bar.set_postfix(post)
            t0 = time.perf_counter()
            if (opts.save_every and step % opts.save_every == 0) or step == stop_at:
                last_checkpoint = _save_checkpoint(model, optimizer, scheduler, position, opts, rank, world,
                                                   extra_files, objective_settings, preprocessor)
    except KeyboardInterrupt:  # Ctrl-C: what is written stays (metrics of finished steps, checkpoints)
        if bar is not None:
            bar.close()
        if dist is None:  # ranks interrupted together cannot be counted on to meet in a gather
            _report_failures(failed, entries, opts.output_dir, rank)
        raise TrainingInterrupted(
            f"interrupted after step {position['step']}; last checkpoint: "
            f"{last_checkpoint or 'none (no checkpoint yet)'}"
            + (f" (continue with --resume {last_checkpoint})" if last_checkpoint else "")) from None
    if bar is not None:
        bar.close()
    all_failed = _report_failures(failed, entries, opts.output_dir, rank)
    return {"step": position["step"], "checkpoint": last_checkpoint, "failed": all_failed}


def _drop_metrics_after(path: str, step: int) -> None:
    """Resuming from the checkpoint of ``step``: the run's ``metrics.jsonl`` loses its rows of later steps (written
    before the run stopped past that checkpoint; the resumed run writes them again), rewritten atomically, so it
    reads as an uninterrupted run's. Lines that are no such row are kept."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)

    def later(line: str) -> bool:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            return False
        return isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > step

    kept = [line for line in lines if not later(line)]
    if len(kept) == len(lines):
        return
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def _report_failures(failed: dict[int, str], entries: list[Entry], output_dir: str, rank: int) -> dict[int, str]:
    """Every rank's skipped files, gathered; rank 0 writes ``failures.json`` when there are any."""
    all_failed: dict[int, str] = {}
    for part in _gather(failed):
        all_failed.update(part)
    if rank == 0:
        _write_failures(output_dir, [{"input": entries[i].path, "reason": r} for i, r in all_failed.items()],
                        len(entries))
    return all_failed


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
