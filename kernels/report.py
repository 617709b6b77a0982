"""Ahead-of-time compile of every Triton kernel configuration for the RTX 4080 (sm_89), with no GPU.

- :func:`compile_config` compiles one configuration (``triton.compile`` with ``target=GPUTarget("cuda", 89,
  32)``) and reads its resources: registers and spill stores/loads from ``ptxas -v`` (the ptxas triton bundles,
  run on the kernel's PTX with triton's own flags), shared memory from triton's metadata.
- :func:`occupancy` is the theoretical occupancy on sm_89, computed the way CUDA's occupancy calculator
  (``cuda_occupancy.h``) does: limits from warps, blocks, registers (allocated per warp in 256-register units,
  per SM sub-partition) and shared memory (128-byte units plus 1 KB reserved per block).
- :func:`roofline` is a roofline estimate per op for the RTX 4080 (716.8 GB/s, 97.5 TFLOP/s bf16 with fp32
  accumulate): an estimate from bytes moved and FLOPs, not a measurement.

``python -m fastdiff.kernels.report`` prints both tables (``--quick`` compiles one dtype only).
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

from fastdiff import settings

__all__ = [
    "SM89",
    "DeviceLimits",
    "KernelResources",
    "occupancy",
    "compile_config",
    "all_configs",
    "roofline",
    "roofline_rows",
    "main",
]


@dataclass(frozen=True)
class DeviceLimits:
    """Per-SM limits of one GPU architecture (CUDA C Programming Guide, compute capabilities table)."""

    name: str
    cc: int
    num_sms: int
    max_warps_per_sm: int
    max_blocks_per_sm: int
    regs_per_sm: int
    max_regs_per_thread: int
    max_regs_per_block: int
    reg_alloc_unit: int          # registers are allocated per warp in units of this many
    sub_partitions: int          # register file split across the SM's schedulers
    smem_per_sm: int             # bytes usable by blocks on one SM
    smem_per_block_optin: int    # the most one block may use (opt-in dynamic shared memory)
    smem_reserved_per_block: int # the system reserves this much per resident block
    smem_alloc_unit: int
    dram_gbps: float
    bf16_tflops: float


# RTX 4080 (AD103, sm_89): 76 SMs, 1536 threads (48 warps) and 24 blocks per SM, 64K registers per SM,
# 100 KB shared memory per SM of which one block may opt into 99 KB (101376 bytes), 1 KB reserved per block.
SM89 = DeviceLimits(
    name="RTX 4080 (sm_89)", cc=89, num_sms=76, max_warps_per_sm=48, max_blocks_per_sm=24,
    regs_per_sm=65536, max_regs_per_thread=255, max_regs_per_block=65536, reg_alloc_unit=256,
    sub_partitions=4, smem_per_sm=102400, smem_per_block_optin=101376, smem_reserved_per_block=1024,
    smem_alloc_unit=128, dram_gbps=716.8, bf16_tflops=97.5,
)


@dataclass
class KernelResources:
    name: str
    config: str
    num_warps: int
    regs: int
    spill_bytes: int     # ptxas spill stores + spill loads per thread (0 for a kernel that fits in registers)
    smem: int            # shared memory per block, bytes


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def occupancy(regs: int, smem: int, num_warps: int, dev: DeviceLimits = SM89) -> dict:
    """Theoretical occupancy of a kernel on ``dev``: resident blocks and warps per SM, and the limiter.

    Follows cuda_occupancy.h: each limit gives a number of blocks per SM and the smallest wins.
    """
    if num_warps <= 0:
        raise ValueError("num_warps must be positive")
    limits = {}
    limits["warps"] = dev.max_warps_per_sm // num_warps
    limits["blocks"] = dev.max_blocks_per_sm
    # Registers: rounded up per warp to the allocation unit; each of the SM's sub-partitions holds whole warps.
    if regs > 0:
        per_warp = _round_up(regs * 32, dev.reg_alloc_unit)
        if regs > dev.max_regs_per_thread or per_warp * num_warps > dev.max_regs_per_block:
            limits["registers"] = 0
        else:
            warps_per_sub = (dev.regs_per_sm // dev.sub_partitions) // per_warp
            limits["registers"] = (warps_per_sub * dev.sub_partitions) // num_warps
    # Shared memory: the block's bytes plus the system reserve, in allocation units.
    if smem > dev.smem_per_block_optin:
        limits["shared memory"] = 0
    else:
        per_block = _round_up(smem + dev.smem_reserved_per_block, dev.smem_alloc_unit)
        limits["shared memory"] = dev.smem_per_sm // per_block
    blocks = min(limits.values())
    limiter = min(limits, key=lambda k: limits[k])
    warps = blocks * num_warps
    return dict(blocks_per_sm=blocks, warps_per_sm=warps, occupancy=warps / dev.max_warps_per_sm,
                limiter=limiter, limits=limits)


# ----------------------------------------------------------------------------------------------------------
# AOT compile
# ----------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _ptxas() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path if os.path.exists(path) else "ptxas"


def _ptxas_usage(ptx: str, cc: int) -> dict:
    """Registers, spill stores/loads, stack and static shared memory from ``ptxas -v``, run with the flags
    triton itself uses (``-lineinfo -v --regAllocOptLevel=2``) so the numbers are those of the cubin.
    Cached by the PTX's hash (triton caches the compile itself), so a second test run is fast."""
    import hashlib
    import json

    cache_dir = str(settings.current().cache_dir or os.path.join(tempfile.gettempdir(), "fastdiff"))  # off: a temp one
    key = hashlib.sha256(f"{cc}\0{ptx}".encode()).hexdigest()
    path = os.path.join(cache_dir, "ptxas", key + ".json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        pass
    out = _run_ptxas(ptx, cc)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(out, f)
    except OSError:
        pass
    return out


def _run_ptxas(ptx: str, cc: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([_ptxas(), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{cc}", src,
                               "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True, check=True)
    log = proc.stderr + proc.stdout
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    smem = re.search(r"(\d+) bytes smem", log)
    if regs is None or spill is None:
        raise RuntimeError(f"could not parse ptxas -v output:\n{log}")
    return dict(regs=int(regs.group(1)), stack=int(spill.group(1)), spill_stores=int(spill.group(2)),
                spill_loads=int(spill.group(3)), static_smem=int(smem.group(1)) if smem else 0)


def compile_config(cfg: dict, cc: int = 89):
    """Compile one configuration (an entry of a kernels module's ``configs()``) for ``sm_<cc>``.

    Pointers are marked 16-byte aligned (``tt.divisibility``), as triton specialises them at launch for
    torch's allocations. Returns ``(compiled, KernelResources)``.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = cfg["kernel"]
    sig = cfg["signature"]
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if sig[name].startswith("*")}
    src = ASTSource(fn=fn, signature=sig, constexprs=cfg["constexprs"], attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                              options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
    res = _ptxas_usage(compiled.asm["ptx"], cc)
    # The kernel's total shared memory: triton's (dynamic) from its metadata plus any static shared memory.
    smem = int(compiled.metadata.shared) + res["static_smem"]
    return compiled, KernelResources(
        name=cfg["name"], config=cfg["key"], num_warps=cfg["num_warps"], regs=res["regs"],
        spill_bytes=res["spill_stores"] + res["spill_loads"], smem=smem)


def all_configs() -> list[dict]:
    """Every configuration of every fastdiff Triton kernel that dispatch can launch."""
    import importlib

    out = []
    for mod in ("flash_attention", "group_norm", "sampler_step"):
        try:
            m = importlib.import_module(f"fastdiff.kernels.{mod}")
        except ModuleNotFoundError:
            continue
        out += m.configs()
    return out


# ----------------------------------------------------------------------------------------------------------
# Roofline estimate
# ----------------------------------------------------------------------------------------------------------

def roofline(flops: float, bytes_moved: float, dev: DeviceLimits = SM89) -> dict:
    """Roofline estimate: time is the larger of compute time at peak and memory time at full bandwidth."""
    t_compute = flops / (dev.bf16_tflops * 1e12)
    t_memory = bytes_moved / (dev.dram_gbps * 1e9)
    t = max(t_compute, t_memory)
    return dict(time_us=t * 1e6, bound="compute" if t_compute >= t_memory else "memory",
                intensity=flops / bytes_moved if bytes_moved else float("inf"))


def roofline_rows() -> list[tuple]:
    """(op, shape, FLOPs, bytes) of the hot ops at SD1/SD3 shapes in bf16 (2 bytes per element)."""
    e = 2
    rows = []
    # Attention: 4*B*H*Lq*Lk*D FLOPs forward (two matmuls), 2.5x that backward (five matmuls); flash attention
    # reads q, k, v and writes o once (backward: reads q, k, v, o, dO, writes dq, dk, dv).
    for name, B, H, Lq, Lk, D in (("SD1 self 64x64", 2, 8, 4096, 4096, 40),
                                  ("SD1 cross 64x64", 2, 8, 4096, 77, 40),
                                  ("SD1 self 32x32", 2, 8, 1024, 1024, 80),
                                  ("SD1 self 16x16", 2, 8, 256, 256, 160),
                                  ("SD3 joint 1024+154", 2, 24, 1178, 1178, 64)):
        f = 4 * B * H * Lq * Lk * D
        rows.append(("attention fwd", f"{name} B{B} H{H} Lq{Lq} Lk{Lk} d{D}", f,
                     e * B * H * (2 * Lq * D + 2 * Lk * D)))
        rows.append(("attention bwd", f"{name} B{B} H{H} Lq{Lq} Lk{Lk} d{D}", 2.5 * f,
                     e * B * H * (4 * Lq * D + 4 * Lk * D)))
    # GroupNorm(+SiLU)(+residual): ~10 FLOPs per element; reads x (and residual), writes y (two passes: the
    # statistics read x once more).
    for shape in ((2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (1, 128, 512, 512)):
        n = shape[0] * shape[1] * shape[2] * shape[3]
        rows.append(("group_norm+silu fwd", "x".join(map(str, shape)), 10 * n, e * 3 * n))
        rows.append(("group_norm+silu+full residual", "x".join(map(str, shape)), 11 * n, e * 4 * n))
    # Sampler step with CFG: reads x, model_out (2x), noise; writes x_prev.
    for shape in ((1, 4, 64, 64), (1, 16, 128, 128)):
        n = shape[0] * shape[1] * shape[2] * shape[3]
        rows.append(("sampler_step+cfg", "x".join(map(str, shape)), 8 * n, e * 5 * n))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastdiff.kernels.report",
                                description="AOT-compile fastdiff's Triton kernels for sm_89 and report "
                                            "registers, spills, shared memory, occupancy; roofline estimates.")
    p.add_argument("--quick", action="store_true", help="compile only the bf16 configurations")
    p.add_argument("--no-compile", action="store_true", help="print the roofline estimate only")
    args = p.parse_args(argv)
    dev = SM89
    if not args.no_compile:
        print(f"Triton kernels compiled ahead of time for {dev.name} (theoretical occupancy, static)")
        hdr = f"{'kernel':<26} {'config':<30} {'warps':>5} {'regs':>5} {'spill':>6} {'smem':>7} {'blk/SM':>6} " \
              f"{'occ':>5}  limiter"
        print(hdr)
        print("-" * len(hdr))
        for cfg in all_configs():
            if args.quick and "bf16" not in cfg["key"]:
                continue
            _, r = compile_config(cfg)
            occ = occupancy(r.regs, r.smem, r.num_warps, dev)
            print(f"{r.name:<26} {r.config:<30} {r.num_warps:>5} {r.regs:>5} {r.spill_bytes:>6} {r.smem:>7} "
                  f"{occ['blocks_per_sm']:>6} {occ['occupancy']:>5.0%}  {occ['limiter']}", flush=True)
        print()
    print(f"Roofline estimate (not a measurement) for {dev.name}: {dev.dram_gbps} GB/s, "
          f"{dev.bf16_tflops} TFLOP/s bf16 with fp32 accumulate; bf16 tensors")
    hdr = f"{'op':<30} {'shape':<44} {'GFLOP':>8} {'MB':>8} {'FLOP/B':>7} {'est. us':>9}  bound"
    print(hdr)
    print("-" * len(hdr))
    for op, shape, f, b in roofline_rows():
        r = roofline(f, b, dev)
        print(f"{op:<30} {shape:<44} {f / 1e9:>8.2f} {b / 1e6:>8.2f} {r['intensity']:>7.1f} {r['time_us']:>9.1f}  "
              f"{r['bound']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
