"""The feature extractor (conv + bias + norm + exact gelu per layer, forward and backward): its eager reference,
the backends that declare support for a case (``tests/_backends.py``: triton, cpp) against it, then each backend's
own parts (the Triton layer op, the C++ ``conv_norm_gelu_fwd``, the CUDA kernels).

On CPU the Triton kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET), at small
shapes; ``gpu``-marked tests run the real 512-channel config. Tolerance policy: for the output and every
gradient, max |kernel - fp64 reference| <= 2 * max |eager(dtype) - fp64 reference| + a tiny floor.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import unispeech_fast as uf
from unispeech_fast import dispatch
from unispeech_fast.configuration import UniSpeechConfig
from unispeech_fast.modules import FeatureEncoder
from unispeech_fast.ops.feature_extractor import feature_extractor, feature_extractor_ref
from unispeech_fast.ops.feature_extractor.triton import feature_extractor_triton
from unispeech_fast.ops import _extension_ops
from unispeech_fast.ops.feature_extractor import extension as fe_ext
from _backends import declaring, device_for, run_on
from _tolerance import FLOOR, assert_close_cuda as _assert_close, assert_within_2x_eager

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
    """fp64 parameters: per-layer conv weight, conv bias (or None), norm weight/bias (or None).
    ``channels`` is every layer's width, or one width per layer."""
    g = torch.Generator().manual_seed(seed)
    ws, bs, gs, betas = [], [], [], []
    c_in = 1
    widths = [channels] * len(kernels) if isinstance(channels, int) else list(channels)
    for i, (k, channels) in enumerate(zip(kernels, widths, strict=True)):
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


def _check(x, params, strides, norm_type, dtype, backend="triton"):
    ref = _run(feature_extractor_ref, x, params, strides, norm_type, torch.float64)
    eager = _run(feature_extractor_ref, x, params, strides, norm_type, dtype)
    out = _run(run_on(backend, feature_extractor), x, params, strides, norm_type, dtype)
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


def _backend_cases(cases):
    """Each case (its dtype third) once per backend that declares that dtype."""
    return [pytest.param(backend.values[0], *case, id=f"{backend.id}-{'-'.join(map(str, case))}")
            for case in cases for backend in declaring("feature_extractor", case[2])]


# ---------------------------------------------------------------------------------------------- reference
@pytest.mark.parametrize("norm_type", ["group", "layer"])
@pytest.mark.parametrize("length", [400, 401, 1601, 3217])
def test_reference_matches_torch_modules(norm_type, length):
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


# ---------------------------------------------------------------------------------------------- every backend
@pytest.mark.parametrize("backend,norm_type,bias,dtype,frames,extra", _backend_cases(CASES))
def test_matches_fp64_reference_with_grads(backend, norm_type, bias, dtype, frames, extra):
    samples = _samples_for_frames(frames, SMALL_KERNELS, SMALL_STRIDES, extra)
    device = device_for("feature_extractor", backend)
    x = torch.randn(2, samples, dtype=torch.float64).to(device)
    params = _params(8, SMALL_KERNELS, norm_type, bias, device=device)
    _check(x, params, list(SMALL_STRIDES), norm_type, dtype, backend)


@pytest.mark.parametrize("norm_type", ["group", "layer"])
@pytest.mark.parametrize("backend", declaring("feature_extractor", torch.float32))
def test_widths_that_change_per_layer(backend, norm_type):
    """A stack whose layers have different widths (8, 6, 5), all gradients (was test_cpp_ops'
    feature_extractor_grads_small)."""
    device = device_for("feature_extractor", backend)
    x = torch.randn(2, 211, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(device)
    params = _params((8, 6, 5), SMALL_KERNELS, norm_type, True, device=device)
    _check(x, params, list(SMALL_STRIDES), norm_type, torch.float32, backend)


@pytest.mark.parametrize("backend", declaring("feature_extractor", torch.float32))
def test_channels_over_one_block_and_exact_receptive_field(backend):
    """24 channels: two channel tiles on the plain layers, one 32-wide tile for layer norm."""
    device = device_for("feature_extractor", backend)
    x = torch.randn(1, _samples_for_frames(1, SMALL_KERNELS, SMALL_STRIDES), dtype=torch.float64).to(device)
    for norm_type in ("group", "layer"):
        _check(x, _params(24, SMALL_KERNELS, norm_type, True, device=device), list(SMALL_STRIDES), norm_type,
               torch.float32, backend)


# ---------------------------------------------------------------------------------------------- triton


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


def test_cpp_and_cuda_reasons_share_the_argument_rules():
    """Activation, norm type and waveform rank: one rule for the cpp and cuda backends, each naming itself."""
    from unispeech_fast.ops.feature_extractor.extension import _cuda_reasons, _feature_cpp_reasons

    args = (torch.randn(1, 2, 400), [torch.randn(4, 1, 10)], [None], [None], [None], [5], "batch")
    for reasons_of, backend in ((_feature_cpp_reasons, "the C++"), (_cuda_reasons, "the CUDA")):
        text = "\n".join(reasons_of(*args, activation="relu"))
        assert f"{backend} feature extractor fuses exact GELU only, got activation='relu'" in text
        assert "norm_type must be 'group' or 'layer', got 'batch'" in text
        assert "x must be a waveform [batch, samples], got shape (1, 2, 400)" in text


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


def test_layer_norm_channel_limit_is_the_launch_tables():
    """The one limit (``ops/feature_extractor/common.py``, read by the triton backend's reasons without triton) is
    what the GPU launch table of the layer-norm kernels serves, and the reasons refuse just past it."""
    from unispeech_fast.kernels import feature_extractor as kernels
    from unispeech_fast.ops.feature_extractor.common import MAX_LAYER_NORM_CHANNELS

    assert max(kernels._GPU_FWD_LAYER) == MAX_LAYER_NORM_CHANNELS
    assert kernels._layer_norm_block_co(MAX_LAYER_NORM_CHANNELS) in kernels._GPU_FWD_LAYER
    impl = dispatch._REGISTRY["feature_extractor"]["triton"]
    x = torch.randn(1, 400)
    for channels, refused in ((MAX_LAYER_NORM_CHANNELS, False), (MAX_LAYER_NORM_CHANNELS + 1, True)):
        args = dict(x=x, conv_weights=[torch.randn(channels, 1, 10)], conv_biases=[None],
                    norm_weights=[torch.ones(channels)], norm_biases=[torch.zeros(channels)], conv_strides=[5],
                    norm_type="layer")
        reasons = impl.not_supported_reasons(**args)
        assert any(f"at most {MAX_LAYER_NORM_CHANNELS} channels" in r for r in reasons) == refused, reasons


# ---------------------------------------------------------------------------------------------- C++ op (cpp)
OPS = torch.ops.unispeech_fast if _extension_ops.ensure_registered() else None  # fakes + autograd registered


def _assert_fp32_policy(ours, eager32, ref64, what):
    """ours (fp32) against the fp64 reference: the shared rule (tests/_tolerance.py) with fp32's floor."""
    assert_within_2x_eager(what, ours, eager32, ref64, FLOOR[torch.float32])


def _leaves(tensors, dtype):
    return [None if t is None else t.detach().to(dtype).requires_grad_(t.is_floating_point()) for t in tensors]


def _run_with_grads(fn, inputs, grad_out_seed=1):
    out = fn(*inputs)
    g = torch.Generator().manual_seed(grad_out_seed)
    gout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    out.backward(gout)
    return out, [None if t is None else t.grad for t in inputs]


CNG_CASES = [  # batch, C_in, T_in, C_out, kernel, stride, norm_kind
    (2, 1, 10, 8, 10, 5, 2),  # one output frame
    (2, 1, 263, 16, 10, 5, 1),
    (2, 3, 97, 5, 3, 2, 2),
    (1, 7, 130, 11, 2, 2, 0),
    (2, 4, 300, 6, 3, 1, 1),  # several time tiles, stride 1
    (1, 512, 171, 512, 3, 2, 0),
]


def _cng_inputs(b, cin, tin, cout, k, stride, kind, dtype=torch.float32):
    x = torch.randn(b, cin, tin)
    w = torch.randn(cout, cin, k) * (cin * k) ** -0.5
    bias = torch.randn(cout) * 0.1
    nw = 1 + 0.1 * torch.randn(cout) if kind else None
    nb = 0.1 * torch.randn(cout) if kind else None
    return [None if t is None else t.to(dtype) for t in (x, w, bias, nw, nb)]


@pytest.mark.parametrize("case", CNG_CASES, ids=lambda c: "x".join(map(str, c)))
def test_cpp_conv_norm_gelu_matches_reference(case):
    *_, stride, kind = case
    inputs = _cng_inputs(*case)

    def run(fn, dtype):
        leaves = _leaves(inputs, dtype)
        return _run_with_grads(lambda *a: fn(*a, stride, kind, 1e-5), leaves)

    def ours_fn(*a):
        return OPS.conv_norm_gelu_fwd(*a)

    ours, ours_g = run(ours_fn, torch.float32)
    eager, eager_g = run(fe_ext.conv_norm_gelu_eager, torch.float32)
    ref, ref_g = run(fe_ext.conv_norm_gelu_eager, torch.float64)
    _assert_fp32_policy(ours, eager, ref, "out")
    for name, o, e, r in zip(("x", "weight", "bias", "norm_weight", "norm_bias"), ours_g, eager_g, ref_g):
        if r is not None:
            _assert_fp32_policy(o, e, r, f"grad {name}")
    ours64 = OPS.conv_norm_gelu_fwd(*[None if t is None else t.double() for t in inputs], stride, kind, 1e-5)
    torch.testing.assert_close(ours64, ref.detach(), rtol=1e-10, atol=1e-10)


def _stack_params(norm_type, channels, kernels, dtype=torch.float32):
    ws, bs, nws, nbs = [], [], [], []
    cin = 1
    for i, (c, k) in enumerate(zip(channels, kernels)):
        ws.append(torch.randn(c, cin, k, dtype=dtype) * (cin * k) ** -0.5)
        bs.append(torch.randn(c, dtype=dtype) * 0.1)
        has_norm = norm_type == "layer" or i == 0
        nws.append(1 + 0.1 * torch.randn(c, dtype=dtype) if has_norm else None)
        nbs.append(0.1 * torch.randn(c, dtype=dtype) if has_norm else None)
        cin = c
    return ws, bs, nws, nbs


@pytest.mark.parametrize("norm_type", ["group", "layer"])
@pytest.mark.parametrize("backend", declaring("feature_extractor", torch.float32, cpu_kernels_only=True))
def test_real_size_on_cpu_kernels(backend, norm_type):
    """transformers' default stack (512 channels, kernels 10,3,3,3,3,2,2, strides 5,2,...) on 1 s of audio."""
    kernels, strides = (10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2)
    params = _stack_params(norm_type, (512,) * 7, kernels)
    x = torch.randn(1, 16000)
    ours = run_on(backend, feature_extractor)(x, *params, strides, norm_type)
    eager = feature_extractor_ref(x, *params, strides, norm_type)
    params64 = [[None if t is None else t.double() for t in p] for p in params]
    ref = feature_extractor_ref(x.double(), *params64, strides, norm_type)
    assert ours.shape == ref.shape == (1, 512, 49)
    _assert_fp32_policy(ours, eager, ref, "features")


def test_cpp_op_bad_inputs_name_the_argument():
    wave = torch.randn(1, 1, 50)
    with pytest.raises(RuntimeError, match="norm_weight and norm_bias are required"):
        OPS.conv_norm_gelu_fwd(wave, torch.randn(4, 1, 10), None, None, None, 5, 1, 1e-5)
    with pytest.raises(RuntimeError, match="fewer than the kernel size"):
        OPS.conv_norm_gelu_fwd(wave[..., :5], torch.randn(4, 1, 10), None, None, None, 5, 0, 1e-5)
    with pytest.raises(RuntimeError, match="x must have 3 dims"):
        OPS.conv_norm_gelu_fwd(wave[0], torch.randn(4, 1, 10), None, None, None, 5, 0, 1e-5)
    with pytest.raises(RuntimeError, match="norm_kind must be"):
        OPS.conv_norm_gelu_fwd(wave, torch.randn(4, 1, 10), None, None, None, 5, 3, 1e-5)


def _cpp_opcheck_cases():
    wave, wc = torch.randn(2, 3, 40), torch.randn(5, 3, 3)
    n1, n2 = torch.rand(5) + 0.5, torch.randn(5)
    return [
        (wave.requires_grad_(), wc.requires_grad_(), None, n1, n2, 2, 1, 1e-5),
        (wave.detach(), wc.detach(), torch.randn(5), n1, n2, 1, 2, 1e-5),
    ]


@pytest.mark.parametrize("case", range(2))
def test_cpp_opcheck(case):
    assert _extension_ops.ensure_registered()
    torch.library.opcheck(OPS.conv_norm_gelu_fwd.default, _cpp_opcheck_cases()[case])


# ---------------------------------------------------------------------------------------------- CUDA (cuda)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _cuda_reasons(*args, **kwargs):
    """The cuda backend's reasons as registered: the base check of its declared capabilities plus its own."""
    return dispatch._REGISTRY["feature_extractor"]["cuda"].not_supported_reasons(*args, **kwargs)


def test_cuda_is_registered():
    assert "cuda" in dispatch.implemented_backends()["feature_extractor"]


def test_cuda_shared_memory_limit_follows_the_kernel_formula():
    """Issue 16 item 9: the reasons refuse layer-0 shapes whose shared memory exceeds the device's opt-in
    limit (A100 163 KiB, H100 227 KiB) instead of letting the launch crash; the real sizes fit."""
    a100, h100 = 163 * 1024, 227 * 1024
    # UniSpeech layer 0: 512 channels, K = 10, stride 5, group norm (base) or layer norm (large).
    assert fe_ext.layer0_smem_bytes(512, 10, 5, "group") == 4 * (1023 * 5 + 10 + 16 * 10 + 48)
    assert fe_ext.layer0_smem_bytes(512, 10, 5, "layer") == 4 * (31 * 5 + 10 + 512 * 13 + 768 + 64)
    for norm in ("group", "layer", None):
        assert fe_ext.layer0_smem_reasons((512, 1, 10), 5, norm, a100) == []
    # What the old fixed limits (K <= 64, C_out <= 2048) admitted: about 550 KB in the frames kernel.
    (reason,) = fe_ext.layer0_smem_reasons((2048, 1, 64), 5, "layer", h100)
    assert "needs 553068 bytes of shared memory" in reason and f"allows {h100}" in reason
    assert fe_ext.layer0_smem_reasons((2048, 1, 64), 5, "group", a100) == []  # group kernels: 16 channels a block
    assert fe_ext.layer0_smem_reasons((512, 1, 10), 64, "group", a100)  # 1023 * 64 samples per chunk


def _fmaf(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fp32 fused multiply-add: the fp64 product of two fp32 values is exact, one rounding to fp32 after the add
    (double rounding differs from a true fmaf in rare ties only)."""
    return (a.double() * b.double() + c.double()).float()


def test_cuda_group_norm_apply_recomputes_the_statistics_value_in_fp32():
    """Issue 16 item 2 on CPU: an fp32 emulation of ``gn_stats``/``gn_apply`` at one output frame (variance 0,
    so rstd = 1/sqrt(eps) amplifies any rounding difference). Recomputing the conv from the bias, as the
    statistics pass does, gives exactly the fp64 reference's normalised value 0; the old apply (conv from 0,
    ``(bias - mean) * s`` folded into the shift) is off by about 1e-4 against a bound near 1e-7."""
    g = torch.Generator().manual_seed(0)
    channels, kernel, eps = 512, 10, 1e-5
    x = torch.randn(kernel, generator=g)  # 10 samples, K = 10, stride 5: one output frame
    w = torch.randn(channels, kernel, generator=g) * 0.4
    bias = torch.randn(channels, generator=g) * 0.1
    gamma, beta = 1 + 0.2 * torch.randn(channels, generator=g), 0.1 * torch.randn(channels, generator=g)

    def conv_at(start):  # the kernel's conv_at: acc = start, then fmaf(w[k], x[k], acc) for k in order
        acc = start.clone()
        for k in range(kernel):
            acc = _fmaf(w[:, k], x[k].expand(channels), acc)
        return acc

    mean = conv_at(bias)  # Welford over one frame: mean = the value, M2 = 0
    s = torch.rsqrt(torch.tensor(eps, dtype=torch.float32)) * gamma
    new = (conv_at(bias) - mean) * s + beta
    old = _fmaf(conv_at(torch.zeros(channels)), s, (bias - mean) * s + beta)
    h = (w.double() @ x.double()) + bias.double()  # the fp64 reference: GroupNorm of one frame is 0 * rstd
    ref = (h - h) * torch.rsqrt(torch.tensor(eps, dtype=torch.float64)) * gamma.double() + beta.double()
    assert (new.double() - ref).abs().max().item() == 0.0
    assert (old.double() - ref).abs().max().item() > 1e-6  # what the GPU test saw (about 1e-4)


def test_cuda_reasons_on_cpu():
    x = torch.randn(2, 400, requires_grad=True)
    weights = [torch.randn(8, 1, 10), torch.randn(8, 8, 3)]
    reasons = _cuda_reasons(
        x, weights, [None, None], [torch.ones(8), None], [torch.zeros(8), None], [5, 2], "group", activation="relu"
    )
    text = "\n".join(reasons)
    assert "x must be a CUDA tensor, got cpu" in text
    assert "exact GELU only" in text and "relu" in text
    assert "no backward" in text
    with torch.no_grad():
        quiet = _cuda_reasons(
            x, weights, [None, None], [torch.ones(8), None], [torch.zeros(8), None], [5, 2], "group"
        )
    assert not any("no backward" in r or "GELU" in r for r in quiet)


def test_cuda_reasons_layer0_shape_and_norm():
    x = torch.randn(2, 400)
    reasons = _cuda_reasons(
        x, [torch.randn(8, 2, 10)], [None], [torch.ones(8)], [None], [5], "layer"
    )
    assert any("layer 0 weight must be [C_out, 1, K]" in r for r in reasons)
    assert any("both be given or both be None" in r for r in reasons)


def test_auto_never_picks_cuda_on_cpu():
    x = torch.randn(1, 50)
    ws, bs, gs, betas = [torch.randn(4, 1, 10)], [None], [None], [None]
    inputs = dict(x=x, conv_weights=ws, conv_biases=bs, norm_weights=gs, norm_biases=betas, conv_strides=[5],
                  norm_type="group", activation="gelu", eps=1e-5)
    assert dispatch.select("feature_extractor", inputs).backend != "cuda"
    out = feature_extractor(x, ws, bs, gs, betas, [5], "group")
    torch.testing.assert_close(out, feature_extractor_ref(x, ws, bs, gs, betas, [5], "group"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_kind", [0, 1, 2])
@pytest.mark.parametrize("samples,channels", [(10, 37), (11, 512), (403, 37), (5 * 2100 + 13, 512)])
def test_cuda_conv_norm_gelu_layer0(cuda_ops, dtype, norm_kind, samples, channels):
    batch = 2
    x = torch.randn(batch, samples, device="cuda", dtype=dtype)
    w = (torch.randn(channels, 1, 10, device="cuda") * 0.4).to(dtype)
    b = (torch.randn(channels, device="cuda") * 0.1).to(dtype)
    gamma = (1 + 0.2 * torch.randn(channels, device="cuda")).to(dtype) if norm_kind else None
    beta = (0.1 * torch.randn(channels, device="cuda")).to(dtype) if norm_kind else None
    norm_type = "layer" if norm_kind == 2 else "group"

    def run_ref(t):
        cast = (lambda a: None if a is None else a.to(t))
        return feature_extractor_ref(x.to(t), [w.to(t)], [b.to(t)], [cast(gamma)], [cast(beta)], [5], norm_type)

    out = cuda_ops.conv_norm_gelu_fwd(x[:, None], w, b, gamma, beta, 5, norm_kind, 1e-5)
    assert out.dtype == dtype
    _assert_close(f"conv_norm_gelu kind {norm_kind}", out, run_ref(dtype), run_ref(torch.float64))


@pytest.mark.gpu
def test_cuda_conv_norm_gelu_large_offset_statistics(cuda_ops):
    """GroupNorm statistics over a long axis with a large mean (catastrophic cancellation check)."""
    x = torch.randn(1, 5 * 6000 + 5, device="cuda") + 50.0
    w = torch.full((4, 1, 10), 0.1, device="cuda") + 0.01 * torch.randn(4, 1, 10, device="cuda")
    gamma, beta = torch.ones(4, device="cuda"), torch.zeros(4, device="cuda")
    out = cuda_ops.conv_norm_gelu_fwd(x[:, None], w, None, gamma, beta, 5, 1, 1e-5)
    ref = feature_extractor_ref(x.double(), [w.double()], [None], [gamma.double()], [beta.double()], [5], "group")
    eager = feature_extractor_ref(x, [w], [None], [gamma], [beta], [5], "group")
    _assert_close("conv_norm_gelu (offset)", out, eager, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("norm_type", ["group", "layer"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_backend(norm_type, dtype):
    torch.manual_seed(1)
    dims, kernels, strides = [32, 32, 32], [10, 3, 2], [5, 2, 2]
    ws, bs, gs, betas, c_in = [], [], [], [], 1
    for i, (c, k) in enumerate(zip(dims, kernels)):
        ws.append((torch.randn(c, c_in, k, device="cuda") / (c_in * k) ** 0.5).to(dtype))
        bs.append(None)
        with_norm = norm_type == "layer" or i == 0
        gs.append((1 + 0.1 * torch.randn(c, device="cuda")).to(dtype) if with_norm else None)
        betas.append((0.1 * torch.randn(c, device="cuda")).to(dtype) if with_norm else None)
        c_in = c
    x = torch.randn(3, 1601, device="cuda", dtype=dtype)
    with torch.no_grad(), dispatch.backend("cuda"):
        out = feature_extractor(x, ws, bs, gs, betas, strides, norm_type)
    to64 = (lambda ts: [None if t is None else t.double() for t in ts])
    ref = feature_extractor_ref(x.double(), to64(ws), bs, to64(gs), to64(betas), strides, norm_type)
    eager = feature_extractor_ref(x, ws, bs, gs, betas, strides, norm_type)
    _assert_close(f"feature_extractor ({norm_type})", out, eager, ref)


@pytest.mark.gpu
def test_cuda_conv_norm_gelu_refuses_multichannel_input(cuda_ops):
    x = torch.randn(1, 2, 100, device="cuda")
    with pytest.raises(RuntimeError, match="one input channel"):
        cuda_ops.conv_norm_gelu_fwd(x, torch.randn(4, 2, 10, device="cuda"), None, None, None, 5, 0, 1e-5)
