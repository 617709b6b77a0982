"""Stable Diffusion 1.x pipeline object: fastdiff's UNet, VAE, CLIP text encoder and tokenizer, loaded from
either checkpoint layout (:mod:`fastdiff.io.sd_checkpoint`).

    pipe = load_sd1("v1-5-pruned-emaonly.safetensors")            # or a diffusers folder
    ctx = pipe.encode_prompt(["a photo of a cat"])                 # (1, 77, 768)
    eps = pipe.unet(latents, timesteps, ctx)                       # model output, like diffusers' .sample
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from fastdiff.io import sd_checkpoint as ckpt
from fastdiff.models.clip_text import CLIPTextModel
from fastdiff.models.clip_tokenizer import CLIPTokenizer
from fastdiff.models.unet_sd import UNetSD
from fastdiff.models.vae import AutoencoderKL

__all__ = ["StableDiffusion1", "load_sd1"]

_MAX_TOKENS = 77


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
        """Text embeddings (B, 77, 768) for the UNet's cross-attention.

        As in diffusers (and the original SD1 code), a prompt is cut to 75 tokens between bos and eos; the
        dropped words are named in a warning.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        n = self.tokenizer.model_max_length
        for p in prompts:
            ids = self.tokenizer.encode(p)
            if len(ids) > n:
                dropped = self.tokenizer.decode(ids[n - 1:-1])
                warnings.warn(f"prompt longer than {n - 2} CLIP tokens: this part is dropped: {dropped!r}",
                              stacklevel=3)
        ids = self.tokenizer(prompts).to(self.text_encoder.text_model.final_layer_norm.weight.device)
        return self.text_encoder(ids, clip_skip=clip_skip)

    @torch.no_grad()
    def txt2img(self, prompt: str | list[str], *, negative_prompt: str | list[str] | None = None,
                height: int = 512, width: int = 512, steps: int = 30, guidance: float = 7.5,
                sampler: str = "euler", seed: int | None = None, generator: torch.Generator | None = None,
                num_images_per_prompt: int = 1, clip_skip: int = 0, latents: torch.Tensor | None = None,
                callback=None) -> torch.Tensor:
        """Images (B, 3, height, width) in [0, 1], fp32, for B = len(prompts) * num_images_per_prompt.

        Classifier-free guidance runs as one batched UNet call per step (``guidance > 1``; the negative prompt,
        default "", is the unconditional half). The initial noise is drawn as diffusers draws it (one
        ``torch.randn`` of the latent batch from ``generator``, or from ``seed``), so the same seed gives the
        same image, and diffusers' StableDiffusionPipeline with the matching scheduler gives it too.
        ``sampler``: a name in :data:`fastdiff.samplers.SAMPLERS` (ddim, euler, euler_a, dpmpp_2m, ddpm).
        """
        from fastdiff.samplers import Denoiser, NoiseSchedule, get_sampler

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("txt2img: no prompt given")
        f = self.vae.downscale
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0 or v % 8 or v % f:
                raise ValueError(f"txt2img: {name} must be a positive multiple of 8 (and of the VAE's "
                                 f"downscale {f}), got {v!r}")
        if steps < 1:
            raise ValueError(f"txt2img: steps must be >= 1, got {steps}")
        if num_images_per_prompt < 1:
            raise ValueError(f"txt2img: num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        sample = get_sampler(sampler)
        if generator is None and seed is not None:
            generator = torch.Generator("cpu").manual_seed(int(seed))

        cond = self.encode_prompt(prompts, clip_skip=clip_skip)
        cond = cond.repeat_interleave(num_images_per_prompt, dim=0)
        guided = guidance is not None and guidance > 1.0
        uncond = None
        if guided:
            neg = [""] * len(prompts) if negative_prompt is None else (
                [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt))
            if len(neg) != len(prompts):
                raise ValueError(f"txt2img: {len(neg)} negative prompts for {len(prompts)} prompts")
            uncond = self.encode_prompt(neg, clip_skip=clip_skip).repeat_interleave(num_images_per_prompt, dim=0)

        b = cond.shape[0]
        shape = (b, self.unet.config.in_channels if not self.is_inpainting else 4, height // f, width // f)
        if latents is None:
            # diffusers' randn_tensor: one draw of the whole batch on the generator's device, in the UNet dtype
            latents = torch.randn(shape, generator=generator, dtype=self.dtype,
                                  device=generator.device if generator is not None else "cpu")
        elif tuple(latents.shape) != shape:
            raise ValueError(f"txt2img: latents must have shape {shape}, got {tuple(latents.shape)}")
        if self.is_inpainting:
            raise NotImplementedError("txt2img on an inpainting UNet needs a mask and an image (inpaint)")
        x = latents.to(self.device, torch.float32)

        schedule = NoiseSchedule.from_diffusers_config(self.scheduler_config)
        prediction = self.scheduler_config.get("prediction_type", "epsilon")
        model = Denoiser(lambda xx, t, c: self.unet(xx, t, c), prediction, dtype=self.dtype)
        x = sample(model, x, schedule, steps=steps, cond=cond, uncond=uncond, guidance=guidance if guided else None,
                   generator=generator, callback=callback, **self._sampler_options(sampler))
        return self.decode_latents(x)

    def _sampler_options(self, sampler: str) -> dict:
        """Settings of the checkpoint's scheduler config that the named sampler takes, read with the defaults
        diffusers' scheduler of that name would apply to the same config (``from_config``)."""
        cfg = self.scheduler_config
        opts: dict = {}
        if sampler in ("ddim", "ddpm"):
            if cfg.get("clip_sample", True):  # DDIM/DDPMScheduler default clip_sample=True
                opts["clip"] = float(cfg.get("clip_sample_range", 1.0))
            if sampler == "ddim":
                opts["set_alpha_to_one"] = bool(cfg.get("set_alpha_to_one", True))
        return opts

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """UNet latents -> images in [0, 1] (fp32): VAE decode of ``latents / scaling_factor``."""
        img = self.vae.decode((latents / self.vae.scaling_factor).to(self.vae.dtype)).float()
        if not torch.isfinite(img).all():
            raise FloatingPointError(
                f"the VAE decode produced NaN/inf in {self.vae.dtype}; SD1 VAEs can overflow in float16: "
                "decode in float32 or bfloat16 (pipe.vae.to(dtype=torch.float32))")
        return (img / 2 + 0.5).clamp(0, 1)

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
