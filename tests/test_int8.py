"""The int8 (W8A8) path: each int8 layer against an independent fp64 simulation of the stated quantisation, the
quantised SD1 UNet against fp32 (beside bf16's error), the pipeline method, ``generate`` and the CLI flag.

The simulation quantises with the rules the module states (weights per output channel, symmetric, |q| <= QMAX;
activations per tensor, asymmetric uint8 over a range containing 0), multiplies the integers in int64 and
dequantises in fp64. Where the kernel and the simulation may differ is stated with each tolerance: an activation
that lies within fp32 rounding of a half-way point may round to the other integer (the kernel scales in fp32),
and the dequantised output is rounded to fp32 (or bf16) once.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastdiff._argtypes import InvalidArgument
from fastdiff.ops import Conv2d, Linear
from fastdiff.quant import int8 as q8

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.onednn, "qconv2d_pointwise"),
                                reason="torch without oneDNN's int8 ops")


# ------------------------------------------------------------------------------------------ the fp64 simulation
def _sim_weight(w: torch.Tensor, qmax: int):
    w64 = w.detach().double()
    amax = w64.flatten(1).abs().amax(1)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    q = torch.round(w64 / scale.view(-1, *([1] * (w.dim() - 1)))).clamp(-qmax, qmax).long()
    return q, scale


def _sim_activation(x: torch.Tensor):
    """(integers - zero point as int64, scale, the elements whose x/scale is within fp32 rounding of a tie)."""
    x64 = x.detach().double()
    lo, hi = min(float(x64.min()), 0.0), max(float(x64.max()), 0.0)
    scale = (hi - lo) / 255.0
    zp = min(255, max(0, round(-lo / scale)))
    r = x64 / scale
    q = (torch.round(r) + zp).clamp(0, 255).long()
    near_tie = ((r - torch.floor(r)) - 0.5).abs() < 1e-5 * (1 + r.abs())
    return q - zp, scale, near_tie


def _conv_sim(x, layer: q8.Int8Conv2d, w):
    qw, sw = _sim_weight(w, q8.WEIGHT_QMAX)
    assert torch.equal(layer.weight_int8.long(), qw)  # the stored weight is the stated quantisation
    qx, sx, near = _sim_activation(x)
    cols = F.unfold(qx.double(), layer.kernel_size, layer.dilation, layer.padding, layer.stride).long()  # exact
    acc = torch.einsum("ok,nkl->nol", qw.flatten(1), cols)  # int64 integer products
    n, ho = x.shape[0], (x.shape[2] + 2 * layer.padding[0] - layer.kernel_size[0]) // layer.stride[0] + 1
    y = acc.double() * sx * sw.view(1, -1, 1)
    # an activation near a tie that rounds the other way moves each output it feeds by sx * |w| (per output: the
    # sum over its taps that read such activations)
    near_cols = F.unfold(near.double(), layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    slack = torch.einsum("ok,nkl->nol", qw.flatten(1).abs().double(), near_cols) * sx * sw.view(1, -1, 1)
    return y.view(n, -1, ho, y.shape[-1] // ho), slack.view(n, -1, ho, y.shape[-1] // ho)


def _rms_err(a, b):
    return float((a.double() - b.double()).pow(2).mean().sqrt() / b.double().pow(2).mean().sqrt())


def _err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# ------------------------------------------------------------------------------------------ layers
def test_weight_quantisation_is_the_stated_rule():
    w = torch.randn(48, 32, 3, 3)
    w[5] = 0.0  # an all-zero channel gets scale 1, integers 0
    q, s = q8.quantize_weight(w)
    qs, ss = _sim_weight(w, q8.WEIGHT_QMAX)
    assert q.dtype == torch.int8 and torch.equal(q.long(), qs)
    torch.testing.assert_close(s.double(), ss, rtol=1e-6, atol=0)
    assert int(q.abs().max()) == q8.WEIGHT_QMAX


def test_activation_quantisation_is_the_stated_rule():
    x = torch.randn(2, 64, 9, 9) * 3 + 1
    scale, zp = q8.activation_qparams(x)
    qs, ss, near = _sim_activation(x)
    assert scale == pytest.approx(ss, rel=1e-12)
    q = q8.quantize_activation(x, scale, zp).long() - zp
    bad = q != qs
    assert not (bad & ~near).any(), "only values within rounding of a half-way point may round differently"
    assert (q - qs).abs().max() <= 1


@pytest.mark.parametrize("cin,cout,k,stride,pad,hw", [(32, 64, 3, 1, 1, 12), (64, 64, 3, 2, 1, 11),
                                                      (48, 40, 1, 1, 0, 8), (40, 320, 3, 1, 1, 7)])
@pytest.mark.parametrize("fused", ["none", "residual", "time+silu"])
def test_int8_conv_matches_the_integer_simulation(cin, cout, k, stride, pad, hw, fused):
    torch.manual_seed(0)
    conv = Conv2d(cin, cout, k, stride=stride, padding=pad).eval()
    x = torch.randn(2, cin, hw, hw).contiguous(memory_format=torch.channels_last) * 2 - 0.3
    w, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    layer = q8.Int8Conv2d(conv)
    y_sim, slack = _conv_sim(x, layer, w)
    y_sim = y_sim + b.double().view(1, -1, 1, 1)
    res = None
    if fused == "residual":
        res = torch.randn(y_sim.shape)
    elif fused == "time+silu":
        res = torch.randn(2, cout, 1, 1)
    if res is not None:
        y_sim = y_sim + res.double()
    silu = fused == "time+silu"
    if silu:
        y_sim = F.silu(y_sim)
    with torch.no_grad():
        y = layer(x, residual=res, silu=silu)
    assert y.dtype == torch.float32 and y.shape == y_sim.shape
    # fp32 output rounding (a few ulps of the largest value, through the dequantisation) + any tie
    tol = 4e-6 * float(y_sim.abs().max()) + slack * (1.0 if not silu else 1.1)  # SiLU' <= 1.1
    assert bool(((y.double() - y_sim).abs() <= tol).all())


@pytest.mark.parametrize("rows,cin,cout", [(2 * 64, 32, 96), (77, 48, 40), (1, 64, 64), (300, 320, 1280)])
@pytest.mark.parametrize("fused", [None, "residual", "gelu", "silu"])
def test_int8_linear_matches_the_integer_simulation(rows, cin, cout, fused):
    torch.manual_seed(1)
    lin = Linear(cin, cout).eval()
    x = torch.randn(rows, cin) * 1.5 + 0.2
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    layer = q8.Int8Linear(lin)
    qw, sw = _sim_weight(w, q8.WEIGHT_QMAX)
    assert torch.equal(layer.weight_int8.long(), qw)
    qx, sx, near = _sim_activation(x)
    y_sim = (qx @ qw.T).double() * sx * sw + b.double()   # int64 products, dequantised in fp64
    res = torch.randn(rows, cout) if fused == "residual" else None
    if res is not None:
        y_sim = y_sim + res.double()
    act = fused if fused in ("gelu", "silu") else None
    if act == "gelu":
        y_sim = F.gelu(y_sim)
    elif act == "silu":
        y_sim = F.silu(y_sim)
    with torch.no_grad():
        y = layer(x, activation=act, residual=res)
    slack = (near.double() @ qw.abs().double().T) * sx * sw * 1.13  # per output, as in _conv_sim; GELU' <= 1.13
    assert bool(((y.double() - y_sim).abs() <= 4e-6 * float(y_sim.abs().max()) + slack).all())


def test_bf16_input_gives_bf16_output_rounded_once():
    torch.manual_seed(2)
    conv = Conv2d(32, 64, 3, padding=1).eval()
    x = torch.randn(2, 32, 10, 10).bfloat16().contiguous(memory_format=torch.channels_last)
    w, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    layer = q8.Int8Conv2d(conv.bfloat16())
    y_sim, slack = _conv_sim(x.float(), layer, w.bfloat16().float())
    y_sim = y_sim + b.bfloat16().double().view(1, -1, 1, 1)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.bfloat16
    # one bf16 rounding of the output: half a bf16 ulp (2^-8 relative) of each value
    bound = (y_sim.abs() + slack) * 2.0 ** -8 + 4e-6 * float(y_sim.abs().max()) + slack
    assert bool(((y.double() - y_sim).abs() <= bound).all())


def test_quantised_layers_hold_no_float_weight_and_refuse_nothing_silently():
    from fastdiff.models import unet_sd

    net = unet_sd.UNetSD(unet_sd.TINY).eval()
    n_float = sum(p.numel() for p in net.parameters())
    q8.quantize_int8(net)
    names = q8.quantized_layers(net)
    assert names and not any(n.startswith(("conv_in", "conv_out", "time_embedding")) for n in names)
    for name in names:
        m = net.get_submodule(name)
        assert not hasattr(m, "weight"), name  # the float weight is gone
        assert m.weight_int8.dtype == torch.int8
        floats = [p for p in m.parameters()]
        assert all(p.dim() == 1 for p in floats), name  # the bias only
    kept_float = sum(p.numel() for p in net.parameters())
    assert kept_float < 0.1 * n_float
    # a later .to(dtype) keeps the integers, and the scales and bias unrounded in fp32
    m = net.get_submodule(names[0])
    w, s = m.weight_int8.clone(), m.weight_scale.clone()
    net.to(dtype=torch.bfloat16)
    assert torch.equal(m.weight_int8, w) and m.weight_scale.dtype == torch.float32 and torch.equal(m.weight_scale, s)


# ------------------------------------------------------------------------------------------ the UNet
def _randomize(model, seed=1234):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = p.dim() == 1 and "norm" in name and name.endswith("weight")
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g) if is_norm else 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_int8_sd1_unet_against_fp32_beside_bf16():
    """The quantised small SD1 UNet's output against fp32, beside the bf16 model's error against fp32.

    Measured on this random network (weights of std 0.2, norm scales around 1), with 7-bit weights (AVX2 CPU):
    relative RMS error bf16 0.017, int8 0.074. The int8 error is spread over the layers, not one outlier:
    quantising any single layer alone costs 0.018-0.025; convolutions alone 0.062, linears alone 0.044,
    keeping the attention or the feed-forward linears in float 0.068 / 0.070. The bound below is 0.1: W8A8
    may lose more than bf16, and a broken layer (wrong scale, saturation, a missed zero point) gives errors of
    order 1."""
    from fastdiff.models import unet_sd

    cfg = unet_sd.UNetSDConfig(block_out_channels=(32, 64), cross_attention=(True, False), layers_per_block=1,
                               num_heads=2, cross_attention_dim=32, norm_num_groups=8, sample_size=16)
    torch.manual_seed(0)
    ref = _randomize(unet_sd.UNetSD(cfg))
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.randn(2, 7, 32)
    with torch.no_grad():
        y32 = ref(x, t, ctx)
        bf = unet_sd.UNetSD(cfg).eval()
        bf.load_state_dict(ref.state_dict())
        y16 = bf.bfloat16()(x.bfloat16(), t, ctx.bfloat16()).float()
        q = unet_sd.UNetSD(cfg).eval()
        q.load_state_dict(ref.state_dict())
        q8.quantize_int8(q)
        yq = q(x, t, ctx)
    e16, eq = _err(y16, y32), _err(yq, y32)
    r16, rq = _rms_err(y16, y32), _rms_err(yq, y32)
    print(f"\nsmall SD1 UNet vs fp32, relative max error: bf16 {e16:.4f}, int8 {eq:.4f}; "
          f"relative RMS error: bf16 {r16:.4f}, int8 {rq:.4f}")
    assert rq < 0.1, f"int8 relative RMS error {rq:.4f} (bf16: {r16:.4f})"
    assert eq > e16  # the int8 path ran (not the float one)


# ------------------------------------------------------------------------------------------ entry points
def test_pipeline_quantize_and_its_argument():
    from fastdiff.pipelines.pixel import load_pixel_pipeline

    pipe = load_pixel_pipeline()
    with pytest.raises(InvalidArgument, match="^mode: must be one of int8, got 'int4'"):
        pipe.quantize("int4")
    assert pipe.quantize("int8") is pipe and pipe.quantized == "int8"
    names = q8.quantized_layers(pipe.unet)
    assert names and "conv_in" not in names and "conv_out" not in names
    assert pipe.quantize("int8") is pipe  # a second call changes nothing


def test_generate_checks_quantize_before_loading():
    import fastdiff

    with pytest.raises(InvalidArgument, match="^quantize: must be one of int8"):
        fastdiff.generate(model="/nonexistent", quantize="fp8")


def test_cli_quantize_flag(tmp_path, capsys):
    from fastdiff.cli import main

    with pytest.raises(SystemExit) as e:
        main(["generate", "--quantize", "int4", "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2
    assert "argument --quantize: must be one of int8, got 'int4'" in capsys.readouterr().err
