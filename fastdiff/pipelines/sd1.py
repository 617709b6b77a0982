"""Stable Diffusion 1.x pipeline object: fastdiff's UNet, VAE, CLIP text encoder and tokenizer, loaded from
either checkpoint layout (:mod:`fastdiff.io.sd_checkpoint`).

    pipe = load_sd1("v1-5-pruned-emaonly.safetensors")            # or a diffusers folder
    ctx = pipe.encode_prompt(["a photo of a cat"])                 # (1, 77, 768)
    eps = pipe.unet(latents, timesteps, ctx)                       # model output, like diffusers' .sample
"""
from __future__ import annotations

import os
import warnings

import torch

from fastdiff.adapters.lora import LoraMixin
from fastdiff.io import sd_checkpoint as ckpt
from fastdiff.models.clip_text import CLIPTextModel
from fastdiff.models.clip_tokenizer import CLIPTokenizer
from fastdiff.models.unet_sd import UNetSD
from fastdiff.models.vae import AutoencoderKL

__all__ = ["StableDiffusion1", "load_sd1"]

_MAX_TOKENS = 77


class StableDiffusion1(LoraMixin):
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
        if self.is_inpainting:
            raise ValueError("txt2img: this is an inpainting checkpoint (9-channel UNet): use inpaint(image, mask)")
        return self._generate("txt2img", prompt, negative_prompt, height, width, steps, guidance, sampler, seed,
                              generator, num_images_per_prompt, clip_skip, latents, callback)

    @torch.no_grad()
    def img2img(self, prompt: str | list[str], image, *, strength: float = 0.8,
                negative_prompt: str | list[str] | None = None, steps: int = 30, guidance: float = 7.5,
                sampler: str = "euler", seed: int | None = None, generator: torch.Generator | None = None,
                num_images_per_prompt: int = 1, clip_skip: int = 0, callback=None) -> torch.Tensor:
        """Re-draw ``image`` ((B|1, 3, H, W) tensor in [0, 1] or a PIL image) towards the prompt.

        ``strength`` in [0, 1]: how much of the schedule is re-run, as diffusers' StableDiffusionImg2ImgPipeline:
        the last ``int(steps * strength)`` steps run, starting from the image's latents noised to the first of
        them (random draws in diffusers' order: the VAE's latent sample, then the noise). Output size = input.
        """
        if self.is_inpainting:
            raise ValueError("img2img: this is an inpainting checkpoint (9-channel UNet): use inpaint(image, mask)")
        if not isinstance(strength, (int, float)) or not 0.0 <= float(strength) <= 1.0:
            raise ValueError(f"img2img: strength must be a number in [0, 1], got {strength!r}")
        img = _image_tensor(image, "image")
        run = min(int(steps * float(strength)), steps)
        if run < 1:
            raise ValueError(f"img2img: strength {strength} x {steps} steps leaves no step to run; raise the "
                             "strength or the steps (at least one step must run)")
        height, width = int(img.shape[-2]), int(img.shape[-1])
        return self._generate("img2img", prompt, negative_prompt, height, width, steps, guidance, sampler, seed,
                              generator, num_images_per_prompt, clip_skip, None, callback, image=img,
                              start=steps - run)

    @torch.no_grad()
    def inpaint(self, prompt: str | list[str], image, mask, *, negative_prompt: str | list[str] | None = None,
                steps: int = 30, guidance: float = 7.5, sampler: str = "euler", seed: int | None = None,
                generator: torch.Generator | None = None, num_images_per_prompt: int = 1, clip_skip: int = 0,
                latents: torch.Tensor | None = None, callback=None) -> torch.Tensor:
        """Repaint where ``mask`` is white: with an SD1.5-inpainting checkpoint (9-channel UNet), or with an
        ordinary 4-channel checkpoint by mask blending (after every step the unmasked area is reset to the image's
        latents noised to the next step's level, as diffusers' StableDiffusionInpaintPipeline does then).

        ``image``: (B|1, 3, H, W) tensor in [0, 1] or a PIL image; ``mask``: (B|1, 1, H, W) tensor in [0, 1] or a
        PIL image, binarised at 0.5 (1 = repaint). The UNet sees [noisy latents, mask at latent size, latents of
        the image with the masked area blanked] on its channels, as in diffusers' StableDiffusionInpaintPipeline
        at strength 1 (random draws in the same order: initial noise, then the masked image's latent sample).
        """
        img = _image_tensor(image, "image")
        m = _image_tensor(mask, "mask", channels=1)
        if img.shape[-2:] != m.shape[-2:]:
            raise ValueError(f"inpaint: mask size {tuple(m.shape[-2:])} differs from image size {tuple(img.shape[-2:])}")
        m = (m >= 0.5).to(img.dtype)
        height, width = int(img.shape[-2]), int(img.shape[-1])
        return self._generate("inpaint", prompt, negative_prompt, height, width, steps, guidance, sampler, seed,
                              generator, num_images_per_prompt, clip_skip, latents, callback, image=img, mask=m)

    def _generate(self, what, prompt, negative_prompt, height, width, steps, guidance, sampler, seed, generator,
                  num_images_per_prompt, clip_skip, latents, callback, image=None, mask=None,
                  start=None) -> torch.Tensor:
        import torch.nn.functional as F

        from fastdiff.samplers import Denoiser, NoiseSchedule, get_sampler

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError(f"{what}: no prompt given")
        f = self.vae.downscale
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v <= 0 or v % 8 or v % f:
                raise ValueError(f"{what}: {name} must be a positive multiple of 8 (and of the VAE's "
                                 f"downscale {f}), got {v!r}")
        if steps < 1:
            raise ValueError(f"{what}: steps must be >= 1, got {steps}")
        if num_images_per_prompt < 1:
            raise ValueError(f"{what}: num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
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
                raise ValueError(f"{what}: {len(neg)} negative prompts for {len(prompts)} prompts")
            uncond = self.encode_prompt(neg, clip_skip=clip_skip).repeat_interleave(num_images_per_prompt, dim=0)

        b = cond.shape[0]
        shape = (b, 4, height // f, width // f)
        init = None
        if start is not None:  # img2img: the image's latents (one VAE sample per given image), then the noise
            if image.shape[0] not in (1, b) and b % image.shape[0]:
                raise ValueError(f"{what}: {image.shape[0]} images do not divide the batch of {b}")
            init = self.vae.encode((image * 2 - 1).to(self.device, self.vae.dtype)).sample(generator)
            init = (init * self.vae.scaling_factor).to(self.dtype)
            init = init.repeat(b // init.shape[0], 1, 1, 1).to(torch.float32)
        keep = None
        if mask is not None and not self.is_inpainting:
            # mask blending (4-channel UNet), diffusers' draws in order: the image's latent sample, the noise, and
            # the masked image's latent sample (which a 4-channel UNet never reads; drawn to keep the stream).
            for name, t in (("image", image), ("mask", mask)):
                if t.shape[0] not in (1, b) and b % t.shape[0]:
                    raise ValueError(f"{what}: {t.shape[0]} {name}s do not divide the batch of {b}")
            img_lat = self.vae.encode((image * 2 - 1).to(self.device, self.vae.dtype)).sample(generator)
            img_lat = (img_lat * self.vae.scaling_factor).to(self.dtype)
            noise = torch.randn(shape, generator=generator, dtype=self.dtype,
                                device=generator.device if generator is not None else "cpu")
            torch.randn(img_lat.shape, generator=generator, dtype=self.vae.dtype,
                        device=generator.device if generator is not None else "cpu")
            mask_lat = F.interpolate(mask, size=shape[-2:]).to(self.device, torch.float32)  # nearest
            keep = (img_lat.repeat(b // img_lat.shape[0], 1, 1, 1).float(), noise.to(self.device, torch.float32),
                    mask_lat.repeat(b // mask_lat.shape[0], 1, 1, 1))
            if latents is None:
                latents = noise
        if latents is None and keep is None:
            # diffusers' randn_tensor: one draw of the whole batch on the generator's device, in the UNet dtype
            latents = torch.randn(shape, generator=generator, dtype=self.dtype,
                                  device=generator.device if generator is not None else "cpu")
        elif latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"{what}: latents must have shape {shape}, got {tuple(latents.shape)}")
        x = latents.to(self.device, torch.float32)

        unet = self.unet
        if mask is not None and self.is_inpainting:
            for name, t in (("image", image), ("mask", mask)):
                if t.shape[0] not in (1, b) and b % t.shape[0]:
                    raise ValueError(f"{what}: {t.shape[0]} {name}s do not divide the batch of {b}")
            masked = (image * 2 - 1) * (mask < 0.5)  # the area to repaint blanked (0 = mid grey in [-1, 1])
            masked_lat = self.vae.encode(masked.to(self.device, self.vae.dtype)).sample(generator)
            masked_lat = (masked_lat * self.vae.scaling_factor).to(self.dtype)
            mask_lat = F.interpolate(mask, size=shape[-2:]).to(self.device, self.dtype)  # nearest
            masked_lat = masked_lat.repeat(b // masked_lat.shape[0], 1, 1, 1)
            mask_lat = mask_lat.repeat(b // mask_lat.shape[0], 1, 1, 1)

            def unet(xx, t, c):  # xx is (b or 2b, 4, h, w): the extra channels follow the (guided) batch
                r = xx.shape[0] // b
                return self.unet(torch.cat([xx, mask_lat.repeat(r, 1, 1, 1), masked_lat.repeat(r, 1, 1, 1)], 1),
                                 t, c)

        schedule = NoiseSchedule.from_diffusers_config(self.scheduler_config)
        prediction = self.scheduler_config.get("prediction_type", "epsilon")
        model = Denoiser(lambda xx, t, c: unet(xx, t, c), prediction, dtype=self.dtype)
        opts = {}
        if keep is not None:
            opts["keep"] = keep
        if start is not None:
            if sampler not in ("ddpm", "ddim", "euler", "euler_a", "dpmpp_2m"):
                raise ValueError(f"{what}: sampler {sampler!r} has no partial-schedule (img2img) support")
            opts.update(init=init, start=start)
        x = sample(model, x, schedule, steps=steps, cond=cond, uncond=uncond, guidance=guidance if guided else None,
                   generator=generator, callback=callback, **opts)
        return self.decode_latents(x)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """UNet latents -> images in [0, 1] (fp32): VAE decode of ``latents / scaling_factor``."""
        z = (latents / self.vae.scaling_factor).to(self.vae.dtype)
        tile = getattr(self, "vae_tile", None)
        if tile:
            from fastdiff.models.vae_tiling import tiled_decode

            img = tiled_decode(self.vae, z, tile=tile).float()
        else:
            img = self.vae.decode(z).float()
        if not torch.isfinite(img).all():
            raise FloatingPointError(
                f"the VAE decode produced NaN/inf in {self.vae.dtype}; SD1 VAEs can overflow in float16: "
                "decode in float32 or bfloat16 (pipe.vae.to(dtype=torch.float32))")
        return (img / 2 + 0.5).clamp(0, 1)

    def enable_vae_tiling(self, tile: int | None = 512) -> "StableDiffusion1":
        """Decode images larger than ``tile`` pixels in overlapping tiles (bounded memory, as diffusers'
        ``enable_tiling``; see :mod:`fastdiff.models.vae_tiling`). ``None`` turns it off."""
        self.vae_tile = tile
        return self

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


def _image_tensor(img, name: str, channels: int = 3) -> torch.Tensor:
    """A (B, C, H, W) float32 tensor in [0, 1] from a tensor or a PIL image (mask: C = 1, grayscale)."""
    if isinstance(img, torch.Tensor):
        t = img.float()
        if t.dim() == 3:
            t = t[None]
    else:
        try:
            import numpy as np
            from PIL import Image
        except ImportError:  # pragma: no cover
            raise TypeError(f"{name}: expected a tensor or a PIL image") from None
        if not isinstance(img, Image.Image):
            raise TypeError(f"{name}: expected a tensor or a PIL image, got {type(img).__name__}")
        a = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
        t = torch.from_numpy(a.copy())
        t = t[None, None] if channels == 1 else t.permute(2, 0, 1)[None]
    if t.dim() != 4 or t.shape[1] != channels:
        raise ValueError(f"{name}: expected shape (B, {channels}, H, W), got {tuple(t.shape)}")
    if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
        raise ValueError(f"{name}: values must lie in [0, 1]")
    return t


def load_sd1(path: str | os.PathLike, dtype: torch.dtype | None = torch.float32,
             device: str | torch.device = "cpu", *, variant: str | None = None, use_ema: bool = False,
             configs: "ckpt.SD1Configs | None" = None) -> StableDiffusion1:
    """Load SD1.x from a diffusers folder or an original single file (``.safetensors`` / ``.ckpt``); see
    :func:`fastdiff.io.sd_checkpoint.load_sd1_components` for the arguments."""
    c = ckpt.load_sd1_components(path, dtype=dtype, device=device, variant=variant, use_ema=use_ema, configs=configs)
    return StableDiffusion1(c.unet, c.vae, c.text_encoder, c.tokenizer, c.scheduler_config)
