"""One command for a machine with a GPU: build if needed, run the CUDA tests, measure, write one JSON.

    python -m fastdiff.gpu_check                 # on a CUDA machine, from a clone of the repository
    python -m fastdiff.gpu_check --dry-run       # the whole measuring path on the CPU at tiny sizes

Steps, in order (each prints what it does):

1. Build: nothing when ``fastdiff._C`` holds CUDA kernels; else ``pip install -e . --no-build-isolation --no-deps``
   in the repository against the torch that is installed (torch >= 2.6), for this GPU's architecture only
   (``TORCH_CUDA_ARCH_LIST`` from the device unless set), then the check restarts itself. A failed build is
   recorded in the JSON ("build") and the check goes on without fastdiff's CUDA kernels.
2. Tests: the device cases of the op tests (``-k on_cuda``), tests/test_gpu_pipelines.py and
   tests/test_compile.py; the counts and the failing ids go into the JSON.
3. Measurements (CUDA events, median of repeated calls after a warm-up):
   - the device's peaks, measured here: copy bandwidth (a large ``copy_``) and the bf16 matmul rate;
   - every op (fastdiff's automatic choice) vs its eager baseline (the op's ``ref`` backend; torch SDPA for
     attention): ratio, GB/s of the minimum traffic (inputs read once, output written once) and its fraction of
     the measured copy bandwidth; TFLOP/s and the fraction of the matmul peak for attention;
   - the SD1.5 UNet guided step at 512x512 (batch 2) and the SD3-medium MMDiT guided step at 1024x1024 (batch 2),
     bf16 and fp16, fastdiff vs diffusers on the same random weights (skipped with a line without diffusers), with
     ``torch.cuda.max_memory_allocated`` of each side;
   - a sampling loop of the bundled pixel model (DDIM update through the fused sampler step, classifier-free
     guidance) captured in one CUDA graph vs the same loop eager, outputs compared.

Budget: ``--budget-s`` (default 420 s, a build not counted) is split between the steps: the tests get half
(``--tests-timeout-s``), the ops 30% of what is left, each measurement stops repeating when its share is spent,
and a pipeline case that does not fit the time left is skipped with a line. Without a CUDA device the check
exits with status 2 and the line "no CUDA device" (``--dry-run`` / ``--device cpu`` run the measuring code on the
CPU at tiny sizes instead: a test of the code, no figure from it means anything). The JSON is rewritten after
every step with ``"complete": false`` until the last, so a run stopped from outside still leaves what it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

__all__ = ["main", "MIN_TORCH"]

MIN_TORCH = (2, 6)   # the oldest torch the build supports (setup.py uses nothing newer)
REPO = Path(__file__).resolve().parent.parent
OP_TEST_FILES = ["attention", "conv", "geglu", "group_norm", "layer_norm", "linear", "modulate", "rms_norm",
                 "sampler_step", "timestep_embedding"]


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What is measured: the real sizes on a GPU, tiny ones for ``--dry-run``."""

    copy_mib: int = 1024
    matmul_n: int = 8192
    tokens: int = 4096            # SD1 64x64 latent tokens, SD3 1024x1024 image tokens
    sd1_unet: str = "sd15"        # a preset of fastdiff.models.unet_sd
    sd1_latent: int = 64          # 512x512 image
    sd3_mmdit: str = "sd3_medium"  # a preset of fastdiff.models.mmdit
    sd3_latent: int = 128         # 1024x1024 image
    text_tokens: int = 77
    sd3_text_tokens: int = 333    # 77 CLIP + 256 T5
    pixel_images: int = 40
    pixel_steps: int = 20
    time_s: float = 0.5           # target time per measured side
    min_iters: int = 3            # timed calls of each side at least
    pipeline_case_s: float = 30.0  # time a pipeline case needs (build, warm-up, timing): skipped when less is left
    dtypes: tuple = ("bfloat16", "float16")


# The CPU has no fast fp16: the dry run exercises the same code in bf16 alone.
TINY = Sizes(copy_mib=4, matmul_n=128, tokens=16, sd1_unet="tiny", sd1_latent=8, sd3_mmdit="tiny", sd3_latent=8,
             text_tokens=7, sd3_text_tokens=9, pixel_images=1, pixel_steps=2, time_s=0.0, min_iters=1,
             pipeline_case_s=0.0, dtypes=("bfloat16",))


# ---------------------------------------------------------------------------------------------------- timing

def _sync(dev) -> None:
    if dev.type == "cuda":
        import torch

        torch.cuda.synchronize(dev)


def _median_s(fn, dev, time_s: float, min_iters: int = 3, max_iters: int = 200) -> float:
    """Median seconds of ``fn()`` after one warm-up call (``min_iters`` calls at least, more while ``time_s``
    lasts); CUDA events on a GPU, perf_counter on the CPU."""
    import torch

    fn()
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    one = max(time.perf_counter() - t0, 1e-6)
    out = [one]
    n = max(min_iters, min(max_iters, int(time_s / one))) - 1
    for _ in range(n):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return statistics.median(out)


@contextlib.contextmanager
def _peak_memory(dev, box: dict, key: str):
    """``box[key]`` = torch.cuda.max_memory_allocated during the block, in MiB (None on the CPU)."""
    import torch

    if dev.type == "cuda":
        _sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    yield
    if dev.type == "cuda":
        _sync(dev)
        box[key] = torch.cuda.max_memory_allocated(dev) / 2 ** 20
    else:
        box[key] = None


# ------------------------------------------------------------------------------------------------- the steps

def _say(msg: str) -> None:
    print(msg, flush=True)


def _torch_version() -> tuple[int, int]:
    import torch

    m = re.match(r"(\d+)\.(\d+)", torch.__version__)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


_BUILT_ENV = "FASTDIFF_GPU_CHECK_BUILT_S"   # set for the restarted check: seconds the build took


def ensure_built(dev, argv: list[str]) -> dict:
    """Nothing if fastdiff._C holds CUDA kernels; else build in the repository and restart this check. A failed
    build is recorded and the check goes on without the CUDA kernels (the Triton kernels, the tests' verdicts on
    what is missing and the pipelines are still worth the GPU's time). Returns the JSON's "build" entry."""
    from fastdiff import _ext

    if os.environ.get(_BUILT_ENV):
        return {"built": True, "seconds": float(os.environ[_BUILT_ENV]), "cuda_kernels": _ext.has_cuda_kernels()}
    if dev.type != "cuda" or _ext.has_cuda_kernels():
        _say(f"build: fastdiff._C present ({'with' if _ext.has_cuda_kernels() else 'without'} CUDA kernels), "
             "nothing to build")
        return {"built": False, "cuda_kernels": _ext.has_cuda_kernels()}
    import torch

    if _torch_version() < MIN_TORCH:
        raise SystemExit(f"gpu_check: torch {torch.__version__} is older than {MIN_TORCH[0]}.{MIN_TORCH[1]}, the "
                         "oldest torch fastdiff builds against")
    if not (REPO / "setup.py").exists():
        raise SystemExit(f"gpu_check: fastdiff._C has no CUDA kernels and {REPO} is not a source checkout to build")
    env = dict(os.environ, FASTDIFF_BUILD_CUDA="1")
    if not env.get("TORCH_CUDA_ARCH_LIST"):
        major, minor = torch.cuda.get_device_capability(dev)
        env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    cmd = [sys.executable, "-m", "pip", "install", "-e", ".", "--no-build-isolation", "--no-deps"]
    _say(f"build: fastdiff._C has no CUDA kernels ({_ext.IMPORT_ERROR or 'built without them'}); running "
         f"TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']} FASTDIFF_BUILD_CUDA=1 {' '.join(cmd[2:])} in {REPO}")
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=REPO, env=env).returncode
    took = time.perf_counter() - t0
    if rc != 0:
        _say(f"build: FAILED (pip exit status {rc}, {took:.0f} s; its output is above); the check goes on without "
             "fastdiff's CUDA kernels")
        return {"built": False, "failed": f"pip exit status {rc}", "seconds": round(took, 1),
                "cuda_kernels": _ext.has_cuda_kernels()}
    _say(f"build: done in {took:.0f} s; restarting the check")
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "fastdiff.gpu_check", *argv, "--no-build"],
              dict(os.environ, **{_BUILT_ENV: f"{took:.1f}"}))


def run_tests(dry: bool, timeout_s: float, log: Path | None = None) -> dict:
    """The CUDA test cases, through pytest in a child process; counts and failing ids. ``log``: where pytest's
    whole output goes (the short tracebacks of the failures), also when the time runs out."""
    tests = REPO / "tests"
    if not tests.is_dir():
        _say("tests: no tests/ folder next to the package (not a source checkout): skipped")
        return {"skipped": "no tests/ folder"}
    if dry:   # the code path only: one file's device cases (skipped on the CPU)
        args = [str(tests / "test_geglu.py"), "-k", "on_cuda"]
    else:  # the op tests' device cases, every GPU pipeline test, every compile test
        files = [tests / f"test_{f}.py" for f in OP_TEST_FILES] + [tests / "test_gpu_pipelines.py",
                                                                    tests / "test_compile.py"]
        args = [str(f) for f in files] + ["-k", "on_cuda or test_gpu_pipelines or test_compile"]

    def keep(out, err) -> dict:
        if log is None:
            return {}
        text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
        log.write_text(text(out) + ("\n--- stderr ---\n" + text(err) if err else ""))
        _say(f"tests: pytest's output is in {log}")
        return {"log": str(log)}

    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=short", "-rfE",
               f"--junitxml={xml}", *args]
        _say("tests: " + " ".join(cmd[1:]))
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO, timeout=timeout_s, capture_output=True, text=True)
        except subprocess.TimeoutExpired as e:
            _say(f"tests: stopped after {timeout_s:.0f} s (--tests-timeout-s)")
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            return {"timed_out_s": timeout_s, "output_tail": out[-3000:]} | keep(e.stdout, e.stderr)
        tail = proc.stdout.strip().splitlines()[-1:] or [proc.stderr.strip()[-300:]]
        _say(f"tests: {tail[0]} ({time.perf_counter() - t0:.0f} s)")
        kept = keep(proc.stdout, proc.stderr)
        if not xml.exists():
            return {"error": proc.stderr[-2000:] or proc.stdout[-2000:]} | kept
        return _junit_counts(xml) | {"exit_status": proc.returncode,
                                     "seconds": round(time.perf_counter() - t0, 1)} | kept


def _junit_counts(path: Path) -> dict:
    out = {"passed": 0, "failed": 0, "skipped": 0, "failures": [], "skip_reasons": {}}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kids = {c.tag: c for c in case}
        if "failure" in kids or "error" in kids:
            out["failed"] += 1
            out["failures"].append(name)
        elif "skipped" in kids:
            out["skipped"] += 1
            why = (kids["skipped"].get("message") or "")[:120]
            out["skip_reasons"][why] = out["skip_reasons"].get(why, 0) + 1
        else:
            out["passed"] += 1
    return out


def measure_peaks(dev, sz: Sizes) -> dict:
    """Copy bandwidth and bf16 matmul rate of this device, measured."""
    import torch

    n = sz.copy_mib * 2 ** 20 // 4
    src = torch.empty(n, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    t = _median_s(lambda: dst.copy_(src), dev, sz.time_s, sz.min_iters)
    bw = 2 * src.numel() * 4 / t / 1e9
    m = sz.matmul_n
    a = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    tm = _median_s(lambda: a @ b, dev, sz.time_s, sz.min_iters)
    tflops = 2 * m ** 3 / tm / 1e12
    _say(f"peaks: copy {bw:.1f} GB/s ({sz.copy_mib} MiB copy_), bf16 matmul {tflops:.2f} TFLOP/s ({m}^3)")
    return {"copy_gbps": bw, "bf16_matmul_tflops": tflops}


def _op_cases(dev, sz: Sizes):
    """(name, dtype, fastdiff call, baseline call, bytes moved, flops, op and its arguments for select)."""
    import torch
    import torch.nn.functional as F

    import fastdiff.ops as ops
    from fastdiff.ops.registry import all_ops

    reg = all_ops()
    L = sz.tokens
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, dtype):
        return torch.randn(shape, generator=g, device=dev, dtype=torch.float32).to(dtype)

    def ref(fn):
        def call():
            with ops.use_backend("ref"):
                return fn()
        return call

    side = int(math.isqrt(L))
    for dt in (getattr(torch, d) for d in sz.dtypes):
        x = rnd(2, 320, side, side, dtype=dt)
        w, b = rnd(320, dtype=dt), rnd(320, dtype=dt)
        nbytes = 2 * x.numel() * x.element_size()
        for layout, xx in (("NCHW", x), ("channels_last", x.contiguous(memory_format=torch.channels_last))):
            fn = lambda xx=xx: ops.group_norm(xx, 32, w, b, 1e-5, silu=True)  # noqa: E731
            yield (f"group_norm+silu {tuple(x.shape)} {layout}", dt, fn, ref(fn), nbytes, None,
                   ("group_norm", (xx, 32, w, b, 1e-5), {"silu": True}))
        xg = rnd(2, L, 2560, dtype=dt)
        fn = lambda xg=xg: ops.geglu(xg)  # noqa: E731
        yield (f"geglu {tuple(xg.shape)}", dt, fn, ref(fn), xg.numel() * xg.element_size() * 3 // 2, None,
               ("geglu", (xg,), {}))
        xl = rnd(2, L, 320, dtype=dt)
        wl, bl = rnd(320, dtype=dt), rnd(320, dtype=dt)
        fn = lambda xl=xl: ops.layer_norm(xl, (320,), wl, bl, 1e-5)  # noqa: E731
        yield (f"layer_norm {tuple(xl.shape)}", dt, fn, ref(fn), 2 * xl.numel() * xl.element_size(), None,
               ("layer_norm", (xl, (320,), wl, bl, 1e-5), {}))
        xr = rnd(2, 24, L, 64, dtype=dt)
        wr = rnd(64, dtype=dt)
        fn = lambda xr=xr: ops.rms_norm(xr, (64,), wr, 1e-6)  # noqa: E731
        yield (f"rms_norm {tuple(xr.shape)}", dt, fn, ref(fn), 2 * xr.numel() * xr.element_size(), None,
               ("rms_norm", (xr, (64,), wr, 1e-6), {}))
        xm = rnd(2, L, 1536, dtype=dt)
        sh, sc = rnd(2, 1536, dtype=dt), rnd(2, 1536, dtype=dt)
        mb = 2 * xm.numel() * xm.element_size()
        fn = lambda xm=xm: ops.layer_norm_modulate(xm, sh, sc)  # noqa: E731
        yield (f"layer_norm_modulate {tuple(xm.shape)}", dt, fn, ref(fn), mb, None,
               ("layer_norm_modulate", (xm, sh, sc), {}))
        fn = lambda xm=xm: ops.modulate(xm, sh, sc)  # noqa: E731
        yield (f"modulate {tuple(xm.shape)}", dt, fn, ref(fn), mb, None, ("modulate", (xm, sh, sc), {}))
        ym = rnd(2, L, 1536, dtype=dt)
        fn = lambda xm=xm, ym=ym: ops.gate_residual(xm, sh, ym)  # noqa: E731
        yield (f"gate_residual {tuple(xm.shape)}", dt, fn, ref(fn), 3 * xm.numel() * xm.element_size(), None,
               ("gate_residual", (xm, sh, ym), {}))
        for shape in ((2, 4, side, side), (1, 16, 2 * side, 2 * side)):
            xs, mo, z = rnd(*shape, dtype=dt), rnd(2 * shape[0], *shape[1:], dtype=dt), rnd(*shape, dtype=dt)
            kw = dict(pred=(1.7, -1.3), guidance_scale=7.5)
            fn = lambda xs=xs, mo=mo, z=z, kw=kw: ops.sampler_step(xs, mo, 0.6, 0.45, 0.2, z, **kw)  # noqa: E731
            yield (f"sampler_step+cfg {tuple(xs.shape)}", dt, fn, ref(fn), 5 * xs.numel() * xs.element_size(),
                   None, ("sampler_step", (xs, mo, 0.6, 0.45, 0.2, z), kw))
        # attention: SD1 64x64 self (head dim 40), SD1 cross (77 keys), SD3 1024x1024 joint (head dim 64)
        for B, H, Lq, Lk, D in ((2, 8, L, L, 40), (2, 8, L, sz.text_tokens, 40), (2, 24, L + sz.sd3_text_tokens,
                                                                                 L + sz.sd3_text_tokens, 64)):
            q, k, v = rnd(B, H, Lq, D, dtype=dt), rnd(B, H, Lk, D, dtype=dt), rnd(B, H, Lk, D, dtype=dt)
            fn = lambda q=q, k=k, v=v: ops.attention(q, k, v)  # noqa: E731
            base = lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
            yield (f"attention B{B} H{H} Lq{Lq} Lk{Lk} D{D}", dt, fn, base,
                   (2 * q.numel() + 2 * k.numel()) * q.element_size(), 4 * B * H * Lq * Lk * D,
                   ("attention", (q, k, v, None, None), {}))
        xc = rnd(2, 320, side, side, dtype=dt)
        wc, bc, rc = rnd(320, 320, 3, 3, dtype=dt) * 0.02, rnd(320, dtype=dt), rnd(2, 320, side, side, dtype=dt)
        fn = lambda xc=xc, wc=wc, bc=bc, rc=rc: ops.conv2d(xc, wc, bc, padding=1, residual=rc)  # noqa: E731
        yield (f"conv2d 3x3+residual {tuple(xc.shape)}", dt, fn, ref(fn), 3 * xc.numel() * xc.element_size(),
               2 * xc.numel() * 320 * 9, ("conv2d", (xc, wc, bc, (1, 1), (1, 1), (1, 1), 1, rc, False, None), {}))
        xn, wn = rnd(2, L, 320, dtype=dt), rnd(1280, 320, dtype=dt) * 0.05
        fn = lambda xn=xn, wn=wn: ops.linear(xn, wn, None, activation="gelu")  # noqa: E731
        yield (f"linear+gelu {tuple(xn.shape)}x1280", dt, fn, ref(fn), (xn.numel() * 5) * xn.element_size(),
               2 * xn.numel() * 1280, ("linear", (xn, wn, None, "gelu", None, None), {}))
    t = torch.arange(2, device=dev, dtype=torch.float32) * 500
    fn = lambda: ops.timestep_embedding(t, 320, True, 0)  # noqa: E731
    yield ("timestep_embedding (2,) -> 320", torch.float32, fn, ref(fn), 2 * 320 * 4, None,
           ("timestep_embedding", (t, 320, True, 0, 1, 10000), {}))
    del reg


def measure_ops(dev, sz: Sizes, peaks: dict, deadline: float) -> list[dict]:
    import torch

    from fastdiff.ops.registry import all_ops

    reg = all_ops()
    rows = []
    with torch.inference_mode():
        for name, dt, fast, base, nbytes, flops, (op, args, kw) in _op_cases(dev, sz):
            if time.perf_counter() > deadline:
                _say(f"ops: time budget spent, stopped before {name}")
                break
            try:
                backend = reg[op].select(*args, **kw)
                tf = _median_s(fast, dev, sz.time_s, sz.min_iters)
                tb = _median_s(base, dev, sz.time_s, sz.min_iters)
            except Exception as e:  # a failing op is a finding: record it and go on
                rows.append({"op": name, "dtype": str(dt).replace("torch.", ""), "error": f"{type(e).__name__}: {e}"})
                _say(f"ops: {name} {dt}: ERROR {type(e).__name__}: {e}")
                continue
            row = {"op": name, "dtype": str(dt).replace("torch.", ""), "backend": backend, "fastdiff_ms": tf * 1e3,
                   "baseline_ms": tb * 1e3, "ratio": tb / tf, "gbps": nbytes / tf / 1e9,
                   "frac_copy_bw": nbytes / tf / 1e9 / peaks["copy_gbps"]}
            if flops:
                row["tflops"] = flops / tf / 1e12
                row["frac_matmul_peak"] = row["tflops"] / peaks["bf16_matmul_tflops"]
            rows.append(row)
    return rows


def _randomize_(model, seed: int, dev):
    """Every parameter re-drawn on the device: norm scales 1 + 0.2 N, the rest 0.5 / sqrt(fan_in) N."""
    import torch

    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            z = torch.randn(p.shape, generator=g, device=dev)
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * z)
            elif p.dim() == 1:
                p.copy_(0.1 * z)
            else:
                p.copy_(0.5 / math.sqrt(p[0].numel()) * z)
    return model.eval()


def _param_mib(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20 if model is not None else 0.0


def _pair_rows(what, dev, sz, build, dtypes, deadline, budget_each):
    """Time fastdiff vs diffusers for ``build(dtype) -> (ours, theirs, call_ours, call_theirs)`` (theirs None
    without diffusers). Peak memory of a side: torch.cuda.max_memory_allocated during its timed calls minus the
    other side's weights (both models stay resident so that their outputs can be compared)."""
    import torch

    rows = []
    for dt in dtypes:
        name = str(dt).replace("torch.", "")
        if time.perf_counter() + budget_each > deadline:
            _say(f"{what} {name}: skipped, not enough of the time budget left")
            rows.append({"case": what, "dtype": name, "skipped": "time budget"})
            continue
        ours, theirs, call_ours, call_theirs = build(dt)
        mem: dict = {}
        with torch.inference_mode():
            with _peak_memory(dev, mem, "fastdiff_peak_mib"):
                tf = _median_s(call_ours, dev, sz.time_s * 4, min(sz.min_iters, 2), max_iters=20)
            out_ours = call_ours().float()
            row = {"case": what, "dtype": name, "fastdiff_s": tf, "fastdiff_it_s": 1 / tf,
                   "weights_mib": _param_mib(ours)}
            if theirs is not None:
                with _peak_memory(dev, mem, "diffusers_peak_mib"):
                    tt = _median_s(call_theirs, dev, sz.time_s * 4, min(sz.min_iters, 2), max_iters=20)
                out_theirs = call_theirs().float()
                rel = ((out_ours - out_theirs).abs().max() / out_theirs.abs().max().clamp_min(1e-12)).item()
                row.update(diffusers_s=tt, diffusers_it_s=1 / tt, ratio=tt / tf, rel_diff_vs_diffusers=rel)
            if mem.get("fastdiff_peak_mib") is not None:
                row["fastdiff_peak_mib"] = mem["fastdiff_peak_mib"] - _param_mib(theirs)
                if "diffusers_peak_mib" in mem:
                    row["diffusers_peak_mib"] = mem["diffusers_peak_mib"] - _param_mib(ours)
        rows.append(row)
        _say(f"{what} {name}: fastdiff {tf * 1e3:.1f} ms" + (
            f", diffusers {row['diffusers_s'] * 1e3:.1f} ms, ratio {row['ratio']:.2f}, max rel. difference "
            f"{row['rel_diff_vs_diffusers']:.1e}" if "ratio" in row else " (diffusers absent)")
            + (f", peak {row['fastdiff_peak_mib']:.0f} MiB" if row.get("fastdiff_peak_mib") else ""))
        del ours, theirs, call_ours, call_theirs
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _diffusers():
    try:
        import diffusers
        return diffusers
    except ImportError:
        return None


def _model_pair(dev, dt, ours_cls, cfg, seed: int, theirs_cls):
    """fastdiff's model of ``cfg`` with random weights and, when ``theirs_cls`` (a diffusers class) is given, the
    diffusers model holding the same weights; both on ``dev`` in ``dt``."""
    import torch

    with torch.device(dev):
        ours = _randomize_(ours_cls(cfg), seed, dev).to(dt)
        theirs = None
        if theirs_cls:
            theirs = theirs_cls(**{k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"}).eval()
            theirs.load_state_dict(ours.state_dict(), strict=True)
            theirs.to(dt)
    return ours, theirs


def measure_sd1(dev, sz: Sizes, deadline: float, budget_each: float) -> list[dict]:
    import torch

    from fastdiff.models import unet_sd

    diffusers = _diffusers()
    if diffusers is None:
        _say("SD1 UNet: diffusers is not installed: fastdiff alone, no comparison")
    cfg = unet_sd.PRESETS[sz.sd1_unet]
    lat = sz.sd1_latent

    def build(dt):
        ours, theirs = _model_pair(dev, dt, unet_sd.UNetSD, cfg, 1,
                                   diffusers and diffusers.UNet2DConditionModel)
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(2, cfg.in_channels, lat, lat, generator=g, device=dev).to(dt)
        c = torch.randn(2, sz.text_tokens, cfg.cross_attention_dim, generator=g, device=dev).to(dt)
        t = torch.tensor([500.0, 500.0], device=dev)
        return (ours, theirs, lambda: ours(x, t, c),
                (lambda: theirs(x, t, c).sample) if theirs is not None else None)

    return _pair_rows(f"SD1 UNet guided step {8 * lat}x{8 * lat} (batch 2, {sz.sd1_unet})", dev, sz, build,
                      tuple(getattr(torch, d) for d in sz.dtypes), deadline, budget_each)


def measure_sd3(dev, sz: Sizes, deadline: float, budget_each: float) -> list[dict]:
    import torch

    from fastdiff.models import mmdit

    diffusers = _diffusers()
    if diffusers is None:
        _say("SD3 MMDiT: diffusers is not installed: fastdiff alone, no comparison")
    cfg = mmdit.PRESETS[sz.sd3_mmdit]
    lat = sz.sd3_latent

    def build(dt):
        ours, theirs = _model_pair(dev, dt, mmdit.MMDiT, cfg, 2,
                                   diffusers and diffusers.SD3Transformer2DModel)
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(2, cfg.in_channels, lat, lat, generator=g, device=dev).to(dt)
        ctx = torch.randn(2, sz.sd3_text_tokens, cfg.joint_attention_dim, generator=g, device=dev).to(dt)
        pooled = torch.randn(2, cfg.pooled_projection_dim, generator=g, device=dev).to(dt)
        t = torch.tensor([500.0, 500.0], device=dev)
        return (ours, theirs, lambda: ours(x, t, ctx, pooled),
                (lambda: theirs(x, ctx, pooled, t).sample) if theirs is not None else None)

    return _pair_rows(f"SD3 MMDiT guided step {8 * lat}x{8 * lat} (batch 2, {sz.sd3_mmdit})", dev, sz, build,
                      tuple(getattr(torch, d) for d in sz.dtypes), deadline, budget_each)


def measure_graph_loop(dev, sz: Sizes) -> dict:
    """The bundled pixel model's guided DDIM loop (UNet + fused sampler step a step) eager vs one CUDA graph."""
    import torch

    import fastdiff.ops as ops
    from fastdiff.pipelines.pixel import load_pixel_pipeline
    from fastdiff.samplers.schedules import x0_coefs

    pipe = load_pixel_pipeline(device=dev)
    unet, cfg = pipe.unet.eval(), pipe.unet.config
    n, steps, gscale = sz.pixel_images, sz.pixel_steps, 1.5
    alphas, sigmas = pipe.schedule.alphas.double(), pipe.schedule.sigmas_vp.double()
    T = pipe.schedule.num_train_timesteps
    ts = [int(round(T - 1 - i * (T - 1) / steps)) for i in range(steps)]
    coefs = []
    for i, t in enumerate(ts):
        a_t, s_t = float(alphas[t]), float(sigmas[t])
        a_p, s_p = (float(alphas[ts[i + 1]]), float(sigmas[ts[i + 1]])) if i + 1 < steps else (1.0, 0.0)
        px, pm = x0_coefs(pipe.prediction, a_t, s_t)
        # DDIM (eta 0): x_prev = a_p x0 + s_p eps, eps = (x - a_t x0) / s_t  ->  (a_p - s_p a_t / s_t) x0 + s_p / s_t x
        coefs.append(((px, pm), a_p - s_p * a_t / s_t, s_p / s_t))
    g = torch.Generator(device=dev).manual_seed(0)
    x0 = torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g, device=dev)
    y = torch.arange(n, device=dev) % max(cfg.num_classes, 1)
    yy = torch.cat([torch.full_like(y, cfg.null_label), y])
    tt = [torch.full((2 * n,), float(t), device=dev) for t in ts]
    x = x0.clone()

    def loop():
        x.copy_(x0)
        for i in range(steps):
            out = unet(torch.cat([x, x]), tt[i], yy)
            pred, a, b = coefs[i]
            x.copy_(ops.sampler_step(x, out.float(), a, b, pred=pred, guidance_scale=gscale))
        return x

    with torch.inference_mode():
        eager_s = _median_s(loop, dev, sz.time_s * 4, min(sz.min_iters, 2), max_iters=20)
        want = loop().clone()
        row = {"case": f"pixel DDIM loop, {steps} steps, {n} images, guided", "eager_s": eager_s}
        if dev.type == "cuda":
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(2):
                    loop()
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                loop()
            graph_s = _median_s(graph.replay, dev, sz.time_s * 4, min_iters=2, max_iters=50)
            graph.replay()
            _sync(dev)
            row.update(graph_s=graph_s, ratio=eager_s / graph_s,
                       max_abs_diff=(x - want).abs().max().item())
            _say(f"CUDA graph loop: eager {eager_s * 1e3:.1f} ms, graph {graph_s * 1e3:.1f} ms, "
                 f"ratio {eager_s / graph_s:.2f}, max |graph - eager| {row['max_abs_diff']:.2e}")
        else:
            row["graph"] = "no CUDA graph on the CPU: the eager loop only"
            _say(f"graph loop: eager {eager_s * 1e3:.1f} ms (CPU: no CUDA graph)")
    return row


# ----------------------------------------------------------------------------------------------- the report

def _table(result: dict) -> str:
    lines = [f"device: {result['device']['name']}  copy {result['peaks']['copy_gbps']:.0f} GB/s, bf16 matmul "
             f"{result['peaks']['bf16_matmul_tflops']:.1f} TFLOP/s (measured)", "",
             f"{'op':<46} {'dtype':<8} {'backend':<10} {'ms':>8} {'eager ms':>9} {'ratio':>6} {'GB/s':>7} "
             f"{'%bw':>5} {'%flop':>6}"]
    for r in result["ops"]:
        if "error" in r:
            lines.append(f"{r['op']:<46} {r['dtype']:<8} ERROR {r['error'][:80]}")
            continue
        flop = f"{100 * r['frac_matmul_peak']:.0f}" if "frac_matmul_peak" in r else "-"
        lines.append(f"{r['op']:<46} {r['dtype']:<8} {r['backend']:<10} {r['fastdiff_ms']:8.3f} "
                     f"{r['baseline_ms']:9.3f} {r['ratio']:6.2f} {r['gbps']:7.0f} {100 * r['frac_copy_bw']:5.0f} "
                     f"{flop:>6}")
    lines.append("")
    for r in result["pipelines"]:
        if "skipped" in r:
            lines.append(f"{r['case']} {r['dtype']}: skipped ({r['skipped']})")
            continue
        s = f"{r['case']} {r['dtype']}: fastdiff {r['fastdiff_it_s']:.2f} it/s"
        if "ratio" in r:
            s += f", diffusers {r['diffusers_it_s']:.2f} it/s, ratio {r['ratio']:.2f}"
        if r.get("fastdiff_peak_mib"):
            s += f", peak {r['fastdiff_peak_mib']:.0f} MiB"
            if r.get("diffusers_peak_mib"):
                s += f" (diffusers {r['diffusers_peak_mib']:.0f} MiB)"
        lines.append(s)
    gl = result.get("graph_loop") or {}
    if "graph_s" in gl:
        lines.append(f"{gl['case']}: eager {gl['eager_s'] * 1e3:.1f} ms, CUDA graph {gl['graph_s'] * 1e3:.1f} ms, "
                     f"ratio {gl['ratio']:.2f}")
    t = result.get("tests") or {}
    if "passed" in t:
        lines.append(f"tests: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped")
        lines += [f"  FAILED {name}" for name in t["failures"][:40]]
    lines += [f"ERROR {k}: {v}" for k, v in (result.get("errors") or {}).items()]
    return "\n".join(lines)


def _device_info(dev) -> dict:
    import torch

    from fastdiff import _ext

    info = {"type": dev.type, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "python": platform.python_version(), "cuda_kernels": _ext.has_cuda_kernels()}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info.update(name=p.name, capability=f"{p.major}.{p.minor}", memory_gib=p.total_memory / 2 ** 30,
                    sms=p.multi_processor_count)
    else:
        info["name"] = f"cpu ({platform.processor() or platform.machine()})"
    return info


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m fastdiff.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu_<device-name>.json)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu: the measuring code at tiny sizes (same as --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="run every step's code on the CPU at tiny sizes")
    p.add_argument("--budget-s", type=float, default=420.0, help="time for the whole check (default 420 s)")
    p.add_argument("--tests-timeout-s", type=float, default=None, help="time for the tests (default half the budget)")
    p.add_argument("--no-build", action="store_true", help="never build the extension")
    p.add_argument("--no-tests", action="store_true", help="measure only")
    p.add_argument("--no-pipelines", action="store_true", help="ops, peaks and the graph loop only")
    args = p.parse_args(argv)
    dry = args.dry_run or args.device == "cpu"
    import torch

    if not dry and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    start = time.perf_counter()
    deadline = start + args.budget_s
    dev = torch.device("cpu" if dry else "cuda")
    sz = TINY if dry else Sizes()
    threads = torch.get_num_threads()
    if dry:
        torch.set_num_threads(1)  # tiny ops: thread start-up would dominate
    try:
        return _check(args, argv, dry, dev, sz, start, deadline)
    finally:
        torch.set_num_threads(threads)


def _check(args, argv, dry, dev, sz, start, deadline) -> int:
    build = ensure_built(dev, argv) if not args.no_build or os.environ.get(_BUILT_ENV) else {"skipped": "--no-build"}
    result: dict = {"device": _device_info(dev), "dry_run": dry, "sizes": dataclasses.asdict(sz),
                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "complete": False,
                    "build": build}
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"gpu_{_slug(result['device']['name'])}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        # written after every step, so a run stopped from outside (a time limit) still leaves what it measured;
        # "complete" turns true only at the end
        result["seconds"] = round(time.perf_counter() - start, 1)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
        tmp.replace(out)

    save()
    if args.no_tests:
        result["tests"] = {"skipped": "--no-tests"}
    else:
        result["tests"] = run_tests(dry, args.tests_timeout_s or 0.5 * args.budget_s,
                                    out.with_name(out.stem + "_tests.log"))
    save()
    result["peaks"] = measure_peaks(dev, sz)
    left = deadline - time.perf_counter()
    result["ops"] = measure_ops(dev, sz, result["peaks"], time.perf_counter() + 0.3 * left)
    result["errors"] = {}
    save()

    def guarded(name, fn, empty):
        # one failing measurement is a finding to record, not a reason to lose the others
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            result["errors"][name] = f"{type(e).__name__}: {e}"
            _say(f"{name}: ERROR {type(e).__name__}: {e}")
            return empty

    result["graph_loop"] = guarded("graph_loop", lambda: measure_graph_loop(dev, sz), {})
    result["pipelines"] = []
    save()
    if args.no_pipelines:
        _say("pipelines: skipped (--no-pipelines)")
    else:
        result["pipelines"] += guarded("sd1", lambda: measure_sd1(dev, sz, deadline, sz.pipeline_case_s), [])
        save()
        result["pipelines"] += guarded("sd3", lambda: measure_sd3(dev, sz, deadline, sz.pipeline_case_s), [])
    result["complete"] = True
    save()
    print(_table(result))
    _say(f"wrote {out} ({result['seconds']:.0f} s)")
    tests = result["tests"]
    return 1 if tests.get("failed") or tests.get("error") or result["errors"] or build.get("failed") else 0


if __name__ == "__main__":
    raise SystemExit(main())
