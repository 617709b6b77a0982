"""The model-call convention of every sampler, and classifier-free guidance in one batched forward.

A network is any callable ``net(x, t, cond) -> output`` where

- ``x`` is what the network was trained on: the VP-scaled sample ``alpha_t x0 + sigma_t eps`` (samplers that
  work in sigma space, like Euler, divide by ``sqrt(sigma^2 + 1)`` before the call) or, for rectified flow,
  ``(1 - s) x0 + s eps``;
- ``t`` is a float32 tensor of shape (batch,) holding the training timestep (fractional for Euler spacings,
  ``1000 * sigma`` for flow models), the value diffusers passes to the same network;
- ``cond`` is the conditioning (class labels, text embeddings, a dict or tuple of tensors, or None);
- ``output`` has the shape of ``x``.

:class:`Denoiser` says what the output means (``eps``, ``v``, ``x0``, ``flow``) and optionally runs the
network in another dtype (bf16) while the sampler keeps its state in fp32. A bare callable is treated as an
eps-prediction network (a flow network when sampled on a :class:`~fastdiff.samplers.schedules.FlowSchedule`).

Classifier-free guidance (Ho & Salimans 2022, eq. 6: ``e = e_u + g (e_c - e_u)``) is ONE forward pass on
``cat([x, x])`` with ``cat([uncond, cond])``; the combination is fused into the sampler update.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from fastdiff.samplers.schedules import normalize_prediction

__all__ = ["Denoiser", "as_denoiser", "cat_cond", "guided_forward"]


class Denoiser:
    """Wraps ``net(x, t, cond)`` with what it predicts and the dtype it runs in.

    ``dtype``: when given, ``x`` is cast to it for the forward pass (e.g. ``torch.bfloat16``) and the output
    is cast back to the sampler's dtype, so schedule arithmetic and the sampler state stay fp32.
    """

    def __init__(self, net: Callable[..., torch.Tensor], prediction: str = "eps", *,
                 dtype: torch.dtype | None = None) -> None:
        if isinstance(net, Denoiser):
            net = net.net
        if not callable(net):
            raise TypeError(f"Denoiser: net must be callable as net(x, t, cond), got {type(net).__name__}")
        self.net = net
        self.prediction = normalize_prediction(prediction)
        self.dtype = dtype

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        x_in = x if self.dtype is None else x.to(self.dtype)
        out = self.net(x_in, t, cond)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the network returned {type(out).__name__}; it must return a tensor shaped like x")
        if out.shape != x.shape:
            raise ValueError(f"the network output {tuple(out.shape)} must have the shape of its input "
                             f"{tuple(x.shape)}")
        return out.to(x.dtype)

    def __repr__(self) -> str:
        return f"Denoiser({getattr(self.net, '__name__', type(self.net).__name__)}, prediction={self.prediction!r})"


def as_denoiser(model: Callable[..., torch.Tensor], default_prediction: str = "eps") -> Denoiser:
    """A :class:`Denoiser` as is; a bare callable becomes one of ``default_prediction``."""
    return model if isinstance(model, Denoiser) else Denoiser(model, default_prediction)


def cat_cond(uncond: Any, cond: Any) -> Any:
    """Batch the unconditional and conditional inputs: tensors are concatenated on dim 0, dicts per key,
    tuples/lists per element; non-tensor leaves (e.g. a flag) must be equal and pass through."""
    if isinstance(cond, torch.Tensor):
        if not isinstance(uncond, torch.Tensor):
            raise TypeError(f"uncond must be a tensor like cond, got {type(uncond).__name__}")
        if uncond.shape[1:] != cond.shape[1:]:
            raise ValueError(f"uncond {tuple(uncond.shape)} and cond {tuple(cond.shape)} differ beyond the batch dim")
        if uncond.shape[0] != cond.shape[0]:
            if uncond.shape[0] != 1:
                raise ValueError(f"uncond batch {uncond.shape[0]} must be 1 or equal cond's {cond.shape[0]}")
            uncond = uncond.expand_as(cond)
        return torch.cat([uncond.to(cond.dtype), cond])
    if isinstance(cond, dict):
        if not isinstance(uncond, dict) or uncond.keys() != cond.keys():
            raise ValueError("uncond must be a dict with the same keys as cond")
        return {k: cat_cond(uncond[k], cond[k]) for k in cond}
    if isinstance(cond, (tuple, list)):
        if not isinstance(uncond, (tuple, list)) or len(uncond) != len(cond):
            raise ValueError("uncond must be a tuple/list of the same length as cond")
        return type(cond)(cat_cond(u, c) for u, c in zip(uncond, cond))
    if uncond != cond:
        raise ValueError(f"cannot batch uncond {uncond!r} with cond {cond!r}")
    return cond


def guided_forward(model: Denoiser, x: torch.Tensor, t: float, cond: Any, uncond: Any,
                   guidance: float | None) -> tuple[torch.Tensor, float | None]:
    """One network evaluation at timestep ``t``.

    Returns ``(out, g)``: without guidance ``out`` has x's batch and ``g`` is None; with guidance ``out`` is
    ``cat([uncond_out, cond_out])`` from ONE forward on the doubled batch and ``g`` the scale, to be combined
    by :func:`fastdiff.ops.sampler_step` (``guidance_scale=g``) in the same pass as the update.
    """
    if guidance is None or guidance == 1.0:  # g = 1 is the conditional output exactly: no second half needed
        tt = torch.full((x.shape[0],), float(t), dtype=torch.float32, device=x.device)
        return model(x, tt, cond), None
    if uncond is None:
        raise ValueError("classifier-free guidance needs `uncond` (the null-class label / empty-prompt embedding)")
    xx = torch.cat([x, x])
    tt = torch.full((xx.shape[0],), float(t), dtype=torch.float32, device=x.device)
    return model(xx, tt, cat_cond(uncond, cond)), float(guidance)
