"""One trainer for diffusion models (pixel or latent; class labels or captions) and KL autoencoders.

Model kinds (``TrainConfig.kind``) share every part of a run but the loss of a micro-batch:

- ``diffusion`` (Ho et al. 2020, Algorithm 1, with the target chosen by ``prediction``)::

      x0, y ~ data;  t ~ U{0..T-1};  eps ~ N(0, I);  x_t = alpha_t x0 + sigma_t eps
      y <- null label / empty caption with probability ``class_dropout``   (classifier-free guidance)
      loss = || net(x_t, t, y) - target ||^2,   target = eps | v = alpha_t eps - sigma_t x0 | x0

  or rectified flow (``schedule="flow"``, ``prediction="flow"``; Esser et al. 2024): ``s = sigmoid(n)``,
  ``n ~ N(0, 1)`` (logit-normal, their eq. 19), ``x_s = (1 - s) x0 + s eps``, target ``eps - x0``, timestep
  ``1000 s``.
  ``conditioning="class"`` trains a :class:`~fastdiff.models.unet2d.UNet2D` on labels; ``"text"`` an SD1-layout
  :class:`~fastdiff.models.unet_sd.UNetSD` that cross-attends to a CLIP text encoder trained with it, on captions
  made from the labels (:mod:`fastdiff.train.captions`).
  With ``autoencoder`` (a trained autoencoder run, or a diffusers ``AutoencoderKL`` folder) the model trains in
  latent space (Rombach et al. 2022): the dataset is encoded once (posterior means) and cached in the run folder,
  the scale factor is measured as 1 / std of the cached latents (LDM's rescaling, Sec. 3.1 / G), and the
  autoencoder is copied into the run (``autoencoder/``, its measured ``scaling_factor`` in its config), so the run
  stays valid while the autoencoder's own run goes on. Sample grids decode through it.
- ``autoencoder``: an :class:`~fastdiff.models.vae.AutoencoderKL` (SD's KL-VAE modules) on
  ``recon + kl_weight * KL / (C H W)``, recon = mean |x - D(z)| (``l1``) or its square (``l2``) with
  ``z ~ q(z|x)``; KL = sum over latent elements of KL(q(z|x) || N(0, I)), averaged over the batch. Dividing the
  per-image KL by the pixels of an image gives ``kl_weight`` LDM's meaning (its loss sums both over an image):
  LDM's KL autoencoders use 1e-6.

Reproducibility by construction: the data order of epoch e is a permutation drawn from (seed, e), and the
timesteps, noise and label dropout of step s from a generator seeded with (seed, s); the global torch RNG (for
dropout layers) is re-seeded per step the same way. A run resumed from the checkpoint at step s therefore
replays exactly the steps an uninterrupted run would (tests/test_train.py checks the loss sequence).

Data parallel (``torchrun --nproc-per-node N -m fastdiff train ...``, :mod:`fastdiff.train.distributed`): every
process draws the same global batch and the same random numbers, runs its contiguous 1/N of the rows, and DDP
averages the gradients, so N processes follow the 1-process run up to fp32 summation order; only rank 0 writes,
and a checkpoint (global state only) resumes with any N that divides ``batch_size``.

Mixed precision: the forward pass runs inside ``torch.autocast`` (bf16 on CPU and on Ada GPUs; fp16 with a
GradScaler as an option on CUDA); parameters, gradients, optimizer state and EMA stay fp32.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fastdiff.io.checkpoint import CheckpointError
from fastdiff.io.datasets import ImageDataset, load_dataset
from fastdiff.io.images import image_grid, save_png_atomic, to_pil
from fastdiff.io.run_checkpoint import (
    latest_step,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_json_atomic,
)
from fastdiff.models import clip_text, unet_sd, vae as vae_models
from fastdiff.models.unet2d import PRESETS, UNet2D, UNet2DConfig
from fastdiff.ops import restore_plain_weights
from fastdiff.samplers import Denoiser, make_schedule, sample_ddim, sample_flow_euler
from fastdiff.samplers.schedules import FlowSchedule, NoiseSchedule
from fastdiff.train.adapters import ADAPTER_KINDS, AdapterRun, check_adapter_config
from fastdiff.train.captions import CaptionTable, TextConditionedUNet, caption
from fastdiff.train.distributed import ForwardThrough, setup as setup_distributed, shard_slice
from fastdiff.train.optim import AdamW8bit
from fastdiff.train import conditions as image_conditions
from fastdiff.train.latents import LatentDataset, encode_dataset, load_autoencoder, prepare_latents
from fastdiff.train.plots import loss_curve

__all__ = ["TrainConfig", "Trainer", "train", "sample_grid", "make_adamw", "ema_update_", "model_presets",
           "build_model", "KINDS", "CONDITIONINGS"]


KINDS = ("diffusion", "autoencoder", *ADAPTER_KINDS)
CONDITIONINGS = ("class", "text") + image_conditions.IMAGE_CONDITIONINGS
SCHEDULES = ("linear", "scaled_linear", "cosine", "flow")
PREDICTIONS = ("eps", "v", "x0", "flow")
RECON_LOSSES = ("l1", "l2")


def model_presets(kind: str = "diffusion", conditioning: str = "class") -> dict:
    """The preset table ``TrainConfig.model`` names a preset of, for a model kind and conditioning."""
    if kind == "autoencoder":
        return vae_models.PRESETS
    return unet_sd.PRESETS if conditioning == "text" else PRESETS


@dataclass
class TrainConfig:
    """Everything that defines a run; saved in every checkpoint and checked on resume."""

    run_dir: str = "runs/default"
    kind: str = "diffusion"                # diffusion | autoencoder
    model: str = "fashion32"               # a preset of the kind's table (see model_presets)
    model_overrides: dict = field(default_factory=dict)  # config fields replacing the preset's
    conditioning: str = "class"            # class (UNet2D, labels) | text (SD1-layout UNet + CLIP, captions) |
                                           # sketch | sketch+class | segmentation (fastdiff.train.conditions)
    text_encoder: str = "small"            # CLIP text preset of fastdiff.models.clip_text (conditioning="text")
    autoencoder: str = ""                  # an autoencoder run folder / AutoencoderKL folder: latent diffusion
    dataset: str = "fashion-mnist"         # see fastdiff.io.datasets.load_dataset
    image_size: int = 32
    schedule: str = "cosine"               # linear | scaled_linear | cosine | flow (rectified flow)
    prediction: str = "v"                  # eps | v | x0 | flow (with schedule flow)
    num_train_timesteps: int = 1000
    recon_loss: str = "l1"                 # autoencoder: l1 | l2
    kl_weight: float = 1e-6                # autoencoder: weight of the KL term, LDM's scale
    batch_size: int = 64
    grad_accum: int = 1                    # micro-batches of batch_size per optimizer step
    lr: float = 2e-4
    warmup_steps: int = 500
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    optimizer: str = "adamw"               # adamw | adamw8bit (block-wise 8-bit moments, fastdiff.train.optim)
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    class_dropout: float = 0.1             # probability of the null label / empty caption (guidance)
    hflip: bool = False                    # random horizontal flips (label-preserving for clothes)
    grad_checkpointing: bool = False       # recompute ResBlocks/attention in backward (memory for compute)
    precision: str = "bf16"                # bf16 | fp32 | fp16 (CUDA only, with GradScaler)
    device: str = "cpu"
    threads: int | None = None             # torch.set_num_threads; None leaves torch's default
    seed: int = 0
    max_steps: int = 10000
    log_every: int = 25
    sample_every: int = 1000               # steps between sample grids (0: never)
    sample_steps: int = 20                 # DDIM steps for the grid
    sample_guidance: float = 3.0
    samples_per_class: int = 6
    ckpt_every_minutes: float = 10.0
    ckpt_every_steps: int = 0              # 0: by time only
    # kind lora | controlnet: fine-tuning a pretrained SD1 model (fastdiff.train.adapters)
    base: str = ""                         # the SD1 checkpoint: a diffusers folder or an original single file
    data: str = ""                         # a folder of images with captions (fastdiff.train.image_folder)
    rank: int = 4                          # lora: rank r of every LoRA pair
    alpha: float = 4.0                     # lora: scale alpha / r
    lora_text_encoder: bool = False        # lora: LoRA on the CLIP text encoder's attention too
    cache: bool = False                    # encode latents (and a frozen text encoder's captions) once
    control: str = "canny"                 # controlnet: the control maps made from the training images

    @property
    def presets(self) -> dict:
        return model_presets(self.kind, self.conditioning)

    def unet_config(self, num_classes: int, class_names: tuple[str, ...], channels: int) -> UNet2DConfig:
        if self.model not in PRESETS:
            raise ValueError(f"unknown model preset {self.model!r}; choose one of {', '.join(PRESETS)}")
        base = PRESETS[self.model].to_dict()
        base.update(self.model_overrides)
        base.update(sample_size=self.image_size, in_channels=channels, out_channels=channels,
                    num_classes=num_classes, null_class=True, class_names=list(class_names))
        return UNet2DConfig.from_dict(base)

    def check(self) -> None:
        """Raise ValueError naming the first field with a value no run can use (before any work is done)."""
        def one_of(name, allowed):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")

        one_of("kind", KINDS)
        one_of("conditioning", CONDITIONINGS)
        if self.kind in ADAPTER_KINDS:
            check_adapter_config(self)
        elif self.model not in self.presets:
            what = "an autoencoder" if self.kind == "autoencoder" else f"a {self.conditioning}-conditioned UNet"
            raise ValueError(f"model must be {what} preset, one of {', '.join(self.presets)}; got {self.model!r}")
        one_of("text_encoder", tuple(clip_text.PRESETS))
        one_of("precision", ("bf16", "fp32", "fp16"))
        one_of("optimizer", ("adamw", "adamw8bit"))
        one_of("schedule", SCHEDULES)
        one_of("prediction", PREDICTIONS)
        one_of("recon_loss", RECON_LOSSES)
        if (self.schedule == "flow") != (self.prediction == "flow"):
            raise ValueError(f"prediction flow goes with schedule flow (rectified flow) and only with it; got "
                             f"schedule {self.schedule!r}, prediction {self.prediction!r}")
        for name in ("batch_size", "grad_accum", "image_size", "num_train_timesteps", "max_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ValueError(f"class_dropout must be in [0, 1), got {self.class_dropout}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not self.kl_weight >= 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not isinstance(self.model_overrides, dict):
            raise ValueError(f"model_overrides must be a JSON object of model config fields, got "
                             f"{self.model_overrides!r}")
        if not isinstance(self.autoencoder, str):
            raise ValueError(f"autoencoder must be a folder path (str), got {self.autoencoder!r}")
        if self.autoencoder and self.kind != "diffusion":
            raise ValueError("autoencoder (latent diffusion) needs kind diffusion; an autoencoder run takes images")
        if self.autoencoder and self.conditioning in image_conditions.IMAGE_CONDITIONINGS:
            raise ValueError(f"conditioning {self.conditioning} trains in pixel space: it takes no autoencoder")
        if self.autoencoder and self.hflip:
            raise ValueError("hflip cannot be used with autoencoder: latents are cached unflipped (flip the "
                             "dataset instead)")
        if self.grad_checkpointing and self.kind not in ADAPTER_KINDS and (
                self.kind != "diffusion" or self.conditioning == "text"):
            raise ValueError("grad_checkpointing is available for lora, controlnet and the UNet2D (kind diffusion, "
                             f"conditioning class or an image); got kind {self.kind!r}, conditioning "
                             f"{self.conditioning!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)


# Fields that may change when a run is resumed (schedule of work, not the math of the run).
_RESUMABLE_CHANGES = {"run_dir", "max_steps", "log_every", "sample_every", "sample_steps", "sample_guidance",
                      "samples_per_class", "ckpt_every_minutes", "ckpt_every_steps", "threads", "device",
                      "grad_checkpointing"}


def _step_seed(seed: int, step: int, salt: int = 0) -> int:
    # A 63-bit mix of (seed, step, salt): distinct streams for every step, stable across processes.
    return (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + salt * 0x94D049BB133111EB) % (2 ** 63)


def make_adamw(params, *, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
    """``torch.optim.AdamW``, with torch's fused kernel when every parameter is on the CPU.

    The fused kernel updates each tensor in one pass (read p, grad, both moments; write p and the moments) where
    the default runs about ten per-tensor ops, each a pass of its own plus Python dispatch: 3.2-4.2x faster than
    the default and the foreach step over the UNet2D presets' parameters on an AVX2 CPU, one thread
    (benchmarks/bench_train_ops.py::test_adamw_step). It is deterministic,
    so a resumed run replays an uninterrupted one bit for bit; a checkpoint keeps the choice it was written with
    (``load_state_dict`` restores the parameter groups, ``fused`` included). On other devices torch's own default
    stays (not measured here).
    """
    params = list(params)
    cpu = bool(params) and all(isinstance(p, torch.Tensor) and p.device.type == "cpu" for p in params)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True if cpu else None)


@torch.no_grad()
def ema_update_(ema_params, model_params, decay: float) -> None:
    """``ema <- ema + (1 - decay) (model - ema)`` for every pair of tensors, as one multi-tensor lerp (one call
    instead of a Python loop of one ``lerp_`` a parameter; the same arithmetic, so the same bits)."""
    ema_params, model_params = list(ema_params), list(model_params)
    if len(ema_params) != len(model_params):
        raise ValueError(f"ema_update_: {len(ema_params)} EMA tensors for {len(model_params)} model tensors")
    if ema_params:
        torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)


def _plain(d: dict) -> dict:
    """A config dict as JSON gives it back (tuples -> lists), so saved and rebuilt architectures compare equal."""
    return json.loads(json.dumps(d))


def build_model(arch: dict) -> nn.Module:
    """The network an architecture record describes (``arch``: what a run stores under ``"arch"``)."""
    if arch.get("kind") == "autoencoder":
        return vae_models.AutoencoderKL(vae_models.VAEConfig(**arch["vae"]))
    if "unet_sd" in arch:
        return TextConditionedUNet(unet_sd.UNetSDConfig(**arch["unet_sd"]),
                                   clip_text.CLIPTextConfig(**arch["text_encoder"]))
    return UNet2D(UNet2DConfig.from_dict(arch["unet"]))


class Trainer:
    """Owns the model, EMA, optimizer and data of one run; ``run()`` trains to ``max_steps``."""

    def __init__(self, cfg: TrainConfig, *, dataset: ImageDataset | None = None, resume: bool = False,
                 progress: bool = True):
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = torch.device(cfg.device)
        self.run_dir = Path(cfg.run_dir)
        cfg.check()
        if cfg.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("fp16 training needs CUDA (fp16 math is very slow on CPU); use bf16 on CPU")
        self._setup_distributed()
        if resume and latest_step(self.run_dir) is None:
            raise CheckpointError(f"--resume: no checkpoint in {self.run_dir}")
        if not resume and latest_step(self.run_dir) is not None:
            raise CheckpointError(f"{self.run_dir} already holds a run; pass resume=True (--resume) to continue "
                                  "it or choose another run folder")
        self.adapter: AdapterRun | None = None
        if cfg.kind in ADAPTER_KINDS:
            self._init_adapter_run(resume, progress)
            return
        self.conditions = None  # image conditioning: condition images aligned with the data
        if cfg.conditioning in image_conditions.IMAGE_CONDITIONINGS:
            self.conditions = image_conditions.prepare_conditions(cfg, dataset, self.run_dir)
            self.images = self.conditions.targets
        else:
            self.images = dataset if dataset is not None else load_dataset(cfg.dataset, "train", size=cfg.image_size)
        if self.images.image_shape[1:] != (cfg.image_size, cfg.image_size):
            raise ValueError(f"dataset {self.images.name!r} has images of {self.images.image_shape[1:]} pixels but "
                             f"the configuration wants {cfg.image_size}x{cfg.image_size} (image_size)")
        self.vae = None  # latent diffusion: the frozen autoencoder (its scaling_factor measured)
        self.data = self.images
        if cfg.autoencoder:
            self.vae, self.data = self._prepare_latents(resume)
        self.arch = self._saved_arch() if resume else self._new_arch()
        self.unet_config = UNet2DConfig.from_dict(self.arch["unet"]) if "unet" in self.arch else None
        self._check_data_fits_model()
        self.flow = cfg.schedule == "flow"
        if self.flow:
            self.schedule = FlowSchedule(cfg.num_train_timesteps)
        else:
            self.schedule: NoiseSchedule = make_schedule(cfg.schedule, cfg.num_train_timesteps)
            # alpha_t, sigma_t per timestep in fp32 on the device (the forward process needs no fp64).
            self._alpha = self.schedule.alphas.float().to(self.device)
            self._sigma = self.schedule.sigmas_vp.float().to(self.device)
        self.captions = CaptionTable(self.data.class_names) if "unet_sd" in self.arch else None

        torch.manual_seed(cfg.seed)
        self.model = build_model(self.arch).to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        if cfg.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.optimizer = self._make_optimizer()
        self._ddp = self._wrap_ddp()
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        self.step = 0
        self.train_seconds = 0.0
        self.loss_log: list[tuple[int, float]] = []  # (step, mean loss over the step's micro-batches)
        self.parts: dict[str, float] = {}             # the last step's loss terms (autoencoder: recon, kl)
        self.progress = progress
        if resume:
            self._resume()
        elif self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            saved = {"train": cfg.to_dict(), "arch": self.arch}
            if self.unet_config is not None:
                saved["unet"] = self.arch["unet"]
            write_json_atomic(saved, self.run_dir / "config.json")

    def _init_adapter_run(self, resume: bool, progress: bool) -> None:
        """The rest of ``__init__`` for a LoRA / ControlNet run: a frozen SD1 model and a trainable adapter
        (:mod:`fastdiff.train.adapters`) in place of a network built from a preset."""
        cfg = self.cfg
        if self.dist.enabled:
            raise ValueError(f"kind {cfg.kind!r} trains in one process; data-parallel runs (torchrun) train the "
                             "diffusion and autoencoder kinds")
        self._ddp = None
        torch.manual_seed(cfg.seed)
        self.adapter = AdapterRun(cfg, self.device, self._autocast)
        self.images = self.data = self.adapter.images
        self.vae, self.captions, self.unet_config, self.flow = None, None, None, False
        self.schedule = self.adapter.schedule
        self.arch = _plain(self.adapter.arch())
        self.model = self.adapter.trainable
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.optimizer = self._make_optimizer()
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        self.step, self.train_seconds, self.loss_log, self.parts = 0, 0.0, [], {}
        self.progress = progress
        if resume:
            self._resume()
        else:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic({"train": cfg.to_dict(), "arch": self.arch}, self.run_dir / "config.json")

    def _new_arch(self) -> dict:
        """The architecture of a new run: the preset, the overrides, and what the data fixes (channels, size,
        classes)."""
        cfg, d = self.cfg, self.data
        channels, size = d.image_shape[0], d.image_shape[1]
        overrides = dict(cfg.model_overrides)
        try:
            if cfg.kind == "autoencoder":
                base = {**asdict(vae_models.PRESETS[cfg.model]), **overrides,
                        "in_channels": channels, "out_channels": channels, "sample_size": size}
                return _plain({"kind": "autoencoder", "vae": asdict(vae_models.VAEConfig(**base))})
            if self.conditions is not None:
                return _plain(image_conditions.unet_arch(cfg, self.conditions))
            if cfg.conditioning == "text":
                text = clip_text.PRESETS[cfg.text_encoder]
                base = {**asdict(unet_sd.PRESETS[cfg.model]), **overrides, "in_channels": channels,
                        "out_channels": channels, "sample_size": size, "cross_attention_dim": text.hidden_size}
                arch = {"kind": "diffusion", "unet_sd": asdict(unet_sd.UNetSDConfig(**base)),
                        "text_encoder": asdict(text)}
            else:
                unet = cfg.unet_config(d.num_classes, d.class_names, channels)
                arch = {"kind": "diffusion", "unet": UNet2DConfig.from_dict({**unet.to_dict(),
                                                                             "sample_size": size}).to_dict()}
        except TypeError as e:  # an override that is no field of the model's config
            raise ValueError(f"model_overrides: {e}") from None
        if self.vae is not None:
            arch["vae"] = asdict(self.vae.config)
        return _plain(arch)

    def _saved_arch(self) -> dict:
        """The run's own architecture (from its config.json), even if the preset it started from has changed."""
        try:
            saved = json.loads((self.run_dir / "config.json").read_text())
            return saved["arch"] if "arch" in saved else {"kind": "diffusion", "unet": saved["unet"]}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{self.run_dir / 'config.json'}: unreadable run configuration "
                                  f"({type(e).__name__}: {e})") from None

    def _check_data_fits_model(self):
        """The dataset must match the network (channels, classes, size): say which, before any step runs."""
        d, arch = self.data, self.arch
        if "unet" in arch:
            u = self.unet_config
            channels, size, levels = u.out_channels, u.sample_size, len(u.block_out_channels)
            if u.num_classes and d.num_classes != u.num_classes:
                raise ValueError(f"dataset {d.name!r} has {d.num_classes} classes but the model was built for "
                                 f"{u.num_classes} ({', '.join(u.class_names) or 'unnamed'})")
        else:
            c = arch["vae"] if arch["kind"] == "autoencoder" else arch["unet_sd"]
            channels, size, levels = c["in_channels"], c["sample_size"], len(c["block_out_channels"])
        if d.image_shape[0] != channels:
            raise ValueError(f"dataset {d.name!r} has {d.image_shape[0]}-channel images but the model takes "
                             f"{channels} channels")
        if d.image_shape[1] != size:
            raise ValueError(f"dataset images are {d.image_shape[1]} pixels but the model was built for {size}")
        factor = 2 ** (levels - 1)
        if size % factor:
            raise ValueError(f"image_size {size} must be a multiple of {factor} for this model "
                             f"({levels} resolution levels)")

    # ---------------------------------------------------------------------------------------------------
    # Data parallelism (fastdiff.train.distributed): one process per device under torchrun; one process otherwise.
    def _setup_distributed(self):
        """Join the process group torchrun describes (a world of one without it); the batch must split evenly."""
        self.dist, self.device = setup_distributed(self.device)
        if self.dist.enabled:
            shard_slice(self.cfg.batch_size, self.dist.rank, self.dist.world_size)  # a clear error if not even

    def _shard(self, global_batch: int) -> slice:
        """This process's rows of a global micro-batch (all of them in one process)."""
        return shard_slice(global_batch, self.dist.rank, self.dist.world_size)

    def _rank_indices(self, step: int, micro: int) -> torch.Tensor:
        """The dataset indices this process runs: its shard of the global micro-batch of the 1-process order."""
        return self._batch_indices(step, micro)[self._shard(self.cfg.batch_size)]

    def _prepare_latents(self, resume: bool):
        """Latent runs: rank 0 encodes the dataset and writes the cache and the autoencoder copy; the other ranks
        then read both back, as a resumed run does."""
        cfg = self.cfg
        if self.dist.is_main:
            out = prepare_latents(cfg.autoencoder, self.images, self.run_dir, resume=resume, device=self.device)
        self.dist.barrier()
        if not self.dist.is_main:
            out = prepare_latents(cfg.autoencoder, self.images, self.run_dir, resume=True, device=self.device)
        return out

    def _wrap_ddp(self):
        """DistributedDataParallel around the model (through ForwardThrough, so any loss runs in its forward)."""
        if not self.dist.enabled:
            return None
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(ForwardThrough(self.model), device_ids=ids)

    def _micro_loss(self, x0: torch.Tensor, y: torch.Tensor, g: torch.Generator, image: torch.Tensor | None = None,
                    *, sync: bool) -> torch.Tensor:
        """The loss of this process's rows of one micro-batch. Under DDP the forward runs through the wrapper and,
        but for the last micro-batch of a step, inside ``no_sync`` (gradients accumulate locally; the last
        backward all-reduces the sum)."""
        if self.cfg.kind == "autoencoder":
            fn = lambda: self._autoencoder_loss(x0, g)  # noqa: E731
        else:
            fn = lambda: self._diffusion_loss(x0, y, g, image)  # noqa: E731
        if self._ddp is None:
            return fn()
        with contextlib.nullcontext() if sync else self._ddp.no_sync():
            return self._ddp(fn)

    def _mean_over_ranks(self, loss: float, parts: dict[str, float]) -> tuple[float, dict[str, float]]:
        """The step's loss and loss terms averaged over the processes: the global batch's means."""
        if not self.dist.enabled:
            return loss, parts
        keys = sorted(parts)
        vals = self.dist.mean([loss, *(parts[k] for k in keys)])
        return vals[0], dict(zip(keys, vals[1:]))

    # ---------------------------------------------------------------------------------------------------
    def _make_optimizer(self):
        cfg = self.cfg
        params = self.model.parameters()
        if cfg.optimizer == "adamw":
            return make_adamw(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        if cfg.optimizer == "adamw8bit":  # block-wise 8-bit moments (fastdiff.train.optim), any device
            return AdamW8bit(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        raise ValueError(f"optimizer must be adamw or adamw8bit, got {cfg.optimizer!r}")

    def _resume(self):
        model_sd, ema_sd, opt_sd, state = load_checkpoint(self.run_dir)
        saved = TrainConfig.from_dict(state["train"])
        diff = {k: (getattr(saved, k), getattr(self.cfg, k)) for k in saved.to_dict()
                if k not in _RESUMABLE_CHANGES and getattr(saved, k) != getattr(self.cfg, k)}
        if diff:
            raise CheckpointError(f"{self.run_dir}: the checkpoint was trained with a different configuration: "
                                  + ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in diff.items()))
        saved_arch = state.get("arch") or {"kind": "diffusion", "unet": state["unet"]}
        if saved_arch != self.arch:
            raise CheckpointError(f"{self.run_dir}: checkpoint model config {saved_arch} differs from {self.arch}")
        try:
            self.model.load_state_dict(model_sd, strict=True)
            self.ema.load_state_dict(ema_sd, strict=True)
            self.optimizer.load_state_dict(opt_sd)
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{self.run_dir}: the checkpoint's tensors do not fit this model (was it copied "
                                  f"from another run?): {str(e).splitlines()[0][:500]}") from None
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.loss_log = [tuple(x) for x in state.get("loss_log", [])]

    def save(self):
        if not self.dist.is_main:  # one writer: every rank holds the same model, EMA and optimizer
            return
        state = {
            "train": self.cfg.to_dict(),
            "arch": self.arch,
            "rng": rng_state(),
            "train_seconds": self.train_seconds,
            "loss_log": self.loss_log,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "torch": torch.__version__,
        }
        if self.unet_config is not None:
            state["unet"] = self.arch["unet"]  # what load_run_model reads
        save_checkpoint(self.run_dir, self.step, model=self.model, ema=self.ema, optimizer=self.optimizer,
                        state=state)
        if self.adapter is not None:  # the trained LoRA / ControlNet in the formats users' tools read
            self.adapter.export(self.run_dir, self.model)

    # ---------------------------------------------------------------------------------------------------
    def _batch_indices(self, step: int, micro: int) -> torch.Tensor:
        """Indices of micro-batch ``micro`` of optimizer step ``step``: epochs are seeded permutations."""
        cfg, n = self.cfg, len(self.data)
        b = cfg.batch_size
        if b > n:
            raise ValueError(f"batch_size {b} exceeds the dataset size {n}")
        per_epoch = n // b  # drop the last partial batch of every epoch
        k = step * cfg.grad_accum + micro
        epoch, pos = divmod(k, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_step_seed(cfg.seed, epoch, 1)))
        return perm[pos * b:(pos + 1) * b]

    def _autocast(self):
        cfg = self.cfg
        if cfg.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _lr(self, step: int) -> float:
        w = self.cfg.warmup_steps
        return self.cfg.lr * min(1.0, (step + 1) / w) if w > 0 else self.cfg.lr

    def _diffusion_loss(self, x0: torch.Tensor, y: torch.Tensor, g: torch.Generator,
                        image: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.cfg
        b = x0.shape[0] * self.dist.world_size  # draws for the global micro-batch; this rank keeps its rows
        if self.flow:  # logit-normal noise levels (Esser et al. 2024, eq. 19), network timestep T * s
            s = torch.sigmoid(torch.randn(b, generator=g))
            t = s * cfg.num_train_timesteps
        else:
            t = torch.randint(0, cfg.num_train_timesteps, (b,), generator=g)
        noise = torch.randn((b, *x0.shape[1:]), generator=g)
        drop = torch.rand(b, generator=g) < cfg.class_dropout
        flip = torch.rand(b, generator=g) < 0.5
        rows = self._shard(b)
        t, noise, drop, flip = t[rows], noise[rows], drop[rows], flip[rows]
        if cfg.hflip:
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        if self.captions is not None:
            template = torch.randint(0, self.captions.num_templates, (b,), generator=g)[rows]
            cond = self.captions.lookup(y, template, drop)
        elif self.unet_config.num_classes:
            cond = torch.where(drop, torch.full_like(y, self.unet_config.null_label), y)
        else:  # an image-conditioned UNet without labels
            cond = torch.zeros_like(y)
        if image is not None:  # the condition image, dropped (zeros) with the label, enters as input channels
            image = image_conditions.condition_input(image, drop, flip if cfg.hflip else None).to(self.device)
        x0, noise, t, cond = (v.to(self.device) for v in (x0, noise, t, cond))
        if self.flow:
            s = s[rows].to(self.device)[:, None, None, None]
            xt = (1 - s) * x0 + s * noise
            target = noise - x0
        else:
            a, s = self._alpha[t][:, None, None, None], self._sigma[t][:, None, None, None]
            xt = a * x0 + s * noise
            if cfg.prediction == "eps":
                target = noise
            elif cfg.prediction == "v":
                target = a * noise - s * x0        # Salimans & Ho 2022: v = alpha eps - sigma x0
            else:
                target = x0
        if image is not None:
            xt = torch.cat([xt, image], 1)
            cond = cond if self.unet_config.num_classes else None
        with self._autocast():
            out = self.model(xt, t, cond)
        return F.mse_loss(out.float(), target)

    def _autoencoder_loss(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        cfg = self.cfg
        x = x.to(self.device)
        with self._autocast():
            post = self.model.encode(x)
        mean, logvar = post.mean.float(), post.logvar.float()
        b = mean.shape[0] * self.dist.world_size  # draws for the global micro-batch; this rank keeps its rows
        noise = torch.randn((b, *mean.shape[1:]), generator=g)[self._shard(b)].to(self.device)
        z = mean + torch.exp(0.5 * logvar) * noise           # z ~ q(z|x), reparameterised
        with self._autocast():
            rec = self.model.decode(z)
        err = rec.float() - x
        recon = err.abs().mean() if cfg.recon_loss == "l1" else err.square().mean()
        # KL(N(m, v) || N(0, 1)) = (m^2 + v - 1 - log v) / 2 per element; summed over an image's latents
        kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean()
        self._parts["recon"] = self._parts.get("recon", 0.0) + recon.item()
        self._parts["kl"] = self._parts.get("kl", 0.0) + kl.item()
        return recon + cfg.kl_weight * kl / x[0].numel()

    def train_step(self) -> float:
        """One optimizer step (``grad_accum`` micro-batches). Returns the mean loss."""
        cfg, step = self.cfg, self.step
        self.model.train()
        torch.manual_seed(_step_seed(cfg.seed, step, 2))  # dropout layers, if any
        g = torch.Generator().manual_seed(_step_seed(cfg.seed, step, 3))
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr(step)
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        self._parts = {}
        for micro in range(cfg.grad_accum):
            if self.adapter is not None:
                loss = self.adapter.loss(self._batch_indices(step, micro), g)
            else:
                idx = self._rank_indices(step, micro)
                x0, y = self.data.batch(idx)
                image = None if self.conditions is None else self.conditions.condition(idx)
                loss = self._micro_loss(x0, y, g, image, sync=micro == cfg.grad_accum - 1)
            total += loss.item()
            loss = loss / cfg.grad_accum
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self._update_ema()
        self.step += 1
        loss, self.parts = self._mean_over_ranks(total / cfg.grad_accum,
                                                 {k: v / cfg.grad_accum for k, v in self._parts.items()})
        return loss

    @torch.no_grad()
    def _update_ema(self):
        # EMA with the usual warm-up, d = min(decay, (1 + n) / (10 + n)), so early weights are not frozen in.
        d = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        # sampling the EMA model in eval mode may have replaced its weights by packed copies: written in place here
        restore_plain_weights(self.ema)
        ema_update_(self.ema.parameters(), self.model.parameters(), d)
        for be, bm in zip(self.ema.buffers(), self.model.buffers()):
            be.copy_(bm)

    # ---------------------------------------------------------------------------------------------------
    def write_pictures(self):
        cfg = self.cfg
        if self.adapter is not None:  # LoRA / ControlNet runs draw no sample grid (yet): the loss curve only
            grid = None
        elif cfg.kind == "autoencoder":
            grid, psnr = self.reconstruction_grid()
            with open(self.run_dir / "train.log", "a") as f:
                f.write(json.dumps({"step": self.step, "recon_psnr_db": round(psnr, 3)}) + "\n")
        elif self.conditions is not None:
            grid = self.condition_grid()
        elif self.unet_config is not None and self.vae is None:
            grid = sample_grid(self.ema, self.schedule, cfg.prediction, per_class=cfg.samples_per_class,
                               steps=cfg.sample_steps, guidance=cfg.sample_guidance, seed=cfg.seed,
                               precision=cfg.precision, device=self.device)
        else:
            grid = self.sample_rows()
        if grid is not None:
            save_png_atomic(grid, self.run_dir / f"samples-{self.step:07d}.png")
            save_png_atomic(grid, self.run_dir / "samples-latest.png")
        if self.loss_log:
            steps, losses = zip(*self.loss_log)
            title = (f"{cfg.recon_loss} + KL" if cfg.kind == "autoencoder" else f"{cfg.prediction}-prediction MSE")
            save_png_atomic(loss_curve(steps, losses, title=title), self.run_dir / "loss.png")

    @torch.no_grad()
    def reconstruction_grid(self, n_psnr: int = 512):
        """(PIL grid: one input image per class over its EMA reconstruction, PSNR in dB of the EMA
        reconstructions (posterior means) of the first ``n_psnr`` training images)."""
        idx = torch.stack([torch.nonzero(self.images.labels == c)[0, 0]
                           for c in range(self.images.num_classes) if (self.images.labels == c).any()])
        x, _ = self.images.batch(idx)
        with self._autocast():
            rec = self.ema(x.to(self.device)).float().cpu()
        grid = image_grid(to_pil(torch.cat([x, rec])), len(idx), row_labels=["input", "reconstruction"])
        se, count = 0.0, 0
        for start in range(0, min(n_psnr, len(self.images)), 128):
            xb, _ = self.images.batch(torch.arange(start, min(start + 128, n_psnr, len(self.images))))
            with self._autocast():
                rb = self.ema(xb.to(self.device)).float().cpu().clamp(-1, 1)
            se += float((rb - xb).double().square().sum())
            count += xb.numel()
        mse = se / count
        return grid, 10 * math.log10(4.0 / max(mse, 1e-12))  # peak-to-peak 2 ([-1, 1])

    @torch.no_grad()
    def sample_rows(self, *, per_row: int | None = None, steps: int | None = None, guidance: float | None = None,
                    seed: int | None = None, prompts: list[str] | None = None):
        """A labelled PIL grid of the EMA network's samples, one row per class (or per prompt), decoded through
        the run's autoencoder in latent runs; guidance batched with the null label / empty caption."""
        cfg = self.cfg
        per_row = per_row or cfg.samples_per_class
        steps, guidance = steps or cfg.sample_steps, cfg.sample_guidance if guidance is None else guidance
        names = list(self.data.class_names)
        if self.captions is not None:
            prompts = prompts or [caption(nm) for nm in names]
            cond = self.captions.encode(prompts).repeat_interleave(per_row, 0)
            uncond = self.captions.null_ids[None].expand(len(cond), -1)
            labels = prompts
        else:
            if prompts:
                raise ValueError("prompts need a text-conditioned run (conditioning='text')")
            cond = torch.arange(len(names)).repeat_interleave(per_row)
            uncond = torch.full_like(cond, self.unet_config.null_label)
            labels = names
        g = torch.Generator().manual_seed(cfg.seed if seed is None else seed)
        x = torch.randn((len(cond), *self.data.image_shape), generator=g).to(self.device)
        dev_type = self.device.type

        def net(xx, tt, cc):
            with torch.autocast(device_type=dev_type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                return self.ema(xx, tt, cc)

        kw = dict(steps=steps, cond=cond.to(self.device), generator=g)
        if guidance != 1.0:
            kw.update(uncond=uncond.to(self.device), guidance=guidance)
        if self.flow:
            out = sample_flow_euler(Denoiser(net, "flow"), x, self.schedule, **kw)
        else:
            out = sample_ddim(Denoiser(net, cfg.prediction), x, self.schedule, spacing="trailing",
                              clip=None if self.vae is not None else 1.0, **kw)
        if self.vae is not None:
            out = self.vae.decode(self.vae.from_latents(out.float()))
        return image_grid(to_pil(out.float().cpu()), per_row, row_labels=labels)

    @torch.no_grad()
    def condition_grid(self, n: int = 8):
        """Image-conditioned runs: a PIL grid of ``n`` training examples, rows condition / EMA sample (guided
        DDIM) / training image."""
        cfg = self.cfg
        idx = torch.arange(0, len(self.data), max(1, len(self.data) // n))[:n]
        x0, y = self.data.batch(idx)
        image = self.conditions.condition(idx)
        g = torch.Generator().manual_seed(cfg.seed)
        x = torch.randn(x0.shape, generator=g)
        labels = self.unet_config.num_classes
        cond, uncond = (image, torch.zeros_like(image)) if not labels else \
            ((y, image), (torch.full_like(y, self.unet_config.null_label), torch.zeros_like(image)))
        dev_type = self.device.type

        def net(xx, tt, cc):
            yy, img = cc if labels else (None, cc)
            with torch.autocast(device_type=dev_type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                return self.ema(torch.cat([xx, img], 1).to(self.device), tt.to(self.device),
                                None if yy is None else yy.to(self.device)).float().cpu()

        guided = cfg.sample_guidance != 1.0
        out = sample_ddim(Denoiser(net, cfg.prediction), x, self.schedule, steps=cfg.sample_steps, cond=cond,
                          uncond=uncond if guided else None, guidance=cfg.sample_guidance if guided else None,
                          generator=g, clip=1.0, spacing="trailing")
        rows = [image.expand(-1, x0.shape[1], -1, -1) if image.shape[1] != x0.shape[1] else image, out, x0]
        return image_grid(to_pil(torch.cat(rows).clamp(-1, 1)), len(idx),
                          row_labels=["condition", "sample", "training image"])

    def run(self, max_steps: int | None = None) -> list[float]:
        """Train until ``max_steps``; returns the losses of the steps run by this call."""
        cfg = self.cfg
        max_steps = cfg.max_steps if max_steps is None else max_steps
        losses: list[float] = []
        last_ckpt = time.monotonic()
        log_path = self.run_dir / "train.log"
        tty = sys.stderr.isatty()
        bar = tqdm(total=max_steps, initial=self.step, disable=not (self.progress and self.dist.is_main),
                   dynamic_ncols=True,
                   mininterval=0.5 if tty else 60.0, desc="train")
        window_t, window_n = time.perf_counter(), 0
        ips = 0.0
        try:
            while self.step < max_steps:
                t0 = time.perf_counter()
                loss = self.train_step()
                self.train_seconds += time.perf_counter() - t0
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {self.step}; the last checkpoint "
                                             "is untouched")
                losses.append(loss)
                window_n += cfg.batch_size * cfg.grad_accum
                if self.step % cfg.log_every == 0 or self.step == max_steps:
                    now = time.perf_counter()
                    ips = window_n / max(now - window_t, 1e-9)
                    window_t, window_n = now, 0
                    self.loss_log.append((self.step, float(sum(losses[-cfg.log_every:]) /
                                                           len(losses[-cfg.log_every:]))))
                    if self.dist.is_main:
                        with open(log_path, "a") as f:
                            f.write(json.dumps({"step": self.step, "loss": self.loss_log[-1][1],
                                                **{k: round(v, 6) for k, v in self.parts.items()},
                                                "img_per_s": round(ips, 2), "lr": self._lr(self.step - 1),
                                                "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.1f}", refresh=False)
                bar.update(1)
                if cfg.sample_every and self.step % cfg.sample_every == 0 and self.dist.is_main:
                    self.write_pictures()
                due_time = time.monotonic() - last_ckpt >= cfg.ckpt_every_minutes * 60
                due_step = cfg.ckpt_every_steps and self.step % cfg.ckpt_every_steps == 0
                if due_time or due_step or self.step == max_steps:
                    self.save()
                    last_ckpt = time.monotonic()
        finally:
            bar.close()
        self.dist.barrier()  # the others wait for rank 0's last checkpoint and pictures
        return losses


def train(cfg: TrainConfig, *, resume: bool = False, dataset: ImageDataset | None = None,
          progress: bool = True) -> Trainer:
    """Build a :class:`Trainer` (fresh or resumed) and run it to ``cfg.max_steps``."""
    tr = Trainer(cfg, dataset=dataset, resume=resume, progress=progress)
    tr.run()
    return tr


# -------------------------------------------------------------------------------------------------------------
# Sample grids of a training network.
# -------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def sample_grid(unet: UNet2D, schedule: NoiseSchedule, prediction: str, *, per_class: int = 6, steps: int = 20,
                guidance: float = 3.0, seed: int = 0, precision: str = "bf16", device="cpu"):
    """A PIL grid: one row per class (labelled), ``per_class`` DDIM samples each, one batched CFG forward a step."""
    cfg = unet.config
    if not cfg.num_classes:
        raise ValueError("sample_grid needs a class-conditional model")
    was_training = unet.training
    unet.eval()
    n = cfg.num_classes * per_class
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=g).to(device)
    y = torch.arange(cfg.num_classes).repeat_interleave(per_class).to(device)
    uncond = torch.full_like(y, cfg.null_label) if cfg.null_class else None
    dev_type = torch.device(device).type

    def net(xx, tt, yy):
        # The network alone runs under autocast; the sampler's state and arithmetic stay fp32.
        with torch.autocast(device_type=dev_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            return unet(xx, tt, yy)

    guided = uncond is not None and guidance != 1.0
    out = sample_ddim(Denoiser(net, prediction), x, schedule, steps=steps, cond=y,
                      uncond=uncond if guided else None, guidance=guidance if guided else None,
                      generator=g, clip=1.0, spacing="trailing")
    unet.train(was_training)
    names = list(cfg.class_names) or [str(i) for i in range(cfg.num_classes)]
    return image_grid(to_pil(out.float()), per_class, row_labels=names)
