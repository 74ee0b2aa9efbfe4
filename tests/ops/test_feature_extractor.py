"""The Triton feature extractor (fused implicit-GEMM conv + bias + norm + exact gelu, forward and backward).

On CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET), at small
shapes; ``gpu``-marked tests run the real 512-channel config. Tolerance policy: for the output and every
gradient, max |triton - fp64 reference| <= 2 * max |eager(dtype) - fp64 reference| + a tiny floor.
"""

from __future__ import annotations

import pytest
import torch

import unispeech_fast as uf
from unispeech_fast import dispatch
from unispeech_fast.configuration import UniSpeechConfig
from unispeech_fast.modules import FeatureEncoder
from unispeech_fast.ops.feature_extractor import feature_extractor, feature_extractor_ref
from unispeech_fast.ops.feature_extractor.triton import feature_extractor_triton
from _tolerance import FLOOR, assert_within_2x_eager

SMALL_KERNELS, SMALL_STRIDES = (10, 3, 2), (5, 2, 2)  # receptive field 30 samples, hop 20
REAL_KERNELS, REAL_STRIDES = (10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2)
COMPILE_BACKEND = "inductor"  # the default torch.compile backend


def _samples_for_frames(frames: int, kernels, strides, extra: int = 0) -> int:
    rf, hop = 1, 1
    for k, s in zip(kernels, strides):
        rf += (k - 1) * hop
        hop *= s
    return rf + (frames - 1) * hop + extra


def _params(channels, kernels, norm_type, bias, seed=0, device="cpu"):
    """fp64 parameters: per-layer conv weight, conv bias (or None), norm weight/bias (or None)."""
    g = torch.Generator().manual_seed(seed)
    ws, bs, gs, betas = [], [], [], []
    c_in = 1
    for i, k in enumerate(kernels):
        ws.append(torch.randn(channels, c_in, k, generator=g, dtype=torch.float64) / (c_in * k) ** 0.5)
        bs.append(0.2 * torch.randn(channels, generator=g, dtype=torch.float64) if bias else None)
        has_norm = norm_type == "layer" or i == 0
        gs.append(1 + 0.2 * torch.randn(channels, generator=g, dtype=torch.float64) if has_norm else None)
        betas.append(0.2 * torch.randn(channels, generator=g, dtype=torch.float64) if has_norm else None)
        c_in = channels
    return [[None if t is None else t.to(device) for t in group] for group in (ws, bs, gs, betas)]


def _run(fn, x, params, strides, norm_type, dtype, grad_seed=1):
    """Output and grads of x and of every non-None parameter, for inputs cast to ``dtype``."""
    leaves = [x.to(dtype).detach().requires_grad_()]
    groups = []
    for group in params:
        cast = []
        for t in group:
            if t is None:
                cast.append(None)
            else:
                leaf = t.to(dtype).detach().requires_grad_()
                leaves.append(leaf)
                cast.append(leaf)
        groups.append(cast)
    y = fn(leaves[0], *groups, strides, norm_type)
    gen = torch.Generator(device=y.device).manual_seed(grad_seed)
    gy = torch.randn(y.shape, generator=gen, device=y.device, dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(y, leaves, gy)
    return [y.detach()] + [g.detach() for g in grads]


def _triton(*args):
    with uf.backend("triton"):
        return feature_extractor(*args)


def _check(x, params, strides, norm_type, dtype):
    ref = _run(feature_extractor_ref, x, params, strides, norm_type, torch.float64)
    eager = _run(feature_extractor_ref, x, params, strides, norm_type, dtype)
    out = _run(_triton, x, params, strides, norm_type, dtype)
    names = ["output", "grad x"] + [f"grad param {i}" for i in range(len(ref) - 2)]
    for name, r, e, o in zip(names, ref, eager, out):
        assert o.dtype == e.dtype, name
        assert_within_2x_eager(name, o, e, r, FLOOR[dtype])


CASES = [  # (norm_type, bias, dtype, frames, extra samples)
    ("group", True, torch.float32, 17, 3),
    ("group", False, torch.float16, 7, 0),
    ("group", True, torch.float16, 1, 0),
    ("group", False, torch.float32, 1, 19),
    ("layer", True, torch.float16, 17, 3),
    ("layer", False, torch.float32, 7, 11),
    ("layer", True, torch.float32, 1, 0),
    ("layer", False, torch.float16, 13, 0),
]


@pytest.mark.parametrize("norm_type,bias,dtype,frames,extra", CASES)
def test_matches_fp64_reference_with_grads(norm_type, bias, dtype, frames, extra):
    samples = _samples_for_frames(frames, SMALL_KERNELS, SMALL_STRIDES, extra)
    x = torch.randn(2, samples, dtype=torch.float64)
    params = _params(8, SMALL_KERNELS, norm_type, bias)
    _check(x, params, list(SMALL_STRIDES), norm_type, dtype)


def test_channels_over_one_block_and_exact_receptive_field():
    """24 channels: two channel tiles on the plain layers, one 32-wide tile for layer norm."""
    x = torch.randn(1, _samples_for_frames(1, SMALL_KERNELS, SMALL_STRIDES), dtype=torch.float64)
    for norm_type in ("group", "layer"):
        _check(x, _params(24, SMALL_KERNELS, norm_type, True), list(SMALL_STRIDES), norm_type, torch.float32)


def test_group_norm_statistics_survive_a_large_offset():
    """Chan-combined per-tile (mean, M2): a DC offset of 3000 with unit noise keeps fp32 accuracy
    (sum / sum-of-squares in fp32 would lose the variance to cancellation)."""
    from unispeech_fast.kernels import feature_extractor as kernels

    g = torch.Generator().manual_seed(3)
    x = 3000.0 + torch.randn(2, 1, 5 * 200 + 5, generator=g, dtype=torch.float64)
    w = torch.randn(8, 1, 10, generator=g, dtype=torch.float64) / 3
    gamma, beta = torch.ones(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    z = torch.nn.functional.conv1d(x, w, stride=5)
    var, mean = torch.var_mean(z, dim=-1, unbiased=False)
    y_ref = torch.nn.functional.gelu(torch.nn.functional.group_norm(z, 8, gamma, beta, 1e-5))
    y, m, rstd = kernels.layer_forward(x.float(), w.float(), None, gamma.float(), beta.float(), 5, kernels.NORM_GROUP, 1e-5)
    assert torch.allclose(m.double(), mean, rtol=1e-6, atol=1e-4)
    assert torch.allclose(rstd.double(), (var + 1e-5).rsqrt(), rtol=2e-3)
    # The per-channel std here is ~1 on values of ~1e3 (conv of 300 + noise); fp32 z itself is only
    # accurate to ~1e-4, so the normalised output carries that error.
    assert (y.double() - y_ref).abs().max().item() < 2e-3


def test_opcheck_layer_op():
    op = torch.ops.unispeech_fast.triton_feature_extractor_layer.default
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 45, generator=g)
    w1 = torch.randn(8, 1, 10, generator=g, requires_grad=True)
    b = torch.randn(8, generator=g, requires_grad=True)
    gamma, beta = torch.ones(8, requires_grad=True), torch.zeros(8, requires_grad=True)
    torch.library.opcheck(op, (x.requires_grad_(), w1, b, gamma, beta, 5, 2, 1e-5))
    h = torch.randn(1, 8, 9, generator=g, requires_grad=True)
    w2 = torch.randn(8, 8, 3, generator=g, requires_grad=True)
    # (aot_dispatch_dynamic for this variant is covered by the torch.compile test below)
    torch.library.opcheck(op, (h, w2, None, gamma, beta, 2, 1, 1e-5),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_torch_compile_fullgraph_equals_eager():
    x = torch.randn(2, _samples_for_frames(5, SMALL_KERNELS, SMALL_STRIDES), dtype=torch.float64)
    ws, bs, gs, betas = [[None if t is None else t.float() for t in group]
                         for group in _params(8, SMALL_KERNELS, "layer", True)]

    def fn(x):
        return torch.ops.unispeech_fast.triton_feature_extractor_layer(x[:, None], ws[0], bs[0], gs[0], betas[0],
                                                                      5, 1, 1e-5)[0]

    compiled = torch.compile(fn, fullgraph=True, backend=COMPILE_BACKEND)
    xf = x.float()
    torch.testing.assert_close(compiled(xf), fn(xf), rtol=0, atol=0)

    def stack(x):  # the registered triton dispatch function (dynamo does not trace the backend ContextVar)
        return feature_extractor_triton(x, ws, bs, gs, betas, list(SMALL_STRIDES), "layer")

    xg = xf.clone().requires_grad_()
    y_eager = stack(xg)
    (gx_eager,) = torch.autograd.grad(y_eager.square().sum(), xg)
    xg2 = xf.clone().requires_grad_()
    y_comp = torch.compile(stack, fullgraph=True, backend=COMPILE_BACKEND)(xg2)
    (gx_comp,) = torch.autograd.grad(y_comp.square().sum(), xg2)
    torch.testing.assert_close(y_comp, y_eager, rtol=0, atol=0)
    torch.testing.assert_close(gx_comp, gx_eager, rtol=0, atol=0)


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_feature_encoder_under_triton_backend_equals_eager(norm):
    config = UniSpeechConfig(conv_dim=(16, 16, 16), conv_stride=(4, 4, 4), conv_kernel=(8, 8, 8),
                             feat_extract_norm=norm, conv_bias=(norm == "layer"))
    torch.manual_seed(0)
    enc = FeatureEncoder(config).train()
    x = torch.randn(2, 148 + 64 * 4 + 7)  # receptive field 148, hop 64: 5 frames
    y_eager = enc(x)
    grads_eager = torch.autograd.grad(y_eager.square().sum(), list(enc.parameters()))
    with uf.backend("triton"):
        y = enc(x)
    grads = torch.autograd.grad(y.square().sum(), list(enc.parameters()))
    torch.testing.assert_close(y, y_eager, rtol=1e-4, atol=1e-5)
    for g, ge in zip(grads, grads_eager):
        torch.testing.assert_close(g, ge, rtol=1e-4, atol=1e-4)


def test_not_supported_reasons_name_the_problem():
    x = torch.randn(1, 100)
    ws, bs, gs, betas = [[None if t is None else t.float() for t in group]
                         for group in _params(8, SMALL_KERNELS, "group", True)]
    impl = dispatch._REGISTRY["feature_extractor"]["triton"]
    base = dict(x=x, conv_weights=ws, conv_biases=bs, norm_weights=gs, norm_biases=betas,
                conv_strides=list(SMALL_STRIDES), norm_type="group")
    assert impl.not_supported_reasons(**base) == []
    assert any("gelu" in r for r in impl.not_supported_reasons(**{**base, "activation": "relu"}))
    assert any("float64" in r for r in impl.not_supported_reasons(**{**base, "x": x.double()}))
    assert any("receptive field" in r for r in impl.not_supported_reasons(**{**base, "x": torch.randn(1, 29)}))
    assert any("bfloat16" in r for r in impl.not_supported_reasons(**{**base, "x": x.bfloat16()}))
    with uf.backend("triton"), pytest.raises(uf.BackendNotSupportedError, match="gelu"):
        feature_extractor(**{**base, "activation": "relu"})


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm_type", ["group", "layer"])
@pytest.mark.parametrize("seconds", [1, 10])
def test_real_config_on_gpu(dtype, norm_type, seconds):
    x = torch.randn(2, 16000 * seconds + 37, dtype=torch.float64, device="cuda")
    params = _params(512, REAL_KERNELS, norm_type, norm_type == "layer", device="cuda")
    _check(x, params, list(REAL_STRIDES), norm_type, dtype)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("norm_type", ["layer", "group"])
def test_layer0_beyond_22_minutes_gpu(norm_type):
    """Past about 22 minutes in one row, layer 0's output [B, 512, T] has a batch stride above 2^31 (Triton
    specialises it as int64) and element offsets past 2^31: 2 x 22.4 minutes, fp16, inference. The last
    frames of row 1 (the offsets furthest past 2^31) and the first of row 0 are checked against fp64 with
    the 2x-eager policy."""
    frames = 4_300_000
    x = torch.randn(2, 5 * frames + 5, device="cuda", dtype=torch.float16)
    ws, bs, gs, betas = (list(g) for g in _params(512, (10,), norm_type, True, device="cuda"))
    with torch.no_grad(), uf.backend("triton"):
        got = feature_extractor(x, [w.half() for w in ws], [b.half() for b in bs], [g.half() for g in gs],
                                [b.half() for b in betas], [5], norm_type)
    assert got.shape == (2, 512, frames + 1) and got.stride(0) > 2**31
    for row, window in ((1, slice(-2000, None)), (0, slice(0, 2000))):
        def ref(dtype):
            # Layer norm is per frame: a slice of the input suffices. Group norm needs the whole row's statistics.
            xs = x[row:row + 1].to(dtype)
            cast = [[t.to(dtype) for t in group] for group in (ws, bs, gs, betas)]
            with torch.no_grad():
                return feature_extractor_ref(xs, *cast, [5], norm_type)[..., window]
        assert_within_2x_eager(f"row {row} ({norm_type})", got[row:row + 1, :, window], ref(torch.float16),
                               ref(torch.float64), floor_eps=2.0, scale="ref+1")


def test_strided_waveform_and_no_grad():
    """A non-contiguous waveform view is read through its strides; no-grad calls save nothing."""
    ws, bs, gs, betas = [[None if t is None else t.float() for t in group]
                         for group in _params(8, SMALL_KERNELS, "group", True)]
    wide = torch.randn(2, 2 * _samples_for_frames(3, SMALL_KERNELS, SMALL_STRIDES))
    x = wide[:, ::2]
    with torch.no_grad():
        y = feature_extractor_triton(x, ws, bs, gs, betas, list(SMALL_STRIDES), "group")
    y_ref = feature_extractor_ref(x.contiguous(), ws, bs, gs, betas, list(SMALL_STRIDES), "group")
    assert y.grad_fn is None
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)


def test_aot_variants_cover_the_gpu_launch_table(monkeypatch):
    """Every forward/backward-norm config the GPU launcher picks (per dtype: fp32 has its own, non-spilling
    settings) is an AOT variant, so the CPU compile check covers what a GPU would launch; and the int64
    batch-stride forward variants exist for the layer-0 shapes."""
    from unispeech_fast.kernels import feature_extractor as kernels

    monkeypatch.setattr(kernels, "_interpreting", lambda: False)
    variants = kernels.aot_variants()
    seen = {(v.name.split("_fp")[0].split("_bf")[0], v.signature.get("X"), v.constexprs.get("NORM"),
             tuple(sorted((k, c) for k, c in v.constexprs.items() if k.startswith("BLOCK"))), v.num_warps,
             v.num_stages, v.signature.get("stride_yb")) for v in variants}
    ptr = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    for dtype in ptr:
        for norm, kernel_norms in ((kernels.NORM_NONE, [0]), (kernels.NORM_GROUP, [2, 3]), (kernels.NORM_LAYER, [1])):
            for c_out in (37, 100, 200, 512):
                cfg = kernels._fwd_blocks(norm, c_out, dtype)
                blocks = tuple(sorted((k, c) for k, c in cfg.items() if k.startswith("BLOCK")))
                for kn in kernel_norms:
                    for stride_yb in ("i32", "i64"):
                        if stride_yb == "i64" and norm == kernels.NORM_LAYER and c_out != 512:
                            continue
                        key = ("fe_layer_fwd", ptr[dtype], kn, blocks, cfg["num_warps"], cfg["num_stages"], stride_yb)
                        assert key in seen, key
                    # The norm backward launches its own (non-spilling) blocks: those are variants too.
                    bwd = kernels._bwd_norm_blocks(norm, c_out, dtype)
                    bwd_blocks = tuple(sorted((k, c) for k, c in bwd.items() if k.startswith("BLOCK")))
                    key = ("fe_layer_bwd_norm", ptr[dtype], kn, bwd_blocks, bwd["num_warps"], bwd["num_stages"], None)
                    assert key in seen, key
        for name, x_ptr, cfg in (("conv_bwd_weight", ptr[dtype], kernels._bwd_weight_blocks(dtype)),
                                 ("conv_bwd_input", None, kernels._bwd_input_blocks(dtype))):
            blocks = tuple(sorted((k, c) for k, c in cfg.items() if k.startswith("BLOCK")))
            assert (name, x_ptr, None, blocks, cfg["num_warps"], cfg["num_stages"], None) in seen, (name, dtype)
    fp32 = kernels._fwd_blocks(kernels.NORM_LAYER, 512, torch.float32)
    assert fp32["num_stages"] == 1 and fp32["BLOCK_J"] == 16


@pytest.mark.parametrize("kind", ["NONE", "GROUP", "LAYER"])
def test_every_backend_reads_the_norm_codes_alike(kind):
    """Issue 15: one table of norm codes (``NormKind``) for every backend. The C++ op ``conv_norm_gelu_fwd``,
    the Triton layer op, the Triton launcher and the eager recompute of the C++ backward each read a code as
    the same norm as the eager reference's ``norm_type``; before, Triton read 1 as layer norm and C++ as group norm."""
    from unispeech_fast.kernels import feature_extractor as kernels
    from unispeech_fast.ops import _extension_ops
    from unispeech_fast.ops.feature_extractor.common import NormKind
    from unispeech_fast.ops.feature_extractor.extension import conv_norm_gelu_eager

    code = NormKind[kind]
    assert (kernels.NORM_NONE, kernels.NORM_GROUP, kernels.NORM_LAYER) == (NormKind.NONE, NormKind.GROUP,
                                                                             NormKind.LAYER)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 64, generator=g)
    w, b = torch.randn(6, 1, 4, generator=g), torch.randn(6, generator=g)
    gamma = beta = None
    if code != NormKind.NONE:
        gamma, beta = 1 + 0.2 * torch.randn(6, generator=g), 0.1 * torch.randn(6, generator=g)
    norm_type = "layer" if code == NormKind.LAYER else "group"
    assert NormKind.of(norm_type, gamma is not None) == code
    ref = feature_extractor_ref(x[:, 0], [w], [b], [gamma], [beta], [2], norm_type)
    outs = {
        "eager recompute": conv_norm_gelu_eager(x, w, b, gamma, beta, 2, int(code), 1e-5),
        "triton op": torch.ops.unispeech_fast.triton_feature_extractor_layer(x, w, b, gamma, beta, 2, int(code),
                                                                            1e-5)[0],
    }
    assert _extension_ops.ensure_registered(), "the C++ extension is not built"
    outs["cpp op"] = torch.ops.unispeech_fast.conv_norm_gelu_fwd(x, w, b, gamma, beta, 2, int(code), 1e-5)
    for name, out in outs.items():
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} ({kind}): {m}")


def test_declared_limits_agree_with_the_kernels():
    """The limits the triton backend declares (without importing triton) are the kernels' own."""
    from unispeech_fast.kernels import feature_extractor as kernels
    from unispeech_fast.ops.feature_extractor import triton as backend

    assert backend.MAX_LAYER_NORM_CHANNELS == kernels.MAX_LAYER_NORM_CHANNELS
