"""One dispatch registry for every fused op.

Each op (``group_norm``, ``attention``, ...) owns an :class:`Op`. Each backend that can run it registers an
implementation together with a ``reasons(*args, **kwargs) -> list[str]`` function that says why it cannot
run a given input (an empty list means it can). Backends themselves can be unavailable as a whole (the
compiled extension did not import, triton is missing, no CUDA device): those reasons come first.

Choice:
- automatic: the first backend in :data:`PRIORITY` with no reasons, skipping a backend whose ``slower``
  function says it loses to the next one on this input (measured: e.g. eager F.linear beats the oneDNN path on
  tiny matmuls, where per-call overhead dominates);
- forced (``with use_backend(name):``, or the ``backend`` setting: ``FASTDIFF_BACKEND=name``, see
  :mod:`fastdiff.settings`): that backend or an error listing every reason it cannot run the input. ``ref``
  runs everything, always.

Which backend loses where on which CPU is the routing table's business (:mod:`fastdiff.ops.routing`); the
``slower`` hooks of conv/linear ask it.

Cost per call: the whole-backend checks (an import probe, a CUDA query) are machine facts, so their results
are cached, keyed on the settings they read (``triton_interpret``); ``refresh_backends()``
drops the cache (e.g. after installing a package in a running process). An implementation that does not
use what its backend's whole check guards (the cpu attention is torch's SDPA and needs no fastdiff._C)
registers with ``needs_backend=False`` and is judged on its own reasons only, or on a whole check of its own
(``check=``, cached the same way: torch's SDPA on CUDA needs a GPU, not fastdiff._C).
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

from fastdiff import settings

__all__ = [
    "PRIORITY",
    "BackendUnavailable",
    "Op",
    "all_ops",
    "backend_reasons",
    "current_backend",
    "refresh_backends",
    "register_backend_check",
    "use_backend",
]

# Fastest first. ``ref`` is pure PyTorch and is always last: it is the oracle and the fallback.
PRIORITY: tuple[str, ...] = settings.BACKENDS

_state = threading.local()
_backend_checks: dict[str, Callable[[], list[str]]] = {}
_backend_cache: dict[tuple, tuple[str, ...]] = {}
_ops: dict[str, "Op"] = {}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run this input; the message lists every reason."""


def register_backend_check(name: str, check: Callable[[], list[str]]) -> None:
    """Register a whole-backend availability check (e.g. 'fastdiff._C did not import: ...')."""
    if name not in PRIORITY:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(PRIORITY)}")
    _backend_checks[name] = check
    refresh_backends()


def refresh_backends() -> None:
    """Forget the cached whole-backend checks (they are re-run on the next call)."""
    _backend_cache.clear()


def _env_token() -> tuple:
    # The settings the whole-backend checks read: part of the cache key, so changing one takes effect.
    return (settings.current().triton_interpret,)


def _whole_reasons(name: str, token: tuple) -> tuple[str, ...]:
    hit = _backend_cache.get((name, token))
    if hit is None:
        check = _backend_checks.get(name)
        hit = _backend_cache[(name, token)] = tuple(check()) if check is not None else ()
    return hit


def backend_reasons(name: str) -> list[str]:
    """Reasons the backend as a whole is unavailable on this machine (empty list: available)."""
    return list(_whole_reasons(name, _env_token()))


def _validate_backend(name: str) -> str:
    if name not in PRIORITY:
        raise ValueError(f"unknown backend {name!r}; choose one of: {', '.join(PRIORITY)}")
    return name


def current_backend() -> str | None:
    """The forced backend, if any: the innermost ``use_backend`` or else the ``backend`` setting
    (``FASTDIFF_BACKEND``)."""
    stack = getattr(_state, "stack", None)
    if stack:
        return stack[-1]
    return settings.current().backend


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force one backend for every op called inside the block (``None`` or ``"auto"``: automatic)."""
    if name == "auto":
        name = None
    if name is not None:
        _validate_backend(name)
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


@dataclass
class _Impl:
    fn: Callable
    reasons: Callable[..., list[str]]
    needs_backend: bool = True  # False: the whole-backend check does not apply (see the module doc)
    slower: Callable[..., str | None] | None = None  # why automatic choice skips it for this input (None: it wins)
    check: Callable[[], list[str]] | None = None  # with needs_backend=False: a whole check of its own


def _impl_whole(impl: _Impl, backend: str, token: tuple) -> tuple[str, ...]:
    """The whole-machine reasons that apply to one implementation (cached like the backend checks)."""
    if impl.needs_backend:
        return _whole_reasons(backend, token)
    if impl.check is None:
        return ()
    key = ("impl", id(impl), token)
    hit = _backend_cache.get(key)
    if hit is None:
        hit = _backend_cache[key] = tuple(impl.check())
    return hit


@dataclass
class Op:
    """One op and its implementations, keyed by backend name."""

    name: str
    impls: dict[str, _Impl] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name in _ops:
            raise ValueError(f"op {self.name!r} is registered twice")
        _ops[self.name] = self

    def register(self, backend: str, reasons: Callable[..., list[str]] | None = None, *,
                 needs_backend: bool = True, slower: Callable[..., str | None] | None = None,
                 check: Callable[[], list[str]] | None = None):
        """Decorator: ``@op.register("cpu", reasons=_cpu_reasons)`` on the implementation.

        ``needs_backend=False``: the implementation does not use what the backend's whole check guards
        (e.g. a cpu implementation on torch's own oneDNN/SDPA needs no fastdiff._C); ``check() -> list[str]``
        then says why it cannot run on this machine at all, if it can fail (torch's SDPA on CUDA: no GPU).
        ``slower(*args) -> str | None``: the backend CAN run the input but was measured to lose to the next
        backend on it; automatic choice then skips it (a forced backend still runs). Return the reason.
        """
        _validate_backend(backend)

        def deco(fn: Callable) -> Callable:
            self.impls[backend] = _Impl(fn, reasons or (lambda *a, **k: []), needs_backend, slower, check)
            return fn

        return deco

    def reasons(self, backend: str, *args, **kwargs) -> list[str]:
        """Every reason ``backend`` cannot run these arguments (empty: it can)."""
        impl = self.impls.get(backend)
        if impl is None:
            return [f"{self.name} has no {backend!r} implementation"]
        out = _impl_whole(impl, backend, _env_token())
        if out:
            return list(out)
        return list(impl.reasons(*args, **kwargs))

    def select(self, *args, **kwargs) -> str:
        """Name of the backend that will run these arguments."""
        forced = current_backend()
        if forced is not None:
            why = self.reasons(forced, *args, **kwargs)
            if why:
                raise BackendUnavailable(
                    f"backend {forced!r} was requested for {self.name} but cannot run this input:\n  - "
                    + "\n  - ".join(why)
                    + "\nUse fastdiff.ops.use_backend(None) (or unset FASTDIFF_BACKEND) for automatic choice."
                )
            return forced
        token = _env_token()  # the same as self.reasons, with the settings read once per call
        for name in PRIORITY:
            impl = self.impls.get(name)
            if impl is None or _impl_whole(impl, name, token):
                continue
            if not impl.reasons(*args, **kwargs) and (impl.slower is None or impl.slower(*args, **kwargs) is None):
                return name
        raise RuntimeError(f"no backend can run {self.name} for this input")  # unreachable: ref runs all

    def __call__(self, *args, **kwargs):
        return self.impls[self.select(*args, **kwargs)].fn(*args, **kwargs)

    def availability(self) -> dict[str, list[str]]:
        """backend -> reasons it cannot run this op on this machine at all (no input needed)."""
        def why(b: str) -> list[str]:
            impl = self.impls.get(b)
            if impl is None:
                return [f"no {b!r} implementation"]
            return list(_impl_whole(impl, b, _env_token()))

        return {b: why(b) for b in PRIORITY}

    def table(self, *args, **kwargs) -> dict[str, list[str]]:
        """backend -> reasons, for every backend in PRIORITY (used by ``fastdiff info`` and tests)."""
        return {b: self.reasons(b, *args, **kwargs) for b in PRIORITY}

    def why_skipped(self, backend: str, *args, **kwargs) -> str | None:
        """Why automatic choice passes over a backend that can run these arguments (None: it does not)."""
        impl = self.impls.get(backend)
        return impl.slower(*args, **kwargs) if impl is not None and impl.slower is not None else None


def all_ops() -> dict[str, Op]:
    """Every registered op by name (import :mod:`fastdiff.ops` first so that all are registered)."""
    return dict(_ops)
