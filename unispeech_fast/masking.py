"""SpecAugment span masks and frame masks, with transformers' semantics.

:func:`compute_mask_indices` draws from NumPy's global RNG in exactly the order transformers does
(``np.random.rand`` then one ``np.random.choice`` per sequence), so a NumPy seed reproduces
transformers' masks.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["compute_mask_indices", "compute_mask_indices_per_sample"]


def compute_mask_indices(
    shape: tuple[int, int],
    mask_prob: float,
    mask_length: int,
    attention_mask: torch.Tensor | None = None,
    min_masks: int = 0,
) -> np.ndarray:
    """Random spans to mask, as a bool array of ``shape`` = ``(batch, length)``.

    Each sequence of valid length n gets ``int(mask_prob * n / mask_length + eps)`` spans (eps uniform
    in [0, 1), shared by the batch), at least ``min_masks``, capped so spans fit; span starts are drawn
    without replacement from ``[0, n - mask_length]``. ``attention_mask`` (bool ``[batch, length]``,
    right-padded) gives the valid lengths.
    """
    batch_size, sequence_length = shape
    if mask_length < 1:
        raise ValueError(f"mask_length must be at least 1, got {mask_length}")
    if mask_length > sequence_length:
        raise ValueError(
            f"mask_length ({mask_length}) must not exceed the sequence length ({sequence_length}); "
            "lower mask_time_length/mask_feature_length or use longer inputs"
        )
    epsilon = np.random.rand(1).item()

    def num_spans(input_length: int) -> int:
        n = int(mask_prob * input_length / mask_length + epsilon)
        n = max(n, min_masks)
        if n * mask_length > sequence_length:
            n = sequence_length // mask_length
        if input_length - (mask_length - 1) < n:
            n = max(input_length - (mask_length - 1), 0)
        return n

    if attention_mask is not None:
        input_lengths = attention_mask.detach().sum(-1).tolist()
    else:
        input_lengths = [sequence_length] * batch_size
    mask = np.zeros((batch_size, sequence_length), dtype=bool)
    max_spans = num_spans(sequence_length)
    if max_spans == 0:
        return mask
    starts = []
    for input_length in input_lengths:
        n = num_spans(input_length)
        idx = np.random.choice(np.arange(input_length - (mask_length - 1)), n, replace=False)
        dummy = sequence_length - 1 if len(idx) == 0 else idx[0]
        starts.append(np.concatenate([idx, np.ones(max_spans - n, dtype=np.int32) * dummy]))
    starts_arr = np.array(starts)
    spans = np.broadcast_to(starts_arr[:, :, None], (batch_size, max_spans, mask_length)).reshape(batch_size, -1)
    offsets = np.broadcast_to(np.arange(mask_length)[None, None, :], (batch_size, max_spans, mask_length))
    spans = spans + offsets.reshape(batch_size, -1)
    spans = np.minimum(spans, sequence_length - 1)
    np.put_along_axis(mask, spans, 1, -1)
    return mask


def compute_mask_indices_per_sample(
    lengths: list[int],
    num_frames: int,
    mask_prob: float,
    mask_length: int,
    seeds: list[int],
    min_masks: int = 0,
) -> np.ndarray:
    """Random spans to mask, bool ``[len(lengths), num_frames]``, each row drawn only from its own seed.

    Row i depends on nothing but ``(lengths[i], seeds[i])`` and the masking config: not on the other
    rows, the batch size or the padded length. That is what makes a batch split across DDP ranks get
    the masks it gets in one process (give each sample a seed derived from its global index, see
    README "Training"). Per row, with ``rng = numpy.random.default_rng(seed)`` and n = the valid
    length: ``int(mask_prob * n / mask_length + rng.random())`` spans, at least ``min_masks``, at most
    ``n - mask_length + 1``, starts drawn without replacement from ``[0, n - mask_length]``
    (transformers' rule, except that its epsilon is shared by the batch and its caps use the padded
    length). Frames at or past ``lengths[i]`` are never masked.
    """
    if mask_length < 1:
        raise ValueError(f"mask_length must be at least 1, got {mask_length}")
    if len(seeds) != len(lengths):
        raise ValueError(f"seeds must give one seed per row: got {len(seeds)} seeds for {len(lengths)} rows")
    mask = np.zeros((len(lengths), num_frames), dtype=bool)
    for i, (n, seed) in enumerate(zip(lengths, seeds)):
        n = int(n)
        if not 0 <= n <= num_frames:
            raise ValueError(f"lengths[{i}] = {n} must be in [0, num_frames={num_frames}]")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seeds[{i}] must be a non-negative int, got {seed!r}")
        rng = np.random.default_rng(int(seed))
        epsilon = rng.random()
        starts_available = n - mask_length + 1
        if starts_available <= 0:
            continue
        count = max(int(mask_prob * n / mask_length + epsilon), min_masks)
        count = min(count, starts_available)
        for start in rng.choice(starts_available, count, replace=False):
            mask[i, start:start + mask_length] = True
    return mask
