"""Sinusoidal timestep embedding with diffusers' ``get_timestep_embedding`` semantics, in one kernel.

``emb[b] = [sin(t_b * f), cos(t_b * f)]`` (``[cos, sin]`` with ``flip_sin_to_cos``), ``f_j = exp(-ln(max_period)
* j / (half - downscale_freq_shift))``, times ``scale``, zero-padded when ``embedding_dim`` is odd. The SD1 UNet
uses ``flip_sin_to_cos=True, downscale_freq_shift=0``; diffusers' DDPM ``UNet2DModel`` defaults to
``flip_sin_to_cos=True, freq_shift=0`` too; SD3's ``Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)``.

Exactness in fp32: the frequency table is computed by torch exactly as diffusers computes it (and cached), the
kernel rounds ``t * f`` and ``scale * (t * f)`` to fp32 just as eager does, so the sin/cos arguments are
bit-identical to diffusers'; sin/cos then run in double and round once (diffusers' fp32 sin/cos are within
~1 ulp of that). Forward only: timesteps carry no gradient (inputs that require grad go to the reference).
"""
from __future__ import annotations

import math

import torch

from fastdiff import _ext
from fastdiff.ops._checks import device_dtype_reasons, grad_reasons
from fastdiff.ops.registry import Op

__all__ = ["timestep_embedding", "timestep_embedding_ref"]

_op = Op("timestep_embedding")
_FREQ_CACHE: dict = {}


def timestep_embedding_ref(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1,
                           max_period=10000):
    """Pure-PyTorch reference, step for step diffusers' ``get_timestep_embedding``."""
    half_dim = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(start=0, end=half_dim, dtype=torch.float32,
                                                    device=timesteps.device)
    exponent = exponent / (half_dim - downscale_freq_shift)
    emb = torch.exp(exponent)
    emb = timesteps[:, None].float() * emb[None, :]
    emb = scale * emb
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half_dim:], emb[:, :half_dim]], dim=-1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1, 0, 0))
    return emb


def _freq(half: int, shift: float, max_period: float, device: torch.device) -> torch.Tensor:
    """The fp32 frequency table, computed with the same torch ops (so the same roundings) as diffusers."""
    key = (half, float(shift), float(max_period), device)
    f = _FREQ_CACHE.get(key)
    if f is None:
        exponent = -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32, device=device)
        f = torch.exp(exponent / (half - shift)).contiguous()
        _FREQ_CACHE[key] = f
    return f


def _reasons(backend):
    def reasons(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1,
                max_period=10000):
        # Any real dtype: the timesteps are converted to fp32 first, as diffusers does.
        out = device_dtype_reasons(backend, timesteps, dtypes=(timesteps.dtype,))
        if timesteps.is_complex():
            out.append("complex timesteps")
        return out + grad_reasons("timestep_embedding", timesteps)
    return reasons


def _compiled(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1, max_period=10000):
    freq = _freq(embedding_dim // 2, downscale_freq_shift, max_period, timesteps.device)
    t = timesteps.to(torch.float32).contiguous()
    return torch.ops.fastdiff.timestep_embedding(t, freq, int(embedding_dim), bool(flip_sin_to_cos), float(scale))


_op.register("ref")(timestep_embedding_ref)
_op.register("cpu", _reasons("cpu"))(_compiled)
_op.register("cuda", _reasons("cuda"))(_compiled)

if _ext.has_cpu_kernels():
    # Shape function for torch.compile: (N, dim) fp32, like the kernels' output.
    @torch.library.register_fake("fastdiff::timestep_embedding")
    def _timestep_embedding_fake(timesteps, freq, dim, flip_sin_to_cos, scale):
        return timesteps.new_empty((timesteps.shape[0], dim), dtype=torch.float32)


def timestep_embedding(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1,
                       max_period=10000):
    """diffusers' ``get_timestep_embedding`` (same arguments, defaults and fp32 (N, embedding_dim) result)."""
    if not isinstance(timesteps, torch.Tensor):
        raise TypeError(f"timestep_embedding: timesteps must be a tensor, got {type(timesteps).__name__}")
    if timesteps.dim() != 1:
        raise ValueError(f"timestep_embedding: timesteps must be 1-D (one per batch element), got shape "
                         f"{tuple(timesteps.shape)}")
    if int(embedding_dim) != embedding_dim or embedding_dim < 1:
        raise ValueError(f"timestep_embedding: embedding_dim must be a positive integer, got {embedding_dim}")
    return _op(timesteps, int(embedding_dim), flip_sin_to_cos, downscale_freq_shift, scale, max_period)
