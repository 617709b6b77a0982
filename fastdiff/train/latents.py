"""Latent diffusion data: a dataset encoded once by a frozen autoencoder, cached in the run folder.

    run_dir/autoencoder/config.json, diffusion_pytorch_model.safetensors   the autoencoder the run trains on
                                                                           (diffusers AutoencoderKL layout; its
                                                                           scaling_factor = the measured 1/std)
    run_dir/latents.safetensors                                            posterior means z (unscaled), labels

The latents are the posterior means ``E[z | x]`` (the autoencoder is deterministic once trained; LDM draws
``z ~ q(z|x)`` per step, whose spread is ``exp(logvar / 2)``, tiny for a KL weight of 1e-6). The scale factor is
``1 / std(z)`` over every element of the cached latents (LDM, Rombach et al. 2022, Sec. 3.1 and Appendix G, took
the std of a first batch; here it is the whole training set), so the diffusion model sees latents of unit
variance: ``latents = scaling_factor * z``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fastdiff.io.checkpoint import CheckpointError
from fastdiff.io.run_checkpoint import load_checkpoint, write_json_atomic
from fastdiff.models.vae import AutoencoderKL, VAEConfig

__all__ = ["LatentDataset", "load_autoencoder", "save_autoencoder", "encode_dataset", "measure_scale_factor",
           "prepare_latents", "SNAPSHOT_DIR", "CACHE_FILE"]

SNAPSHOT_DIR = "autoencoder"
CACHE_FILE = "latents.safetensors"


@dataclass
class LatentDataset:
    """Scaled latents (N, C, h, w) fp32 in memory with their labels; ``batch`` like :class:`ImageDataset`'s."""

    latents: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    name: str = ""

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.latents.shape[1:])

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.latents[idx], self.labels[idx]


def _autoencoder_from_folder(folder: Path) -> AutoencoderKL:
    cfg_path = folder / "config.json"
    try:
        cfg = VAEConfig.from_diffusers(json.loads(cfg_path.read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: not a readable AutoencoderKL config ({type(e).__name__}: {e})") from None
    weights = folder / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{folder}: no diffusion_pytorch_model.safetensors beside config.json")
    vae = AutoencoderKL(cfg)
    try:
        vae.load_state_dict({k: v.float() for k, v in load_file(str(weights)).items()}, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{weights}: the weights do not fit its config: {str(e).splitlines()[0][:300]}") from None
    return vae


def load_autoencoder(path: str | os.PathLike) -> AutoencoderKL:
    """A frozen :class:`AutoencoderKL` (eval, no gradients, fp32) from an autoencoder training run (its EMA
    weights) or a diffusers ``AutoencoderKL`` folder (or a pipeline folder with ``vae/``)."""
    p = Path(path)
    if (p / "latest.json").is_file():
        _, ema, _, state = load_checkpoint(p)
        arch = state.get("arch") or {}
        if arch.get("kind") != "autoencoder":
            raise CheckpointError(f"autoencoder {p}: this run trained a {arch.get('kind', 'diffusion')} model, "
                                  "not an autoencoder")
        vae = AutoencoderKL(VAEConfig(**arch["vae"]))
        vae.load_state_dict(ema, strict=True)
    elif (p / "config.json").is_file():
        vae = _autoencoder_from_folder(p)
    elif (p / "vae" / "config.json").is_file():
        vae = _autoencoder_from_folder(p / "vae")
    else:
        raise CheckpointError(f"autoencoder {str(path)!r}: not an autoencoder run folder (latest.json) nor an "
                              "AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors)")
    return vae.float().eval().requires_grad_(False)


def save_autoencoder(vae: AutoencoderKL, folder: str | os.PathLike) -> Path:
    """The diffusers ``AutoencoderKL`` layout (``diffusers.AutoencoderKL.from_pretrained`` reads it), atomically
    per file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".diffusion_pytorch_model.safetensors.tmp{os.getpid()}"
    save_file({k: v.detach().contiguous().cpu() for k, v in vae.state_dict().items()}, str(tmp),
              metadata={"format": "pt"})
    os.replace(tmp, folder / "diffusion_pytorch_model.safetensors")
    write_json_atomic(vae.config.to_diffusers(), folder / "config.json")
    return folder


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, images, *, batch_size: int = 256, device="cpu") -> torch.Tensor:
    """Posterior means ``E[z | x]`` (N, C, h, w) fp32 of every image of an ImageDataset, in order."""
    out = []
    for start in range(0, len(images), batch_size):
        x, _ = images.batch(torch.arange(start, min(start + batch_size, len(images))))
        out.append(vae.encode(x.to(device)).mode().float().cpu())
    return torch.cat(out)


def measure_scale_factor(z: torch.Tensor) -> float:
    """``1 / std`` over every element of the latents (fp64 accumulation), as LDM rescales its latents."""
    return float(1.0 / z.double().std())


def prepare_latents(autoencoder: str, images, run_dir: str | os.PathLike, *, resume: bool,
                    device="cpu") -> tuple[AutoencoderKL, LatentDataset]:
    """The run's frozen autoencoder (scaling factor set) and its latent dataset.

    A new run encodes ``images`` with the autoencoder at ``autoencoder``, measures the scale factor, and writes
    the snapshot and the cache into ``run_dir``; a resumed run reads both back (the cache is rebuilt from the
    snapshot if it was deleted), so it trains on the very latents it started with.
    """
    run_dir = Path(run_dir)
    snap, cache = run_dir / SNAPSHOT_DIR, run_dir / CACHE_FILE
    if resume:
        if not (snap / "config.json").is_file():
            raise CheckpointError(f"{run_dir}: the run's autoencoder copy {snap} is missing")
        vae = _autoencoder_from_folder(snap).float().eval().requires_grad_(False).to(device)
    else:
        vae = load_autoencoder(autoencoder).to(device)
    c = vae.config
    if images.image_shape[0] != c.in_channels:
        raise ValueError(f"dataset {images.name!r} has {images.image_shape[0]}-channel images but the autoencoder "
                         f"takes {c.in_channels} channels")
    if images.image_shape[1] % vae.downscale or images.image_shape[2] % vae.downscale:
        raise ValueError(f"image_size {images.image_shape[1]} must be a multiple of the autoencoder's downscale "
                         f"factor {vae.downscale}")
    z = None
    if resume and cache.is_file():
        with safe_open(str(cache), "pt") as f:
            meta = f.metadata() or {}
        if int(meta.get("count", -1)) != len(images) or meta.get("dataset") != images.name:
            raise CheckpointError(f"{cache}: cached for {meta.get('count')} images of {meta.get('dataset')!r}, "
                                  f"but the dataset is {len(images)} images of {images.name!r}")
        z = load_file(str(cache))["z"]
    if z is None:
        z = encode_dataset(vae, images, device=device)
    if not resume:
        vae.config = replace(c, scaling_factor=measure_scale_factor(z))
        save_autoencoder(vae, snap)
    if not resume or not cache.is_file():
        tmp = run_dir / f".{CACHE_FILE}.tmp{os.getpid()}"
        save_file({"z": z.contiguous(), "labels": images.labels.contiguous()}, str(tmp),
                  metadata={"count": str(len(images)), "dataset": images.name, "autoencoder": str(autoencoder),
                            "scaling_factor": repr(vae.config.scaling_factor)})
        os.replace(tmp, cache)
    return vae, LatentDataset(z * vae.config.scaling_factor, images.labels, images.class_names,
                              f"{images.name} latents")
