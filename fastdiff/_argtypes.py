"""Argument types for the ``fastdiff`` sub-commands: each checks its value when the command line is parsed, so
bad input stops before any model loads or file is written, with one line naming the option and what it allows."""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable

__all__ = ["OneLineParser", "int_at_least", "float_in", "existing_path", "multiple_of", "output_file"]


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (``prog: error: argument --n: ...``), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def _named(fn: Callable, name: str) -> Callable:
    fn.__name__ = name  # argparse names the type in its message ("invalid <name> value")
    return fn


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {v}")
        return v

    return _named(parse, f"int >= {low}")


def float_in(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False):
    lo, hi = ("(" if low_open else "[") + f"{low:g}", f"{high:g}" + (")" if high_open or high == math.inf else "]")

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number in {lo}, {hi}, got {text!r}") from None
        ok = math.isfinite(v) and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be a number in {lo}, {hi}, got {text}")
        return v

    return _named(parse, "number")


def multiple_of(step: int, low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < low or v % step:
            raise argparse.ArgumentTypeError(f"must be a multiple of {step} >= {low}, got {text!r}")
        return v

    return _named(parse, f"multiple of {step}")


def existing_path(kind: str = "path") -> Callable[[str], str]:
    """A path that exists (``kind``: 'path', 'file' or 'folder')."""
    def parse(text: str) -> str:
        p = Path(text)
        ok = p.is_file() if kind == "file" else p.is_dir() if kind == "folder" else p.exists()
        if not ok:
            raise argparse.ArgumentTypeError(f"{kind} does not exist: {text}")
        return text

    return _named(parse, kind)


def output_file(text: str) -> str:
    """A file to write: its folder must exist (nothing is created before the run starts)."""
    p = Path(text)
    if not text or p.is_dir():
        raise argparse.ArgumentTypeError(f"must be a file path, got {text!r}")
    if not p.parent.exists():
        raise argparse.ArgumentTypeError(f"the folder {p.parent} does not exist")
    return text
