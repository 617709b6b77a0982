"""Training-run folders: crash-safe checkpoints (one safetensors file of model, EMA and optimizer tensors + one
JSON state) written by :mod:`fastdiff.train`, and :func:`load_run_model` to sample a run's network.

Layout of a run folder::

    ckpt-0001200.safetensors   model.* / ema.* / opt.<param index>.<name> tensors
    ckpt-0001200.json          step, configs, optimizer scalars and param groups, RNG states, loss log
    latest.json                {"step": 1200, "previous": 600}   <- the commit point

Each file is written to a temporary name, fsync'ed, then ``os.replace``'d into place; ``latest.json`` is replaced
last. A kill at any moment therefore leaves ``latest.json`` naming a complete checkpoint. The previous
checkpoint is kept (and used if the latest one fails to read); older ones are deleted.
"""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fastdiff.io.checkpoint import CheckpointError
from fastdiff.models.unet2d import UNet2D, UNet2DConfig
from fastdiff.samplers import NoiseSchedule, make_schedule

__all__ = [
    "RunModel",
    "load_run_model",
    "save_checkpoint",
    "load_checkpoint",
    "latest_step",
    "write_json_atomic",
    "optimizer_to_flat",
    "optimizer_from_flat",
    "rng_state",
    "set_rng_state",
]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_synced(tmp: Path, dst: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    _replace_synced(tmp, path)


def _save_tensors_atomic(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    _replace_synced(tmp, path)


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``opt.state_dict()`` into tensors (for safetensors) and JSON-able rest (scalars, param groups)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{name}"] = v
            else:
                scalars[f"{idx}.{name}"] = v
    return tensors, {"scalars": scalars, "param_groups": sd["param_groups"]}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict:
    """The global torch CPU (and CUDA, when present) RNG states, base64 so they fit in JSON."""
    out = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        out["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]])


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model: torch.nn.Module, ema: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, state: dict) -> Path:
    """Write checkpoint ``step`` atomically, point latest.json at it, keep the previous one, drop older ones."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    opt_tensors, opt_meta = optimizer_to_flat(optimizer)
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    tensors.update({f"opt.{k}": v for k, v in opt_tensors.items()})
    st_path = run_dir / f"ckpt-{step:07d}.safetensors"
    _save_tensors_atomic(tensors, st_path)
    write_json_atomic({**state, "step": step, "optimizer": opt_meta}, run_dir / f"ckpt-{step:07d}.json")
    prev = latest_step(run_dir)
    write_json_atomic({"step": step, "previous": prev if prev != step else None}, run_dir / "latest.json")
    keep = {step, prev}
    for p in run_dir.glob("ckpt-*.*"):
        try:
            s = int(p.stem.split("-")[1])
        except (IndexError, ValueError):
            continue
        if s not in keep:
            p.unlink(missing_ok=True)
    return st_path


def latest_step(run_dir: str | os.PathLike) -> int | None:
    p = Path(run_dir) / "latest.json"
    if not p.is_file():
        return None
    try:
        return int(json.loads(p.read_text())["step"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{p}: unreadable ({e})") from None


def _read(run_dir: Path, step: int) -> tuple[dict[str, torch.Tensor], dict]:
    st = run_dir / f"ckpt-{step:07d}.safetensors"
    js = run_dir / f"ckpt-{step:07d}.json"
    try:
        state = json.loads(js.read_text())
        tensors = load_file(str(st))
    except Exception as e:  # noqa: BLE001 - any read failure means "this checkpoint is not usable"
        raise CheckpointError(f"checkpoint {step} in {run_dir} is unreadable: {type(e).__name__}: {e}") from None
    if state.get("step") != step:
        raise CheckpointError(f"{js}: says step {state.get('step')}, file name says {step}")
    return tensors, state


def load_checkpoint(run_dir: str | os.PathLike, step: int | None = None) -> tuple[dict, dict, dict, dict]:
    """(model_sd, ema_sd, optimizer_sd, state) of ``step`` or of the latest good checkpoint (falling back to
    the previous one when the latest is unreadable)."""
    run_dir = Path(run_dir)
    if step is None:
        p = run_dir / "latest.json"
        if not p.is_file():
            raise CheckpointError(f"no checkpoint in {run_dir} (latest.json missing)")
        latest = json.loads(p.read_text())
        candidates = [s for s in (latest.get("step"), latest.get("previous")) if s is not None]
    else:
        candidates = [step]
    errors = []
    for s in candidates:
        try:
            tensors, state = _read(run_dir, int(s))
            break
        except CheckpointError as e:
            errors.append(str(e))
    else:
        raise CheckpointError("; ".join(errors) or f"no checkpoint in {run_dir}")
    model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    opt = optimizer_from_flat({k[4:]: v for k, v in tensors.items() if k.startswith("opt.")}, state["optimizer"])
    return model, ema, opt, state


@dataclass
class RunModel:
    """A trained network with what is needed to sample it (``train``: the run's training configuration)."""

    unet: UNet2D
    schedule: NoiseSchedule
    prediction: str
    step: int
    train: dict


def load_run_model(run_dir: str | os.PathLike, *, use_ema: bool = True, step: int | None = None) -> RunModel:
    """The (EMA by default) network of a run folder's latest good checkpoint, in eval mode."""
    model_sd, ema_sd, _, state = load_checkpoint(run_dir, step)
    unet = UNet2D(UNet2DConfig.from_dict(state["unet"]))
    unet.load_state_dict(ema_sd if use_ema else model_sd, strict=True)
    train = state["train"]
    return RunModel(unet.eval().requires_grad_(False), make_schedule(train["schedule"], train["num_train_timesteps"]),
                    train["prediction"], int(state["step"]), train)
