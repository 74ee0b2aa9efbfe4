"""Pre-training helpers (negative sampling, utterance mixing) and the two pre-training heads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unispeech_fast import pretraining
from unispeech_fast.masking import compute_mask_indices as masking_compute_mask_indices
from unispeech_fast.pretraining import sample_negative_indices, utterance_mixing


# ---------------------------------------------------------------------------------------------- negatives
def test_compute_mask_indices_is_reexported():
    assert pretraining.compute_mask_indices is masking_compute_mask_indices


def test_negatives_format_masked_same_row_never_self_never_padding():
    batch, frames, k = 4, 50, 9
    attn = torch.arange(frames)[None, :] < torch.tensor([50, 41, 17, 30])[:, None]
    mask = torch.from_numpy(masking_compute_mask_indices((batch, frames), 0.6, 3, attention_mask=attn, min_masks=2))
    neg = sample_negative_indices(mask, k, attention_mask=attn, generator=torch.Generator().manual_seed(0))
    assert neg.shape == (batch, frames, k) and neg.dtype == torch.int64
    for b in range(batch):
        for t in range(frames):
            idx = neg[b, t]
            if not mask[b, t]:
                assert (idx == b * frames).all()  # transformers' value for unmasked frames
                continue
            assert ((idx // frames) == b).all()
            local = idx % frames
            assert mask[b, local].all() and attn[b, local].all()
            assert (local != t).all()


def test_negatives_are_uniform_over_the_other_masked_frames():
    mask = torch.zeros(1, 10, dtype=torch.bool)
    mask[0, [1, 4, 6, 9]] = True
    neg = sample_negative_indices(mask, 3000, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(neg[0, 4], minlength=10).float() / 3000
    assert counts[4] == 0 and counts[[0, 2, 3, 5, 7, 8]].sum() == 0
    assert torch.allclose(counts[[1, 6, 9]], torch.full((3,), 1 / 3), atol=0.04)


def test_negatives_seeded_by_generator():
    mask = torch.rand(3, 20, generator=torch.Generator().manual_seed(1)) < 0.5
    a = sample_negative_indices(mask, 4, generator=torch.Generator().manual_seed(5))
    b = sample_negative_indices(mask, 4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_negatives_rows_with_zero_or_one_masked_frame():
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[1, 3] = True
    mask[2, [0, 5]] = True
    neg = sample_negative_indices(mask, 4, generator=torch.Generator().manual_seed(0))
    assert (neg[0] == 0).all()  # nothing masked: nothing to sample
    assert (neg[1, 3] == 6 + 3).all()  # one masked frame: the frame itself (masked out by the loss)
    assert (neg[2, 0] == 12 + 5).all() and (neg[2, 5] == 12 + 0).all()


def test_negatives_input_errors():
    mask = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="num_negatives"):
        sample_negative_indices(mask, 0)
    with pytest.raises(ValueError, match="mask_time_indices"):
        sample_negative_indices(mask[0], 3)
    with pytest.raises(ValueError, match="masks padded frames"):
        sample_negative_indices(mask, 3, attention_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))


# ---------------------------------------------------------------------------------------------- mixing
def test_utterance_mixing_segment_snr_and_untouched_padding():
    g = torch.Generator().manual_seed(0)
    lengths = [4000, 3000, 1600, 4000, 2500, 3900]
    x = torch.randn(6, 4000, generator=g)
    attn = torch.arange(4000)[None, :] < torch.tensor(lengths)[:, None]
    x[~attn] = 0.0
    labels = torch.randint(0, 7, (6, 12), generator=g)
    labels_before = labels.clone()
    res = utterance_mixing(x, attn, generator=torch.Generator().manual_seed(3), mixing_prob=1.0)
    assert torch.equal(labels, labels_before)  # labels are never an input: the primary utterance's stay
    assert len(res.segments) == 6 and {s.row for s in res.segments} == set(range(6))
    for s in res.segments:
        n = min(lengths[s.row], lengths[s.partner])
        assert 0 <= s.length <= n // 2
        assert -5.0 <= s.snr_db <= 5.0
        assert 0 <= s.src_start <= lengths[s.partner] - s.length and 0 <= s.dst_start <= lengths[s.row] - s.length
        delta = res.input_values[s.row] - x[s.row]
        outside = torch.ones(4000, dtype=torch.bool)
        outside[s.dst_start:s.dst_start + s.length] = False
        assert delta[outside].abs().max() == 0  # only the segment changes; padding stays 0
        if s.length:
            added = delta[s.dst_start:s.dst_start + s.length].double()
            seg = x[s.partner, s.src_start:s.src_start + s.length].double()
            p_row = x[s.row, :lengths[s.row]].double().pow(2).mean()
            snr = 10 * math.log10(p_row / added.pow(2).mean())
            assert abs(snr - s.snr_db) < 1e-4
            scale = added / seg
            assert torch.allclose(scale, scale[0].expand_as(scale), rtol=1e-4)  # a scaled copy
    assert torch.equal(res.input_values[~attn], x[~attn])


def test_utterance_mixing_is_seeded_and_respects_probability():
    x = torch.randn(64, 800)
    a = utterance_mixing(x, generator=torch.Generator().manual_seed(9))
    b = utterance_mixing(x, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a.input_values, b.input_values) and a.segments == b.segments
    assert 16 <= len(a.segments) <= 48  # mixing_prob 0.5 over 64 rows
    none = utterance_mixing(x, generator=torch.Generator().manual_seed(9), mixing_prob=0.0)
    assert none.segments == [] and torch.equal(none.input_values, x)
    snrs = [s.snr_db for s in utterance_mixing(x, generator=torch.Generator().manual_seed(1), mixing_prob=1.0).segments]
    assert min(snrs) < -2.5 and max(snrs) > 2.5  # spread over [-5, 5]


def test_utterance_mixing_errors():
    x = torch.randn(2, 100)
    with pytest.raises(TypeError, match="generator"):
        utterance_mixing(x, generator=None)
    with pytest.raises(ValueError, match="mixing_prob"):
        utterance_mixing(x, generator=torch.Generator(), mixing_prob=2.0)
    with pytest.raises(ValueError, match="input_values"):
        utterance_mixing(x[0], generator=torch.Generator())
