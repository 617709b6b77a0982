"""What every Triton launcher needs besides its kernels: the device to launch on, CUDA's grid limits, the
number of SMs to fill, and whether kernels run under the CPU interpreter.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from fastdiff import settings

__all__ = ["MAX_GRID", "interpreting", "on_device", "check_grid", "sm_count"]

# CUDA's grid limits per axis (x, y, z): a launch beyond them fails with "invalid argument".
MAX_GRID = (2 ** 31 - 1, 65535, 65535)

# What the interpreter (CPU tensors, tests) pretends to fill: small, so that test shapes exercise the split paths.
_INTERPRETER_SMS = 4


def interpreting() -> bool:
    """True when kernels run on CPU tensors under TRITON_INTERPRET=1 (tests only)."""
    return settings.current().triton_interpret


def on_device(t: torch.Tensor):
    """Context that makes ``t``'s GPU the current one for the launch: triton launches on the current device and
    its current stream, so a tensor on ``cuda:1`` launched from ``cuda:0`` would run on the wrong GPU."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def check_grid(grid: tuple[int, ...], what: str) -> tuple[int, ...]:
    """``grid`` unchanged, or ValueError if an axis exceeds CUDA's limits (a clear error instead of a failed
    launch). The launchers fold or chunk their grids so that real shapes never get here."""
    for axis, (size, limit) in enumerate(zip(grid, MAX_GRID)):
        if size > limit:
            raise ValueError(f"{what}: grid axis {'xyz'[axis]} = {size} exceeds CUDA's limit {limit}")
    return grid


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a few for CPU tensors under the interpreter)."""
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return _INTERPRETER_SMS
