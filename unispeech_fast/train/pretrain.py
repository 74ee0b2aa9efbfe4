"""The pre-training objective of ``unispeech-fast pretrain`` on the shared loop
(:func:`unispeech_fast.train.loop.train`).

Per micro-batch (plan index ``i`` of step ``s``, see :mod:`.loop`):

- SpecAugment time masks come from the collator, per sample from :func:`~unispeech_fast.training.sample_seed`
  (padding-aware: only a sample's own frames are masked);
- one CPU ``torch.Generator`` seeded by :func:`batch_seed` ``(seed, s, i)`` draws, in this order, the
  utterance mixing (UniSpeech-SAT, :func:`~unispeech_fast.pretraining.utterance_mixing`) and the
  contrastive negatives (UniSpeech, :func:`~unispeech_fast.pretraining.sample_negative_indices`,
  padding excluded). The plan index does not depend on the rank, so a resumed run draws the same;
- the Gumbel noise and (UniSpeech) the CTC branch's replace mix come from each sample's own
  generator (the collator's ``noise_seeds``, derived from the sample seed), so they too do not depend
  on the rank, the world size or the padding (README "Training", the seeding rule);
- the Gumbel temperature of step ``s`` is ``max(max_t * decay ** (s - 1), min_t)`` (fairseq's
  schedule, a function of the number of updates done), set with ``set_gumbel_temperature``;
- the loss is the head's summed loss divided by the batch's number of masked frames (the authors'
  per-frame normalisation), then averaged over micro-batches and ranks as in ``finetune``.

SAT's utterance candidates and dropout draw from the global torch RNG, which is seeded
``seed + rank`` and saved in every checkpoint, so resume is exact.
"""

from __future__ import annotations

import numpy as np
import torch

from ..pretraining import sample_negative_indices, utterance_mixing

__all__ = ["PretrainObjective", "batch_seed", "gumbel_temperature", "LABEL_FRAME_TOLERANCE"]

LABEL_FRAME_TOLERANCE = 2  # cluster labels may differ from the model's frame count by this many frames


def batch_seed(seed: int, step: int, plan_index: int) -> int:
    """The seed of one micro-batch's generator: a function of ``(seed, step, plan_index)`` only."""
    return int(np.random.SeedSequence([int(seed), int(step), int(plan_index)]).generate_state(1, np.uint64)[0] >> 1)


def gumbel_temperature(step: int, schedule: tuple[float, float, float]) -> float:
    """The temperature of (1-based) update ``step``: ``max(max_t * decay ** (step - 1), min_t)``."""
    max_t, min_t, decay = schedule
    return max(max_t * decay ** (step - 1), min_t)


class PretrainObjective:
    """Adapts the loop to ``UniSpeechForPreTraining`` / ``UniSpeechSatForPreTraining`` (module docstring)."""

    def __init__(self, model, seed: int, schedule: tuple[float, float, float] = (2.0, 0.5, 0.999995),
                 mixing_prob: float = 0.5) -> None:
        max_t, min_t, decay = schedule
        if not 0 < min_t <= max_t or not 0 < decay <= 1:
            raise ValueError(f"the Gumbel temperature schedule needs 0 < min <= max and 0 < decay <= 1, got "
                             f"max={max_t}, min={min_t}, decay={decay}")
        if not 0.0 <= mixing_prob <= 1.0:
            raise ValueError(f"mixing_prob must be in [0, 1], got {mixing_prob!r}")
        config = model.config
        if not getattr(config, "apply_spec_augment", True) or not config.mask_time_prob > 0:
            raise ValueError("pre-training needs masked frames: the checkpoint's config has apply_spec_augment="
                             f"{getattr(config, 'apply_spec_augment', True)}, mask_time_prob={config.mask_time_prob} "
                             "(set mask_time_prob > 0 in config.json)")
        self.model, self.config, self.seed = model, config, seed
        self.schedule, self.mixing_prob = (float(max_t), float(min_t), float(decay)), mixing_prob
        self.sat = config.model_type == "unispeech-sat"

    def settings(self) -> dict:
        """What an exact resume must repeat (kept in the checkpoint and compared on ``--resume``)."""
        return {"objective": "pretrain", "gumbel_temperature": list(self.schedule), "mixing_prob": self.mixing_prob,
                **self.collator_options()}

    def collator_options(self) -> dict:
        """Per-sample seeds for the heads' Gumbel noise and replace mix (the seeding rule)."""
        return {"noise_seeds": True}

    def start_step(self, model, step: int) -> dict:
        tau = gumbel_temperature(step, self.schedule)
        model.set_gumbel_temperature(tau)
        return {"gumbel_temperature": tau}

    def check(self, entry, example) -> str | None:
        if not self.sat or "labels" not in example:
            return None
        from ..training import _frames

        frames = _frames(self.config, example["input_values"].numel())
        count = example["labels"].numel()
        if abs(count - frames) > LABEL_FRAME_TOLERANCE:
            return (f"{entry.path}: {count} cluster labels for {frames} frames (more than "
                    f"{LABEL_FRAME_TOLERANCE} apart: labels of another frame rate or another file?)")
        return None

    def prepare(self, batch: dict, step: int, plan_index: int) -> dict:
        if "mask_time_indices" not in batch:
            raise RuntimeError("the collator drew no mask_time_indices (SpecAugment off?)")
        generator = torch.Generator().manual_seed(batch_seed(self.seed, step, plan_index))
        attention = batch["attention_mask"]
        mask = batch["mask_time_indices"]
        frames = mask.shape[1]
        if self.sat:
            if self.mixing_prob > 0:
                batch["input_values"] = utterance_mixing(batch["input_values"], attention.bool(), generator=generator,
                                                         mixing_prob=self.mixing_prob).input_values
            if "labels" in batch:
                batch["labels"] = self._frame_labels(batch["labels"], attention, frames)
        else:
            frame_mask = self.model._get_feature_vector_attention_mask(frames, attention)
            batch["sampled_negative_indices"] = sample_negative_indices(
                mask, self.config.num_negatives, frame_mask, generator=generator)
        return batch

    def _frame_labels(self, labels: torch.Tensor, attention: torch.Tensor, frames: int) -> torch.Tensor:
        """Cluster ids ``[B, frames]``: each row's labels up to its own frame count (at most
        LABEL_FRAME_TOLERANCE extra labels are dropped, as fairseq crops), -100 after them."""
        from ..training import _frames

        out = torch.full((labels.shape[0], frames), -100, dtype=labels.dtype)
        for b in range(labels.shape[0]):
            row = labels[b][labels[b] != -100]
            keep = min(row.numel(), _frames(self.config, int(attention[b].sum())))
            out[b, :keep] = row[:keep]
        return out

    def loss(self, out, batch: dict) -> torch.Tensor:
        if out.loss is None:
            raise RuntimeError("the pre-training head returned no loss (UniSpeech-SAT needs cluster labels)")
        return out.loss / batch["mask_time_indices"].sum()
