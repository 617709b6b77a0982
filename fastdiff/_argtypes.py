"""Argument checks shared by the ``fastdiff`` sub-commands and the Python entry points (``fastdiff.generate``,
``load_pipeline``, ``txt2img`` / ``img2img`` / ``inpaint``): each rule lives once. On the command line the
argparse types below check a value when the command line is parsed; in Python the ``check_*`` functions raise
:class:`InvalidArgument`. Either way bad input stops before any model loads or file is written, with one line
naming the argument and what it allows."""
from __future__ import annotations

import argparse
import math
import numbers
from pathlib import Path
from typing import Callable, Iterable

__all__ = ["OneLineParser", "InvalidArgument", "check_int", "check_number", "check_choice", "check_type",
           "int_at_least", "float_in", "existing_path", "multiple_of", "output_file", "device_name", "lora_spec",
           "QUANTIZE_MODES", "check_quantize", "quantize_mode"]

# What ``pipe.quantize(mode)``, ``fastdiff.generate(quantize=mode)`` and ``--quantize`` accept.
QUANTIZE_MODES = ("int8",)


class InvalidArgument(ValueError, TypeError):
    """A bad argument of a Python entry point: a wrong value or a wrong type (catch either ValueError or
    TypeError). ``argument`` is its name; the message is one line, ``"<argument>: <what is allowed>"``."""

    def __init__(self, argument: str, message: str) -> None:
        self.argument = argument
        super().__init__(f"{argument}: {message}")


# The rules: each returns None when ``v`` is allowed, else what is allowed and what came ("must be ..., got ...").

def _int_rule(v, low: int) -> str | None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
        return f"must be an integer >= {low}, got {v!r}"
    return None


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    return ("(" if low_open else "[") + f"{low:g}, {high:g}" + (")" if high_open or high == math.inf else "]")


def _number_rule(v, low: float, high: float, low_open: bool, high_open: bool) -> str | None:
    ok = (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
          and (v > low if low_open else v >= low) and (v < high if high_open else v <= high))
    return None if ok else f"must be a number in {_interval(low, high, low_open, high_open)}, got {v!r}"


def _multiple_rule(v, step: int, low: int) -> str | None:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low or v % step:
        return f"must be a multiple of {step} >= {low}, got {v!r}"
    return None


def _quantize_rule(v) -> str | None:
    if isinstance(v, str) and v in QUANTIZE_MODES:
        return None
    return f"must be one of {', '.join(QUANTIZE_MODES)}, got {v!r}"


def check_int(name: str, v, low: int) -> int:
    """``v`` if it is an integer >= ``low``, else :class:`InvalidArgument` naming ``name``."""
    problem = _int_rule(v, low)
    if problem:
        raise InvalidArgument(name, problem)
    return int(v)


def check_number(name: str, v, low: float, high: float = math.inf, *, low_open: bool = False,
                 high_open: bool = False) -> float:
    """``float(v)`` if it is a finite number in the interval, else :class:`InvalidArgument` naming ``name``."""
    problem = _number_rule(v, low, high, low_open, high_open)
    if problem:
        raise InvalidArgument(name, problem)
    return float(v)


def check_multiple(name: str, v, step: int, low: int) -> int:
    problem = _multiple_rule(v, step, low)
    if problem:
        raise InvalidArgument(name, problem)
    return int(v)


def check_choice(name: str, v, choices: Iterable[str], where: str = "") -> str:
    """``v`` if it is one of ``choices``; the error lists them (``where`` says whose choices they are)."""
    choices = list(choices)
    if not isinstance(v, str) or v not in choices:
        raise InvalidArgument(name, f"unknown {name} {v!r}{' ' + where if where else ''}; choose one of "
                                    f"{', '.join(choices)}")
    return v


def check_quantize(name: str, v) -> str:
    """``v`` if it is a quantisation mode (:data:`QUANTIZE_MODES`), else :class:`InvalidArgument` naming ``name``."""
    problem = _quantize_rule(v)
    if problem:
        raise InvalidArgument(name, problem)
    return v


def check_type(name: str, v, cls: type | tuple, what: str):
    """``v`` if it is None or an instance of ``cls`` (``what`` names it in the error)."""
    if v is not None and not isinstance(v, cls):
        raise InvalidArgument(name, f"must be {what} or None, got {type(v).__name__}")
    return v


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (``prog: error: argument --n: ...``), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def _named(fn: Callable, name: str) -> Callable:
    fn.__name__ = name  # argparse names the type in its message ("invalid <name> value")
    return fn


def _parsed(text: str, convert: Callable, rule: Callable):
    """``convert(text)`` checked by ``rule``; text that does not convert is reported as the rule reports a
    value of the wrong type."""
    try:
        v = convert(text)
    except ValueError:
        v = text
    problem = rule(v)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return v


def int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        return _parsed(text, int, lambda v: _int_rule(v, low))

    return _named(parse, f"int >= {low}")


def float_in(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False):
    def parse(text: str) -> float:
        return _parsed(text, float, lambda v: _number_rule(v, low, high, low_open, high_open))

    return _named(parse, "number")


def multiple_of(step: int, low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        return _parsed(text, int, lambda v: _multiple_rule(v, step, low))

    return _named(parse, f"multiple of {step}")


def quantize_mode(text: str) -> str:
    """argparse type of ``--quantize``: one of :data:`QUANTIZE_MODES`."""
    return _parsed(text, str, _quantize_rule)


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


def device_name(text: str) -> str:
    """argparse type of ``--device``: ``cpu``, ``cuda`` or ``cuda:N`` naming a device this machine has."""
    import torch

    kind, _, index = text.partition(":")
    if kind == "cpu" and not index:
        return text
    if kind == "cuda" and (not index or index.isdigit()):
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} needs a CUDA device and this machine has none (use cpu)")
        n = torch.cuda.device_count()
        if index and int(index) >= n:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has CUDA devices 0..{n - 1}")
        return text
    raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {text!r}")


def lora_spec(text: str) -> tuple[str, float]:
    """argparse type of ``--lora FILE[:SCALE]``: an existing LoRA file and its scale (default 1.0)."""
    path, sep, scale = text.rpartition(":")
    if not sep or not path:
        path, scale = text, "1.0"
    try:
        s = float(scale)
    except ValueError:
        path, s = text, 1.0  # a ':' inside the path, no scale
    if not math.isfinite(s):
        raise argparse.ArgumentTypeError(f"the scale must be a finite number, got {scale!r}")
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"file does not exist: {path}")
    return path, s
