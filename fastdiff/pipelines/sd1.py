"""Stable Diffusion 1.x pipeline object: fastdiff's UNet, VAE, CLIP text encoder and tokenizer, loaded from
either checkpoint layout (:mod:`fastdiff.io.sd_checkpoint`).

    pipe = load_sd1("v1-5-pruned-emaonly.safetensors")            # or a diffusers folder
    ctx = pipe.encode_prompt(["a photo of a cat"])                 # (1, 77, 768)
    eps = pipe.unet(latents, timesteps, ctx)                       # model output, like diffusers' .sample
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from fastdiff.io import sd_checkpoint as ckpt
from fastdiff.models.clip_text import CLIPTextModel
from fastdiff.models.clip_tokenizer import CLIPTokenizer
from fastdiff.models.unet_sd import UNetSD
from fastdiff.models.vae import AutoencoderKL

__all__ = ["StableDiffusion1", "load_sd1"]


class StableDiffusion1:
    """Holds ``.unet``, ``.vae``, ``.text_encoder``, ``.tokenizer`` (fastdiff modules) and the scheduler settings."""

    def __init__(self, unet: UNetSD, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 scheduler_config: dict | None = None):
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config or ckpt.SD1_SCHEDULER_CONFIG)

    @property
    def is_inpainting(self) -> bool:
        """SD1.5-inpainting UNets take 9 channels: noisy latents, the mask, the masked image's latents."""
        return self.unet.config.in_channels == 9

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    def to(self, device=None, dtype: torch.dtype | None = None) -> "StableDiffusion1":
        for m in (self.unet, self.vae, self.text_encoder):
            m.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def encode_prompt(self, prompts: str | list[str], *, clip_skip: int = 0) -> torch.Tensor:
        """Text embeddings (B, 77, 768) for the UNet's cross-attention (text cut at 77 tokens)."""
        ids = self.tokenizer(prompts).to(self.text_encoder.text_model.final_layer_norm.weight.device)
        return self.text_encoder(ids, clip_skip=clip_skip)

    def save_pretrained(self, folder: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        variant: str | None = None) -> None:
        """A diffusers folder (``StableDiffusionPipeline.from_pretrained`` reads it)."""
        ckpt.save_sd1_diffusers(self, folder, dtype=dtype, variant=variant)

    def save_single_file(self, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> None:
        """An original-layout ``.safetensors`` / ``.ckpt``."""
        ckpt.save_sd1_single_file(self, path, dtype=dtype)

    def __repr__(self) -> str:
        u = self.unet.config
        return (f"StableDiffusion1(unet={u.block_out_channels}, in_channels={u.in_channels}, "
                f"dtype={self.dtype}, device={self.device})")


def load_sd1(path: str | os.PathLike, dtype: torch.dtype | None = torch.float32,
             device: str | torch.device = "cpu", *, variant: str | None = None, use_ema: bool = False,
             configs: "ckpt.SD1Configs | None" = None) -> StableDiffusion1:
    """Load SD1.x from a diffusers folder or an original single file (``.safetensors`` / ``.ckpt``).

    ``dtype`` casts every floating tensor (None keeps the file's dtype). ``variant`` picks
    ``*.{variant}.safetensors`` in a diffusers folder. ``configs`` overrides the architecture read from a single
    file's shapes (needed only for non-SD1 head counts or norm groups, e.g. tiny test models).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such checkpoint file or folder: {p}")
    if p.is_dir():
        c = ckpt.load_sd1_diffusers(p, dtype=dtype, device=device, variant=variant)
    else:
        c = ckpt.load_sd1_single_file(p, dtype=dtype, device=device, configs=configs, use_ema=use_ema)
    return StableDiffusion1(c.unet, c.vae, c.text_encoder, c.tokenizer, c.scheduler_config)
