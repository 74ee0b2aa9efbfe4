"""Pre-training helpers (negative sampling, utterance mixing) and the two pre-training heads."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import unispeech_fast as uf
from conftest import hf_model, tiny_config_kwargs
from unispeech_fast import pretraining
from unispeech_fast.masking import compute_mask_indices as masking_compute_mask_indices
from unispeech_fast.pretraining import (
    compute_mask_indices,
    sample_negative_indices,
    utterance_contrastive_loss,
    utterance_mixing,
)


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


# ---------------------------------------------------------------------------------------------- heads
def _tiny(family: str, **overrides):
    kw = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
              layerdrop=0.0, final_dropout=0.0, feat_quantizer_dropout=0.0, mask_time_prob=0.5)
    if family == "UniSpeechSat":
        kw.update(proj_codevector_dim=24, num_utterance_negatives=8)
    kw.update(overrides)
    config = getattr(uf, family + "Config")(**tiny_config_kwargs(family, **kw))
    return getattr(uf, family + "ForPreTraining")(config)


def _batch(model, lengths=(4000, 3100), seed=0):
    g = torch.Generator().manual_seed(seed)
    total = max(lengths)
    x = torch.randn(len(lengths), total, generator=g)
    attn = (torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]).long()
    x[attn == 0] = 0.0
    frames = model._get_feat_extract_output_lengths(total)
    frame_mask = model._get_feature_vector_attention_mask(frames, attn)
    np.random.seed(seed)
    mask = torch.from_numpy(compute_mask_indices((len(lengths), frames), 0.5, 4, attention_mask=frame_mask,
                                                 min_masks=2))
    return x, attn, frame_mask, mask


def _hf_perplexity(probs, mask):
    from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2GumbelVectorQuantizer

    return Wav2Vec2GumbelVectorQuantizer._compute_perplexity(probs, mask)


@pytest.mark.parametrize("train", [False, True])
def test_unispeech_contrastive_and_diversity_match_transformers_path(train):
    from ops.test_contrastive_loss import hf_contrastive_loss

    model = _tiny("UniSpeech")
    model.train(train)
    x, attn, frame_mask, mask = _batch(model)
    neg = sample_negative_indices(mask, 6, attention_mask=frame_mask, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    out = model(x, attn, mask_time_indices=mask, sampled_negative_indices=neg)
    # transformers' Wav2Vec2ForPreTraining terms on the same tensors (prediction: the raw encoder output).
    expected = hf_contrastive_loss(out.projected_states, out.projected_quantized_states, neg, mask, 0.1)
    torch.testing.assert_close(out.contrastive_loss, expected, rtol=1e-5, atol=1e-4)
    extract = model.unispeech(x, attn, mask_time_indices=mask).extract_features
    logits = model.quantizer.weight_proj(extract).view(-1, 2, 5)
    probs = logits.softmax(-1) if train else F.one_hot(logits.argmax(-1), 5).to(logits.dtype)
    ppl = _hf_perplexity(probs, mask)
    torch.testing.assert_close(out.codevector_perplexity, ppl.to(out.codevector_perplexity.dtype), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.diversity_loss, (10 - ppl) / 10 * mask.sum(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.loss, out.contrastive_loss + 0.1 * out.diversity_loss)
    # Padding is excluded: the unmasked perplexity differs.
    assert not torch.isclose(ppl, _hf_perplexity(probs, None))


def test_unispeech_loss_combination_with_labels():
    model = _tiny("UniSpeech", pretraining_ctc_weight=0.3).eval()
    x, attn, frame_mask, mask = _batch(model)
    neg = sample_negative_indices(mask, 6, attention_mask=frame_mask, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[5, 9, 9, 3, 7], [4, 2, -100, -100, -100]])
    out = model(x, attn, mask_time_indices=mask, sampled_negative_indices=neg, labels=labels)
    assert out.ctc_loss is not None and out.ctc_loss > 0
    torch.testing.assert_close(out.loss, 0.7 * (out.contrastive_loss + 0.1 * out.diversity_loss) + 0.3 * out.ctc_loss)


@pytest.mark.parametrize("replace_prob", [0.0, 1.0])
def test_unispeech_ctc_branch_replace_prob_extremes(replace_prob):
    model = _tiny("UniSpeech", replace_prob=replace_prob, pretraining_ctc_blank_id=3).eval()
    x, attn, frame_mask, mask = _batch(model)
    neg = sample_negative_indices(mask, 6, attention_mask=frame_mask, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[5, 9, 9, 3, 7], [4, 2, 3, -100, -100]])  # 3 is the blank: padding
    out = model(x, attn, mask_time_indices=mask, sampled_negative_indices=neg, labels=labels)
    branch = out.projected_quantized_states if replace_prob == 1.0 else out.projected_states
    log_probs = F.log_softmax(model.ctc_proj(branch), -1).transpose(0, 1)
    expected = F.ctc_loss(log_probs, torch.tensor([5, 9, 9, 7, 4, 2]), frame_mask.sum(-1), torch.tensor([4, 2]),
                          blank=3, reduction="sum")
    torch.testing.assert_close(out.ctc_loss, expected)


def test_unispeech_without_negatives_is_transformers_forward():
    model = _tiny("UniSpeech").eval()
    x, attn, _, mask = _batch(model)
    out = model(x, attn, mask_time_indices=mask)
    assert out.loss is None and out.contrastive_loss is None and len(out.to_tuple()) == 3
    with pytest.raises(ValueError, match="sampled_negative_indices"):
        model(x, attn, mask_time_indices=mask, labels=torch.ones(2, 3, dtype=torch.long))


def test_unispeech_pretraining_input_errors():
    model = _tiny("UniSpeech").eval()
    x, attn, frame_mask, mask = _batch(model)
    neg = sample_negative_indices(mask, 6, attention_mask=frame_mask, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="mask_time_indices must be a bool tensor"):
        model(x, attn, sampled_negative_indices=neg)
    padded = mask.clone()
    padded[1, -1] = True
    with pytest.raises(ValueError, match="masks padded frames"):
        model(x, attn, mask_time_indices=padded, sampled_negative_indices=neg)
    with pytest.raises(ValueError, match="masks no frame"):
        model(x, attn, mask_time_indices=torch.zeros_like(mask), sampled_negative_indices=neg)
    with pytest.raises(ValueError, match="labels must be in"):
        model(x, attn, mask_time_indices=mask, sampled_negative_indices=neg, labels=torch.full((2, 3), 80))
    with pytest.raises(uf.ConfigError, match="pretraining_ctc_blank_id"):
        _tiny("UniSpeech", pretraining_ctc_blank_id=80)


def test_sat_prediction_loss_recomputed_from_logits():
    model = _tiny("UniSpeechSat").eval()
    x, attn, frame_mask, mask = _batch(model)
    labels = torch.randint(0, 7, mask.shape)
    labels[0, :5] = -100
    torch.manual_seed(0)
    out = model(x, attn, mask_time_indices=mask, labels=labels)
    assert out.prediction_logits.shape == (*mask.shape, 7)
    scored = mask & (labels != -100)
    expected = F.cross_entropy(out.prediction_logits[scored], labels[scored], reduction="sum")
    torch.testing.assert_close(out.prediction_loss, expected)
    # cos / temperature: bounded by 1 / 0.1
    assert out.prediction_logits.abs().max() <= 10.0 + 1e-4
    n = mask.sum()
    torch.testing.assert_close(out.diversity_loss, (10 - out.codevector_perplexity) / 10 * n)
    expected_loss = (out.prediction_loss + 1.0 * out.utterance_contrastive_loss + 0.1 * out.diversity_loss
                     + 10.0 * out.feature_penalty)
    torch.testing.assert_close(out.loss, expected_loss)
    conv = model.unispeech_sat.feature_extractor(x).transpose(1, 2)
    torch.testing.assert_close(out.feature_penalty, conv[frame_mask].pow(2).mean() * n)


def test_sat_without_labels_is_transformers_forward():
    model = _tiny("UniSpeechSat").eval()
    x, attn, _, mask = _batch(model)
    out = model(x, attn, mask_time_indices=mask)
    assert out.loss is None and out.prediction_logits is None and len(out.to_tuple()) == 2


def test_utterance_contrastive_bce_hand_computed():
    # Two frames of utterance 0, one of utterance 1; 2-D vectors with known cosines.
    speaker = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, -1.0]])
    utt = torch.tensor([0, 0, 1])
    cand = torch.tensor([[1, 2], [0, 0], [1, 2]])
    loss = utterance_contrastive_loss(speaker, targets, utt, cand, temperature=0.5)

    def bce(s, z):
        return -(z * math.log(1 / (1 + math.exp(-s))) + (1 - z) * math.log(1 - 1 / (1 + math.exp(-s))))

    # frame 0: own cos 1 (z=1); cand 1 (utt 0, cos 1, z=1); cand 2 (utt 1, cos 0, z=0)
    f0 = (bce(2.0, 1) + bce(2.0, 1) + bce(0.0, 0)) / 3
    # frame 1: own cos 0 (z=1); cand 0 twice (utt 0, cos 0, z=1)
    f1 = (bce(0.0, 1) + bce(0.0, 1) + bce(0.0, 1)) / 3
    # frame 2: own cos 0 (z=1); cand 1 (utt 0, cos 1, z=0); cand 2 = itself (utt 1, cos 0, z=1)
    f2 = (bce(0.0, 1) + bce(2.0, 0) + bce(0.0, 1)) / 3
    assert abs(loss.item() - (f0 + f1 + f2)) < 1e-5


def _graph_names(tensor):
    names, todo, seen = set(), [tensor.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(fn for fn, _ in node.next_functions)
    return names


def _repeated_grads(loss_fn, leaf, times=4):
    """The last loss and the gradient of ``leaf`` from ``times`` backward passes of ``loss_fn()``."""
    grads = []
    for _ in range(times):
        leaf.grad = None
        loss = loss_fn()
        loss.backward()
        grads.append(leaf.grad.clone())
    return loss, grads


def test_gathers_of_repeated_indices_have_a_reproducible_backward():
    """The utterance candidates and the eager contrastive negatives gather rows by repeated indices.
    Advanced indexing's backward (IndexBackward0: index_put_ with accumulate) adds the repeats with
    atomic float adds in thread order on CPU (float32, >= 32768 elements, > 1 thread), so two equal
    runs differed in the last bits (2 threads); index_select's backward adds them in index order."""
    from unispeech_fast.ops.contrastive_loss import contrastive_loss_ref

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        m, k, d = 400, 100, 64  # M*K*D far above the 32768 elements of the atomic path
        speaker = torch.randn(m, d, generator=g)
        targets = torch.randn(m, d, generator=g, requires_grad=True)
        candidates = torch.randint(0, m, (m, k), generator=g)
        utterance = torch.arange(m) // 100
        loss, grads = _repeated_grads(lambda: utterance_contrastive_loss(speaker, targets, utterance, candidates, 0.1),
                                      targets)
        assert "IndexBackward0" not in _graph_names(loss)
        assert all(torch.equal(grads[0], grad) for grad in grads[1:])

        batch, frames = 4, 100
        predictions = torch.randn(batch, frames, d, generator=g)
        mask = torch.rand(batch, frames, generator=g) < 0.5
        negatives = torch.randint(0, batch * frames, (batch, frames, k), generator=g)
        flat = torch.randn(batch, frames, d, generator=g, requires_grad=True)
        loss, grads = _repeated_grads(lambda: contrastive_loss_ref(predictions, flat, negatives, mask, 0.1), flat)
        assert "IndexSelectBackward0" in _graph_names(loss)  # (its IndexBackward0 nodes gather distinct rows)
        assert all(torch.equal(grads[0], grad) for grad in grads[1:])
    finally:
        torch.set_num_threads(threads)


def test_sat_label_embeddings_init_and_checkpoint_values(tmp_path):
    model = _tiny("UniSpeechSat")
    emb = model.label_embeddings_concat.detach()
    assert emb.abs().sum() > 0 and emb.min() >= 0 and emb.max() < 1  # the authors' uniform init
    theirs = hf_model("UniSpeechSat", "ForPreTraining")
    with torch.no_grad():
        theirs.label_embeddings_concat.normal_()
    theirs.save_pretrained(tmp_path)
    ours = uf.UniSpeechSatForPreTraining.from_pretrained(tmp_path)
    assert torch.equal(ours.label_embeddings_concat, theirs.label_embeddings_concat)


def _overfit(model, batch_fn, steps=50):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    losses, ppls = [], []
    for _ in range(steps):
        out = batch_fn(model)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        ppls.append(out.codevector_perplexity.item())
    return losses, ppls


def test_tiny_unispeech_overfits_without_collapse():
    model = _tiny("UniSpeech", num_codevectors_per_group=8)
    x, attn, frame_mask, mask = _batch(model, lengths=(2000, 1500))
    neg = sample_negative_indices(mask, 10, attention_mask=frame_mask, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[5, 9, 3, 7], [4, 2, -100, -100]])
    losses, ppls = _overfit(model, lambda m: m(x, attn, mask_time_indices=mask, sampled_negative_indices=neg,
                                                labels=labels))
    assert losses[-1] < 0.5 * losses[0], losses
    assert min(ppls[-10:]) > 2 * 2, ppls  # G = 2 is the collapse value


def test_tiny_unispeech_sat_overfits_without_collapse():
    model = _tiny("UniSpeechSat", num_codevectors_per_group=8)
    x, attn, frame_mask, mask = _batch(model, lengths=(2000, 1500))
    labels = torch.randint(0, 7, mask.shape, generator=torch.Generator().manual_seed(0))
    losses, ppls = _overfit(model, lambda m: m(x, attn, mask_time_indices=mask, labels=labels))
    assert losses[-1] < 0.5 * losses[0], losses
    assert min(ppls[-10:]) > 2 * 2, ppls


# ---------------------------------------------------------------------------- the seeding rule's draws
def test_per_sample_draws_depend_on_the_sample_alone():
    """A sample's replace mix and Gumbel noise come from its own seed over its own frames: the same
    alone, beside another sample, or padded further; padding gets none; the global RNG is untouched."""
    from unispeech_fast.models.heads import per_sample_draws

    state = torch.get_rng_state()
    replace, gumbels = per_sample_draws([11, 7], [5, 8], 13, "cpu", replace_prob=0.5, gumbel_width=6)
    assert torch.equal(torch.get_rng_state(), state)
    assert replace.shape == (2, 13) and replace.dtype == torch.bool
    assert gumbels.shape == (2, 13, 6) and gumbels.dtype == torch.float32
    alone = per_sample_draws([7], [8], 8, "cpu", replace_prob=0.5, gumbel_width=6)
    assert torch.equal(replace[1, :8], alone[0][0]) and torch.equal(gumbels[1, :8], alone[1][0])
    first = per_sample_draws([11], [5], 5, "cpu", replace_prob=0.5, gumbel_width=6)
    assert torch.equal(replace[0, :5], first[0][0]) and torch.equal(gumbels[0, :5], first[1][0])
    assert not replace[0, 5:].any() and not gumbels[0, 5:].any() and not gumbels[1, 8:].any()
    # the replace mix is drawn first, so it is the same whether Gumbel noise follows (training) or not (eval)
    assert torch.equal(per_sample_draws([11, 7], [5, 8], 13, "cpu", replace_prob=0.5)[0], replace)
    assert not torch.equal(gumbels[0, :5], gumbels[1, :5])  # another seed, other draws
    # the noise is F.gumbel_softmax's -log(Exp(1))
    expected = -torch.empty(5, 6).exponential_(generator=torch.Generator().manual_seed(11)).log()
    assert torch.equal(per_sample_draws([11], [5], 5, "cpu", gumbel_width=6)[1][0], expected)


def _layer_norm_tiny(family, **overrides):
    # pre-LN with layer-norm conv features: padding does not change a sample's valid frames, so a
    # batch's summed losses are the sums of its samples' (up to float rounding)
    return _tiny(family, do_stable_layer_norm=True, feat_extract_norm="layer", **overrides).train()


def test_unispeech_noise_seeds_make_the_loss_a_sum_over_samples():
    """With noise_seeds, Gumbel noise and the replace mix are per sample: the loss of a padded batch
    is the sum of its samples' losses computed alone, and no draw comes from the global RNG."""
    from unispeech_fast.training import SpeechDataCollator

    torch.manual_seed(0)
    model = _layer_norm_tiny("UniSpeech", diversity_loss_weight=0.0)  # a statistic of the batch, not a sum
    waves = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in (4000, 3100)]
    labels = [torch.tensor([5, 9, 9, 3, 7]), torch.tensor([4, 2])]
    collate = SpeechDataCollator(model, num_negatives=6, noise_seeds=True)

    def loss(indices, seed, seeded=True):
        batch = collate([{"input_values": waves[i], "labels": labels[i], "mask_seed": 100 + i} for i in indices])
        if not seeded:
            del batch["noise_seeds"]
        torch.manual_seed(seed)
        return model(**batch).loss

    together = loss([0, 1], seed=1)
    assert torch.equal(together, loss([0, 1], seed=2))  # the global RNG draws nothing
    torch.testing.assert_close(together, loss([0], 3) + loss([1], 4), rtol=1e-5, atol=1e-5)
    # control: from the global RNG the draws depend on the batch (and the seed)
    unseeded = [loss(indices, 1, seeded=False).item() for indices in ([0, 1], [0], [1])]
    assert abs(unseeded[0] - unseeded[1] - unseeded[2]) > 1e-3


def test_sat_noise_seeds_give_each_masked_frame_its_samples_noise(monkeypatch):
    """UniSpeech-SAT quantizes the masked frames of the batch: each one's Gumbel noise is its sample's,
    whatever else is in the batch and however long the padding; eval draws none."""
    from unispeech_fast import ops
    from unispeech_fast.training import SpeechDataCollator, _frames

    torch.manual_seed(0)
    model = _layer_norm_tiny("UniSpeechSat")
    waves = [torch.randn(n, generator=torch.Generator().manual_seed(n)) for n in (4000, 3100)]
    seen = []
    real = ops.gumbel_quantizer
    monkeypatch.setattr(ops, "gumbel_quantizer", lambda *a, **kw: seen.append(kw.get("gumbels")) or real(*a, **kw))

    def noise(indices, pad_to=None):
        collate = SpeechDataCollator(model, pad_to_samples=pad_to, noise_seeds=True)
        examples = [{"input_values": waves[i], "mask_seed": 100 + i,
                     "labels": torch.randint(0, 7, (_frames(model.config, waves[i].numel()),))} for i in indices]
        batch = collate(examples)
        batch["labels"] = F.pad(batch["labels"], (0, batch["mask_time_indices"].shape[1] - batch["labels"].shape[1]),
                                value=-100)
        model(**batch)
        counts = batch["mask_time_indices"].sum(1).tolist()
        return list(seen.pop()[0].split(counts))  # the noise rows of each sample's masked frames

    both = noise([0, 1])
    assert both[0].shape[1] == model.quantizer.gumbel_width and both[0].abs().min() > 0
    assert torch.equal(both[0], noise([0])[0]) and torch.equal(both[1], noise([1])[0])
    assert torch.equal(both[1], noise([1], pad_to=4800)[0])
    model.eval()  # eval: argmax codes, the quantizer takes no noise
    batch = SpeechDataCollator(model, noise_seeds=True)([{"input_values": waves[0], "mask_seed": 1}])
    model(**batch, labels=torch.zeros_like(batch["mask_time_indices"], dtype=torch.long))
    assert seen.pop() is None


def test_noise_seeds_input_errors():
    model = _tiny("UniSpeech").train()
    x, attn, frame_mask, mask = _batch(model)
    neg = sample_negative_indices(mask, 6, attention_mask=frame_mask, generator=torch.Generator().manual_seed(0))
    for bad, match in ((torch.tensor([1, 2], dtype=torch.int32), "int64 tensor \\[batch=2\\]"),
                       (torch.tensor([1, 2, 3]), "int64 tensor \\[batch=2\\]"), ([1, 2], "got list"),
                       (torch.tensor([1, -2]), "non-negative")):
        with pytest.raises(ValueError, match=match):
            model(x, attn, mask_time_indices=mask, sampled_negative_indices=neg, noise_seeds=bad)
    sat = _tiny("UniSpeechSat").train()
    with pytest.raises(ValueError, match="noise_seeds must be an int64 tensor"):
        sat(x, attn, mask_time_indices=mask, noise_seeds=torch.tensor([1]))
