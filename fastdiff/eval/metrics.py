"""Sample-quality metrics: Fréchet distance of feature Gaussians (FID) and conditional accuracy.

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
