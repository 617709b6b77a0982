"""Stable Diffusion 3 MMDiT on this CPU: one classifier-free-guided step (batch 2) at 512x512, fastdiff's
``MMDiT`` vs diffusers' ``SD3Transformer2DModel`` on the same random weights, same dtype and threads, in one run
(target: fastdiff >= 1.5x diffusers on the bf16 guided 512x512 step).

    pytest benchmarks/bench_sd3.py --benchmark-only -s                # depth 2 + extrapolation, one round
    pytest benchmarks/bench_sd3.py --benchmark-only -s --full-size    # the full SD3-medium (minutes per step)

``--full-size`` means depth 24, one round, no diffusers warm-up; ``FASTDIFF_BENCH_SD3_DEPTH``,
``FASTDIFF_BENCH_SD3_ROUNDS`` and ``FASTDIFF_BENCH_SD3_WARMUP_DIFFUSERS`` override each of them.

Shapes: 64x64 latents (1024 image tokens of 2x2 patches), text context 77 CLIP + 256 T5 = 333 tokens of width
4096, pooled 2048, timestep 500. Every block is SD3-medium's exactly (24 heads x 64 = 1536 wide, 4x GELU-tanh MLP);
the depth comes from ``FASTDIFF_BENCH_SD3_DEPTH`` (default 2: one ordinary block plus the special "context
pre-only" last block, which is always kept). A full SD3-medium step (24 blocks, 2.03B parameters) takes minutes in
diffusers bf16 here (torch's bf16 F.linear runs ~13 GFLOP/s on an AVX2-only CPU), so by default one ordinary block
is also timed on its own and the 24-block figure is printed as ``extrapolated from N blocks``:
``t(N-block model) + (24 - N) x t(one ordinary block)``, clearly labelled; at depth 24 everything is measured.

Weights: diffusers' model is built from ``SD3_MEDIUM.to_diffusers()`` (minus ``_class_name``), its parameters set
with ``normal_(std=0.02)``, cast to the dtype, and fastdiff's model (built on the meta device) takes that state
dict with ``assign=True``: both models hold the very same tensors (no second copy of 4-8 GB; inference never
writes to them). fastdiff's Linear additionally caches a pre-packed oneDNN copy of each weight it runs through
oneDNN (for bf16 inputs on a CPU without bf16 kernels: an fp32 copy, 2x the bf16 weights); that cache is built by
the warm-up call and reported as ``pack cache``.

Reported per step: seconds of each side (min of ``FASTDIFF_BENCH_SD3_ROUNDS`` interleaved rounds, default 1,
after one warm-up call of each side; ``FASTDIFF_BENCH_SD3_WARMUP_DIFFUSERS=0`` skips diffusers' warm-up, which
has no cache to build, to save minutes at full depth), the ratio diffusers / fastdiff, TFLOP/s from a FLOP count
computed from the config (2 x the multiply-adds of every linear the step needs + attention's QK^T and PV; the
text-query projection and text-query attention rows of the pre-only last block are not counted: their result is
dropped - fastdiff skips them, diffusers computes them), and the peak increase of the bytes in use by malloc
during the timed calls (sampled every 5 ms, as in bench_sd1.py: a CPU stand-in for max_memory_allocated).
The FLOP count was cross-checked at depth 2 in fp32: its linears (285.4 GFLOP) match torch's FlopCounterMode on
fastdiff's model (284.9, plus the 0.4 of the patchify matmul that runs through oneDNN, which the counter does not
see); the counter has no rule for the CPU SDPA op (39.7 GFLOP of attention here), so it cannot be used as is.

Measured on an AMD EPYC Zen 3 (AVX2 only), 2 threads shared with another job (noisy: repeated runs of
the same case differed up to 1.7x for diffusers, so compare the ratios of one run): full depth 24, one round,
bf16 40.4 s fastdiff vs 199.5 s diffusers (4.9x), fp32 29.6 vs 31.6 s (1.07x).
"""
from __future__ import annotations

import dataclasses
import gc
import os
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import FULL_SIZE, _libc, add_row, peak_memory_increase
from conftest import in_use as _in_use

diffusers = pytest.importorskip("diffusers")

from fastdiff.models.mmdit import SD3_MEDIUM, MMDiT  # noqa: E402
from fastdiff.ops import all_ops  # noqa: E402
from fastdiff.ops._onednn import onednn_math_dtype  # noqa: E402
from fastdiff.ops._packed import PackedWeightMixin  # noqa: E402

DEPTH = int(os.environ.get("FASTDIFF_BENCH_SD3_DEPTH", "24" if FULL_SIZE else "2"))
ROUNDS = int(os.environ.get("FASTDIFF_BENCH_SD3_ROUNDS", "1"))
WARMUP_DIFFUSERS = os.environ.get("FASTDIFF_BENCH_SD3_WARMUP_DIFFUSERS", "0" if FULL_SIZE else "1") != "0"
FULL_DEPTH = SD3_MEDIUM.num_layers  # 24

BATCH, LATENT, TEXT_TOKENS = 2, 64, 77 + 256
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# ------------------------------------------------------------------------------------------------ FLOPs
def step_flops(cfg, batch: int = BATCH, latent: int = LATENT, text: int = TEXT_TOKENS) -> dict[str, float]:
    """FLOPs (2 x multiply-adds) of one MMDiT forward: 'outside' (embeddings, context_embedder, norm_out,
    proj_out), 'block' (one ordinary joint block), 'last' (the context-pre-only block), 'total' for cfg's depth."""
    d, h, hd, p = cfg.hidden_size, cfg.num_attention_heads, cfg.attention_head_dim, cfg.patch_size
    n = (latent // p) ** 2  # image tokens per sample
    b, l = batch, text
    outside = (b * n * cfg.in_channels * p * p * d                      # pos_embed.proj (patchify matmul)
               + b * (256 * d + d * d)                                  # timestep_embedder
               + b * (cfg.pooled_projection_dim * d + d * d)            # text_embedder (pooled)
               + b * l * cfg.joint_attention_dim * d                    # context_embedder
               + b * d * 2 * d                                          # norm_out.linear
               + b * n * d * p * p * cfg.out_channels)                  # proj_out
    block = (2 * b * d * 6 * d                                          # norm1 + norm1_context linears
             + 12 * b * (n + l) * d * d                                 # q,k,v,out (4 D^2) + MLP (8 D^2), both streams
             + 2 * b * h * (n + l) * (n + l) * hd)                      # QK^T and PV over the joint sequence
    last = (b * d * 6 * d + b * d * 2 * d                               # norm1 (6 D) + norm1_context continuous (2 D)
            + 12 * b * n * d * d                                        # image stream: q,k,v,out + MLP
            + 2 * b * l * d * d                                         # text keys and values only
            + 2 * b * h * n * (n + l) * hd)                             # image queries over the joint keys
    depth = cfg.num_layers
    total = outside + (depth - 1) * block + last
    return {k: 2.0 * v for k, v in dict(outside=outside, block=block, last=last, total=total).items()}


# ------------------------------------------------------------------------------------------------ timing
def timed(fn) -> tuple[float, float, object]:
    """(seconds, peak increase of malloc's in-use bytes in MB, result) of one call of ``fn``."""
    box = {}

    def call():
        t0 = time.perf_counter()
        box["out"] = fn()
        box["s"] = time.perf_counter() - t0

    mem = peak_memory_increase(call)
    return box["s"], mem, box["out"]


def pair(fast, slow, *, rounds: int = ROUNDS, warm_slow: bool = WARMUP_DIFFUSERS):
    """Interleaved rounds of the two sides: (min s fast, min s slow, peak MB fast, peak MB slow, warm-up outputs,
    MB retained by fastdiff's warm-up call = its weight-pack cache)."""
    base = _in_use() if _libc else 0
    for _ in range(PackedWeightMixin.pack_after):  # the layers pack their weights on the pack_after-th call
        out_f = fast()
    pack_mb = (_in_use() - base) / 2**20 if _libc else float("nan")
    out_s = slow() if warm_slow else None
    tf, ts, mf, ms = [], [], [], []
    for _ in range(rounds):
        s, m, _o = timed(fast)
        tf.append(s), mf.append(m)
        del _o
        s, m, o = timed(slow)
        ts.append(s), ms.append(m)
        if out_s is None:
            out_s = o
        del o
    return min(tf), min(ts), max(mf), max(ms), (out_f, out_s), pack_mb


# ------------------------------------------------------------------------------------------------ models
def build(dt: torch.dtype, depth: int):
    """diffusers' SD3Transformer2DModel (normal(0.02) weights, cast to ``dt``) and fastdiff's MMDiT holding the
    same tensors."""
    cfg = dataclasses.replace(SD3_MEDIUM, num_layers=depth)
    dcfg = cfg.to_diffusers()
    dcfg.pop("_class_name")
    torch.manual_seed(0)
    ref = diffusers.SD3Transformer2DModel(**dcfg).eval()
    with torch.no_grad():
        for prm in ref.parameters():
            torch.nn.init.normal_(prm, std=0.02)
    ref = ref.to(dt)
    with torch.device("meta"):
        ours = MMDiT(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    ours.eval()
    left = [k for k, v in list(ours.named_parameters()) + list(ours.named_buffers()) if v.is_meta]
    assert not left, f"fastdiff tensors not loaded: {left[:5]}"
    return cfg, ref, ours


def _inputs(dt):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 16, LATENT, LATENT, generator=g).to(dt)
    ctx = torch.randn(BATCH, TEXT_TOKENS, 4096, generator=g).to(dt)
    pooled = torch.randn(BATCH, 2048, generator=g).to(dt)
    t = torch.full((BATCH,), 500.0)
    return x, t, ctx, pooled


def _backends(ours, dt) -> str:
    """Which fastdiff backends run the step's big ops (the registry's automatic choice for these inputs)."""
    blk = ours.transformer_blocks[0]
    n = BATCH * (LATENT // 2) ** 2
    x2 = torch.empty(n, 1536, dtype=dt)
    lin = all_ops()["linear"]
    fc1 = blk.ff.net[0].proj
    q = torch.empty(BATCH, 24, (LATENT // 2) ** 2 + TEXT_TOKENS, 64, dtype=dt)
    return (f"linear q/k/v/out -> {lin.select(x2, blk.attn.to_q.weight, blk.attn.to_q.bias, None, None, None)}, "
            f"MLP fc1+gelu_tanh -> {lin.select(x2, fc1.weight, fc1.bias, 'gelu_tanh', None, None)}, "
            f"attention -> {all_ops()['attention'].select(q, q, q, None, None)}; oneDNN math for {dt}: "
            f"{onednn_math_dtype(dt)}")


def _rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dname", list(DTYPES))
def test_mmdit_guided_step_512(benchmark, dname):
    """One guided SD3 MMDiT step (batch 2) at 512x512, depth FASTDIFF_BENCH_SD3_DEPTH (+ extrapolation to 24)."""
    assert 1 <= DEPTH <= FULL_DEPTH
    dt = DTYPES[dname]
    t_build = time.perf_counter()
    cfg, ref, ours = build(dt, DEPTH)
    t_build = time.perf_counter() - t_build
    x, t, ctx, pooled = _inputs(dt)
    weights_mb = sum(p.numel() * p.element_size() for p in ref.parameters()) / 2**20
    fl = step_flops(cfg)
    print(f"\n[SD3 {dname}] depth {DEPTH} ({DEPTH - 1} ordinary + 1 pre-only block), weights {weights_mb:.0f} MB "
          f"(shared by both models), built in {t_build:.0f} s, threads {torch.get_num_threads()}; "
          f"fastdiff: {_backends(ours, dt)}; diffusers: torch F.linear in {dname}, "
          f"{type(ref.transformer_blocks[0].attn.processor).__name__} (F.scaled_dot_product_attention)", flush=True)

    with torch.inference_mode():
        fast = lambda: ours(x, t, ctx, pooled)  # noqa: E731
        slow = lambda: ref(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,  # noqa: E731
                           timestep=t).sample
        tf, ts, mf, ms, (of, os_), pack_mb = pair(fast, slow)
        err = _rel_err(of, os_)
        del of, os_
        case = f"512px b2 {dname} depth {DEPTH}"
        add_row("SD3 MMDiT guided step", case, tf, ts, baseline="diffusers", tflops=fl["total"] / tf / 1e12,
                peak_mb=mf, peak_mb_base=ms)
        info = dict(depth=DEPTH, dtype=dname, fastdiff_s=tf, diffusers_s=ts, ratio_vs_diffusers=ts / tf,
                    tflops_fastdiff=fl["total"] / tf / 1e12, tflops_diffusers=fl["total"] / ts / 1e12,
                    gflop=fl["total"] / 1e9, fastdiff_peak_mb=mf, diffusers_peak_mb=ms, fastdiff_pack_cache_mb=pack_mb,
                    weights_mb=weights_mb, rel_err_vs_diffusers=err, rounds=ROUNDS)
        print(f"[SD3 {dname}] MEASURED depth {DEPTH}: fastdiff {tf:.2f} s, diffusers {ts:.2f} s, ratio {ts / tf:.2f}; "
              f"{fl['total'] / 1e9:.0f} GFLOP -> fastdiff {info['tflops_fastdiff']:.3f} / diffusers "
              f"{info['tflops_diffusers']:.3f} TFLOP/s; peak memory during the step +{mf:.0f} / +{ms:.0f} MB; "
              f"fastdiff pack cache +{pack_mb:.0f} MB; rel. error vs diffusers {err:.1e}", flush=True)
        # loose sanity bounds (the test suite checks accuracy; here: both sides computed the same network)
        assert err < (1e-3 if dt == torch.float32 else 0.1), err

        if DEPTH < FULL_DEPTH:
            if DEPTH < 2:
                pytest.skip("no ordinary block to extrapolate from at depth 1")
            g = torch.Generator().manual_seed(1)
            hx = torch.randn(BATCH, (LATENT // 2) ** 2, cfg.hidden_size, generator=g).to(dt)
            hc = torch.randn(BATCH, TEXT_TOKENS, cfg.hidden_size, generator=g).to(dt)
            temb = torch.randn(BATCH, cfg.hidden_size, generator=g).to(dt)
            c_silu = F.silu(temb)
            ob, rb = ours.transformer_blocks[0], ref.transformer_blocks[0]
            bf, bs, bmf, bms, _, _ = pair(lambda: ob(hx, hc, c_silu),
                                          lambda: rb(hidden_states=hx, encoder_hidden_states=hc, temb=temb))
            ef = tf + (FULL_DEPTH - DEPTH) * bf
            es = ts + (FULL_DEPTH - DEPTH) * bs
            ffl = step_flops(dataclasses.replace(cfg, num_layers=FULL_DEPTH))["total"]
            info.update(block_fastdiff_s=bf, block_diffusers_s=bs, block_ratio=bs / bf,
                        block_tflops_fastdiff=fl["block"] / bf / 1e12, block_peak_mb_fastdiff=bmf,
                        block_peak_mb_diffusers=bms, extrapolated_full_fastdiff_s=ef, extrapolated_full_diffusers_s=es,
                        extrapolated_full_ratio=es / ef, extrapolated_full_tflops_fastdiff=ffl / ef / 1e12)
            add_row("SD3 MMDiT one ordinary block", f"512px b2 {dname}", bf, bs, baseline="diffusers",
                    tflops=fl["block"] / bf / 1e12, peak_mb=bmf, peak_mb_base=bms)
            add_row("SD3 MMDiT 24 blocks EXTRAPOLATED", f"from {DEPTH} blocks {dname}", ef, es, baseline="diffusers",
                    tflops=ffl / ef / 1e12)
            print(f"[SD3 {dname}] MEASURED one ordinary block: fastdiff {bf:.3f} s, diffusers {bs:.3f} s, ratio "
                  f"{bs / bf:.2f}, fastdiff {info['block_tflops_fastdiff']:.3f} TFLOP/s, "
                  f"peak +{bmf:.0f} / +{bms:.0f} MB"
                  f"\n[SD3 {dname}] EXTRAPOLATED from {DEPTH} blocks to the full 24-block SD3-medium step (t(depth "
                  f"{DEPTH}) + {FULL_DEPTH - DEPTH} x t(block)): fastdiff {ef:.1f} s, diffusers {es:.1f} s, ratio "
                  f"{es / ef:.2f}, {ffl / 1e12:.2f} TFLOP -> fastdiff {ffl / ef / 1e12:.3f} TFLOP/s", flush=True)
        benchmark.extra_info.update(info)
        benchmark.group = "SD3 MMDiT guided step"
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the timings above are the measurement
    del ref, ours
    gc.collect()
