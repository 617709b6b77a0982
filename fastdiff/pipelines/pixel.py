"""Pixel-space DDPM pipelines: load a class-conditional (or unconditional) UNet2D, sample it, make pictures.

A pipeline is a folder in diffusers' layout, so the files are useful beyond fastdiff::

    model_index.json
    unet/config.json + diffusion_pytorch_model.safetensors     (diffusers UNet2DModel)
    scheduler/scheduler_config.json                            (diffusers DDPMScheduler: betas, prediction)

``load_pixel_pipeline`` also accepts a bare UNet2DModel folder (the DDPM paper's defaults then: linear betas,
eps prediction) and a fastdiff training run folder (its latest good checkpoint, EMA weights).
The bundled default model (Fashion-MNIST, 32x32, 10 classes) lives in ``fastdiff/assets/fashion32``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from fastdiff.models.unet2d import UNet2D
from fastdiff.samplers import Denoiser, get_sampler, make_schedule
from fastdiff.samplers.schedules import NoiseSchedule, normalize_prediction

__all__ = ["PixelPipeline", "load_pixel_pipeline", "scheduler_config", "bundled_model_dir", "slerp", "DEFAULT_STEPS"]

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# Defaults sized for the 20-second labelled grid of the bundled model on a 2-core CPU.
DEFAULT_STEPS = {"ddpm": 1000, "ddim": 20, "euler": 30, "euler_a": 30, "dpmpp_2m": 15}
_PRED_TO_DIFFUSERS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
_KIND_TO_DIFFUSERS = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


def bundled_model_dir() -> Path:
    """The default model shipped inside the package."""
    return ASSETS / "fashion32"


def slerp(a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """Spherical interpolation between two Gaussian noises (keeps the norm a Gaussian sample would have)."""
    af, bf = a.flatten().double(), b.flatten().double()
    cos = torch.dot(af, bf) / (af.norm() * bf.norm())
    theta = torch.arccos(cos.clamp(-1.0, 1.0))
    if float(theta) < 1e-6:
        return (1 - w) * a + w * b
    s = torch.sin(theta)
    return ((torch.sin((1 - w) * theta) / s) * a.double() + (torch.sin(w * theta) / s) * b.double()).to(a.dtype)


# Guidance scale for models whose folder does not name one (the scale most class-conditional DDPM write-ups use).
DEFAULT_GUIDANCE = 3.0


@dataclass
class PixelPipeline:
    """A pixel-space diffusion model and what is needed to sample it."""

    unet: UNet2D
    schedule: NoiseSchedule
    prediction: str
    clip: float | None = 1.0
    source: str = ""
    # The guidance scale this model samples best at (measured; stored in unet/config.json as
    # ``_fastdiff.default_guidance``); ``guidance="model"`` in :meth:`sample` uses it.
    default_guidance: float | None = DEFAULT_GUIDANCE

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
               sampler: str = "ddim", steps: int | None = None, guidance: float | str | None = "model",
               noise: torch.Tensor | None = None, precision: str = "fp32",
               callback: Callable[[int, float, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Samples in [-1, 1], shape (N, C, H, W). ``labels``: one class index per sample (None for an
        unconditional model, then ``n`` samples). The same seed gives the same images.

        ``precision="fp32"`` by default: at the bundled model's width (32-128 channels) bf16 autocast ran ~25%
        slower than fp32 on the CPU (the casts cost more than the narrower convolutions save).

        ``guidance``: the classifier-free guidance scale; ``"model"`` (default) takes the model's own
        :attr:`default_guidance`; None or 1 turn guidance off."""
        cfg = self.unet.config
        guidance = self.resolve_guidance(guidance)
        fn = get_sampler(sampler)
        if sampler == "flow_euler":
            raise ValueError("flow_euler samples rectified-flow models; this is a DDPM (VP) model")
        steps = steps or DEFAULT_STEPS[sampler]
        if steps < 1 or steps > self.schedule.num_train_timesteps:
            raise ValueError(f"steps must be in 1..{self.schedule.num_train_timesteps}, got {steps}")
        gen = torch.Generator().manual_seed(int(seed))
        if cfg.num_classes:
            if labels is None:
                raise ValueError(f"this model is class-conditional: give labels ({', '.join(self.class_names)})")
            y = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        else:
            if labels is not None:
                raise ValueError("this model is unconditional: labels must be None")
            if not n:
                raise ValueError("give n, the number of samples")
            y = None
        count = len(y) if y is not None else int(n)
        shape = (count, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if noise is None:
            x = torch.randn(shape, generator=gen)
        else:
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise must have shape {shape}, got {tuple(noise.shape)}")
            x = noise.float().clone()
        use_cfg = y is not None and guidance is not None and guidance != 1.0
        if use_cfg and not cfg.null_class:
            raise ValueError("classifier-free guidance needs a model trained with a null class; use guidance=None")
        uncond = torch.full_like(y, cfg.null_label) if use_cfg else None
        unet = self.unet
        dev = next(unet.parameters()).device
        autocast = precision == "bf16" and next(unet.parameters()).dtype == torch.float32

        def net(xx, tt, yy):
            # Only the network runs in bf16; the sampler's state and schedule arithmetic stay fp32/fp64.
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=autocast):
                return unet(xx.to(dev), tt.to(dev), None if yy is None else yy.to(dev)).float().cpu()

        kwargs = {"clip": self.clip} if sampler in ("ddpm", "ddim") and self.clip else {}
        if sampler in ("ddpm", "ddim"):
            kwargs["spacing"] = "trailing" if self.schedule.spacing is None else self.schedule.spacing
        out = fn(Denoiser(net, self.prediction), x, self.schedule, steps=steps, cond=y, uncond=uncond,
                 guidance=guidance if use_cfg else None, generator=gen, callback=callback, **kwargs)
        return out.clamp(-1, 1)

    def resolve_guidance(self, guidance: float | str | None) -> float | None:
        """``"model"`` -> this model's default guidance; numbers and None pass through (checked)."""
        if guidance == "model":
            return self.default_guidance
        if guidance is not None and (not isinstance(guidance, (int, float)) or guidance < 0):
            raise ValueError(f"guidance must be a number >= 0, None or 'model', got {guidance!r}")
        return guidance

    def add_noise(self, x0: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM eq. 4)."""
        a = float(self.schedule.alphas_cumprod[t])
        return math.sqrt(a) * x0 + math.sqrt(1.0 - a) * noise

    def save(self, folder: str | os.PathLike, *, dtype: torch.dtype | None = torch.float16,
             card: str | None = None) -> Path:
        """Write the pipeline folder (diffusers layout). ``dtype`` casts the weights (fp16 halves the file)."""
        from fastdiff.io.diffusers_unet2d import save_unet2d

        folder = Path(folder)
        save_unet2d(self.unet, folder / "unet", dtype=dtype)
        if self.default_guidance != DEFAULT_GUIDANCE:
            cfg_path = folder / "unet" / "config.json"
            d = json.loads(cfg_path.read_text())
            d.setdefault("_fastdiff", {})["default_guidance"] = self.default_guidance
            cfg_path.write_text(json.dumps(d, indent=2))
        (folder / "scheduler").mkdir(parents=True, exist_ok=True)
        (folder / "scheduler" / "scheduler_config.json").write_text(
            json.dumps(scheduler_config(self.schedule, self.prediction, self.clip), indent=2))
        (folder / "model_index.json").write_text(json.dumps(
            {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
             "scheduler": ["diffusers", "DDPMScheduler"]}, indent=2))
        if card is not None:
            (folder / "README.md").write_text(card)
        return folder


def scheduler_config(schedule: NoiseSchedule, prediction: str, clip: float | None = 1.0) -> dict:
    """The diffusers ``DDPMScheduler`` config of a schedule and prediction type (what ``save`` writes).

    Linear and scaled-linear betas are written as their recipe and end points (read back from the betas:
    ``linspace`` keeps both ends); any other schedule, or one rescaled to zero terminal SNR, as the exact
    ``trained_betas``, so diffusers and :meth:`NoiseSchedule.from_diffusers_config` rebuild the same betas."""
    cfg = {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": schedule.num_train_timesteps,
        "prediction_type": _PRED_TO_DIFFUSERS[normalize_prediction(prediction)],
        "variance_type": "fixed_small",
        "clip_sample": clip is not None,
        "clip_sample_range": clip or 1.0,
        "timestep_spacing": schedule.spacing or "trailing",
    }
    betas = schedule.betas.double()
    if schedule.kind in ("linear", "scaled_linear") and not schedule.zero_snr:
        cfg.update(beta_schedule=schedule.kind, beta_start=_tidy(float(betas[0])), beta_end=_tidy(float(betas[-1])))
    elif schedule.kind == "cosine" and not schedule.zero_snr:
        cfg["beta_schedule"] = _KIND_TO_DIFFUSERS["cosine"]
    else:
        cfg.update(beta_schedule="linear", trained_betas=betas.tolist())
    return cfg


def _tidy(x: float) -> float:
    """The shortest decimal (up to 8 digits) whose fp32 rounding is ``x`` (the betas are made in fp32, as in
    diffusers): 1e-4 in the JSON instead of 9.999999747378752e-05, rebuilding the same betas; else ``x``."""
    for digits in range(1, 9):
        short = float(f"{x:.{digits}g}")
        if torch.tensor(short, dtype=torch.float32).item() == x:
            return short
    return x


def _schedule_from_diffusers(d: dict) -> tuple[NoiseSchedule, str, float | None]:
    pred = normalize_prediction(d.get("prediction_type", "epsilon"))
    clip = float(d.get("clip_sample_range", 1.0)) if d.get("clip_sample", True) else None
    return NoiseSchedule.from_diffusers_config(d), pred, clip


def load_pixel_pipeline(path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> PixelPipeline:
    """A pipeline folder, a bare UNet2DModel folder, or a fastdiff training run folder (None: the bundled
    default model). Errors say what the path is missing."""
    from fastdiff.io.diffusers_unet2d import load_unet2d

    p = Path(path) if path is not None else bundled_model_dir()
    if not p.exists():
        if path is None:
            raise FileNotFoundError(f"the bundled default model is missing from this installation ({p}); "
                                    "reinstall fastdiff or pass a model path")
        raise FileNotFoundError(f"model path {p} does not exist")
    if (p / "latest.json").is_file():  # a training run
        from fastdiff.train.trainer import load_run_model

        run = load_run_model(p)
        unet = run.unet.to(device=device, dtype=dtype)
        return PixelPipeline(unet, run.schedule, run.prediction, 1.0, source=f"{p} (step {run.step}, EMA)")
    if (p / "unet" / "config.json").is_file():
        unet = load_unet2d(p / "unet", dtype=dtype).to(device)
        sc = p / "scheduler" / "scheduler_config.json"
        if sc.is_file():
            sched, pred, clip = _schedule_from_diffusers(json.loads(sc.read_text()))
        else:
            sched, pred, clip = make_schedule("linear", 1000), "eps", 1.0
        ext = json.loads((p / "unet" / "config.json").read_text()).get("_fastdiff", {})
        return PixelPipeline(unet, sched, pred, clip, source=str(p),
                             default_guidance=ext.get("default_guidance", DEFAULT_GUIDANCE))
    if (p / "config.json").is_file():
        unet = load_unet2d(p, dtype=dtype).to(device)
        return PixelPipeline(unet, make_schedule("linear", 1000), "eps", 1.0, source=str(p))
    raise ValueError(f"{p} is neither a pipeline folder (model_index.json, unet/, scheduler/), a UNet2DModel "
                     "folder (config.json + diffusion_pytorch_model.safetensors) nor a fastdiff run folder "
                     "(latest.json)")

