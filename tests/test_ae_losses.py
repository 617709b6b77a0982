"""Autoencoder losses against closed forms and independent computations.

Oracles: the hinge loss worked by hand; torch.distributions' KL; the adaptive weight recomputed from
``.backward()`` gradients (not ``autograd.grad``); taming-transformers' discriminator key layout; the
perceptual term's zero on identical images and growth with noise.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastdiff.models.vae import DiagonalGaussian
from fastdiff.train.ae_losses import (AutoencoderLoss, NLayerDiscriminator, PerceptualLoss, adaptive_weight,
                                      gan_gate, generator_adversarial_loss, hinge_d_loss, kl_divergence,
                                      reconstruction_loss, vanilla_d_loss)


def test_hinge_and_vanilla_closed_form():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.3, 1.5])
    # relu(1 - real) = [0, 0.5, 2], relu(1 + fake) = [0, 1.3, 2.5]
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3.8 / 3))
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    want = 0.5 * (sum(sp(-r) for r in real.tolist()) / 3 + sum(sp(f) for f in fake.tolist()) / 3)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(want, rel=1e-6)
    assert generator_adversarial_loss(fake).item() == pytest.approx(-(-2.0 + 0.3 + 1.5) / 3)


def test_reconstruction_and_kl():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    assert reconstruction_loss(x, y, "l1").item() == pytest.approx((x - y).abs().sum().item() / x.numel(), rel=1e-6)
    assert reconstruction_loss(x, y, "l2").item() == pytest.approx(((x - y) ** 2).sum().item() / x.numel(), rel=1e-6)
    with pytest.raises(ValueError, match="kind"):
        reconstruction_loss(x, y, "l3")
    mean, logvar = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mean, (0.5 * logvar).exp()),
                                            torch.distributions.Normal(0.0, 1.0))
    torch.testing.assert_close(kl_divergence(mean, logvar), ref)


def test_discriminator_layout_and_shapes():
    d = NLayerDiscriminator(in_channels=3, ndf=64, n_layers=3)
    # taming-transformers' VQGAN checkpoints: loss.discriminator.main.{0,2,3,5,6,8,9,11}.*
    want = {"main.0.weight", "main.0.bias", "main.2.weight", "main.5.weight", "main.8.weight", "main.11.weight",
            "main.11.bias"}
    for i in (3, 6, 9):
        want |= {f"main.{i}.{s}" for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert set(d.state_dict()) == want
    assert d.main[2].weight.shape == (128, 64, 4, 4) and d.main[8].weight.shape == (512, 256, 4, 4)
    assert d(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    d2 = NLayerDiscriminator(in_channels=1, ndf=8, n_layers=2, norm="none")
    assert d2(torch.zeros(1, 1, 32, 32)).shape == (1, 1, 6, 6)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in d2.modules())
    with pytest.raises(ValueError, match="norm"):
        NLayerDiscriminator(norm="layer")


class _TinyDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.conv_out = nn.Conv2d(8, 1, 3, padding=1)

    def forward(self, z):
        return self.conv_out(torch.nn.functional.silu(self.conv(z)))


def _setup(seed=0):
    torch.manual_seed(seed)
    dec = _TinyDecoder()
    disc = NLayerDiscriminator(in_channels=1, ndf=8, n_layers=2, norm="none")
    z = torch.randn(4, 4, 16, 16)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    return dec, disc, z, x


def test_adaptive_weight_equals_backward_ratio():
    dec, disc, z, x = _setup()
    x_rec = dec(z)
    rec = reconstruction_loss(x, x_rec)
    g = generator_adversarial_loss(disc(x_rec))
    w = adaptive_weight(rec, g, dec.conv_out.weight, disc_weight=0.5)
    # independently: gradients accumulated by .backward() on fresh graphs
    dec.zero_grad()
    reconstruction_loss(x, dec(z)).backward()
    a = dec.conv_out.weight.grad.norm().item()
    dec.zero_grad()
    generator_adversarial_loss(disc(dec(z))).backward()
    b = dec.conv_out.weight.grad.norm().item()
    assert w.item() == pytest.approx(0.5 * a / (b + 1e-4), rel=1e-5)
    assert not w.requires_grad
    # eps keeps a vanishing GAN gradient finite (|grad rec| / 1e-4); the clamp caps the ratio at 1e4
    tiny = 1e-12 * g
    assert adaptive_weight(rec, tiny, dec.conv_out.weight).item() == pytest.approx(a / 1e-4, rel=1e-4)
    assert adaptive_weight(1e6 * rec, tiny, dec.conv_out.weight).item() == pytest.approx(1e4)


def test_composite_generator_loss_and_warmup_gate():
    dec, disc, z, x = _setup(1)
    calls = []
    disc.register_forward_hook(lambda *a: calls.append(1))
    crit = AutoencoderLoss(disc, rec="l1", disc_start=10, disc_weight=0.8, kl_weight=0.1)
    moments = torch.randn(4, 8, 4, 4)
    post = DiagonalGaussian(moments)
    assert gan_gate(9, 10) == 0.0 and gan_gate(10, 10) == 1.0

    # before the start: reconstruction + KL only, the discriminator is never run
    x_rec = dec(z)
    loss, logs = crit.generator_loss(x, x_rec, step=9, last_layer=dec.conv_out.weight, posterior=post)
    want = reconstruction_loss(x, x_rec) + 0.1 * kl_divergence(post.mean, post.logvar).mean()
    torch.testing.assert_close(loss, want)
    assert "g" not in logs
    d_loss, _ = crit.discriminator_loss(x, x_rec, step=9)
    assert d_loss.item() == 0.0 and not d_loss.requires_grad
    assert calls == []

    # from the start: + lambda * g with lambda the adaptive weight, and the D loss is the hinge
    loss, logs = crit.generator_loss(x, x_rec, step=10, last_layer=dec.conv_out.weight, posterior=post)
    rec = reconstruction_loss(x, x_rec)
    g = generator_adversarial_loss(disc(x_rec))
    lam = adaptive_weight(rec, g, dec.conv_out.weight, disc_weight=0.8)
    torch.testing.assert_close(logs["disc_weight"], lam)
    torch.testing.assert_close(loss, rec + 0.1 * kl_divergence(post.mean, post.logvar).mean() + lam * g)
    loss.backward()
    assert all(p.grad is None for p in disc.parameters())  # the generator step leaves D alone
    assert all(p.requires_grad for p in disc.parameters())
    d_loss, dlogs = crit.discriminator_loss(x, x_rec, step=10)
    torch.testing.assert_close(d_loss, hinge_d_loss(disc(x), disc(x_rec.detach())))
    d_loss.backward()
    assert all(p.grad is not None for p in disc.parameters())


def _blob_images(n=8, seed=0):
    """Smooth synthetic garments: a few Gaussian blobs on a dark background, (n, 1, 32, 32) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    img = torch.zeros(n, 32, 32)
    for i in range(n):
        for _ in range(3):
            cy, cx = (torch.rand(2, generator=g) * 16 + 8).tolist()
            sy, sx = (torch.rand(2, generator=g) * 5 + 2).tolist()
            img[i] += torch.exp(-((yy - cy) ** 2 / (2 * sy ** 2) + (xx - cx) ** 2 / (2 * sx ** 2)))
    return (img.clamp(0, 1) * 2 - 1)[:, None]


def test_perceptual_zero_for_identical_and_grows_with_noise():
    from fastdiff.eval.classifier import load_classifier

    clf = load_classifier()
    loss = PerceptualLoss.from_fashion_classifier(clf)
    x = _blob_images()
    assert loss(x, x).item() == 0.0
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=g)
    values = [loss(x, (x + s * noise).clamp(-1, 1)).item() for s in (0.02, 0.05, 0.1, 0.2, 0.4)]
    assert all(b > a for a, b in zip(values, values[1:])), values
    assert values[0] > 0
    # gradients reach the images, never the frozen classifier, and train() keeps its BatchNorm in eval
    y = (x + 0.1 * noise).requires_grad_(True)
    loss.train()
    loss(x, y).backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in clf.parameters())
    assert not clf.training
    with pytest.raises(ValueError, match="classifier expects"):
        loss(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32))
