"""Adapt a trained fastdiff model to what the evaluation's sampling loop needs (one boundary module)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastdiff.samplers import Denoiser

__all__ = ["SamplingModel", "load_for_sampling"]


@dataclass
class SamplingModel:
    denoiser: Denoiser
    schedule: Any
    num_classes: int
    null_label: int | None
    default_guidance: float | None
    description: str


def load_for_sampling(path: str | os.PathLike, *, use_ema: bool = True, precision: str = "bf16") -> SamplingModel:
    """A training run folder (``fastdiff train``'s checkpoints) -> its EMA network, schedule and prediction.

    ``precision="bf16"`` runs the network under bf16 autocast (the sampler's state and arithmetic stay fp32),
    as the trainer's own sample grids do; ``"fp32"`` runs it in fp32.
    """
    from fastdiff.io.run_checkpoint import load_run_model

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint or run folder: {path}")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be 'bf16' or 'fp32', got {precision!r}")
    run = load_run_model(path, use_ema=use_ema)
    unet = run.unet
    cfg = unet.config
    if not cfg.num_classes:
        raise ValueError(f"{path}: the model is not class-conditional; conditional accuracy needs class labels")
    if (cfg.in_channels, cfg.sample_size) != (1, 32):
        raise ValueError(f"{path}: the evaluation classifier reads 1x32x32 images; this model makes "
                         f"{cfg.in_channels}x{cfg.sample_size}x{cfg.sample_size}")

    def net(x, t, y):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            return unet(x, t, y)

    null = cfg.null_label if cfg.null_class else None
    guidance = run.train.get("sample_guidance") if null is not None else None
    return SamplingModel(Denoiser(net, run.prediction), run.schedule, cfg.num_classes, null, guidance,
                         f"{path} step {run.step} ({'EMA' if use_ema else 'raw'} weights, {precision})")
