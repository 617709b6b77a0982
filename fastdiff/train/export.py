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

from fastdiff.io.pixel_folder import DEFAULT_GUIDANCE, PixelComponents, load_pixel_components, pixel_schedule, save_pixel_folder
from fastdiff.io.run_checkpoint import RunModel, load_run_model
from fastdiff.samplers import make_schedule

__all__ = ["export_run", "export_sd1", "load_exported", "scheduler_config"]


def scheduler_config(train: dict) -> dict:
    """diffusers ``DDPMScheduler`` config equal to a run's schedule and prediction (``train``: the run's
    TrainConfig as a dict), with the sampling settings of an exported pixel model."""
    return pixel_schedule(make_schedule(train["schedule"], train["num_train_timesteps"])).to_diffusers_config(
        train["prediction"])


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, *, dtype: torch.dtype = torch.float16,
               use_ema: bool = True, notes: str = "", default_guidance: float | None = None,
               clip: float | None = 1.0) -> Path:
    run = load_run_model(run_dir, use_ema=use_ema)
    out = Path(out)
    state = json.loads((Path(run_dir) / f"ckpt-{run.step:07d}.json").read_text())
    c = run.unet.config
    t = run.train
    condition = (state.get("arch") or {}).get("condition")
    labels = (f"{c.num_classes} classes + null class (classifier-free guidance)" if c.num_classes
              else "no class labels")
    lines = [f"- Classes: {', '.join(f'{i}={n}' for i, n in enumerate(c.class_names))}"] if c.num_classes else []
    if condition is not None:
        params = ", ".join(f"{k}={v}" for k, v in (condition.get(condition["kind"]) or {}).items())
        lines.append(f"- Condition: the {condition['kind']} image as extra input channels"
                     + (f" (`fastdiff.sketch(image, {params})`)" if condition["kind"] == "sketch" else "")
                     + f", dropped to zeros for {t['class_dropout']:.0%} of the training images (classifier-free "
                       "guidance contrasts it with zeros).")
    extra = "\n".join(lines)
    card = f"""# fastdiff {t['model']} ({t['dataset']}, {t.get('conditioning', 'class')}-conditional)

- Architecture: UNet2D, channels {list(c.block_out_channels)}, {c.layers_per_block} ResBlocks per level,
  blocks down {list(c.down_block_types)}, {labels},
  {run.unet.num_parameters() / 1e6:.2f}M parameters, {c.in_channels}x{c.sample_size}x{c.sample_size} input.
{extra}
- Objective: {t['prediction']}-prediction, {t['schedule']} schedule, T={t['num_train_timesteps']},
  condition dropout {t['class_dropout']}.
- Training: {run.step} steps x batch {t['batch_size'] * t['grad_accum']} = {run.step * t['batch_size'] * t['grad_accum']:,}
  images, AdamW lr {t['lr']} (warm-up {t['warmup_steps']}), grad clip {t['grad_clip']}, EMA {t['ema_decay']},
  precision {t['precision']}, {state.get('train_seconds', 0) / 3600:.2f} h of training on CPU
  (torch {state.get('torch', '?')}, {t['threads']} thread(s)), seed {t['seed']}.
- Weights: {'EMA' if use_ema else 'raw'}, stored as {str(dtype).replace('torch.', '')}.
- Data: Fashion-MNIST train split (60,000 images, 28x28 centred on a 32x32 black canvas), scaled to [-1, 1].
{notes}
"""
    # clip: the DDPM/DDIM x0 clamp (None: off); default_guidance: the scale measured best for this model
    # (fastdiff eval), kept in its folder
    c = PixelComponents(run.unet, pixel_schedule(run.schedule, clip), run.prediction,
                        DEFAULT_GUIDANCE if default_guidance is None else default_guidance)
    folder = save_pixel_folder(c, out, dtype=dtype, card=card)
    if condition is not None:  # an image-conditioned run: the pipeline rebuilds its condition from this record
        cfg_path = folder / "unet" / "config.json"
        d = json.loads(cfg_path.read_text())
        d.setdefault("_fastdiff", {})["condition"] = condition
        cfg_path.write_text(json.dumps(d, indent=2))
    return folder


def load_exported(folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> RunModel:
    """An exported folder -> :class:`~fastdiff.train.trainer.RunModel` (UNet in ``dtype``, schedule, prediction),
    read by :func:`fastdiff.io.pixel_folder.load_pixel_components` (the one reader of pipeline folders)."""
    pipe = load_pixel_components(folder, dtype=dtype)
    return RunModel(pipe.unet.requires_grad_(False), pipe.schedule, pipe.prediction, -1, {})


def export_sd1(run_dir: str | os.PathLike, out: str | os.PathLike, *, use_ema: bool = True,
               dtype: torch.dtype | None = None, defaults: dict | None = None) -> Path:
    """A latent, text-conditioned run (``conditioning="text"`` with an autoencoder) as an SD1 diffusers folder:
    ``unet/`` (UNet2DConditionModel), ``text_encoder/`` (CLIPTextModel), ``vae/`` (the run's autoencoder, its
    measured ``scaling_factor`` in the config), ``tokenizer/`` (the bundled CLIP tokenizer), ``scheduler/`` (a
    DDPMScheduler config of the run's schedule and prediction) and ``model_index.json``, which
    ``diffusers.StableDiffusionPipeline.from_pretrained`` and :func:`fastdiff.io.sd_checkpoint.load_sd1_diffusers`
    both open. ``defaults`` (sampler, steps, guidance) are stored in ``model_index.json`` as ``_fastdiff.defaults``:
    what fastdiff's pipeline uses when not told; by default the settings of the run's sample grids (DDIM,
    ``sample_steps``, ``sample_guidance``)."""
    from fastdiff.io.sd_checkpoint import SD1Components, save_sd1_diffusers
    from fastdiff.models.clip_tokenizer import CLIPTokenizer
    from fastdiff.io.run_checkpoint import load_checkpoint
    from fastdiff.train.latents import SNAPSHOT_DIR, load_autoencoder
    from fastdiff.train.trainer import build_model

    model_sd, ema_sd, _, state = load_checkpoint(run_dir)
    arch, train = state.get("arch") or {}, state["train"]
    if "unet_sd" not in arch or "vae" not in arch:
        raise ValueError(f"{run_dir}: export_sd1 needs a latent text-conditioned run (conditioning text with an "
                         "autoencoder)")
    if train["schedule"] == "flow":
        raise ValueError(f"{run_dir}: a rectified-flow run has no SD1 (DDPM) scheduler; export_sd1 writes SD1 folders")
    if defaults is None:
        defaults = {"sampler": "ddim", "steps": train["sample_steps"], "guidance": train["sample_guidance"]}
    net = build_model(arch)
    net.load_state_dict(ema_sd if use_ema else model_sd, strict=True)
    sched = pixel_schedule(make_schedule(train["schedule"], train["num_train_timesteps"]), None)
    c = SD1Components(net.unet.eval(), load_autoencoder(Path(run_dir) / SNAPSHOT_DIR), net.text_encoder.eval(),
                      CLIPTokenizer.from_bundled(), sched.to_diffusers_config(train["prediction"]), defaults)
    save_sd1_diffusers(c, out, dtype=dtype)
    return Path(out)
