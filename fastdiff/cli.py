"""The ``fastdiff`` command: ``info``, ``generate``, ``train``, ``eval``.

Each subcommand lives beside the code it drives and registers itself here through an ``add_*_parser``
function, so this file stays a table of contents.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from fastdiff._argtypes import OneLineParser

__all__ = ["main"]

# subcommand -> (module, the function adding its parser). Modules are imported only when listed, so
# `fastdiff info` does not pay for importing the training code.
_SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("fastdiff.pipelines.cli", "add_generate_parser"),
    "train": ("fastdiff.train.cli", "add_train_parser"),
    "eval": ("fastdiff.eval.cli", "add_eval_parser"),
}


def _info(args: argparse.Namespace) -> int:
    from fastdiff.info import info_text

    print(info_text())
    if args.kernels or args.roofline:
        from fastdiff.kernels.report import main as report

        print()
        return report(["--no-compile"] if not args.kernels else (["--quick"] if args.quick else []))
    return 0


def sketch_model(path):
    """``fastdiff eval``'s hook for sketch-to-image models: ``(draw, sketch thresholds)`` when ``path`` is a
    sketch-conditioned run or pipeline folder (None otherwise); ``draw(sketches, seed=, sampler=, steps=,
    guidance=)`` is :func:`fastdiff.generate` on the loaded pipeline, one image per sketch."""
    from pathlib import Path

    from fastdiff.pipelines.generate import generate
    from fastdiff.pipelines.pixel import load_pixel_pipeline, read_condition

    cond = read_condition(path) if Path(path).is_dir() else None
    if not cond or cond.get("kind") != "sketch":
        return None
    pipe = load_pixel_pipeline(path)

    def draw(sketches, *, seed, sampler=None, steps=None, guidance="model"):
        return generate(model=pipe, sketch=sketches, n=len(sketches), seed=seed, sampler=sampler, steps=steps,
                        guidance=guidance, progress=False)

    return draw, dict(cond["sketch"])


def text_model(path):
    """``fastdiff eval``'s hook for text-to-image models: ``(draw, prompts)`` when ``path`` is a Stable Diffusion 1
    layout folder (an exported or bundled model such as ``fashion-tiny-sd``) or a latent text-conditioned training
    run (None otherwise). ``prompts[c]`` is the caption of Fashion-MNIST class ``c`` the model was trained with
    (``"a photo of a sneaker"``); ``draw(prompt, n=, seed=, sampler=, steps=, guidance=)`` returns (n, C, H, W)
    images in [-1, 1] from the pipeline's ``txt2img`` (None settings: the folder's defaults)."""
    import json
    import tempfile
    from pathlib import Path

    from fastdiff.pipelines.load import load_pipeline
    from fastdiff.train.captions import caption
    from fastdiff.io.datasets import FASHION_MNIST_CLASSES

    p = Path(path)
    if not p.is_dir():
        return None
    if (p / "model_index.json").is_file():
        if json.loads((p / "model_index.json").read_text()).get("_class_name") != "StableDiffusionPipeline":
            return None
        pipe = load_pipeline(p)
    elif (p / "latest.json").is_file():
        arch = json.loads((p / "config.json").read_text()).get("arch") or {}
        if "unet_sd" not in arch:
            return None
        from fastdiff.train.export import export_sd1

        with tempfile.TemporaryDirectory() as tmp:
            pipe = load_pipeline(export_sd1(p, Path(tmp) / "pipeline", dtype=None))
    else:
        return None

    def draw(prompt, *, n, seed, sampler=None, steps=None, guidance=None):
        return pipe.txt2img(prompt, num_images_per_prompt=n, seed=seed, sampler=sampler, steps=steps,
                            guidance=guidance) * 2 - 1

    return draw, [caption(name, 0) for name in FASHION_MNIST_CLASSES]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fastdiff", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="versions, CPU features and which backend runs each op")
    p.add_argument("--kernels", action="store_true",
                   help="also compile the Triton kernels for sm_89 (RTX 4080) and report registers, spills, "
                        "shared memory and occupancy, with the labelled roofline estimates (needs triton)")
    p.add_argument("--quick", action="store_true", help="with --kernels: the bf16 configurations only")
    p.add_argument("--roofline", action="store_true", help="only the RTX 4080 roofline estimates (no compile)")
    p.set_defaults(func=_info)
    for name, (module, adder) in _SUBCOMMANDS.items():
        p = getattr(importlib.import_module(module), adder)(sub)
        if name == "eval":
            p.set_defaults(sketch_model=sketch_model, text_model=text_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
