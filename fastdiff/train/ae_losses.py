"""Losses for training autoencoders (KL-VAE, VQ-VAE) without downloaded networks.

The recipe of taming-transformers (VQGAN, Esser et al. 2021) and latent diffusion's KL autoencoders:

    generator step:     L = rec_weight * |x - x^|  +  perceptual_weight * P(x, x^)
                            + kl_weight * KL  (KL-VAE)   or   quant_weight * L_vq  (VQ-VAE)
                            + gate(step) * lambda * (-mean D(x^))
    discriminator step: L_D = gate(step) * hinge(D(x), D(sg(x^)))

* reconstruction: L1 or L2, the per-pixel mean (:func:`reconstruction_loss`);
* KL of the diagonal Gaussian posterior to N(0, I), per latent element
  ``0.5 (mu^2 + sigma^2 - 1 - log sigma^2)`` (:func:`kl_divergence`); the composite loss takes its mean over
  every latent element. LDM sums both the reconstruction and the KL over a sample, so its ``kl_weight`` w
  is ``w * L / P`` here, with L latent and P pixel elements per sample (f8, 4 of 3 channels: ``w / 48``);
* PatchGAN discriminator (:class:`NLayerDiscriminator`, taming-transformers' shape and parameter names, so
  its ``loss.discriminator.*`` weights load by a strict copy) with the hinge loss
  ``0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x^)))`` and the generator term ``-mean D(x^)``;
* adaptive weight (VQGAN eq. 7): ``lambda = disc_weight * |grad_{w_L} L_rec| / (|grad_{w_L} L_GAN| + 1e-4)``,
  clamped to [0, 1e4] and detached, where w_L is the decoder's last weight (:func:`adaptive_weight`);
* the GAN terms start at step ``disc_start`` (:func:`gan_gate`); before it the discriminator is not run at all;
* perceptual term from a feature network the project trains itself (:class:`PerceptualLoss`): LPIPS's form
  (Zhang et al. 2018, eq. 1) without its learned channel weights, on the features of the Fashion-MNIST
  classifier of ``fastdiff.eval.classifier`` (:meth:`PerceptualLoss.from_fashion_classifier`). LPIPS itself
  needs VGG/AlexNet weights that are not shipped.

This module sits in ``fastdiff.train``, which may not import ``fastdiff.eval``: the caller loads the classifier
(``fastdiff.eval.classifier.load_classifier()``) and hands it in.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "reconstruction_loss",
    "kl_divergence",
    "NLayerDiscriminator",
    "hinge_d_loss",
    "vanilla_d_loss",
    "generator_adversarial_loss",
    "adaptive_weight",
    "gan_gate",
    "PerceptualLoss",
    "AutoencoderLoss",
]


def reconstruction_loss(x: torch.Tensor, x_rec: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Per-pixel mean of ``|x - x_rec|`` (``"l1"``) or ``(x - x_rec)^2`` (``"l2"``), computed in fp32."""
    if x.shape != x_rec.shape:
        raise ValueError(f"x {tuple(x.shape)} and x_rec {tuple(x_rec.shape)} must have the same shape")
    d = x.float() - x_rec.float()
    if kind == "l1":
        return d.abs().mean()
    if kind == "l2":
        return d.pow(2).mean()
    raise ValueError(f"kind must be 'l1' or 'l2', got {kind!r}")


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per element: ``0.5 (mean^2 + exp(logvar) - 1 - logvar)``.

    ``fastdiff.models.vae.DiagonalGaussian`` gives ``mean`` and its clamped ``logvar``.
    """
    m, lv = mean.float(), logvar.float()
    return 0.5 * (m.pow(2) + lv.exp() - 1.0 - lv)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix; taming-transformers' ``NLayerDiscriminator``): one logit per patch.

        conv4x4/2 (ndf) LeakyReLU(0.2)
        n_layers-1 x [conv4x4/2 (ndf * min(2^n, 8)) norm LeakyReLU]
        conv4x4/1 (ndf * min(2^n_layers, 8)) norm LeakyReLU
        conv4x4/1 (1)

    Parameters live in ``main`` with taming's indices. ``norm="batch"`` is taming's default (convs before a
    norm have no bias); ``"none"`` drops the norms (and keeps the biases), e.g. for data-parallel runs where
    BatchNorm statistics would differ between ranks. Init: conv weights N(0, 0.02), norm scales N(1, 0.02).
    A 32x32 input gives a 2x2 logit map with ``n_layers=3`` and 6x6 with ``n_layers=2``.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if norm not in ("batch", "none"):
            raise ValueError(f"norm must be 'batch' or 'none', got {norm!r}")
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        use_norm = norm == "batch"

        def block(cin, cout, stride):
            layers = [nn.Conv2d(cin, cout, 4, stride, 1, bias=not use_norm)]
            if use_norm:
                layers.append(nn.BatchNorm2d(cout))
            return layers + [nn.LeakyReLU(0.2, True)]

        seq: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            seq += block(ndf * prev, ndf * mult, 2)
        prev, mult = mult, min(2 ** n_layers, 8)
        seq += block(ndf * prev, ndf * mult, 1)
        seq.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*seq)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x^)))`` (geometric GAN; taming's ``hinge_d_loss``)."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``0.5 * (mean softplus(-D(x)) + mean softplus(D(x^)))``: the non-saturating GAN's discriminator loss."""
    return 0.5 * (F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean())


def generator_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """``-mean D(x^)``, the generator's side of the hinge GAN (taming uses it with either D loss)."""
    return -logits_fake.float().mean()


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor, *,
                    disc_weight: float = 1.0, max_weight: float = 1e4, eps: float = 1e-4) -> torch.Tensor:
    """VQGAN's balance of the GAN term: ``disc_weight * |grad rec| / (|grad gan| + eps)`` at ``last_layer``,
    clamped to [0, max_weight], detached. Both losses must depend on ``last_layer`` (the graph is kept)."""
    (g_rec,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (g_gan,) = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    w = g_rec.float().norm() / (g_gan.float().norm() + eps)
    return (w.clamp(0.0, max_weight) * disc_weight).detach()


def gan_gate(step: int, start: int) -> float:
    """1.0 from step ``start`` on, 0.0 before (taming's ``adopt_weight`` with value 0)."""
    return 1.0 if step >= start else 0.0


class PerceptualLoss(nn.Module):
    """``sum_l mean_hw |n(f_l(x)) - n(f_l(y))|^2`` with ``n`` the unit-normalisation over channels (LPIPS eq. 1
    with all channel weights 1), over the outputs of the named ``layers`` of a frozen ``network``.

    ``run(network, x)`` runs the network (forward hooks collect the layers' outputs); the default calls
    ``network(x)``. The network stays in eval mode (its BatchNorm statistics never change) and its parameters
    never take gradients; gradients flow to the images. Returns the batch mean.
    """

    def __init__(self, network: nn.Module, layers: Sequence[str],
                 run: Callable[[nn.Module, torch.Tensor], object] | None = None):
        super().__init__()
        if not layers:
            raise ValueError("layers must name at least one submodule of the network")
        self.network = network.eval().requires_grad_(False)
        self.layers = tuple(layers)
        self._run = run or (lambda net, x: net(x))
        self._modules_hooked = [network.get_submodule(name) for name in self.layers]  # raises on a bad name

    @classmethod
    def from_fashion_classifier(cls, classifier: nn.Module) -> "PerceptualLoss":
        """On the four conv blocks of ``fastdiff.eval.classifier.FashionClassifier`` (load it with
        ``load_classifier()``); inputs are (N, 1, 32, 32) images in [-1, 1], as the classifier takes them."""
        names = [f"blocks.{i}" for i in range(len(classifier.blocks))]
        return cls(classifier, names, run=lambda net, x: net.features(x))

    def train(self, mode: bool = True) -> "PerceptualLoss":
        super().train(mode)
        self.network.eval()
        return self

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        handles = [m.register_forward_hook(lambda _m, _i, o: out.append(o)) for m in self._modules_hooked]
        try:
            self._run(self.network, x)
        finally:
            for h in handles:
                h.remove()
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must have the same shape")
        total = x.new_zeros((), dtype=torch.float32)
        for f in self._features(torch.cat([x, y])):  # one pass over both: eval-mode BN treats samples apart
            a, b = f.float().chunk(2)
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + (a - b).pow(2).sum(1).mean()
        return total


class AutoencoderLoss(nn.Module):
    """Both steps of autoencoder training; the trainer runs two optimisers (autoencoder, discriminator).

    ``generator_loss(x, x_rec, step=..., last_layer=model.last_layer-ish, posterior=... | quant_loss=...)``
    and ``discriminator_loss(x, x_rec, step=...)`` return ``(loss, logs)``; ``logs`` holds detached scalars.
    ``discriminator=None`` trains without a GAN. During the generator step the discriminator's parameters do not
    require gradients (so its optimiser never sees a stale gradient from that step). With ``last_layer=None``
    (or without gradients, e.g. validation) the adaptive weight is replaced by ``disc_weight``.
    """

    def __init__(self, discriminator: nn.Module | None = None, *, rec: str = "l1", rec_weight: float = 1.0,
                 perceptual: PerceptualLoss | None = None, perceptual_weight: float = 1.0,
                 kl_weight: float = 1e-6, quant_weight: float = 1.0, disc_start: int = 0,
                 disc_weight: float = 0.5, disc_loss: str = "hinge", adaptive: bool = True):
        super().__init__()
        if rec not in ("l1", "l2"):
            raise ValueError(f"rec must be 'l1' or 'l2', got {rec!r}")
        if disc_loss not in ("hinge", "vanilla"):
            raise ValueError(f"disc_loss must be 'hinge' or 'vanilla', got {disc_loss!r}")
        if disc_start < 0:
            raise ValueError(f"disc_start must be >= 0, got {disc_start}")
        self.discriminator, self.perceptual = discriminator, perceptual
        self.rec, self.rec_weight, self.perceptual_weight = rec, rec_weight, perceptual_weight
        self.kl_weight, self.quant_weight = kl_weight, quant_weight
        self.disc_start, self.disc_weight, self.adaptive = disc_start, disc_weight, adaptive
        self._d_loss = hinge_d_loss if disc_loss == "hinge" else vanilla_d_loss

    def _gan_on(self, step: int) -> bool:
        return self.discriminator is not None and gan_gate(step, self.disc_start) > 0

    def generator_loss(self, x: torch.Tensor, x_rec: torch.Tensor, *, step: int,
                       last_layer: torch.Tensor | None = None, posterior=None,
                       quant_loss: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        rec = reconstruction_loss(x, x_rec, self.rec)
        nll = self.rec_weight * rec
        logs = {"rec": rec.detach()}
        if self.perceptual is not None and self.perceptual_weight:
            p = self.perceptual(x.float(), x_rec.float())
            nll = nll + self.perceptual_weight * p
            logs["perceptual"] = p.detach()
        loss = nll
        if posterior is not None:
            kl = kl_divergence(posterior.mean, posterior.logvar).mean()
            loss = loss + self.kl_weight * kl
            logs["kl"] = kl.detach()
        if quant_loss is not None:
            loss = loss + self.quant_weight * quant_loss
            logs["quant"] = quant_loss.detach()
        if self._gan_on(step):
            flags = [p.requires_grad for p in self.discriminator.parameters()]
            self.discriminator.requires_grad_(False)
            try:
                g = generator_adversarial_loss(self.discriminator(x_rec))
            finally:
                for p, f in zip(self.discriminator.parameters(), flags):
                    p.requires_grad_(f)
            if self.adaptive and last_layer is not None and torch.is_grad_enabled() and g.requires_grad:
                w = adaptive_weight(nll, g, last_layer, disc_weight=self.disc_weight)
            else:
                w = torch.tensor(self.disc_weight, device=g.device)
            loss = loss + w * g
            logs.update(g=g.detach(), disc_weight=w.detach())
        logs["loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, x: torch.Tensor, x_rec: torch.Tensor, *, step: int) -> tuple[torch.Tensor, dict]:
        """Zero (a constant, no discriminator run) before ``disc_start``; ``x_rec`` is detached here."""
        if not self._gan_on(step):
            z = torch.zeros((), device=x.device)
            return z, {"d_loss": z}
        real, fake = self.discriminator(x), self.discriminator(x_rec.detach())
        d = self._d_loss(real, fake)
        return d, {"d_loss": d.detach(), "logits_real": real.detach().float().mean(),
                   "logits_fake": fake.detach().float().mean()}
