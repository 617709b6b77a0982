"""fastdiff's ResBlock against diffusers' ResnetBlock2D with the same weights (strict state_dict copy)."""
import pytest
import torch

import fastdiff.ops as ops
from fastdiff.models.blocks import ResBlock
from fastdiff.ops.registry import all_ops

from lowp import assert_close_lowp, max_err

try:
    import diffusers.models.resnet as diffusers_resnet
except ImportError:  # the reference implementations are test extras: fastdiff's own tests still run
    diffusers_resnet = None
needs_reference = pytest.mark.skipif(diffusers_resnet is None, reason="needs diffusers (the reference)")

OP = all_ops()["conv2d"]
HAS_CPU = not OP.availability()["cpu"]  # the cpu backend can run here

# (in, out, temb, groups, H, W, batch): SD1 UNet blocks at small spatial size (320, 320->640 with the 1x1
# shortcut, 1280), a VAE block (no time embedding), and odd sizes.
CASES = [
    (320, 320, 1280, 32, 8, 8, 2),
    (320, 640, 1280, 32, 6, 6, 2),
    (1280, 1280, 1280, 32, 3, 3, 1),
    (128, 256, None, 32, 7, 5, 1),
    (64, 96, 40, 16, 5, 9, 3),
]
IDS = ["unet-320", "unet-320to640", "unet-1280", "vae-128to256", "odd"]


def _pair(case, seed=0):
    cin, cout, temb, groups, h, w, n = case
    torch.manual_seed(seed)
    ref = diffusers_resnet.ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=temb, groups=groups,
                                         eps=1e-5, dropout=0.0)
    for p in ref.parameters():  # non-trivial norms and biases, so every parameter matters
        with torch.no_grad():
            p.add_(torch.randn_like(p) * 0.1)
    ours = ResBlock(cin, cout, temb, groups=groups, eps=1e-5)
    ours.load_state_dict(ref.state_dict(), strict=True)  # same parameter names and shapes
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, cin, h, w, generator=gen)
    t = torch.randn(n, temb, generator=gen) if temb is not None else None
    return ref, ours, x, t


@needs_reference
def test_state_dict_keys_equal_diffusers():
    for case in CASES:
        ref, ours, _, _ = _pair(case)
        assert list(ours.state_dict()) == list(ref.state_dict())


@needs_reference
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fp32_forward_and_backward(backend, case, layout):
    ref, ours, x, t = _pair(case)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x1 = x.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    t1 = t.detach().clone().requires_grad_() if t is not None else None
    t2 = t.detach().clone().requires_grad_() if t is not None else None
    with ops.use_backend(backend):
        out = ours(x1, t1)
    want = ref(x2, t2)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    # The block returns its input's memory format.
    assert out.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else
                             torch.contiguous_format)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(7))
    with ops.use_backend(backend):
        out.backward(g)
    want.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-4)
    if t is not None:
        torch.testing.assert_close(t1.grad, t2.grad, rtol=1e-4, atol=1e-4)
    theirs = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        scale = theirs[name].grad.abs().max().item() + 1e-6
        assert max_err(p.grad, theirs[name].grad) <= 1e-4 * scale + 1e-5, f"grad of {name}"


@needs_reference
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3]], ids=["unet-320", "unet-320to640", "vae"])
def test_inference_mode_packed_weights(backend, case):
    ref, ours, x, t = _pair(case)
    ref.eval(), ours.eval()
    with torch.inference_mode(), ops.use_backend(backend):
        torch.testing.assert_close(ours(x, t), ref(x, t), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours(x, t), ref(x, t), rtol=1e-4, atol=1e-4)  # second call: cached packs


@needs_reference
@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=["unet-320", "unet-320to640"])
@pytest.mark.parametrize("math_mode", ["auto", "native", "fp32"])
def test_bf16_within_twice_torch_error(backend, case, math_mode, use_settings):
    """bf16 block vs the fp32 diffusers block: at most 2x the error of diffusers' own bf16 block (fwd + grads)."""
    use_settings(cpu_bf16_math=math_mode)
    ref, ours, x, t = _pair(case)
    g = torch.randn(ref(x, t).shape, generator=torch.Generator().manual_seed(7))

    def run(block, dtype, backend_name=None):
        block = block.to(dtype)
        block.zero_grad()
        xi = x.detach().to(dtype).clone().requires_grad_()
        ti = t.detach().to(dtype).clone().requires_grad_()
        with ops.use_backend(backend_name):
            out = block(xi, ti)
            out.backward(g.to(dtype))
        grads = {n: p.grad.detach().clone() for n, p in block.named_parameters()}
        return out.detach(), xi.grad, ti.grad, grads

    out32, gx32, gt32, gp32 = run(ref, torch.float32)
    outb, gxb, gtb, gpb = run(ref, torch.bfloat16)
    ours.load_state_dict(ref.float().state_dict())
    got, gx, gt, gp = run(ours, torch.bfloat16, backend)
    assert_close_lowp(got, out32, outb, "output")
    assert_close_lowp(gx, gx32, gxb, "grad x")
    assert_close_lowp(gt, gt32, gtb, "grad temb")
    for name in ("conv1.weight", "conv2.weight", "time_emb_proj.weight", "norm1.weight"):
        assert_close_lowp(gp[name], gp32[name], gpb[name], f"grad {name}")


@needs_reference
@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=["unet-320to640", "vae-128to256"])
def test_bf16_autocast_fp32_weights(backend, case):
    """fp32 weights + bf16 autocast (how mixed-precision training runs): the block works and its output and
    gradients are within 2x the error of diffusers' block under the same autocast (oracle: fp32 diffusers)."""
    ref, ours, x, t = _pair(case)
    g = torch.randn(ref(x, t).shape, generator=torch.Generator().manual_seed(7))

    def run(block, autocast, backend_name=None):
        block.zero_grad()
        xi = x.detach().clone().requires_grad_()
        with ops.use_backend(backend_name), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            out = block(xi, t)
        out.backward(g.to(out.dtype))
        return out.detach(), xi.grad, block.conv1.weight.grad.clone()

    out32, gx32, gw32 = run(ref, False)
    outb, gxb, gwb = run(ref, True)
    got, gx, gw = run(ours, True, backend)
    assert got.dtype == outb.dtype == torch.bfloat16
    assert gw.dtype == torch.float32  # the master weights keep their dtype
    assert_close_lowp(got, out32, outb, "output")
    assert_close_lowp(gx.to(torch.bfloat16), gx32, gxb.to(torch.bfloat16), "grad x")
    assert_close_lowp(gw.to(torch.bfloat16), gw32, gwb.to(torch.bfloat16), "grad conv1.weight")


@needs_reference
def test_output_scale_factor_and_dropout_eval():
    ref = diffusers_resnet.ResnetBlock2D(in_channels=32, out_channels=32, temb_channels=16, groups=8, eps=1e-6,
                                         output_scale_factor=2.0, dropout=0.5).eval()
    ours = ResBlock(32, 32, 16, groups=8, eps=1e-6, output_scale_factor=2.0, dropout=0.5).eval()
    ours.load_state_dict(ref.state_dict())
    x, t = torch.randn(2, 32, 5, 5), torch.randn(2, 16)
    torch.testing.assert_close(ours(x, t), ref(x, t), rtol=1e-5, atol=1e-5)


def test_bad_input():
    block = ResBlock(32, 32, 16, groups=8)
    with pytest.raises(ValueError, match="temb"):
        block(torch.randn(2, 32, 4, 4))
    with pytest.raises(ValueError, match="temb"):
        block(torch.randn(2, 32, 4, 4), torch.randn(3, 16))
    with pytest.raises(ValueError, match="shape"):
        block(torch.randn(2, 16, 4, 4), torch.randn(2, 16))
