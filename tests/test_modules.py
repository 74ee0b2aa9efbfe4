"""Module-level behaviour that the parity tests do not isolate: the q/k/v projections."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unispeech_fast import UniSpeechSatConfig
from unispeech_fast.modules import Attention


def _separate_projections(attn: Attention, x: torch.Tensor):
    shape = (*x.shape[:2], attn.num_heads, attn.head_dim)
    return [F.linear(x, p.weight, p.bias).view(shape) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]


def _attention_with_separate_projections(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    q, k, v = _separate_projections(attn, x)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=attn.scaling)
    return attn.out_proj(out.transpose(1, 2).reshape(x.shape))


def test_qkv_projections_match_separate_projections_and_see_every_weight_update():
    attn = Attention(UniSpeechSatConfig(hidden_size=32, num_attention_heads=4)).eval()
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(attn(x)[0], _attention_with_separate_projections(attn, x))
        attn.k_proj.weight.mul_(-2.0)  # in-place update
        attn.v_proj.bias.add_(1.0)
        torch.testing.assert_close(attn(x)[0], _attention_with_separate_projections(attn, x))
    attn.q_proj.weight.data.add_(0.5)  # .data write: no version bump, must still be seen
    with torch.no_grad():
        torch.testing.assert_close(attn(x)[0], _attention_with_separate_projections(attn, x))
    attn.load_state_dict({k: torch.randn_like(v) for k, v in attn.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(attn(x)[0], _attention_with_separate_projections(attn, x))
    assert not [k for k, v in vars(attn).items() if isinstance(v, (torch.Tensor, tuple))], \
        "Attention must keep no derived tensors between calls"


def test_qkv_gradients_reach_each_projection():
    attn = Attention(UniSpeechSatConfig(hidden_size=32, num_attention_heads=4)).eval()  # no dropout
    x = torch.randn(2, 5, 32)
    attn(x)[0].square().sum().backward()
    fused = {n: p.grad.clone() for n, p in attn.named_parameters()}
    attn.zero_grad()
    _attention_with_separate_projections(attn, x).square().sum().backward()
    for name, p in attn.named_parameters():
        torch.testing.assert_close(fused[name], p.grad, msg=name)
