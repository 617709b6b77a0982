"""Pixel-space DDPM models on disk: diffusers ``DDPMPipeline`` folders, bare ``UNet2DModel`` folders and fastdiff
training runs, read into :class:`PixelComponents`; the pipeline folder written back.

A pipeline folder is diffusers' layout, so the files are useful beyond fastdiff::

    model_index.json
    unet/config.json + diffusion_pytorch_model.safetensors     (diffusers UNet2DModel)
    scheduler/scheduler_config.json                            (diffusers DDPMScheduler: betas, prediction)

A bare UNet2DModel folder takes the DDPM paper's defaults (linear betas, eps prediction); a training run folder
its latest good checkpoint's EMA weights. The bundled default model (Fashion-MNIST, 32x32, 10 classes) lives in
``fastdiff/assets/fashion32``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fastdiff.io.diffusers_unet2d import load_unet2d, save_unet2d
from fastdiff.io.run_checkpoint import load_run_model
from fastdiff.models.unet2d import UNet2D
from fastdiff.samplers import NoiseSchedule, linear_schedule, normalize_prediction

__all__ = ["DEFAULT_GUIDANCE", "PixelComponents", "bundled_model_dir", "load_pixel_components", "pixel_schedule",
           "save_pixel_folder"]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# Guidance scale for models whose folder does not name one (the scale most class-conditional DDPM write-ups use).
DEFAULT_GUIDANCE = 3.0


def bundled_model_dir() -> Path:
    """The default model shipped inside the package."""
    return ASSETS / "fashion32"


@dataclass
class PixelComponents:
    """A pixel-space network and what is needed to sample it.

    ``schedule`` carries the sampling settings of the model's scheduler config (spacing, x0 clamp);
    ``default_guidance`` is the guidance scale the model samples best at (measured; stored in
    ``unet/config.json`` as ``_fastdiff.default_guidance``)."""

    unet: UNet2D
    schedule: NoiseSchedule
    prediction: str
    default_guidance: float | None = DEFAULT_GUIDANCE
    source: str = ""


def pixel_schedule(schedule: NoiseSchedule, clip_sample: float | None = 1.0) -> NoiseSchedule:
    """``schedule`` with the sampling settings of fastdiff's pixel models: trailing timesteps unless it names a
    spacing (Lin et al. 2023: the first step at t = T-1), and DDPM/DDIM's x0 estimate clamped to
    ``[-clip_sample, clip_sample]`` (1: the images' range; None: no clamp)."""
    return schedule.with_sampling(spacing=schedule.spacing or "trailing", clip_sample=clip_sample)


def save_pixel_folder(c: PixelComponents, folder: str | os.PathLike, *, dtype: torch.dtype | None = torch.float16,
                      card: str | None = None) -> Path:
    """Write the pipeline folder (diffusers layout). ``dtype`` casts the weights (fp16 halves the file)."""
    folder = Path(folder)
    save_unet2d(c.unet, folder / "unet", dtype=dtype)
    if c.default_guidance != DEFAULT_GUIDANCE:
        cfg_path = folder / "unet" / "config.json"
        d = json.loads(cfg_path.read_text())
        d.setdefault("_fastdiff", {})["default_guidance"] = c.default_guidance
        cfg_path.write_text(json.dumps(d, indent=2))
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(pixel_schedule(c.schedule, c.schedule.clip_sample).to_diffusers_config(c.prediction), indent=2))
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
         "scheduler": ["diffusers", "DDPMScheduler"]}, indent=2))
    if card is not None:
        (folder / "README.md").write_text(card)
    return folder


def load_pixel_components(path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32) -> PixelComponents:
    """A pipeline folder, a bare UNet2DModel folder, or a fastdiff training run folder (None: the bundled
    default model). Errors say what the path is missing."""
    p = Path(path) if path is not None else bundled_model_dir()
    if not p.exists():
        if path is None:
            raise FileNotFoundError(f"the bundled default model is missing from this installation ({p}); "
                                    "reinstall fastdiff or pass a model path")
        raise FileNotFoundError(f"model path {p} does not exist")
    if (p / "latest.json").is_file():  # a training run
        run = load_run_model(p)
        return PixelComponents(run.unet.to(device=device, dtype=dtype), pixel_schedule(run.schedule), run.prediction,
                               source=f"{p} (step {run.step}, EMA)")
    if (p / "unet" / "config.json").is_file():
        unet = load_unet2d(p / "unet", dtype=dtype, device=device)
        sc = p / "scheduler" / "scheduler_config.json"
        if sc.is_file():
            d = json.loads(sc.read_text())
            sched = NoiseSchedule.from_diffusers_config(d)
            sched, pred = pixel_schedule(sched, sched.clip_sample), normalize_prediction(d.get("prediction_type", "epsilon"))
        else:
            sched, pred = pixel_schedule(linear_schedule()), "eps"
        ext = json.loads((p / "unet" / "config.json").read_text()).get("_fastdiff", {})
        return PixelComponents(unet, sched, pred, ext.get("default_guidance", DEFAULT_GUIDANCE), source=str(p))
    if (p / "config.json").is_file():
        return PixelComponents(load_unet2d(p, dtype=dtype, device=device), pixel_schedule(linear_schedule()), "eps",
                               source=str(p))
    raise ValueError(f"{p} is neither a pipeline folder (model_index.json, unet/, scheduler/), a UNet2DModel "
                     "folder (config.json + diffusion_pytorch_model.safetensors) nor a fastdiff run folder "
                     "(latest.json)")
