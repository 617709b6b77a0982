"""Latent diffusion in the one trainer: autoencoder runs, the latent cache and its scale factor, caption-conditioned
SD1-layout runs that resume exactly and export as SD1 folders diffusers opens, and argument validation."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fastdiff.io.datasets import load_sklearn_digits
from fastdiff.io.run_checkpoint import load_checkpoint
from fastdiff.train import TrainConfig, Trainer
from fastdiff.train.captions import CaptionTable, caption
from fastdiff.train.latents import CACHE_FILE, SNAPSHOT_DIR, load_autoencoder

COMMON = dict(dataset="digits", image_size=16, batch_size=16, log_every=2, sample_every=0, ckpt_every_steps=3,
              threads=1, warmup_steps=2)
AE = dict(COMMON, kind="autoencoder", model="tiny", model_overrides={"in_channels": 1, "out_channels": 1}, lr=1e-3)
LDM = dict(COMMON, conditioning="text", model="tiny", text_encoder="tiny", class_dropout=0.2, samples_per_class=2,
           sample_steps=2)


@pytest.fixture(scope="module")
def digits():
    return load_sklearn_digits(size=16)


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory, digits):
    run = tmp_path_factory.mktemp("ae") / "run"
    Trainer(TrainConfig(run_dir=str(run), max_steps=4, **AE), dataset=digits, progress=False).run()
    return run


def _run(path, digits, resume=False, **kw):
    return Trainer(TrainConfig(run_dir=str(path), **kw), dataset=digits, resume=resume, progress=False)


def test_latent_cache_equals_encoding_on_the_fly(tmp_path, digits, ae_run):
    tr = _run(tmp_path / "ldm", digits, autoencoder=str(ae_run), max_steps=1, **LDM)
    vae = load_autoencoder(ae_run)  # the autoencoder run's EMA weights, read independently of the trainer
    idx = torch.tensor([0, 5, 17, 400, len(digits) - 1])
    x, y = digits.batch(idx)
    with torch.no_grad():
        z = vae.encode(x).mode()
    scale = tr.vae.config.scaling_factor
    torch.testing.assert_close(tr.data.batch(idx)[0], z * scale, rtol=1e-5, atol=1e-6)
    assert torch.equal(tr.data.batch(idx)[1], y)
    # the run's copy of the autoencoder has the run's weights and decodes the cached latents like the original
    with torch.no_grad():
        torch.testing.assert_close(tr.vae.decode(tr.vae.from_latents(tr.data.batch(idx)[0])), vae.decode(z),
                                   rtol=1e-5, atol=1e-5)


def test_scale_factor_is_one_over_the_std_of_the_cached_latents(tmp_path, digits, ae_run):
    tr = _run(tmp_path / "ldm", digits, autoencoder=str(ae_run), max_steps=1, **LDM)
    z = load_file(str(tmp_path / "ldm" / CACHE_FILE))["z"]
    assert z.shape == (len(digits), 4, 8, 8)
    stored = json.loads((tmp_path / "ldm" / SNAPSHOT_DIR / "config.json").read_text())["scaling_factor"]
    expect = 1.0 / float(torch.std(z.double()))
    assert stored == pytest.approx(expect, rel=1e-12) and tr.vae.config.scaling_factor == stored
    assert abs(stored - 1.0) > 1e-3  # the untrained-scale latents are not unit-variance by accident
    assert float(tr.data.latents.double().std()) == pytest.approx(1.0, rel=1e-5)
    assert tr.arch["vae"]["scaling_factor"] == stored


@pytest.mark.parametrize("schedule,prediction", [("cosine", "v"), ("flow", "flow")])
def test_latent_text_run_resumes_exactly(tmp_path, digits, ae_run, schedule, prediction):
    kw = dict(LDM, autoencoder=str(ae_run), schedule=schedule, prediction=prediction, max_steps=6, precision="fp32")
    full_tr = _run(tmp_path / "a", digits, **kw)
    full = full_tr.run(max_steps=3)
    first = _run(tmp_path / "b", digits, **kw).run(max_steps=3)
    resumed = _run(tmp_path / "b", digits, resume=True, **kw)
    # the resumed trainer holds the uninterrupted one's state bit for bit
    for m1, m2 in ((full_tr.model, resumed.model), (full_tr.ema, resumed.ema)):
        assert all(torch.equal(p, q) for p, q in zip(m1.state_dict().values(), m2.state_dict().values()))
    s1, s2 = full_tr.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(s1[i][k], s2[i][k]) for i in s1 for k in s1[i])
    assert torch.equal(full_tr.data.latents, resumed.data.latents)
    assert first == full
    # the next step draws the same batch, captions, noise and timesteps in both: the network's inputs are equal
    seen = {}
    for name, tr in (("full", full_tr), ("resumed", resumed)):
        h = tr.model.register_forward_hook(lambda m, i, o, n=name: seen.__setitem__(n, i))
        tr.train_step()
        h.remove()
    assert all(torch.equal(u, v) for u, v in zip(seen["full"], seen["resumed"]))
    assert any(k.startswith("text_encoder.") for k in full_tr.model.state_dict())
    other = _run(tmp_path / "c", digits, **{**kw, "seed": 1}).run(max_steps=3)
    assert other != full[:3]


@pytest.mark.xfail(strict=True, reason="open: after a resume, the latent text-conditioned run's step results differ from "
                   "the uninterrupted run's in the last bits (fp32; ~1e-5 under bf16) with bit-identical weights, "
                   "optimizer state and network inputs; pixel text-conditioned and latent class-conditioned runs "
                   "replay bit for bit")
def test_latent_text_run_resume_gives_the_same_final_weights(tmp_path, digits, ae_run):
    kw = dict(LDM, autoencoder=str(ae_run), max_steps=6, precision="fp32")
    full = _run(tmp_path / "a", digits, **kw).run()
    first = _run(tmp_path / "b", digits, **kw).run(max_steps=3)
    assert first + _run(tmp_path / "b", digits, resume=True, **kw).run() == full
    a, _, _, _ = load_checkpoint(tmp_path / "a")
    b, _, _, _ = load_checkpoint(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_captions_and_caption_dropout(tmp_path, digits, ae_run):
    names = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
    assert caption("sneaker") == "a photo of a sneaker" and caption("ankle-boot") == "a photo of an ankle boot"
    table = CaptionTable(names)
    assert table.tokenizer.decode(table.lookup(torch.tensor([9]), torch.tensor([0]), torch.tensor([False]))[0]) \
        == "a photo of an ankle boot"
    tr = _run(tmp_path / "ldm", digits, autoencoder=str(ae_run), max_steps=1, **{**LDM, "class_dropout": 0.5})
    seen = []
    h = tr.model.text_encoder.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    ids = []
    orig = tr.model.encode_text
    tr.model.encode_text = lambda x: (ids.append(x.clone()), orig(x))[1]
    tr.train_step()
    h.remove()
    batch = ids[0]
    empty = (batch == tr.captions.null_ids).all(1)
    assert 0 < int(empty.sum()) < len(batch)  # some captions dropped to "", not all
    # the text encoder ran once per distinct caption, and the batch was gathered from those rows
    assert len(seen[0]) == len(torch.unique(batch, dim=0))


def test_autoencoder_loss_goes_down_on_real_images(tmp_path, digits):
    losses = _run(tmp_path / "ae", digits, max_steps=16, **AE).run()
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses


def test_sd1_export_opens_in_diffusers(tmp_path, digits, ae_run):
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from fastdiff.io.sd_checkpoint import load_sd1_diffusers
    from fastdiff.train.export import export_sd1

    run = tmp_path / "ldm"
    _run(run, digits, autoencoder=str(ae_run), max_steps=2, **LDM).run()
    out = export_sd1(run, tmp_path / "sd1")
    ours = load_sd1_diffusers(out)
    _, ema, _, _ = load_checkpoint(run)
    assert all(torch.equal(ours.unet.state_dict()[k], ema["unet." + k]) for k in ours.unet.state_dict())
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(out, local_files_only=True, safety_checker=None)
    assert pipe.vae.config.scaling_factor == pytest.approx(ours.vae.config.scaling_factor)
    ids = ours.tokenizer([caption("sneaker"), ""])
    torch.testing.assert_close(pipe.tokenizer([caption("sneaker"), ""], padding="max_length", max_length=77,
                                              return_tensors="pt").input_ids, ids)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ctx = ours.text_encoder(ids)
        torch.testing.assert_close(pipe.text_encoder(ids).last_hidden_state, ctx, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pipe.unet(x, torch.tensor([10, 900]), ctx).sample,
                                   ours.unet(x, torch.tensor([10, 900]), ctx), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(pipe.vae.decode(x).sample, ours.vae.decode(x), rtol=1e-4, atol=1e-5)
    assert pipe.scheduler.config.prediction_type == "v_prediction"



def test_exported_pipeline_keeps_its_size_and_stored_defaults(tmp_path, digits, ae_run):
    """Size defaults as diffusers' StableDiffusionPipeline (UNet sample size x VAE downscale); the settings stored
    at export are what txt2img uses when not told, survive save_pretrained, and bad ones are refused by name."""
    from fastdiff.io.checkpoint import CheckpointError
    from fastdiff.pipelines.load import load_pipeline
    from fastdiff.train.export import export_sd1

    run = tmp_path / "ldm"
    _run(run, digits, autoencoder=str(ae_run), max_steps=1, **LDM).run()
    out = export_sd1(run, tmp_path / "sd1", defaults={"sampler": "ddim", "steps": 3, "guidance": 2.0})
    pipe = load_pipeline(out)
    side = pipe.unet.config.sample_size * pipe.vae.downscale
    assert side != 512 and (pipe.defaults.height, pipe.defaults.width) == (side, side)
    assert (pipe.defaults.sampler, pipe.defaults.steps, pipe.defaults.guidance) == ("ddim", 3, 2.0)
    calls = []
    x = pipe.txt2img(caption("sneaker"), seed=0, callback=lambda i, t, z: calls.append(i))
    assert x.shape == (1, 1, side, side) and len(calls) == 3
    told = pipe.txt2img(caption("sneaker"), seed=0, sampler="ddim", steps=3, guidance=2.0, height=side, width=side)
    assert torch.equal(x, told)
    pipe.save_pretrained(tmp_path / "again")
    assert load_pipeline(tmp_path / "again").defaults == pipe.defaults
    index = json.loads((out / "model_index.json").read_text())
    index["_fastdiff"]["defaults"]["steps"] = "many"
    (out / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="_fastdiff.defaults.steps has the wrong type: 'many'"):
        load_pipeline(out)


def test_eval_of_a_text_model_scores_its_caption_images(tmp_path, ae_run):
    """``fastdiff eval --checkpoint`` of an exported text-to-image folder and of the latent run itself: the images
    of each class's caption, scored as evaluate_images scores the pipeline's own txt2img output."""
    from fastdiff.cli import main
    from fastdiff.eval.evaluate import RealReference, evaluate_images
    from fastdiff.io.datasets import FASHION_MNIST_CLASSES
    from fastdiff.pipelines.load import load_pipeline
    from fastdiff.train.export import export_sd1

    digits32 = load_sklearn_digits(size=32)
    run = tmp_path / "ldm"
    _run(run, digits32, autoencoder=str(ae_run), max_steps=1, **{**LDM, "image_size": 32}).run()
    out = export_sd1(run, tmp_path / "sd1", dtype=None)  # the run's sample-grid settings: DDIM, 2 steps
    assert json.loads((out / "model_index.json").read_text())["_fastdiff"]["defaults"] == {
        "sampler": "ddim", "steps": LDM["sample_steps"], "guidance": 3.0}
    pipe = load_pipeline(out)
    per_class = 2
    images = torch.cat([pipe.txt2img(caption(name), num_images_per_prompt=per_class, seed=1_000_003 * c) * 2 - 1
                        for c, name in enumerate(FASHION_MNIST_CLASSES)])
    labels = torch.arange(10).repeat_interleave(per_class)
    want = evaluate_images(images, labels, reference=RealReference.build())
    for src in (out, run):
        assert main(["eval", "--checkpoint", str(src), "--per-class", str(per_class), "--json",
                     str(tmp_path / "e.json")]) == 0
        got = json.loads((tmp_path / "e.json").read_text())[0]
        assert got["n"] == 10 * per_class
        assert got["accuracy"] == pytest.approx(want.accuracy) and got["fid"] == pytest.approx(want.fid, rel=1e-6)


_GOOD = dict(COMMON, max_steps=2)


@pytest.mark.parametrize("field,value,message", [
    ("kind", "vae", "kind must be one of diffusion, autoencoder, lora, controlnet; got 'vae'"),
    ("conditioning", "caption", "conditioning must be one of class, text, sketch, sketch\\+class, segmentation; got "
                                "'caption'"),
    ("model", "fashion_f4", "model must be a class-conditioned UNet preset, one of"),
    ("text_encoder", "huge", "text_encoder must be one of"),
    ("recon_loss", "l3", "recon_loss must be one of l1, l2; got 'l3'"),
    ("schedule", "flow", "prediction flow goes with schedule flow"),
    ("prediction", "score", "prediction must be one of eps, v, x0, flow; got 'score'"),
    ("precision", "fp8", "precision must be one of bf16, fp32, fp16; got 'fp8'"),
    ("batch_size", 0, "batch_size must be a positive integer, got 0"),
    ("kl_weight", -1.0, "kl_weight must be >= 0, got -1.0"),
    ("class_dropout", 1.0, "class_dropout must be in [0, 1), got 1.0"),
    ("lr", 0.0, "lr must be positive, got 0.0"),
    ("ema_decay", 1.0, "ema_decay must be in [0, 1), got 1.0"),
    ("model_overrides", [1], "model_overrides must be a JSON object"),
])
def test_train_arguments_are_checked_up_front(tmp_path, digits, field, value, message):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        _run(run, digits, **{**_GOOD, field: value})
    assert not run.exists()  # nothing written


@pytest.mark.parametrize("extra,message", [
    (dict(kind="autoencoder", model="tiny", autoencoder="somewhere"), "autoencoder (latent diffusion) needs kind "
                                                                       "diffusion"),
    (dict(kind="autoencoder", model="fashion32"), "model must be an autoencoder preset"),
    (dict(conditioning="text", model="tiny", grad_checkpointing=True), "grad_checkpointing is available for"),
    (dict(model="tiny", autoencoder="runs/none", hflip=True), "hflip cannot be used with autoencoder"),
    (dict(kind="autoencoder", model="tiny", model_overrides={"channels": 3}), "model_overrides: "),
])
def test_train_argument_combinations_are_checked_up_front(tmp_path, digits, extra, message):
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _run(run, digits, **{**_GOOD, **extra})
    assert not run.exists()


def test_missing_autoencoder_is_one_line(tmp_path, digits):
    from fastdiff.io.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="not an autoencoder run folder"):
        _run(tmp_path / "run", digits, **{**_GOOD, "model": "tiny", "autoencoder": str(tmp_path / "nothing")})
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,message", [
    (["--kind", "vae"], "argument --kind: invalid choice: 'vae'"),
    (["--conditioning", "caption"], "argument --conditioning: invalid choice"),
    (["--kl-weight", "-1"], "argument --kl-weight"),
    (["--kind", "autoencoder", "--model", "fashion32"], "model must be an autoencoder preset, one of"),
    (["--kind", "controlnet", "--plan"], "--plan covers the diffusion, autoencoder and lora kinds"),
])
def test_cli_rejects_bad_arguments_in_one_line(tmp_path, args, message):
    run = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "fastdiff.train.cli", "train", "--run-dir", str(run),
                          "--dataset", "digits", "--image-size", "16", "--no-progress", *args],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) <= 2, res.stderr  # usage line + the error
    assert not run.exists()
