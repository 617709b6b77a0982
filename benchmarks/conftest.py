"""Shared benchmark helpers: fastdiff op vs the eager PyTorch sequence it replaces, timed in the same run.

Run: ``pytest benchmarks/ --benchmark-only`` (add ``-s`` to see progress). Each benchmark calls
``compare(...)``: both sides are warmed up and timed interleaved (median of several rounds, so a burst of load
from another process hits both), the fastdiff side is also handed to pytest-benchmark for its statistics, and a
summary table (time, GB/s, ratio, % of the machine's copy bandwidth) is printed at the end of the session.

Benchmark trap: fresh large allocations page-fault at ~2.3 us a page, which
makes any op that allocates its output look several times slower. The malloc thresholds are raised below so
freed blocks are reused instead of returned to the kernel, for both sides alike.
"""
from __future__ import annotations

import ctypes
import statistics
import time

import pytest
import torch


def _tune_malloc() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, (1 << 31) - 1)
    except OSError:  # not glibc: nothing to tune
        pass


_tune_malloc()
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

_ROWS: list[dict] = []


def timeit(fn, *, rounds: int = 7, min_time: float = 0.02) -> float:
    """Median seconds per call of ``fn`` over ``rounds`` rounds of at least ``min_time`` seconds each."""
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    reps = max(1, int(min_time / one))
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        out.append((time.perf_counter() - t0) / reps)
    return statistics.median(out)


def time_pair(fast, eager, *, rounds: int = 7, min_time: float = 0.02) -> tuple[float, float]:
    """Median seconds of ``fast`` and ``eager``, timed interleaved round by round."""
    for _ in range(3):
        fast()
        eager()
    tf, te = [], []
    for _ in range(rounds):
        tf.append(timeit(fast, rounds=1, min_time=min_time))
        te.append(timeit(eager, rounds=1, min_time=min_time))
    return statistics.median(tf), statistics.median(te)


def nbytes(*tensors) -> int:
    """Bytes a memory-bound op must move: every input read once and every output written once."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    """The machine's copy bandwidth in GB/s (read + write of a 256 MB fp32 tensor): the memory ceiling."""
    src = torch.randn(64 * 1024 * 1024)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), rounds=5, min_time=0.1)
    gbs = 2 * src.numel() * 4 / t / 1e9
    _ROWS.append(dict(name="copy (memory ceiling)", case="fp32 256 MB", fast=t, eager=float("nan"), gbs=gbs))
    return gbs


@pytest.fixture
def compare(benchmark, copy_bandwidth):
    """``compare(name, case, fast, eager, bytes_moved)`` -> ratio eager/fast, recorded for the summary."""

    def run(name: str, case: str, fast, eager, bytes_moved: int | None = None, flops: float | None = None):
        tf, te = time_pair(fast, eager)
        row = dict(name=name, case=case, fast=tf, eager=te)
        if bytes_moved:
            row["gbs"] = bytes_moved / tf / 1e9
            row["pct_copy"] = 100 * row["gbs"] / copy_bandwidth
        if flops:
            row["tflops"] = flops / tf / 1e12
        _ROWS.append(row)
        benchmark.extra_info.update({k: v for k, v in row.items() if k not in ("name",)})
        benchmark.extra_info["ratio_vs_eager"] = te / tf
        benchmark.group = name
        benchmark.pedantic(fast, rounds=5, iterations=max(1, int(0.01 / max(tf, 1e-7))), warmup_rounds=1)
        return te / tf

    return run


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    w = terminalreporter
    w.section("fastdiff vs eager PyTorch (same run; ratio = eager time / fastdiff time)")
    w.line(f"{'op':34s} {'case':34s} {'eager us':>10s} {'fastdiff us':>12s} {'ratio':>7s} {'GB/s':>7s} "
           f"{'% copy':>7s} {'TFLOP/s':>8s}")
    for r in _ROWS:
        ratio = r["eager"] / r["fast"] if r["eager"] == r["eager"] else float("nan")
        w.line(f"{r['name']:34s} {r['case']:34s} {r['eager'] * 1e6:10.1f} {r['fast'] * 1e6:12.1f} {ratio:7.2f} "
               f"{r.get('gbs', float('nan')):7.1f} {r.get('pct_copy', float('nan')):7.1f} "
               f"{r.get('tflops', float('nan')):8.3f}")
