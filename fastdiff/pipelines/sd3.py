"""Stable Diffusion 3 / 3.5 pipeline object: fastdiff's MMDiT, 16-channel VAE, CLIP-L, CLIP-G and (optional) T5-XXL.

    pipe = fastdiff.load_pipeline("sd3_medium_incl_clips_t5xxlfp16.safetensors")    # or a diffusers folder
    ctx, pooled = pipe.encode_prompt(["a photo of a cat"])     # (1, 77 + 256, 4096), (1, 2048)
    v = pipe.transformer(latents, timesteps, ctx, pooled)      # the flow the sampler integrates

Prompt embeddings are assembled as SD3 does (Esser et al. 2024, Sec. 5.1; diffusers' StableDiffusion3Pipeline):

    CLIP-L  penultimate hidden states (B, 77, 768)  --+-- concat on width -> (B, 77, 2048) -> zero-pad to 4096
    CLIP-G  penultimate hidden states (B, 77, 1280) --+
    T5-XXL  last hidden state (B, 256, 4096)         (zeros when the checkpoint has no T5: SD3 was trained
                                                      with T5 dropped out, so it works without, a bit worse)
    context = concat on tokens -> (B, 77 + 256, 4096);   pooled = concat(CLIP-L, CLIP-G projected) (B, 2048)

Sampling is rectified flow: Euler on dx/ds = v with diffusers' shifted sigmas (shift 3.0 for SD3), batched
classifier-free guidance (one MMDiT call on cat([uncond, cond]) per step).

Fitting 16 GB (SD3-medium + T5-XXL in fp16 is ~15.5 GB of weights; README has the table):

    pipe.offload_text_encoders()        # encoders live in CPU memory, visit the GPU only to encode
    emb = pipe.encode_prompt(prompts); neg = pipe.encode_prompt([""] * len(prompts))
    pipe.free_text_encoders()           # or drop them for good once the prompts are encoded
    images = pipe.txt2img(prompt_embeds=emb, negative_prompt_embeds=neg)
    pipe.quantize_t5_8bit()             # or: T5 in 8 bits (bitsandbytes LLM.int8), 8.9 -> 4.6 GiB
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from fastdiff._argtypes import InvalidArgument, check_int, check_number
from fastdiff.io import sd3_load
from fastdiff.io.sd3_load import SD3_SCHEDULER_CONFIG
from fastdiff.pipelines.core import Defaults, LatentPipeline, make_job, prompt_list, run, warn_truncated
from fastdiff.samplers import FlowSchedule

__all__ = ["StableDiffusion3", "SD3_SCHEDULER_CONFIG", "load_sd3", "DEFAULTS"]
_CLIP_TOKENS = 77

# What txt2img / img2img, fastdiff.generate and `fastdiff generate` use when not told: the settings of diffusers'
# StableDiffusion3Pipeline / StableDiffusion3Img2ImgPipeline and the SD3 model card.
DEFAULTS = Defaults(sampler="flow_euler", steps=28, guidance=7.0, height=1024, width=1024, strength=0.6)


class StableDiffusion3(LatentPipeline):
    """Holds ``.transformer`` (MMDiT), ``.vae``, ``.text_encoder`` (CLIP-L), ``.text_encoder_2`` (CLIP-G),
    ``.text_encoder_3`` (T5-XXL or None), their tokenizers, and the scheduler settings."""

    defaults = DEFAULTS
    samplers = ("flow_euler",)

    def __init__(self, transformer, vae, text_encoder, text_encoder_2, text_encoder_3, tokenizer, tokenizer_2,
                 tokenizer_3, scheduler_config: dict | None = None):
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.text_encoder_3 = text_encoder_3
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        self.tokenizer_3 = tokenizer_3
        self.scheduler_config = dict(scheduler_config or SD3_SCHEDULER_CONFIG)
        self._offload = False

    # ------------------------------------------------------------------------------------------------ basics
    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def text_encoders(self) -> list:
        return [m for m in (self.text_encoder, self.text_encoder_2, self.text_encoder_3) if m is not None]

    def to(self, device=None, dtype: torch.dtype | None = None) -> "StableDiffusion3":
        for m in [self.transformer, self.vae] + ([] if self._offload else self.text_encoders):
            m.to(device=device, dtype=dtype)
        if self._offload and dtype is not None:
            for m in self.text_encoders:
                m.to(dtype=dtype)
        return self

    def free_text_encoders(self) -> "StableDiffusion3":
        """Drop the three text encoders (their memory is released once nothing else holds them); afterwards
        generate from embeddings made earlier with :meth:`encode_prompt` (``prompt_embeds=``)."""
        self.text_encoder = self.text_encoder_2 = self.text_encoder_3 = None
        return self

    def quantize_t5_8bit(self, *, threshold: float = 6.0) -> "StableDiffusion3":
        """T5-XXL's projections as bitsandbytes LLM.int8() layers (1 byte a weight; CUDA, and CPU with
        bitsandbytes >= 0.50): see :func:`fastdiff.io.t5_checkpoint.quantize_8bit`."""
        from fastdiff.io.t5_checkpoint import quantize_8bit

        if self.text_encoder_3 is None:
            raise ValueError("this pipeline has no T5 text encoder to quantize")
        quantize_8bit(self.text_encoder_3, threshold=threshold)
        return self

    def offload_text_encoders(self, enabled: bool = True) -> "StableDiffusion3":
        """Keep the text encoders in CPU memory and bring each to the transformer's device only while it
        encodes a prompt (SD3-medium with T5-XXL in fp16 is ~15.4 GB: without this it does not fit 16 GB)."""
        self._offload = bool(enabled)
        if enabled:
            for m in self.text_encoders:
                m.to("cpu")
        return self

    # ---------------------------------------------------------------------------------------------- prompts
    def _encode_with(self, encoder, fn):
        """Run ``fn(encoder, device)`` with the encoder on the compute device (moved there and back when
        offloading) and return its outputs on the transformer's device."""
        device = self.device
        if self._offload and device.type != "cpu":
            encoder.to(device)
            try:
                return fn(encoder, device)
            finally:
                encoder.to("cpu")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        return fn(encoder, next(encoder.parameters()).device)

    @torch.no_grad()
    def encode_prompt(self, prompts: str | list[str], *, clip_skip: int = 0,
                      max_sequence_length: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, 77 + max_sequence_length, joint_dim), pooled (B, 2048)) as SD3 assembles them.

        Prompts are cut to 77 CLIP tokens and ``max_sequence_length`` T5 tokens (diffusers' defaults); the
        dropped words are named in a warning."""
        prompts = prompt_list(prompts, "prompts")
        if self.text_encoder is None or self.text_encoder_2 is None:
            raise ValueError("the text encoders were freed (free_text_encoders): pass prompt_embeds= made earlier "
                             "with encode_prompt, or reload the pipeline")
        _check_max_sequence_length(max_sequence_length)
        warn_truncated(self.tokenizer, prompts, _CLIP_TOKENS, "CLIP", specials=2)
        hidden, pooled = [], []
        for enc, tok in ((self.text_encoder, self.tokenizer), (self.text_encoder_2, self.tokenizer_2)):
            h, p = self._encode_with(enc, lambda e, d, tok=tok: e.encode_sd3(tok(prompts).to(d), clip_skip=clip_skip))
            hidden.append(h.to(self.device))
            pooled.append(p.to(self.device))
        joint = self.transformer.config.joint_attention_dim
        clip = torch.cat(hidden, dim=-1)
        clip = F.pad(clip, (0, joint - clip.shape[-1]))
        b = len(prompts)
        if self.text_encoder_3 is None:
            t5 = torch.zeros(b, max_sequence_length, joint, dtype=clip.dtype, device=self.device)
        else:
            warn_truncated(self.tokenizer_3, prompts, max_sequence_length, "T5", specials=1)
            t5 = self._encode_with(self.text_encoder_3, lambda e, d: e(
                self.tokenizer_3(prompts, max_length=max_sequence_length).to(d))).to(self.device)
        dt = self.dtype
        return torch.cat([clip.to(dt), t5.to(dt)], dim=-2), torch.cat(pooled, dim=-1).to(dt)

    # ------------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def txt2img(self, prompt: str | list[str] | None = None, *, negative_prompt: str | list[str] | None = None,
                height: int = DEFAULTS.height, width: int = DEFAULTS.width, steps: int = DEFAULTS.steps,
                guidance: float = DEFAULTS.guidance, seed: int | None = None, generator: torch.Generator | None = None,
                num_images_per_prompt: int = 1, shift: float | None = None, clip_skip: int = 0,
                max_sequence_length: int = 256, latents: torch.Tensor | None = None, callback=None,
                sampler: str = DEFAULTS.sampler, prompt_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
                negative_prompt_embeds: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Images (B, 3, height, width) in [0, 1], fp32, B = len(prompts) * num_images_per_prompt.

        The initial noise is one ``torch.randn`` of the latent batch from ``generator`` (or ``seed``) in the
        transformer's dtype, as diffusers' StableDiffusion3Pipeline draws it, so the same seed gives the same
        image there too. ``shift`` overrides the scheduler's timestep shift (3.0 for SD3).
        ``prompt_embeds`` / ``negative_prompt_embeds``: ``(context, pooled)`` from :meth:`encode_prompt`, instead
        of the prompts (the text encoders are then not needed).
        """
        return run(self, self._job("txt2img", prompt, prompt_embeds, negative_prompt_embeds, shift, dict(
            negative_prompt=negative_prompt, height=height, width=width, steps=steps, guidance=guidance, seed=seed,
            generator=generator, num_images_per_prompt=num_images_per_prompt, latents=latents, callback=callback,
            sampler=sampler, encode={"clip_skip": clip_skip, "max_sequence_length": max_sequence_length})))

    @torch.no_grad()
    def img2img(self, prompt: str | list[str] | None, image, *, strength: float = DEFAULTS.strength,
                negative_prompt: str | list[str] | None = None, steps: int = DEFAULTS.steps,
                guidance: float = DEFAULTS.guidance, seed: int | None = None, generator: torch.Generator | None = None,
                num_images_per_prompt: int = 1, shift: float | None = None, clip_skip: int = 0,
                max_sequence_length: int = 256, callback=None, sampler: str = DEFAULTS.sampler,
                prompt_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
                negative_prompt_embeds: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Re-draw ``image`` ((B|1, 3, H, W) tensor in [0, 1] or a PIL image) towards the prompt.

        ``strength`` in [0, 1] as diffusers' StableDiffusion3Img2ImgPipeline: the schedule is entered at step
        ``int(steps - steps * strength)`` and the image's latents are noised to that step's sigma (random draws
        in diffusers' order: the VAE's latent sample, then the noise).
        """
        return run(self, self._job("img2img", prompt, prompt_embeds, negative_prompt_embeds, shift, dict(
            negative_prompt=negative_prompt, image=image, strength=strength, steps=steps, guidance=guidance,
            seed=seed, generator=generator, num_images_per_prompt=num_images_per_prompt, callback=callback,
            sampler=sampler, encode={"clip_skip": clip_skip, "max_sequence_length": max_sequence_length})))

    def _job(self, what, prompt, prompt_embeds, negative_prompt_embeds, shift, kw):
        _check_max_sequence_length(kw["encode"]["max_sequence_length"])
        if shift is not None:
            shift = check_number("shift", shift, 0.0, low_open=True)
        cond = None if prompt_embeds is None else self._embeds(prompt_embeds, "prompt_embeds")
        uncond = None if negative_prompt_embeds is None else self._embeds(negative_prompt_embeds,
                                                                           "negative_prompt_embeds")
        return make_job(self, what, prompt=prompt, cond=cond, uncond=uncond, options={"shift": shift}, **kw)

    def _embeds(self, e, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if (not isinstance(e, (tuple, list)) or len(e) != 2 or not all(isinstance(t, torch.Tensor) for t in e)
                or e[0].dim() != 3 or e[1].dim() != 2 or e[0].shape[0] != e[1].shape[0]):
            raise InvalidArgument(name, "must be (context (B, tokens, width), pooled (B, width)) as encode_prompt "
                                        "returns")
        return tuple(t.to(self.device, self.dtype) for t in e)

    # the model family, as the generation driver (fastdiff.pipelines.core) asks for it
    prediction = "flow"

    def size_multiple(self) -> tuple[int, str]:
        f, p = self.vae.downscale, self.transformer.config.patch_size
        return f * p, f"(VAE downscale {f} x patch size {p})"

    @staticmethod
    def img2img_start(steps: int, strength: float) -> int:
        return int(max(steps - steps * strength, 0))  # diffusers' SD3 img2img enters the schedule here

    def make_schedule(self, job) -> FlowSchedule:
        sched = self.scheduler_config
        if sched.get("use_dynamic_shifting"):
            raise ValueError("this scheduler config asks for dynamic shifting (resolution-dependent mu), which "
                             "fastdiff's SD3 pipeline does not implement; pass shift= instead")
        shift = job.options.get("shift")
        return FlowSchedule(num_train_timesteps=int(sched.get("num_train_timesteps", 1000)),
                            shift=float(shift if shift is not None else sched.get("shift", 3.0)))

    def network(self, job):
        net = self.transformer
        return lambda x, t, c: net(x, t, c[0], c[1])  # c = (context, pooled)

    # ----------------------------------------------------------------------------------------------- saving
    def save_pretrained(self, folder: str | os.PathLike, *, dtype: torch.dtype | None = None) -> None:
        """A diffusers folder (``StableDiffusion3Pipeline.from_pretrained`` reads it)."""
        sd3_load.save_sd3_diffusers(self, folder, dtype=dtype)

    def save_single_file(self, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                         include_text_encoders: bool = True) -> None:
        """An original-layout ``.safetensors`` (MMDiT + VAE, and the text encoders unless told otherwise)."""
        sd3_load.save_sd3_single_file(self, path, dtype=dtype, include_text_encoders=include_text_encoders)

    def __repr__(self) -> str:
        c = self.transformer.config
        return (f"StableDiffusion3(depth={c.num_layers}, heads={c.num_attention_heads}, "
                f"t5={'yes' if self.text_encoder_3 is not None else 'no'}, dtype={self.dtype}, device={self.device})")


def _check_max_sequence_length(n) -> None:
    if check_int("max_sequence_length", n, 1) > 512:
        raise InvalidArgument("max_sequence_length", f"must be an integer in [1, 512] (T5's positions), got {n}")


def load_sd3(path: str | os.PathLike, dtype: torch.dtype | None = torch.float32,
             device: str | torch.device = "cpu", *, text_encoder_3: bool = True,
             text_encoders: str | os.PathLike | None = None) -> StableDiffusion3:
    """Load SD3 / SD3.5 from a diffusers folder or an original single file. ``text_encoder_3=False`` skips T5
    (its embedding is then zeros, as SD3 allows); ``text_encoders``: a diffusers SD3 folder to take the text
    encoders from when a single file holds none."""
    c = sd3_load.load_sd3_components(path, dtype=dtype, device=device, text_encoder_3=text_encoder_3,
                                     text_encoders=text_encoders)
    return StableDiffusion3(c.transformer, c.vae, c.text_encoder, c.text_encoder_2, c.text_encoder_3, c.tokenizer,
                            c.tokenizer_2, c.tokenizer_3, c.scheduler_config)
