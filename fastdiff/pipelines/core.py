"""The one generation driver of every pipeline: prepare the conditioning -> prepare the latents -> sample ->
decode, with the argument checks the entry points share.

A model family (SD1 in sd1.py, SD3 in sd3.py, the pixel pipeline in pixel.py) supplies what differs:

    defaults                             Defaults: sampler, steps, guidance, size, strength when not told
    samplers                             the sampler names that can sample it
    encode_prompt(prompts, **encode)     conditioning (a tensor or a tuple of tensors, batch first)
    network(job)                         net(x, t, cond) -> output, the call the sampler makes each step
    prediction, network_dtype            what the output is ("eps", "v", "flow"); the dtype it runs in
    make_schedule(job)                   the noise schedule of the run
    latent_shape(batch, height, width)   the shape of the sampler's state
    latent_dtype, sample_device          the dtype the initial noise is drawn in; where the state lives
    vae, device, is_inpainting           the autoencoder (None: the pixel pipeline samples pixels)
    decode_latents(x)                    images in [0, 1]
    size_multiple()                      (m, why): height and width must be positive multiples of m
    img2img_start(steps, strength)       the first step img2img runs (the families round differently)

:func:`make_job` checks the arguments of an entry point (before anything is encoded, drawn or written: each
error is one line naming the argument and what it allows) and :func:`run` does the rest. Every pipeline returns
images in [0, 1].

Adapters plug in without touching the loop: the network the sampler calls each step is
``NetworkCall(family.network(job), concat, controls)``, built once per run, so an adapter that adds residuals to
the network (ControlNet) runs inside that call, and one that changes weights between calls (LoRA) changes the
family's modules and needs nothing of the driver. A family that takes ControlNets supplies
``check_controlnet(net, name)`` (an :class:`InvalidArgument` naming ``name`` when ``net`` does not fit its
denoiser); its ``network`` must then accept ``down_block_additional_residuals`` and
``mid_block_additional_residual`` keywords.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from fastdiff._argtypes import InvalidArgument, check_choice, check_int, check_number, check_quantize, check_type
from fastdiff.samplers import SAMPLERS, Denoiser, get_sampler

__all__ = ["Defaults", "Job", "Control", "NetworkCall", "make_job", "run", "image_tensor", "to_unit_range", "warn_truncated",
           "prompt_list", "cfg_scale", "QuantizeMixin"]


@dataclass(frozen=True)
class Defaults:
    """What an entry point uses when not told (the settings of the reference pipelines and model cards)."""

    sampler: str
    steps: int
    guidance: float
    height: int = 512
    width: int = 512
    strength: float = 0.8


@dataclass(frozen=True)
class Control:
    """One ControlNet of a run: the network, its control image (job.batch, 3, H, W) in [0, 1] at the output
    size, its scale, and the share of the steps it runs in (``[start, end]``, diffusers' rule)."""

    net: Any
    image: torch.Tensor
    scale: float
    start: float = 0.0
    end: float = 1.0

    def scale_at(self, i: int, n: int) -> float:
        """The scale at step ``i`` of the ``n`` steps that run: diffusers' ``controlnet_keep`` times the scale."""
        return self.scale if i / n >= self.start and (i + 1) / n <= self.end else 0.0


@dataclass
class Job:
    """The checked arguments of one generation call (see :func:`make_job`)."""

    what: str                           # the entry point that made it: "txt2img", "img2img", "inpaint", ...
    steps: int
    sampler: str
    guidance: float | None              # None: no classifier-free guidance
    generator: torch.Generator | None
    batch: int                          # images made = len(prompts) * num_images_per_prompt
    height: int | None = None
    width: int | None = None
    prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    cond: Any = None                    # conditioning given directly (prompt embeddings, class labels)
    uncond: Any = None
    num_images_per_prompt: int = 1
    encode: dict = field(default_factory=dict)       # keyword arguments of family.encode_prompt
    latents: torch.Tensor | None = None
    callback: Callable | None = None
    image: torch.Tensor | None = None   # (B|1, 3, H, W) in [0, 1]: img2img, inpainting
    mask: torch.Tensor | None = None    # (B|1, 1, H, W) in {0, 1}, 1 = repaint
    start: int | None = None            # img2img: the first step that runs
    options: dict = field(default_factory=dict)      # family settings of the run (SD3: shift)
    controls: list[Control] = field(default_factory=list)  # the ControlNets of the run


def cfg_scale(guidance: float | None) -> float | None:
    """Classifier-free guidance runs for a scale above 1, as in diffusers' text-to-image pipelines."""
    return float(guidance) if guidance is not None and guidance > 1.0 else None


def prompt_list(prompt, name: str = "prompt") -> list[str]:
    """A prompt string or a non-empty list of them, as a list; anything else is a TypeError naming ``name``."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise InvalidArgument(name, f"must be a string or a non-empty list of strings, got {prompt!r:.60}")
    return list(prompts)


def _negative_list(negative, n: int) -> list[str]:
    if negative is None:
        return [""] * n
    neg = [negative] * n if isinstance(negative, str) else prompt_list(negative, "negative_prompt")
    if len(neg) != n:
        raise InvalidArgument("negative_prompt", f"{len(neg)} negative prompts for {n} prompts: give one string "
                                                 "or one per prompt")
    return neg


def warn_truncated(tokenizer, prompts: list[str], n: int, name: str, specials: int) -> None:
    """Warn, naming the dropped words, for each prompt longer than the ``n`` token slots of ``tokenizer``
    (``specials`` of them taken by bos/eos)."""
    for p in prompts:
        ids = tokenizer.encode(p)
        if len(ids) > n:
            dropped = tokenizer.decode(ids[n - 1:-1])
            warnings.warn(f"prompt longer than {n - specials} {name} tokens: this part is dropped for {name}: "
                          f"{dropped!r}", stacklevel=4)


def image_tensor(img, name: str, channels: int = 3) -> torch.Tensor:
    """A (B, C, H, W) float32 tensor in [0, 1] from a tensor or a PIL image (mask: C = 1, grayscale)."""
    if isinstance(img, torch.Tensor):
        t = img.float()
        if t.dim() == 3:
            t = t[None]
    else:
        import numpy as np
        from PIL import Image

        if not isinstance(img, Image.Image):
            raise InvalidArgument(name, f"must be a tensor or a PIL image, got {type(img).__name__}")
        a = np.asarray(img.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
        t = torch.from_numpy(a.copy())
        t = t[None, None] if channels == 1 else t.permute(2, 0, 1)[None]
    if t.dim() != 4 or t.shape[1] != channels:
        raise InvalidArgument(name, f"expected shape (B, {channels}, H, W), got {tuple(t.shape)}")
    if not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
        raise InvalidArgument(name, "values must lie in [0, 1]")
    return t


def _check_divides(t: torch.Tensor, b: int, name: str) -> None:
    if b % t.shape[0]:
        raise InvalidArgument(name, f"{t.shape[0]} {name}s do not divide the batch of {b} images")


def _repeat_to(t: torch.Tensor, b: int) -> torch.Tensor:
    return t.repeat(b // t.shape[0], *([1] * (t.dim() - 1)))


def _batch_of(cond) -> int:
    return (cond[0] if isinstance(cond, (tuple, list)) else cond).shape[0]


def _tree(fn, c):
    return type(c)(fn(x) for x in c) if isinstance(c, (tuple, list)) else fn(c)


def make_job(family, what: str, *, prompt=None, negative_prompt=None, height=None, width=None, steps, guidance,
             sampler, seed=None, generator=None, num_images_per_prompt=1, latents=None, callback=None,
             image=None, mask=None, strength=None, cond=None, uncond=None, encode=None,
             options=None, control=None, controlnet=None, control_scale=1.0, control_start=0.0,
             control_end=1.0) -> Job:
    """Check every argument of an entry point and return the :class:`Job`. ``image`` alone: img2img at
    ``strength``; ``image`` and ``mask``: inpainting (output size = image size). ``cond``/``uncond``: the
    conditioning given instead of ``prompt``/``negative_prompt``. ``controlnet``/``control`` (and
    ``control_scale``, ``control_start``, ``control_end``): one ControlNet and its control image, or lists of
    them (see :func:`_controls`)."""
    if image is not None:
        image = image_tensor(image, "image")
        if mask is not None:
            mask = image_tensor(mask, "mask", channels=1)
            if image.shape[-2:] != mask.shape[-2:]:
                raise InvalidArgument("mask", f"mask size {tuple(mask.shape[-2:])} differs from image size "
                                              f"{tuple(image.shape[-2:])}")
            mask = (mask >= 0.5).to(image.dtype)
        height, width = int(image.shape[-2]), int(image.shape[-1])
    m, why = family.size_multiple()
    sides = (("height", height), ("width", width)) if image is None else (("image", height), ("image", width))
    for name, v in sides:
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v % m:
            side = "" if image is None else f"size {height}x{width}: each side "
            raise InvalidArgument(name, f"{side}must be a positive multiple of {m} {why}, got {v!r}")
    steps = check_int("steps", steps, 1)
    if guidance is not None:
        guidance = check_number("guidance", guidance, 0.0)
    check_choice("sampler", sampler, SAMPLERS)
    check_choice("sampler", sampler, family.samplers, f"for this {type(family).__name__} model")
    if seed is not None:
        seed = check_int("seed", seed, 0)
    check_type("generator", generator, torch.Generator, "a torch.Generator")
    if generator is None and seed is not None:
        generator = torch.Generator("cpu").manual_seed(seed)
    k = check_int("num_images_per_prompt", num_images_per_prompt, 1)
    check_type("latents", latents, torch.Tensor, "a tensor")
    if callback is not None and not callable(callback):
        raise InvalidArgument("callback", f"must be callable as callback(i, t, x), got {type(callback).__name__}")
    for key, low in (("clip_skip", 0), ("max_sequence_length", 1)):
        if encode and key in encode:
            encode[key] = check_int(key, encode[key], low)

    if prompt is not None and cond is not None:
        raise InvalidArgument("prompt", "give either prompt or prompt_embeds (from encode_prompt), not both")
    prompts = None if cond is not None else prompt_list(prompt)
    n = len(prompts) if prompts is not None else _batch_of(cond)
    scale = cfg_scale(guidance)
    negatives = None
    if scale is not None and uncond is None:
        negatives = _negative_list(negative_prompt, n)
    elif negative_prompt is not None and not isinstance(negative_prompt, str):
        prompt_list(negative_prompt, "negative_prompt")
    b = n * k

    start = None
    if image is not None and mask is None:
        strength = check_number("strength", strength, 0.0, 1.0)
        start = family.img2img_start(steps, strength)
        if start >= steps:
            raise InvalidArgument("strength", f"{strength} x {steps} steps leaves no step to run; raise the "
                                              "strength or the steps (at least one step must run)")
    for name, t in (("image", image), ("mask", mask)):
        if t is not None:
            _check_divides(t, b, name)
    controls = _controls(family, control, controlnet, control_scale, control_start, control_end, n, k,
                         height, width)
    shape = family.latent_shape(b, height, width)
    if latents is not None and tuple(latents.shape) != shape:
        raise InvalidArgument("latents", f"must have shape {shape}, got {tuple(latents.shape)}")
    return Job(what, steps, sampler, scale, generator, b, height, width, prompts, negatives, cond, uncond, k,
               dict(encode or {}), latents, callback, image, mask, start, dict(options or {}), controls)


def _per_net(name: str, v, m: int, several: bool) -> list:
    """A setting given once for every ControlNet, or (with a list of ControlNets) as a list of ``m`` values."""
    if isinstance(v, (list, tuple)):
        if not several:
            raise InvalidArgument(name, "a list needs a list of ControlNets (controlnet=[...]); give one value")
        if len(v) != m:
            raise InvalidArgument(name, f"{len(v)} values for {m} ControlNets: give one value or one per ControlNet")
        return list(v)
    return [v] * m


def _controls(family, control, controlnet, scale, start, end, n: int, k: int, height: int,
              width: int) -> list[Control]:
    """The checked ControlNets of a run. ``controlnet``: one ControlNet or a list; ``control``: its control
    image ((1|n, 3, height, width) tensor in [0, 1] or a PIL image, at the output size), or a list of one per
    ControlNet; ``scale``/``start``/``end``: one value or one per ControlNet. A control image of batch 1 serves
    every image; one of batch ``n`` (the number of prompts) is repeated per ``num_images_per_prompt`` (diffusers'
    ``prepare_image``); the guided batch's two halves see the same image."""
    if control is None and controlnet is None:
        return []
    if controlnet is None:
        raise InvalidArgument("control", "a control image needs a ControlNet: controlnet=fastdiff.load_controlnet(...)")
    if control is None:
        raise InvalidArgument("controlnet", "a ControlNet needs a control image: control=IMAGE (in [0, 1], at the "
                                            "output size)")
    check = getattr(family, "check_controlnet", None)
    if check is None:
        raise InvalidArgument("controlnet", f"this {type(family).__name__} model takes no ControlNet")
    several = isinstance(controlnet, (list, tuple))
    nets = list(controlnet) if several else [controlnet]
    if not nets:
        raise InvalidArgument("controlnet", "an empty list: give a ControlNet or a list of them")
    if several != isinstance(control, (list, tuple)):
        raise InvalidArgument("control", "give one control image per ControlNet: a list for a list of ControlNets, "
                                         "one image (tensor or PIL image) for one ControlNet")
    images = list(control) if several else [control]
    if len(images) != len(nets):
        raise InvalidArgument("control", f"{len(images)} control images for {len(nets)} ControlNets: give one per "
                                         "ControlNet")
    m = len(nets)
    scales, starts, ends = (_per_net(nm, v, m, several) for nm, v in
                            (("control_scale", scale), ("control_start", start), ("control_end", end)))
    out = []
    for j, (net, img, s, a, e) in enumerate(zip(nets, images, scales, starts, ends)):
        at = f"[{j}]" if several else ""
        check(net, f"controlnet{at}")
        t = image_tensor(img, f"control{at}")
        if tuple(t.shape[-2:]) != (height, width):
            raise InvalidArgument(f"control{at}", f"control image size {t.shape[-2]}x{t.shape[-1]} differs from the "
                                                  f"output size {height}x{width}")
        if t.shape[0] not in (1, n):
            raise InvalidArgument(f"control{at}", f"a batch of {t.shape[0]} control images for {n} prompts: give 1 "
                                                  "or one per prompt")
        t = t.repeat(n * k, 1, 1, 1) if t.shape[0] == 1 else t.repeat_interleave(k, dim=0)
        s = check_number(f"control_scale{at}", s, -math.inf)
        a = check_number(f"control_start{at}", a, 0.0, 1.0)
        e = check_number(f"control_end{at}", e, 0.0, 1.0)
        if a >= e:
            raise InvalidArgument(f"control_start{at}", f"{a} must be below control_end {e}")
        out.append(Control(net, t, s, a, e))
    return out


def _conditioning(family, job: Job):
    """(cond, uncond) for the whole batch: prompts encoded (or the conditioning given), negatives for the
    unconditional half when guided, each repeated ``num_images_per_prompt`` times."""
    if job.cond is None and job.prompts is None:
        return None, None  # an unconditional model
    cond = family.encode_prompt(job.prompts, **job.encode) if job.cond is None else job.cond
    uncond = None
    if job.guidance is not None:
        if job.uncond is not None:
            uncond, n = job.uncond, _batch_of(cond)
            u, c = (uncond[0], cond[0]) if isinstance(cond, (tuple, list)) else (uncond, cond)
            if u.shape[0] not in (1, n) or u.shape[1:] != c.shape[1:]:
                raise InvalidArgument("negative_prompt_embeds", f"{tuple(u.shape)} do not match prompt_embeds "
                                                                f"{tuple(c.shape)}")
            uncond = _tree(lambda t: t.expand(n, *t.shape[1:]), uncond)
        else:
            uncond = family.encode_prompt(job.negative_prompts, **job.encode)
        uncond = _tree(lambda t: t.repeat_interleave(job.num_images_per_prompt, dim=0), uncond)
    cond = _tree(lambda t: t.repeat_interleave(job.num_images_per_prompt, dim=0), cond)
    return cond, uncond


def _encode_image(family, pixels: torch.Tensor, generator) -> torch.Tensor:
    """Latents of images in [-1, 1]: one sample of the VAE posterior each, in the denoiser's space."""
    vae = family.vae
    z = vae.encode(pixels.to(family.device, vae.dtype)).sample(generator)
    return vae.to_latents(z).to(family.latent_dtype)


def _latents(family, job: Job, shape: tuple) -> tuple[torch.Tensor, dict, torch.Tensor | None]:
    """(initial state, the sampler's img2img / inpainting options, extra input channels of the network).

    Random draws come in diffusers' order: img2img: the image's latent sample, then the noise; mask blending:
    the image's latent sample, the noise, and the masked image's latent sample (which a 4-channel UNet never
    reads: drawn to keep the stream); 9-channel inpainting: the noise, then the masked image's latent sample."""
    b, g, dev = shape[0], job.generator, family.sample_device
    gen_device = g.device if g is not None else "cpu"
    opts, concat, latents = {}, None, job.latents
    if job.start is not None:
        init = _repeat_to(_encode_image(family, job.image * 2 - 1, g), b)
        opts.update(init=init.to(dev, torch.float32), start=job.start)
    blend = job.mask is not None and not family.is_inpainting
    if blend:
        img_lat = _encode_image(family, job.image * 2 - 1, g)
        noise = torch.randn(shape, generator=g, dtype=family.latent_dtype, device=gen_device)
        torch.randn(img_lat.shape, generator=g, dtype=family.vae.dtype, device=gen_device)
        mask_lat = F.interpolate(job.mask, size=shape[-2:]).to(dev, torch.float32)  # nearest
        opts["keep"] = (_repeat_to(img_lat, b).float(), noise.to(dev, torch.float32), _repeat_to(mask_lat, b))
        latents = noise if latents is None else latents
    if latents is None:
        # diffusers' randn_tensor: one draw of the whole batch on the generator's device, in the model dtype
        latents = torch.randn(shape, generator=g, dtype=family.latent_dtype, device=gen_device)
    if job.mask is not None and family.is_inpainting:
        masked = (job.image * 2 - 1) * (job.mask < 0.5)  # the area to repaint blanked (0 = mid grey)
        masked_lat = _encode_image(family, masked, g)
        mask_lat = F.interpolate(job.mask, size=shape[-2:]).to(dev, family.latent_dtype)  # nearest
        concat = torch.cat([_repeat_to(mask_lat, b), _repeat_to(masked_lat, b)], 1)
    return latents.to(device=dev, dtype=torch.float32, copy=True), opts, concat


class NetworkCall:
    """The network the sampler calls each step: ``forward(x, t, cond)``, with ``concat`` (extra input channels
    of the first ``batch`` samples, e.g. an inpainting UNet's mask and masked-image latents) appended to ``x``
    on the channel axis for every copy of the batch (the guided batch is [uncond, cond]).

    ``controls`` (:class:`Control`): the ControlNets whose residuals are added to the network's skips, computed
    each call for the whole batch from ``x`` before ``concat`` (an inpainting UNet's ControlNet reads the 4
    latent channels) at the scale of step ``step`` of ``steps`` (the driver advances ``step``)."""

    def __init__(self, forward: Callable, concat: torch.Tensor | None = None, controls: list | None = None,
                 steps: int = 1) -> None:
        self.forward = forward
        self.concat = concat
        self.controls = list(controls or [])
        self.steps = steps
        self.step = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        down = mid = None
        if self.controls:
            from fastdiff.models.controlnet import controlnet_residuals

            down, mid = controlnet_residuals(x, t, cond, [(c.net, c.image, c.scale_at(self.step, self.steps))
                                                          for c in self.controls])
        if self.concat is not None:
            r = x.shape[0] // self.concat.shape[0]
            x = torch.cat([x, self.concat.repeat(r, 1, 1, 1)], 1)
        if down is None:
            return self.forward(x, t, cond)
        return self.forward(x, t, cond, down_block_additional_residuals=down, mid_block_additional_residual=mid)


@torch.no_grad()
def run(family, job: Job) -> torch.Tensor:
    """Images (B, C, H, W) in [0, 1], fp32: conditioning -> initial latents -> sampling -> decode."""
    sample = get_sampler(job.sampler)
    cond, uncond = _conditioning(family, job)
    shape = family.latent_shape(job.batch, job.height, job.width)
    x, opts, concat = _latents(family, job, shape)
    first = job.start or 0
    controls = [Control(c.net, c.image.to(family.device, c.net.dtype), c.scale, c.start, c.end)
                for c in job.controls]
    net = NetworkCall(family.network(job), concat, controls, job.steps - first)
    callback = job.callback
    if controls:  # the step index of the ControlNets' [control_start, control_end]: steps run so far
        def callback(i, t, x, user=job.callback):
            net.step = i + 1 - first
            if user is not None:
                user(i, t, x)
    model = Denoiser(net, family.prediction, dtype=family.network_dtype)
    x = sample(model, x, family.make_schedule(job), steps=job.steps, cond=cond, uncond=uncond,
               guidance=job.guidance, generator=job.generator, callback=callback, **opts)
    return family.decode_latents(x)


def to_unit_range(img: torch.Tensor, fix: str) -> torch.Tensor:
    """Images in [-1, 1] (the models' range) -> [0, 1], every pipeline's output range; NaN/inf is an error
    whose message says how to ``fix`` it."""
    if not torch.isfinite(img).all():
        raise FloatingPointError(f"the images hold NaN/inf: {fix}")
    return (img / 2 + 0.5).clamp(0, 1)


class QuantizeMixin:
    """``pipe.quantize("int8")``: the denoiser (``pipe.transformer`` where the family has one, else ``pipe.unet``)
    runs its convolutions and linears as W8A8 integer products (:mod:`fastdiff.quant.int8`: int8 weights per
    output channel replace the float ones, activations quantised per call; norms, attention and the sampler stay
    in float). CPU only, inference only; the text encoders and the VAE are not touched."""

    quantized: str | None = None

    def quantize(self, mode: str = "int8", *, skip=None):
        """Quantise the denoiser in place and return the pipeline. ``skip``: module paths of the denoiser to keep
        in float (default :data:`fastdiff.quant.int8.DEFAULT_SKIP`: first and last layer, time embedding)."""
        check_quantize("mode", mode)
        from fastdiff.quant.int8 import DEFAULT_SKIP, quantize_int8

        if self.quantized == mode:
            return self
        net = self.transformer if hasattr(self, "transformer") else self.unet
        device = next(net.parameters()).device
        if device.type != "cpu":
            raise InvalidArgument("mode", f"{mode} runs on the CPU and the denoiser is on {device}: quantise before "
                                          "moving it, or keep it on the CPU")
        quantize_int8(net, skip=DEFAULT_SKIP if skip is None else tuple(skip))
        self.quantized = mode
        return self


class LatentPipeline(QuantizeMixin):
    """What the latent-diffusion families (SD1, SD3) share as :func:`run` sees them: a VAE, the denoiser run
    in the model's dtype, the sampler state in fp32 on the model's device. A subclass sets ``defaults`` and
    ``samplers`` and supplies ``dtype``, ``device``, ``encode_prompt``, ``network``, ``prediction``,
    ``make_schedule``, ``size_multiple`` and ``img2img_start``."""

    vae: Any
    vae_tile: int | None = None

    @property
    def is_inpainting(self) -> bool:
        return False

    @property
    def latent_dtype(self) -> torch.dtype:
        return self.dtype

    @property
    def network_dtype(self) -> torch.dtype:
        return self.dtype

    @property
    def sample_device(self) -> torch.device:
        return self.device

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        f = self.vae.downscale
        return (batch, self.vae.config.latent_channels, height // f, width // f)

    def enable_vae_tiling(self, tile: int | None = 512):
        """Decode images larger than ``tile`` pixels in overlapping tiles (bounded memory, as diffusers'
        ``enable_tiling``; see :mod:`fastdiff.models.vae_tiling`). ``None`` turns it off."""
        self.vae_tile = tile
        return self

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoiser latents -> images in [0, 1] (fp32): VAE decode of ``latents / scaling_factor + shift``."""
        z = self.vae.from_latents(latents).to(self.vae.dtype)
        if self.vae_tile:
            from fastdiff.models.vae_tiling import tiled_decode

            img = tiled_decode(self.vae, z, tile=self.vae_tile).float()
        else:
            img = self.vae.decode(z).float()
        return to_unit_range(img, f"the VAE decode overflowed in {self.vae.dtype} (SD VAEs can in float16): "
                                  "decode in float32 or bfloat16 (pipe.vae.to(dtype=torch.float32))")
