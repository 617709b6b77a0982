"""Autoencoders as diffusers model folders: ``VQModel`` and ``AutoencoderKL``.

A folder holds ``config.json`` (diffusers' config of the class, ``_class_name`` naming it) and
``diffusion_pytorch_model.safetensors``; ``diffusers.VQModel.from_pretrained(folder)`` /
``diffusers.AutoencoderKL.from_pretrained(folder)`` open what :func:`save_autoencoder` writes, and
:func:`load_autoencoder` opens what diffusers' ``save_pretrained`` writes (strictly: a missing, unexpected or
misshapen tensor is an error that lists them).

The parameter names of :class:`~fastdiff.models.vq.VQModel` and :class:`~fastdiff.models.vae.AutoencoderKL` are
diffusers' own, so no key is renamed. Two things are fastdiff's only:

* the quantiser's EMA state (``quantize.ema_cluster_size``, ``quantize.ema_embed_sum``,
  ``quantize.steps_unused``) is training state and stays out of the folder; loading rebuilds it from the
  codebook (:meth:`~fastdiff.models.vq.VectorQuantizer.reset_ema`), a training run's own checkpoint keeps it;
* the quantiser's training settings (beta, EMA decay, smoothing, restart period) travel in ``config.json``
  under ``_fastdiff``, a key diffusers ignores (it skips keys that start with ``_``).

The KL autoencoder folder is the one :func:`fastdiff.io.sd_checkpoint.load_vae` also reads (SD's ``vae/``);
both go through :func:`fastdiff.io.checkpoint.load_component`.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import torch

from fastdiff.io.checkpoint import (CheckpointError, build_on_meta, component_weights, materialize,
                                    load_component, load_state_dict_strict, read_config, read_json, state_to_save,
                                    write_component)
from fastdiff.models.vae import AutoencoderKL, VAEConfig
from fastdiff.models.vq import VQConfig, VQModel

__all__ = ["save_autoencoder", "load_autoencoder", "load_vq_model", "WEIGHTS_STEM"]

WEIGHTS_STEM = "diffusion_pytorch_model"
_TRAINING_FIELDS = ("beta", "ema", "decay", "eps", "restart_after")
_EMA_KEYS = ("quantize.ema_cluster_size", "quantize.ema_embed_sum", "quantize.steps_unused")


def save_autoencoder(model: VQModel | AutoencoderKL, folder: str | os.PathLike, *,
                     dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as a diffusers ``VQModel`` or ``AutoencoderKL`` folder; floating tensors cast to ``dtype``
    (None: as they are). Returns the folder."""
    folder = Path(folder)
    if isinstance(model, VQModel):
        config = model.config.to_diffusers()
        config["_fastdiff"] = {k: getattr(model.config, k) for k in _TRAINING_FIELDS}
        weights = {k: v for k, v in state_to_save(model, dtype).items() if k not in _EMA_KEYS}
    elif isinstance(model, AutoencoderKL):
        config = model.config.to_diffusers()
        weights = state_to_save(model, dtype)
    else:
        raise TypeError(f"model must be a fastdiff VQModel or AutoencoderKL, got {type(model).__name__}")
    write_component(folder, config, weights, WEIGHTS_STEM)
    return folder


def _vq_config(raw: dict, where: Path) -> VQConfig:
    training = raw.get("_fastdiff") or {}
    unknown = sorted(set(training) - set(_TRAINING_FIELDS))
    if unknown:
        raise CheckpointError(f"{where}: unknown _fastdiff settings {unknown}; known: {', '.join(_TRAINING_FIELDS)}")
    try:
        return VQConfig.from_diffusers(raw, **training)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def load_vq_model(folder: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32,
                  device: str | torch.device = "cpu", variant: str | None = None, **training) -> VQModel:
    """A diffusers ``VQModel`` folder -> fastdiff :class:`VQModel` in eval mode, strictly. ``training``
    overrides the quantiser's training settings (``beta``, ``ema``, ``decay``, ``eps``, ``restart_after``)."""
    folder = Path(folder)
    raw = read_json(folder / "config.json")
    cfg = _vq_config(raw, folder / "config.json")
    if training:
        bad = sorted(set(training) - set(_TRAINING_FIELDS))
        if bad:
            raise TypeError(f"unknown training settings {bad}; known: {', '.join(_TRAINING_FIELDS)}")
        cfg = VQConfig(**{**asdict(cfg), **training})
    sd = component_weights(folder, WEIGHTS_STEM, variant)
    present = [k for k in _EMA_KEYS if k in sd]
    if present:
        raise CheckpointError(f"{folder}: unexpected keys {present} (EMA state is not part of a VQModel folder)")
    code = sd.get("quantize.embedding.weight")
    if code is not None:
        # EMA state consistent with the codebook (what VectorQuantizer.reset_ema sets), so the strict load is whole
        sd = dict(sd)
        sd["quantize.ema_cluster_size"] = torch.ones(code.shape[0])
        # the codebook is small (K x D): read it now (the streaming reader hands out unread tensors)
        sd["quantize.ema_embed_sum"] = materialize(code, torch.float32).clone()
        sd["quantize.steps_unused"] = torch.zeros(code.shape[0], dtype=torch.long)
    model = load_state_dict_strict(build_on_meta(VQModel, cfg), sd, f"VQModel {folder}", dtype=dtype, device=device)
    if cfg.ema:
        model.quantize.embedding.weight.requires_grad_(False)
    return model.eval()


def _from_run(run_dir: Path, *, dtype, device) -> AutoencoderKL:
    from fastdiff.io.run_checkpoint import load_checkpoint

    _, ema, _, state = load_checkpoint(run_dir)
    arch = state.get("arch") or {}
    if arch.get("kind") != "autoencoder" or "vae" not in arch:
        raise CheckpointError(f"{run_dir}: this run trained a {arch.get('kind', 'diffusion')} model, not a KL "
                              "autoencoder")
    vae = AutoencoderKL(VAEConfig(**arch["vae"]))
    vae.load_state_dict(ema, strict=True)
    return vae.to(device=device, dtype=dtype).eval()


def _resolve(folder: Path) -> Path:
    """The model folder itself, or the ``vqvae/`` / ``vae/`` part of a pipeline folder."""
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    if (folder / "config.json").is_file():
        return folder
    for part in ("vqvae", "vae"):
        if (folder / part / "config.json").is_file():
            return folder / part
    raise CheckpointError(f"{folder}: no config.json (expected a diffusers VQModel or AutoencoderKL folder, "
                          "or a pipeline folder with vqvae/ or vae/)")


def load_autoencoder(folder: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32,
                     device: str | torch.device = "cpu", variant: str | None = None) -> VQModel | AutoencoderKL:
    """The autoencoder a diffusers folder holds, chosen by its config's ``_class_name`` (``VQModel`` or
    ``AutoencoderKL``), or the EMA weights of a KL autoencoder training run (``fastdiff train --kind
    autoencoder``), in eval mode."""
    if (Path(folder) / "latest.json").is_file():
        return _from_run(Path(folder), dtype=dtype, device=device)
    folder = _resolve(Path(folder))
    cls = read_json(folder / "config.json").get("_class_name")
    if cls == "VQModel":
        return load_vq_model(folder, dtype=dtype, device=device, variant=variant)
    if cls == "AutoencoderKL":
        cfg = read_config(folder / "config.json", VAEConfig.from_diffusers)
        return load_component(folder, AutoencoderKL, cfg, WEIGHTS_STEM, variant=variant, dtype=dtype, device=device)
    raise CheckpointError(f"{folder / 'config.json'}: _class_name {cls!r}; expected 'VQModel' or 'AutoencoderKL'")
