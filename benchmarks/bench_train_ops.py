"""Training ops, forward + backward, at the training shapes of the two UNet2D presets: fastdiff's ``cpu`` backend
vs its own ``ref`` backend vs the eager torch sequence diffusers' UNet2DModel runs, fp32 and bf16 autocast.

    pytest benchmarks/bench_train_ops.py --benchmark-only -s

The ratios decide the training entries of the CPU routing table (``train_ref`` in fastdiff/ops/routing.py):
an op's ``cpu`` backend is chosen for inputs that require grad only where its forward + backward beats ``ref``
on that CPU class. Every case builds what the model builds in a training step: activations that require grad,
fp32 parameters that require grad, bf16 through ``torch.autocast`` (so the bf16 casts of the weights and their
backward are part of each side), one forward and one backward with a fixed output gradient.

- ``cpu``: ``with use_backend("cpu")`` (the fused kernel / oneDNN path), channels_last as the model runs it;
- ``ref``: ``with use_backend("ref")``, the pure-PyTorch reference on the same channels_last tensors;
- ``eager``: diffusers' sequence (``F.group_norm`` + ``F.silu``, ``F.conv2d`` + add, ``F.linear`` + add,
  ``F.scaled_dot_product_attention``) on NCHW tensors, the layout diffusers trains in.

Printed per case: the three times, ref / cpu and eager / cpu (above 1: cpu faster), and the cpu side's GB/s
(memory-bound ops: bytes every input read and output written once, forward and backward) as a fraction of the
machine's copy bandwidth, or its GFLOP/s (conv, linear, attention: 3x the forward FLOPs) as a fraction of the
fastest fp32 kernel measured in the same session (``gemm_peak``). One thread, as bench_unet2d.py trains.
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from fastdiff.models.unet2d import PRESETS, UNet2D
from fastdiff.ops import attention, conv2d, group_norm, linear, use_backend
from fastdiff.ops.routing import current_route
from fastdiff.train.trainer import ema_update_, make_adamw

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_ROWS: list[str] = []


def _time_all(fns: dict, rounds: int = 7, min_time: float = 0.05, slow: float = 1.0) -> dict:
    """Median seconds per call of each callable, timed round-robin (one burst of load hits every side).

    A side whose first call takes longer than ``slow`` seconds (bf16 convolutions where oneDNN has no bf16
    kernels run at ~1 GFLOP/s) is timed by one more call only: it is far off the others, and seven rounds of it
    would hold the machine for minutes.
    """
    times: dict = {}
    reps = {}
    for k, fn in fns.items():
        t0 = time.perf_counter()
        fn()  # warm-up: oneDNN primitive caches, allocator
        one = time.perf_counter() - t0
        if one > slow:
            t0 = time.perf_counter()
            fn()
            times[k] = [time.perf_counter() - t0]
            continue
        fn()
        t0 = time.perf_counter()
        fn()
        reps[k] = max(1, int(min_time / max(time.perf_counter() - t0, 1e-7)))
        times[k] = []
    for _ in range(rounds):
        for k in reps:
            fn = fns[k]
            t0 = time.perf_counter()
            for _ in range(reps[k]):
                fn()
            times[k].append((time.perf_counter() - t0) / reps[k])
    return {k: statistics.median(v) for k, v in times.items()}


@pytest.fixture(scope="module", autouse=True)
def _summary():
    """Print every row of the module's run together at its end (visible with -s)."""
    yield
    if _ROWS:
        print("\n\ntraining ops, fwd+bwd, one thread (ratios > 1: fastdiff's cpu backend is faster)\n"
              + "\n".join(_ROWS))


@pytest.fixture(scope="session")
def gemm_peak() -> float:
    """The compute ceiling the GFLOP/s columns are quoted against: the fastest of three fp32 kernels on one
    thread, each in GFLOP/s: a 2048^3 torch.mm (the BLAS, slow on some AMD CPUs), the same product through
    oneDNN's inner product, and a oneDNN 3x3 convolution (8x256x32x32 -> 256, channels_last)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    x = _cl(torch.randn(8, 256, 32, 32))
    w = torch.randn(256, 256, 3, 3)
    sec = _time_all({"mm": lambda: torch.mm(a, b),
                     "onednn": lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], None),
                     "conv": lambda: F.conv2d(x, w, None, 1, 1)}, rounds=5)
    work = {"mm": 2 * 2048 ** 3, "onednn": 2 * 2048 ** 3, "conv": 2 * 8 * 256 * 256 * 9 * 32 * 32}
    gf = {k: work[k] / v / 1e9 for k, v in sec.items()}
    _ROWS.append(f"fp32 ceiling, one thread: torch.mm {gf['mm']:.1f} GFLOP/s, oneDNN inner product {gf['onednn']:.1f}, "
                 f"oneDNN 3x3 conv {gf['conv']:.1f} (the largest is the 100% of the GFLOP/s columns)")
    return max(gf.values())


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def _step(fwd, grad: torch.Tensor, bf16: bool, inputs):
    """One forward (under bf16 autocast when asked) and its backward with ``grad`` in the output's dtype, to the
    gradients of ``inputs`` (returned, not accumulated into ``.grad``: in a model the activations are not leaves,
    so no side pays a gradient accumulation the model would not)."""
    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = fwd()
        torch.autograd.grad(y, inputs, grad.to(y.dtype) if grad.dtype != y.dtype else grad)
    return run


def _report(benchmark, op: str, case: str, dtype: str, sec: dict, *, nbytes=None, flops=None, ceiling=None,
            cpu_step=None):
    cpu, ref, eager = sec["cpu"], sec["ref"], sec["eager"]
    info = dict(cpu_us=cpu * 1e6, ref_us=ref * 1e6, eager_us=eager * 1e6, ref_over_cpu=ref / cpu,
                eager_over_cpu=eager / cpu, route=current_route().name)
    if nbytes:
        info.update(gbs=nbytes / cpu / 1e9, pct_copy=100 * nbytes / cpu / 1e9 / ceiling)
        rate = f"{info['gbs']:6.1f} GB/s {info['pct_copy']:4.0f}% copy"
    else:
        info.update(gflops=flops / cpu / 1e9, pct_gemm=100 * flops / cpu / 1e9 / ceiling)
        rate = f"{info['gflops']:6.1f} GFLOP/s {info['pct_gemm']:4.0f}% gemm"
    benchmark.extra_info.update(info)
    benchmark.group = f"train fwd+bwd {op}"
    line = (f"{op:11s} {case:34s} {dtype}: cpu {cpu * 1e3:8.2f} ms  ref {ref * 1e3:8.2f}  eager {eager * 1e3:8.2f}"
            f"  ref/cpu {ref / cpu:5.2f}  eager/cpu {eager / cpu:5.2f}  cpu {rate}")
    _ROWS.append(line)
    print("\n" + line)
    if cpu_step is not None:
        benchmark.pedantic(cpu_step, rounds=3, iterations=1)


# --------------------------------------------------------------------------------------------- shapes
# (batch, channels, size, groups, silu) of the GroupNorms a training step runs (fashion32 b32, cifar10 b8);
# the attention blocks' norms have no SiLU.
GN_CASES = {
    "fashion32-32x32x32": (32, 32, 32, 8, True),
    "fashion32-96x32x32": (32, 96, 32, 8, True),
    "fashion32-64x16x16": (32, 64, 16, 8, True),
    "fashion32-128x8x8": (32, 128, 8, 8, True),
    "fashion32-128x8x8-attn": (32, 128, 8, 8, False),
    "cifar10-128x32x32": (8, 128, 32, 32, True),
    "cifar10-256x16x16": (8, 256, 16, 32, True),
    "cifar10-256x16x16-attn": (8, 256, 16, 32, False),
    "cifar10-512x8x8": (8, 512, 8, 32, True),
}

# (batch, in, out, size, kernel, residual): 3x3 convolutions with the ResBlock's time term (B, C, 1, 1), with
# its skip (full), and the 1x1 shortcut / plain 3x3 (nothing fused).
CONV_CASES = {
    "fashion32-32to32x32-time": (32, 32, 32, 32, 3, "time"),
    "fashion32-32to32x32-skip": (32, 32, 32, 32, 3, "skip"),
    "fashion32-64to64x16-skip": (32, 64, 64, 16, 3, "skip"),
    "fashion32-128to128x8-skip": (32, 128, 128, 8, 3, "skip"),
    "fashion32-96to32x32-time": (32, 96, 32, 32, 3, "time"),
    "fashion32-96to32x32-1x1": (32, 96, 32, 32, 1, None),
    "cifar10-128to128x32-time": (8, 128, 128, 32, 3, "time"),
    "cifar10-128to128x32-skip": (8, 128, 128, 32, 3, "skip"),
    "cifar10-256to256x16-skip": (8, 256, 256, 16, 3, "skip"),
    "cifar10-512to256x8-time": (8, 512, 256, 8, 3, "time"),
    "cifar10-256to256x16-plain": (8, 256, 256, 16, 3, None),
}

# (batch, tokens, channels, residual): the attention blocks' q/k/v and output projections.
LINEAR_CASES = {
    "fashion32-b32x64x128": (32, 64, 128, False),
    "fashion32-b32x64x128-res": (32, 64, 128, True),
    "cifar10-b8x256x256": (8, 256, 256, False),
    "cifar10-b8x256x256-res": (8, 256, 256, True),
}

# (batch, heads, tokens, head_dim)
ATTN_CASES = {
    "fashion32-b32h4x64d32": (32, 4, 64, 32),
    "cifar10-b8h1x256d256": (8, 1, 256, 256),
    "sd-b1h8x1024d80": (1, 8, 1024, 80),  # SD1's 32x32 latent level (LoRA / ControlNet training at 256px)
}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(GN_CASES))
def test_group_norm_train(benchmark, copy_bandwidth, case, dtype):
    """GroupNorm (+ SiLU) forward + backward; eager = F.group_norm + F.silu (autocast runs them in fp32)."""
    b, c, s, groups, silu = GN_CASES[case]
    dt, bf16 = DTYPES[dtype], dtype == "bf16"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, c, s, s, generator=g).to(dt)
    w, bias = _leaf(1 + 0.1 * torch.randn(c, generator=g)), _leaf(0.1 * torch.randn(c, generator=g))
    dy = torch.randn(b, c, s, s, generator=g).to(dt)
    xc, dyc = _leaf(_cl(x)), _cl(dy)
    xn = _leaf(x)

    def fused(backend):
        def fwd():
            with use_backend(backend):
                return group_norm(xc, groups, w, bias, 1e-5, silu=silu)
        return _step(fwd, dyc, bf16, (xc, w, bias))

    def eager():
        y = F.group_norm(xn, groups, w, bias, 1e-5)
        return F.silu(y) if silu else y

    sec = _time_all({"cpu": fused("cpu"), "ref": fused("ref"), "eager": _step(eager, dy, bf16, (xn, w, bias))})
    moved = 5 * x.numel() * x.element_size()  # fwd: read x, write y; bwd: read x and dy, write dx
    _report(benchmark, "group_norm", case + ("-silu" if silu else ""), dtype, sec, nbytes=moved,
            ceiling=copy_bandwidth, cpu_step=fused("cpu"))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv2d_train(benchmark, gemm_peak, case, dtype):
    """Convolution (+ time term / skip fused) forward + backward; eager = F.conv2d + add on NCHW."""
    b, cin, cout, s, k, res = CONV_CASES[case]
    bf16 = dtype == "bf16"
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, cin, s, s, generator=g).to(dt)
    w = _leaf(torch.randn(cout, cin, k, k, generator=g) * (cin * k * k) ** -0.5)
    bias = _leaf(0.1 * torch.randn(cout, generator=g))
    r = {"time": torch.randn(b, cout, 1, 1, generator=g), "skip": torch.randn(b, cout, s, s, generator=g),
         None: None}[res]
    r = r.to(dt) if r is not None else None
    dy = torch.randn(b, cout, s, s, generator=g).to(dt)
    xc, dyc = _leaf(_cl(x)), _cl(dy)
    rc = _leaf(_cl(r)) if r is not None else None
    xn, rn = _leaf(x), (_leaf(r) if r is not None else None)
    pad = k // 2

    def fused(backend):
        def fwd():
            with use_backend(backend):
                return conv2d(xc, w, bias, 1, pad, residual=rc)
        return _step(fwd, dyc, bf16, tuple(t for t in (xc, w, bias, rc) if t is not None))

    def eager():
        y = F.conv2d(xn, w, bias, 1, pad)
        return y + rn if rn is not None else y

    sec = _time_all({"cpu": fused("cpu"), "ref": fused("ref"),
                     "eager": _step(eager, dy, bf16, tuple(t for t in (xn, w, bias, rn) if t is not None))}, rounds=5)
    flops = 3 * 2 * b * cout * cin * k * k * s * s
    _report(benchmark, "conv2d", case, dtype, sec, flops=flops, ceiling=gemm_peak, cpu_step=fused("cpu"))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_linear_train(benchmark, gemm_peak, case, dtype):
    """Linear (+ residual fused) forward + backward; eager = F.linear + add."""
    b, n, c, res = LINEAR_CASES[case]
    bf16 = dtype == "bf16"
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, n, c, generator=g).to(dt)
    w, bias = _leaf(torch.randn(c, c, generator=g) * c ** -0.5), _leaf(0.1 * torch.randn(c, generator=g))
    r = _leaf(torch.randn(b, n, c, generator=g).to(dt)) if res else None
    dy = torch.randn(b, n, c, generator=g).to(dt)
    xl = _leaf(x)
    leaves = tuple(t for t in (xl, w, bias, r) if t is not None)

    def fused(backend):
        def fwd():
            with use_backend(backend):
                return linear(xl, w, bias, residual=r)
        return _step(fwd, dy, bf16, leaves)

    def eager():
        y = F.linear(xl, w, bias)
        return y + r if r is not None else y

    sec = _time_all({"cpu": fused("cpu"), "ref": fused("ref"), "eager": _step(eager, dy, bf16, leaves)})
    _report(benchmark, "linear", case, dtype, sec, flops=3 * 2 * b * n * c * c, ceiling=gemm_peak,
            cpu_step=fused("cpu"))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_attention_train(benchmark, gemm_peak, case, dtype):
    """Self-attention forward + backward on (B, H, L, D) inputs; eager = F.scaled_dot_product_attention."""
    b, h, n, d = ATTN_CASES[case]
    bf16 = dtype == "bf16"
    g = torch.Generator().manual_seed(0)
    q, k, v = (_leaf(torch.randn(b, h, n, d, generator=g).to(DTYPES[dtype])) for _ in range(3))
    dy = torch.randn(b, h, n, d, generator=g).to(DTYPES[dtype])

    def fused(backend):
        def fwd():
            with use_backend(backend):
                return attention(q, k, v)
        return _step(fwd, dy, bf16, (q, k, v))

    sec = _time_all({"cpu": fused("cpu"), "ref": fused("ref"),
                     "eager": _step(lambda: F.scaled_dot_product_attention(q, k, v), dy, bf16, (q, k, v))})
    flops = 3 * 4 * b * h * n * n * d  # forward: q k^T and p v, 2 n^2 d each; backward ~2x
    _report(benchmark, "attention", case, dtype, sec, flops=flops, ceiling=gemm_peak, cpu_step=fused("cpu"))




# --------------------------------------------------------------------------------------------- optimizer, EMA

def _params(preset: str):
    torch.manual_seed(0)
    model = UNet2D(PRESETS[preset])
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    return params


@pytest.mark.parametrize("preset", ["fashion32", "cifar10_ddpm"])
def test_adamw_step(benchmark, copy_bandwidth, preset):
    """One AdamW step over every parameter of the preset: fastdiff's trainer (``make_adamw``: torch's fused CPU
    kernel) vs torch.optim.AdamW's default (a loop of per-tensor ops: what a diffusers training script gets) vs
    ``foreach=True`` (one multi-tensor op per step of the math)."""
    sides = {}
    for name, kw in (("cpu", None), ("ref", {"foreach": True}), ("eager", {})):
        params = _params(preset)
        opt = make_adamw(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0) if kw is None else \
            torch.optim.AdamW(params, lr=1e-4, **kw)
        sides[name] = opt.step
    n = sum(p.numel() for p in _params(preset))
    sec = _time_all(sides, rounds=7)
    # p, grad, exp_avg, exp_avg_sq read; p, exp_avg, exp_avg_sq written: 7 fp32 values a parameter
    _ROWS.append(f"(adamw: ref = torch foreach, eager = torch default per-tensor loop; {n / 1e6:.1f}M parameters)")
    _report(benchmark, "adamw", preset, "fp32", sec, nbytes=7 * 4 * n, ceiling=copy_bandwidth, cpu_step=sides["cpu"])


@pytest.mark.parametrize("preset", ["fashion32", "cifar10_ddpm"])
def test_ema_update(benchmark, copy_bandwidth, preset):
    """The EMA update ema <- lerp(ema, model, 1 - decay) over every parameter: fastdiff's trainer
    (``ema_update_``: one multi-tensor lerp) vs a per-parameter ``lerp_`` loop vs diffusers' EMAModel.step (its
    default, per-parameter ``sub_``)."""
    model_p, ema_p = _params(preset), _params(preset)
    loop_p = _params(preset)
    sides = {"cpu": lambda: ema_update_(ema_p, model_p, 0.999)}

    def loop():
        with torch.no_grad():
            for pe, pm in zip(loop_p, model_p):
                pe.lerp_(pm, 0.001)
    sides["ref"] = loop
    try:
        from diffusers.training_utils import EMAModel
    except ImportError:
        sides["eager"] = loop
    else:
        ema_model = EMAModel([p.detach().clone() for p in model_p], decay=0.999, min_decay=0.999, use_ema_warmup=False)
        sides["eager"] = lambda: ema_model.step(model_p)
    n = sum(p.numel() for p in model_p)
    sec = _time_all(sides, rounds=7)
    _ROWS.append(f"(ema: ref = per-parameter lerp_ loop, eager = diffusers EMAModel.step; {n / 1e6:.1f}M parameters)")
    _report(benchmark, "ema", preset, "fp32", sec, nbytes=3 * 4 * n, ceiling=copy_bandwidth, cpu_step=sides["cpu"])
