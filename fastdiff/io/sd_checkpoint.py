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

Loading never executes code: safetensors, or ``torch.load(weights_only=True)`` for pickles. A safetensors file
is opened lazily (:func:`fastdiff.io.checkpoint.open_state_dict`): architecture and configs are read from the
header's shapes, and each tensor is read and converted to the target dtype only when the strict copy takes it,
so an fp32 file loads into a bf16 model without the fp32 set ever being resident.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch

from fastdiff.io.checkpoint import (
    VAE_PREFIX,
    CheckpointError,
    build_on_meta,
    clip_tokenizer_in,
    format_keys,
    infer_vae_config,
    load_component,
    load_state_dict_strict,
    max_key_index,
    open_pipeline_folder,
    open_state_dict,
    read_config,
    read_json,
    read_state_dict,  # noqa: F401  (re-exported: sd_checkpoint.read_state_dict)
    save_pipeline_folder,
    scheduler_config_in,
    state_to_save,
    vae_attention_as_linear,
    vae_from_original,
    vae_to_original,
)
from fastdiff.models.clip_text import CLIPTextConfig, CLIPTextModel
from fastdiff.models.clip_tokenizer import CLIPTokenizer
from fastdiff.models.unet_sd import UNetSD, UNetSDConfig
from fastdiff.models.vae import AutoencoderKL, VAEConfig

__all__ = [
    "SD1Components",
    "SD1Configs",
    "SD1_SCHEDULER_CONFIG",
    "clip_text_state",
    "detect_architecture",
    "detect_family",
    "infer_clip_config",
    "infer_sd1_configs",
    "load_sd1_components",
    "load_sd1_diffusers",
    "load_sd1_single_file",
    "load_vae",
    "save_sd1_diffusers",
    "save_sd1_single_file",
    "text_key_to_original",
    "unet_key_to_original",
]

UNET_PREFIX = "model.diffusion_model."
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


# ------------------------------------------------------------------------------------ architecture detection
def detect_family(keys: Iterable[str]) -> str:
    """'sd1' or 'sd3' for the key names of an original single file (a safetensors header is enough), or
    :class:`CheckpointError` naming what else the file looks like (SD2, SDXL, Flux, a lone VAE or UNet file).

    'sd1' means "no sign of another family": :func:`detect_architecture` checks the shapes when loading."""
    keys = list(keys)

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    if has("conditioner.embedders."):
        raise CheckpointError("this looks like an SDXL checkpoint (conditioner.embedders.* keys); "
                              "it is not a Stable Diffusion 1.x model")
    if has(UNET_PREFIX + "joint_blocks."):
        return "sd3"
    if has(UNET_PREFIX + "double_blocks.") or has("double_blocks."):
        raise CheckpointError("this looks like a Flux checkpoint (double_blocks.* keys); not a Stable Diffusion 1.x model")
    if has("cond_stage_model.model.transformer.resblocks."):
        raise CheckpointError("this looks like an SD2.x checkpoint (OpenCLIP text encoder keys "
                              "cond_stage_model.model.*); it is not a Stable Diffusion 1.x model")
    if UNET_PREFIX + "input_blocks.0.0.weight" not in keys:
        if has("down_blocks.") or has("conv_in.") and has("time_embedding."):
            raise CheckpointError("this looks like a lone diffusers-layout UNet file, not a full original "
                                  "checkpoint; load the diffusers folder that holds it instead")
        if has("encoder.down.") or has("encoder.down_blocks."):
            raise CheckpointError("this looks like a standalone VAE file, not a full SD1 checkpoint; "
                                  "use fastdiff.io.sd_checkpoint.load_vae")
        prefixes = sorted({k.split(".")[0] for k in keys})
        raise CheckpointError(f"no Stable Diffusion UNet weights (model.diffusion_model.input_blocks.*) found; "
                              f"top-level key prefixes: {format_keys(prefixes)}")
    return "sd1"


def detect_architecture(sd: Mapping[str, torch.Tensor]) -> str:
    """Name the model family of an original-layout state dict: 'sd1', 'sd1-inpaint', or raise for others.

    The error names what the file looks like (SD2, SDXL, SD3, Flux, a lone VAE or text encoder, a diffusers
    UNet file) so a user knows which loader to use.
    """
    if detect_family(sd.keys()) == "sd3":
        raise CheckpointError("this looks like an SD3 checkpoint (model.diffusion_model.joint_blocks.* keys, an "
                              "MMDiT); it is not a Stable Diffusion 1.x model")
    ctx = [v for k, v in sd.items() if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")]
    if ctx and ctx[0].dim() == 2 and ctx[0].shape[1] == 1024:
        raise CheckpointError("this looks like an SD2.x UNet (cross-attention context width 1024); "
                              "SD1 uses 768-wide CLIP ViT-L text embeddings")
    cin = sd[UNET_PREFIX + "input_blocks.0.0.weight"].shape[1]
    return "sd1-inpaint" if cin == 9 else "sd1"


# -------------------------------------------------------------------------------------------- key mapping
_UNET_RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
             "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
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


def text_key_to_original(key: str, cfg: CLIPTextConfig | None = None) -> str:
    """CLIP text key (``text_model.*``) -> key under ``cond_stage_model.transformer.``: the same name."""
    return key


# ---------------------------------------------------------------------------------------- config inference
@dataclass(frozen=True)
class SD1Configs:
    unet: UNetSDConfig
    vae: VAEConfig
    text: CLIPTextConfig


def original_encoder_layout(sd: Mapping[str, torch.Tensor], what: str,
                            prefix: str) -> tuple[int, list[int], list[bool]]:
    """Layers per block, channels per level and which levels have cross-attention, read from the
    ``input_blocks.*`` keys (without ``prefix``) of an original-layout UNet encoder (a UNet's or a ControlNet's).
    ``what`` and ``prefix`` name the model and its key prefix in the errors."""
    n_in = max_key_index(sd, r"input_blocks\.(\d+)\.") + 1
    ops_idx = sorted({int(m.group(1)) for k in sd for m in [re.match(r"input_blocks\.(\d+)\.0\.op\.", k)] if m})
    lpb = ops_idx[0] - 1 if ops_idx else n_in - 1
    levels = n_in // (lpb + 1) if lpb > 0 else 0
    if lpb <= 0 or levels * (lpb + 1) != n_in:
        raise CheckpointError(f"cannot read the {what} layout from the keys ({n_in} input blocks)")
    chans, attn = [], []
    for b in range(levels):
        i = 1 + b * (lpb + 1)
        w = sd.get(f"input_blocks.{i}.0.out_layers.3.weight")
        if w is None:
            raise CheckpointError(f"missing {what} key {prefix}input_blocks.{i}.0.out_layers.3.weight")
        chans.append(int(w.shape[0]))
        attn.append(f"input_blocks.{i}.1.proj_in.weight" in sd)
    return lpb, chans, attn


def infer_sd1_configs(sd: Mapping[str, torch.Tensor], *, unet: UNetSDConfig | None = None,
                      vae: VAEConfig | None = None, text: CLIPTextConfig | None = None) -> SD1Configs:
    """Configs of an original SD1 state dict from its tensor shapes, for the parts not given.

    Shapes fix channels, depths, context width and input channels; what they cannot show takes SD1's values:
    8 UNet heads, 32 norm groups, 64-wide CLIP heads, scaling factor 0.18215.
    """
    if unet is None:
        u = {k[len(UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
        lpb, chans, attn = original_encoder_layout(u, "UNet", UNET_PREFIX)
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
                          num_layers=max_key_index(t, r"text_model\.encoder\.layers\.(\d+)\.") + 1,
                          num_heads=max(hidden // 64, 1),
                          intermediate_size=int(t["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
                          max_position_embeddings=int(t["text_model.embeddings.position_embedding.weight"].shape[0]),
                          hidden_act=hidden_act, projection_dim=int(proj.shape[0]) if proj is not None else None)


@dataclass
class SD1Components:
    unet: UNetSD
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: object
    scheduler_config: dict
    # generation settings the folder was measured best at (model_index.json ``_fastdiff.defaults``: sampler,
    # steps, guidance); None: the SD1 family's
    defaults: dict | None = None


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
        raise CheckpointError(f"unexpected keys outside the UNet / VAE / text encoder: {format_keys(other)}")
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
    sd = open_state_dict(path)
    detect_architecture(sd)
    unet_sd, vae_sd, text_sd = _split_original(sd, use_ema)
    cfgs = configs or infer_sd1_configs(sd)

    unet = build_on_meta(UNetSD, cfgs.unet)
    to_new = {unet_key_to_original(k, cfgs.unet): k for k in unet.state_dict()}
    unet_sd = {to_new.get(k, UNET_PREFIX + k): v for k, v in unet_sd.items()}  # unknown names stay, to be reported
    load_state_dict_strict(unet, unet_sd, "UNet (model.diffusion_model.*)", dtype=dtype, device=device)
    vae = vae_from_original(vae_sd, cfgs.vae, what="VAE (first_stage_model.*)", dtype=dtype, device=device)
    text = build_on_meta(CLIPTextModel, cfgs.text)
    load_state_dict_strict(text, text_sd, "text encoder (cond_stage_model.transformer.*)", dtype=dtype, device=device)
    return SD1Components(unet.eval(), vae, text.eval(), CLIPTokenizer.from_bundled(), dict(SD1_SCHEDULER_CONFIG))


def load_vae(path: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32,
             device: str | torch.device = "cpu", config: VAEConfig | None = None) -> AutoencoderKL:
    """A standalone SD1 VAE (e.g. ``vae-ft-mse-840000-ema-pruned.safetensors``) -> fastdiff AutoencoderKL.

    Accepts a diffusers ``vae/`` folder, a diffusers-layout file (``encoder.down_blocks.*``), or an original
    layout file (``encoder.down.*``, optionally under ``first_stage_model.``); loss/discriminator weights that
    some VAE training checkpoints carry (``loss.*``) are ignored by name.
    """
    p = Path(path)
    if p.is_dir():
        cfg = config or read_config(p / "config.json", VAEConfig.from_diffusers)
        return load_component(p, AutoencoderKL, cfg, "diffusion_pytorch_model", dtype=dtype, device=device)
    sd = open_state_dict(p)
    sd = {k[len(VAE_PREFIX):] if k.startswith(VAE_PREFIX) else k: v for k, v in sd.items()
          if not k.startswith(("loss.", VAE_PREFIX + "loss."))}
    if any(k.startswith(UNET_PREFIX) or k.startswith(TEXT_PREFIX) for k in sd):
        raise CheckpointError(f"{p}: a full SD checkpoint, not a standalone VAE: use load_sd1")
    if any(k.startswith("encoder.down_blocks.") for k in sd):  # diffusers layout
        if config is None:
            n = max_key_index(sd, r"encoder\.down_blocks\.(\d+)\.") + 1
            config = VAEConfig(in_channels=int(sd["encoder.conv_in.weight"].shape[1]),
                               latent_channels=int(sd["decoder.conv_in.weight"].shape[1]),
                               out_channels=int(sd["decoder.conv_out.weight"].shape[0]),
                               use_quant_conv="quant_conv.weight" in sd,
                               use_post_quant_conv="post_quant_conv.weight" in sd,
                               block_out_channels=tuple(int(sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0])
                                                        for i in range(n)),
                               layers_per_block=max_key_index(sd, r"encoder\.down_blocks\.0\.resnets\.(\d+)\.") + 1)
        return load_state_dict_strict(build_on_meta(AutoencoderKL, config), vae_attention_as_linear(sd), f"VAE {p}",
                                      dtype=dtype, device=device).eval()
    if "encoder.conv_in.weight" not in sd:
        raise CheckpointError(f"{p}: no VAE weights (encoder.conv_in.weight) found")
    return vae_from_original(sd, config, what=f"VAE {p}", dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------- diffusers folders
def load_sd1_diffusers(folder: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32,
                       device: str | torch.device = "cpu", variant: str | None = None) -> SD1Components:
    """A diffusers StableDiffusionPipeline folder -> fastdiff modules (strict)."""
    folder = Path(folder)
    cls = open_pipeline_folder(folder, ("unet", "vae", "text_encoder"))
    if "XL" in cls or "3" in cls or "Flux" in cls:
        raise CheckpointError(f"{folder}: a {cls} folder, not Stable Diffusion 1.x")
    ucfg = read_config(folder / "unet" / "config.json", UNetSDConfig.from_diffusers)
    vcfg = read_config(folder / "vae" / "config.json", VAEConfig.from_diffusers)
    tcfg = read_config(folder / "text_encoder" / "config.json", CLIPTextConfig.from_transformers)
    if ucfg.cross_attention_dim != 768 and tcfg.hidden_size == 1024:
        raise CheckpointError(f"{folder}: looks like SD2.x (1024-wide text encoder), not SD1")
    kw = dict(variant=variant, dtype=dtype, device=device)
    unet = load_component(folder / "unet", UNetSD, ucfg, "diffusion_pytorch_model", **kw)
    vae = load_component(folder / "vae", AutoencoderKL, vcfg, "diffusion_pytorch_model", **kw)
    text = load_component(folder / "text_encoder", CLIPTextModel, tcfg, "model", state=clip_text_state, **kw)
    return SD1Components(unet, vae, text, clip_tokenizer_in(folder / "tokenizer"),
                         scheduler_config_in(folder, SD1_SCHEDULER_CONFIG), stored_defaults(folder))


_DEFAULT_KEYS = {"sampler": str, "steps": int, "guidance": (int, float)}


def stored_defaults(folder: Path) -> dict | None:
    """The generation settings stored in a pipeline folder's ``model_index.json`` under ``_fastdiff.defaults``
    (any of sampler, steps, guidance), or None; other keys or wrong types are refused by name."""
    d = read_json(folder / "model_index.json").get("_fastdiff", {}).get("defaults")
    if d is None:
        return None
    if not isinstance(d, dict) or set(d) - set(_DEFAULT_KEYS):
        raise CheckpointError(f"{folder}/model_index.json: _fastdiff.defaults must map {', '.join(_DEFAULT_KEYS)} "
                              f"to values, got {d!r}")
    for k, v in d.items():
        if isinstance(v, bool) or not isinstance(v, _DEFAULT_KEYS[k]):
            raise CheckpointError(f"{folder}/model_index.json: _fastdiff.defaults.{k} has the wrong type: {v!r}")
    return dict(d)


def load_sd1_components(path: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu",
             variant: str | None = None, use_ema: bool = False, configs: SD1Configs | None = None) -> SD1Components:
    """SD1.x from a diffusers folder or an original single file (``.safetensors`` / ``.ckpt``).

    ``dtype`` casts every floating tensor (None keeps the file's dtype). ``variant`` picks
    ``*.{variant}.safetensors`` in a diffusers folder. ``configs`` overrides the architecture read from a single
    file's shapes (needed only for non-SD1 head counts or norm groups, e.g. tiny test models).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such checkpoint file or folder: {p}")
    if p.is_dir():
        return load_sd1_diffusers(p, dtype=dtype, device=device, variant=variant)
    return load_sd1_single_file(p, dtype=dtype, device=device, configs=configs, use_ema=use_ema)


# ---------------------------------------------------------------------------------------------------- saving
def save_sd1_single_file(c, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> None:
    """Write an original-layout single file (``.safetensors``, or ``.ckpt`` as ``{"state_dict": ...}``).

    ``c`` is anything with ``.unet``, ``.vae`` and ``.text_encoder`` (a pipeline or :class:`SD1Components`).
    """
    path = Path(path)
    if path.suffix not in (".safetensors", ".ckpt", ".pt", ".pth"):
        raise ValueError(f"{path}: use a .safetensors or .ckpt file name")
    sd = {UNET_PREFIX + unet_key_to_original(k, c.unet.config): v for k, v in state_to_save(c.unet, dtype).items()}
    sd.update(vae_to_original(state_to_save(c.vae, dtype), c.vae.config))
    sd.update({TEXT_PREFIX + text_key_to_original(k): v for k, v in state_to_save(c.text_encoder, dtype).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path), metadata={"format": "pt"})
    else:
        torch.save({"state_dict": sd}, str(path))


def save_sd1_diffusers(c, folder: str | os.PathLike, *, dtype: torch.dtype | None = None,
                       variant: str | None = None) -> None:
    """Write a diffusers StableDiffusionPipeline folder that diffusers' ``from_pretrained`` loads."""
    mid = f".{variant}" if variant else ""
    sched = getattr(c, "scheduler_config", None) or SD1_SCHEDULER_CONFIG
    components = {"unet": (c.unet.config.to_diffusers(), state_to_save(c.unet, dtype), "diffusion_pytorch_model"),
                  "vae": (c.vae.config.to_diffusers(), state_to_save(c.vae, dtype), "diffusion_pytorch_model"),
                  "text_encoder": (c.text_encoder.config.to_transformers(), state_to_save(c.text_encoder, dtype),
                                   "model")}
    components = {k: (cfg, w, stem + mid) for k, (cfg, w, stem) in components.items()}
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", sched["_class_name"]],
             "safety_checker": [None, None], "feature_extractor": [None, None], "image_encoder": [None, None],
             "requires_safety_checker": False}
    defaults = getattr(c, "stored_defaults", None) or getattr(c, "defaults", None)
    if isinstance(defaults, dict):
        index["_fastdiff"] = {"defaults": dict(defaults)}
    save_pipeline_folder(folder, index, components, {"tokenizer": c.tokenizer}, sched)
