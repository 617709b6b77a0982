"""diffusers ``UNet2DModel`` folders <-> :class:`fastdiff.models.unet2d.UNet2D`.

A folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or ``.bin``), the layout of
google/ddpm-cifar10-32 (its ``unet`` sub-folder when a pipeline folder is given). fastdiff's module paths equal
diffusers' state_dict keys, so loading is a strict copy: every key present, none extra, every shape equal,
or an error listing what differs. Config options fastdiff does not implement are rejected by name.

fastdiff's own class-conditioning facts (real class count, whether the last embedding is the null class,
class names) travel in config.json under ``_fastdiff``: diffusers ignores keys starting with ``_``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from fastdiff.io.checkpoint import CheckpointError, load_component, read_config, state_to_save, write_component
from fastdiff.models.unet2d import UNet2D, UNet2DConfig

__all__ = ["config_from_diffusers", "config_to_diffusers", "load_unet2d", "save_unet2d"]


# diffusers config keys -> the value fastdiff implements (anything else is refused, never ignored).
_FIXED = {
    "time_embedding_type": "positional",
    "act_fn": "silu",
    "resnet_time_scale_shift": "default",
    "class_embed_type": None,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "attn_norm_num_groups": None,
    "num_train_timesteps": None,
}
_COPIED = ("sample_size", "in_channels", "out_channels", "block_out_channels", "down_block_types",
           "up_block_types", "layers_per_block", "attention_head_dim", "norm_num_groups", "norm_eps",
           "flip_sin_to_cos", "freq_shift", "downsample_padding", "mid_block_scale_factor", "add_attention",
           "dropout", "center_input_sample")


def config_from_diffusers(d: dict, where: str = "config.json") -> UNet2DConfig:
    cls = d.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise CheckpointError(f"{where}: _class_name is {cls!r}, expected 'UNet2DModel'")
    for k, want in _FIXED.items():
        if k in d and d[k] != want:
            raise CheckpointError(f"{where}: {k}={d[k]!r} is not supported by fastdiff's UNet2D (only {want!r})")
    sample_size = d.get("sample_size", 32)
    if isinstance(sample_size, (list, tuple)):
        if len(set(sample_size)) != 1:
            raise CheckpointError(f"{where}: non-square sample_size {sample_size} is not supported")
        sample_size = sample_size[0]
    kw = {k: d[k] for k in _COPIED if k in d}
    kw["sample_size"] = sample_size
    for k in ("block_out_channels", "down_block_types", "up_block_types"):
        if k in kw:
            kw[k] = tuple(kw[k])
    ext = d.get("_fastdiff", {})
    n_emb = d.get("num_class_embeds")
    if n_emb:
        null = bool(ext.get("null_class", False))
        kw.update(num_classes=n_emb - int(null), null_class=null, class_names=tuple(ext.get("class_names", ())))
    elif ext.get("null_class"):
        raise CheckpointError(f"{where}: _fastdiff.null_class set but num_class_embeds is missing")
    try:
        return UNet2DConfig(**kw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: {e}") from None


def config_to_diffusers(cfg: UNet2DConfig) -> dict:
    d = {"_class_name": "UNet2DModel"}
    for k in _COPIED:
        v = getattr(cfg, k)
        d[k] = list(v) if isinstance(v, tuple) else v
    d.update(time_embedding_type="positional", act_fn="silu", resnet_time_scale_shift="default",
             class_embed_type=None, num_class_embeds=cfg.num_class_embeds, downsample_type="conv",
             upsample_type="conv", attn_norm_num_groups=None)
    if cfg.num_classes:
        d["_fastdiff"] = {"null_class": cfg.null_class, "class_names": list(cfg.class_names)}
    return d


def _resolve(folder: Path) -> Path:
    if not folder.exists():
        raise CheckpointError(f"no such folder: {folder}")
    if not (folder / "config.json").is_file() and (folder / "unet" / "config.json").is_file():
        return folder / "unet"  # a pipeline folder (model_index.json + unet/ + scheduler/)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder}: no config.json (expected a diffusers UNet2DModel folder)")
    return folder


def load_unet2d(folder: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu") -> UNet2D:
    """A diffusers UNet2DModel folder -> fastdiff :class:`UNet2D` (eval mode), strictly."""
    folder = _resolve(Path(folder))
    cfg = read_config(folder / "config.json", lambda d: config_from_diffusers(d, str(folder / "config.json")))
    return load_component(folder, UNet2D, cfg, "diffusion_pytorch_model", dtype=dtype, device=device)


def save_unet2d(model: UNet2D, folder: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` as a diffusers UNet2DModel folder (config.json + safetensors), optionally cast."""
    folder = Path(folder)
    write_component(folder, config_to_diffusers(model.config), state_to_save(model, dtype), "diffusion_pytorch_model")
    return folder
