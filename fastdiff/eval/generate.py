"""Draw class-conditional samples for evaluation: N per class, seeded, with any sampler of fastdiff.samplers."""
from __future__ import annotations

import time
from typing import Any

import torch

from fastdiff.samplers import Denoiser, get_sampler

__all__ = ["sample_per_class"]


@torch.no_grad()
def sample_per_class(denoiser: Denoiser, schedule: Any, *, sampler: str, steps: int, per_class: int,
                     num_classes: int, null_label: int | None = None, guidance: float | None = None,
                     seed: int = 0, batch: int = 250, shape: tuple[int, int, int] = (1, 32, 32),
                     clip: float | None = 1.0, spacing: str | None = None, progress=None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``per_class`` samples of every class: returns (images (N, *shape) in [-1, 1], labels, seconds).

    Labels run 0,0,..,1,1,.. and batches are drawn in order from one ``torch.Generator(seed)`` (initial noise
    then the sampler's own noise), so a run is reproducible and a larger ``per_class`` only appends samples
    per batch boundary. ``guidance`` > 1 needs ``null_label`` (the class the model was trained to read as
    "no label"). ``clip`` clamps the x0 estimate of DDPM/DDIM (pixel models); ``spacing`` picks the timestep
    spacing (``leading``, ``trailing``, ``linspace``; None: the sampler's default).
    """
    if per_class < 1 or num_classes < 1:
        raise ValueError(f"per_class and num_classes must be >= 1, got {per_class}, {num_classes}")
    fn = get_sampler(sampler)
    use_cfg = guidance is not None and guidance != 1.0
    if use_cfg and null_label is None:
        raise ValueError("classifier-free guidance needs a model trained with a null class")
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    gen = torch.Generator().manual_seed(seed)
    kwargs = {"clip": clip} if sampler in ("ddpm", "ddim") else {}
    if spacing is not None:
        kwargs["spacing"] = spacing
    out = []
    t0 = time.perf_counter()
    for i in range(0, len(labels), batch):
        y = labels[i:i + batch]
        x = torch.randn((len(y), *shape), generator=gen)
        uncond = torch.full_like(y, null_label) if use_cfg else None
        x = fn(denoiser, x, schedule, steps=steps, cond=y, uncond=uncond, guidance=guidance if use_cfg else None,
               generator=gen, **kwargs)
        out.append(x.float().clamp(-1, 1))
        if progress is not None:
            progress(min(i + batch, len(labels)), len(labels))
    return torch.cat(out), labels, time.perf_counter() - t0
