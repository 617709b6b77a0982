"""Pixel-space DDPM pipelines: load a class-conditional (or unconditional) UNet2D, sample it, make pictures.

The files (diffusers ``DDPMPipeline`` folders, bare ``UNet2DModel`` folders, fastdiff training runs) are read and
written by :mod:`fastdiff.io.pixel_folder`; the bundled default model (Fashion-MNIST, 32x32, 10 classes) lives in
``fastdiff/assets/fashion32``. Bundled models are named by :data:`BUNDLED_MODELS` (``fashion32``,
``fashion-sketch``, and the text-to-image ``fashion-tiny-sd``, an SD1-layout folder that
:func:`fastdiff.load_pipeline` opens by name).

Image-conditioned models (``conditioning="sketch"`` / ``"sketch+class"`` / ``"segmentation"`` runs of
:mod:`fastdiff.train`) take a condition image concatenated to the noisy sample's channels. Their condition record
(kind, channels, the sketch thresholds) is the run's ``arch["condition"]`` or, in a pipeline folder,
``unet/config.json``'s ``_fastdiff.condition`` (written by :meth:`PixelPipeline.save`). The condition is given in
[0, 1] (a sketch: edges 1 on 0, as ``fastdiff.sketch`` returns it) and enters the network as ``2 c - 1``; guidance
batches it with zeros, the dropped condition the model was trained with.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from fastdiff._argtypes import InvalidArgument, check_choice, check_int, check_number
from fastdiff.io.pixel_folder import (ASSETS, DEFAULT_GUIDANCE, PixelComponents, bundled_model_dir,
                                      load_pixel_components, pixel_schedule, save_pixel_folder)
from fastdiff.models.unet2d import UNet2D
from fastdiff.pipelines.core import Defaults, Job, QuantizeMixin, run, to_unit_range
from fastdiff.samplers import SAMPLERS
from fastdiff.samplers.schedules import NoiseSchedule

__all__ = ["PixelPipeline", "load_pixel_pipeline", "bundled_model_dir", "slerp", "DEFAULT_STEPS", "DEFAULTS",
           "BUNDLED_MODELS", "TEXT_TO_IMAGE_MODELS", "resolve_model_path", "read_condition"]

# Models shipped inside the package, by name (``model="fashion-sketch"``); a name whose folder is not installed
# says so when loaded.
BUNDLED_MODELS = {"fashion32": ASSETS / "fashion32", "fashion-sketch": ASSETS / "fashion-sketch",
                  "fashion-tiny-sd": ASSETS / "fashion-tiny-sd"}
# bundled text-to-image models (Stable Diffusion 1 layout): they take a prompt
TEXT_TO_IMAGE_MODELS = ("fashion-tiny-sd",)
# The argument that carries the condition image of each kind, in the entry points and their errors.
CONDITION_ARGUMENT = {"sketch": "sketch", "segmentation": "image"}

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
    condition: dict | None = None   # image conditioning: {"kind", "channels", ...} (see the module doc)

    defaults = DEFAULTS
    samplers = ("ddpm", "ddim", "euler", "euler_a", "dpmpp_2m")

    def __post_init__(self) -> None:
        self.schedule = pixel_schedule(self.schedule, self.clip)
        cfg, extra = self.unet.config, 0 if self.condition is None else int(self.condition.get("channels", 0))
        if self.condition is not None and self.condition.get("kind") not in CONDITION_ARGUMENT:
            raise ValueError(f"{self.source}: unknown condition kind {self.condition.get('kind')!r} (known: "
                             f"{', '.join(CONDITION_ARGUMENT)})")
        if cfg.in_channels != cfg.out_channels + extra:
            raise ValueError(f"{self.source}: the UNet takes {cfg.in_channels} input channels for {cfg.out_channels} "
                             f"output channels, but its folder names {extra} condition channels")

    @classmethod
    def from_components(cls, c: PixelComponents, condition: dict | None = None) -> "PixelPipeline":
        return cls(c.unet, c.schedule, c.prediction, c.schedule.clip_sample, c.source, c.default_guidance,
                   condition)

    @property
    def condition_argument(self) -> str | None:
        """The name of the argument that gives this model's condition image (None: it takes none)."""
        return None if self.condition is None else CONDITION_ARGUMENT[self.condition["kind"]]

    def condition_tensor(self, image, count: int | None = None) -> torch.Tensor:
        """A condition image as the network's input channels: (count, Cc, S, S) float32 in [-1, 1].

        ``image``: a PIL image, a numpy array (H, W) or a tensor (H, W), (Cc, H, W) or (B, Cc, H, W), values in
        [0, 1] (PIL: 0..255), square. A size other than the model's S is resized: a sketch by nearest
        neighbour up and max-pooling down (lines stay binary and are not lost), an image bilinearly
        (antialiased). A batch of 1 serves all ``count`` samples; otherwise it must have ``count`` images."""
        name, cfg = self.condition_argument, self.unet.config
        if name is None:
            raise InvalidArgument("condition", "this model takes no condition image")
        extra, size = int(self.condition["channels"]), cfg.sample_size
        if type(image).__module__ == "numpy" and hasattr(image, "ndim"):
            image = torch.from_numpy(image.copy())
        if isinstance(image, torch.Tensor):
            if image.is_complex():
                raise InvalidArgument(name, f"must be a real tensor, got {image.dtype}")
            t = image.float()
            t = t[None, None] if t.dim() == 2 else t[None] if t.dim() == 3 else t
        else:
            from PIL import Image

            if not isinstance(image, Image.Image):
                raise InvalidArgument(name, f"must be a PIL image, a numpy array or a tensor, got "
                                            f"{type(image).__name__}")
            import numpy as np

            a = np.asarray(image.convert("L" if extra == 1 else "RGB"), dtype=np.float32) / 255.0
            t = torch.from_numpy(a.copy())
            t = t[None, None] if extra == 1 else t.permute(2, 0, 1)[None]
        if t.dim() != 4 or t.shape[1] != extra:
            raise InvalidArgument(name, f"expected {extra} channel(s): (H, W), ({extra}, H, W) or (B, {extra}, H, W), "
                                        f"got shape {tuple(image.shape) if hasattr(image, 'shape') else image.size}")
        h, w = t.shape[-2:]
        if h != w or h < 1:
            raise InvalidArgument(name, f"must be square (the model makes {size}x{size} images), got {h}x{w}")
        if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
            raise InvalidArgument(name, f"values must lie in [0, 1] ({'edges 1, background 0: fastdiff.sketch(image)' if name == 'sketch' else 'the image scaled from 0..255'}); "
                                        f"got {float(t.min()):.4g}..{float(t.max()):.4g}")
        if h != size:
            if self.condition["kind"] != "sketch":
                t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=h > size, align_corners=False)
            elif h < size:
                t = F.interpolate(t, size=(size, size), mode="nearest-exact")
            else:
                t = F.adaptive_max_pool2d(t, size)
        if count is not None and t.shape[0] not in (1, count):
            raise InvalidArgument(name, f"a batch of {t.shape[0]} for {count} images: give one, or one per image")
        if count is not None and t.shape[0] == 1:
            t = t.expand(count, -1, -1, -1)
        return (t * 2 - 1).contiguous()

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
               callback: Callable[[int, float, torch.Tensor], None] | None = None,
               condition=None) -> torch.Tensor:
        """Images in [0, 1], shape (N, C, H, W). ``labels``: one class index per sample (None for an
        unconditional model, then ``n`` samples). The same seed gives the same images. ``steps``: default
        :data:`DEFAULT_STEPS` of the sampler.

        ``precision="fp32"`` by default: at the bundled model's width (32-128 channels) bf16 autocast ran ~25%
        slower than fp32 on the CPU (the casts cost more than the narrower convolutions save).

        ``guidance``: the classifier-free guidance scale; ``"model"`` (default) takes the model's own
        :attr:`default_guidance`; None or 1 turn guidance off.

        ``condition``: an image-conditioned model's condition image (see :meth:`condition_tensor`), required by
        such a model; guidance then contrasts it with the dropped (zero) condition. ``n`` defaults to its batch."""
        cfg = self.unet.config
        guidance = self.resolve_guidance(guidance)
        check_choice("sampler", sampler, SAMPLERS)
        check_choice("sampler", sampler, self.samplers, "for this DDPM (VP) model")
        steps = self.resolve_steps(sampler, steps)
        gen = torch.Generator().manual_seed(check_int("seed", seed, 0))
        check_choice("precision", precision, ("fp32", "bf16"))
        name = self.condition_argument
        if name is not None and condition is None:
            raise InvalidArgument(name, f"this model is {self.condition['kind']}-conditioned: give its condition "
                                        + ("(sketch=fastdiff.sketch(image), edges 1 on 0)" if name == "sketch" else
                                           "image in [0, 1]"))
        if name is None and condition is not None:
            raise InvalidArgument("condition", f"this model ({self.source or 'pixel model'}) takes no condition image")
        if cfg.num_classes:
            if labels is None:
                raise InvalidArgument("labels", f"this model is class-conditional: give labels "
                                                f"({', '.join(self.class_names)})")
            y = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
            count = len(y)
        else:
            if labels is not None:
                raise InvalidArgument("labels", "this model is unconditional: labels must be None")
            if n is None and condition is not None and getattr(condition, "dim", lambda: 0)() == 4:
                n = condition.shape[0]
            y, count = None, check_int("n", n, 1)
        image = None if condition is None else self.condition_tensor(condition, count)
        shape = self.latent_shape(count, None, None)
        if noise is not None and tuple(noise.shape) != shape:
            raise InvalidArgument("noise", f"must have shape {shape}, got {tuple(noise.shape)}")
        use_cfg = (y is not None or image is not None) and guidance is not None and guidance != 1.0
        if use_cfg and y is not None and not cfg.null_class:
            raise InvalidArgument("guidance", "classifier-free guidance needs a model trained with a null class; "
                                              "use guidance=None")
        cond = y if image is None else image if y is None else (y, image)
        uncond = None
        if use_cfg:  # the null label and / or the dropped (zero) condition image
            null_y = None if y is None else torch.full_like(y, cfg.null_label)
            uncond = null_y if image is None else torch.zeros_like(image) if y is None else \
                (null_y, torch.zeros_like(image))
        return run(self, Job("sample", steps, sampler, float(guidance) if use_cfg else None, gen, count, cond=cond,
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
        return (batch, cfg.out_channels, cfg.sample_size, cfg.sample_size)

    def make_schedule(self, job) -> NoiseSchedule:
        return self.schedule

    def network(self, job):
        unet = self.unet
        dev = next(unet.parameters()).device
        autocast = job.options["precision"] == "bf16" and next(unet.parameters()).dtype == torch.float32

        conditioned, labelled = self.condition is not None, bool(unet.config.num_classes)

        def net(xx, tt, yy):
            if conditioned:  # the condition image (or its zeros) as extra input channels
                yy, img = yy if labelled else (None, yy)
                xx = torch.cat([xx, img.to(xx.dtype)], 1)
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
        """Write the pipeline folder (diffusers layout). ``dtype`` casts the weights (fp16 halves the file); an
        image-conditioned model's condition record goes into ``unet/config.json`` (``_fastdiff.condition``)."""
        out = save_pixel_folder(PixelComponents(self.unet, self.schedule, self.prediction, self.default_guidance,
                                                self.source), folder, dtype=dtype, card=card)
        if self.condition is not None:
            cfg_path = out / "unet" / "config.json"
            d = json.loads(cfg_path.read_text())
            d.setdefault("_fastdiff", {})["condition"] = self.condition
            cfg_path.write_text(json.dumps(d, indent=2))
        return out


def resolve_model_path(model: str | os.PathLike | None) -> Path | None:
    """A bundled model's folder for its name (:data:`BUNDLED_MODELS`), else the path as given (None: None)."""
    if isinstance(model, str) and model in BUNDLED_MODELS:
        p = BUNDLED_MODELS[model]
        if not p.exists():
            raise FileNotFoundError(f"the bundled model {model!r} is not in this installation ({p}); pass a training "
                                    "run folder or an exported pipeline folder instead")
        return p
    return None if model is None else Path(model)


def read_condition(path: str | os.PathLike | None) -> dict | None:
    """The condition record of a model folder (None: the model takes no condition image): a training run's
    ``config.json`` ``arch.condition``, or ``_fastdiff.condition`` in a pipeline folder's ``unet/config.json``
    (or a bare UNet folder's ``config.json``)."""
    if path is None:
        return None
    p = Path(path)
    try:
        if (p / "latest.json").is_file():
            return (json.loads((p / "config.json").read_text()).get("arch") or {}).get("condition")
        for cfg_path in (p / "unet" / "config.json", p / "config.json"):
            if cfg_path.is_file():
                return json.loads(cfg_path.read_text()).get("_fastdiff", {}).get("condition")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{p}: unreadable model config ({type(e).__name__}: {e})") from None
    return None


def load_pixel_pipeline(path: str | os.PathLike | None = None, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> PixelPipeline:
    """A pipeline folder, a bare UNet2DModel folder, a fastdiff training run folder, or the name of a bundled
    model (:data:`BUNDLED_MODELS`; None: the bundled default model); see
    :func:`fastdiff.io.pixel_folder.load_pixel_components`."""
    p = resolve_model_path(path)
    return PixelPipeline.from_components(load_pixel_components(p, device=device, dtype=dtype), read_condition(p))
