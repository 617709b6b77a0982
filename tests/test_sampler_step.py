"""The fused CFG + sampler update against its reference (and an independent eager oracle) on every backend."""
import pytest
import torch

import fastdiff.ops as ops
from fastdiff.ops import sampler_step, sampler_step_ref
from fastdiff.ops.registry import all_ops

from lowp import assert_close_lowp, max_err

OP = all_ops()["sampler_step"]
HAS_CPU = not OP.availability()["cpu"]  # the cpu backend can run here
# SD1 latents (batch 2 and 1, 64x64 / 128x128) and SD3 latents (16 channels), plus odd sizes.
SHAPES = [(2, 4, 64, 64), (1, 16, 32, 32), (1, 3, 5, 7), (3, 1, 1, 1), (1, 4, 17, 33)]


def _eager(x, mo, a, b, s, z, px, pm, clip, g, dtype):
    """The eager sequence the op replaces, written independently of sampler_step_ref, in ``dtype``."""
    x, mo = x.to(dtype), mo.to(dtype)
    if g is not None:
        u, c = mo[: x.shape[0]], mo[x.shape[0]:]
        m = u + g * (c - u)
    else:
        m = mo
    y = px * x + pm * m
    if clip is not None:
        y = torch.clamp(y, min=-clip, max=clip)
    out = a * y + b * x
    if z is not None:
        out = out + s * z.to(dtype)
    return out


def _inputs(shape, guided, noisy, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    mo = torch.randn(((2 if guided else 1) * shape[0],) + shape[1:], generator=gen) * 2
    z = torch.randn(shape, generator=gen) if noisy else None
    return x.to(dtype), mo.to(dtype), None if z is None else z.to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("noisy", [False, True])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_fp32_matches_reference(backend, shape, guided, noisy, clip):
    x, mo, z = _inputs(shape, guided, noisy, torch.float32)
    # DDIM-like x0 prediction from eps: x0 = (x - sqrt(1-abar) eps) / sqrt(abar), then a*x0 + b*x (+ s z).
    kw = dict(pred=(1.7, -1.3), clip=clip, guidance_scale=7.5 if guided else None)
    with ops.use_backend(backend):
        got = sampler_step(x, mo, 0.6, 0.45, 0.2, z, **kw)
    want = _eager(x.double(), mo.double(), 0.6, 0.45, 0.2, z if z is None else z.double(), 1.7, -1.3, clip,
                  kw["guidance_scale"], torch.float64)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, sampler_step_ref(x, mo, 0.6, 0.45, 0.2, z, **kw), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 4, 64, 64), (1, 16, 32, 32), (1, 3, 5, 7)])
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_bf16_error_within_twice_torch(backend, lowp_dtype, shape, guided, clip):
    x, mo, z = _inputs(shape, guided, True, lowp_dtype, seed=1)
    g = 5.0 if guided else None
    with ops.use_backend(backend):
        got = sampler_step(x, mo, 0.8, 0.3, 0.1, z, pred=(0.5, 1.0), clip=clip, guidance_scale=g)
    ref32 = _eager(x.float(), mo.float(), 0.8, 0.3, 0.1, z.float(), 0.5, 1.0, clip, g, torch.float32)
    torch_bf16 = _eager(x, mo, 0.8, 0.3, 0.1, z, 0.5, 1.0, clip, g, lowp_dtype)
    assert_close_lowp(got, ref32, torch_bf16, f"{backend} {shape}")
    # And against the reference in that dtype (math in fp32, one rounding): at most one ulp apart (bf16: 2^-7
    # relative), up to fp32 rounding (fused multiply-adds) where the terms cancel to ~0.
    ref = sampler_step_ref(x, mo, 0.8, 0.3, 0.1, z, pred=(0.5, 1.0), clip=clip, guidance_scale=g)
    ulp = ref.float().abs() * torch.finfo(lowp_dtype).eps + 1e-6
    assert ((got.float() - ref.float()).abs() <= ulp).all()


def test_noise_ignored_when_s_is_zero_and_clip_bounds(backend):
    x, mo, z = _inputs((1, 4, 8, 8), True, True, torch.float32)
    with ops.use_backend(backend):
        a = sampler_step(x, mo, 1.0, 0.0, 0.0, z, guidance_scale=3.0)
        b = sampler_step(x, mo, 1.0, 0.0, 0.0, None, guidance_scale=3.0)
        clipped = sampler_step(x, mo * 10, 1.0, 0.0, clip=0.5, guidance_scale=3.0)
    torch.testing.assert_close(a, b)
    assert clipped.abs().max().item() == pytest.approx(0.5)


def test_non_contiguous_inputs(backend):
    x, mo, z = _inputs((2, 4, 16, 12), True, True, torch.float32)
    xt, mot, zt = x.transpose(-1, -2), mo.transpose(-1, -2), z.transpose(-1, -2)
    assert not xt.is_contiguous()
    with ops.use_backend(backend):
        got = sampler_step(xt, mot, 0.5, 0.5, 0.3, zt, guidance_scale=2.0, clip=1.0)
    want = sampler_step_ref(xt.contiguous(), mot.contiguous(), 0.5, 0.5, 0.3, zt.contiguous(), guidance_scale=2.0,
                            clip=1.0)
    assert got.shape == xt.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_empty_and_nan(backend):
    x, mo, _ = _inputs((0, 4, 8, 8), True, False, torch.float32)
    with ops.use_backend(backend):
        assert sampler_step(x, mo, 1.0, 0.0, guidance_scale=2.0).shape == (0, 4, 8, 8)
        x = torch.zeros(1, 1, 2, 2)
        x[0, 0, 0, 0] = float("nan")
        out = sampler_step(x, torch.ones(1, 1, 2, 2), 0.5, 0.5)
    # Documented result: NaN propagates to the element it came from, never to the others.
    assert out.isnan().sum().item() == 1 and out.isnan()[0, 0, 0, 0]


def test_bad_inputs():
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="cat\\(\\[uncond, cond\\]\\)"):
        sampler_step(x, torch.randn(2, 4, 8, 8), 1.0, 0.0, guidance_scale=7.5)
    with pytest.raises(ValueError, match="shape of x"):
        sampler_step(x, torch.randn(4, 4, 8, 8), 1.0, 0.0)
    with pytest.raises(ValueError, match="noise"):
        sampler_step(x, torch.randn(2, 4, 8, 8), 1.0, 0.0, 0.5, torch.randn(2, 4, 8, 7))
    with pytest.raises(TypeError, match="one dtype"):
        sampler_step(x, torch.randn(2, 4, 8, 8, dtype=torch.float64), 1.0, 0.0)
    with pytest.raises(ValueError, match="clip must be positive"):
        sampler_step(x, torch.randn(2, 4, 8, 8), 1.0, 0.0, clip=0.0)
    with pytest.raises(TypeError, match="must be tensors"):
        sampler_step(x.numpy(), torch.randn(2, 4, 8, 8), 1.0, 0.0)


@pytest.mark.skipif(not HAS_CPU, reason="the compiled CPU kernels are not built")
def test_cpu_backend_refuses_what_it_cannot_run():
    x = torch.randn(1, 4, 4, 4, dtype=torch.float16)
    with ops.use_backend("cpu"):
        with pytest.raises(ops.BackendUnavailable, match="float16 is not supported"):
            sampler_step(x, x.clone(), 1.0, 0.0)
    # fp16 on CPU is still computed (by the reference) when the choice is automatic.
    torch.testing.assert_close(sampler_step(x, x.clone(), 0.5, 0.5), x)
    # Inputs requiring grad go to the reference, which autograd differentiates.
    xg = torch.randn(1, 4, 4, 4, requires_grad=True)
    assert OP.select(xg, xg, 1.0, 0.0) == "ref"
    sampler_step(xg, torch.randn(1, 4, 4, 4), 0.25, 0.5).sum().backward()
    torch.testing.assert_close(xg.grad, torch.full_like(xg, 0.5))


@pytest.mark.skipif(not HAS_CPU, reason="the compiled CPU kernels are not built")
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "avx512_bf16"])
def test_every_cpu_isa_matches(isa):
    """Each compiled ISA variant (chosen by FASTDIFF_CPU_ISA at first use) gives the reference result."""
    import subprocess
    import sys
    import textwrap

    from fastdiff import _ext
    order = ["scalar", "avx2", "avx512", "avx512_bf16"]
    if order.index(isa) > order.index(_ext.cpu_capability()):
        pytest.skip(f"this CPU does not support {isa}")
    code = textwrap.dedent("""
        import torch, fastdiff.ops as ops
        from fastdiff import _ext
        from fastdiff.ops import sampler_step, sampler_step_ref
        assert _ext.cpu_capability() == %r
        g = torch.Generator().manual_seed(0)
        for dt in (torch.float32, torch.bfloat16):
            x = torch.randn(1, 4, 33, 9, generator=g).to(dt); mo = torch.randn(2, 4, 33, 9, generator=g).to(dt)
            z = torch.randn(1, 4, 33, 9, generator=g).to(dt)
            with ops.use_backend("cpu"):
                got = sampler_step(x, mo, 0.7, 0.2, 0.1, z, pred=(1.1, -0.4), clip=1.5, guidance_scale=4.0)
            want = sampler_step_ref(x, mo, 0.7, 0.2, 0.1, z, pred=(1.1, -0.4), clip=1.5, guidance_scale=4.0)
            tol = 1e-6 if dt == torch.float32 else 1e-2
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    """ % isa)
    env = dict(__import__("os").environ, FASTDIFF_CPU_ISA=isa)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
