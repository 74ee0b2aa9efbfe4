"""The eager references of the four ops: shapes, algebraic identities and agreement with fp64.

These references are what every kernel will be verified against, so they are pinned here against
independent formulations (torch modules, explicit loops) in fp64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from unispeech_fast.ops import (
    attention,
    attention_ref,
    feature_extractor_ref,
    gumbel_quantizer_ref,
    pos_conv_ref,
)


@pytest.mark.parametrize("norm_type", ["group", "layer"])
@pytest.mark.parametrize("length", [400, 401, 1601, 3217])
def test_feature_extractor_matches_torch_modules(norm_type, length):
    kernels, strides, dims = (10, 3, 2), (5, 2, 2), (7, 5, 3)
    x = torch.randn(2, length, dtype=torch.float64)
    convs, norms = [], []
    c_in = 1
    for i, (k, s, c) in enumerate(zip(kernels, strides, dims)):
        convs.append(torch.nn.Conv1d(c_in, c, k, stride=s, bias=i == 1).double())
        if norm_type == "layer" or i == 0:
            norms.append(torch.nn.GroupNorm(c, c).double() if norm_type == "group" else torch.nn.LayerNorm(c).double())
            torch.nn.init.normal_(norms[-1].weight)
            torch.nn.init.normal_(norms[-1].bias)
        else:
            norms.append(None)
        c_in = c
    h = x[:, None]
    for conv, norm in zip(convs, norms):
        h = conv(h)
        if isinstance(norm, torch.nn.LayerNorm):
            h = norm(h.transpose(1, 2)).transpose(1, 2)
        elif norm is not None:
            h = norm(h)
        h = F.gelu(h)
    got = feature_extractor_ref(
        x, [c.weight for c in convs], [c.bias for c in convs],
        [None if n is None else n.weight for n in norms], [None if n is None else n.bias for n in norms],
        strides, norm_type,
    )
    torch.testing.assert_close(got, h, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kernel,groups,hidden,frames", [(128, 16, 32, 1), (128, 16, 48, 131), (16, 2, 16, 17), (7, 1, 4, 5)])
def test_pos_conv_matches_weight_norm_module(kernel, groups, hidden, frames):
    conv = torch.nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2, groups=groups).double()
    conv = torch.nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
    with torch.no_grad():
        conv.parametrizations.weight.original0.normal_()
    x = torch.randn(3, frames, hidden, dtype=torch.float64)
    y = conv(x.transpose(1, 2))
    if kernel % 2 == 0:
        y = y[:, :, :-1]
    expected = x + F.gelu(y).transpose(1, 2)
    g, v = conv.parametrizations.weight.original0, conv.parametrizations.weight.original1
    got = pos_conv_ref(x, g, v, conv.bias, groups)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    # weight norm: norm over (out, in) per tap
    w = g * v / v.norm(dim=(0, 1), keepdim=True)
    torch.testing.assert_close(conv.weight, w, atol=1e-12, rtol=0)


def _attention_loop(q, k, v, mask, head_mask, scale):
    b, t, h, d = q.shape
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            s = (q[bi, :, hi] @ k[bi, :, hi].T) * scale
            if mask is not None:
                s[:, ~mask[bi]] = float("-inf")
            p = torch.softmax(s, -1) * (1.0 if head_mask is None else head_mask[hi])
            out[bi, :, hi] = p @ v[bi, :, hi]
    return out


@pytest.mark.parametrize("t,h,d", [(1, 1, 8), (13, 2, 16), (67, 3, 64)])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("with_head_mask", [False, True])
def test_attention_ref_and_eager_against_loop(t, h, d, padded, with_head_mask):
    q, k, v = (torch.randn(2, t, h, d, dtype=torch.float64) for _ in range(3))
    mask = None
    if padded:
        mask = torch.ones(2, t, dtype=torch.bool)
        mask[1, max(1, t // 2):] = False
    head_mask = torch.rand(h, dtype=torch.float64) if with_head_mask else None
    expected = _attention_loop(q, k, v, mask, head_mask, d**-0.5)
    ref, _ = attention_ref(q, k, v, mask, head_mask)
    torch.testing.assert_close(ref, expected, atol=1e-12, rtol=0)
    eager, _ = attention(q, k, v, mask, head_mask)  # dispatch -> eager backend (SDPA)
    torch.testing.assert_close(eager, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_eager_error_within_policy(dtype):
    """Tolerance policy baseline: the eager backend's error vs fp64 is within 2x the error of the
    plain-PyTorch reference in the same dtype (outputs and gradients)."""
    q, k, v = (torch.randn(2, 45, 2, 64, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 45, dtype=torch.bool)
    mask[0, 30:] = False
    grad = torch.randn(2, 45, 2, 64, dtype=torch.float64)

    def run(fn, cast):
        qc, kc, vc = (x.detach().to(cast).requires_grad_() for x in (q, k, v))
        out, _ = fn(qc, kc, vc, mask)
        out.backward(grad.to(cast))
        return [out.double(), qc.grad.double(), kc.grad.double(), vc.grad.double()]

    gold = run(attention_ref, torch.float64)
    base = run(attention_ref, dtype)
    ours = run(attention, dtype)
    for g, b, o in zip(gold, base, ours):
        assert (o - g).abs().max() <= 2 * (b - g).abs().max() + 1e-5


def test_gumbel_quantizer_eval_is_codebook_gather():
    g_, v_, d_ = 2, 5, 3
    logits = torch.randn(2, 7, g_ * v_, dtype=torch.float64)
    codebook = torch.randn(1, g_ * v_, d_, dtype=torch.float64)
    q, ppl = gumbel_quantizer_ref(logits, codebook, g_, 2.0, sample=False)
    idx = logits.view(2, 7, g_, v_).argmax(-1)
    expected = torch.cat([codebook[0, gi * v_ + idx[..., gi]] for gi in range(g_)], dim=-1)
    torch.testing.assert_close(q, expected, atol=0, rtol=0)
    counts = torch.stack([torch.bincount(idx[..., gi].flatten(), minlength=v_) for gi in range(g_)]).double()
    p = counts / counts.sum(-1, keepdim=True)
    expected_ppl = torch.exp(-torch.special.xlogy(p, p).sum(-1)).sum()
    torch.testing.assert_close(ppl, expected_ppl)


def test_gumbel_quantizer_training_straight_through():
    logits = torch.randn(1, 9, 2 * 4, requires_grad=True)
    codebook = torch.randn(1, 8, 3, requires_grad=True)
    q, ppl = gumbel_quantizer_ref(logits, codebook, 2, 0.5, sample=True)
    # forward is hard: every output row is exactly one codebook row per group
    rows = codebook[0].detach()
    for part, group in ((q[..., :3], rows[:4]), (q[..., 3:], rows[4:])):
        dist = (part.detach().reshape(-1, 1, 3) - group[None]).abs().sum(-1)
        assert (dist.min(-1).values < 1e-6).all()
    (q.sum() + ppl).backward()
    assert logits.grad.abs().sum() > 0 and codebook.grad.abs().sum() > 0
