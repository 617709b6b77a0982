"""Export a training run as a diffusers-layout model folder (what gets shipped as the bundled model).

    out/
      unet/config.json, unet/diffusion_pytorch_model.safetensors   (EMA weights, fp16 by default)
      scheduler/scheduler_config.json                               (DDPMScheduler: betas, prediction type)
      model_index.json                                              (so diffusers' DDPMPipeline opens it too)
      README.md                                                     (model card: config, data, training)

Load it back with :func:`load_exported` (fastdiff) or ``diffusers.UNet2DModel.from_pretrained(out / "unet")``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fastdiff.io.diffusers_unet2d import load_unet2d, save_unet2d
from fastdiff.samplers.schedules import NoiseSchedule
from fastdiff.train.trainer import RunModel, load_run_model

__all__ = ["export_run", "load_exported", "scheduler_config"]

_DIFFUSERS_PRED = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
_DIFFUSERS_BETAS = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


def scheduler_config(train: dict) -> dict:
    """diffusers ``DDPMScheduler`` config equal to the run's schedule and prediction."""
    cfg = {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": train["num_train_timesteps"],
        "beta_schedule": _DIFFUSERS_BETAS[train["schedule"]],
        "prediction_type": _DIFFUSERS_PRED[train["prediction"]],
        "variance_type": "fixed_small",
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "timestep_spacing": "trailing",
    }
    if train["schedule"] == "linear":
        cfg.update(beta_start=1e-4, beta_end=0.02)
    elif train["schedule"] == "scaled_linear":
        cfg.update(beta_start=0.00085, beta_end=0.012)
    return cfg


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, *, dtype: torch.dtype = torch.float16,
               use_ema: bool = True, notes: str = "") -> Path:
    run = load_run_model(run_dir, use_ema=use_ema)
    out = Path(out)
    save_unet2d(run.unet, out / "unet", dtype=dtype)
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config(run.train), indent=2))
    (out / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
         "scheduler": ["diffusers", "DDPMScheduler"]}, indent=2))
    state = json.loads((Path(run_dir) / f"ckpt-{run.step:07d}.json").read_text())
    c = run.unet.config
    t = run.train
    card = f"""# fastdiff {t['model']} ({t['dataset']}, class-conditional)

- Architecture: UNet2D, channels {list(c.block_out_channels)}, {c.layers_per_block} ResBlocks per level,
  blocks down {list(c.down_block_types)}, {c.num_classes} classes + null class (classifier-free guidance),
  {run.unet.num_parameters() / 1e6:.2f}M parameters, {c.in_channels}x{c.sample_size}x{c.sample_size}.
- Classes: {', '.join(f'{i}={n}' for i, n in enumerate(c.class_names))}
- Objective: {t['prediction']}-prediction, {t['schedule']} schedule, T={t['num_train_timesteps']},
  class dropout {t['class_dropout']}.
- Training: {run.step} steps x batch {t['batch_size'] * t['grad_accum']} = {run.step * t['batch_size'] * t['grad_accum']:,}
  images, AdamW lr {t['lr']} (warm-up {t['warmup_steps']}), grad clip {t['grad_clip']}, EMA {t['ema_decay']},
  precision {t['precision']}, {state.get('train_seconds', 0) / 3600:.2f} h of training on CPU
  (torch {state.get('torch', '?')}, {t['threads']} thread(s)), seed {t['seed']}.
- Weights: {'EMA' if use_ema else 'raw'}, stored as {str(dtype).replace('torch.', '')}.
- Data: Fashion-MNIST train split (60,000 images, 28x28 centred on a 32x32 black canvas), scaled to [-1, 1].
{notes}
"""
    (out / "README.md").write_text(card)
    return out


def load_exported(folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> RunModel:
    """An exported folder -> :class:`~fastdiff.train.trainer.RunModel` (UNet in ``dtype``, schedule, prediction)."""
    folder = Path(folder)
    unet = load_unet2d(folder / "unet", dtype=dtype)
    sched_cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    inv = {v: k for k, v in _DIFFUSERS_PRED.items()}
    pred = sched_cfg.get("prediction_type", "epsilon")
    if pred not in inv:
        raise ValueError(f"{folder}: unsupported prediction_type {pred!r}")
    return RunModel(unet.requires_grad_(False), NoiseSchedule.from_diffusers_config(sched_cfg), inv[pred], -1, {})
