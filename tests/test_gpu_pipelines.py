"""The pipelines on a CUDA device: the DDPM trainer (bf16 autocast; fp16 with a GradScaler), the bundled model's
sampling, SD1 and SD3 (small random configurations) against diffusers on the same device, and
``fastdiff generate --device cuda``. Skipped without a GPU ("no CUDA device").

Oracles: the same computation on the CPU (sampling, the CLI), diffusers on the GPU from the same weights and seed
(SD1, SD3), the pure-PyTorch reference ops on the GPU (the trainer's first loss). TF32 is switched off so that
fp32 on the GPU means fp32.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import fastdiff.ops as ops
from devices import needs_cuda

pytestmark = needs_cuda

CUDA = "cuda"


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---------------------------------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def digits():
    from fastdiff.io.datasets import load_sklearn_digits

    return load_sklearn_digits(size=16)


def _trainer(tmp_path, digits, name, **kw):
    from fastdiff.train import TrainConfig, Trainer

    base = dict(model="tiny", dataset="digits", image_size=16, batch_size=16, log_every=100, sample_every=0,
                ckpt_every_steps=0, ckpt_every_minutes=1e9, warmup_steps=2, device=CUDA, max_steps=30, lr=1e-3)
    return Trainer(TrainConfig(run_dir=str(tmp_path / name), **{**base, **kw}), dataset=digits, progress=False)


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_trainer_mixed_precision_on_cuda(tmp_path, digits, precision, dtype):
    """autocast entered in the asked dtype, fp32 master weights and gradients, the GradScaler in fp16, the first
    loss equal to the reference ops' first loss (same weights and batch), and the loss going down."""
    tr = _trainer(tmp_path, digits, precision, precision=precision)
    assert (tr.scaler is not None) == (precision == "fp16")
    seen = []
    h = tr.model.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with ops.use_backend("ref"):
        ref = _trainer(tmp_path, digits, precision + "_ref", precision=precision)
        ref_first = ref.run(max_steps=1)[0]
    losses = tr.run()
    h.remove()
    assert seen and set(seen) == {dtype}
    assert all(p.dtype == torch.float32 and p.device.type == CUDA for p in tr.model.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in tr.model.parameters())
    assert np.isfinite(losses).all()
    # one step of the same network on the same batch: the fused kernels and the references differ by rounding
    assert abs(losses[0] - ref_first) <= 0.02 * abs(ref_first), (losses[0], ref_first)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]), losses
    if precision == "fp16":
        assert tr.scaler.get_scale() > 0


# ---------------------------------------------------------------------------------------------------- sampling

def test_bundled_model_samples_the_same_images_on_cuda():
    from fastdiff.pipelines.pixel import load_pixel_pipeline

    kw = dict(seed=3, sampler="ddim", steps=10)
    labels = [0, 3, 7, 9]
    cpu = load_pixel_pipeline().sample(labels, **kw)
    gpu = load_pixel_pipeline(device=CUDA).sample(labels, **kw)
    assert gpu.shape == cpu.shape and gpu.device.type == "cpu"
    # samples in [0, 1]: 2/255 is two 8-bit levels of the saved image
    assert (gpu - cpu).abs().max().item() <= 2 / 255


def test_generate_cli_on_cuda_gives_the_cpu_image(tmp_path):
    outs = {}
    for dev in ("cpu", CUDA):
        outs[dev] = tmp_path / f"{dev}.png"
        r = subprocess.run([sys.executable, "-m", "fastdiff", "generate", "--device", dev, "--label", "sneaker",
                            "--n", "2", "--steps", "8", "--seed", "1", "--quiet", "--out", str(outs[dev])],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    from PIL import Image

    a, b = (np.asarray(Image.open(outs[d]).convert("RGB")).astype(int) for d in ("cpu", CUDA))
    assert a.shape == b.shape and np.abs(a - b).max() <= 1


# --------------------------------------------------------------------------------------------- SD1 and SD3

def test_sd1_txt2img_matches_diffusers_on_cuda(ref_folder):
    diffusers = pytest.importorskip("diffusers")
    from fastdiff.pipelines.sd1 import load_sd1

    d, ref = ref_folder
    ref = diffusers.StableDiffusionPipeline.from_pretrained(d / "sd", local_files_only=True).to(CUDA)
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    pipe = load_sd1(d / "sd", device=CUDA)
    prompts = ["a photo of a cat", "an astronaut riding a horse, 8k"]
    kw = dict(height=64, width=48)
    ours = pipe.txt2img(prompts, negative_prompt=["blurry", "low quality"], steps=4, sampler="ddim", guidance=5.0,
                        generator=torch.Generator().manual_seed(42), **kw)
    theirs = ref(prompts, negative_prompt=["blurry", "low quality"], num_inference_steps=4, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(42), output_type="pt", **kw).images
    assert ours.shape == theirs.shape == (2, 3, 64, 48)
    assert ((ours > 0.01) & (ours < 0.99)).float().mean() > 0.1
    err = (ours.cpu() - theirs.float().cpu()).abs().max().item()
    assert err <= 1 / 255, f"max per-pixel difference {err * 255:.3f}/255"


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from sd3_builders import build_sd3_folder

    return build_sd3_folder(tmp_path_factory.mktemp("sd3_diffusers"))


def test_sd3_transformer_and_img2img_match_diffusers_on_cuda(sd3_folder):
    diffusers = pytest.importorskip("diffusers")
    from fastdiff.pipelines.sd3 import load_sd3

    d, _ = sd3_folder
    ref = diffusers.StableDiffusion3Pipeline.from_pretrained(d / "sd3", local_files_only=True).to(CUDA)
    ref.set_progress_bar_config(disable=True)
    pipe = load_sd3(d / "sd3", device=CUDA)
    # the MMDiT on the same input: fp32 parity (both do the same fp32 math)
    g = torch.Generator().manual_seed(0)
    cfg = ref.transformer.config
    x = torch.randn(2, cfg.in_channels, 16, 24, generator=g).to(CUDA)
    ctx = torch.randn(2, 11, cfg.joint_attention_dim, generator=g).to(CUDA)
    pooled = torch.randn(2, cfg.pooled_projection_dim, generator=g).to(CUDA)
    t = torch.tensor([999.0, 3.5], device=CUDA)
    with torch.no_grad():
        want = ref.transformer(x, ctx, pooled, t).sample
        got = pipe.transformer(x, t, ctx, pooled)
    err, scale = (got - want).abs().max().item(), want.abs().max().item()
    assert scale > 1e-2 and err <= 2e-5 * scale, (err, scale)
    # img2img from the same image and seed (the CPU test's smooth image): within 1/255 per pixel
    image = (0.5 + 0.4 * torch.sin(torch.linspace(0, 9, 3 * 32 * 32)).reshape(1, 3, 32, 32)).clamp(0, 1)
    image = (image + 0.05 * torch.rand(image.shape, generator=torch.Generator().manual_seed(5))).clamp(0, 1)
    ours = pipe.img2img("a red fox", image, strength=0.6, steps=5, guidance=4.0,
                        generator=torch.Generator().manual_seed(7))
    i2i = diffusers.StableDiffusion3Img2ImgPipeline(**ref.components)
    i2i.set_progress_bar_config(disable=True)
    theirs = i2i("a red fox", image=image.to(CUDA), strength=0.6, num_inference_steps=5, guidance_scale=4.0,
                 generator=torch.Generator().manual_seed(7), output_type="pt").images
    assert ((ours > 0.01) & (ours < 0.99)).float().mean() > 0.1
    e = (ours.cpu().float() - theirs.cpu().float()).abs().max().item()
    assert e <= 1 / 255, f"max per-pixel difference {e * 255:.3f}/255"
