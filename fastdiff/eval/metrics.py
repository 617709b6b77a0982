"""Sample-quality metrics: Fréchet distance of feature Gaussians (FID) and conditional accuracy; for
autoencoders PSNR, SSIM, reconstruction FID and codebook usage (:func:`reconstruction_metrics`).

Fréchet distance between N(mu1, S1) and N(mu2, S2) (Dowson & Landau 1982; FID: Heusel et al. 2017, eq. 6):

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

``S1 S2`` is not symmetric, so ``scipy.linalg.sqrtm`` of it returns a complex matrix whose imaginary part is
rounding noise (pytorch-fid discards it and adds eps to the diagonal when the result is singular). Here the
trace is computed without a non-symmetric square root: with A = S1^(1/2) (symmetric, from an eigen-
decomposition), ``S1 S2 = A (A S2 A) A^-1`` is similar to the symmetric PSD matrix ``M = A S2 A``, so they share
eigenvalues and

    tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(M)),

all in float64 with real arithmetic. Eigenvalues at the rounding level of the decomposition (covariances of
fewer samples than dimensions are singular, and rounding leaves +-1e-16-sized eigenvalues there) are set to
zero; that is exact for a PSD matrix up to the rounding it repairs. No eps is added, so a set compared with itself gives ~0 (up to float64 rounding).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

__all__ = [
    "GaussianStats",
    "gaussian_stats",
    "frechet_distance",
    "fid_from_features",
    "extract_features",
    "conditional_accuracy",
    "psnr",
    "ssim",
    "reconstruction_fid",
    "codebook_usage",
    "reconstruction_metrics",
]


@dataclass(frozen=True)
class GaussianStats:
    """Mean and covariance (float64) of a feature set, plus how many samples they came from."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    def __post_init__(self):
        if self.mu.ndim != 1 or self.sigma.shape != (self.mu.shape[0],) * 2:
            raise ValueError(f"mu {self.mu.shape} and sigma {self.sigma.shape} do not describe one Gaussian")


def gaussian_stats(features: np.ndarray | torch.Tensor) -> GaussianStats:
    """Fit a Gaussian to (N, D) features: sample mean and unbiased covariance (``np.cov``'s N-1), in float64."""
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().double().numpy()
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 samples to estimate a covariance, got {f.shape[0]}")
    if not np.isfinite(f).all():
        raise ValueError("features contain NaN or inf (did the generator diverge?)")
    mu = f.mean(axis=0)
    centered = f - mu
    sigma = centered.T @ centered / (f.shape[0] - 1)
    return GaussianStats(mu, sigma, f.shape[0])


def _psd_eigvals_floor(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with rounding noise set to exactly 0.

    ``eigh`` returns each eigenvalue with an absolute error of about ``d * eps * max|lambda|``; below that an
    eigenvalue cannot be told from 0. Zeroing them matters because sqrt is steep at 0: a 1e-15 left in would
    add sqrt(1e-15) ~ 3e-8 (times the scale) per null direction to the trace of a singular covariance's root.
    """
    tol = w.shape[0] * np.finfo(np.float64).eps * max(float(np.abs(w).max(initial=0.0)), 1e-300)
    return np.where(w > tol, w, 0.0)


def _sym_sqrt(s: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix by eigen-decomposition."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(_psd_eigvals_floor(w))) @ v.T


def frechet_distance(mu1, sigma1, mu2=None, sigma2=None) -> float:
    """Squared Fréchet distance of two Gaussians; accepts arrays or two :class:`GaussianStats`.

    ``frechet_distance(stats_a, stats_b)`` or ``frechet_distance(mu1, sigma1, mu2, sigma2)``.
    """
    if isinstance(mu1, GaussianStats) and isinstance(sigma1, GaussianStats) and mu2 is None and sigma2 is None:
        mu1, sigma1, mu2, sigma2 = mu1.mu, mu1.sigma, sigma1.mu, sigma1.sigma
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, sigma2 {s2.shape}")
    a = _sym_sqrt(s1)
    m = a @ s2 @ a
    tr_sqrt = np.sqrt(_psd_eigvals_floor(np.linalg.eigvalsh((m + m.T) / 2))).sum()
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt
    # The exact value is >= 0; rounding can leave a -1e-12 for identical inputs.
    return float(max(fd, 0.0))


def fid_from_features(feat_a, feat_b) -> float:
    """FID between two (N, D) feature sets."""
    return frechet_distance(gaussian_stats(feat_a), gaussian_stats(feat_b))


@torch.no_grad()
def extract_features(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Apply a feature network to images in batches; returns float64 (N, D) on the CPU."""
    if len(images) == 0:
        raise ValueError("no images to evaluate")
    out = [fn(images[i:i + batch]).double().cpu() for i in range(0, len(images), batch)]
    return torch.cat(out)


@torch.no_grad()
def conditional_accuracy(classifier: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                         batch: int = 500) -> tuple[float, torch.Tensor]:
    """Share of ``images`` the classifier assigns to their requested ``labels``; also the per-class shares.

    For generated samples the label is the class the generator was asked for; for real images it is the true
    label, and the number is then the classifier's ordinary accuracy.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.shape != (len(images),):
        raise ValueError(f"need one label per image: {len(images)} images, labels of shape {tuple(labels.shape)}")
    num_classes = classifier.config.num_classes if hasattr(classifier, "config") else None
    if num_classes is not None and len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    classifier.eval()
    pred = torch.cat([classifier(images[i:i + batch]).argmax(1).cpu() for i in range(0, len(images), batch)])
    hit = (pred == labels).double()
    n_cls = num_classes or int(labels.max()) + 1
    per_class = torch.full((n_cls,), float("nan"), dtype=torch.float64)
    for c in range(n_cls):
        m = labels == c
        if m.any():
            per_class[c] = hit[m].mean()
    return float(hit.mean()), per_class


# ------------------------------------------------------------------------------------- autoencoder metrics
def _pair(x: torch.Tensor, y: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"{what} needs two (N, C, H, W) batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    return x.detach().double().cpu(), y.detach().double().cpu()


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, ``10 log10(data_range^2 / MSE)`` in dB (float64, (N,)); ``inf``
    for identical images. ``data_range`` is max - min of the pixel scale: 2 for [-1, 1], 1 for [0, 1]."""
    x, y = _pair(x, y, "psnr")
    mse = (x - y).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range ** 2 / mse)


def _gaussian_window(sigma: float, truncate: float = 3.5) -> torch.Tensor:
    # scipy.ndimage.gaussian_filter's kernel: radius int(truncate * sigma + 0.5), weights exp(-x^2 / 2 sigma^2)
    r = int(truncate * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (t / sigma) ** 2)
    return w / w.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03) -> torch.Tensor:
    """Mean structural similarity per image (Wang et al. 2004, eq. 13), float64 (N,).

    Local statistics under an 11x11 Gaussian window (sigma 1.5, normalised; population, not sample,
    (co)variances), ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2`` with L = ``data_range``:

        SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))

    averaged over the positions where the window fits inside the image and over channels: scikit-image's
    ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``.
    """
    x, y = _pair(x, y, "ssim")
    w1 = _gaussian_window(sigma)
    n, c, h, w = x.shape
    if min(h, w) < len(w1):
        raise ValueError(f"ssim needs images of at least {len(w1)}x{len(w1)} pixels (the window), got {h}x{w}")

    def blur(t):  # separable Gaussian, 'valid' positions only, each channel on its own
        t = t.reshape(n * c, 1, h, w)
        t = torch.nn.functional.conv2d(t, w1.view(1, 1, -1, 1))
        return torch.nn.functional.conv2d(t, w1.view(1, 1, 1, -1))

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.reshape(n, -1).mean(1)


def reconstruction_fid(feature_fn: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor,
                       reconstructed: torch.Tensor, batch: int = 500) -> float:
    """FID between the features of images and of their reconstructions (rFID), e.g. with the Fashion-MNIST
    classifier's ``features``."""
    return fid_from_features(extract_features(feature_fn, real, batch), extract_features(feature_fn, reconstructed, batch))


def codebook_usage(indices: torch.Tensor, num_codes: int) -> dict[str, float]:
    """Of a VQ model's code indices (any shape): the share of the ``num_codes`` codes used, how many, and the
    perplexity ``exp(H)`` of the code histogram (``num_codes`` for a uniform use)."""
    from fastdiff.models.vq import codebook_perplexity

    idx = torch.as_tensor(indices).flatten().long().cpu()
    if idx.numel() and (idx.min() < 0 or idx.max() >= num_codes):
        raise ValueError(f"indices must be in [0, {num_codes}), got range [{int(idx.min())}, {int(idx.max())}]")
    counts = torch.bincount(idx, minlength=num_codes)
    used = int((counts > 0).sum())
    return {"codes_used": used, "usage": used / num_codes, "perplexity": float(codebook_perplexity(counts))}


@torch.no_grad()
def reconstruction_metrics(images: torch.Tensor, reconstructed: torch.Tensor, *, data_range: float = 2.0,
                           feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                           indices: torch.Tensor | None = None, num_codes: int | None = None) -> dict[str, float]:
    """Mean PSNR and SSIM of reconstructions; rFID with ``feature_fn``; codebook usage with ``indices``."""
    out = {"n": len(images),
           "psnr": float(psnr(images, reconstructed, data_range).mean()),
           "ssim": float(ssim(images, reconstructed, data_range).mean())}
    if feature_fn is not None:
        out["rfid"] = reconstruction_fid(feature_fn, images, reconstructed)
    if indices is not None:
        if num_codes is None:
            raise ValueError("num_codes is needed with indices")
        out.update(codebook_usage(indices, num_codes))
    return out
