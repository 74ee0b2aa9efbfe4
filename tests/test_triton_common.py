"""What the Triton launchers share (issue 16): one fp32 precision policy for every Triton kernel, read from
``torch.get_float32_matmul_precision()`` at each launch (item 14, README), and a device guard around every
launch (item 12); and the attention grid limit (item 11)."""

from __future__ import annotations

import importlib
import types

import pytest
import torch

from unispeech_fast.kernels import feature_extractor as fe_kernels
from unispeech_fast.ops._triton_common import fp32_dot_precision

# The modules, not the functionals of the same name that unispeech_fast.ops exports.
attention_ops = importlib.import_module("unispeech_fast.ops.attention.triton")
pos_conv_ops = importlib.import_module("unispeech_fast.ops.pos_conv.triton")
gumbel_ops = importlib.import_module("unispeech_fast.ops.gumbel_quantizer.triton")


@pytest.fixture
def matmul_precision():
    saved = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(saved)


def _launcher_choices(dtype, device):
    """What each launcher passes to its kernel for this dtype and device."""
    q = types.SimpleNamespace(dtype=dtype, device=torch.device(device))
    return {
        "attention": "ieee" if attention_ops._ieee(q) else "tf32",
        "feature_extractor": fe_kernels._precision(dtype, torch.device(device)),
        "pos_conv": pos_conv_ops._dot_precision(dtype, torch.device(device)),
        # Its one dot is fp32 in every dtype (gradients upcast, fp32 codebook): the policy decides it alone.
        "gumbel_quantizer": gumbel_ops._dot_precision(torch.device(device)),
    }


@pytest.mark.parametrize("policy,expected", [("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")])
def test_every_triton_launcher_follows_float32_matmul_precision(matmul_precision, policy, expected):
    matmul_precision(policy)
    assert fp32_dot_precision(torch.device("cuda")) == expected
    assert _launcher_choices(torch.float32, "cuda") == dict.fromkeys(
        ("attention", "feature_extractor", "pos_conv", "gumbel_quantizer"), expected)
    # The interpreter computes exact fp32 whatever it is told: CPU tensors always get IEEE.
    assert set(_launcher_choices(torch.float32, "cpu").values()) == {"ieee"}


@pytest.mark.parametrize("policy", ["ieee", "tf32"])
def test_gumbel_backward_launches_its_dot_with_the_policy(monkeypatch, policy):
    """Item 14: the Gumbel logits gradient's fp32 dot used IEEE whatever the policy said. The launch must pass
    what ``fp32_dot_precision`` answers (forced here: on CPU tensors it is always IEEE, and the interpreter
    computes exact fp32 either way)."""
    import unispeech_fast as uf
    from unispeech_fast import dispatch
    from unispeech_fast.kernels import gumbel_quantizer as gumbel_kernels

    kernel = gumbel_kernels._gumbel_bwd_logits_kernel
    launches = []

    class Recording:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(kwargs.get("DOT_PRECISION"))
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(gumbel_kernels, "_gumbel_bwd_logits_kernel", Recording())
    monkeypatch.setattr(gumbel_ops, "fp32_dot_precision", lambda device: policy)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 3, 10, generator=g, requires_grad=True)
    with dispatch.backend("triton"):
        out, perplexity = uf.ops.gumbel_quantizer(logits, torch.randn(1, 10, 4, generator=g), 2, 2.0, True)
    (out.sum() + perplexity).backward()
    assert launches == [policy]
    assert torch.isfinite(logits.grad).all()


def test_cudnn_allow_tf32_no_longer_decides(matmul_precision, monkeypatch):
    """pos_conv used to follow torch.backends.cudnn.allow_tf32 while the others forced IEEE."""
    matmul_precision("highest")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert pos_conv_ops._dot_precision(torch.float32, torch.device("cuda")) == "ieee"


@pytest.mark.parametrize("op", ["feature_extractor", "pos_conv", "gumbel_quantizer", "attention"])
def test_every_triton_launch_runs_under_the_device_guard(op, monkeypatch):
    """Item 12: Triton launches on the current CUDA device, so every launcher enters the tensor's device."""
    import contextlib

    import unispeech_fast as uf
    from unispeech_fast import dispatch
    from unispeech_fast.ops import _triton_common

    module = importlib.import_module(f"unispeech_fast.ops.{op}.triton")
    seen = []

    def recording_guard(device):
        seen.append(torch.device(device))
        return contextlib.nullcontext()

    monkeypatch.setattr(module, "device_guard" if op != "attention" else "_device_guard", recording_guard)
    g = torch.Generator().manual_seed(0)
    with dispatch.backend("triton"):
        if op == "feature_extractor":
            w = [torch.randn(8, 1, 4, generator=g), torch.randn(8, 8, 2, generator=g)]
            uf.ops.feature_extractor(torch.randn(1, 40, generator=g), w, [None, None], [torch.ones(8), None],
                                     [torch.zeros(8), None], [2, 2], "group")
        elif op == "pos_conv":
            x = torch.randn(1, 5, 8, generator=g)
            wg, wv = torch.ones(1, 1, 4), torch.randn(8, 4, 4, generator=g)
            uf.ops.pos_conv(x, wg, wv, torch.zeros(8), 2)
        elif op == "gumbel_quantizer":
            uf.ops.gumbel_quantizer(torch.randn(1, 3, 10, generator=g), torch.randn(1, 10, 4, generator=g), 2, 2.0,
                                    False)
        else:
            q = torch.randn(1, 5, 2, 8, generator=g)
            uf.ops.attention(q, q, q)
    assert seen and set(seen) == {torch.device("cpu")}
    assert isinstance(_triton_common.device_guard("cuda:1"), torch.cuda.device)  # built lazily: no CUDA init


def test_attention_refuses_more_than_65535_batch_heads():
    """Item 11: batch x heads is grid axis 1 of every attention kernel (CUDA limit 65535)."""
    import unispeech_fast as uf
    from unispeech_fast import dispatch

    q = torch.zeros(1, 1, 1, 8).expand(4097, 3, 16, 8)
    with dispatch.backend("triton"), pytest.raises(uf.BackendNotSupportedError, match="at most 65535"):
        uf.ops.attention(q, q, q)
    assert not any("batch * heads" in r for r in attention_ops._triton_reasons(q[:4095], q[:4095], q[:4095]))
