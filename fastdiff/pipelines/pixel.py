"""Pixel-space DDPM pipelines: load a class-conditional (or unconditional) UNet2D, sample it, make pictures.

The files (diffusers ``DDPMPipeline`` folders, bare ``UNet2DModel`` folders, fastdiff training runs) are read and
written by :mod:`fastdiff.io.pixel_folder`; the bundled default model (Fashion-MNIST, 32x32, 10 classes) lives in
``fastdiff/assets/fashion32``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from fastdiff._argtypes import InvalidArgument, check_choice, check_int, check_number
from fastdiff.io.pixel_folder import (DEFAULT_GUIDANCE, PixelComponents, bundled_model_dir, load_pixel_components,
                                      pixel_schedule, save_pixel_folder)
from fastdiff.models.unet2d import UNet2D
from fastdiff.pipelines.core import Defaults, Job, QuantizeMixin, run, to_unit_range
from fastdiff.samplers import SAMPLERS
from fastdiff.samplers.schedules import NoiseSchedule

__all__ = ["PixelPipeline", "load_pixel_pipeline", "bundled_model_dir", "slerp", "DEFAULT_STEPS", "DEFAULTS"]

# Defaults sized for the 20-second labelled grid of the bundled model on a 2-core CPU: steps per sampler, and
# what `fastdiff generate` / fastdiff.generate use when not told (guidance: the model's own, see PixelPipeline).
DEFAULT_STEPS = {"ddpm": 1000, "ddim": 20, "euler": 30, "euler_a": 30, "dpmpp_2m": 15}
DEFAULTS = Defaults(sampler="ddim", steps=DEFAULT_STEPS["ddim"], guidance=DEFAULT_GUIDANCE, height=32, width=32)


def slerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """Spherical interpolation between two Gaussian noises (keeps the norm a Gaussian sample would have)."""
    af, bf = a.flatten().double(), b.flatten().double()
    cos = torch.dot(af, bf) / (af.norm() * bf.norm())
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    if float(theta) < 1e-6:
        return (1 - w) * a + w * b
    s = torch.sin(theta)
    return ((torch.sin((1 - w) * theta) / s) * a.double() + (torch.sin(w * theta) / s) * b.double()).to(a.dtype)


@dataclass
class PixelPipeline(QuantizeMixin):
    """A pixel-space diffusion model and what is needed to sample it.

    ``clip``: DDPM/DDIM clamp their x0 estimate to ``[-clip, clip]`` (None: off); it and the timestep spacing
    (trailing unless the schedule names one) become the schedule's sampling settings
    (:func:`fastdiff.io.pixel_folder.pixel_schedule`). ``default_guidance``: the guidance scale this model samples
    best at (measured; stored in unet/config.json as ``_fastdiff.default_guidance``); ``guidance="model"`` in
    :meth:`sample` uses it."""

    unet: UNet2D
    schedule: NoiseSchedule
    prediction: str
    clip: float | None = 1.0
    source: str = ""
    default_guidance: float | None = DEFAULT_GUIDANCE

    defaults = DEFAULTS
    samplers = ("ddpm", "ddim", "euler", "euler_a", "dpmpp_2m")

    def __post_init__(self) -> None:
        self.schedule = pixel_schedule(self.schedule, self.clip)

    @classmethod
    def from_components(cls, c: PixelComponents) -> "PixelPipeline":
        return cls(c.unet, c.schedule, c.prediction, c.schedule.clip_sample, c.source, c.default_guidance)

    @property
    def class_names(self) -> list[str]:
        cfg = self.unet.config
        if not cfg.num_classes:
            return []
        return list(cfg.class_names) or [str(i) for i in range(cfg.num_classes)]

    def label_index(self, label: int | str) -> int:
        """A class index from an index or a (case-insensitive) class name; the error lists the classes."""
        names = self.class_names
        if not names:
            raise ValueError("this model is unconditional: it takes no label")
        if isinstance(label, str) and not label.lstrip("-").isdigit():
            want = label.strip().lower().replace("_", "-").replace(" ", "-")
            for i, n in enumerate(names):
                if n.lower().replace("_", "-").replace(" ", "-") == want:
                    return i
            raise ValueError(f"unknown class {label!r}; this model knows: {', '.join(names)}")
        i = int(label)
        if not 0 <= i < len(names):
            raise ValueError(f"class index {i} is outside 0..{len(names) - 1} ({', '.join(names)})")
        return i

    @torch.no_grad()
    def sample(self, labels: Sequence[int] | torch.Tensor | None, *, n: int | None = None, seed: int = 0,
               sampler: str = DEFAULTS.sampler, steps: int | None = None, guidance: float | str | None = "model",
               noise: torch.Tensor | None = None, precision: str = "fp32",
               callback: Callable[[int, float, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Images in [0, 1], shape (N, C, H, W). ``labels``: one class index per sample (None for an
        unconditional model, then ``n`` samples). The same seed gives the same images. ``steps``: default
        :data:`DEFAULT_STEPS` of the sampler.

        ``precision="fp32"`` by default: at the bundled model's width (32-128 channels) bf16 autocast ran ~25%
        slower than fp32 on the CPU (the casts cost more than the narrower convolutions save).

        ``guidance``: the classifier-free guidance scale; ``"model"`` (default) takes the model's own
        :attr:`default_guidance`; None or 1 turn guidance off."""
        cfg = self.unet.config
        guidance = self.resolve_guidance(guidance)
        check_choice("sampler", sampler, SAMPLERS)
        check_choice("sampler", sampler, self.samplers, "for this DDPM (VP) model")
        steps = self.resolve_steps(sampler, steps)
        gen = torch.Generator().manual_seed(check_int("seed", seed, 0))
        check_choice("precision", precision, ("fp32", "bf16"))
        if cfg.num_classes:
            if labels is None:
                raise InvalidArgument("labels", f"this model is class-conditional: give labels "
                                                f"({', '.join(self.class_names)})")
            y = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
            count = len(y)
        else:
            if labels is not None:
                raise InvalidArgument("labels", "this model is unconditional: labels must be None")
            y, count = None, check_int("n", n, 1)
        shape = self.latent_shape(count, None, None)
        if noise is not None and tuple(noise.shape) != shape:
            raise InvalidArgument("noise", f"must have shape {shape}, got {tuple(noise.shape)}")
        use_cfg = y is not None and guidance is not None and guidance != 1.0
        if use_cfg and not cfg.null_class:
            raise InvalidArgument("guidance", "classifier-free guidance needs a model trained with a null class; "
                                              "use guidance=None")
        uncond = torch.full_like(y, cfg.null_label) if use_cfg else None
        return run(self, Job("sample", steps, sampler, float(guidance) if use_cfg else None, gen, count, cond=y,
                             uncond=uncond, latents=noise, callback=callback, options={"precision": precision}))

    def resolve_steps(self, sampler: str, steps: int | None) -> int:
        """``steps`` checked against the schedule, or the sampler's default (:data:`DEFAULT_STEPS`)."""
        if steps is None:
            return DEFAULT_STEPS[sampler]
        T = self.schedule.num_train_timesteps
        if check_int("steps", steps, 1) > T:
            raise InvalidArgument("steps", f"must be an integer in 1..{T}, got {steps}")
        return steps

    # the model family, as the generation driver (fastdiff.pipelines.core) asks for it: pixels, no autoencoder
    vae = None
    is_inpainting = False
    latent_dtype = torch.float32
    network_dtype = None                 # the network call below handles its own precision
    sample_device = torch.device("cpu")  # the sampler state stays on the CPU; the network call moves it

    def latent_shape(self, batch: int, height, width) -> tuple[int, int, int, int]:
        cfg = self.unet.config
        return (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)

    def make_schedule(self, job) -> NoiseSchedule:
        return self.schedule

    def network(self, job):
        unet = self.unet
        dev = next(unet.parameters()).device
        autocast = job.options["precision"] == "bf16" and next(unet.parameters()).dtype == torch.float32

        def net(xx, tt, yy):
            # Only the network runs in bf16; the sampler's state and schedule arithmetic stay fp32/fp64.
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=autocast):
                return unet(xx.to(dev), tt.to(dev), None if yy is None else yy.to(dev)).float().cpu()

        return net

    def decode_latents(self, x: torch.Tensor) -> torch.Tensor:
        return to_unit_range(x, "sample in float32 (precision='fp32') or with less guidance")

    def resolve_guidance(self, guidance: float | str | None) -> float | None:
        """``"model"`` -> this model's default guidance; numbers and None pass through (checked)."""
        if guidance == "model":
            return self.default_guidance
        return None if guidance is None else check_number("guidance", guidance, 0.0)

    def add_noise(self, x0: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
        """``x0`` noised to training timestep ``t``: the schedule's q(x_t | x_0)."""
        return self.schedule.add_noise(x0, noise, torch.full((x0.shape[0],), int(t)))

    def save(self, folder: str | os.PathLike, *, dtype: torch.dtype | None = torch.float16,
             card: str | None = None) -> Path:
        """Write the pipeline folder (diffusers layout). ``dtype`` casts the weights (fp16 halves the file)."""
        return save_pixel_folder(PixelComponents(self.unet, self.schedule, self.prediction, self.default_guidance,
                                                 self.source), folder, dtype=dtype, card=card)


def load_pixel_pipeline(path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> PixelPipeline:
    """A pipeline folder, a bare UNet2DModel folder, or a fastdiff training run folder (None: the bundled
    default model); see :func:`fastdiff.io.pixel_folder.load_pixel_components`."""
    return PixelPipeline.from_components(load_pixel_components(path, device=device, dtype=dtype))
