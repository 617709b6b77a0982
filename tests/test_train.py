"""Trainer: exact resume, autocast really entered, class dropout, EMA saved and used, crash-safe checkpoints."""
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from fastdiff.io.datasets import load_sklearn_digits
from fastdiff.train import CheckpointError, TrainConfig, Trainer, load_run_model
from fastdiff.io.run_checkpoint import load_checkpoint

BASE = dict(model="tiny", dataset="digits", image_size=16, batch_size=16, log_every=2, sample_every=0,
            ckpt_every_steps=3, threads=1, warmup_steps=2)


@pytest.fixture(scope="module")
def digits():
    return load_sklearn_digits(size=16)


def _trainer(tmp_path, digits, name="run", resume=False, **kw):
    return Trainer(TrainConfig(run_dir=str(tmp_path / name), **{**BASE, **kw}), dataset=digits, resume=resume,
                   progress=False)


def test_resume_reproduces_uninterrupted_losses(tmp_path, digits):
    full = _trainer(tmp_path, digits, "a", max_steps=6).run()
    first = _trainer(tmp_path, digits, "b", max_steps=6).run(max_steps=3)
    rest = _trainer(tmp_path, digits, "b", resume=True, max_steps=6).run()
    assert len(full) == 6 and first + rest == full
    # and the final weights agree bit for bit
    a, _, _, sa = load_checkpoint(tmp_path / "a")
    b, _, _, sb = load_checkpoint(tmp_path / "b")
    assert sa["step"] == sb["step"] == 6
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a different seed gives a different run (the check above is not vacuous)
    other = _trainer(tmp_path, digits, "c", max_steps=3, seed=1).run()
    assert other != full[:3]


def test_autoencoder_resume_reproduces_uninterrupted_losses(tmp_path, digits):
    ae = dict(kind="autoencoder", model="tiny", model_overrides={"in_channels": 1, "out_channels": 1}, lr=1e-3,
              max_steps=6)
    full = _trainer(tmp_path, digits, "a", **ae).run()
    first = _trainer(tmp_path, digits, "b", **ae).run(max_steps=3)
    rest = _trainer(tmp_path, digits, "b", resume=True, **ae).run()
    assert len(full) == 6 and first + rest == full
    a, ea, _, sa = load_checkpoint(tmp_path / "a")
    b, eb, _, sb = load_checkpoint(tmp_path / "b")
    assert sa["step"] == sb["step"] == 6 and sa["arch"]["kind"] == "autoencoder"
    assert all(torch.equal(a[k], b[k]) for k in a) and all(torch.equal(ea[k], eb[k]) for k in ea)
    assert any(k.startswith("encoder.down_blocks.") for k in a)  # the SD VAE's own modules
    other = _trainer(tmp_path, digits, "c", seed=1, **{**ae, "max_steps": 3}).run()
    assert other != full[:3]


def test_bf16_autocast_is_entered_and_fp32_is_not(tmp_path, digits):
    seen = {}
    for prec in ("bf16", "fp32"):
        tr = _trainer(tmp_path, digits, prec, precision=prec, max_steps=1)
        h = tr.model.conv_in.register_forward_hook(lambda m, i, o, p=prec: seen.__setitem__(p, o.dtype))
        tr.train_step()
        h.remove()
        assert all(p.dtype == torch.float32 for p in tr.model.parameters())  # master weights stay fp32
        assert all(p.grad is None or p.grad.dtype == torch.float32 for p in tr.model.parameters())
    assert seen == {"bf16": torch.bfloat16, "fp32": torch.float32}


def test_class_dropout_uses_the_null_label(tmp_path, digits):
    tr = _trainer(tmp_path, digits, class_dropout=0.5, max_steps=1)
    labels = []
    h = tr.model.class_embedding.register_forward_hook(lambda m, i, o: labels.append(i[0].clone()))
    tr.train_step()
    h.remove()
    y = labels[0]
    null = tr.unet_config.null_label
    assert null == 10 and 0 < int((y == null).sum()) < len(y)


def test_ema_is_saved_and_loaded_for_sampling(tmp_path, digits):
    tr = _trainer(tmp_path, digits, max_steps=3)
    tr.run()
    run = load_run_model(tmp_path / "run")
    assert run.step == 3 and run.prediction == "v"
    ema_sd, model_sd = tr.ema.state_dict(), tr.model.state_dict()
    assert all(torch.equal(run.unet.state_dict()[k], ema_sd[k]) for k in ema_sd)
    assert any(not torch.equal(ema_sd[k], model_sd[k]) for k in ema_sd)  # EMA really differs from the raw weights
    raw = load_run_model(tmp_path / "run", use_ema=False)
    assert all(torch.equal(raw.unet.state_dict()[k], model_sd[k]) for k in model_sd)


def test_checkpoint_fallback_and_config_guard(tmp_path, digits):
    _trainer(tmp_path, digits, max_steps=6).run()
    latest = json.loads((tmp_path / "run" / "latest.json").read_text())
    assert latest == {"step": 6, "previous": 3}
    assert sorted(p.name for p in (tmp_path / "run").glob("ckpt-*")) == [
        "ckpt-0000003.json", "ckpt-0000003.safetensors", "ckpt-0000006.json", "ckpt-0000006.safetensors"]
    # A torn latest checkpoint (as after a crash mid-write on a filesystem without atomic rename) -> previous.
    (tmp_path / "run" / "ckpt-0000006.safetensors").write_bytes(b"\x00" * 10)
    _, _, _, state = load_checkpoint(tmp_path / "run")
    assert state["step"] == 3
    tr = _trainer(tmp_path, digits, resume=True, max_steps=6)
    assert tr.step == 3
    with pytest.raises(CheckpointError, match="lr: saved 0.0002 vs now 0.1"):
        _trainer(tmp_path, digits, resume=True, max_steps=6, lr=0.1)
    with pytest.raises(CheckpointError, match="already holds a run"):
        _trainer(tmp_path, digits, max_steps=6)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        _trainer(tmp_path, digits, "empty", resume=True)


def test_pictures_and_cli_resume(tmp_path):
    run = tmp_path / "cli"
    cmd = [sys.executable, "-m", "fastdiff.train.cli", "train", "--run-dir", str(run), "--model", "tiny",
           "--dataset", "digits", "--image-size", "16", "--batch-size", "8", "--max-steps", "2",
           "--sample-every", "2", "--sample-steps", "3", "--samples-per-class", "2", "--threads", "1",
           "--no-progress"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    res = subprocess.run([sys.executable, "-m", "fastdiff.train.cli", "train", "--run-dir", str(run), "--resume",
                          "--max-steps", "4", "--no-progress"], check=True, capture_output=True, text=True,
                         timeout=600)
    assert "step 2 -> 4" in res.stdout
    assert json.loads((run / "latest.json").read_text())["step"] == 4
    grid = Image.open(run / "samples-latest.png")
    assert grid.size[0] > 2 * 32 and grid.size[1] >= 10 * 32  # 10 labelled rows of 2 samples, upscaled 2x
    assert Image.open(run / "loss.png").size == (640, 360)
    assert len(list(run.glob("samples-*.png"))) == 3  # step 2, step 4, latest


def test_export_opens_in_diffusers(tmp_path, digits):
    diffusers = pytest.importorskip("diffusers")
    from fastdiff.train.export import export_run, load_exported

    _trainer(tmp_path, digits, max_steps=3).run()
    out = export_run(tmp_path / "run", tmp_path / "export")
    ours = load_exported(out)
    assert ours.prediction == "v" and ours.unet.conv_in.weight.dtype == torch.float32
    from safetensors.torch import load_file
    stored = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in stored.values()} == {torch.float16}
    ref = diffusers.UNet2DModel.from_pretrained(out / "unet", local_files_only=True).float().eval()
    sched = diffusers.DDPMScheduler.from_pretrained(out / "scheduler", local_files_only=True)
    assert sched.config.prediction_type == "v_prediction"
    torch.testing.assert_close(sched.alphas_cumprod.double(), ours.schedule.alphas_cumprod, rtol=1e-6, atol=1e-7)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours.unet(x, torch.tensor([1, 800]), torch.tensor([2, 10])),
                                   ref(x, torch.tensor([1, 800]), class_labels=torch.tensor([2, 10])).sample,
                                   rtol=1e-5, atol=1e-5)
    # the fp16 weights are the EMA weights of the run, rounded
    ema = load_run_model(tmp_path / "run").unet.state_dict()
    assert all(torch.equal(ours.unet.state_dict()[k], ema[k].half().float()) for k in ema)
    assert "3 steps" in (out / "README.md").read_text()


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_bad_input_names_the_problem_and_harms_nothing(tmp_path, digits):
    from fastdiff.io.datasets import DatasetError, ImageDataset

    _trainer(tmp_path, digits, max_steps=3).run()
    run = tmp_path / "run"
    before = _snapshot(run)
    g = torch.Generator().manual_seed(0)

    def data(n=32, c=1, size=16, classes=10):
        return ImageDataset(torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=g),
                            torch.arange(n) % classes, tuple(str(i) for i in range(classes)), "made-up")

    cfg = TrainConfig(run_dir=str(run), **{**BASE, "max_steps": 6})
    cases = [
        (dict(dataset=data(c=3)), ValueError, "3-channel images but the model takes 1 channels"),
        (dict(dataset=data(classes=5)), ValueError, "has 5 classes but the model was built for 10"),
        (dict(dataset=data(size=8)), ValueError, r"images of \(8, 8\) pixels but the configuration wants 16x16"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            Trainer(cfg, resume=True, progress=False, **kw)
    # a checkpoint from another model: the configuration guard names the field
    with pytest.raises(CheckpointError, match="model: saved 'tiny' vs now 'fashion32'"):
        Trainer(TrainConfig(run_dir=str(run), **{**BASE, "model": "fashion32", "max_steps": 6}), dataset=digits,
                resume=True, progress=False)
    # ... and tensors that do not fit the saved architecture (files copied from another run)
    other = tmp_path / "other"
    Trainer(TrainConfig(run_dir=str(other), **{**BASE, "model_overrides": {"block_out_channels": [8, 16]},
                                                "max_steps": 3}), dataset=digits, progress=False).run()
    copied = tmp_path / "copied"
    copied.mkdir()
    for name, content in before.items():
        (copied / name).write_bytes(content)
    for p in other.glob("ckpt-*"):
        (copied / p.name).write_bytes(p.read_bytes())
    with pytest.raises(CheckpointError, match="block_out_channels|differs"):
        Trainer(TrainConfig(run_dir=str(copied), **{**BASE, "max_steps": 6}), dataset=digits, resume=True,
                progress=False)
    # a label outside the classes never reaches the trainer
    with pytest.raises(DatasetError, match="label 10 outside the 10 classes"):
        ImageDataset(torch.zeros(2, 1, 16, 16, dtype=torch.uint8), torch.tensor([3, 10]),
                     tuple(str(i) for i in range(10)), "bad-labels")
    # a size the model cannot halve enough times
    with pytest.raises(ValueError, match="image_size 17 must be a multiple of 2"):
        Trainer(TrainConfig(run_dir=str(tmp_path / "odd"), **{**BASE, "image_size": 17}), dataset=data(size=17),
                progress=False)
    assert not (tmp_path / "odd").exists()
    # the CLI: a missing / malformed dataset and another model are one line on stderr, exit status 2
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not an npz")
    for args, msg in ((["--dataset", f"mnist:{tmp_path / 'missing'}"], "dataset directory not found"),
                      (["--dataset", f"npz:{bad}"], "not a readable .npz"),
                      (["--model", "fashion32"], "model: saved 'tiny' vs now 'fashion32'")):
        res = subprocess.run([sys.executable, "-m", "fastdiff.train.cli", "train", "--run-dir", str(run), "--resume",
                              "--max-steps", "6", "--no-progress", *args], capture_output=True, text=True, timeout=300)
        assert res.returncode == 2 and msg in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert _snapshot(run) == before  # nothing already saved was touched


def test_grad_checkpointing_flag_trains_identically(tmp_path, digits):
    plain = _trainer(tmp_path, digits, "plain", max_steps=2).run()
    tr = _trainer(tmp_path, digits, "ck", max_steps=2, grad_checkpointing=True)
    assert tr.model.grad_checkpointing and not tr.ema.training
    assert tr.run() == plain
    # the flag is a schedule-of-work option: a run may be resumed with it switched off
    _trainer(tmp_path, digits, "ck", resume=True, max_steps=3).run()


def test_scheduler_config_round_trips_every_schedule(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from fastdiff.models.unet2d import TINY, UNet2D
    from fastdiff.pipelines.pixel import PixelPipeline, load_pixel_pipeline
    from fastdiff.samplers import make_schedule

    for kind, zero_snr in (("linear", False), ("scaled_linear", False), ("cosine", False), ("linear", True)):
        sched = make_schedule(kind, 1000, zero_snr=zero_snr)
        out = PixelPipeline(UNet2D(TINY), sched, "eps").save(tmp_path / f"{kind}-{zero_snr}")
        ref = diffusers.DDPMScheduler.from_pretrained(out / "scheduler", local_files_only=True)
        torch.testing.assert_close(ref.alphas_cumprod.double(), sched.alphas_cumprod, rtol=1e-5, atol=1e-7)
        back = load_pixel_pipeline(out).schedule
        if zero_snr:  # written as trained_betas, which diffusers' format (and its reader) hold in fp32
            torch.testing.assert_close(back.betas, sched.betas.float().double(), rtol=0, atol=0)
        else:  # written as the recipe: the very same betas
            assert torch.equal(back.betas, sched.betas), kind
