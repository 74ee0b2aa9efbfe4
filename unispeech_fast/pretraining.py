"""Helpers for the pre-training objectives: span masks, negative sampling and utterance mixing.

* :func:`compute_mask_indices` -- SpecAugment time masks with transformers' semantics (re-exported
  from :mod:`unispeech_fast.masking`; padding is excluded through ``attention_mask``).
* :func:`sample_negative_indices` -- the ``sampled_negative_indices`` input of
  ``UniSpeechForPreTraining`` in transformers' ``_sample_negative_indices`` format, padding excluded.
* :func:`utterance_contrastive_loss` -- UniSpeech-SAT's utterance-wise contrastive (BCE) term.
* :func:`utterance_mixing` -- UniSpeech-SAT's batch augmentation (a segment of another utterance
  added at a random SNR), seeded by a ``torch.Generator``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from .masking import compute_mask_indices
from .ops.contrastive_loss.reference import gather_rows

__all__ = [
    "compute_mask_indices",
    "sample_negative_indices",
    "utterance_mixing",
    "utterance_contrastive_loss",
    "MixedSegment",
    "MixingResult",
]


def _check_bool_frames(name: str, value, shape: tuple[int, int] | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dim() != 2:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a 2-D tensor [batch, frames], got {got}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    if value.dtype != torch.bool and (value.is_floating_point() or value.is_complex()):
        raise TypeError(f"{name} must be a bool (or 0/1 integer) tensor, got {value.dtype}")
    return value.bool()


def sample_negative_indices(
    mask_time_indices: torch.Tensor,
    num_negatives: int,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Distractor indices for the contrastive loss, ``[batch, frames, num_negatives]`` int64.

    Transformers' ``_sample_negative_indices`` format: entry ``[b, t, k]`` indexes the flattened
    ``batch * frames`` axis. For every masked frame ``t`` of row ``b`` the ``num_negatives`` indices
    are drawn uniformly, with replacement, from the *other* masked frames of the same row (the shift
    trick: draw from ``n - 1`` and skip the frame itself). Unmasked frames get ``b * frames`` (they
    are never read by the loss), as in transformers.

    Args:
        mask_time_indices: bool ``[batch, frames]``, the masked frames (e.g. from
            :func:`compute_mask_indices` with the frame-level attention mask, so padding is never
            masked).
        num_negatives: K >= 1.
        attention_mask: optional frame-level ``[batch, frames]`` (1 = real frame). Padded frames are
            never drawn; a masked padded frame is an error (it would be a target on padding).
        generator: the torch RNG to draw from (default: torch's global CPU generator).

    Rows with fewer than 2 masked frames (the rule transformers lacks: it crashes in
    ``randint(0, 0)``): a row with no masked frame has nothing to sample; a row with exactly one
    masked frame has no other frame to contrast with, so its negatives all point at that frame
    itself. The contrastive loss masks negatives equal to the positive, so such a frame's logits are
    the positive alone and it contributes exactly 0 to the loss (and no gradient).
    """
    mask = _check_bool_frames("mask_time_indices", mask_time_indices)
    if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 1:
        raise ValueError(f"num_negatives must be a positive int, got {num_negatives!r}")
    batch, frames = mask.shape
    if attention_mask is not None:
        valid = _check_bool_frames("attention_mask", attention_mask, (batch, frames)).to(mask.device)
        if bool((mask & ~valid).any()):
            rows = sorted({int(b) for b in (mask & ~valid).nonzero()[:, 0].tolist()})
            raise ValueError(f"mask_time_indices masks padded frames (attention_mask == 0) in rows {rows}; "
                             "compute the mask with the attention mask so padding is never a target")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    out = torch.zeros(batch, frames, num_negatives, dtype=torch.int64)
    mask_cpu = mask.cpu()
    for b in range(batch):
        positions = mask_cpu[b].nonzero().squeeze(1)
        n = positions.numel()
        if n == 0:
            pass
        elif n == 1:
            out[b, positions] = positions.view(1, 1)
        else:
            drawn = torch.randint(0, n - 1, (n, num_negatives), generator=generator, device=gen_device).cpu()
            drawn = drawn + (drawn >= torch.arange(n)[:, None]).long()  # skip the frame itself
            out[b, positions] = positions[drawn]
        out[b] += b * frames
    return out.to(mask.device)


@dataclasses.dataclass(frozen=True)
class MixedSegment:
    """One mix: ``partner[src_start:src_start+length]`` scaled to ``snr_db`` was added to
    ``row[dst_start:dst_start+length]``."""

    row: int
    partner: int
    src_start: int
    dst_start: int
    length: int
    snr_db: float


@dataclasses.dataclass
class MixingResult:
    """``input_values`` the mixed batch; ``segments`` one :class:`MixedSegment` per mixed row."""

    input_values: torch.Tensor
    segments: list[MixedSegment]


def utterance_mixing(
    input_values: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    generator: torch.Generator,
    mixing_prob: float = 0.5,
    max_segment_ratio: float = 0.5,
    snr_db: tuple[float, float] = (-5.0, 5.0),
) -> MixingResult:
    """UniSpeech-SAT's utterance mixing augmentation on a waveform batch ``[batch, samples]``.

    For each row, with probability ``mixing_prob``: pick a partner row uniformly (itself allowed, as
    the authors do), a segment length ``L`` uniform in ``[0, floor(max_segment_ratio * n)]`` with
    ``n = min(len_row, len_partner)`` (real samples only; the authors crop the batch to its shortest
    row instead), a source start in the partner and a destination start in the row, an SNR uniform in
    ``snr_db``; the partner's segment is scaled so that ``10 log10(P_row / P_segment) = snr`` (``P`` the
    mean power of the row's real samples and of the segment) and added. Partners are read from the
    unmixed batch. Padding is never written; labels are unchanged by definition (the primary
    utterance keeps its frame labels), so the function does not take them.

    All draws come from ``generator`` (CPU), so a seeded generator reproduces the batch. Returns a
    :class:`MixingResult` (mixed copy, and the segments for inspection); the input is not modified.
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if not isinstance(input_values, torch.Tensor) or input_values.dim() != 2 or not input_values.is_floating_point():
        got = tuple(input_values.shape) if isinstance(input_values, torch.Tensor) else type(input_values).__name__
        raise ValueError(f"input_values must be a floating-point tensor [batch, samples], got {got}")
    if not 0.0 <= mixing_prob <= 1.0:
        raise ValueError(f"mixing_prob must be in [0, 1], got {mixing_prob!r}")
    if not 0.0 <= max_segment_ratio <= 1.0:
        raise ValueError(f"max_segment_ratio must be in [0, 1], got {max_segment_ratio!r}")
    lo, hi = snr_db
    if not lo <= hi:
        raise ValueError(f"snr_db must be (low, high) with low <= high, got {snr_db!r}")
    batch, samples = input_values.shape
    if attention_mask is not None:
        valid = _check_bool_frames("attention_mask", attention_mask, (batch, samples))
        lengths = valid.long().sum(-1).tolist()
    else:
        lengths = [samples] * batch
    source = input_values.detach()
    mixed = input_values.clone()
    segments: list[MixedSegment] = []

    def randint(high_inclusive: int) -> int:
        return int(torch.randint(0, high_inclusive + 1, (1,), generator=generator))

    for b in range(batch):
        if float(torch.rand(1, generator=generator)) >= mixing_prob:
            continue
        partner = randint(batch - 1)
        n = min(lengths[b], lengths[partner])
        length = randint(int(math.floor(max_segment_ratio * n)))
        src = randint(lengths[partner] - length)
        dst = randint(lengths[b] - length)
        snr = lo + (hi - lo) * float(torch.rand(1, generator=generator))
        segments.append(MixedSegment(b, partner, src, dst, length, snr))
        if length == 0:
            continue
        segment = source[partner, src:src + length].double()
        power_row = source[b, : lengths[b]].double().pow(2).mean()
        power_seg = segment.pow(2).mean()
        if float(power_seg) == 0.0:
            continue  # a silent segment adds nothing at any SNR
        scale = torch.sqrt(power_row / (power_seg * 10.0 ** (snr / 10.0)))
        mixed[b, dst:dst + length] += (scale * segment).to(mixed.dtype)
    return MixingResult(mixed, segments)


def utterance_contrastive_loss(
    speaker: torch.Tensor,
    targets: torch.Tensor,
    utterance_ids: torch.Tensor,
    candidates: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """UniSpeech-SAT's utterance-wise contrastive term over ``M`` frames, summed over frames.

    ``speaker [M, D]`` (``speaker_proj`` of the frames), ``targets [M, D]`` (their projected quantized
    vectors), ``utterance_ids [M]`` (the utterance of each frame), ``candidates [M, K]`` (indices into
    the M frames). Frame ``r`` scores its own target and its K candidates with
    ``s = cos(speaker_r, target) / temperature``; the label is 1 for its own target and for candidates
    of the same utterance, else 0; the frame's term is the mean over the ``K + 1`` scores of
    ``BCEWithLogits(s, label)``. Returns the sum over frames (the authors' mean times M), fp32 for
    half inputs.
    """
    m = speaker.shape[0]
    if targets.shape != speaker.shape or utterance_ids.shape != (m,) or candidates.dim() != 2 or \
            candidates.shape[0] != m:
        raise ValueError(f"expected speaker and targets [M, D], utterance_ids [M], candidates [M, K]; got "
                         f"{tuple(speaker.shape)}, {tuple(targets.shape)}, {tuple(utterance_ids.shape)}, "
                         f"{tuple(candidates.shape)}")
    same = torch.cat([torch.ones(m, 1, dtype=torch.bool, device=speaker.device),
                      utterance_ids[candidates] == utterance_ids[:, None]], dim=1)
    work = torch.promote_types(speaker.dtype, torch.float32)
    speaker_n = speaker.to(work) / speaker.to(work).norm(dim=-1, keepdim=True).clamp_min(1e-8)
    targets_n = targets.to(work) / targets.to(work).norm(dim=-1, keepdim=True).clamp_min(1e-8)
    gathered = gather_rows(targets_n, candidates)  # [M, K, D]; run-to-run reproducible backward
    scores = torch.cat([(speaker_n * targets_n).sum(-1, keepdim=True),
                        torch.einsum("md,mkd->mk", speaker_n, gathered)], dim=1) / temperature
    return F.binary_cross_entropy_with_logits(scores, same.to(work), reduction="none").mean(dim=1).sum()
