"""``fastdiff train``: train a diffusion model (pixel or latent, labels or captions) or a KL autoencoder, or
resume a run folder.

    fastdiff train --run-dir runs/fashion32 --dataset fashion-mnist --max-steps 20000
    fastdiff train --kind autoencoder --model fashion_f4 --run-dir runs/ae --lr 1e-3
    fastdiff train --autoencoder runs/ae --conditioning text --model fashion_tiny_sd --run-dir runs/tiny-sd
    fastdiff train --kind lora --base sd15-folder --data my-images --rank 16 --alpha 16 --run-dir runs/lora
    fastdiff train --kind controlnet --base sd15-folder --data my-images --run-dir runs/cn --cache
    fastdiff train --run-dir runs/fashion32 --resume [--max-steps 30000]
    fastdiff train --plan --model cifar10_ddpm --precision bf16 [--gpu-memory 16] [--optimizer adamw8bit]

``--plan`` prints the GPU memory the configuration needs (weights, gradients, optimizer state, EMA, the frozen
autoencoder of latent runs, measured activations per sample, with and without gradient checkpointing) and the
largest batch that fits, for every model kind (see :mod:`fastdiff.train.plan`; ``--kind lora`` in the SD1.5
configuration at ``--image-size``: :mod:`fastdiff.train.adapter_plan`), then exits without running a step or
writing anything.

Data-parallel: ``torchrun --nproc-per-node N -m fastdiff train ...`` (``--batch-size`` is the global micro-batch,
split evenly over the N processes; see :mod:`fastdiff.train.distributed`). LoRA and ControlNet runs train in one
process.

On ``--resume`` the run's saved configuration is used; only scheduling options (max steps, logging, sampling,
checkpoint interval, threads, device) may be changed. Standalone: ``python -m fastdiff.train.cli ...``.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

import torch

from fastdiff._argtypes import OneLineParser, existing_path, float_in, int_at_least

__all__ = ["add_train_parser", "run_train", "main"]

_HELP = {
    "run_dir": "run folder (checkpoints, sample grids, loss curve, train.log)",
    "kind": "diffusion | autoencoder (a KL autoencoder for latent diffusion) | lora | controlnet (fine-tune an SD1 "
            "checkpoint, --base, on captioned images, --data)",
    "model": "preset of the kind: UNet2D (class conditioning: fashion32, cifar10_ddpm, tiny), SD-layout UNet "
             "(text conditioning: fashion_tiny_sd, tiny, sd15), autoencoder (fashion_f4, small_f4, tiny, sd15)",
    "model_overrides": "JSON object of the model config's fields overriding the preset, e.g. "
                       "'{\"block_out_channels\": [32, 64, 128]}'",
    "conditioning": "class (labels, UNet2D) | text (captions made from the labels; SD-layout UNet + CLIP text "
                    "encoder trained with it) | sketch (edge maps of the images as extra input channels) | "
                    "sketch+class | segmentation (generate the mask of a shapes scene from its image; "
                    "--dataset shapes[:N[:SEED]])",
    "text_encoder": "CLIP text encoder preset for --conditioning text (small, tiny, sd15)",
    "autoencoder": "latent diffusion: an autoencoder run folder (or an AutoencoderKL folder); the dataset is "
                   "encoded once and cached in the run folder",
    "recon_loss": "autoencoder reconstruction loss: l1 | l2",
    "kl_weight": "autoencoder KL weight (LDM's scale: 1e-6)",
    "dataset": "fashion-mnist | fashion-mnist:DIR | mnist:DIR | mnist5k | digits | folder:DIR | npz:FILE | "
               "shapes[:N[:SEED]] (synthetic segmentation scenes, --conditioning segmentation)",
    "image_size": "model resolution (28x28 sources are padded to 32)",
    "schedule": "noise schedule: linear | scaled_linear | cosine | flow (rectified flow)",
    "prediction": "network target: eps | v | x0 | flow (with --schedule flow)",
    "num_train_timesteps": "T",
    "batch_size": "images per micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "lr": "peak learning rate (AdamW)",
    "warmup_steps": "linear learning-rate warm-up steps",
    "weight_decay": "AdamW weight decay",
    "betas": "AdamW betas, two floats",
    "optimizer": "adamw | adamw8bit (AdamW with block-wise 8-bit moments: ~2 bytes of state a parameter, not 8)",
    "grad_clip": "max gradient norm (0: off)",
    "ema_decay": "EMA decay of the weights used for sampling",
    "class_dropout": "probability of replacing the label by the null class / the caption by \"\" / the condition "
                     "image by zeros (for guidance)",
    "hflip": "random horizontal flips",
    "grad_checkpointing": "recompute ResBlocks and attention in the backward pass (less memory, ~1 more forward)",
    "precision": "bf16 (autocast) | fp32 | fp16 (CUDA, GradScaler)",
    "device": "cpu | cuda",
    "threads": "torch CPU threads",
    "seed": "seed of the run (init, data order, noise)",
    "max_steps": "train until this optimizer step",
    "log_every": "steps between train.log lines / loss-curve points",
    "sample_every": "steps between sample-grid PNGs (0: never)",
    "sample_steps": "DDIM steps for the grid",
    "sample_guidance": "guidance scale for the grid",
    "samples_per_class": "grid columns",
    "ckpt_every_minutes": "checkpoint interval in minutes",
    "ckpt_every_steps": "checkpoint interval in steps (0: by time only)",
    "base": "lora / controlnet: the SD1 checkpoint to fine-tune (diffusers folder or single file)",
    "data": "lora / controlnet: folder of images with captions (image.png + image.txt, or metadata.jsonl)",
    "rank": "lora: rank of every LoRA pair",
    "alpha": "lora: LoRA alpha (scale alpha / rank)",
    "lora_text_encoder": "lora: train a LoRA on the text encoder's attention too",
    "cache": "lora / controlnet: encode the latents (and the captions of a frozen text encoder) once",
    "control": "controlnet: control maps made from the training images (canny edges)",
}


# What each option accepts, checked when the command line is parsed (before anything is loaded or written).
_CHOICES = {
    "kind": ("diffusion", "autoencoder", "lora", "controlnet"),
    "control": ("canny",),
    "conditioning": ("class", "text", "sketch", "sketch+class", "segmentation"),
    "recon_loss": ("l1", "l2"),
    "schedule": ("linear", "scaled_linear", "cosine", "flow"),
    "prediction": ("eps", "v", "x0", "flow"),
    "optimizer": ("adamw", "adamw8bit"),
    "precision": ("bf16", "fp32", "fp16"),
    "device": ("cpu", "cuda"),
}
_TYPES = {
    "image_size": int_at_least(8), "num_train_timesteps": int_at_least(1), "batch_size": int_at_least(1),
    "grad_accum": int_at_least(1), "lr": float_in(0.0, low_open=True), "warmup_steps": int_at_least(0),
    "weight_decay": float_in(0.0), "betas": float_in(0.0, 1.0, high_open=True), "grad_clip": float_in(0.0),
    "ema_decay": float_in(0.0, 1.0, high_open=True), "class_dropout": float_in(0.0, 1.0),
    "kl_weight": float_in(0.0),
    "threads": int_at_least(1), "seed": int_at_least(0), "max_steps": int_at_least(1),
    "log_every": int_at_least(1), "sample_every": int_at_least(0), "sample_steps": int_at_least(1),
    "sample_guidance": float_in(0.0), "samples_per_class": int_at_least(1),
    "ckpt_every_minutes": float_in(0.0, low_open=True), "ckpt_every_steps": int_at_least(0),
    "rank": int_at_least(1), "alpha": float_in(0.0, low_open=True),
}


def _json_object(text: str) -> dict:
    try:
        v = json.loads(text)
    except ValueError:
        v = None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object such as '{{\"block_out_channels\": [32, 64]}}', "
                                         f"got {text!r}")
    return v


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``train`` sub-command on an ``argparse`` subparsers object."""
    from fastdiff.train.trainer import TrainConfig, model_presets

    # every preset name of every kind; whether it fits --kind / --conditioning is checked with the configuration
    presets = tuple(dict.fromkeys([*model_presets("diffusion", "class"), *model_presets("diffusion", "text"),
                                   *model_presets("autoencoder")]))
    p = subparsers.add_parser("train", help="train a diffusion model or an autoencoder (or --resume a run)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.add_argument("--plan", action="store_true",
                   help="print the GPU memory this configuration needs and the largest batch that fits; no training")
    p.add_argument("--gpu-memory", type=float_in(0.0, low_open=True), default=16.0, metavar="GIB",
                   help="memory of the target GPU in GiB for --plan (default 16)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kw = dict(default=None, help=_HELP.get(f.name, ""))
        if f.name in ("hflip", "grad_checkpointing", "lora_text_encoder", "cache"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "betas":
            p.add_argument(flag, type=_TYPES["betas"], nargs=2, **kw)
        elif f.name == "model_overrides":
            p.add_argument(flag, type=_json_object, **kw)
        elif f.name == "model":
            p.add_argument(flag, choices=presets, **kw)
        elif f.name == "text_encoder":
            from fastdiff.models.clip_text import PRESETS as TEXT_PRESETS

            p.add_argument(flag, choices=tuple(TEXT_PRESETS), **kw)
        elif f.name in ("autoencoder", "base", "data"):
            p.add_argument(flag, type=existing_path(), **kw)
        elif f.name in _CHOICES:
            p.add_argument(flag, choices=_CHOICES[f.name], **kw)
        else:
            p.add_argument(flag, type=_TYPES.get(f.name, type(f.default)), **kw)
    p.set_defaults(func=run_train)
    return p


def run_train(args: argparse.Namespace) -> int:
    from fastdiff.io.datasets import DatasetError
    from fastdiff.io.checkpoint import CheckpointError

    try:
        return _run_train(args)
    except (ValueError, DatasetError, CheckpointError, FileNotFoundError) as e:
        # Bad input (configuration, dataset, checkpoint): one line naming the problem, no traceback.
        print(f"fastdiff train: error: {e}", file=sys.stderr)
        return 2


def _run_train(args: argparse.Namespace) -> int:
    from fastdiff.io.run_checkpoint import load_checkpoint
    from fastdiff.train.trainer import TrainConfig, Trainer

    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    if "betas" in given:
        given["betas"] = tuple(given["betas"])
    if given.get("grad_clip") == 0:
        given["grad_clip"] = None
    if args.resume:
        if "run_dir" not in given:
            print("fastdiff train: --resume needs --run-dir", file=sys.stderr)
            return 2
        _, _, _, state = load_checkpoint(given["run_dir"])
        cfg = TrainConfig.from_dict({**state["train"], **given})
    else:
        cfg = TrainConfig(**given)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    if args.plan and cfg.kind == "lora":
        from fastdiff.train.adapter_plan import lora_plan

        print(lora_plan(image_size=cfg.image_size, rank=cfg.rank, alpha=cfg.alpha, precision=cfg.precision,
                        optimizer=cfg.optimizer, text_lora=cfg.lora_text_encoder, cache=cfg.cache,
                        batch_size=cfg.batch_size, gpu_memory_gb=args.gpu_memory).format())
        return 0
    if args.plan and cfg.kind == "controlnet":
        print("fastdiff train: --plan covers the diffusion, autoencoder and lora kinds, not --kind controlnet",
              file=sys.stderr)
        return 2
    if args.plan:
        from fastdiff.train.plan import plan

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        print(plan(cfg, gpu_memory_gb=args.gpu_memory).format())
        return 0
    from fastdiff.train.distributed import teardown

    try:
        trainer = Trainer(cfg, resume=args.resume, progress=not args.no_progress)
        if trainer.dist.is_main:
            procs = (f"  {trainer.dist.world_size} processes ({trainer.dist.backend}), "
                     f"{cfg.batch_size // trainer.dist.world_size} images each a micro-batch"
                     if trainer.dist.enabled else "")
            print(f"fastdiff train: {Path(cfg.run_dir).resolve()}  step {trainer.step} -> {cfg.max_steps}  "
                  f"{cfg.kind} {cfg.base or cfg.model} ({sum(p.numel() for p in trainer.model.parameters()) / 1e6:.2f}M "
                  f"trained params)  data {cfg.data or cfg.dataset} ({len(trainer.data)} images)  "
                  f"precision {cfg.precision}{procs}", flush=True)
        trainer.run()
    finally:
        teardown()  # under torchrun: leave the process group
    return 0


def main(argv=None) -> int:
    parser = OneLineParser(prog="fastdiff")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
