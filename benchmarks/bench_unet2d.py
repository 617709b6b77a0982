"""The default model (FASHION32) and the CIFAR-10 preset: training step and sampling forward,
fastdiff (dispatched fused ops) vs diffusers' UNet2DModel with the same config and weights, in one run.

    pytest benchmarks/bench_unet2d.py --benchmark-only -s

"eager" in the summary table is diffusers; the ``ref`` rows run fastdiff's model on its pure-PyTorch references.
TFLOP/s counts the forward FLOPs (x3 for a training step: forward + two backward matmuls per layer).
"""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fastdiff.models.unet2d import CIFAR10_DDPM, FASHION32, UNet2D
from fastdiff.ops import use_backend

diffusers = pytest.importorskip("diffusers")

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


def _train_step(call, params, bf16):
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = call()
        loss = out.float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("preset,batch", [(FASHION32, 32), (CIFAR10_DDPM, 8)], ids=["fashion32", "cifar10"])
def test_train_step_vs_diffusers(compare, preset, batch, bf16):
    ours, ref = _pair(preset)
    x, t, y = _inputs(preset, batch)
    fast = _train_step(lambda: ours(x, t, y), ours.parameters(), bf16)
    eager = _train_step(lambda: ref(x, t, class_labels=y).sample, ref.parameters(), bf16)
    flops = 3 * _fwd_flops(ours, x, t, y)
    name = "fashion32" if preset is FASHION32 else "cifar10"
    ratio = compare("unet2d train step vs diffusers", f"{name} b{batch} {'bf16' if bf16 else 'fp32'}", fast, eager,
                    flops=flops)
    print(f"train step b{batch}: {ratio:.2f}x diffusers")


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_train_step_vs_ref_ops(compare, bf16):
    ours, _ = _pair(FASHION32)
    x, t, y = _inputs(FASHION32, 32)
    fast = _train_step(lambda: ours(x, t, y), ours.parameters(), bf16)

    def on_ref():
        with use_backend("ref"):
            return ours(x, t, y)

    eager = _train_step(on_ref, ours.parameters(), bf16)
    compare("unet2d train step vs ref ops", f"fashion32 b32 {'bf16' if bf16 else 'fp32'}", fast, eager,
            flops=3 * _fwd_flops(ours, x, t, y))


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
