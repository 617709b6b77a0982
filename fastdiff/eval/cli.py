"""``fastdiff eval``: accuracy, classifier-feature FID and the real-vs-real floor (and Inception FID).

    fastdiff eval --images samples.npz                         # an .npz (images, labels) or a class folder
    fastdiff eval --checkpoint runs/fashion --sampler ddim:50 --sampler dpmpp_2m:20 --per-class 100
    fastdiff eval --images samples.npz --inception pt_inception-2015-12-05-6726825d.pth
    fastdiff eval --autoencoder runs/vq/model --per-class 100    # a diffusers VQModel / AutoencoderKL folder

Each evaluated set is one row of the printed table; ``--json`` writes the same numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastdiff._argtypes import existing_path, float_in, int_at_least, output_file

_SAMPLERS = ("ddpm", "ddim", "euler", "euler_a", "dpmpp_2m")  # pixel-model samplers of fastdiff.samplers

__all__ = ["add_eval_parser", "run_eval", "parse_run"]


def parse_run(spec: str, default_steps: int) -> tuple[str, int]:
    """``"ddim:50"`` -> ("ddim", 50); ``"ddim"`` -> ("ddim", default_steps)."""
    name, _, steps = spec.partition(":")
    if name not in _SAMPLERS:
        raise argparse.ArgumentTypeError(f"bad --sampler {spec!r}: NAME[:STEPS] with NAME one of {', '.join(_SAMPLERS)}")
    try:
        n = int(steps) if steps else default_steps
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad step count in --sampler {spec!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"steps must be >= 1 in --sampler {spec!r}")
    return name, n


def _sampler_spec(spec: str) -> str:
    parse_run(spec, 1)  # checked now; the step default (--steps) is applied later
    return spec


def _clip(text: str) -> str:
    if text.lower() != "none":
        float_in(0.0, low_open=True)(text)
    return text


def _folder_to_make(text: str) -> Path:
    p = Path(text)
    if p.exists() and not p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    if not p.parent.exists():
        raise argparse.ArgumentTypeError(f"the folder {p.parent} does not exist")
    return p


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="sample quality: conditional accuracy, classifier FID, real-vs-real floor, Inception FID",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=lambda t: Path(existing_path()(t)), help=".npz (images, optional labels) or folder (class subfolders) to evaluate")
    src.add_argument("--checkpoint", type=lambda t: Path(existing_path()(t)), help="a fastdiff training run / checkpoint, or a text-to-image pipeline folder (an exported latent text run, fastdiff/assets/fashion-tiny-sd), to sample from")
    src.add_argument("--autoencoder", type=lambda t: Path(existing_path("folder")(t)),
                     help="a VQModel / AutoencoderKL folder: reconstruct --per-class test images of each class and "
                          "report PSNR, SSIM, reconstruction FID, class accuracy of the reconstructions, codebook usage")
    p.add_argument("--sampler", action="append", metavar="NAME[:STEPS]", type=_sampler_spec,
                   help="sampler to evaluate (repeatable): ddpm, ddim, euler, euler_a, dpmpp_2m; default ddim:50")
    p.add_argument("--steps", type=int_at_least(1), default=50, help="steps for a --sampler given without :STEPS")
    p.add_argument("--per-class", type=int_at_least(1), default=100, help="samples per class (default 100, i.e. N = 1000)")
    p.add_argument("--guidance", type=float_in(0.0), default=None, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--spacing", default="trailing", choices=["leading", "trailing", "linspace"],
                   help="timestep spacing of the samplers (default trailing: starts at t = T-1 for any step count)")
    p.add_argument("--clip", default="1.0", type=_clip,
                   help="DDPM/DDIM x0 clamp range, or 'none' (default 1.0, diffusers' clip_sample; with strong "
                        "guidance the clamp distorts v-prediction models: the bundled model samples unclipped)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="network precision (sampler state is fp32)")
    p.add_argument("--raw-weights", action="store_true", help="sample the raw weights instead of the EMA weights")
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--batch", type=int_at_least(1), default=250, help="sampling batch size")
    p.add_argument("--classifier", type=lambda t: Path(existing_path("file")(t)), default=None, help="classifier weights (default: the shipped one)")
    p.add_argument("--data", type=lambda t: Path(existing_path("folder")(t)), default=None, help="Fashion-MNIST IDX folder (default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--inception", type=lambda t: Path(existing_path("file")(t)), default=None, help="path of pt_inception-2015-12-05-6726825d.pth for Inception FID")
    p.add_argument("--inception-real", type=int_at_least(1), default=None, help="real test images for Inception FID (default all 10,000)")
    p.add_argument("--save-samples", type=_folder_to_make, default=None, help="folder for one .npz of samples per sampler run")
    p.add_argument("--json", type=lambda t: Path(output_file(t)), default=None, help="also write the results as JSON")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads")
    p.set_defaults(func=run_eval)
    return p


def _sampling_runs(args, reference, inception):
    from fastdiff.eval.evaluate import evaluate_images
    from fastdiff.eval.generate import sample_per_class
    from fastdiff.eval.data import save_image_set
    from fastdiff.samplers import SAMPLERS

    from fastdiff.eval._checkpoint import load_for_sampling

    model = load_for_sampling(args.checkpoint, use_ema=not args.raw_weights, precision=args.precision)
    print(f"model: {model.description}", file=sys.stderr)
    runs = [parse_run(s, args.steps) for s in (args.sampler or [f"ddim:{args.steps}"])]
    for name, _ in runs:
        if name not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    guidance = args.guidance if args.guidance is not None else model.default_guidance
    clip = None if str(args.clip).lower() == "none" else float(args.clip)
    for name, steps in runs:
        print(f"sampling {args.per_class} x {model.num_classes} classes with {name}, {steps} steps"
              + (f", guidance {guidance}" if guidance not in (None, 1.0) else "")
              + (", no x0 clamp" if clip is None else "") + " ...", file=sys.stderr, flush=True)
        images, labels, seconds = sample_per_class(
            model.denoiser, model.schedule, sampler=name, steps=steps, per_class=args.per_class,
            num_classes=model.num_classes, null_label=model.null_label, guidance=guidance, seed=args.seed,
            batch=args.batch, spacing=args.spacing, clip=clip)
        if args.save_samples is not None:
            args.save_samples.mkdir(parents=True, exist_ok=True)
            save_image_set(args.save_samples / f"{name}_{steps}.npz", images, labels)
        yield evaluate_images(images, labels, name=f"{name} {steps}", reference=reference, inception=inception,
                              inception_real=args.inception_real, seconds=seconds)


def _sketch_eval(args, reference, model):
    """A sketch-to-image model, ``(draw, params)`` from the ``fastdiff`` command's ``sketch_model`` hook: one image
    per sketch of --per-class test images of each class (:mod:`fastdiff.eval.sketch_eval`); the outline scores
    are printed and go into the JSON."""
    from fastdiff.eval.sketch_eval import evaluate_sketch_model

    if args.inception is not None or args.raw_weights or args.save_samples is not None:
        raise ValueError("--inception, --raw-weights and --save-samples do not apply to a sketch-conditioned model")
    if args.sampler and len(args.sampler) > 1:
        raise ValueError("--sampler: a sketch-conditioned model is evaluated with one sampler")
    name, steps = parse_run(args.sampler[0], args.steps) if args.sampler else (None, args.steps)
    guidance = "model" if args.guidance is None else args.guidance
    draw_model, params = model
    print(f"sampling one image per sketch of {args.per_class} test images x 10 classes ...", file=sys.stderr,
          flush=True)
    report, outline, _, _ = evaluate_sketch_model(
        lambda sketches, seed: draw_model(sketches, seed=seed, sampler=name, steps=steps, guidance=guidance),
        params, per_class=args.per_class, seed=args.seed, reference=reference, root=args.data, batch=args.batch)
    print(f"  {outline.format()}", file=sys.stderr, flush=True)
    report.outline = outline
    return report


def _text_eval(args, reference, model):
    """A text-to-image model, ``(draw, prompts)`` from the ``fastdiff`` command's ``text_model`` hook: --per-class
    images of each class from its caption (``prompts[c]``), scored like class-conditional samples."""
    import time

    import torch

    from fastdiff.eval.data import save_image_set
    from fastdiff.eval.evaluate import evaluate_images

    if args.raw_weights:
        raise ValueError("--raw-weights does not apply to a text-to-image model (its folder holds one set of weights)")
    if args.sampler and len(args.sampler) > 1:
        raise ValueError("--sampler: a text-to-image model is evaluated with one sampler")
    name, steps = parse_run(args.sampler[0], args.steps) if args.sampler else (None, None)
    draw, prompts = model
    print(f"sampling {args.per_class} images x {len(prompts)} captions ('{prompts[0]}', ...)", file=sys.stderr,
          flush=True)
    images, labels = [], []
    t0 = time.perf_counter()
    for c, prompt in enumerate(prompts):
        for i in range(0, args.per_class, args.batch):
            n = min(args.batch, args.per_class - i)
            x = draw(prompt, n=n, seed=args.seed + 1_000_003 * c + i, sampler=name, steps=steps,
                     guidance=args.guidance)
            images.append(x.float())
            labels.append(torch.full((n,), c, dtype=torch.long))
    seconds = time.perf_counter() - t0
    images, labels = torch.cat(images), torch.cat(labels)
    if args.save_samples is not None:
        args.save_samples.mkdir(parents=True, exist_ok=True)
        save_image_set(args.save_samples / "text.npz", images, labels)
    label = f"captions {name or 'default'}" + (f" {steps}" if steps else "")
    return evaluate_images(images, labels, name=label, reference=reference, seconds=seconds)


def _text_model(args):
    """``(draw, prompts)`` when --checkpoint is a text-to-image model (the ``text_model`` hook the ``fastdiff``
    command sets), else None."""
    hook = getattr(args, "text_model", None)
    return None if hook is None or args.checkpoint is None else hook(args.checkpoint)


def _sketch_model(args):
    """``(draw, params)`` when --checkpoint is a sketch-to-image model (the ``sketch_model`` hook the ``fastdiff``
    command sets: drawing goes through the pipelines, a layer this one does not import), else None."""
    hook = getattr(args, "sketch_model", None)
    return None if hook is None else hook(args.checkpoint)


def _checkpoint_errors() -> tuple[type[BaseException], ...]:
    try:
        from fastdiff.io.checkpoint import CheckpointError
    except ImportError:
        return ()
    return (CheckpointError,)


def _autoencoder_eval(args) -> dict:
    """Reconstructions of the first ``--per-class`` test images of each class, measured against the originals."""
    import torch

    from fastdiff.eval.evaluate import RealReference
    from fastdiff.eval.metrics import conditional_accuracy, reconstruction_metrics
    from fastdiff.io.autoencoder_folder import load_autoencoder
    from fastdiff.models.vq import VQModel

    model = load_autoencoder(args.autoencoder)
    if model.config.in_channels != 1:
        raise ValueError(f"--autoencoder: the model takes {model.config.in_channels} channels; the Fashion-MNIST "
                         "evaluation needs a 1-channel autoencoder")
    reference = RealReference.build(args.classifier, args.data)
    labels = reference.test_labels
    pick = torch.cat([(labels == c).nonzero().flatten()[:args.per_class] for c in range(int(labels.max()) + 1)])
    x, y = reference.test_images[pick], labels[pick]
    recs, codes = [], []
    with torch.no_grad():
        for i in range(0, len(x), args.batch):
            if isinstance(model, VQModel):
                out = model(x[i:i + args.batch])
                recs.append(out.sample)
                codes.append(out.quant.indices)
            else:
                recs.append(model.decode(model.encode(x[i:i + args.batch]).mode()))
    rec = torch.cat(recs).float().clamp(-1.0, 1.0)
    vq = isinstance(model, VQModel)
    result = {"name": args.autoencoder.name, **reconstruction_metrics(
        x, rec, feature_fn=reference.classifier.features, indices=torch.cat(codes) if vq else None,
        num_codes=model.config.num_vq_embeddings if vq else None)}
    result["accuracy"] = conditional_accuracy(reference.classifier, rec, y)[0]
    result["accuracy_real"] = conditional_accuracy(reference.classifier, x, y)[0]
    return result


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from fastdiff.eval.data import load_image_set
    from fastdiff.eval.evaluate import RealReference, evaluate_images, format_table

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if getattr(args, "autoencoder", None) is not None:
            if args.sampler or args.inception:
                raise ValueError("--sampler and --inception apply to --checkpoint / --images, not to --autoencoder")
            r = _autoencoder_eval(args)
            print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
            if args.json is not None:
                args.json.write_text(json.dumps(r, indent=2))
            return 0
        inception = None
        if args.inception is not None:
            from fastdiff.eval.inception import load_fid_inception

            inception = load_fid_inception(args.inception)
        reference = RealReference.build(args.classifier, args.data)
        if args.images is not None:
            if args.sampler:
                raise ValueError("--sampler applies to --checkpoint, not to --images")
            images, labels = load_image_set(args.images)
            reports = [evaluate_images(images, labels, name=args.images.name, reference=reference,
                                       inception=inception, inception_real=args.inception_real)]
        elif (sketch := _sketch_model(args)) is not None:
            reports = [_sketch_eval(args, reference, sketch)]
        elif (text := _text_model(args)) is not None:
            reports = [_text_eval(args, reference, text)]
        else:
            reports = []
            for r in _sampling_runs(args, reference, inception):
                reports.append(r)
                # Runs can take long (DDPM 1000 steps): show each as it finishes, keep the JSON current.
                acc = "-" if r.accuracy is None else f"{r.accuracy:.4f}"
                print(f"  {r.name}: accuracy {acc}, FID {r.fid:.3f} (floor {r.fid_floor:.3f}), "
                      f"{r.seconds:.1f} s", file=sys.stderr, flush=True)
                if args.json is not None:
                    args.json.write_text(json.dumps([x.to_dict() for x in reports], indent=2))
    except (FileNotFoundError, ValueError, TypeError, *_checkpoint_errors()) as e:
        print(f"fastdiff eval: error: {e}", file=sys.stderr)
        return 2
    print(format_table(reports))
    if args.json is not None:
        args.json.write_text(json.dumps([r.to_dict() for r in reports], indent=2))
    return 0
