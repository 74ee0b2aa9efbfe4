"""DDP over 2 gloo processes (loopback) equals one process with the same global batch, stochastic parts
included, under the seeding rule of README "Training"; and find_unused_parameters=False suffices for
every head's default config without LayerDrop.

The pretraining heads follow the same rule: masks and UniSpeech's negatives per sample (the
collator's ``mask_seed``), the Gumbel noise and UniSpeech's CTC replace mix per sample too (the
collator's ``noise_seeds``: each sample's own generator), their summed losses scaled by
``world / (masked frames of the global batch)`` (fairseq's sample-size normalisation, so the
averaged gradient is one process's). The equality cases keep the quantizer in training mode
(Gumbel sampling) and UniSpeech's ``replace_prob`` at its default 0.5; they set
UniSpeech-SAT's utterance-contrastive weight to 0 (its candidates are drawn among a rank's own
batch). The diversity term (the codebook perplexity of the batch's mean code distribution) and
SAT's feature penalty (a mean over the batch's frames) are statistics of a rank's batch, as in
fairseq, not sums over samples: their weights are 0 there too (the per-frame terms, contrastive,
CTC and masked prediction, are compared). The find_unused_parameters=False cases keep all of it on.

The two ranks are spawned once per module (torch.multiprocessing, 2 processes on 2 cores) and run every
case; the one-process references run here in the test process.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import unispeech_fast as uf
from conftest import tiny_config_kwargs
from test_training import TRAINER_CASES as HEADS  # the six fine-tuning heads and both pretraining heads
from test_training import _labels, _num_negatives

from unispeech_fast.training import SpeechDataCollator, sample_seed

WORLD = 2
PER_RANK = 2  # per-rank batch; the one-process run takes WORLD * PER_RANK
STEPS = 3
PAD_TO = 1400  # a fixed padded length: group-norm models see the same padding in every split
NO_DROPOUT = dict(hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0, feat_proj_dropout=0.0,
                  final_dropout=0.0)
# name -> (family, head, config overrides, find_unused_parameters, LayerDrop seed or None)
CASES = {}
for _family, _head in HEADS:
    # Equivalence: SpecAugment spans (per-sample seeds) and LayerDrop (seed_layerdrop) on, dropout off
    # (element-wise dropout is equal in law only). Dropped layers leave their parameters unused on
    # every rank, so LayerDrop needs find_unused_parameters=True (their grads then stay None, as in
    # one process).
    _equal = dict(NO_DROPOUT, layerdrop=0.5)
    if _head == "ForPreTraining":
        _equal.update(feat_quantizer_dropout=0.0, diversity_loss_weight=0.0)  # a batch statistic (docstring)
        if _family == "UniSpeechSat":
            _equal.update(utterance_contrastive_loss_weight=0.0, feature_penalty_weight=0.0, proj_codevector_dim=24)
    CASES[f"equal-{_family}{_head}"] = (_family, _head, _equal, True, 1234)
    # find_unused_parameters=False: the default config (dropout, in-model SpecAugment) without LayerDrop.
    _sat_pretraining = dict(proj_codevector_dim=24) if (_family, _head) == ("UniSpeechSat", "ForPreTraining") else {}
    CASES[f"unused-{_family}{_head}"] = (_family, _head, dict(layerdrop=0.0, **_sat_pretraining), False, None)
CASES["layerdrop-without-find-unused"] = ("UniSpeechSat", "ForCTC", dict(layerdrop=0.9), False, 1234)
# Without SpecAugment, UniSpeechSat's masked_spec_embed (always present, as in transformers) is unused:
# find_unused_parameters=False then needs it frozen (DDP skips parameters that do not require grad).
CASES["sat-no-spec-augment-frozen-embed"] = ("UniSpeechSat", "ForCTC", dict(layerdrop=0.0, mask_time_prob=0.0),
                                             False, None)
CASES["sat-no-spec-augment"] = ("UniSpeechSat", "ForCTC", dict(layerdrop=0.0, mask_time_prob=0.0), False, None)
# Control: the same as equal-UniSpeechSatForCTC but SpecAugment drawn inside the model from NumPy's
# global RNG (seeded alike on every rank): each rank draws for its own half, so DDP != one process.
CASES["in-model-masks"] = ("UniSpeechSat", "ForCTC", dict(NO_DROPOUT, layerdrop=0.5), True, 1234)
# Control: equal-UniSpeechForPreTraining with the Gumbel noise and replace mix drawn per rank from the
# global torch RNG (no noise_seeds): DDP != one process, so the equality above rests on the rule.
CASES["per-rank-noise"] = CASES["equal-UniSpeechForPreTraining"]
PER_RANK_DRAWS = ("in-model-masks", "per-rank-noise")


def _config(family, overrides):
    kw = tiny_config_kwargs(family, **{"mask_time_prob": 0.3, "mask_time_length": 2, **overrides})
    return getattr(uf, family + "Config")(**kw)


def _example(head, config, index, seeded=True):
    samples = 1100 + 23 * index  # different lengths, all padded to PAD_TO
    wave = torch.randn(samples, generator=torch.Generator().manual_seed(index))
    example = {"input_values": wave, "labels": _labels(head, index, samples, config)}
    if seeded:
        example["mask_seed"] = sample_seed(0, index)
    return example


def _run(name, rank, world, dtype=torch.float32):
    """STEPS SGD steps of case ``name`` on ``rank`` of ``world`` (world 1 = the one-process run over the
    global batch). Returns the global mean loss per step and the final parameters.

    SGD keeps the weights linear in the gradients, so fp32 rounding in the gradient average shows up at
    its own size (Adam divides by sqrt(v) and magnifies it on near-zero gradients); momentum and weight
    decay make a gradient of zeros differ from an absent one (a dropped layer's), which must stay absent."""
    family, head, overrides, find_unused, layerdrop_seed = CASES[name]
    config = _config(family, overrides)
    torch.manual_seed(0)
    np.random.seed(0)
    model = getattr(uf, family + head)(config).train().to(dtype)
    if layerdrop_seed is not None:
        model.seed_layerdrop(layerdrop_seed)  # the same seed on every rank
    if name == "sat-no-spec-augment-frozen-embed":
        model.base_model.masked_spec_embed.requires_grad_(False)
    pretraining = head == "ForPreTraining"
    if pretraining and family == "UniSpeechSat" and not config.do_stable_layer_norm:
        # transformers' layer_norm_for_extract is used by pre-LN models only: a post-LN model leaves it
        # without a gradient, so find_unused_parameters=False needs it frozen (as masked_spec_embed above)
        model.layer_norm_for_extract.requires_grad_(False)
    wrapped = model
    if world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.01)
    # Gumbel noise and the replace mix from the samples' seeds (not in the controls)
    collate = SpeechDataCollator(config, pad_to_samples=PAD_TO, num_negatives=_num_negatives(config, head),
                                 noise_seeds=pretraining and name not in PER_RANK_DRAWS)
    per_rank = WORLD * PER_RANK // world
    losses = []
    for step in range(STEPS):
        first = step * WORLD * PER_RANK + rank * per_rank  # global indices: rank r holds the r-th slice
        batch = collate([_example(head, config, i, seeded=name != "in-model-masks")
                         for i in range(first, first + per_rank)])
        batch["input_values"] = batch["input_values"].to(dtype)
        if pretraining and family == "UniSpeechSat":  # cluster labels: one per frame of the padded batch
            frames = batch["mask_time_indices"].shape[1]
            batch["labels"] = torch.nn.functional.pad(batch["labels"], (0, frames - batch["labels"].shape[1]),
                                                      value=-100)
        loss = wrapped(**batch).loss
        if pretraining:  # summed over masked frames: normalise by the global batch's count
            masked = batch["mask_time_indices"].sum().to(torch.float64)
            if world > 1:
                dist.all_reduce(masked)
            loss = loss * world / masked.to(loss.dtype)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        if world > 1:
            dist.all_reduce(mean)
            mean /= world
        losses.append(mean.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results = {}
    try:
        for name in CASES:
            try:
                results[name] = _run(name, rank, WORLD)
            except RuntimeError as exc:  # recorded, and checked by the tests
                results[name] = f"{type(exc).__name__}: {exc}"
                dist.barrier()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _fp32_distances(ranks, name):
    """(DDP's, one fp32 process's) distance to an fp64 one-process run: the worst relative loss error
    and the worst absolute weight error."""
    got = ranks[0][name]
    assert not isinstance(got, str), got
    ddp_losses, ddp_state = got
    one_losses, one_state = _run(name, 0, 1)
    ref_losses, ref_state = _run(name, 0, 1, torch.float64)
    # The fp64 run made the same random draws: its first loss agrees to fp32 rounding. (Later steps
    # drift by the conditioning: the x-vector's AM-softmax normalises small logits, a large gradient.)
    assert abs(one_losses[0] - ref_losses[0]) <= 1e-6 * abs(ref_losses[0])

    def distance(losses, state):
        worst = max(abs(a - b) / max(abs(b), 1.0) for a, b in zip(losses, ref_losses))
        for key, ref in ref_state.items():
            if ref.is_floating_point():
                worst = max(worst, float((state[key].double() - ref).abs().max()))
        return worst

    return distance(ddp_losses, ddp_state), distance(one_losses, one_state)


@pytest.mark.parametrize("family,head", HEADS)
def test_ddp_two_ranks_equal_one_process(ranks, family, head):
    """Losses and weights after STEPS steps: DDP's distance to an fp64 one-process run is at most 2x (plus
    1e-7 absolute) that of the fp32 one-process run (the tolerance rule); both ranks end bitwise equal."""
    name = f"equal-{family}{head}"
    ddp_error, fp32_error = _fp32_distances(ranks, name)
    assert 0 < fp32_error and ddp_error <= 2 * fp32_error + 1e-7
    # seed_layerdrop(1234) drops layer 0 in all 3 steps: its weights never get a gradient, so under
    # DDP they must stay exactly as initialised (a gradient of zeros would let weight decay move them).
    torch.manual_seed(0)
    initial = getattr(uf, family + head)(_config(family, CASES[name][2])).state_dict()
    layer0 = [k for k in initial if ".encoder.layers.0." in k]
    assert layer0 and all(torch.equal(ranks[0][name][1][k], initial[k]) for k in layer0)
    assert not torch.equal(ranks[0][name][1][layer0[0].replace("layers.0.", "layers.1.")],
                           initial[layer0[0].replace("layers.0.", "layers.1.")])
    for key, value in ranks[0][name][1].items():
        torch.testing.assert_close(ranks[1][name][1][key], value, rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("name", PER_RANK_DRAWS)
def test_ddp_with_draws_made_per_rank_is_not_one_process(ranks, name):
    """The controls that show the check above can fail: per-rank draws from a shared seed differ
    (SpecAugment masks drawn in the model; Gumbel noise and replace mix from the global torch RNG)."""
    ddp_error, fp32_error = _fp32_distances(ranks, name)
    assert ddp_error > 100 * fp32_error


@pytest.mark.parametrize("family,head", HEADS)
def test_ddp_default_config_needs_no_find_unused_parameters(ranks, family, head):
    name = f"unused-{family}{head}"
    for rank in range(WORLD):
        assert not isinstance(ranks[rank][name], str), ranks[rank][name]
    losses, state = ranks[0][name]
    assert all(torch.isfinite(torch.tensor(losses)))
    initial = getattr(uf, family + head)
    torch.manual_seed(0)
    start = initial(_config(family, CASES[name][2])).state_dict()
    moved = [k for k in state if not torch.equal(state[k], start[k])]
    assert len(moved) > 0.9 * len(state)  # (nearly) every parameter got a gradient and moved
    for key, value in state.items():  # gradients were averaged: the ranks stay identical
        torch.testing.assert_close(ranks[1][name][1][key], value, rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")


def test_layerdrop_without_find_unused_parameters_is_refused_by_ddp(ranks):
    """Why LayerDrop needs find_unused_parameters=True: DDP stops at the next step, naming the fix."""
    for rank in range(WORLD):
        got = ranks[rank]["layerdrop-without-find-unused"]
        assert isinstance(got, str) and "find_unused_parameters=True" in got, got


def test_trainer_under_torchrun_two_ranks(tmp_path):
    """The README's command: Trainer + DDP (gloo) + gradient checkpointing under torchrun, 2 processes."""
    script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "trainer_ddp_smoke.py"
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), "--output-dir", str(out), "--gradient-checkpointing"]
    # cwd outside the repository: its top-level kernels/ folder must not shadow the PyPI package
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'epoch': '0.25'" in proc.stdout  # 16 samples, 2 ranks x 2 per step: 4 steps per epoch, so DDP ran
    states = [torch.load(out / f"final-rank{r}.pt") for r in range(WORLD)]
    model = uf.UniSpeechSatForCTC.from_pretrained(out / "checkpoint-2")  # rank 0 wrote it, config.json included
    assert model.config.architectures == ["UniSpeechSatForCTC"]
    loaded = model.state_dict()
    for key, value in states[0].items():
        torch.testing.assert_close(states[1][key], value, rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")


def test_unused_masked_spec_embed_is_refused_unless_frozen(ranks):
    """UniSpeechSat with mask_time_prob=0: masked_spec_embed gets no gradient, so DDP without
    find_unused_parameters stops at step 2; frozen, the same config trains and the ranks agree."""
    for rank in range(WORLD):
        got = ranks[rank]["sat-no-spec-augment"]
        assert isinstance(got, str) and "find_unused_parameters=True" in got, got
        assert not isinstance(ranks[rank]["sat-no-spec-augment-frozen-embed"], str)
    state = ranks[0]["sat-no-spec-augment-frozen-embed"][1]
    for key, value in state.items():
        torch.testing.assert_close(ranks[1]["sat-no-spec-augment-frozen-embed"][1][key], value, rtol=0, atol=0)
