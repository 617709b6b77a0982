"""LoRA fine-tuning (``fastdiff train --kind lora``) of a tiny random SD1 model on a few captioned images.

Oracles: the loss on fixed noise before and after overfitting; diffusers' ``load_lora_weights`` (peft) reading
both exported files, its UNet output and prompt embeddings against the trainer's own LoRA'd modules (within
the SD1 parity tolerance of tests/test_lora.py); fastdiff's ``pipe.load_lora`` reading both; the base weights
bit-equal to the checkpoint's after training; a resumed run replaying the uninterrupted one.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.io.datasets import DatasetError
from fastdiff.pipelines.sd1 import load_sd1
from fastdiff.train import TrainConfig, Trainer
from fastdiff.train.adapters import KOHYA_FILE, LORA_DIR, PEFT_FILE
from fastdiff.train.image_folder import load_captioned_folder

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

CAPTIONS = ["a red square", "a blue circle", "a green stripe", "a yellow cross", "a white ring", "a black dot"]


def write_images(folder, n=6, size=32, layout="txt"):
    """``n`` small synthetic images (shapes in colours) with captions, as ``image.png`` + ``image.txt`` or a
    ``metadata.jsonl``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    rows = []
    for i in range(n):
        img = np.full((size, size, 3), 30 * i, np.uint8)
        cy, cx, r = rng.integers(8, size - 8, 2).tolist() + [int(rng.integers(4, 8))]
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r if i % 2 else (abs(yy - cy) < r) & (abs(xx - cx) < r)
        img[mask] = rng.integers(0, 256, 3, dtype=np.uint8)
        name = f"img{i}.png"
        Image.fromarray(img).save(folder / name)
        if layout == "txt":
            (folder / f"img{i}.txt").write_text(CAPTIONS[i % len(CAPTIONS)] + "\n")
        rows.append({"file_name": name, "text": CAPTIONS[i % len(CAPTIONS)]})
    if layout == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("lora_data"))


BASE = dict(kind="lora", image_size=32, batch_size=3, lr=1e-2, warmup_steps=0, class_dropout=0.0, precision="fp32",
            rank=4, alpha=2.0, sample_every=0, log_every=1, ckpt_every_steps=0, max_steps=8, ema_decay=0.9, seed=3, threads=1)


def _trainer(tmp_path, ref_folder, data, name="run", resume=False, base=None, **kw):
    """A Trainer of the run ``name`` on the tiny random SD1 folder; ``base``: the kind's settings (BASE here)."""
    d, _ = ref_folder
    cfg = TrainConfig(run_dir=str(tmp_path / name), base=str(d / "sd"), data=str(data), **{**(base or BASE), **kw})
    return Trainer(cfg, resume=resume, progress=False)


def _fixed_loss(tr, seed=11, draws=4):
    """The training loss on every image with fixed noise and timesteps (an evaluation, no gradients)."""
    with torch.no_grad():
        idx = torch.arange(len(tr.data))
        return sum(tr.adapter.loss(idx, torch.Generator().manual_seed(seed + k)).item() for k in range(draws)) / draws


# ---------------------------------------------------------------------------------------------------- data
def test_captioned_folder_layouts(tmp_path):
    a = load_captioned_folder(write_images(tmp_path / "txt", n=4), size=16)
    b = load_captioned_folder(write_images(tmp_path / "jsonl", n=4, layout="jsonl"), size=16)
    assert a.images.shape == (4, 3, 16, 16) and a.images.dtype == torch.uint8
    assert a.captions == b.captions == CAPTIONS[:4]
    assert torch.equal(a.images, b.images)
    (tmp_path / "txt" / "img1.txt").unlink()
    with pytest.raises(DatasetError, match="img1.png"):
        load_captioned_folder(tmp_path / "txt", size=16)
    (tmp_path / "jsonl" / "metadata.jsonl").write_text('{"file_name": "missing.png", "text": "x"}\n')
    with pytest.raises(DatasetError, match="missing.png"):
        load_captioned_folder(tmp_path / "jsonl", size=16)


# ------------------------------------------------------------------------------------------------ training
def test_lora_training_changes_only_lora_and_the_loss_falls(tmp_path, ref_folder, data):
    d, _ = ref_folder
    tr = _trainer(tmp_path, ref_folder, data, max_steps=12, lora_text_encoder=True, grad_checkpointing=True)
    a = tr.adapter
    n_targets = sum(1 for k, _ in a.trainable.targets if k == "unet")
    n_transformers = sum(type(m).__name__ == "Transformer2D" for m in a.unet.modules())
    assert n_transformers == 6 and n_targets == 8 * n_transformers  # q, k, v, out of attn1 and attn2 each
    assert {k for k, _ in a.trainable.targets} == {"unet", "text_encoder"}
    base = load_sd1(d / "sd")
    before = _fixed_loss(tr)
    losses = tr.run()
    after = _fixed_loss(tr)
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert after < 0.8 * before, (before, after, losses)
    # the base weights are bit-equal to the checkpoint's; every LoRA factor moved
    for name, ours, ref in (("unet", a.unet, base.unet), ("text_encoder", a.text_encoder, base.text_encoder),
                            ("vae", a.vae, base.vae)):
        got, want = ours.state_dict(), ref.state_dict()
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[k], want[k]) for k in want), name
    assert all(u.abs().max() > 0 for u in a.trainable.up)
    # the optimizer holds the LoRA factors and nothing else
    opt = [p for group in tr.optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in opt} == {id(p) for p in a.trainable.parameters()}


def _unet_inputs(cfg):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(2, cfg.in_channels, 8, 8, generator=g), torch.tensor([20, 800]),
            torch.randn(2, 7, cfg.cross_attention_dim, generator=g))


def _close(ours, want, base, rel=2e-5):
    """test_lora.py's rule: fp32 parity within ``rel`` of the reference's magnitude, and the LoRA moved it."""
    scale = want.abs().max().item()
    moved = (want - base).abs().max().item()
    assert moved > 1e3 * rel * scale, f"the LoRA barely changes the output ({moved:.3g} vs scale {scale:.3g})"
    err = (ours - want).abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_exported_lora_loads_in_diffusers_and_fastdiff(tmp_path_factory, ref_folder, data, fmt):
    d, _ = ref_folder
    run = tmp_path_factory.getbasetemp() / "lora_export_run"
    if not (run / LORA_DIR / PEFT_FILE).exists():
        tr = Trainer(TrainConfig(run_dir=str(run), base=str(d / "sd"), data=str(data),
                                 **{**BASE, "max_steps": 6, "lora_text_encoder": True}), progress=False)
        tr.run()
        x, t, ctx = _unet_inputs(tr.adapter.unet.config)
        with torch.no_grad():
            torch.save({"unet": tr.adapter.unet(x, t, ctx), "text": tr.adapter.text_encoder(
                tr.adapter.tokenizer(CAPTIONS[:2]))}, run / "trained_outputs.pt")
    trained = torch.load(run / "trained_outputs.pt")
    path = run / LORA_DIR / (PEFT_FILE if fmt == "peft" else KOHYA_FILE)

    base = load_sd1(d / "sd")
    x, t, ctx = _unet_inputs(base.unet.config)
    with torch.no_grad():
        base_u = base.unet(x, t, ctx)
        base_t = base.encode_prompt(CAPTIONS[:2])
    # fastdiff's own reader
    base.load_lora(path, name="trained")
    with torch.no_grad():
        _close(base.unet(x, t, ctx), trained["unet"], base_u)
        _close(base.encode_prompt(CAPTIONS[:2]), trained["text"], base_t)
    # diffusers' reader (peft)
    ref = diffusers.StableDiffusionPipeline.from_pretrained(d / "sd", local_files_only=True)
    ref.load_lora_weights(str(path), adapter_name="trained")
    with torch.no_grad():
        _close(trained["unet"], ref.unet(x, t, ctx).sample, base_u)
        _close(trained["text"], ref.encode_prompt(CAPTIONS[:2], "cpu", 1, False)[0], base_t)


def test_cached_latents_and_text_give_the_same_losses(tmp_path, ref_folder, data):
    plain = _trainer(tmp_path, ref_folder, data, "plain", max_steps=3).run()
    cached = _trainer(tmp_path, ref_folder, data, "cached", max_steps=3, cache=True).run()
    np.testing.assert_allclose(cached, plain, rtol=1e-5)


def test_lora_resume_replays_the_uninterrupted_run(tmp_path, ref_folder, data):
    full = _trainer(tmp_path, ref_folder, data, "a", max_steps=6).run()
    first = _trainer(tmp_path, ref_folder, data, "b", max_steps=3).run()
    rest = _trainer(tmp_path, ref_folder, data, "b", resume=True, max_steps=6).run()
    assert first + rest == full
    with pytest.raises(Exception, match="rank"):
        _trainer(tmp_path, ref_folder, data, "b", resume=True, max_steps=8, rank=8)


def test_train_cli_lora(tmp_path, ref_folder, data):
    from fastdiff.cli import main

    d, _ = ref_folder
    run = tmp_path / "cli"
    rc = main(["train", "--kind", "lora", "--base", str(d / "sd"), "--data", str(data), "--run-dir", str(run),
               "--rank", "2", "--alpha", "2", "--image-size", "32", "--batch-size", "2", "--max-steps", "2",
               "--precision", "bf16", "--cache", "--sample-every", "0", "--threads", "1", "--no-progress"])
    assert rc == 0
    assert (run / LORA_DIR / PEFT_FILE).is_file() and (run / LORA_DIR / KOHYA_FILE).is_file()
    with pytest.raises(SystemExit) as e:  # checked when parsed: the folder must exist
        main(["train", "--kind", "lora", "--base", str(d / "sd"), "--data", str(tmp_path / "nowhere"),
              "--run-dir", str(tmp_path / "x")])
    assert e.value.code == 2
    # an image without its caption: one line naming it, exit status 2
    bad = write_images(tmp_path / "bad", n=2)
    (bad / "img0.txt").unlink()
    assert main(["train", "--kind", "lora", "--base", str(d / "sd"), "--data", str(bad),
                 "--run-dir", str(tmp_path / "y"), "--image-size", "32", "--batch-size", "1"]) == 2


# ------------------------------------------------------------------------------------------------ memory plan
def test_lora_plan_meta_count_equals_a_real_pass():
    """The plan counts saved tensors on meta tensors; the same pass on real CPU tensors keeps the same bytes."""
    from fastdiff.models import clip_text, unet_sd
    from fastdiff.ops import use_backend
    from fastdiff.train.adapter_plan import measure_lora_activations

    for ck in (False, True):
        kw = dict(latent_size=8, rank=4, precision="fp32", text_lora=True, grad_checkpointing=ck)
        meta = measure_lora_activations(unet_sd.TINY, clip_text.TINY, **kw)
        with use_backend("ref"):
            cpu = measure_lora_activations(unet_sd.TINY, clip_text.TINY, device="cpu", **kw)
        assert meta.probes == cpu.probes, ck
        assert meta.per_sample > 0


def test_lora_plan_sd15_512_fits_16gb(capsys):
    from fastdiff.cli import main
    from fastdiff.train.adapter_plan import lora_plan

    p = lora_plan(image_size=512, rank=4, precision="bf16", batch_size=1, cache=True)
    # SD1.5's UNet, CLIP ViT-L/14 text encoder and VAE (runwayml/stable-diffusion-v1-5): 859,520,964 +
    # 123,060,480 + 83,653,863
    assert p.base_parameters == 859_520_964 + 123_060_480 + 83_653_863
    assert p.lora_parameters == 797_184  # rank 4 on q, k, v, out of the 32 attention layers
    usable = p.gpu_memory - p.reserve
    assert p.total(1) <= usable and p.max_batch() >= 1
    ck = p.activations_checkpointed
    assert 0 < ck.per_sample < p.activations.per_sample
    assert main(["train", "--kind", "lora", "--plan", "--image-size", "512", "--batch-size", "1"]) == 0
    out = capsys.readouterr().out
    assert "memory plan: LoRA rank 4" in out and "does not fit" not in out
