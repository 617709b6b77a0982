"""ControlNet training (``fastdiff train --kind controlnet``) on a frozen tiny random SD1 UNet, controlled by
canny edge maps of a few captioned images.

Oracles: the base UNet's own output (a new ControlNet's zero convolutions make it a no-op, exactly); autograd
(gradients reach only ControlNet parameters); the loss on fixed noise before and after overfitting; diffusers'
``ControlNetModel.from_pretrained`` and ``fastdiff.load_controlnet`` reading the exported folder, residuals
within the ControlNet parity tolerance of tests/test_controlnet.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.control import canny
from fastdiff.models.controlnet import controlled_unet
from fastdiff.pipelines.sd1 import load_sd1
from fastdiff.train.adapters import CONTROLNET_DIR

from lowp import assert_close_fp32
from test_lora_train import _fixed_loss, _trainer as lora_trainer, write_images

diffusers = pytest.importorskip("diffusers")

BASE = dict(kind="controlnet", image_size=32, batch_size=3, lr=2e-3, warmup_steps=0, class_dropout=0.0,
            precision="fp32", sample_every=0, log_every=1, ckpt_every_steps=0, max_steps=8, seed=4, threads=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("cn_data"), layout="jsonl")


def _trainer(tmp_path, ref_folder, data, name="run", resume=False, **kw):
    return lora_trainer(tmp_path, ref_folder, data, name, resume, base=BASE, **kw)


def _inputs(tr, b=2):
    g = torch.Generator().manual_seed(7)
    cfg = tr.adapter.unet.config
    h = tr.cfg.image_size // tr.adapter.vae.downscale
    ctx = torch.randn(b, 77, cfg.cross_attention_dim, generator=g)
    hint = canny(tr.data.images[:b])
    return torch.randn(b, cfg.in_channels, h, h, generator=g), torch.tensor([999, 40][:b]), ctx, hint


def test_new_controlnet_is_exactly_the_base_unet(tmp_path, ref_folder, data):
    tr = _trainer(tmp_path, ref_folder, data)
    a = tr.adapter
    assert a.controls.shape == (len(tr.data), 3, 32, 32) and set(a.controls.unique().tolist()) == {0, 1}
    assert torch.equal(a.controls.float(), canny(tr.data.images))  # the control maps are the images' edges
    x, t, ctx, hint = _inputs(tr)
    with torch.no_grad():
        base = a.unet(x, t, ctx)
        ctrl = controlled_unet(a.unet, x, t, ctx, [(a.controlnet, hint, 1.0)])
    assert torch.equal(ctrl, base)


def test_gradients_reach_only_the_controlnet_and_the_loss_falls(tmp_path, ref_folder, data):
    d, _ = ref_folder
    tr = _trainer(tmp_path, ref_folder, data, max_steps=15, grad_checkpointing=True)
    a = tr.adapter
    frozen = [*a.unet.parameters(), *a.vae.parameters(), *a.text_encoder.parameters()]
    before = _fixed_loss(tr)
    losses = tr.run(max_steps=2)
    # after two steps the zero convolutions are no longer zero: a backward pass reaches every ControlNet weight
    tr.optimizer.zero_grad(set_to_none=True)
    a.loss(torch.arange(3), torch.Generator().manual_seed(0)).backward()
    assert all(p.grad is None for p in frozen)
    grads = [p.grad for p in a.controlnet.parameters()]
    assert all(g is not None for g in grads)
    assert sum(bool(g.abs().max() > 0) for g in grads) >= 0.9 * len(grads)
    tr.optimizer.zero_grad(set_to_none=True)
    losses += tr.run()
    after = _fixed_loss(tr)
    assert len(losses) == 15 and all(np.isfinite(losses))
    assert after < 0.8 * before, (before, after, losses)
    ref = load_sd1(d / "sd")
    assert all(torch.equal(v, ref.unet.state_dict()[k]) for k, v in a.unet.state_dict().items())


def test_exported_controlnet_loads_in_fastdiff_and_diffusers(tmp_path, ref_folder, data):
    tr = _trainer(tmp_path, ref_folder, data, max_steps=4, lr=2e-2)
    tr.run()
    folder = tmp_path / "run" / CONTROLNET_DIR
    ours = fastdiff.load_controlnet(folder)
    ref = diffusers.ControlNetModel.from_pretrained(folder, local_files_only=True).eval()
    x, t, ctx, hint = _inputs(tr)
    with torch.no_grad():
        want_down, want_mid = tr.adapter.controlnet(x, t, ctx, hint)
        down, mid = ours(x, t, ctx, hint)
        rdown, rmid = ref(x, t, ctx, hint, return_dict=False)
    assert want_mid.abs().max() > 1e-3  # trained: the residuals are no longer zero
    for a, b, c in zip(want_down, down, rdown):
        assert torch.equal(a, b)  # the same fastdiff module, loaded back bit-exactly
        assert_close_fp32(a, c)
    assert torch.equal(want_mid, mid)
    assert_close_fp32(want_mid, rmid)


def test_controlnet_resume_replays(tmp_path, ref_folder, data):
    full = _trainer(tmp_path, ref_folder, data, "a", max_steps=4, cache=True).run()
    first = _trainer(tmp_path, ref_folder, data, "b", max_steps=2, cache=True).run()
    rest = _trainer(tmp_path, ref_folder, data, "b", resume=True, max_steps=4, cache=True).run()
    assert first + rest == full


def test_train_cli_controlnet_recipe(tmp_path, ref_folder, data):
    """The README's Fashion ControlNet command, at tiny size (the tiny model, six images, two steps)."""
    from fastdiff.cli import main

    d, _ = ref_folder
    run = tmp_path / "cn"
    rc = main(["train", "--kind", "controlnet", "--base", str(d / "sd"), "--data", str(data), "--image-size", "32",
               "--run-dir", str(run), "--batch-size", "3", "--lr", "1e-4", "--warmup-steps", "100",
               "--class-dropout", "0.1", "--precision", "fp32", "--cache", "--max-steps", "2",
               "--ckpt-every-minutes", "10", "--threads", "1", "--no-progress"])
    assert rc == 0
    net = fastdiff.load_controlnet(run / CONTROLNET_DIR)
    assert net.config.hint_downscale == 2  # the tiny VAE's downscale
