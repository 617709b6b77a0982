"""Pixel pipelines and `fastdiff generate`: folder round trip, diffusers parity of a whole sampling run,
seeds, labels, PNG metadata, the CLI, bad input."""
import dataclasses
import subprocess
import sys

import pytest
import torch
from PIL import Image

from fastdiff.models.unet2d import TINY, UNet2D
from fastdiff.pipelines.generate import class_grid, generate
from fastdiff.pipelines.pixel import PixelPipeline, load_pixel_pipeline, slerp
from fastdiff.samplers import make_schedule

NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY, class_names=NAMES)
    unet = UNet2D(cfg).eval()
    # Random weights give a non-trivial function (the zero-init convention of some layers would not).
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pipe = PixelPipeline(unet, make_schedule("cosine", 1000), "v", 1.0)
    folder = tmp_path_factory.mktemp("pipe") / "tiny"
    pipe.save(folder, dtype=None, card="# tiny test model\n")
    return folder


def test_round_trip_and_schedule_matches_diffusers(pipe_dir):
    from diffusers import DDPMScheduler

    pipe = load_pixel_pipeline(pipe_dir)
    assert pipe.prediction == "v" and pipe.clip == 1.0 and pipe.class_names == list(NAMES)
    ref = DDPMScheduler.from_pretrained(pipe_dir / "scheduler")
    torch.testing.assert_close(pipe.schedule.alphas_cumprod.float(), ref.alphas_cumprod.float(), rtol=1e-6, atol=0)
    assert ref.config.prediction_type == "v_prediction"


def test_ddim_run_matches_diffusers_pipeline(pipe_dir):
    """A whole 8-step class-conditional DDIM run: fastdiff's pipeline vs diffusers' UNet2DModel + DDIMScheduler
    loading the same folder (fp32, no guidance, same initial noise)."""
    from diffusers import DDIMScheduler, UNet2DModel

    pipe = load_pixel_pipeline(pipe_dir)
    unet = UNet2DModel.from_pretrained(pipe_dir / "unet").eval()
    sched = DDIMScheduler.from_pretrained(pipe_dir / "scheduler")
    labels = torch.tensor([7, 0, 3])
    noise = torch.randn((3, 1, 16, 16), generator=torch.Generator().manual_seed(5))
    ours = pipe.sample(labels.tolist(), sampler="ddim", steps=8, guidance=None, noise=noise, precision="fp32")
    sched.set_timesteps(8)
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(x, t, class_labels=labels).sample
            x = sched.step(out, t, x, eta=0.0).prev_sample
    assert ours.min() >= 0 and ours.max() <= 1  # every pipeline returns [0, 1]
    torch.testing.assert_close(ours * 2 - 1, x.clamp(-1, 1), rtol=1e-4, atol=1e-4)


def test_seed_labels_and_names(pipe_dir):
    pipe = load_pixel_pipeline(pipe_dir)
    a = generate(model=pipe, label="sneaker", n=2, seed=3, steps=4, progress=False)
    b = generate(model=pipe, label=7, n=2, seed=3, steps=4, progress=False)
    c = generate(model=pipe, label="Sneaker", n=2, seed=4, steps=4, progress=False)
    assert all(isinstance(im, Image.Image) and im.size == (16, 16) for im in a)
    assert [im.tobytes() for im in a] == [im.tobytes() for im in b]
    assert [im.tobytes() for im in a] != [im.tobytes() for im in c]
    with pytest.raises(ValueError, match="unknown class 'sneakers'.*sneaker"):
        generate(model=pipe, label="sneakers", n=1, steps=2, progress=False)
    with pytest.raises(ValueError, match="outside 0..9"):
        generate(model=pipe, label=10, n=1, steps=2, progress=False)
    with pytest.raises(ValueError, match="unknown sampler"):
        generate(model=pipe, label=0, n=1, sampler="plms", steps=2, progress=False)
    grid = class_grid(pipe, per_class=2, steps=2, progress=False)
    assert grid.height >= 10 * 16


def test_guidance_is_one_batched_pass(pipe_dir):
    """CFG must be one forward on a doubled batch, not two passes."""
    pipe = load_pixel_pipeline(pipe_dir)
    batches = []
    handle = pipe.unet.conv_in.register_forward_hook(lambda m, i, o: batches.append(i[0].shape[0]))
    try:
        pipe.sample([1, 2, 3], sampler="ddim", steps=3, guidance=3.0)
    finally:
        handle.remove()
    assert batches == [6, 6, 6]


def test_model_default_guidance_round_trips_and_is_used(pipe_dir, tmp_path):
    """A folder's _fastdiff.default_guidance is read back and is what guidance="model" (the default) samples
    with; diffusers still opens the folder."""
    pipe = load_pixel_pipeline(pipe_dir)
    assert pipe.default_guidance == 3.0  # a folder that names none: the library default
    pipe.default_guidance = 1.5
    pipe.save(tmp_path / "g", dtype=None)
    again = load_pixel_pipeline(tmp_path / "g")
    assert again.default_guidance == 1.5
    by_default = again.sample([1, 7], sampler="ddim", steps=3, seed=4)
    explicit = again.sample([1, 7], sampler="ddim", steps=3, seed=4, guidance=1.5)
    other = again.sample([1, 7], sampler="ddim", steps=3, seed=4, guidance=3.0)
    assert torch.equal(by_default, explicit) and not torch.equal(by_default, other)
    with pytest.raises(ValueError, match="guidance"):
        again.sample([1], steps=2, guidance="strong")
    diffusers = pytest.importorskip("diffusers")
    diffusers.UNet2DModel.from_pretrained(tmp_path / "g" / "unet")


def test_slerp_endpoints_and_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4096, generator=g), torch.randn(4096, generator=g)
    torch.testing.assert_close(slerp(a, b, 0.0), a)
    torch.testing.assert_close(slerp(a, b, 1.0), b, rtol=1e-5, atol=1e-5)
    mid = slerp(a, b, 0.5)
    assert abs(mid.norm() / a.norm() - 1) < 0.05  # a linear mix would shrink the norm by ~1/sqrt(2)


def test_cli_writes_pngs_with_metadata(pipe_dir, tmp_path):
    out = tmp_path / "grid.png"
    cmd = [sys.executable, "-m", "fastdiff", "generate", "--model", str(pipe_dir), "--n", "2", "--steps", "3",
           "--seed", "1", "--out", str(out), "--quiet", "--show-process", "--interpolate"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    img = Image.open(out)
    assert img.text["fastdiff:seed"] == "1" and img.text["fastdiff:sampler"] == "ddim"
    assert img.text["fastdiff:steps"] == "3"
    assert (tmp_path / "grid-process.png").is_file() and (tmp_path / "grid-interpolate.png").is_file()
    # the same seed gives the same image
    out2 = tmp_path / "grid2.png"
    subprocess.run(cmd[:-4] + [str(out2), "--quiet"], check=True, capture_output=True)
    assert Image.open(out2).tobytes() == img.tobytes()


def test_cli_bad_input(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fastdiff", "generate", "--model", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "does not exist" in r.stderr
    (tmp_path / "junk").mkdir()
    r = subprocess.run([sys.executable, "-m", "fastdiff", "generate", "--model", str(tmp_path / "junk")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "neither a pipeline folder" in r.stderr
    with pytest.raises(ValueError, match="text prompt"):
        generate("a cat", model=None)


def test_bundled_model_loads_and_matches_diffusers():
    """The shipped default model is a real diffusers folder: fastdiff and diffusers agree on it."""
    from diffusers import UNet2DModel

    pipe = load_pixel_pipeline()
    assert pipe.class_names == list(NAMES)
    assert pipe.label_index("sneaker") == 7
    ref = UNet2DModel.from_pretrained(pipe.source + "/unet", torch_dtype=torch.float32).eval()
    x = torch.randn((2, 1, 32, 32), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999.0, 10.0])
    y = torch.tensor([7, 10])  # a class and the null class
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, t, y), ref(x, t, class_labels=y).sample, rtol=1e-4, atol=1e-4)


def test_top_level_generate_uses_the_bundled_model():
    import fastdiff

    ims = fastdiff.generate(label="trouser", n=2, seed=0, steps=2, progress=False)
    assert len(ims) == 2 and ims[0].size == (32, 32)
