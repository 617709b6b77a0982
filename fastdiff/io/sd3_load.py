"""Stable Diffusion 3 / 3.5 files: diffusers folders and original single files, read and written.

* diffusers folders: ``model_index.json`` (``StableDiffusion3Pipeline``) with ``transformer/``, ``vae/``,
  ``text_encoder/`` (CLIP-L), ``text_encoder_2/`` (CLIP-G), optional ``text_encoder_3/`` (T5-XXL), the three
  tokenizer folders and ``scheduler/``. fastdiff's modules use diffusers/transformers names, so each is a strict
  copy; ``*.fp16.safetensors`` variants and sharded ``*.index.json`` weights are read too.
* original single files (``sd3_medium.safetensors``, ``sd3_medium_incl_clips[_t5xxlfp16].safetensors``,
  ``sd3.5_medium.safetensors``): ``model.diffusion_model.*`` (MMDiT, renamed by :mod:`fastdiff.io.sd3_checkpoint`),
  ``first_stage_model.*`` (VAE, LDM names as in SD1), and optionally ``text_encoders.clip_l.transformer.*``,
  ``text_encoders.clip_g.transformer.*``, ``text_encoders.t5xxl.transformer.*`` in transformers' own names.
  SD3 files store CLIP-L without its ``text_projection``; as in diffusers' single-file loader it is then the
  identity. A file without CLIP towers needs ``text_encoders=<a diffusers SD3 folder>`` to take them from.

Loading is strict (missing / unexpected keys are listed) and never executes code. Safetensors files are read
lazily, one tensor at a time into the target dtype (:func:`fastdiff.io.checkpoint.open_state_dict`).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import torch

from fastdiff.io.checkpoint import (
    VAE_PREFIX,
    CheckpointError,
    build_on_meta,
    clip_tokenizer_in,
    format_keys,
    load_component,
    load_state_dict_strict,
    open_pipeline_folder,
    open_state_dict,
    read_config,
    safetensors_keys,
    save_pipeline_folder,
    scheduler_config_in,
    state_to_save,
    vae_from_original,
    vae_to_original,
)
from fastdiff.io.sd3_checkpoint import MMDIT_PREFIX, load_mmdit_original, mmdit_to_original
from fastdiff.io.sd_checkpoint import clip_text_state, infer_clip_config
from fastdiff.io.t5_checkpoint import load_t5_encoder, t5_from_state_dict, t5_state_to_save
from fastdiff.models.clip_text import CLIP_BIGG14, CLIP_L14_PROJ, CLIPTextConfig, CLIPTextModel
from fastdiff.models.clip_tokenizer import CLIPTokenizer
from fastdiff.models.mmdit import MMDiT, MMDiTConfig
from fastdiff.models.t5_tokenizer import T5Tokenizer
from fastdiff.models.vae import AutoencoderKL, VAEConfig

__all__ = ["MMDIT_PREFIX", "CLIP_L_PREFIX", "CLIP_G_PREFIX", "T5_PREFIX", "SD3_SCHEDULER_CONFIG", "SD3Components",
           "is_sd3_keys", "load_sd3_components", "load_sd3_diffusers", "load_sd3_single_file", "save_sd3_diffusers",
           "save_sd3_single_file"]

CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
_SD3_VAE = dict(scaling_factor=1.5305, shift_factor=0.0609)
# diffusers' stabilityai/stable-diffusion-3-medium-diffusers scheduler/scheduler_config.json
SD3_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                        "shift": 3.0}


@dataclass
class SD3Components:
    """What an SD3 checkpoint holds, as fastdiff modules (``text_encoder_3`` and its tokenizer may be None)."""

    transformer: MMDiT
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModel
    text_encoder_3: Any
    tokenizer: Any
    tokenizer_2: Any
    tokenizer_3: Any
    scheduler_config: dict


def is_sd3_keys(keys) -> bool:
    """Whether key names (a state dict's or a safetensors header's) hold SD3 MMDiT blocks."""
    return any(k.startswith(MMDIT_PREFIX + "joint_blocks.") for k in keys)


# ------------------------------------------------------------------------------------------------ CLIP towers
def _load_clip(sd: Mapping[str, torch.Tensor], cfg: CLIPTextConfig, what: str, dtype, device) -> CLIPTextModel:
    sd = _with_projection(clip_text_state(sd), cfg)
    return load_state_dict_strict(build_on_meta(CLIPTextModel, cfg), sd, what, dtype=dtype, device=device).eval()


def _with_projection(sd: dict, cfg: CLIPTextConfig) -> dict:
    if "text_projection.weight" not in sd:  # SD3 single files keep CLIP-L unprojected (diffusers: identity)
        sd["text_projection.weight"] = torch.eye(cfg.hidden_size, cfg.projection_dim or cfg.hidden_size)
    return sd


def _t5_tokenizer(folder: Path | None):
    if folder is not None and folder.is_dir():
        return T5Tokenizer.from_pretrained(folder)
    return T5Tokenizer.from_bundled()


def _no_t5_notice(where: str) -> None:
    warnings.warn(f"{where} has no T5 text encoder: its part of the prompt embedding is zeros, as SD3 allows "
                  "(prompts are followed less closely)", stacklevel=4)


# ----------------------------------------------------------------------------------------------- entry point
def load_sd3_components(path: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32, device="cpu",
                        text_encoder_3: bool = True, text_encoders: str | os.PathLike | None = None) -> SD3Components:
    """SD3 / SD3.5 components from a diffusers folder or an original single file (``text_encoders``: a diffusers
    SD3 folder to take the text encoders from when a single file has none)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such checkpoint file or folder: {p}")
    if p.is_dir():
        return load_sd3_diffusers(p, dtype=dtype, device=device, text_encoder_3=text_encoder_3)
    return load_sd3_single_file(p, dtype=dtype, device=device, text_encoder_3=text_encoder_3,
                                text_encoders=text_encoders)


def load_sd3_diffusers(folder: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32, device="cpu",
                       variant: str | None = None, text_encoder_3: bool = True) -> SD3Components:
    """A diffusers StableDiffusion3Pipeline folder -> fastdiff modules (strict)."""
    folder = Path(folder)
    cls = open_pipeline_folder(folder, ("transformer", "vae", "text_encoder", "text_encoder_2"))
    if not cls.startswith("StableDiffusion3"):
        raise CheckpointError(f"{folder}: model_index.json names {cls!r}, not a StableDiffusion3Pipeline")
    mcfg = read_config(folder / "transformer" / "config.json", MMDiTConfig.from_diffusers)
    vcfg = read_config(folder / "vae" / "config.json", VAEConfig.from_diffusers)
    lcfg = read_config(folder / "text_encoder" / "config.json", CLIPTextConfig.from_transformers)
    gcfg = read_config(folder / "text_encoder_2" / "config.json", CLIPTextConfig.from_transformers)
    kw = dict(variant=variant, dtype=dtype, device=device)
    transformer = load_component(folder / "transformer", MMDiT, mcfg, "diffusion_pytorch_model", **kw)
    vae = load_component(folder / "vae", AutoencoderKL, vcfg, "diffusion_pytorch_model", **kw)
    clip_l = load_component(folder / "text_encoder", CLIPTextModel, lcfg, "model",
                            state=lambda sd: _with_projection(clip_text_state(sd), lcfg), **kw)
    clip_g = load_component(folder / "text_encoder_2", CLIPTextModel, gcfg, "model",
                            state=lambda sd: _with_projection(clip_text_state(sd), gcfg), **kw)
    t5 = None
    if text_encoder_3 and (folder / "text_encoder_3").is_dir():
        t5 = load_t5_encoder(folder / "text_encoder_3", dtype=dtype, device=device)
    elif text_encoder_3:
        _no_t5_notice(str(folder))
    return SD3Components(transformer, vae, clip_l, clip_g, t5, clip_tokenizer_in(folder / "tokenizer"),
                         clip_tokenizer_in(folder / "tokenizer_2", pad_token="!"),
                         _t5_tokenizer(folder / "tokenizer_3"), scheduler_config_in(folder, SD3_SCHEDULER_CONFIG))


def _split_single_file(sd: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    parts: dict[str, dict] = {"mmdit": {}, "vae": {}, "clip_l": {}, "clip_g": {}, "t5": {}}
    prefixes = {MMDIT_PREFIX: "mmdit", VAE_PREFIX: "vae", CLIP_L_PREFIX: "clip_l", CLIP_G_PREFIX: "clip_g",
                T5_PREFIX: "t5"}
    other = []
    for k, v in sd.items():
        for pre, name in prefixes.items():
            if k.startswith(pre):
                parts[name][k[len(pre):]] = v
                break
        else:
            other.append(k)
    if other:
        raise CheckpointError(f"unexpected keys outside the MMDiT / VAE / text encoders: {format_keys(other)}")
    return parts


def load_sd3_single_file(path: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32, device="cpu",
                         text_encoder_3: bool = True, text_encoders: str | os.PathLike | None = None) -> SD3Components:
    """An original SD3 / SD3.5 single file -> fastdiff modules (strict). ``text_encoders``: a diffusers SD3
    folder to take the CLIP (and T5) towers from when the file has none."""
    path = Path(path)
    keys = safetensors_keys(path)
    if keys is not None and not is_sd3_keys(keys):  # decided from the header, before reading the tensors
        raise CheckpointError(f"{path}: no SD3 MMDiT weights (model.diffusion_model.joint_blocks.*); "
                              "for Stable Diffusion 1.x files use fastdiff.load_pipeline, which recognises them")
    sd = open_state_dict(path)  # safetensors: lazy, each tensor read as its model takes it
    if not is_sd3_keys(sd):
        raise CheckpointError(f"{path}: no SD3 MMDiT weights (model.diffusion_model.joint_blocks.*); "
                              "for Stable Diffusion 1.x files use fastdiff.load_pipeline, which recognises them")
    parts = _split_single_file(sd)
    del sd
    transformer = load_mmdit_original(parts["mmdit"], dtype=dtype, device=device)
    if not parts["vae"]:
        raise CheckpointError(f"{path}: no VAE weights (first_stage_model.*)")
    vae = vae_from_original(parts["vae"], what="VAE (first_stage_model.*)", dtype=dtype, device=device, **_SD3_VAE)
    if parts["clip_l"] and parts["clip_g"]:
        lsd, gsd = clip_text_state(parts["clip_l"]), clip_text_state(parts["clip_g"])
        # SD3 towers are projected; CLIP-L's projection is absent from the file (then the identity, see above)
        lcfg, gcfg = infer_clip_config(lsd, CLIP_L14_PROJ.hidden_act), infer_clip_config(gsd, CLIP_BIGG14.hidden_act)
        lcfg = replace(lcfg, projection_dim=lcfg.projection_dim or lcfg.hidden_size)
        gcfg = replace(gcfg, projection_dim=gcfg.projection_dim or gcfg.hidden_size)
        clip_l = _load_clip(lsd, lcfg, "CLIP-L (text_encoders.clip_l.*)", dtype, device)
        clip_g = _load_clip(gsd, gcfg, "CLIP-G (text_encoders.clip_g.*)", dtype, device)
        t5 = None
        if text_encoder_3 and parts["t5"]:
            t5 = t5_from_state_dict(parts["t5"], dtype=dtype, device=device, what="T5 (text_encoders.t5xxl.*)")
        elif text_encoder_3 and text_encoders is not None and (Path(text_encoders) / "text_encoder_3").is_dir():
            t5 = load_t5_encoder(Path(text_encoders) / "text_encoder_3", dtype=dtype, device=device)
        elif text_encoder_3:
            _no_t5_notice(str(path))
    elif text_encoders is not None:
        donor = load_sd3_diffusers(text_encoders, dtype=dtype, device=device, text_encoder_3=text_encoder_3)
        clip_l, clip_g, t5 = donor.text_encoder, donor.text_encoder_2, donor.text_encoder_3
    else:
        raise CheckpointError(f"{path}: this SD3 file holds no CLIP text encoders (text_encoders.clip_l / clip_g). "
                              "Use a file that includes them (sd3_medium_incl_clips*.safetensors), a diffusers folder, "
                              "or pass text_encoders=<a diffusers SD3 folder> to take them from")
    return SD3Components(transformer, vae, clip_l, clip_g, t5, CLIPTokenizer.from_bundled(),
                         CLIPTokenizer.from_bundled(pad_token="!"), _t5_tokenizer(None), dict(SD3_SCHEDULER_CONFIG))


# ---------------------------------------------------------------------------------------------------- saving
def save_sd3_single_file(c, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                         include_text_encoders: bool = True) -> None:
    """The original layout (``.safetensors``): MMDiT + VAE (+ CLIP-L, CLIP-G, T5 when present). ``c``: anything
    with the attributes of :class:`SD3Components` (the pipeline too)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: SD3 single files are written as .safetensors")
    out = mmdit_to_original(state_to_save(c.transformer, dtype), prefix=MMDIT_PREFIX)
    out.update(vae_to_original(state_to_save(c.vae, dtype), c.vae.config))
    if include_text_encoders:
        for pre, m in ((CLIP_L_PREFIX, c.text_encoder), (CLIP_G_PREFIX, c.text_encoder_2)):
            out.update({pre + k: v for k, v in state_to_save(m, dtype).items()})
        if c.text_encoder_3 is not None:
            out.update({T5_PREFIX + k: v for k, v in t5_state_to_save(c.text_encoder_3, dtype, tied_copies=True).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata={"format": "pt"})


def save_sd3_diffusers(c, folder: str | os.PathLike, *, dtype: torch.dtype | None = None) -> None:
    """A diffusers StableDiffusion3Pipeline folder that diffusers' ``from_pretrained`` loads."""
    components = {"transformer": (c.transformer.config.to_diffusers(), state_to_save(c.transformer, dtype),
                                  "diffusion_pytorch_model"),
                  "vae": (c.vae.config.to_diffusers(), state_to_save(c.vae, dtype), "diffusion_pytorch_model"),
                  "text_encoder": (c.text_encoder.config.to_transformers(), state_to_save(c.text_encoder, dtype),
                                   "model"),
                  "text_encoder_2": (c.text_encoder_2.config.to_transformers(),
                                     state_to_save(c.text_encoder_2, dtype), "model")}
    t5 = c.text_encoder_3 is not None
    if t5:
        components["text_encoder_3"] = (c.text_encoder_3.config.to_transformers(),
                                        t5_state_to_save(c.text_encoder_3, dtype), "model")
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1",
             "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "text_encoder_3": ["transformers", "T5EncoderModel"] if t5 else [None, None],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "tokenizer_3": ["transformers", "T5TokenizerFast"] if t5 else [None, None],
             "scheduler": ["diffusers", c.scheduler_config.get("_class_name", "FlowMatchEulerDiscreteScheduler")],
             "image_encoder": [None, None], "feature_extractor": [None, None]}
    tokenizers = {"tokenizer": c.tokenizer, "tokenizer_2": c.tokenizer_2, "tokenizer_3": c.tokenizer_3}
    save_pipeline_folder(folder, index, components, tokenizers, c.scheduler_config)
