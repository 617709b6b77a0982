"""The default model (FASHION32) and the CIFAR-10 preset: training throughput and the sampling forward,
fastdiff (dispatched fused ops) vs the same model on the ``ref`` ops vs diffusers' UNet2DModel with the same
config and weights, in one run, fp32 and bf16 autocast.

    pytest benchmarks/bench_unet2d.py --benchmark-only -s

Images/s of each side and the ratios are in each benchmark's ``extra_info``, printed with ``-s`` and in the summary
table (two rows per case: vs diffusers and vs the ``ref`` ops). TFLOP/s counts the forward FLOPs x3 for a training
step. Rounds: 2 by default, 3 with ``--full-size``.

A training step is forward + backward + optimizer + EMA update, each side as its users run it: fastdiff (and
fastdiff on the ``ref`` ops) with its trainer's AdamW and EMA (fastdiff.train.trainer.make_adamw /
ema_update_), diffusers with torch's default AdamW and diffusers' EMAModel (its training examples' recipe).
"""
import copy
import statistics
import time
from functools import partial

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import FULL_SIZE, add_row
from fastdiff.models.unet2d import CIFAR10_DDPM, FASHION32, UNet2D
from fastdiff.ops import use_backend
from fastdiff.train.trainer import ema_update_, make_adamw

pytestmark = pytest.mark.usefixtures("one_thread")

diffusers = pytest.importorskip("diffusers")
ROUNDS = 3 if FULL_SIZE else 2

_KEYS = ("sample_size", "in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
         "layers_per_block", "attention_head_dim", "norm_num_groups", "norm_eps", "flip_sin_to_cos", "freq_shift",
         "downsample_padding")


def _pair(cfg):
    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(**{k: getattr(cfg, k) for k in _KEYS}, num_class_embeds=cfg.num_class_embeds)
    ours = UNet2D(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


def _inputs(cfg, batch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, cfg.num_class_embeds, (batch,), generator=g) if cfg.num_class_embeds else None
    return x, t, y


def _fwd_flops(model, x, t, y):
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x, t, y)
    return fc.get_total_flops()


def _train_step(call, params, bf16, recipe="fastdiff"):
    params = list(params)
    if recipe == "fastdiff":
        opt = make_adamw(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
        ema = [p.detach().clone() for p in params]

        def update_ema():
            ema_update_(ema, params, 0.999)
    else:  # diffusers' training examples: torch's default AdamW, diffusers' EMAModel
        from diffusers.training_utils import EMAModel

        opt = torch.optim.AdamW(params, lr=1e-4)
        ema_model = EMAModel(params, decay=0.999)
        update_ema = partial(ema_model.step, params)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = call()
        loss = out.float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_ema()

    return step


def _time_interleaved(fns: dict, rounds: int = ROUNDS, slow: float = 30.0) -> dict:
    """Median seconds per call of each callable, one call of each per round (a burst of load from the other
    processes on this machine hits every side alike); one warm-up call each first. A side whose warm-up took
    over ``slow`` seconds (bf16 where oneDNN has no bf16 kernels: a minute or more a step) is not called again:
    its warm-up is its time (the one-time costs it includes are negligible at that length)."""
    warm = {}
    for k, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        warm[k] = time.perf_counter() - t0
    times = {k: [warm[k]] if warm[k] > slow else [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            if warm[k] > slow:
                continue
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("preset,batch", [(FASHION32, 32), (CIFAR10_DDPM, 8)], ids=["fashion32", "cifar10"])
def test_train_throughput(benchmark, preset, batch, precision):
    """Images/s of a training step (forward + backward + AdamW step) of the same model and weights three ways:
    fastdiff (dispatched fused ops), fastdiff's model on the ``ref`` ops, and diffusers' UNet2DModel."""
    bf16 = precision == "bf16"
    ours, ref = _pair(preset)
    on_ref_ops = copy.deepcopy(ours)
    x, t, y = _inputs(preset, batch)

    def ref_ops_forward():
        with use_backend("ref"):
            return on_ref_ops(x, t, y)

    steps = {
        "fastdiff": _train_step(lambda: ours(x, t, y), ours.parameters(), bf16),
        "ref ops": _train_step(ref_ops_forward, on_ref_ops.parameters(), bf16),
        "diffusers": _train_step(lambda: ref(x, t, class_labels=y).sample, ref.parameters(), bf16, "diffusers"),
    }
    sec = _time_interleaved(steps)
    flops = 3 * _fwd_flops(ours, x, t, y)
    name = "fashion32" if preset is FASHION32 else "cifar10"
    info = {f"img_per_s_{k.replace(' ', '_')}": batch / v for k, v in sec.items()}
    info.update(ratio_vs_diffusers=sec["diffusers"] / sec["fastdiff"], ratio_vs_ref_ops=sec["ref ops"] / sec["fastdiff"],
                tflops_fastdiff=flops / sec["fastdiff"] / 1e12, batch=batch, threads=torch.get_num_threads())
    benchmark.extra_info.update(info)
    for base in ("diffusers", "ref ops"):
        add_row(f"unet2d train step ({name})", f"b{batch} {precision}", sec["fastdiff"], sec[base], baseline=base,
                tflops=info["tflops_fastdiff"])
    benchmark.group = "unet2d train step (img/s)"
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the interleaved timings above are the measurement
    print(f"\ntrain {name} b{batch} {precision}: fastdiff {info['img_per_s_fastdiff']:.2f} img/s, ref ops "
          f"{info['img_per_s_ref_ops']:.2f}, diffusers {info['img_per_s_diffusers']:.2f}; "
          f"{info['ratio_vs_diffusers']:.2f}x diffusers, {info['ratio_vs_ref_ops']:.2f}x ref ops")


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_sampling_forward_cfg_batch(compare, bf16):
    """One denoising step of a 10-class x 4 grid with guidance: a batch of 80 (what `fastdiff generate` runs)."""
    ours, ref = _pair(FASHION32)
    ours.eval(), ref.eval()
    x, t, y = _inputs(FASHION32, 80)

    def run(fn):
        def call():
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                fn()
        return call

    compare("unet2d sampling fwd vs diffusers", f"fashion32 b80 {'bf16' if bf16 else 'fp32'}",
            run(lambda: ours(x, t, y)), run(lambda: ref(x, t, class_labels=y)),
            flops=_fwd_flops(ours, x, t, y))
