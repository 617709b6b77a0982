"""``fastdiff generate``: pictures from a model (the bundled Fashion-MNIST model when no --model is given)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from fastdiff._argtypes import (QUANTIZE_MODES, device_name, existing_path, float_in, int_at_least, lora_spec,
                                multiple_of, output_file, quantize_mode)

__all__ = ["add_generate_parser"]


def add_generate_parser(sub) -> None:
    from fastdiff.samplers import SAMPLERS

    p = sub.add_parser("generate", help="sample a model and write a PNG (default: a labelled grid of every class "
                       "from the bundled model)")
    p.add_argument("--model", default=None, type=_model_path, help="Stable Diffusion 1.x / 3 diffusers folder or .safetensors/.ckpt file "
                   "(with --prompt), pipeline folder, UNet2DModel folder, training run folder or a bundled model's "
                   "name (fashion32, fashion-sketch with --sketch) (default: the bundled Fashion-MNIST model)")
    p.add_argument("--sketch", default=None, type=existing_path("file"), help="sketch-to-image: the edge map to "
                   "follow (an image, edges white on black, e.g. from fastdiff.sketch), for a sketch-conditioned "
                   "--model such as fashion-sketch")
    p.add_argument("--prompt", default=None, help="text prompt (Stable Diffusion --model)")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from (Stable Diffusion)")
    p.add_argument("--height", type=multiple_of(8, 8), default=None, help="image height, a multiple of 8 (Stable "
                   "Diffusion; default: the model family's DEFAULTS)")
    p.add_argument("--width", type=multiple_of(8, 8), default=None, help="image width, a multiple of 8 (Stable "
                   "Diffusion; default: the model family's DEFAULTS)")
    p.add_argument("--init-image", default=None, type=existing_path("file"), help="img2img: the picture to start from (Stable Diffusion)")
    p.add_argument("--strength", type=float_in(0.0, 1.0), default=None, help="img2img: share of the schedule "
                   "re-run, in [0, 1] (default: the model family's DEFAULTS)")
    p.add_argument("--mask", default=None, type=existing_path("file"), help="inpainting: white = repaint (with --init-image)")
    p.add_argument("--controlnet", default=None, type=existing_path(), help="SD1 ControlNet: a diffusers folder "
                   "or an original .safetensors/.pth file (with --control-image)")
    p.add_argument("--control-image", default=None, type=existing_path("file"), help="ControlNet: the control "
                   "image (e.g. from `fastdiff.control`), at the output size (with --controlnet)")
    p.add_argument("--control-scale", type=float_in(0.0), default=1.0, help="ControlNet: how strongly it steers, "
                   ">= 0 (default 1)")
    p.add_argument("--label", default=None, help="class name or index; default: a grid of every class")
    p.add_argument("--n", type=int_at_least(1), default=None, help="images per class in the grid (default 4), or images of "
                   "--label (default 16)")
    p.add_argument("--sampler", default=None, choices=tuple(SAMPLERS), metavar="SAMPLER", help="ddpm, ddim, euler, euler_a, dpmpp_2m, flow_euler (default: ddim "
                   "for pixel models, euler for SD1, flow_euler for SD3)")
    p.add_argument("--steps", type=int_at_least(1), default=None, help="sampling steps (default: 20 ddim, 15 dpmpp_2m, "
                   "30 euler/euler_a, 1000 ddpm; SD1 30, SD3 28)")
    p.add_argument("--guidance", type=float_in(0.0), default=None,
                   help="classifier-free guidance scale (1: off; default: the model's own, e.g. 1.5 for the "
                        "bundled model)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="the same seed gives the same images")
    p.add_argument("--out", default="fastdiff-samples.png", type=output_file, help="output PNG path")
    p.add_argument("--show-process", action="store_true", help="also write the noising/denoising strip "
                   "(x_t at a few t) next to --out")
    p.add_argument("--interpolate", action="store_true", help="also write a slerp between two noises next to "
                   "--out")
    p.add_argument("--lora", action="append", default=[], type=lora_spec, metavar="FILE[:SCALE]",
                   help="apply a LoRA file at SCALE (default 1.0) to a Stable Diffusion --model; repeatable")
    p.add_argument("--quantize", type=quantize_mode, default=None, metavar="MODE",
                   help=f"run the denoiser's convolutions and linears in {', '.join(QUANTIZE_MODES)} (W8A8 on the "
                        "CPU; norms, attention and the sampler stay in float)")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_generate)


def _model_path(text: str) -> str:
    """argparse type of ``--model``: a bundled model's name or a path that exists."""
    from fastdiff.pipelines.pixel import BUNDLED_MODELS

    return text if text in BUNDLED_MODELS else existing_path()(text)


def _suffixed(out: Path, suffix: str) -> Path:
    return out.with_name(f"{out.stem}-{suffix}{out.suffix or '.png'}")


def run_generate(args: argparse.Namespace) -> int:
    from fastdiff.pipelines.generate import class_grid, generate, save_png
    from fastdiff.pipelines.pixel import load_pixel_pipeline
    from fastdiff.io.images import image_grid

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.lora and args.prompt is None:
        print("fastdiff generate: error: argument --lora: needs a Stable Diffusion --model and --prompt", file=sys.stderr)
        return 2
    if args.mask is not None and args.init_image is None:
        print("fastdiff generate: error: argument --mask: needs --init-image (the picture to repaint)", file=sys.stderr)
        return 2
    for opt, given, need, what in (("--control-image", args.control_image, args.controlnet, "--controlnet (the "
                                    "ControlNet that reads it)"),
                                   ("--controlnet", args.controlnet, args.control_image, "--control-image (what it "
                                    "follows)"),
                                   ("--controlnet", args.controlnet, args.prompt, "--prompt and a Stable Diffusion "
                                    "1.x --model")):
        if given is not None and need is None:
            print(f"fastdiff generate: error: argument {opt}: needs {what}", file=sys.stderr)
            return 2
    if args.sketch is not None and (args.prompt is not None or args.init_image is not None):
        print("fastdiff generate: error: argument --sketch: goes with a sketch-conditioned --model, not with "
              "--prompt / --init-image", file=sys.stderr)
        return 2
    if args.model == "fashion-tiny-sd" and args.prompt is None:
        print("fastdiff generate: error: argument --prompt: fashion-tiny-sd is a text-to-image model (--prompt "
              "\"a photo of a sneaker\")", file=sys.stderr)
        return 2
    if args.model == "fashion-sketch" and args.sketch is None:
        print("fastdiff generate: error: argument --sketch: the fashion-sketch model needs --sketch IMG (an edge "
              "map, e.g. from fastdiff.sketch)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if args.prompt is not None or args.init_image is not None or args.mask is not None:
        return _run_prompt(args, out, t0)
    try:
        pipe = load_pixel_pipeline(args.model, device=args.device)
        if args.quantize is not None:
            pipe.quantize(args.quantize)
        args.sampler = args.sampler or pipe.defaults.sampler
        steps = pipe.resolve_steps(args.sampler, args.steps)
        guidance = pipe.resolve_guidance("model" if args.guidance is None else args.guidance)
        guidance = None if guidance == 1.0 else guidance
        info = {"model": pipe.source, "sampler": args.sampler, "steps": steps, "guidance": guidance or 1.0,
                "seed": args.seed}
        if args.quantize is not None:
            info["quantize"] = args.quantize
        if args.sketch is not None or pipe.condition is not None:
            n = args.n or 16
            ims = generate(model=pipe, sketch=args.sketch, label=args.label, n=n, seed=args.seed,
                           sampler=args.sampler, steps=steps, guidance=guidance, progress=not args.quiet)
            img = image_grid(ims, min(n, 8), row_labels=None)
            info.update(sketch=args.sketch, labels=args.label)
        elif args.label is None and pipe.class_names:
            img = class_grid(pipe, per_class=args.n or 4, seed=args.seed, sampler=args.sampler, steps=steps,
                             guidance=guidance, progress=not args.quiet)
            info["labels"] = "all classes"
        else:
            n = args.n or 16
            ims = generate(model=pipe, label=args.label, n=n, seed=args.seed, sampler=args.sampler, steps=steps,
                           guidance=guidance, progress=not args.quiet)
            img = image_grid(ims, min(n, 8), row_labels=None)
            info["labels"] = args.label
        save_png(img, out, info)
        print(f"wrote {out} ({time.perf_counter() - t0:.1f} s, {args.sampler}, {steps} steps, seed {args.seed})")
        if args.show_process:
            path = _suffixed(out, "process")
            save_png(_process_strip(pipe, args, steps, guidance), path, info)
            print(f"wrote {path}")
        if args.interpolate:
            path = _suffixed(out, "interpolate")
            save_png(_interpolation(pipe, args, steps, guidance), path, info)
            print(f"wrote {path}")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _run_prompt(args: argparse.Namespace, out: Path, t0: float) -> int:
    """``--prompt``: text-to-image (img2img with --init-image, inpainting with --mask) with Stable Diffusion."""
    from fastdiff.pipelines.generate import generate, save_png, sd_defaults
    from fastdiff.pipelines.load import load_pipeline
    from fastdiff.io.images import image_grid

    try:
        if args.model is None:
            raise ValueError("--prompt needs a text-to-image --model: fashion-tiny-sd (bundled) or a Stable Diffusion "
                             "checkpoint (a diffusers folder or an original .safetensors / .ckpt file); the default "
                             "model is class-conditional (--label)")
        pipe = load_pipeline(args.model, device=args.device)
        for path, scale in args.lora:
            pipe.load_lora(path, scale=scale)
        if args.quantize is not None:
            pipe.quantize(args.quantize)
        sampler, steps, default_guidance = sd_defaults(pipe, args.sampler, args.steps)
        guidance = default_guidance if args.guidance is None else args.guidance
        kw = dict(n=args.n or 1, seed=args.seed, sampler=sampler, steps=steps, guidance=guidance,
                  progress=not args.quiet, negative_prompt=args.negative_prompt, height=args.height,
                  width=args.width, init_image=args.init_image, strength=args.strength, mask=args.mask)
        if args.controlnet is not None:
            ims = _generate_controlled(pipe, args, **kw)
        else:
            ims = generate(args.prompt, model=pipe, **kw)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = {"model": args.model, "prompt": args.prompt, "negative_prompt": args.negative_prompt or "",
            "sampler": sampler, "steps": steps, "guidance": guidance, "seed": args.seed}
    if args.quantize is not None:
        info["quantize"] = args.quantize
    if args.lora:
        info["lora"] = ", ".join(f"{p}:{s:g}" for p, s in args.lora)
    if args.init_image is not None:
        info.update(init_image=args.init_image,
                    strength=pipe.defaults.strength if args.strength is None else args.strength)
    if args.mask is not None:
        info["mask"] = args.mask
    if args.controlnet is not None:
        info.update(controlnet=args.controlnet, control_image=args.control_image, control_scale=args.control_scale)
    img = ims[0] if len(ims) == 1 else image_grid(ims, min(len(ims), 4), row_labels=None)
    save_png(img, out, info)
    print(f"wrote {out} ({time.perf_counter() - t0:.1f} s, {sampler}, {steps} steps, seed {args.seed})")
    return 0


def _generate_controlled(pipe, args, *, n, seed, sampler, steps, guidance, progress, negative_prompt, height, width,
                         init_image, strength, mask):
    """``--controlnet``: the SD1 pipeline's txt2img / img2img / inpaint with the ControlNet and its image."""
    from fastdiff._argtypes import InvalidArgument
    from fastdiff.io.controlnet_checkpoint import load_controlnet
    from fastdiff.io.images import to_pil
    from fastdiff.pipelines.generate import _open_image, progress_callback
    from fastdiff.pipelines.sd1 import StableDiffusion1

    if not isinstance(pipe, StableDiffusion1):
        raise InvalidArgument("--controlnet", f"ControlNets are for Stable Diffusion 1.x; {args.model} is a "
                                              f"{type(pipe).__name__} model")
    net = load_controlnet(args.controlnet, dtype=pipe.dtype, device=pipe.device)
    control = _open_image(args.control_image, "--control-image", "RGB")
    image = _open_image(init_image, "--init-image", "RGB")
    m = _open_image(mask, "--mask", "L")
    d = pipe.defaults
    cb, bar = progress_callback(steps, enabled=progress)
    kw = dict(negative_prompt=negative_prompt, steps=steps, guidance=guidance, sampler=sampler, seed=seed,
              num_images_per_prompt=n, callback=cb, control=control, controlnet=net,
              control_scale=args.control_scale)
    try:
        if m is not None:
            x = pipe.inpaint(args.prompt, image, m, **kw)
        elif image is not None:
            x = pipe.img2img(args.prompt, image, strength=d.strength if strength is None else strength, **kw)
        else:
            x = pipe.txt2img(args.prompt, height=height or d.height, width=width or d.width, **kw)
    finally:
        bar.close()
    return to_pil(x * 2 - 1)


def _process_strip(pipe, args, steps, guidance, columns: int = 8):
    """Two labelled rows: the forward (noising) process q(x_t | x_0) of a sample, and the reverse (denoising)
    trajectory the sampler took to make it, at ``columns`` evenly spaced points."""
    from fastdiff.io.images import image_grid, to_pil

    label = [pipe.label_index(args.label) if args.label is not None else 0] if pipe.class_names else None
    frames: list[torch.Tensor] = []
    keep = {round(i * (steps - 1) / (columns - 2)) for i in range(columns - 1)}

    def cb(i, t, x):
        if i in keep:
            frames.append(x.clone())

    g = torch.Generator().manual_seed(args.seed)
    x_T = torch.randn((1, pipe.unet.config.in_channels, pipe.unet.config.sample_size,
                       pipe.unet.config.sample_size), generator=g)
    x0 = pipe.sample(label, n=1, seed=args.seed, sampler=args.sampler, steps=steps, guidance=guidance,
                     noise=x_T, callback=cb) * 2 - 1  # [0, 1] -> the model's [-1, 1]
    denoise = [x_T] + frames[: columns - 1]
    T = pipe.schedule.num_train_timesteps
    ts = [round(i * (T - 1) / (columns - 1)) for i in range(columns)]
    eps = torch.randn(x0.shape, generator=g)
    noise = [x0] + [pipe.add_noise(x0, t, eps) for t in ts[1:]]
    ims = to_pil(torch.cat(noise + denoise).clamp(-1, 1))
    return image_grid(ims, columns, row_labels=["noising", "denoising"], scale=3)


def _interpolation(pipe, args, steps, guidance, columns: int = 9):
    """Samples from slerp(noise_a, noise_b, w) for w in [0, 1]: a smooth walk between two images."""
    from fastdiff.pipelines.pixel import slerp
    from fastdiff.io.images import image_grid, to_pil

    cfg = pipe.unet.config
    g = torch.Generator().manual_seed(args.seed)
    shape = (1, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    noise = torch.cat([slerp(a, b, i / (columns - 1)) for i in range(columns)])
    labels = None
    if pipe.class_names:
        labels = [pipe.label_index(args.label) if args.label is not None else 0] * columns
    x = pipe.sample(labels, n=columns, seed=args.seed, sampler=args.sampler, steps=steps, guidance=guidance,
                    noise=noise)
    return image_grid(to_pil(x * 2 - 1), columns, scale=3)
