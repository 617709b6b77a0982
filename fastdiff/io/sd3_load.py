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

Loading is strict (missing / unexpected keys are listed) and never executes code.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Mapping

import torch

from fastdiff.io.sd_checkpoint import (VAE_PREFIX, CheckpointError, _build, _cpu_sd, _fmt, _is_vae_attn_matrix,
                                       _read_json, _rename, _weights_in, clip_text_state, infer_clip_config,
                                       infer_vae_config, load_state_dict_strict, read_state_dict, vae_key_to_original,
                                       write_component)
from fastdiff.models.clip_text import CLIP_BIGG14, CLIP_L14_PROJ, CLIPTextConfig, CLIPTextModel
from fastdiff.models.clip_tokenizer import CLIPTokenizer
from fastdiff.models.vae import AutoencoderKL, VAEConfig

__all__ = ["MMDIT_PREFIX", "CLIP_L_PREFIX", "CLIP_G_PREFIX", "T5_PREFIX", "is_sd3_state_dict", "load_sd3",
           "load_sd3_diffusers", "load_sd3_single_file", "save_sd3_diffusers", "save_sd3_single_file"]

MMDIT_PREFIX = "model.diffusion_model."
CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
_SD3_VAE = dict(scaling_factor=1.5305, shift_factor=0.0609)


def is_sd3_state_dict(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(MMDIT_PREFIX + "joint_blocks.") for k in sd)


# ------------------------------------------------------------------------------------------------ CLIP towers
def _load_clip(sd: Mapping[str, torch.Tensor], cfg: CLIPTextConfig, what: str, dtype, device) -> CLIPTextModel:
    sd = clip_text_state(sd)
    if "text_projection.weight" not in sd:  # SD3 single files keep CLIP-L unprojected (diffusers: identity)
        sd["text_projection.weight"] = torch.eye(cfg.hidden_size, cfg.projection_dim or cfg.hidden_size)
    return load_state_dict_strict(_build(CLIPTextModel, cfg), sd, what, dtype=dtype, device=device).eval()


# ------------------------------------------------------------------------------------------------- the VAE
def _load_vae_original(sd: Mapping[str, torch.Tensor], dtype, device) -> AutoencoderKL:
    cfg = infer_vae_config(sd, **_SD3_VAE)
    vae = _build(AutoencoderKL, cfg)
    to_new = {vae_key_to_original(k, cfg): k for k in vae.state_dict()}
    vsd = _rename(sd, to_new, VAE_PREFIX)
    vsd = {k: (v[:, :, 0, 0] if _is_vae_attn_matrix(k) and v.dim() == 4 else v) for k, v in vsd.items()}
    return load_state_dict_strict(vae, vsd, "VAE (first_stage_model.*)", dtype=dtype, device=device).eval()


def _t5_tokenizer(folder: Path | None):
    from fastdiff.models.t5_tokenizer import T5Tokenizer

    if folder is not None and folder.is_dir():
        return T5Tokenizer.from_pretrained(folder)
    return T5Tokenizer.from_bundled()


def _no_t5_notice(where: str) -> None:
    warnings.warn(f"{where} has no T5 text encoder: its part of the prompt embedding is zeros, as SD3 allows "
                  "(prompts are followed less closely)", stacklevel=4)


# ----------------------------------------------------------------------------------------------- entry point
def load_sd3(path: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32, device="cpu",
             text_encoder_3: bool = True, text_encoders: str | os.PathLike | None = None):
    """A :class:`~fastdiff.pipelines.sd3.StableDiffusion3` from a diffusers folder or an original single file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such checkpoint file or folder: {p}")
    if p.is_dir():
        return load_sd3_diffusers(p, dtype=dtype, device=device, text_encoder_3=text_encoder_3)
    return load_sd3_single_file(p, dtype=dtype, device=device, text_encoder_3=text_encoder_3,
                                text_encoders=text_encoders)


def load_sd3_diffusers(folder: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32, device="cpu",
                       variant: str | None = None, text_encoder_3: bool = True):
    """A diffusers StableDiffusion3Pipeline folder -> fastdiff pipeline (strict)."""
    from fastdiff.io.t5_checkpoint import load_t5_encoder
    from fastdiff.models.mmdit import MMDiT, MMDiTConfig
    from fastdiff.pipelines.sd3 import SD3_SCHEDULER_CONFIG, StableDiffusion3

    folder = Path(folder)
    index = _read_json(folder / "model_index.json")
    cls = index.get("_class_name", "")
    if not cls.startswith("StableDiffusion3"):
        raise CheckpointError(f"{folder}: model_index.json names {cls!r}, not a StableDiffusion3Pipeline")
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        if not (folder / part).is_dir():
            raise CheckpointError(f"{folder}: missing the {part}/ folder")
    try:
        mcfg = MMDiTConfig.from_diffusers(_read_json(folder / "transformer" / "config.json"))
        vcfg = VAEConfig.from_diffusers(_read_json(folder / "vae" / "config.json"))
        lcfg = CLIPTextConfig.from_transformers(_read_json(folder / "text_encoder" / "config.json"))
        gcfg = CLIPTextConfig.from_transformers(_read_json(folder / "text_encoder_2" / "config.json"))
    except ValueError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    transformer = load_state_dict_strict(
        _build(MMDiT, mcfg), _weights_in(folder / "transformer", "diffusion_pytorch_model", variant), "transformer/",
        dtype=dtype, device=device).eval()
    vae = load_state_dict_strict(_build(AutoencoderKL, vcfg),
                                 _weights_in(folder / "vae", "diffusion_pytorch_model", variant), "vae/",
                                 dtype=dtype, device=device).eval()
    clip_l = _load_clip(_weights_in(folder / "text_encoder", "model", variant), lcfg, "text_encoder/", dtype, device)
    clip_g = _load_clip(_weights_in(folder / "text_encoder_2", "model", variant), gcfg, "text_encoder_2/", dtype,
                        device)
    t5 = None
    if text_encoder_3 and (folder / "text_encoder_3").is_dir():
        t5 = load_t5_encoder(folder / "text_encoder_3", dtype=dtype, device=device)
    elif text_encoder_3:
        _no_t5_notice(str(folder))
    tok_l = (CLIPTokenizer.from_pretrained(folder / "tokenizer") if (folder / "tokenizer").is_dir()
             else CLIPTokenizer.from_bundled())
    tok_g = (CLIPTokenizer.from_pretrained(folder / "tokenizer_2") if (folder / "tokenizer_2").is_dir()
             else CLIPTokenizer.from_bundled(pad_token="!"))
    sched_path = folder / "scheduler" / "scheduler_config.json"
    sched = _read_json(sched_path) if sched_path.is_file() else dict(SD3_SCHEDULER_CONFIG)
    return StableDiffusion3(transformer, vae, clip_l, clip_g, t5, tok_l, tok_g, _t5_tokenizer(folder / "tokenizer_3"),
                            sched)


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
        raise CheckpointError(f"unexpected keys outside the MMDiT / VAE / text encoders: {_fmt(other)}")
    return parts


def load_sd3_single_file(path: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32, device="cpu",
                         text_encoder_3: bool = True, text_encoders: str | os.PathLike | None = None):
    """An original SD3 / SD3.5 single file -> fastdiff pipeline (strict). ``text_encoders``: a diffusers SD3
    folder to take the CLIP (and T5) towers from when the file has none."""
    from fastdiff.io.sd3_checkpoint import load_mmdit_original
    from fastdiff.io.t5_checkpoint import t5_from_state_dict
    from fastdiff.pipelines.sd3 import SD3_SCHEDULER_CONFIG, StableDiffusion3

    path = Path(path)
    sd = read_state_dict(path)
    if not is_sd3_state_dict(sd):
        raise CheckpointError(f"{path}: no SD3 MMDiT weights (model.diffusion_model.joint_blocks.*); "
                              "for Stable Diffusion 1.x files use fastdiff.load_pipeline, which recognises them")
    parts = _split_single_file(sd)
    del sd
    transformer = load_mmdit_original(parts["mmdit"], dtype=dtype, device=device)
    if not parts["vae"]:
        raise CheckpointError(f"{path}: no VAE weights (first_stage_model.*)")
    vae = _load_vae_original(parts["vae"], dtype, device)
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
            from fastdiff.io.t5_checkpoint import load_t5_encoder

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
    return StableDiffusion3(transformer, vae, clip_l, clip_g, t5, CLIPTokenizer.from_bundled(),
                            CLIPTokenizer.from_bundled(pad_token="!"), _t5_tokenizer(None), dict(SD3_SCHEDULER_CONFIG))


# ---------------------------------------------------------------------------------------------------- saving
def _state_to_save(model, dtype, *, tied_copies: bool = False) -> dict:
    """What a file holds of a component. T5 ties ``encoder.embed_tokens`` to ``shared``: transformers' folders
    store the table once (safetensors refuses aliased tensors); SD3 single files hold both names (diffusers'
    single-file loader reads ``encoder.embed_tokens`` and does not tie it), so ``tied_copies`` writes a copy."""
    sd = _cpu_sd(model, dtype)
    if "shared.weight" in sd and "encoder.embed_tokens.weight" in sd:
        if tied_copies:
            sd["encoder.embed_tokens.weight"] = sd["encoder.embed_tokens.weight"].clone()
        else:
            del sd["encoder.embed_tokens.weight"]
    return sd


def save_sd3_single_file(pipe, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                         include_text_encoders: bool = True) -> None:
    """The original layout (``.safetensors``): MMDiT + VAE (+ CLIP-L, CLIP-G, T5 when present)."""
    from safetensors.torch import save_file

    from fastdiff.io.sd3_checkpoint import mmdit_to_original

    out = mmdit_to_original(_cpu_sd(pipe.transformer, dtype), prefix=MMDIT_PREFIX)
    for k, v in _cpu_sd(pipe.vae, dtype).items():
        if _is_vae_attn_matrix(k):
            v = v[:, :, None, None].contiguous()  # LDM's attention projections are 1x1 convs
        out[VAE_PREFIX + vae_key_to_original(k, pipe.vae.config)] = v
    if include_text_encoders:
        for pre, m in ((CLIP_L_PREFIX, pipe.text_encoder), (CLIP_G_PREFIX, pipe.text_encoder_2),
                       (T5_PREFIX, pipe.text_encoder_3)):
            if m is not None:
                out.update({pre + k: v for k, v in _state_to_save(m, dtype, tied_copies=True).items()})
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: SD3 single files are written as .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata={"format": "pt"})


def save_sd3_diffusers(pipe, folder: str | os.PathLike, *, dtype: torch.dtype | None = None) -> None:
    """A diffusers StableDiffusion3Pipeline folder that diffusers' ``from_pretrained`` loads."""
    folder = Path(folder)
    parts = {"transformer": (pipe.transformer, pipe.transformer.config.to_diffusers(), "diffusion_pytorch_model"),
             "vae": (pipe.vae, pipe.vae.config.to_diffusers(), "diffusion_pytorch_model"),
             "text_encoder": (pipe.text_encoder, pipe.text_encoder.config.to_transformers(), "model"),
             "text_encoder_2": (pipe.text_encoder_2, pipe.text_encoder_2.config.to_transformers(), "model")}
    if pipe.text_encoder_3 is not None:
        parts["text_encoder_3"] = (pipe.text_encoder_3, pipe.text_encoder_3.config.to_transformers(), "model")
    for name, (model, cfg, stem) in parts.items():
        write_component(folder / name, cfg, _state_to_save(model, dtype), stem)
    pipe.tokenizer.save_pretrained(folder / "tokenizer")
    pipe.tokenizer_2.save_pretrained(folder / "tokenizer_2")
    pipe.tokenizer_3.save_pretrained(folder / "tokenizer_3")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    with open(folder / "scheduler" / "scheduler_config.json", "w") as f:
        json.dump(pipe.scheduler_config, f, indent=2)
    t5 = pipe.text_encoder_3 is not None
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1",
             "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "text_encoder_3": ["transformers", "T5EncoderModel"] if t5 else [None, None],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "tokenizer_3": ["transformers", "T5TokenizerFast"] if t5 else [None, None],
             "scheduler": ["diffusers", pipe.scheduler_config.get("_class_name", "FlowMatchEulerDiscreteScheduler")],
             "image_encoder": [None, None], "feature_extractor": [None, None]}
    with open(folder / "model_index.json", "w") as f:
        json.dump(index, f, indent=2)
