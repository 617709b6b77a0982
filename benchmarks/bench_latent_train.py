"""Latent diffusion's two trained models: training throughput of the text-conditioned latent UNet
(``unet_sd.FASHION_TINY_SD`` on 8x8x4 latents, a (B, 77, 128) text context) and of the KL autoencoder
(``vae.FASHION_F4``: 32x32 grey images -> 8x8x4 latents), fastdiff (dispatched fused ops) vs the same model on the
``ref`` ops vs diffusers' UNet2DConditionModel / AutoencoderKL with the same config and weights, in one run, fp32
and bf16 autocast, batch 64 (the trainer's default).

    pytest benchmarks/bench_latent_train.py --benchmark-only -s

Images/s of each side and the ratios are in each benchmark's ``extra_info``, printed with ``-s`` and in the summary
table (two rows per case: vs diffusers and vs the ``ref`` ops). TFLOP/s counts the forward FLOPs x3 for a training
step, the forward FLOPs counted on the diffusers model (the same architecture: torch's FLOP counter misses
fastdiff's no-grad packed convolutions and linears; attention is counted on neither side). Rounds (median of
the interleaved calls): 5 by default, 9 with ``--full-size``.

A training step is forward + loss + backward + optimizer + EMA update, with the recipe of
benchmarks/bench_unet2d.py: fastdiff (and fastdiff on the ``ref`` ops) with its trainer's AdamW and EMA
(fastdiff.train.trainer.make_adamw / ema_update_), diffusers with torch's default AdamW and diffusers' EMAModel.
The UNet's loss is the MSE to a fixed target (the noise of a diffusion step); the autoencoder's is the trainer's:
encode, sample the posterior, decode, L1 reconstruction + 1e-6 x KL (summed over an image's latents, over its
pixel count), each side sampling with its own posterior class.
"""
import copy
from functools import partial

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench_unet2d import _time_interleaved
from conftest import FULL_SIZE, add_row
from fastdiff.models import unet_sd, vae
from fastdiff.ops import use_backend
from fastdiff.train.trainer import ema_update_, make_adamw

pytestmark = pytest.mark.usefixtures("one_thread")

diffusers = pytest.importorskip("diffusers")
BATCH = 64  # fastdiff.train.TrainConfig.batch_size's default
KL_WEIGHT = 1e-6  # the trainer's default (LDM's scale)
# steps take 0.2-1.3 s on one thread: more rounds than bench_unet2d, a case still under 30 s by default
ROUNDS = 9 if FULL_SIZE else 5


def _train_step(call, loss_of, params, bf16, recipe="fastdiff"):
    """bench_unet2d's training step with a loss of its own: ``call()`` under autocast, ``loss_of(out)`` in fp32."""
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
        loss = loss_of(out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_ema()

    return step


def _fwd_flops(fn) -> float:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        fn()
    return float(fc.get_total_flops())


def _unet_case(bf16):
    """{side: step}, forward of the diffusers model (for the FLOPs)."""
    cfg = unet_sd.FASHION_TINY_SD
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**cfg.to_diffusers())
    ours = unet_sd.UNetSD(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    on_ref_ops = copy.deepcopy(ours)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    t = torch.randint(0, 1000, (BATCH,), generator=g)
    c = torch.randn(BATCH, 77, cfg.cross_attention_dim, generator=g)
    target = torch.randn(x.shape, generator=g)

    def mse(out):
        return (out.float() - target).square().mean()

    def ref_ops_forward():
        with use_backend("ref"):
            return on_ref_ops(x, t, c)

    steps = {
        "fastdiff": _train_step(lambda: ours(x, t, c), mse, ours.parameters(), bf16),
        "ref ops": _train_step(ref_ops_forward, mse, on_ref_ops.parameters(), bf16),
        "diffusers": _train_step(lambda: ref(x, t, encoder_hidden_states=c).sample, mse, ref.parameters(), bf16,
                                 "diffusers"),
    }
    return steps, lambda: ref(x, t, encoder_hidden_states=c)


def _vae_case(bf16):
    cfg = vae.FASHION_F4
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**cfg.to_diffusers())
    ours = vae.AutoencoderKL(cfg)
    ours.load_state_dict(ref.state_dict(), strict=True)
    on_ref_ops = copy.deepcopy(ours)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g) * 2 - 1

    def loss_of(out):  # the trainer's autoencoder loss (fastdiff.train.trainer, kind "autoencoder")
        rec, mean, logvar = (o.float() for o in out)
        kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean()
        return (rec - x).abs().mean() + KL_WEIGHT * kl / x[0].numel()

    def ours_call(model=ours):
        post = model.encode(x)
        return model.decode(post.sample()), post.mean, post.logvar

    def ref_ops_call():
        with use_backend("ref"):
            return ours_call(on_ref_ops)

    def ref_call():
        post = ref.encode(x).latent_dist
        return ref.decode(post.sample()).sample, post.mean, post.logvar

    steps = {
        "fastdiff": _train_step(ours_call, loss_of, ours.parameters(), bf16),
        "ref ops": _train_step(ref_ops_call, loss_of, on_ref_ops.parameters(), bf16),
        "diffusers": _train_step(ref_call, loss_of, ref.parameters(), bf16, "diffusers"),
    }
    return steps, lambda: ref.decode(ref.encode(x).latent_dist.mode())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("model", ["unet_sd", "vae"], ids=["fashion_tiny_sd", "fashion_f4"])
def test_latent_train_throughput(benchmark, model, precision):
    """Images/s of a training step of the same model and weights three ways: fastdiff (dispatched fused ops),
    fastdiff's model on the ``ref`` ops, and diffusers."""
    bf16 = precision == "bf16"
    steps, ref_forward = (_unet_case if model == "unet_sd" else _vae_case)(bf16)
    sec = _time_interleaved(steps, rounds=ROUNDS)
    flops = 3 * _fwd_flops(ref_forward)
    name = {"unet_sd": "latent unet train step (fashion_tiny_sd)", "vae": "autoencoder train step (fashion_f4)"}[model]
    case = f"b{BATCH} 8x8x4 ctx77x128" if model == "unet_sd" else f"b{BATCH} 1x32x32"
    info = {f"img_per_s_{k.replace(' ', '_')}": BATCH / v for k, v in sec.items()}
    info.update(ratio_vs_diffusers=sec["diffusers"] / sec["fastdiff"],
                ratio_vs_ref_ops=sec["ref ops"] / sec["fastdiff"], tflops_fastdiff=flops / sec["fastdiff"] / 1e12,
                batch=BATCH, threads=torch.get_num_threads())
    benchmark.extra_info.update(info)
    for base in ("diffusers", "ref ops"):
        add_row(name, f"{case} {precision}", sec["fastdiff"], sec[base], baseline=base, tflops=info["tflops_fastdiff"])
    benchmark.group = "latent train step (img/s)"
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the interleaved timings above are the measurement
    print(f"\n{name} b{BATCH} {precision}: fastdiff {info['img_per_s_fastdiff']:.2f} img/s, ref ops "
          f"{info['img_per_s_ref_ops']:.2f}, diffusers {info['img_per_s_diffusers']:.2f}; "
          f"{info['ratio_vs_diffusers']:.2f}x diffusers, {info['ratio_vs_ref_ops']:.2f}x ref ops, "
          f"{info['tflops_fastdiff']:.3f} TFLOP/s")
