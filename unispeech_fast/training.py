"""Glue for transformers' ``Trainer`` and ``torchrun``/DDP: a padding collator that draws SpecAugment
masks per sample, the per-sample seeding rule, and a callback that puts ``config.json`` into
Trainer's checkpoints. It needs transformers (an optional extra), so ``import unispeech_fast`` does
not import it.

The seeding rule (README "Training") that makes 2 DDP ranks equal one process with the same global
batch:

- per-sample draws (SpecAugment time spans) come from the sample's own seed,
  :func:`sample_seed` ``(base_seed, global_index, epoch)``, drawn in the collator
  (:func:`~unispeech_fast.masking.compute_mask_indices_per_sample`) and handed to the model as
  ``mask_time_indices``; they do not depend on which rank holds the sample or what else is in its
  batch;
- contrastive negatives (``UniSpeechForPreTraining``'s ``sampled_negative_indices``, the collator's
  ``num_negatives``) are drawn per sample too, from a generator seeded by the sample's seed, among
  that sample's own masked frames;
- batch-level draws (LayerDrop) come from a generator of the encoder's own, seeded identically on
  every rank (:meth:`PreTrainedModel.seed_layerdrop`), so every rank drops the same layers;
- the pre-training heads' in-model draws, the Gumbel noise of the quantizer and UniSpeech's CTC
  replace mix, come from a generator per sample seeded from the sample's seed (the collator's
  ``noise_seeds=True`` hands them to the model as ``noise_seeds``), over the sample's own frames:
  they depend on ``(base_seed, epoch, global_index)`` only, not on the rank, the world size, the
  rest of the batch or its padded length (without ``noise_seeds``, the global torch RNG, as
  transformers draws them);
- element-wise dropout stays on the global torch RNG: ranks draw different values from the same
  distribution (equal in law, not bitwise); so do UniSpeech-SAT's utterance-contrastive candidates,
  which a rank draws among its own batch's masked frames.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .masking import compute_mask_indices_per_sample
from .ops.feature_extractor.common import conv_output_length

__all__ = ["SpeechDataCollator", "sample_seed", "SaveConfigCallback"]


def sample_seed(base_seed: int, index: int, epoch: int = 0) -> int:
    """The seed of one sample's random draws: a function of ``(base_seed, epoch, index)`` only, with
    ``index`` the sample's position in the whole dataset (never its position on a rank)."""
    for name, value in (("base_seed", base_seed), ("index", index), ("epoch", epoch)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(np.random.SeedSequence([int(base_seed), int(epoch), int(index)]).generate_state(1, np.uint64)[0])


# The streams of a sample's seed: each kind of per-sample draw gets its own seed derived from it.
_NEGATIVES_STREAM, _NOISE_STREAM = 1, 2


def _stream_seed(seed: int, stream: int) -> int:
    """A non-negative int64 seed for one stream of a sample's draws, a function of ``(seed, stream)``."""
    return int(np.random.SeedSequence([int(seed), stream]).generate_state(1, np.uint64)[0] >> 1)


def _frames(config, samples: int) -> int:
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        samples = conv_output_length(samples, kernel, stride)
    return samples


class SpeechDataCollator:
    """Pads a list of examples into the batch dict our models take (a Trainer ``data_collator``).

    Each example is a dict with ``input_values`` (1-D float waveform), optionally ``labels`` and
    ``mask_seed``:

    - ``input_values`` are right-padded with 0 to the longest (or to ``pad_to_samples``) and an
      ``attention_mask`` (1 = sample) is added;
    - ``labels``: scalars (class / speaker ids) are stacked; 1-D sequences (CTC ids) are padded with
      -100; 2-D ``[frames, num_labels]`` frame labels are padded with zero rows to the batch's frame
      count. Mind that ``ForAudioFrameClassification``'s loss (transformers' rule) counts every frame,
      padded ones included, and a zero row's argmax is class 0: batch equal lengths for that head;
    - ``mask_seed`` (an int, :func:`sample_seed`): when every example has one and the config's
      SpecAugment is on (``apply_spec_augment`` and ``mask_time_prob > 0``), the batch gets
      ``mask_time_indices`` drawn per sample from its seed; the model then uses them instead of
      sampling its own. Give training examples a seed and evaluation examples none. A batch where
      only some examples have one is an error.
    - ``num_negatives`` (for ``UniSpeechForPreTraining``): with masks drawn, the batch also gets
      ``sampled_negative_indices [B, frames, num_negatives]``, each row's drawn by
      :func:`~unispeech_fast.pretraining.sample_negative_indices` among its own masked frames from a
      generator seeded by the example's ``mask_seed`` (so they too do not depend on the rank or batch).
    - ``noise_seeds=True`` (for both ``ForPreTraining`` heads): the batch also gets ``noise_seeds``
      (int64 ``[B]``, one per example, derived from its ``mask_seed``); the head then draws the
      sample's Gumbel noise and (UniSpeech) replace mix from it
      (:func:`~unispeech_fast.models.heads.per_sample_draws`). Other heads do not take this input.
    """

    def __init__(self, config, pad_to_samples: int | None = None, num_negatives: int | None = None,
                 noise_seeds: bool = False) -> None:
        if pad_to_samples is not None and (isinstance(pad_to_samples, bool) or not isinstance(pad_to_samples, int)
                                           or pad_to_samples < 1):
            raise ValueError(f"pad_to_samples must be a positive int or None, got {pad_to_samples!r}")
        if num_negatives is not None and (isinstance(num_negatives, bool) or not isinstance(num_negatives, int)
                                          or num_negatives < 1):
            raise ValueError(f"num_negatives must be a positive int or None, got {num_negatives!r}")
        if not isinstance(noise_seeds, bool):
            raise ValueError(f"noise_seeds must be a bool, got {noise_seeds!r}")
        self.config = getattr(config, "config", config)  # a model or its config
        self.pad_to_samples = pad_to_samples
        self.num_negatives = num_negatives
        self.noise_seeds = noise_seeds

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("examples must be a non-empty list of dicts")
        waves = []
        for i, ex in enumerate(examples):
            if not isinstance(ex, dict) or "input_values" not in ex:
                raise ValueError(f"examples[{i}] must be a dict with 'input_values', got {type(ex).__name__}")
            wave = torch.as_tensor(ex["input_values"])
            if wave.dim() != 1 or not wave.is_floating_point():
                raise ValueError(
                    f"examples[{i}]['input_values'] must be a 1-D float waveform, got shape {tuple(wave.shape)} "
                    f"dtype {wave.dtype}"
                )
            waves.append(wave)
        total = max(w.numel() for w in waves)
        if self.pad_to_samples is not None:
            if self.pad_to_samples < total:
                raise ValueError(
                    f"pad_to_samples={self.pad_to_samples} is shorter than the longest example ({total} samples)"
                )
            total = self.pad_to_samples
        input_values = torch.zeros(len(waves), total, dtype=waves[0].dtype)
        attention_mask = torch.zeros(len(waves), total, dtype=torch.long)
        for i, wave in enumerate(waves):
            input_values[i, : wave.numel()] = wave
            attention_mask[i, : wave.numel()] = 1
        batch: dict[str, torch.Tensor] = {"input_values": input_values, "attention_mask": attention_mask}
        frames = _frames(self.config, total)

        if any("labels" in ex for ex in examples):
            if not all("labels" in ex for ex in examples):
                raise ValueError("either every example has 'labels' or none does")
            batch["labels"] = self._pad_labels([torch.as_tensor(ex["labels"]) for ex in examples], frames)

        seeded = ["mask_seed" in ex for ex in examples]
        if any(seeded):
            if not all(seeded):
                raise ValueError("either every example has 'mask_seed' (training) or none does (evaluation)")
            cfg = self.config
            if getattr(cfg, "apply_spec_augment", True) and cfg.mask_time_prob > 0:
                lengths = [_frames(cfg, w.numel()) for w in waves]
                mask = compute_mask_indices_per_sample(
                    lengths, frames, cfg.mask_time_prob, cfg.mask_time_length,
                    [ex["mask_seed"] for ex in examples], cfg.mask_time_min_masks,
                )
                batch["mask_time_indices"] = torch.from_numpy(mask)
                if self.num_negatives is not None:
                    batch["sampled_negative_indices"] = self._negatives(
                        batch["mask_time_indices"], lengths, [ex["mask_seed"] for ex in examples])
            if self.noise_seeds:
                batch["noise_seeds"] = torch.tensor([_stream_seed(ex["mask_seed"], _NOISE_STREAM) for ex in examples],
                                                    dtype=torch.int64)
        elif self.num_negatives is not None or self.noise_seeds:
            option = "num_negatives" if self.num_negatives is not None else "noise_seeds=True"
            raise ValueError(f"{option} needs training examples with 'mask_seed' (the draws are per sample)")
        return batch

    def _negatives(self, mask: torch.Tensor, lengths: list[int], seeds: list[int]) -> torch.Tensor:
        from .pretraining import sample_negative_indices

        frames = mask.shape[1]
        rows = []
        for b, (length, seed) in enumerate(zip(lengths, seeds)):
            generator = torch.Generator().manual_seed(_stream_seed(seed, _NEGATIVES_STREAM))
            valid = torch.zeros(1, frames, dtype=torch.bool)
            valid[0, :length] = True
            rows.append(sample_negative_indices(mask[b:b + 1], self.num_negatives, valid, generator=generator)
                        + b * frames)
        return torch.cat(rows)

    @staticmethod
    def _pad_labels(labels: list[torch.Tensor], frames: int) -> torch.Tensor:
        dims = {lab.dim() for lab in labels}
        if len(dims) != 1:
            raise ValueError(f"labels must all have the same rank, got ranks {sorted(dims)}")
        dim = dims.pop()
        if dim == 0:
            return torch.stack(labels)
        if dim == 1:
            out = torch.full((len(labels), max(lab.numel() for lab in labels)), -100, dtype=labels[0].dtype)
            for i, lab in enumerate(labels):
                out[i, : lab.numel()] = lab
            return out
        if dim == 2:
            width = labels[0].shape[1]
            if any(lab.shape[1] != width or lab.shape[0] > frames for lab in labels):
                raise ValueError(
                    f"frame labels must be [frames <= {frames}, num_labels] with one num_labels, got "
                    f"{[tuple(lab.shape) for lab in labels]}"
                )
            out = torch.zeros(len(labels), frames, width, dtype=labels[0].dtype)
            for i, lab in enumerate(labels):
                out[i, : lab.shape[0]] = lab
            return out
        raise ValueError(f"labels must be scalars, 1-D sequences or 2-D frame labels, got rank {dim}")


class SaveConfigCallback(TrainerCallback):
    """Writes ``config.json`` into each checkpoint Trainer saves, so ``from_pretrained(checkpoint)``
    loads it (Trainer writes only the weights for models that are not transformers' own classes)."""

    def on_save(self, args, state, control, model=None, **kwargs):
        if not args.should_save:
            return control
        if model is None:
            raise ValueError("SaveConfigCallback needs Trainer to pass the model to on_save")
        directory = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"Trainer reported a save but {directory} does not exist")
        config = model.config.copy()
        config.architectures = [type(model).__name__]
        config.dtype = str(model.dtype).replace("torch.", "")
        config.save_pretrained(directory)
        return control
