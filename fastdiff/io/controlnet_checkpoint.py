"""SD1 ControlNet checkpoints in both layouts users have, loaded strictly.

* diffusers ``ControlNetModel`` folders: ``config.json`` + ``diffusion_pytorch_model[.fp16].safetensors`` (or
  ``.bin`` / sharded); also a pipeline folder with a ``controlnet/`` sub-folder.
* Original single files (``control_v11p_sd15_canny.pth``, ``control_sd15_depth.safetensors``, ...): the
  ControlNet under ``control_model.``: the UNet encoder's original names (``time_embed``, ``input_blocks``,
  ``middle_block``), the hint encoder ``input_hint_block.{0, 2, ..., 14}`` (the odd indices are its SiLUs), one
  zero convolution per skip ``zero_convs.{i}.0`` and ``middle_block_out.0``. The first releases bundle a whole SD1
  model beside it (``model.diffusion_model.*``, ``first_stage_model.*``, ``cond_stage_model.*``, schedule
  buffers): those keys are ignored by name; any other key is reported.

Names of the UNet encoder come from :func:`fastdiff.io.sd_checkpoint.unet_key_to_original`, the one SD1 UNet
mapping; this module adds the three ControlNet-only parts. As there, the inverse map is built by enumerating the
model's own keys, so loading stays a strict copy with shape checks. Pickles are read with
``torch.load(weights_only=True)`` only (:func:`fastdiff.io.checkpoint.read_state_dict`).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

import torch

from fastdiff.io.checkpoint import (
    CheckpointError,
    build_on_meta,
    format_keys,
    load_component,
    load_state_dict_strict,
    read_config,
    read_json,
    read_state_dict,
    state_to_save,
    write_component,
)
from fastdiff.io.sd_checkpoint import original_encoder_layout, unet_key_to_original
from fastdiff.models.controlnet import ControlNet, ControlNetConfig
from fastdiff.models.unet_sd import UNetSDConfig

__all__ = [
    "CONTROL_PREFIX",
    "controlnet_key_to_original",
    "infer_controlnet_config",
    "load_controlnet",
    "load_controlnet_diffusers",
    "load_controlnet_single_file",
    "save_controlnet_diffusers",
    "save_controlnet_single_file",
]

CONTROL_PREFIX = "control_model."
# What the first ControlNet releases carry beside the ControlNet: the SD1 model it was trained on.
_BUNDLED_SD_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "model_ema.")
_SCHEDULE_BUFFERS = frozenset({
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar",
})


# -------------------------------------------------------------------------------------------- key mapping
def controlnet_key_to_original(key: str, cfg: ControlNetConfig) -> str:
    """fastdiff/diffusers ControlNet key -> key under ``control_model.`` in an original checkpoint."""
    m = re.match(r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.(\d+))\.(.+)", key)
    if m:  # input_hint_block: conv, SiLU, conv, SiLU, ...: module j of the sequence sits at index 2j
        n_blocks = 2 * (len(cfg.conditioning_embedding_out_channels) - 1)
        j = 0 if m.group(1) == "conv_in" else n_blocks + 1 if m.group(1) == "conv_out" else int(m.group(2)) + 1
        return f"input_hint_block.{2 * j}.{m.group(3)}"
    m = re.match(r"controlnet_down_blocks\.(\d+)\.(.+)", key)
    if m:
        return f"zero_convs.{m.group(1)}.0.{m.group(2)}"
    if key.startswith("controlnet_mid_block."):
        return "middle_block_out.0." + key[len("controlnet_mid_block."):]
    return unet_key_to_original(key, cfg.unet)


# ---------------------------------------------------------------------------------------- config inference
def infer_controlnet_config(sd: Mapping[str, torch.Tensor]) -> ControlNetConfig:
    """The config of an original ControlNet state dict (keys without ``control_model.``) from its shapes.

    Shapes fix channels, depths, context width, input and hint channels; what they cannot show takes SD1's
    values: 8 heads, 32 norm groups."""
    lpb, chans, attn = original_encoder_layout(sd, "ControlNet", CONTROL_PREFIX)
    ctx = next((v for k, v in sd.items() if k.endswith("attn2.to_k.weight")), None)
    if ctx is None:
        raise CheckpointError("no cross-attention weights (attn2.to_k) in the ControlNet")
    proj = sd.get("middle_block.1.proj_in.weight")
    cin = int(sd["input_blocks.0.0.weight"].shape[1])
    unet = UNetSDConfig(in_channels=cin, out_channels=cin, block_out_channels=tuple(chans),
                        cross_attention=tuple(attn), layers_per_block=lpb, cross_attention_dim=int(ctx.shape[1]),
                        use_linear_projection=proj is not None and proj.dim() == 2)
    hint_idx = sorted({int(m.group(1)) for k in sd for m in [re.match(r"input_hint_block\.(\d+)\.weight$", k)] if m})
    widths = tuple(int(sd[f"input_hint_block.{i}.weight"].shape[0]) for i in hint_idx[:-1:2])
    return ControlNetConfig(unet=unet, conditioning_channels=int(sd["input_hint_block.0.weight"].shape[1]),
                            conditioning_embedding_out_channels=widths)


# ------------------------------------------------------------------------------------------------- loading
def _what_else(keys: list[str]) -> str | None:
    """A line naming what a file that is not a ControlNet looks like, or None when it may be one."""
    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    if has("lora_controlnet") or any("lora_up" in k or "lora_down" in k or ".lora_A" in k for k in keys):
        return "a LoRA (or Control-LoRA) file, not a ControlNet"
    if has("conditioner.embedders.") or has("add_embedding."):
        return "an SDXL model, not an SD1 ControlNet"
    if has("model.diffusion_model.") or has("output_blocks.") or has("up_blocks.") or has("out.2."):
        return ("a Stable Diffusion UNet (it has a decoder: output_blocks / up_blocks) and no hint encoder: "
                "not a ControlNet")
    if has("encoder.down") or has("decoder.up"):
        return "a VAE, not a ControlNet"
    if has("text_model.") or has("cond_stage_model."):
        return "a text encoder, not a ControlNet"
    return None


def _split_original(sd: Mapping[str, torch.Tensor], path) -> dict[str, torch.Tensor]:
    """The ControlNet's own tensors of an original file, ``control_model.`` removed; the bundled SD1 model
    and schedule buffers of the first releases ignored by name, anything else reported."""
    if not any(k.startswith(CONTROL_PREFIX) for k in sd):
        if "input_hint_block.0.weight" in sd:  # some files store the ControlNet without the prefix
            return dict(sd)
        if "controlnet_cond_embedding.conv_in.weight" in sd:
            raise CheckpointError(f"{path}: a diffusers-layout ControlNet file: load the folder that holds it "
                                  "with its config.json")
        keys = list(sd)
        what = _what_else(keys)
        if what:
            raise CheckpointError(f"{path}: this looks like {what}")
        prefixes = sorted({k.split(".")[0] for k in keys})
        raise CheckpointError(f"{path}: no ControlNet weights ({CONTROL_PREFIX}input_hint_block.*) found; "
                              f"top-level key prefixes: {format_keys(prefixes)}")
    out, other = {}, []
    for k, v in sd.items():
        if k.startswith(CONTROL_PREFIX):
            out[k[len(CONTROL_PREFIX):]] = v
        elif k.startswith(_BUNDLED_SD_PREFIXES) or k in _SCHEDULE_BUFFERS:
            continue
        else:
            other.append(k)
    if other:
        raise CheckpointError(f"{path}: unexpected keys outside {CONTROL_PREFIX}*: {format_keys(other)}")
    if any(k.startswith(("label_emb.", "add_embedding.")) for k in out):
        raise CheckpointError(f"{path}: this looks like an SDXL ControlNet (label_emb.* keys), not an SD1 one")
    if "input_hint_block.0.weight" not in out:
        raise CheckpointError(f"{path}: {CONTROL_PREFIX}* has no hint encoder ({CONTROL_PREFIX}input_hint_block.0"
                              ".weight): not a ControlNet")
    return out


def load_controlnet_single_file(path: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32,
                                device: str | torch.device = "cpu",
                                config: ControlNetConfig | None = None) -> ControlNet:
    """An original ControlNet file (``.safetensors``, or ``.pth``/``.ckpt`` through ``weights_only``) -> ControlNet."""
    sd = _split_original(read_state_dict(path), path)
    cfg = config or infer_controlnet_config(sd)
    net = build_on_meta(ControlNet, cfg)
    to_new = {controlnet_key_to_original(k, cfg): k for k in net.state_dict()}
    sd = {to_new.get(k, CONTROL_PREFIX + k): v for k, v in sd.items()}  # unknown names stay, to be reported
    return load_state_dict_strict(net, sd, f"ControlNet {path} ({CONTROL_PREFIX}*)", dtype=dtype,
                                  device=device).eval()


def load_controlnet_diffusers(folder: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32,
                              device: str | torch.device = "cpu", variant: str | None = None) -> ControlNet:
    """A diffusers ``ControlNetModel`` folder (or a pipeline folder with ``controlnet/``) -> ControlNet (strict)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() and (folder / "model_index.json").is_file():
        if not (folder / "controlnet").is_dir():
            cls = read_json(folder / "model_index.json").get("_class_name", "?")
            raise CheckpointError(f"{folder}: a {cls} pipeline folder without a controlnet/ folder: "
                                  "not a ControlNet")
        folder = folder / "controlnet"
    cls = read_json(folder / "config.json").get("_class_name", "ControlNetModel")
    if cls != "ControlNetModel":
        raise CheckpointError(f"{folder}: a {cls} folder, not a ControlNet (ControlNetModel)")
    cfg = read_config(folder / "config.json", ControlNetConfig.from_diffusers)
    return load_component(folder, ControlNet, cfg, "diffusion_pytorch_model", variant=variant, dtype=dtype,
                          device=device)


def load_controlnet(path: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32,
                    device: str | torch.device = "cpu", variant: str | None = None,
                    config: ControlNetConfig | None = None) -> ControlNet:
    """An SD1 ControlNet from a diffusers folder or an original single file, in eval mode.

    ``dtype`` casts every floating tensor (None keeps the file's). ``variant`` picks
    ``diffusion_pytorch_model.{variant}.safetensors`` in a folder. ``config`` overrides the architecture read
    from a single file's shapes (needed only for non-SD1 head counts or norm groups, e.g. tiny test models).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such ControlNet file or folder: {p}")
    if p.is_dir():
        return load_controlnet_diffusers(p, dtype=dtype, device=device, variant=variant)
    return load_controlnet_single_file(p, dtype=dtype, device=device, config=config)


# ---------------------------------------------------------------------------------------------------- saving
def save_controlnet_single_file(net: ControlNet, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> None:
    """Write an original-layout file (``control_model.*``): ``.safetensors``, or ``.pth``/``.ckpt`` (a pickle
    of plain tensors)."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".ckpt", ".pt", ".pth"):
        raise ValueError(f"{path}: use a .safetensors, .pth or .ckpt file name")
    sd = {CONTROL_PREFIX + controlnet_key_to_original(k, net.config): v for k, v in state_to_save(net, dtype).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path), metadata={"format": "pt"})
    else:
        torch.save(sd, str(path))


def save_controlnet_diffusers(net: ControlNet, folder: str | os.PathLike, *, dtype: torch.dtype | None = None) -> None:
    """Write a diffusers ``ControlNetModel`` folder (config.json + diffusion_pytorch_model.safetensors)."""
    cfg = dict(net.config.to_diffusers(), _diffusers_version="0.42.1")
    write_component(Path(folder), cfg, state_to_save(net, dtype), "diffusion_pytorch_model")
