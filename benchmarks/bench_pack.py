"""What the packed-weight cache of fastdiff's Conv2d / Linear buys, per layer kind, inside a real SD1.5 UNet step.

Run: ``pytest benchmarks/bench_pack.py --benchmark-only -s`` (256x256; ``--full-size``: 512x512), or by hand
``python benchmarks/bench_pack.py SIZE [DTYPE]``.

Full-size random SD1.5 UNet (859.5M parameters) in bf16 (or fp32), one guided step (batch 2, channels_last
latents as the pipelines run it), every Conv2d / Linear timed in place by forward hooks. The steps alternate
between ``pack_policy="off"`` (each call converts the plain weight to the math dtype and oneDNN reorders it) and
the packed weight (``"replace"``: packed once, then reused), so a burst of load from another process hits both.
Per layer kind (3x3 / strided convolutions, 1x1 convolutions, linears) the table gives the time of its calls in
one step both ways, the bytes of the plain weights and of their packed copies (fp32 on CPUs whose bf16 math
runs in fp32), and the seconds saved per step per GiB of packed copy: which kinds are worth their memory.
Run by hand, the process keeps glibc's default malloc thresholds, as a user's process does (under pytest the
benchmarks' conftest raises them, which makes the per-call path's fresh fp32 copies cheaper).
"""
from __future__ import annotations

import sys
import time
from collections import defaultdict

import torch


def _kind(m) -> str:
    from fastdiff.ops import Conv2d
    if isinstance(m, Conv2d):
        return "conv 1x1" if tuple(m.kernel_size) == (1, 1) else "conv 3x3"
    return "linear"


def random_unet(dtype: torch.dtype):
    """The SD1.5 UNet with random weights, built on the meta device and filled tensor by tensor in ``dtype``."""
    from fastdiff.models import unet_sd

    with torch.device("meta"):
        m = unet_sd.UNetSD(unet_sd.SD15)
    m = m.to_empty(device="cpu").to(dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02 + (1.0 if name.endswith("weight") else 0.0))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5)
    return m.eval()


def _rss() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _malloc_trim() -> None:
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def measure(size: int = 256, dtype: torch.dtype = torch.bfloat16, rounds: int = 2, log=print) -> dict:
    from fastdiff.ops import Conv2d, Linear
    from fastdiff.ops._packed import packed_bytes

    unet = random_unet(dtype)
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, (Conv2d, Linear))}
    times: dict[str, float] = {}

    def pre(name):
        return lambda mod, args: times.__setitem__(name, -time.perf_counter())

    def post(name):
        return lambda mod, args, out: times.__setitem__(name, times[name] + time.perf_counter())

    for n, m in layers.items():
        m.register_forward_pre_hook(pre(n))
        m.register_forward_hook(post(n))
    g = torch.Generator().manual_seed(1)
    lat = size // 8
    x = torch.randn(2, 4, lat, lat, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 77, 768, generator=g).to(dtype)

    def step(policy: str) -> tuple[float, dict]:
        for m in layers.values():
            m.pack_policy, m.pack_after = policy, 1
        times.clear()
        t0 = time.perf_counter()
        with torch.no_grad():
            unet(x, t, ctx)
        return time.perf_counter() - t0, dict(times)

    plain = {n: m.weight.numel() * m.weight.element_size() for n, m in layers.items()}
    res = {"off": [], "replace": [], "pack_step": None}
    rss = {"built": _rss()}
    for r in range(rounds):
        res["off"].append(step("off"))
        log(f"  off step {r}: {res['off'][-1][0]:.2f} s")
        if r == 0:
            res["pack_step"] = step("replace")  # packs every layer once
            log(f"  packing step: {res['pack_step'][0]:.2f} s")
            rss["packed"] = _rss()
            _malloc_trim()  # free heap pages the replaced plain weights left behind go back to the kernel
            rss["packed, after malloc_trim"] = _rss()
            log("  resident GiB: " + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in rss.items()))
            packed = {n: packed_bytes(m) for n, m in layers.items()}
        res["replace"].append(step("replace"))
        log(f"  packed step {r}: {res['replace'][-1][0]:.2f} s")
    best = {p: min(res[p], key=lambda s: s[0]) for p in ("off", "replace")}
    rows = defaultdict(lambda: dict(n=0, off=0.0, packed=0.0, plain=0, packed_b=0))
    for n, m in layers.items():
        k = rows[_kind(m)]
        k["n"] += 1
        k["off"] += min(s[1][n] for s in res["off"])
        k["packed"] += min(s[1][n] for s in res["replace"])
        k["plain"] += plain[n]
        k["packed_b"] += packed[n]
    return dict(size=size, dtype=str(dtype), kinds=dict(rows), step_off=best["off"][0],
                step_packed=best["replace"][0], pack_step=res["pack_step"][0], rss=rss)


def report(out: dict, log=print) -> None:
    gib = 2**30
    log(f"\nSD1.5 UNet guided step {out['size']}x{out['size']} (batch 2) {out['dtype']}: "
        f"pack_policy off {out['step_off']:.2f} s, packed {out['step_packed']:.2f} s "
        f"({out['step_off'] / out['step_packed']:.2f}x); the step that packs: {out['pack_step']:.2f} s; resident GiB: "
        + ", ".join(f"{k} {v / gib:.2f}" for k, v in out["rss"].items()))
    log("| kind | layers | time/step off | packed | saved | plain GiB | packed GiB | s saved per step per GiB |")
    log("|---|---|---|---|---|---|---|---|")
    for kind, k in sorted(out["kinds"].items()):
        saved = k["off"] - k["packed"]
        log(f"| {kind} | {k['n']} | {k['off']:.2f} s | {k['packed']:.2f} s | {saved:.2f} s | "
            f"{k['plain'] / gib:.3f} | {k['packed_b'] / gib:.3f} | {saved / max(k['packed_b'] / gib, 1e-9):.2f} |")


def test_pack_per_layer_kind(benchmark):
    from conftest import FULL_SIZE, add_row  # not at import: run by hand, malloc keeps its default thresholds

    size = 512 if FULL_SIZE else 256
    out = measure(size)
    report(out)
    add_row("SD1.5 UNet step, packed weights", f"{size}px b2 bf16", out["step_packed"], out["step_off"],
            baseline="pack_policy off")
    benchmark.extra_info.update(out)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


if __name__ == "__main__":
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[sys.argv[2] if len(sys.argv) > 2 else "bf16"]
    report(measure(size, dt))
