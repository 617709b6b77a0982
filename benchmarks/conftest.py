"""Shared benchmark helpers: fastdiff vs the baseline it replaces (eager PyTorch, torch SDPA, diffusers), timed in
the same run, and the one summary table the run ends with.

Run: ``pytest benchmarks/ --benchmark-only`` (add ``-s`` to see progress). The default run keeps the full-size SD1
and SD3 models at a reduced size (smaller images, fewer steps and blocks, one timed round) so that it finishes in
minutes; ``--full-size`` runs them at their real size (512x512 UNet step and VAE decode, the 20-step txt2img, the
24-block MMDiT: tens of minutes on a 2-core CPU).

Each micro-benchmark calls ``compare(...)``: both sides are warmed up and timed interleaved (median of several
rounds, so a burst of load from another process hits both), the fastdiff side is also handed to pytest-benchmark
for its statistics, and a row goes into the summary printed at the end of the session: op or model, shape, dtype,
baseline, both times, ratio (baseline time / fastdiff time), GB/s and % of the machine's copy bandwidth for
memory-bound ops, TFLOP/s for compute-bound ones, and the peak memory each side allocated during one call.

Peak memory: for the ops, the peak of the bytes torch's CPU allocator had handed out during one call, above what
was allocated before it (torch.profiler's allocation events; memory a library allocates by itself, such as
oneDNN's scratchpads, is not seen). For the models (SD1, SD3), the peak of the bytes in use by malloc while the
call ran, sampled every 5 ms. Both are CPU stand-ins for ``torch.cuda.max_memory_allocated``.

Benchmark trap: fresh large allocations page-fault (~2.3 us a page on a 2-core x86 VM), which
makes any op that allocates its output look several times slower. The malloc thresholds are raised below so
freed blocks are reused instead of returned to the kernel, for both sides alike.
"""
from __future__ import annotations

import ctypes
import os
import statistics
import threading
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
# Two threads at most: the numbers in the README are for a 2-core CPU, and every module runs with the same count.
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

_ROWS: list[dict] = []
FULL_SIZE = False  # set from --full-size in pytest_configure, before the benchmark modules are imported


def pytest_addoption(parser):
    parser.addoption("--full-size", action="store_true", default=False,
                     help="fastdiff benchmarks: run the SD1/SD3 model benchmarks at full size (512x512 UNet step and "
                          "VAE decode, 20-step txt2img, 24-block MMDiT; tens of minutes) instead of the reduced "
                          "default")


def pytest_configure(config):
    global FULL_SIZE
    FULL_SIZE = bool(config.getoption("--full-size", default=False))


# ------------------------------------------------------------------------------------------------ timing
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


def time_pair(fast, eager, *, rounds: int = 7, min_time: float = 0.02, warmup: int = 3,
              first: tuple[float, float] | None = None) -> tuple[float, float]:
    """Median seconds of ``fast`` and ``eager``, timed interleaved round by round.

    The first call of each side (or ``first``: the seconds of a first call the caller made) sizes the run: when
    the slower side takes over 1 s a call the run is that warm-up plus one timed round, over 0.1 s three rounds
    (seconds-long calls, such as torch's native bf16 convolutions on a CPU without bf16 dot products, would
    otherwise take minutes per case)."""
    if first is None:
        first = (time_once(fast), time_once(eager))
    slowest = max(first)
    if slowest > 1.0:
        rounds, warmup, min_time = 1, 0, 0.0
    elif slowest > 0.1:
        rounds, warmup, min_time = min(rounds, 3), 0, 0.0
    for _ in range(max(0, warmup - 1)):
        fast()
        eager()
    tf, te = [], []
    for _ in range(rounds):
        tf.append(timeit(fast, rounds=1, min_time=min_time) if min_time else time_once(fast))
        te.append(timeit(eager, rounds=1, min_time=min_time) if min_time else time_once(eager))
    return statistics.median(tf), statistics.median(te)


def time_once(fn) -> float:
    """Seconds of one call of ``fn``."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def nbytes(*tensors) -> int:
    """Bytes a memory-bound op must move: every input read once and every output written once."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# ------------------------------------------------------------------------------------------------ memory
def alloc_peak_mb(fn) -> tuple[float, float]:
    """(peak MB torch's CPU allocator handed out during one call of ``fn`` above what was allocated before it,
    seconds of that call: an upper bound of its time, the profiler adds its own cost)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t0 = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t0
    # Each event carries the bytes it allocated itself (frees are negative "[memory]" events): in time order, the
    # running sum's maximum is the peak.
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    cur = peak = 0
    for _, b in events:
        cur += b
        peak = max(peak, cur)
    return peak / 2**20, seconds


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]


try:
    _libc = ctypes.CDLL("libc.so.6")
    _libc.mallinfo2.restype = _Mallinfo2
except (OSError, AttributeError):  # not glibc >= 2.33: no memory column for the models
    _libc = None


def in_use() -> int:
    """Bytes malloc has handed out and not taken back (heap + mmapped chunks): torch's CPU tensors live there."""
    m = _libc.mallinfo2()
    return m.uordblks + m.hblkhd


def peak_memory_increase(fn) -> float:
    """Peak of the bytes in use by malloc while ``fn()`` ran, above what was in use before (sampled every 5 ms),
    in MB; NaN without glibc. For calls of a second or more (the models); ops use :func:`alloc_peak_mb`."""
    if _libc is None:
        return float("nan")
    base, peak, done = in_use(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], in_use())
            time.sleep(0.005)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return (max(peak[0], in_use()) - base) / 2**20


# ------------------------------------------------------------------------------------------------ rows
_DTYPE_WORDS = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16",
                "float16": "fp16"}


def _split_dtype(case: str) -> tuple[str, str]:
    """('shape text without the dtype word', 'fp32' | 'bf16' | ...) from a case label; fp32 when it names none."""
    words = case.split()
    found = [w for w in words if w in _DTYPE_WORDS]
    if not found:
        return case, "fp32"
    return " ".join(w for w in words if w not in _DTYPE_WORDS), _DTYPE_WORDS[found[0]]


def add_row(name: str, case: str, fast: float, base: float, *, baseline: str | None = None, dtype: str | None = None,
            gbs: float | None = None, pct_copy: float | None = None, tflops: float | None = None,
            peak_mb: float | None = None, peak_mb_base: float | None = None) -> dict:
    """Record one line of the summary table (times in seconds; ratio = base / fast)."""
    shape, dt = _split_dtype(case)
    if baseline is None:
        name, _, baseline = name.partition(" vs ")
        baseline = baseline or "eager"
    row = dict(name=name, case=shape, dtype=dtype or dt, baseline=baseline, fast=fast, eager=base, gbs=gbs,
               pct_copy=pct_copy, tflops=tflops, peak_mb=peak_mb, peak_mb_base=peak_mb_base)
    _ROWS.append(row)
    return row


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the benchmarks of a module (``pytestmark = pytest.mark.usefixtures("one_thread")``),
    as the bundled model trains; the count is restored after the module, so the other benchmarks keep two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    """The machine's copy bandwidth in GB/s (read + write of a 256 MB fp32 tensor): the memory ceiling."""
    src = torch.randn(64 * 1024 * 1024)
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), rounds=5, min_time=0.1)
    gbs = 2 * src.numel() * 4 / t / 1e9
    add_row("copy (memory ceiling)", "256 MB fp32", t, float("nan"), baseline="-", gbs=gbs, pct_copy=100.0)
    return gbs


@pytest.fixture(scope="session")
def matmul_peak() -> float:
    """The machine's measured fp32 compute ceiling in GFLOP/s: torch.matmul of two 2048x2048 fp32 matrices."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    c = torch.empty(2048, 2048)
    t = timeit(lambda: torch.matmul(a, b, out=c), rounds=5, min_time=0.2)
    gflops = 2 * 2048**3 / t / 1e9
    add_row("matmul (compute ceiling)", "2048x2048x2048 fp32", t, float("nan"), baseline="-", tflops=gflops / 1e3)
    return gflops


@pytest.fixture
def compare(benchmark, copy_bandwidth):
    """``compare(name, case, fast, eager, bytes_moved=None, flops=None, *, rounds=7, min_time=0.02, warmup=3)``
    -> ratio eager/fast, recorded for the summary. ``name`` may end in ``" vs <baseline>"`` (default: eager)."""

    def run(name: str, case: str, fast, eager, bytes_moved: int | None = None, flops: float | None = None, *,
            rounds: int = 7, min_time: float = 0.02, warmup: int = 3):
        # the first call of each side is the warm-up, under the allocation profiler for the peak memory
        (peak, t_fast), (peak_base, t_eager) = alloc_peak_mb(fast), alloc_peak_mb(eager)
        tf, te = time_pair(fast, eager, rounds=rounds, min_time=min_time, warmup=warmup, first=(t_fast, t_eager))
        gbs = bytes_moved / tf / 1e9 if bytes_moved else None
        row = add_row(name, case, tf, te, gbs=gbs, pct_copy=100 * gbs / copy_bandwidth if gbs else None,
                      tflops=flops / tf / 1e12 if flops else None, peak_mb=peak, peak_mb_base=peak_base)
        benchmark.extra_info.update({k: v for k, v in row.items() if k != "name" and v is not None})
        benchmark.extra_info["ratio_vs_baseline"] = te / tf
        benchmark.group = name
        if tf > 0.05:  # the interleaved timings above are the measurement; no more seconds-long calls
            benchmark.pedantic(lambda: None, rounds=1, iterations=1)
        else:
            benchmark.pedantic(fast, rounds=5, iterations=max(1, int(0.01 / max(tf, 1e-7))), warmup_rounds=1)
        return te / tf

    return run


# ------------------------------------------------------------------------------------------------ summary
def _fmt_time(s: float) -> str:
    if s != s:
        return "-"
    return f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.2f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} us"


def _num(v, fmt) -> str:
    return "-" if v is None or v != v else format(v, fmt)


def _machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        from fastdiff import _ext

        isa = _ext.cpu_capability() if _ext.has_cpu_kernels() else "no fastdiff._C"
    except Exception as e:  # noqa: BLE001  (the summary must print whatever the extension does)
        isa = f"unknown ({e})"
    return f"{model}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads, fastdiff ISA {isa}"


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables: the run ends with this one
def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    w = terminalreporter
    w.section("fastdiff vs baseline (same run; ratio = baseline time / fastdiff time)")
    w.line(f"machine: {_machine()}; {'full-size' if FULL_SIZE else 'reduced-size (default)'} model benchmarks")
    head = ["op or model", "shape", "dtype", "baseline", "baseline time", "fastdiff time", "ratio", "GB/s",
            "% copy", "TFLOP/s", "peak MB fastdiff / baseline"]
    lines = []
    for r in _ROWS:
        ratio = r["eager"] / r["fast"] if r["eager"] == r["eager"] else float("nan")
        peak = "-" if r.get("peak_mb") is None else f"{r['peak_mb']:.1f} / {_num(r.get('peak_mb_base'), '.1f')}"
        lines.append([r["name"], r["case"], r["dtype"], r["baseline"], _fmt_time(r["eager"]), _fmt_time(r["fast"]),
                      _num(ratio, ".2f"), _num(r.get("gbs"), ".1f"), _num(r.get("pct_copy"), ".0f"),
                      _num(r.get("tflops"), ".3f"), peak])
    widths = [max(len(str(x[i])) for x in [head] + lines) for i in range(len(head))]
    fmt = lambda cells: "| " + " | ".join(str(c).ljust(wd) for c, wd in zip(cells, widths)) + " |"  # noqa: E731
    w.line(fmt(head))
    w.line("|" + "|".join("-" * (wd + 2) for wd in widths) + "|")
    for cells in lines:
        w.line(fmt(cells))
