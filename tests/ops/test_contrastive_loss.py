"""The ``contrastive_loss`` op: transformers' Wav2Vec2ForPreTraining formulation, fp64 gradcheck, input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import unispeech_fast as uf
from unispeech_fast import dispatch
from unispeech_fast.bench.suites import transformers_contrastive_loss
from unispeech_fast.ops import contrastive_loss, contrastive_loss_ref
from unispeech_fast.pretraining import compute_mask_indices, sample_negative_indices
from _backends import declaring, run_on
from _tolerance import assert_within_2x_eager

#: The shared rule (tests/_tolerance.py) with the floor these tests have always had: stricter than the shared
#: fp32 floor (1e-6), so kept.
STRICT_FLOOR = 1e-7


#: transformers' Wav2Vec2ForPreTraining loss path (its own ``compute_contrastive_logits``), as benchmarked.
hf_contrastive_loss = transformers_contrastive_loss


def hf_negatives(mask: np.ndarray, k: int) -> torch.Tensor:
    from transformers.models.wav2vec2.modeling_wav2vec2 import _sample_negative_indices

    return torch.from_numpy(_sample_negative_indices(mask.shape, k, mask.astype(bool))).long()


def random_inputs(batch=3, frames=37, dim=16, k=5, dtype=torch.float32, lengths=None, duplicates=True):
    lengths = lengths or [frames] * batch
    attn = torch.arange(frames)[None, :] < torch.tensor(lengths)[:, None]
    mask = torch.from_numpy(compute_mask_indices((batch, frames), 0.5, 4, attention_mask=attn, min_masks=2))
    pred = torch.randn(batch, frames, dim, dtype=dtype)
    targ = torch.randn(batch, frames, dim, dtype=dtype)
    codes = torch.arange(batch * frames).view(batch, frames, 1).repeat(1, 1, 2)
    if duplicates:  # some frames share their quantized vector (and codes) with another frame of the row
        for b in range(batch):
            targ[b, 1::3] = targ[b, 0]
            codes[b, 1::3] = codes[b, 0]
    return pred, targ, mask, codes, attn


@pytest.mark.parametrize("lengths", [None, [37, 30, 21]])
def test_matches_transformers_wav2vec2_formulation(lengths):
    pred, targ, mask, codes, attn = random_inputs(lengths=lengths)
    neg = sample_negative_indices(mask, 5, attention_mask=attn, generator=torch.Generator().manual_seed(1))
    expected = hf_contrastive_loss(pred, targ, neg, mask, 0.1)
    torch.testing.assert_close(contrastive_loss(pred, targ, neg, mask, 0.1), expected, rtol=1e-5, atol=1e-4)
    # Code-index equality excludes the same negatives as transformers' element-wise equality here.
    torch.testing.assert_close(contrastive_loss(pred, targ, neg, mask, 0.1, code_indices=codes), expected,
                               rtol=1e-5, atol=1e-4)


def test_matches_transformers_with_its_own_negative_sampler():
    pred, targ, mask, codes, _ = random_inputs()
    neg = hf_negatives(mask.numpy(), 7)
    torch.testing.assert_close(contrastive_loss(pred, targ, neg, mask, 0.5, code_indices=codes),
                               hf_contrastive_loss(pred, targ, neg, mask, 0.5), rtol=1e-5, atol=1e-4)


def test_code_indices_decide_equality_not_values():
    # Two frames with different codes but (by a collision) equal projected vectors stay negatives when
    # code_indices are given; element-wise equality would drop them.
    pred, targ, mask, codes, _ = random_inputs(batch=1, frames=8, duplicates=False)
    mask[:] = True
    targ[0, 1] = targ[0, 0]
    neg = torch.full((1, 8, 1), 2, dtype=torch.long)  # frame 2 (itself for frame 2: excluded by both rules)
    neg[0, 0, 0] = 1
    by_value = contrastive_loss(pred, targ, neg, mask, 0.1)
    by_code = contrastive_loss(pred, targ, neg, mask, 0.1, code_indices=codes)
    # Frame 0: by value its only negative is dropped (term 0); by code it is kept, and as it equals the
    # positive the term is log(2) exactly.
    torch.testing.assert_close(by_code - by_value, torch.log(torch.tensor(2.0)), atol=1e-5, rtol=0)


def _gradcheck_inputs():
    torch.manual_seed(3)
    batch, frames, dim, k = 3, 6, 4, 3
    pred = torch.randn(batch, frames, dim, dtype=torch.float64, requires_grad=True)
    targ = torch.randn(batch, frames, dim, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(batch, frames, dtype=torch.bool)
    mask[0, :4] = True  # an ordinary row
    mask[1, 2] = True  # one masked frame: its negatives are itself (all equal the positive)
    mask[2, [1, 4]] = True  # two masked frames; frames 5.. of row 2 would be padding
    neg = sample_negative_indices(mask, k, generator=torch.Generator().manual_seed(0))
    codes = torch.arange(batch * frames).view(batch, frames, 1)
    return pred, targ, neg, mask, codes


def test_rows_with_one_or_two_masked_frames():
    pred, targ, neg, mask, codes = _gradcheck_inputs()
    assert (neg[1, 2] == 1 * 6 + 2).all()  # the single masked frame points at itself
    assert (neg[2, 1] == 2 * 6 + 4).all() and (neg[2, 4] == 2 * 6 + 1).all()  # two frames: each other
    only_row1 = mask.clone()
    only_row1[[0, 2]] = False
    loss = contrastive_loss(pred, targ, neg, only_row1, 0.1, code_indices=codes)
    assert loss.item() == 0.0  # every negative equals the positive: the frame contributes exactly 0
    loss.backward()
    assert pred.grad.abs().max() == 0 and targ.grad.abs().max() == 0


@pytest.mark.parametrize("use_codes", [False, True])
def test_gradcheck_fp64(use_codes):
    pred, targ, neg, mask, codes = _gradcheck_inputs()
    torch.autograd.gradcheck(
        lambda p, t: contrastive_loss(p, t, neg, mask, 0.3, code_indices=codes if use_codes else None),
        (pred, targ),
    )


def test_unmasked_and_padded_rows_do_not_contribute():
    pred, targ, mask, codes, attn = random_inputs(lengths=[37, 30, 21])
    neg = sample_negative_indices(mask, 5, attention_mask=attn, generator=torch.Generator().manual_seed(0))
    base = contrastive_loss(pred, targ, neg, mask, 0.1, code_indices=codes)
    pred2 = pred.clone()
    pred2[~mask] = 1e3 * torch.randn_like(pred2[~mask])  # anything at unmasked / padded predictions
    torch.testing.assert_close(contrastive_loss(pred2, targ, neg, mask, 0.1, code_indices=codes), base)


def test_fp32_error_against_fp64_within_twice_transformers():
    pred, targ, mask, codes, _ = random_inputs(frames=101, dim=64, k=20)
    neg = sample_negative_indices(mask, 20, generator=torch.Generator().manual_seed(0))
    exact = contrastive_loss_ref(pred.double(), targ.double(), neg, mask, 0.1, codes)
    ours = (contrastive_loss(pred, targ, neg, mask, 0.1, codes).double() - exact).abs()
    theirs = (hf_contrastive_loss(pred, targ, neg, mask, 0.1).double() - exact).abs()
    assert ours <= 2 * theirs + 1e-6 * exact.abs(), (ours, theirs)


def test_half_inputs_compute_in_fp32():
    pred, targ, mask, codes, _ = random_inputs()
    neg = sample_negative_indices(mask, 5, generator=torch.Generator().manual_seed(0))
    out = contrastive_loss(pred.bfloat16(), targ.bfloat16(), neg, mask, 0.1, code_indices=codes)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, contrastive_loss(pred.bfloat16().float(), targ.bfloat16().float(), neg, mask,
                                                     0.1, code_indices=codes))


def test_input_errors_name_the_argument():
    pred, targ, mask, codes, _ = random_inputs()
    neg = sample_negative_indices(mask, 5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="predictions"):
        contrastive_loss(pred[0], targ, neg, mask, 0.1)
    with pytest.raises(ValueError, match="targets"):
        contrastive_loss(pred, targ[:, :5], neg, mask, 0.1)
    with pytest.raises(ValueError, match="negative_indices"):
        contrastive_loss(pred, targ, neg.float(), mask, 0.1)
    with pytest.raises(ValueError, match=r"negative_indices of masked frames must be in \[0, batch \* frames"):
        contrastive_loss(pred, targ, neg + 1000, mask, 0.1)
    with pytest.raises(ValueError, match="mask_time_indices"):
        contrastive_loss(pred, targ, neg, mask.long(), 0.1)
    with pytest.raises(ValueError, match="temperature"):
        contrastive_loss(pred, targ, neg, mask, 0.0)
    with pytest.raises(ValueError, match="code_indices"):
        contrastive_loss(pred, targ, neg, mask, 0.1, code_indices=codes[:, :3])


def test_registered_with_dispatch():
    assert "contrastive_loss" in dispatch.OPS
    assert "eager" in dispatch.implemented_backends()["contrastive_loss"]
    pred, targ, mask, codes, _ = random_inputs()
    neg = sample_negative_indices(mask, 5, generator=torch.Generator().manual_seed(0))
    with uf.backend("eager"):
        contrastive_loss(pred, targ, neg, mask, 0.1)
    with uf.backend("cuda"), pytest.raises(uf.BackendNotSupportedError, match="contrastive_loss"):
        contrastive_loss(pred, targ, neg, mask, 0.1)


# ---------------------------------------------------------------------------------------------- every backend
def _loss_and_grads(fn, pred, targ, neg, mask, codes, weight=1.7):
    p, t = pred.detach().clone().requires_grad_(), targ.detach().clone().requires_grad_()
    loss = fn(p, t, neg, mask, 0.1, codes)
    (weight * loss).backward()
    return loss.detach(), p.grad, t.grad


CASES = [  # frames, lengths, feature width, negatives: one and several feature blocks, padded rows
    (37, None, 1, 7), (37, None, 33, 7), (37, [37, 30, 21], 33, 7), (37, [37, 30, 21], 256, 7),
    (19, [19, 14, 9], 1, 4), (19, [19, 14, 9], 33, 4), (19, [19, 14, 9], 257, 4),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-{'padded' if c[1] else 'full'}-D{c[2]}-K{c[3]}")
@pytest.mark.parametrize("use_codes", [False, True])
@pytest.mark.parametrize("backend", declaring("contrastive_loss", torch.float32))
def test_within_twice_eager_error_against_fp64(backend, use_codes, case):
    """Every backend declaring fp32 against the fp64 reference (loss and both gradients); those declaring fp64
    equal it to fp64 precision."""
    frames, lengths, dim, k = case
    impl = run_on(backend, contrastive_loss)
    pred, targ, mask, codes, attn = random_inputs(frames=frames, dim=dim, lengths=lengths)
    codes = codes if use_codes else None
    neg = sample_negative_indices(mask, k, attention_mask=attn, generator=torch.Generator().manual_seed(2))
    ref = _loss_and_grads(contrastive_loss_ref, pred.double(), targ.double(), neg, mask, codes)
    eager = _loss_and_grads(contrastive_loss_ref, pred, targ, neg, mask, codes)
    ours = _loss_and_grads(impl, pred, targ, neg, mask, codes)
    for name, o, e, r in zip(("loss", "grad_predictions", "grad_targets"), ours, eager, ref):
        assert o.dtype == e.dtype and o.shape == e.shape
        assert_within_2x_eager(name, o, e, r, STRICT_FLOOR)
    if backend in [p.values[0] for p in declaring("contrastive_loss", torch.float64)]:
        fp64 = _loss_and_grads(impl, pred.double(), targ.double(), neg, mask, codes)
        for o, r in zip(fp64, ref):
            torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------- cpp backend
def _cpp():
    from unispeech_fast.ops import _extension_ops
    from unispeech_fast.ops.contrastive_loss import extension

    reasons = dispatch._REGISTRY["contrastive_loss"]["cpp"].not_supported_reasons(torch.zeros(1, 1, 1), None, None,
                                                                                   None, 0.1)
    if reasons or not _extension_ops.ensure_registered():
        pytest.fail("the C++ contrastive_loss kernel is not built: " + "; ".join(reasons))
    return extension.contrastive_loss_cpp


def test_cpp_gradcheck_fp64_edge_rows():
    impl = _cpp()
    pred, targ, neg, mask, codes = _gradcheck_inputs()
    torch.autograd.gradcheck(lambda p, t: impl(p, t, neg, mask, 0.3, codes), (pred, targ))
    torch.autograd.gradcheck(lambda p, t: impl(p, t, neg, mask, 0.3, None), (pred, targ))
    only_row1 = mask.clone()
    only_row1[[0, 2]] = False
    assert impl(pred, targ, neg, only_row1, 0.1, codes).item() == 0.0


def test_cpp_through_dispatch_and_opcheck():
    _cpp()
    pred, targ, mask, codes, _ = random_inputs()
    neg = sample_negative_indices(mask, 5, generator=torch.Generator().manual_seed(0))
    with uf.backend("cpp"):
        ours = contrastive_loss(pred, targ, neg, mask, 0.1, code_indices=codes)
    torch.testing.assert_close(ours, contrastive_loss_ref(pred, targ, neg, mask, 0.1, codes), rtol=1e-5, atol=1e-4)
    with uf.backend("cpp"), pytest.raises(uf.BackendNotSupportedError, match="float32/float64"):
        contrastive_loss(pred.half(), targ.half(), neg, mask, 0.1)
    rows = mask.reshape(-1).nonzero().squeeze(1)
    args = (pred.view(-1, 16).requires_grad_(), targ.view(-1, 16).requires_grad_(), rows,
            neg.view(-1, 5)[rows].contiguous(), codes.view(-1, 2).contiguous(), 0.1)
    torch.library.opcheck(torch.ops.unispeech_fast.contrastive_loss_fwd, args)


# ---------------------------------------------------------------------------------------------- triton backend
def _triton():
    from unispeech_fast.ops.contrastive_loss.triton import contrastive_loss_triton

    return contrastive_loss_triton


def test_triton_edge_rows_and_dispatch():
    impl = _triton()
    pred, targ, neg, mask, codes = _gradcheck_inputs()
    pred, targ = pred.detach().float(), targ.detach().float()
    ref = _loss_and_grads(contrastive_loss_ref, pred.double(), targ.double(), neg, mask, codes)
    ours = _loss_and_grads(impl, pred, targ, neg, mask, codes)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-6)
    only_row1 = mask.clone()
    only_row1[[0, 2]] = False
    assert impl(pred, targ, neg, only_row1, 0.1, codes).item() == 0.0
    with uf.backend("triton"):
        torch.testing.assert_close(contrastive_loss(pred, targ, neg, mask, 0.1, code_indices=codes),
                                   contrastive_loss_ref(pred, targ, neg, mask, 0.1, codes), rtol=1e-5, atol=1e-5)
        with pytest.raises(uf.BackendNotSupportedError, match="float16/bfloat16/float32"):
            contrastive_loss(pred.double(), targ.double(), neg, mask, 0.1)
        with pytest.raises(uf.BackendNotSupportedError, match="exceeds"):
            big = torch.zeros(1, 2, 1025)
            contrastive_loss(big, big, torch.zeros(1, 2, 1, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool), 0.1)


def test_triton_opcheck():
    _triton()
    pred, targ, mask, codes, _ = random_inputs(frames=9, dim=8)
    neg = sample_negative_indices(mask, 3, generator=torch.Generator().manual_seed(0))
    rows = mask.reshape(-1).nonzero().squeeze(1)
    args = (pred.view(-1, 8).requires_grad_(), targ.view(-1, 8).requires_grad_(), rows,
            neg.view(-1, 3)[rows].contiguous(), codes.view(-1, 2).contiguous(), 0.1)
    torch.library.opcheck(torch.ops.unispeech_fast.triton_contrastive_loss_fwd, args)


def test_feature_width_limit_is_the_kernels_widest_block():
    """The one limit (``ops/contrastive_loss/common.py``, read by the triton backend's reasons without triton) is
    the widest feature block the launcher picks from; the kernels' block choice refuses past it."""
    from unispeech_fast.kernels import contrastive_loss as kern
    from unispeech_fast.ops.contrastive_loss.common import MAX_D

    assert max(kern.BLOCK_DS) == MAX_D and kern.block_d(MAX_D) == MAX_D
    with pytest.raises(ValueError, match="feature width D"):
        kern.block_d(MAX_D + 1)


@pytest.mark.parametrize("dim", [1, 64, 65, 256, 257, 1024])
def test_launch_and_aot_variant_share_one_config(dim):
    """Issue 16 item 8: the launcher launches exactly the AOT variant the spill check compiled (one table,
    ``ROWS_AND_WARPS``, now that the widest block has its own rows and warps; both used to hard-code them)."""
    from unispeech_fast.kernels import contrastive_loss as kern
    from unispeech_fast.ops.contrastive_loss import triton as launcher

    rows = torch.arange(3)
    _, grid, _, _, consts = launcher._launch_args(torch.zeros(3, dim), torch.zeros(3, dim), rows,
                                                  torch.zeros(3, 2, dtype=torch.long), None)
    variants = {v.name: v for v in kern.aot_variants()}
    for kind in ("fwd", "bwd"):
        v = variants[f"contrastive_{kind}_fp32_values_d{consts['BLOCK_D']}"]
        assert {**v.constexprs, "num_warps": v.num_warps, "num_stages": v.num_stages} == consts
    assert grid == (-(-3 // consts["BLOCK_M"]),)
