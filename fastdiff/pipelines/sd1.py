"""Stable Diffusion 1.x pipeline object: fastdiff's UNet, VAE, CLIP text encoder and tokenizer, loaded from
either checkpoint layout (:mod:`fastdiff.io.sd_checkpoint`).

    pipe = load_sd1("v1-5-pruned-emaonly.safetensors")            # or a diffusers folder
    ctx = pipe.encode_prompt(["a photo of a cat"])                 # (1, 77, 768)
    eps = pipe.unet(latents, timesteps, ctx)                       # model output, like diffusers' .sample
"""
from __future__ import annotations

import math
import os
from dataclasses import replace

import torch

from fastdiff._argtypes import InvalidArgument
from fastdiff.adapters.lora import LoraMixin
from fastdiff.io import sd_checkpoint as ckpt
from fastdiff.models.clip_text import CLIPTextModel
from fastdiff.models.clip_tokenizer import CLIPTokenizer
from fastdiff.models.unet_sd import UNetSD
from fastdiff.models.vae import AutoencoderKL
from fastdiff.pipelines.core import Defaults, LatentPipeline, make_job, prompt_list, run, warn_truncated
from fastdiff.samplers import NoiseSchedule

__all__ = ["StableDiffusion1", "load_sd1", "DEFAULTS"]

# What txt2img / img2img / inpaint, fastdiff.generate and `fastdiff generate` use when not told: the settings of
# diffusers' StableDiffusionPipeline and the SD1.5 model card.
DEFAULTS = Defaults(sampler="euler", steps=30, guidance=7.5, height=512, width=512, strength=0.8)


class StableDiffusion1(LoraMixin, LatentPipeline):
    """Holds ``.unet``, ``.vae``, ``.text_encoder``, ``.tokenizer`` (fastdiff modules) and the scheduler settings."""

    defaults = DEFAULTS
    samplers = ("ddpm", "ddim", "euler", "euler_a", "dpmpp_2m")

    def __init__(self, unet: UNetSD, vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 scheduler_config: dict | None = None, defaults: dict | None = None):
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.scheduler_config = dict(scheduler_config or ckpt.SD1_SCHEDULER_CONFIG)
        # As diffusers: the default size is the UNet's sample size times the VAE's downscale (512 for SD1.5); the
        # folder's stored settings (sampler, steps, guidance) replace the family's.
        self.stored_defaults = dict(defaults) if defaults else None
        side = unet.config.sample_size * vae.downscale
        self.defaults = replace(DEFAULTS, height=side, width=side, **(self.stored_defaults or {}))

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
        prompts = prompt_list(prompts)
        warn_truncated(self.tokenizer, prompts, self.tokenizer.model_max_length, "CLIP", specials=2)
        ids = self.tokenizer(prompts).to(self.text_encoder.text_model.final_layer_norm.weight.device)
        return self.text_encoder(ids, clip_skip=clip_skip)

    @torch.no_grad()
    def txt2img(self, prompt: str | list[str], *, negative_prompt: str | list[str] | None = None,
                height: int | None = None, width: int | None = None, steps: int | None = None,
                guidance: float | None = None, sampler: str | None = None, seed: int | None = None,
                generator: torch.Generator | None = None, num_images_per_prompt: int = 1, clip_skip: int = 0,
                latents: torch.Tensor | None = None, callback=None, control=None, controlnet=None,
                control_scale=1.0, control_start=0.0, control_end=1.0) -> torch.Tensor:
        """Images (B, 3, height, width) in [0, 1], fp32, for B = len(prompts) * num_images_per_prompt.

        Classifier-free guidance runs as one batched UNet call per step (``guidance > 1``; the negative prompt,
        default "", is the unconditional half). The initial noise is drawn as diffusers draws it (one
        ``torch.randn`` of the latent batch from ``generator``, or from ``seed``), so the same seed gives the
        same image, and diffusers' StableDiffusionPipeline with the matching scheduler gives it too.
        ``sampler``: ddim, euler, euler_a, dpmpp_2m or ddpm (:data:`fastdiff.samplers.SAMPLERS`). What is not
        given (None) comes from ``self.defaults``: the UNet's sample size times the VAE's downscale, and the
        folder's stored sampler, steps and guidance or the SD1 family's (:data:`DEFAULTS`).

        ControlNet (as diffusers' StableDiffusionControlNetPipeline): ``controlnet`` (``fastdiff.load_controlnet``)
        and ``control``, its control image ((1|len(prompts), 3, height, width) tensor in [0, 1] or a PIL image);
        ``control_scale`` multiplies its residuals; it runs in the steps ``i`` of the N that run with
        ``i / N >= control_start`` and ``(i + 1) / N <= control_end``. Lists of ControlNets and control images
        (and of the three settings) add several ControlNets' residuals. img2img and inpaint take the same
        arguments.
        """
        self._not_inpainting("txt2img")
        d = self.defaults
        height, width = d.height if height is None else height, d.width if width is None else width
        steps, guidance, sampler = self._resolved(steps, guidance, sampler)
        return run(self, make_job(self, "txt2img", prompt=prompt, negative_prompt=negative_prompt, height=height,
                                  width=width, steps=steps, guidance=guidance, sampler=sampler, seed=seed,
                                  generator=generator, num_images_per_prompt=num_images_per_prompt,
                                  latents=latents, callback=callback, encode={"clip_skip": clip_skip},
                                  **_control_args(control, controlnet, control_scale, control_start, control_end)))

    @torch.no_grad()
    def img2img(self, prompt: str | list[str], image, *, strength: float | None = None,
                negative_prompt: str | list[str] | None = None, steps: int | None = None,
                guidance: float | None = None, sampler: str | None = None, seed: int | None = None,
                generator: torch.Generator | None = None, num_images_per_prompt: int = 1, clip_skip: int = 0,
                callback=None, control=None, controlnet=None, control_scale=1.0, control_start=0.0,
                control_end=1.0) -> torch.Tensor:
        """Re-draw ``image`` ((B|1, 3, H, W) tensor in [0, 1] or a PIL image) towards the prompt.

        ``strength`` in [0, 1]: how much of the schedule is re-run, as diffusers' StableDiffusionImg2ImgPipeline:
        the last ``int(steps * strength)`` steps run, starting from the image's latents noised to the first of
        them (random draws in diffusers' order: the VAE's latent sample, then the noise). Output size = input.
        """
        self._not_inpainting("img2img")
        strength = self.defaults.strength if strength is None else strength
        steps, guidance, sampler = self._resolved(steps, guidance, sampler)
        return run(self, make_job(self, "img2img", prompt=prompt, negative_prompt=negative_prompt, image=image,
                                  strength=strength, steps=steps, guidance=guidance, sampler=sampler, seed=seed,
                                  generator=generator, num_images_per_prompt=num_images_per_prompt,
                                  callback=callback, encode={"clip_skip": clip_skip},
                                  **_control_args(control, controlnet, control_scale, control_start, control_end)))

    @torch.no_grad()
    def inpaint(self, prompt: str | list[str], image, mask, *, negative_prompt: str | list[str] | None = None,
                steps: int | None = None, guidance: float | None = None, sampler: str | None = None,
                seed: int | None = None, generator: torch.Generator | None = None, num_images_per_prompt: int = 1,
                clip_skip: int = 0, latents: torch.Tensor | None = None, callback=None, control=None,
                controlnet=None, control_scale=1.0, control_start=0.0, control_end=1.0) -> torch.Tensor:
        """Repaint where ``mask`` is white: with an SD1.5-inpainting checkpoint (9-channel UNet), or with an
        ordinary 4-channel checkpoint by mask blending (after every step the unmasked area is reset to the image's
        latents noised to the next step's level, as diffusers' StableDiffusionInpaintPipeline does then).

        ``image``: (B|1, 3, H, W) tensor in [0, 1] or a PIL image; ``mask``: (B|1, 1, H, W) tensor in [0, 1] or a
        PIL image, binarised at 0.5 (1 = repaint). The UNet sees [noisy latents, mask at latent size, latents of
        the image with the masked area blanked] on its channels, as in diffusers' StableDiffusionInpaintPipeline
        at strength 1 (random draws in the same order: initial noise, then the masked image's latent sample).
        """
        if mask is None:
            raise InvalidArgument("mask", "inpaint needs a mask (white = repaint); img2img takes none")
        steps, guidance, sampler = self._resolved(steps, guidance, sampler)
        return run(self, make_job(self, "inpaint", prompt=prompt, negative_prompt=negative_prompt, image=image,
                                  mask=mask, steps=steps, guidance=guidance, sampler=sampler, seed=seed,
                                  generator=generator, num_images_per_prompt=num_images_per_prompt,
                                  latents=latents, callback=callback, encode={"clip_skip": clip_skip},
                                  **_control_args(control, controlnet, control_scale, control_start, control_end)))

    def _resolved(self, steps, guidance, sampler) -> tuple:
        d = self.defaults
        return (d.steps if steps is None else steps, d.guidance if guidance is None else guidance,
                d.sampler if sampler is None else sampler)

    def _not_inpainting(self, what: str) -> None:
        if self.is_inpainting:
            raise ValueError(f"{what}: this is an inpainting checkpoint (9-channel UNet): use inpaint(image, mask)")

    # the model family, as the generation driver (fastdiff.pipelines.core) asks for it
    def size_multiple(self) -> tuple[int, str]:
        f = self.vae.downscale
        return math.lcm(8, f), f"(8 and the VAE's downscale {f})"

    @staticmethod
    def img2img_start(steps: int, strength: float) -> int:
        return steps - min(int(steps * strength), steps)  # diffusers: the last int(steps * strength) steps run

    @property
    def prediction(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    def make_schedule(self, job) -> NoiseSchedule:
        return NoiseSchedule.from_diffusers_config(self.scheduler_config)

    def network(self, job):
        return self.unet

    def check_controlnet(self, net, name: str) -> None:
        """An :class:`InvalidArgument` naming ``name`` unless ``net`` is a ControlNet for this UNet and VAE."""
        from fastdiff.models.controlnet import ControlNet

        if not isinstance(net, ControlNet):
            raise InvalidArgument(name, f"must be a fastdiff ControlNet (fastdiff.load_controlnet), got "
                                        f"{type(net).__name__}")
        c, u = net.config.unet, self.unet.config
        if c.in_channels != self.vae.config.latent_channels:
            raise InvalidArgument(name, f"takes {c.in_channels}-channel latents; this VAE makes "
                                        f"{self.vae.config.latent_channels}")
        if (c.block_out_channels, c.layers_per_block, c.cross_attention_dim) != (
                u.block_out_channels, u.layers_per_block, u.cross_attention_dim):
            raise InvalidArgument(name, f"was made for another UNet (widths {c.block_out_channels}, "
                                        f"{c.layers_per_block} layers per block, text width {c.cross_attention_dim}; "
                                        f"this one: {u.block_out_channels}, {u.layers_per_block}, "
                                        f"{u.cross_attention_dim})")
        if net.config.hint_downscale != self.vae.downscale:
            raise InvalidArgument(name, f"its control image encoder downscales {net.config.hint_downscale}x, this "
                                        f"VAE {self.vae.downscale}x")

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


def _control_args(control, controlnet, scale, start, end) -> dict:
    return dict(control=control, controlnet=controlnet, control_scale=scale, control_start=start, control_end=end)


def load_sd1(path: str | os.PathLike, dtype: torch.dtype | None = torch.float32,
             device: str | torch.device = "cpu", *, variant: str | None = None, use_ema: bool = False,
             configs: "ckpt.SD1Configs | None" = None) -> StableDiffusion1:
    """Load SD1.x from a diffusers folder or an original single file (``.safetensors`` / ``.ckpt``); see
    :func:`fastdiff.io.sd_checkpoint.load_sd1_components` for the arguments."""
    c = ckpt.load_sd1_components(path, dtype=dtype, device=device, variant=variant, use_ema=use_ema, configs=configs)
    return StableDiffusion1(c.unet, c.vae, c.text_encoder, c.tokenizer, c.scheduler_config, c.defaults)
