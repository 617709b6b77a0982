"""Stable Diffusion 1.x checkpoints: reading and writing both layouts SD1 users have.

* Original single files (CompVis / A1111 / civitai style, ``.safetensors`` or ``.ckpt``): one state dict with
  ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE) and ``cond_stage_model.transformer.*``
  (CLIP text encoder) keys, optionally inside a ``{"state_dict": ...}`` wrapper, fp16 or fp32, often with the
  noise-schedule buffers (``betas``, ``alphas_cumprod``, ...) and an EMA copy (``model_ema.*``) beside them.
* diffusers folders: ``model_index.json`` plus ``unet/``, ``vae/``, ``text_encoder/`` (config.json +
  safetensors, also ``*.fp16.safetensors`` variants and sharded ``*.index.json``), ``tokenizer/``, ``scheduler/``.

This module is the ONE place that renames keys. fastdiff's models use diffusers' names (see
fastdiff/models/unet_sd.py, vae.py, clip_text.py), so a diffusers folder is a strict copy, and the original
names are produced by a per-key function (``unet_key_to_original`` ...) written from the block arithmetic of
the LDM UNet: with L = layers_per_block, down level b layer l is ``input_blocks.{1 + b(L+1) + l}``, its
downsampler ``input_blocks.{(b+1)(L+1)}.0.op``, up level b layer l is ``output_blocks.{b(L+1) + l}`` and its
upsampler sits after the resnet (and transformer, if any) of the last layer. The inverse map comes from
enumerating the model's own keys, so both directions are one bijection and loading stays strict: every key
of the file is used, explicitly ignored (schedule buffers, EMA, CLIP's position_ids), or reported.

Loading never executes code: safetensors, or ``torch.load(weights_only=True)`` for pickles.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from fastdiff.models.clip_text import CLIPTextConfig, CLIPTextModel
from fastdiff.models.unet_sd import UNetSD, UNetSDConfig
from fastdiff.models.vae import AutoencoderKL, VAEConfig

__all__ = [
    "CheckpointError",
    "SD1Components",
    "SD1Configs",
    "read_state_dict",
    "detect_architecture",
    "unet_key_to_original",
    "vae_key_to_original",
    "text_key_to_original",
    "infer_sd1_configs",
    "infer_vae_config",
    "infer_clip_config",
    "clip_text_state",
    "load_sd1_single_file",
    "load_sd1_diffusers",
    "load_vae",
    "save_sd1_single_file",
    "save_sd1_diffusers",
    "write_component",
    "load_state_dict_strict",
    "SD1_SCHEDULER_CONFIG",
]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

# Buffers LatentDiffusion registers for its DDPM schedule: derived data, not weights (the schedule is
# rebuilt from scheduler settings), so they are ignored by name.
_SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar",
})
_EMA_PREFIX = "model_ema."

# diffusers' SD1.5 scheduler (PNDM with the scaled-linear betas SD1 was trained on).
SD1_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon", "timestep_spacing": "leading", "trained_betas": None,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: wrong architecture, missing/unexpected keys, bad file."""


# ---------------------------------------------------------------------------------------------- reading files
def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:2] == b"PK":
        return "zip-pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` or ``.ckpt``/``.pt``/``.bin`` file (unwrapping ``state_dict``), on CPU.

    Pickles go through ``torch.load(weights_only=True)``, which refuses anything but tensors and plain
    containers; such a refusal, a truncated file or a non-weights file raises :class:`CheckpointError`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file (a diffusers folder needs model_index.json)")
    kind = _sniff(path)
    if path.suffix == ".safetensors" or kind == "safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError / OSError for bad headers
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    elif kind in ("zip-pickle", "pickle"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:  # keep torch's finding, drop its advice to load with weights_only=False
            found = " ".join(str(e).split("WeightsUnpickler error:", 1)[-1].split("Check the documentation", 1)[0].split())
            raise CheckpointError(
                f"{path}: refused to unpickle: the file holds objects other than tensors and plain containers "
                f"({found}); fastdiff never runs code from a checkpoint: use a .safetensors file") from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {e}") from None
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path}: expected a state dict (mapping of names to tensors), got {type(obj).__name__}")
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"{path}: entries that are not tensors: {_fmt(bad)}")
        sd = dict(obj)
    else:
        raise CheckpointError(f"{path}: unknown file format (expected .safetensors, or a torch .ckpt/.pt/.bin)")
    if not sd:
        raise CheckpointError(f"{path}: the file holds no tensors")
    return sd


def _fmt(keys, n: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# ------------------------------------------------------------------------------------ architecture detection
def detect_architecture(sd: Mapping[str, torch.Tensor]) -> str:
    """Name the model family of an original-layout state dict: 'sd1', 'sd1-inpaint', or raise for others.

    The error names what the file looks like (SD2, SDXL, SD3, Flux, a lone VAE or text encoder, a diffusers
    UNet file) so a user knows which loader to use.
    """
    keys = list(sd.keys())

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    if has("conditioner.embedders."):
        raise CheckpointError("this looks like an SDXL checkpoint (conditioner.embedders.* keys); "
                              "it is not a Stable Diffusion 1.x model")
    if has(UNET_PREFIX + "joint_blocks."):
        raise CheckpointError("this looks like an SD3 checkpoint (model.diffusion_model.joint_blocks.* keys, an "
                              "MMDiT); it is not a Stable Diffusion 1.x model")
    if has(UNET_PREFIX + "double_blocks.") or has("double_blocks."):
        raise CheckpointError("this looks like a Flux checkpoint (double_blocks.* keys); not a Stable Diffusion 1.x model")
    if has("cond_stage_model.model.transformer.resblocks."):
        raise CheckpointError("this looks like an SD2.x checkpoint (OpenCLIP text encoder keys "
                              "cond_stage_model.model.*); it is not a Stable Diffusion 1.x model")
    ctx = [v for k, v in sd.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")]
    if ctx and ctx[0].dim() == 2 and ctx[0].shape[1] == 1024:
        raise CheckpointError("this looks like an SD2.x UNet (cross-attention context width 1024); "
                              "SD1 uses 768-wide CLIP ViT-L text embeddings")
    if UNET_PREFIX + "input_blocks.0.0.weight" not in sd:
        if has("down_blocks.") or has("conv_in.") and has("time_embedding."):
            raise CheckpointError("this looks like a lone diffusers-layout UNet file, not a full original "
                                  "checkpoint; load the diffusers folder that holds it instead")
        if has("encoder.down.") or has("encoder.down_blocks."):
            raise CheckpointError("this looks like a standalone VAE file, not a full SD1 checkpoint; "
                                  "use fastdiff.io.sd_checkpoint.load_vae")
        prefixes = sorted({k.split(".")[0] for k in keys})
        raise CheckpointError(f"no Stable Diffusion UNet weights (model.diffusion_model.input_blocks.*) found; "
                              f"top-level key prefixes: {_fmt(prefixes)}")
    cin = sd[UNET_PREFIX + "input_blocks.0.0.weight"].shape[1]
    return "sd1-inpaint" if cin == 9 else "sd1"


# -------------------------------------------------------------------------------------------- key mapping
_UNET_RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
             "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_UNET_TOP = {"conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
             "time_embedding.linear_2.": "time_embed.2.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}


def _res(rest: str, table: Mapping[str, str]) -> str:
    head, _, tail = rest.partition(".")
    if head not in table:
        raise KeyError(rest)
    return f"{table[head]}.{tail}"


def unet_key_to_original(key: str, cfg: UNetSDConfig) -> str:
    """diffusers UNet key -> key under ``model.diffusion_model.`` in an original checkpoint."""
    L = cfg.layers_per_block
    for d, o in _UNET_TOP.items():
        if key.startswith(d):
            return o + key[len(d):]
    m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        side, b, kind, l, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if side == "down":
            if kind == "downsamplers":
                return f"input_blocks.{(b + 1) * (L + 1)}.0.op.{rest.removeprefix('conv.')}"
            i = 1 + b * (L + 1) + l
            return f"input_blocks.{i}.0.{_res(rest, _UNET_RES)}" if kind == "resnets" else f"input_blocks.{i}.1.{rest}"
        attn = tuple(reversed(cfg.cross_attention))[b]
        if kind == "upsamplers":
            return f"output_blocks.{b * (L + 1) + L}.{2 if attn else 1}.{rest}"
        i = b * (L + 1) + l
        return f"output_blocks.{i}.0.{_res(rest, _UNET_RES)}" if kind == "resnets" else f"output_blocks.{i}.1.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "resnets":
            return f"middle_block.{2 * j}.{_res(rest, _UNET_RES)}"
        return f"middle_block.1.{rest}"
    raise KeyError(f"no original name for UNet key {key!r}")


def vae_key_to_original(key: str, cfg: VAEConfig) -> str:
    """diffusers AutoencoderKL key -> key under ``first_stage_model.`` in an original checkpoint."""
    n = len(cfg.block_out_channels)
    m = re.match(r"(encoder|decoder)\.(.+)", key)
    if not m:
        if key.startswith(("quant_conv.", "post_quant_conv.")):
            return key
        raise KeyError(f"no original name for VAE key {key!r}")
    part, rest = m.group(1), m.group(2)
    if rest.startswith("conv_norm_out."):
        return f"{part}.norm_out.{rest[len('conv_norm_out.'):]}"
    if rest.startswith(("conv_in.", "conv_out.")):
        return key
    mm = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", rest)
    if mm:
        kind, j, tail = mm.group(1), int(mm.group(2)), mm.group(3)
        if kind == "resnets":
            return f"{part}.mid.block_{j + 1}.{tail.replace('conv_shortcut', 'nin_shortcut')}"
        for d, o in _VAE_ATTN.items():
            if tail.startswith(d + "."):
                return f"{part}.mid.attn_1.{o}.{tail[len(d) + 1:]}"
    mm = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", rest)
    if mm:
        side, b, kind, j, tail = mm.group(1), int(mm.group(2)), mm.group(3), int(mm.group(4)), mm.group(5)
        level = b if side == "down" else n - 1 - b  # the LDM decoder numbers its levels from the lowest resolution
        name = "down" if side == "down" else "up"
        if kind == "resnets":
            return f"{part}.{name}.{level}.block.{j}.{tail.replace('conv_shortcut', 'nin_shortcut')}"
        return f"{part}.{name}.{level}.{'downsample' if side == 'down' else 'upsample'}.{tail}"
    raise KeyError(f"no original name for VAE key {key!r}")


def text_key_to_original(key: str, cfg: CLIPTextConfig | None = None) -> str:
    """CLIP text key (``text_model.*``) -> key under ``cond_stage_model.transformer.``: the same name."""
    return key


def _is_vae_attn_matrix(key: str) -> bool:
    return ".mid_block.attentions.0.to_" in key and key.endswith(".weight")


# ---------------------------------------------------------------------------------------- config inference
@dataclass(frozen=True)
class SD1Configs:
    unet: UNetSDConfig
    vae: VAEConfig
    text: CLIPTextConfig


def _max_index(keys, pattern: str) -> int:
    idx = [int(m.group(1)) for k in keys for m in [re.match(pattern, k)] if m]
    return max(idx) if idx else -1


def infer_sd1_configs(sd: Mapping[str, torch.Tensor], *, unet: UNetSDConfig | None = None,
                      vae: VAEConfig | None = None, text: CLIPTextConfig | None = None) -> SD1Configs:
    """Configs of an original SD1 state dict from its tensor shapes, for the parts not given.

    Shapes fix channels, depths, context width and input channels; what they cannot show takes SD1's values:
    8 UNet heads, 32 norm groups, 64-wide CLIP heads, scaling factor 0.18215.
    """
    if unet is None:
        u = {k[len(UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
        n_in = _max_index(u, r"input_blocks\.(\d+)\.") + 1
        ops_idx = sorted({int(m.group(1)) for k in u for m in [re.match(r"input_blocks\.(\d+)\.0\.op\.", k)] if m})
        lpb = ops_idx[0] - 1 if ops_idx else n_in - 1
        levels = n_in // (lpb + 1) if lpb > 0 else 0
        if lpb <= 0 or levels * (lpb + 1) != n_in:
            raise CheckpointError(f"cannot read the UNet layout from the keys ({n_in} input blocks)")
        chans, attn = [], []
        for b in range(levels):
            i = 1 + b * (lpb + 1)
            w = u.get(f"input_blocks.{i}.0.out_layers.3.weight")
            if w is None:
                raise CheckpointError(f"missing UNet key model.diffusion_model.input_blocks.{i}.0.out_layers.3.weight")
            chans.append(int(w.shape[0]))
            attn.append(f"input_blocks.{i}.1.proj_in.weight" in u)
        ctx = u.get("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
        if ctx is None:
            ctx = next(v for k, v in u.items() if k.endswith("attn2.to_k.weight"))
        proj = u.get("middle_block.1.proj_in.weight")
        unet = UNetSDConfig(in_channels=int(u["input_blocks.0.0.weight"].shape[1]),
                            out_channels=int(u["out.2.weight"].shape[0]), block_out_channels=tuple(chans),
                            cross_attention=tuple(attn), layers_per_block=lpb, cross_attention_dim=int(ctx.shape[1]),
                            use_linear_projection=proj is not None and proj.dim() == 2)
    if vae is None:
        vae = infer_vae_config({k[len(VAE_PREFIX):]: t for k, t in sd.items() if k.startswith(VAE_PREFIX)})
    if text is None:
        text = infer_clip_config({k[len(TEXT_PREFIX):]: w for k, w in sd.items() if k.startswith(TEXT_PREFIX)})
    return SD1Configs(unet, vae, text)


def clip_text_state(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIP text-tower keys as fastdiff names them: transformers >= 5 writes CLIPTextModel keys without the
    ``text_model.`` level (hub files have it); ``position_ids`` is a constant buffer, not a weight."""
    return {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v
            for k, v in sd.items() if not k.endswith("embeddings.position_ids")}


def infer_clip_config(t: Mapping[str, torch.Tensor], hidden_act: str = "quick_gelu") -> CLIPTextConfig:
    """A CLIP text-tower config from ``text_model.*`` (and ``text_projection.*``) shapes; what shapes cannot
    show takes CLIP's values: 64-wide heads, the activation given (quick-GELU for OpenAI's towers)."""
    tok = t.get("text_model.embeddings.token_embedding.weight")
    if tok is None:
        raise CheckpointError("no CLIP text encoder weights (text_model.embeddings.token_embedding.weight) found")
    hidden = int(tok.shape[1])
    proj = t.get("text_projection.weight")
    return CLIPTextConfig(vocab_size=int(tok.shape[0]), hidden_size=hidden,
                          num_layers=_max_index(t, r"text_model\.encoder\.layers\.(\d+)\.") + 1,
                          num_heads=max(hidden // 64, 1),
                          intermediate_size=int(t["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
                          max_position_embeddings=int(t["text_model.embeddings.position_embedding.weight"].shape[0]),
                          hidden_act=hidden_act, projection_dim=int(proj.shape[0]) if proj is not None else None)


def infer_vae_config(v: Mapping[str, torch.Tensor], **fixed) -> VAEConfig:
    """The KL-VAE config of original-layout VAE keys (``encoder.down.{i}.block.{j}``, no prefix) from shapes:
    channels, depth, latent channels (4 for SD1, 16 for SD3) and whether the quant convs exist. ``fixed``
    sets what shapes cannot show (scaling_factor, shift_factor, norm groups)."""
    if "encoder.conv_in.weight" not in v:
        raise CheckpointError("no VAE weights (first_stage_model.encoder.*) in the checkpoint")
    levels = _max_index(v, r"encoder\.down\.(\d+)\.") + 1
    lpb = _max_index(v, r"encoder\.down\.0\.block\.(\d+)\.") + 1
    chans = tuple(int(v[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(levels))
    return VAEConfig(in_channels=int(v["encoder.conv_in.weight"].shape[1]),
                     out_channels=int(v["decoder.conv_out.weight"].shape[0]),
                     latent_channels=int(v["decoder.conv_in.weight"].shape[1]), block_out_channels=chans,
                     layers_per_block=lpb, use_quant_conv="quant_conv.weight" in v,
                     use_post_quant_conv="post_quant_conv.weight" in v, **fixed)


# ------------------------------------------------------------------------------------------- strict loading
def load_state_dict_strict(model: nn.Module, sd: Mapping[str, torch.Tensor], what: str, *,
                           dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Copy ``sd`` into ``model`` (built on any device, meta included): every key present with the same shape.

    Errors list missing keys, unexpected keys and shape mismatches. Tensors are cast to ``dtype`` (floating
    point only) and moved to ``device``; the model's parameters are replaced by them (no second copy).
    """
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        msg = [f"{what}: the checkpoint does not match the model"]
        if missing:
            msg.append(f"missing keys ({len(missing)}): {_fmt(missing)}")
        if unexpected:
            msg.append(f"unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
        if shapes:
            msg.append(f"shape mismatches ({len(shapes)}): {_fmt(shapes, 6)}")
        raise CheckpointError("\n  ".join(msg))
    out = {}
    for k, v in sd.items():
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.to(device).contiguous()
    model.load_state_dict(out, strict=True, assign=True)
    return model


def _build(cls, cfg):
    with torch.device("meta"):
        return cls(cfg)


@dataclass
class SD1Components:
    unet: UNetSD
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: object
    scheduler_config: dict


def _split_original(sd: Mapping[str, torch.Tensor], use_ema: bool) -> tuple[dict, dict, dict]:
    unet, vae, text, other = {}, {}, {}, []
    ema = {k for k in sd if k.startswith(_EMA_PREFIX)}
    for k, v in sd.items():
        if k.startswith(UNET_PREFIX):
            unet[k[len(UNET_PREFIX):]] = v
        elif k.startswith(VAE_PREFIX):
            vae[k[len(VAE_PREFIX):]] = v
        elif k.startswith(TEXT_PREFIX):
            rest = k[len(TEXT_PREFIX):]
            if not rest.startswith("text_model."):  # pre-2022 transformers CLIP names lack the text_model level
                rest = "text_model." + rest
            if rest == "text_model.embeddings.position_ids":  # a constant arange buffer, not a weight
                continue
            text[rest] = v
        elif k in _SCHEDULE_BUFFERS or k in ema:
            continue  # derived schedule buffers; the EMA copy is handled below
        else:
            other.append(k)
    if other:
        raise CheckpointError(f"unexpected keys outside the UNet / VAE / text encoder: {_fmt(other)}")
    if use_ema:
        # LDM's EMA stores "model.diffusion_model.a.b" as "model_ema.diffusion_modelab" (dots removed)
        flat = {("diffusion_model." + k).replace(".", ""): k for k in unet}
        got = {flat[k[len(_EMA_PREFIX):]]: sd[k] for k in ema if k[len(_EMA_PREFIX):] in flat}
        if len(got) != len(unet):
            raise CheckpointError(f"use_ema=True but the checkpoint has EMA weights for {len(got)} of "
                                  f"{len(unet)} UNet tensors")
        unet = got
    return unet, vae, text


def load_sd1_single_file(path: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32,
                         device: str | torch.device = "cpu", configs: SD1Configs | None = None,
                         use_ema: bool = False) -> SD1Components:
    """An original single-file SD1/SD1-inpainting checkpoint -> fastdiff modules (strict).

    ``use_ema`` takes the UNet from the ``model_ema.*`` copy (by default it is ignored, as in the EMA-only
    releases, whose ``model.diffusion_model.*`` already holds the EMA weights).
    """
    from fastdiff.models.clip_tokenizer import CLIPTokenizer

    sd = read_state_dict(path)
    detect_architecture(sd)
    unet_sd, vae_sd, text_sd = _split_original(sd, use_ema)
    cfgs = configs or infer_sd1_configs(sd)

    unet = _build(UNetSD, cfgs.unet)
    to_orig = {unet_key_to_original(k, cfgs.unet): k for k in unet.state_dict()}
    load_state_dict_strict(unet, _rename(unet_sd, to_orig, UNET_PREFIX), "UNet (model.diffusion_model.*)",
                           dtype=dtype, device=device)
    vae = _build(AutoencoderKL, cfgs.vae)
    to_orig = {vae_key_to_original(k, cfgs.vae): k for k in vae.state_dict()}
    vsd = _rename(vae_sd, to_orig, VAE_PREFIX)
    vsd = {k: (v[:, :, 0, 0] if _is_vae_attn_matrix(k) and v.dim() == 4 else v) for k, v in vsd.items()}
    load_state_dict_strict(vae, vsd, "VAE (first_stage_model.*)", dtype=dtype, device=device)
    text = _build(CLIPTextModel, cfgs.text)
    load_state_dict_strict(text, text_sd, "text encoder (cond_stage_model.transformer.*)", dtype=dtype, device=device)
    return SD1Components(unet.eval(), vae.eval(), text.eval(), CLIPTokenizer.from_bundled(), dict(SD1_SCHEDULER_CONFIG))


def _rename(sd: Mapping[str, torch.Tensor], to_new: Mapping[str, str], prefix: str) -> dict:
    """Rename by the table; names it does not know keep their (prefixed) original name so errors show them."""
    return {to_new.get(k, prefix + k): v for k, v in sd.items()}


def load_vae(path: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32,
             device: str | torch.device = "cpu", config: VAEConfig | None = None) -> AutoencoderKL:
    """A standalone SD1 VAE (e.g. ``vae-ft-mse-840000-ema-pruned.safetensors``) -> fastdiff AutoencoderKL.

    Accepts a diffusers ``vae/`` folder, a diffusers-layout file (``encoder.down_blocks.*``), or an original
    layout file (``encoder.down.*``, optionally under ``first_stage_model.``); loss/discriminator weights that
    some VAE training checkpoints carry (``loss.*``) are ignored by name.
    """
    p = Path(path)
    if p.is_dir():
        cfg = config or VAEConfig.from_diffusers(_read_json(p / "config.json"))
        return load_state_dict_strict(_build(AutoencoderKL, cfg), _weights_in(p, "diffusion_pytorch_model", None),
                                      f"{p}", dtype=dtype, device=device).eval()
    sd = read_state_dict(p)
    sd = {k[len(VAE_PREFIX):] if k.startswith(VAE_PREFIX) else k: v for k, v in sd.items()
          if not k.startswith(("loss.", VAE_PREFIX + "loss."))}
    if any(k.startswith(UNET_PREFIX) or k.startswith(TEXT_PREFIX) for k in sd):
        raise CheckpointError(f"{p}: a full SD checkpoint, not a standalone VAE: use load_sd1")
    if any(k.startswith("encoder.down_blocks.") for k in sd):  # diffusers layout
        if config is None:
            n = _max_index(sd, r"encoder\.down_blocks\.(\d+)\.") + 1
            config = VAEConfig(in_channels=int(sd["encoder.conv_in.weight"].shape[1]),
                               latent_channels=int(sd["decoder.conv_in.weight"].shape[1]),
                               out_channels=int(sd["decoder.conv_out.weight"].shape[0]),
                               use_quant_conv="quant_conv.weight" in sd,
                               use_post_quant_conv="post_quant_conv.weight" in sd,
                               block_out_channels=tuple(int(sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0])
                                                        for i in range(n)),
                               layers_per_block=_max_index(sd, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.") + 1)
        vsd = {k: (v[:, :, 0, 0] if _is_vae_attn_matrix(k) and v.dim() == 4 else v) for k, v in sd.items()}
        return load_state_dict_strict(_build(AutoencoderKL, config), vsd, f"VAE {p}", dtype=dtype, device=device).eval()
    if "encoder.conv_in.weight" not in sd:
        raise CheckpointError(f"{p}: no VAE weights (encoder.conv_in.weight) found")
    cfg = config or infer_vae_config(sd)
    vae = _build(AutoencoderKL, cfg)
    to_new = {vae_key_to_original(k, cfg): k for k in vae.state_dict()}
    vsd = {to_new.get(k, k): v for k, v in sd.items()}
    vsd = {k: (v[:, :, 0, 0] if _is_vae_attn_matrix(k) and v.dim() == 4 else v) for k, v in vsd.items()}
    return load_state_dict_strict(vae, vsd, f"VAE {p}", dtype=dtype, device=device).eval()


# ----------------------------------------------------------------------------------------- diffusers folders
def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"missing {path}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON: {e}") from None


def _weights_in(folder: Path, stem: str, variant: str | None) -> dict[str, torch.Tensor]:
    """Weights of one diffusers component: ``{stem}[.{variant}].safetensors`` (or sharded/.bin)."""
    variants = [variant] if variant else [None, "fp16"]
    for var in variants:
        mid = f".{var}" if var else ""
        for ext in (".safetensors", ".bin"):
            f = folder / f"{stem}{mid}{ext}"
            if f.is_file():
                return read_state_dict(f)
            index = folder / f"{stem}{mid}{ext}.index.json"
            if index.is_file():
                shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
                if not shards:
                    raise CheckpointError(f"{index}: empty weight_map")
                out: dict[str, torch.Tensor] = {}
                for s in shards:
                    out.update(read_state_dict(folder / s))
                return out
    want = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors (or .fp16.safetensors / .bin)"
    raise CheckpointError(f"{folder}: no weights file {want}")


def load_sd1_diffusers(folder: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32,
                       device: str | torch.device = "cpu", variant: str | None = None) -> SD1Components:
    """A diffusers StableDiffusionPipeline folder -> fastdiff modules (strict)."""
    from fastdiff.models.clip_tokenizer import CLIPTokenizer

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a directory: {folder}")
    index = _read_json(folder / "model_index.json")
    cls = index.get("_class_name", "")
    if "XL" in cls or "3" in cls or "Flux" in cls:
        raise CheckpointError(f"{folder}: a {cls} folder, not Stable Diffusion 1.x")
    for part in ("unet", "vae", "text_encoder"):
        if not (folder / part).is_dir():
            raise CheckpointError(f"{folder}: missing the {part}/ folder")
    ucfg_raw = _read_json(folder / "unet" / "config.json")
    try:
        ucfg = UNetSDConfig.from_diffusers(ucfg_raw)
        vcfg = VAEConfig.from_diffusers(_read_json(folder / "vae" / "config.json"))
        tcfg_raw = _read_json(folder / "text_encoder" / "config.json")
        tcfg = CLIPTextConfig.from_transformers(tcfg_raw)
    except ValueError as e:
        raise CheckpointError(f"{folder}: {e}") from None
    if ucfg.cross_attention_dim != 768 and tcfg.hidden_size == 1024:
        raise CheckpointError(f"{folder}: looks like SD2.x (1024-wide text encoder), not SD1")

    unet = load_state_dict_strict(_build(UNetSD, ucfg), _weights_in(folder / "unet", "diffusion_pytorch_model", variant),
                                  "unet/", dtype=dtype, device=device)
    vae = load_state_dict_strict(_build(AutoencoderKL, vcfg), _weights_in(folder / "vae", "diffusion_pytorch_model", variant),
                                 "vae/", dtype=dtype, device=device)
    tsd = _weights_in(folder / "text_encoder", "model", variant)
    tsd = clip_text_state(tsd)
    text = load_state_dict_strict(_build(CLIPTextModel, tcfg), tsd, "text_encoder/", dtype=dtype, device=device)
    tok_dir = folder / "tokenizer"
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir) if tok_dir.is_dir() else CLIPTokenizer.from_bundled()
    sched_path = folder / "scheduler" / "scheduler_config.json"
    sched = _read_json(sched_path) if sched_path.is_file() else dict(SD1_SCHEDULER_CONFIG)
    return SD1Components(unet.eval(), vae.eval(), text.eval(), tokenizer, sched)


# ---------------------------------------------------------------------------------------------------- saving
def _cpu_sd(model: nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
            for k, v in model.state_dict().items()}


def save_sd1_single_file(c, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> None:
    """Write an original-layout single file (``.safetensors``, or ``.ckpt`` as ``{"state_dict": ...}``).

    ``c`` is anything with ``.unet``, ``.vae`` and ``.text_encoder`` (a pipeline or :class:`SD1Components`).
    """
    sd: dict[str, torch.Tensor] = {}
    for k, v in _cpu_sd(c.unet, dtype).items():
        sd[UNET_PREFIX + unet_key_to_original(k, c.unet.config)] = v
    for k, v in _cpu_sd(c.vae, dtype).items():
        if _is_vae_attn_matrix(k):
            v = v[:, :, None, None].contiguous()  # LDM's attention projections are 1x1 convs
        sd[VAE_PREFIX + vae_key_to_original(k, c.vae.config)] = v
    for k, v in _cpu_sd(c.text_encoder, dtype).items():
        sd[TEXT_PREFIX + text_key_to_original(k)] = v
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path), metadata={"format": "pt"})
    elif path.suffix in (".ckpt", ".pt", ".pth"):
        torch.save({"state_dict": sd}, str(path))
    else:
        raise ValueError(f"{path}: use a .safetensors or .ckpt file name")


def write_component(folder: Path, config: dict, weights: Mapping[str, torch.Tensor], stem: str) -> None:
    """One component folder of a diffusers pipeline: ``config.json`` and ``{stem}.safetensors``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "config.json", "w") as f:
        json.dump(config, f, indent=2)
    save_file(dict(weights), str(folder / f"{stem}.safetensors"), metadata={"format": "pt"})


def save_sd1_diffusers(c, folder: str | os.PathLike, *, dtype: torch.dtype | None = None,
                       variant: str | None = None) -> None:
    """Write a diffusers StableDiffusionPipeline folder that diffusers' ``from_pretrained`` loads."""
    folder = Path(folder)
    mid = f".{variant}" if variant else ""
    parts = {"unet": (c.unet, c.unet.config.to_diffusers(), "diffusion_pytorch_model"),
             "vae": (c.vae, c.vae.config.to_diffusers(), "diffusion_pytorch_model"),
             "text_encoder": (c.text_encoder, c.text_encoder.config.to_transformers(), "model")}
    for name, (model, cfg, stem) in parts.items():
        write_component(folder / name, cfg, _cpu_sd(model, dtype), f"{stem}{mid}")
    c.tokenizer.save_pretrained(folder / "tokenizer")
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    with open(folder / "scheduler" / "scheduler_config.json", "w") as f:
        json.dump(getattr(c, "scheduler_config", None) or SD1_SCHEDULER_CONFIG, f, indent=2)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", (getattr(c, "scheduler_config", None) or SD1_SCHEDULER_CONFIG)["_class_name"]],
             "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
             "requires_safety_checker": False}
    with open(folder / "model_index.json", "w") as f:
        json.dump(index, f, indent=2)
