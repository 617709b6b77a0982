"""Sinusoidal timestep embedding against diffusers' get_timestep_embedding, on every available backend."""
import pytest
import torch

import fastdiff.ops as ops
from fastdiff.ops import timestep_embedding, timestep_embedding_ref
from fastdiff.ops.registry import all_ops


OP = all_ops()["timestep_embedding"]
HAS_CPU = not OP.availability()["cpu"]  # the cpu backend can run here
# (dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period): SD1 UNet (320, True, 0), DDPM UNet2DModel
# (its time_embedding_type "positional": flip True, freq_shift 0), SD3 (256, True, 0), diffusers' defaults
# (flip False, shift 1), an odd dim (zero pad), a scale and a different max period.
CONFIGS = [(320, True, 0, 1, 10000), (128, True, 0, 1, 10000), (256, True, 0, 1, 10000), (64, False, 1, 1, 10000),
           (33, True, 0, 1, 10000), (16, False, 1, 1000.0, 10000), (96, False, 0, 1, 5000)]
TIMESTEPS = [torch.tensor([999, 0]), torch.tensor([981.0, 1.5, 500.25]), torch.arange(0, 1000, 37),
             torch.tensor([0.999, 0.5]) * 1000, torch.tensor([7], dtype=torch.int32)]


def _ulp_close(got, want):
    # sin/cos of bit-identical fp32 arguments: diffusers' fp32 sin/cos and the kernel's correctly rounded ones
    # differ by at most a couple of ulps of values in [-1, 1].
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).abs().max().item() <= 2 * 2.0 ** -24 * 2, (got - want).abs().max().item()


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("ti", range(len(TIMESTEPS)))
def test_matches_diffusers(backend, cfg, ti):
    from diffusers.models.embeddings import get_timestep_embedding

    dim, flip, shift, scale, max_period = cfg
    t = TIMESTEPS[ti]
    with ops.use_backend(backend):
        got = timestep_embedding(t, dim, flip, shift, scale, max_period)
    want = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift, scale=scale,
                                  max_period=max_period)
    _ulp_close(got, want)
    # And the reference is diffusers' code bit for bit.
    assert torch.equal(timestep_embedding_ref(t, dim, flip, shift, scale, max_period), want)


def test_against_float64_closed_form():
    """The kernel is at least as accurate as diffusers against the exact embedding of the same fp32 arguments."""
    t = torch.arange(0, 1000, 7).float()
    got = timestep_embedding(t, 320, True, 0)
    freq = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(160, dtype=torch.float32) / 160)
    arg = (t[:, None] * freq[None]).double()
    exact = torch.cat([arg.cos(), arg.sin()], -1)
    assert (got.double() - exact).abs().max() <= 2.0 ** -24 + 1e-12


def test_module_use_and_empty(backend):
    from diffusers.models.embeddings import Timesteps

    m = Timesteps(320, flip_sin_to_cos=True, downscale_freq_shift=0)
    t = torch.tensor([999.0, 500.0])
    with ops.use_backend(backend):
        _ulp_close(timestep_embedding(t, 320, True, 0), m(t))
        assert timestep_embedding(torch.empty(0), 8).shape == (0, 8)
        assert timestep_embedding(torch.tensor([3.0]), 1).tolist() == [[0.0]]  # only the zero pad


def test_bad_inputs_and_grad():
    with pytest.raises(ValueError, match="1-D"):
        timestep_embedding(torch.ones(2, 2), 8)
    with pytest.raises(ValueError, match="positive integer"):
        timestep_embedding(torch.ones(2), 0)
    with pytest.raises(TypeError, match="must be a tensor"):
        timestep_embedding([1.0], 8)
    t = torch.tensor([1.0, 2.0], requires_grad=True)
    assert OP.select(t, 8) == "ref"  # forward-only kernel; the reference differentiates
    (g,) = torch.autograd.grad(timestep_embedding(t, 8).sum(), t)
    assert torch.isfinite(g).all()
