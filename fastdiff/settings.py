"""Every run-time setting of fastdiff in one object, read once from the environment.

===========================  =====================  ==========================================================
environment variable         field                  meaning
===========================  =====================  ==========================================================
``FASTDIFF_BACKEND``         ``backend``            force one backend for every op (``ref``, ``cpu``, ...;
                                                    ``auto`` or unset: automatic choice)
``FASTDIFF_CPU_ISA``         ``cpu_isa``            lower the instruction set of the C++ CPU kernels and of
                                                    the CPU routing (``scalar``, ``avx2``, ``avx512``,
                                                    ``avx512_bf16``); more than the CPU has is an error
``FASTDIFF_CPU_ROUTE``       ``cpu_route``          take another CPU kind's row of the routing table
                                                    (:mod:`fastdiff.ops.routing`), e.g. to measure it
``FASTDIFF_CPU_BF16_MATH``   ``cpu_bf16_math``      what oneDNN conv/linear and CPU attention compute bf16
                                                    inputs in: ``auto`` (the routing table), ``native``
                                                    (bf16) or ``fp32``
``FASTDIFF_CACHE``           ``cache_dir``          cache folder (eval features, ptxas reports); ``off``
                                                    disables caching; default ``~/.cache/fastdiff``
``FASTDIFF_CACHE_DIR``       ``cache_dir``          older name of ``FASTDIFF_CACHE`` (used when that is unset)
``FASTDIFF_FASHION_MNIST``   ``fashion_mnist``      Fashion-MNIST IDX folder of ``fastdiff eval``
``TRITON_INTERPRET``         ``triton_interpret``   ``1``: Triton kernels run on CPU tensors in triton's
                                                    interpreter (tests); triton itself reads it at import
===========================  =====================  ==========================================================

The environment is read the first time :func:`current` is called; a bad value raises :class:`SettingsError`
naming the variable and what it may be. :func:`reload` reads it again. Tests and tools change settings with
:func:`override`, a context manager, instead of touching ``os.environ`` or private state::

    with fastdiff.settings.override(cpu_isa="avx2", cpu_route="avx2"):
        ...

Settings are process-wide (the C++ kernels' instruction set is a process-wide choice). Modules that keep
state derived from a setting register a callback with :func:`on_change`; it runs when the settings are first
read and after every change.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

__all__ = [
    "BACKENDS",
    "BF16_MATH",
    "CPU_ROUTES",
    "ISA_LEVELS",
    "Settings",
    "SettingsError",
    "current",
    "from_environ",
    "on_change",
    "override",
    "reload",
]

# Kept here (not imported from the modules that use them) so that reading settings imports nothing heavy;
# fastdiff.ops.registry.PRIORITY and fastdiff.ops.routing.ROUTES are checked against these in the tests.
BACKENDS = ("flash_attn", "cuda", "triton", "cpu", "ref")
ISA_LEVELS = ("scalar", "avx2", "avx512", "avx512_bf16")
CPU_ROUTES = ("amx", "avx512_bf16_2x", "avx512_bf16", "avx512", "avx2", "scalar")
BF16_MATH = ("auto", "native", "fp32")

_DEFAULT_CACHE = Path.home() / ".cache" / "fastdiff"
_DEFAULT_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist package


class SettingsError(ValueError):
    """A setting (environment variable or override) has a value it may not have."""


@dataclass(frozen=True)
class Settings:
    """One snapshot of fastdiff's settings (see the module doc for the variables behind each field)."""

    backend: str | None = None          # None: automatic choice
    cpu_isa: str | None = None          # None: the best the CPU has
    cpu_route: str | None = None        # None: the row of this CPU's capabilities
    cpu_bf16_math: str = "auto"
    cache_dir: Path | None = _DEFAULT_CACHE  # None: caching off
    fashion_mnist: Path = _DEFAULT_FASHION_MNIST
    triton_interpret: bool = False

    def __post_init__(self) -> None:
        _check_choice("backend", self.backend, BACKENDS, "FASTDIFF_BACKEND")
        _check_choice("cpu_isa", self.cpu_isa, ISA_LEVELS, "FASTDIFF_CPU_ISA")
        _check_choice("cpu_route", self.cpu_route, CPU_ROUTES, "FASTDIFF_CPU_ROUTE")
        if self.cpu_bf16_math not in BF16_MATH:
            raise SettingsError(f"cpu_bf16_math (FASTDIFF_CPU_BF16_MATH) must be one of {', '.join(BF16_MATH)}; "
                                f"got {self.cpu_bf16_math!r}")
        if not isinstance(self.triton_interpret, bool):
            raise SettingsError(f"triton_interpret (TRITON_INTERPRET) must be a bool, got {self.triton_interpret!r}")
        if self.cache_dir is not None and not isinstance(self.cache_dir, Path):
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        if not isinstance(self.fashion_mnist, Path):
            object.__setattr__(self, "fashion_mnist", Path(self.fashion_mnist))


def _check_choice(field: str, value, allowed: tuple[str, ...], var: str) -> None:
    if value is not None and value not in allowed:
        raise SettingsError(f"{field} ({var}) must be one of {', '.join(allowed)} (or unset); got {value!r}")


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw in ("", "0", "false", "off", "no"):
        return False
    if raw in ("1", "true", "on", "yes"):
        return True
    raise SettingsError(f"{name} must be 1 or 0; got {env[name]!r}")


def _optional(env: Mapping[str, str], name: str, none_words: tuple[str, ...] = ()) -> str | None:
    raw = env.get(name, "").strip()
    return None if raw == "" or raw.lower() in none_words else raw


def from_environ(env: Mapping[str, str] | None = None) -> Settings:
    """Parse the settings from ``env`` (default ``os.environ``); pure, reads nothing else."""
    env = os.environ if env is None else env
    bf16 = (_optional(env, "FASTDIFF_CPU_BF16_MATH") or "auto").lower()
    bf16 = {"bf16": "native", "float32": "fp32"}.get(bf16, bf16)  # accepted spellings
    cache = _optional(env, "FASTDIFF_CACHE") or _optional(env, "FASTDIFF_CACHE_DIR")
    if cache is None:
        cache_dir: Path | None = _DEFAULT_CACHE
    elif cache.lower() in ("off", "0", "none"):
        cache_dir = None
    else:
        cache_dir = Path(cache).expanduser()
    return Settings(
        backend=_optional(env, "FASTDIFF_BACKEND", ("auto",)),
        cpu_isa=_optional(env, "FASTDIFF_CPU_ISA", ("auto",)),
        cpu_route=_optional(env, "FASTDIFF_CPU_ROUTE", ("auto",)),
        cpu_bf16_math=bf16,
        cache_dir=cache_dir,
        fashion_mnist=Path(_optional(env, "FASTDIFF_FASHION_MNIST") or _DEFAULT_FASHION_MNIST).expanduser(),
        triton_interpret=_flag(env, "TRITON_INTERPRET"),
    )


_lock = threading.RLock()
_current: Settings | None = None
_listeners: list[Callable[[Settings], None]] = []


def _install(new: Settings) -> None:
    """Make ``new`` current and tell the listeners; if one refuses (raises), the previous settings stay."""
    global _current
    with _lock:
        old = _current
        _current = new
        try:
            for fn in list(_listeners):
                fn(new)
        except BaseException:
            _current = old
            if old is not None:
                for fn in list(_listeners):
                    fn(old)
            raise


def current() -> Settings:
    """The settings in force (the environment, read on the first call, plus any active :func:`override`)."""
    s = _current
    if s is None:
        with _lock:
            if _current is None:
                _install(from_environ())
            s = _current
    return s


def reload() -> Settings:
    """Read the environment again (outside any :func:`override`)."""
    _install(from_environ())
    return _current


def on_change(fn: Callable[[Settings], None]) -> None:
    """Call ``fn(settings)`` now if the settings were already read, and after every later change."""
    with _lock:
        _listeners.append(fn)
        if _current is not None:
            fn(_current)


@contextlib.contextmanager
def override(**changes) -> Iterator[Settings]:
    """Change settings inside a ``with`` block (process-wide), e.g. ``override(cpu_isa="avx2")``.

    Field names are :class:`Settings`' fields; a value is checked like the environment variable's (an ISA the
    CPU lacks raises here, at the ``with``). The previous settings come back when the block ends.
    """
    unknown = set(changes) - {f.name for f in dataclasses.fields(Settings)}
    if unknown:
        raise TypeError(f"override: unknown setting(s) {', '.join(sorted(unknown))}; known: "
                        f"{', '.join(f.name for f in dataclasses.fields(Settings))}")
    with _lock:
        before = current()
        _install(dataclasses.replace(before, **changes))
    try:
        yield _current
    finally:
        _install(before)
