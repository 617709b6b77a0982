"""Evaluate a set of images (generated or real) against real Fashion-MNIST: the numbers ``fastdiff eval`` prints.

For N images (optionally each with the class it was generated for):

- conditional accuracy: the share the shipped classifier assigns to the requested class, printed beside the
  classifier's accuracy on the 10,000 real test images (the ceiling a perfect generator would reach);
- FID on the classifier's 128-d features against the whole real test split;
- the real-vs-real floor: the same FID for N real *train* images (drawn with the images' class histogram when
  labels are given) against the test split. FID is biased upwards for small N, so a model's FID is only
  meaningful next to the floor at the same N;
- Inception FID (2048-d pool3 features of the FID InceptionV3) when the user gives its weights file.
"""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any
from pathlib import Path

import numpy as np
import torch

from fastdiff import settings
from fastdiff.eval import classifier as _classifier_module
from fastdiff.eval.classifier import DEFAULT_CLASSIFIER_PATH, FashionClassifier, load_classifier
from fastdiff.eval.data import FASHION_CLASSES, fashion_mnist_dir, load_fashion_mnist
from fastdiff.eval.metrics import (
    GaussianStats,
    conditional_accuracy,
    extract_features,
    frechet_distance,
    gaussian_stats,
)

__all__ = ["EvalReport", "RealReference", "evaluate_images", "format_table", "check_images"]


def check_images(images: torch.Tensor) -> torch.Tensor:
    """Validate (N, 1, 32, 32) float images in [-1, 1] and clamp tiny overshoots (as saving a PNG would)."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError("images must be a float tensor (N, 1, 32, 32) in [-1, 1]")
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 32, 32):
        raise ValueError(f"images must be (N, 1, 32, 32) in [-1, 1] (Fashion-MNIST model space), got {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf")
    return images.float().clamp(-1.0, 1.0)


@dataclass
class RealReference:
    """The real data side of every comparison, computed once per classifier and data folder."""

    classifier: FashionClassifier
    test_images: torch.Tensor
    test_labels: torch.Tensor
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_features: torch.Tensor  # (10000, D) float64, the classifier's features of the test split
    test_logits: torch.Tensor    # (10000, classes), from the same forward pass
    test_stats: GaussianStats
    test_accuracy: float

    @classmethod
    def build(cls, classifier_path: str | os.PathLike | None = None, root: str | os.PathLike | None = None) -> "RealReference":
        return _cached_reference(str(classifier_path or DEFAULT_CLASSIFIER_PATH), str(root or fashion_mnist_dir()))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return extract_features(self.classifier.features, images)

    def train_subset(self, n: int, labels: torch.Tensor | None, seed: int = 0) -> torch.Tensor:
        """``n`` train images; with ``labels``, with the same per-class counts (a stratified draw)."""
        g = torch.Generator().manual_seed(seed)
        if labels is None:
            if n > len(self.train_images):
                raise ValueError(f"the floor needs {n} train images; the train split has {len(self.train_images)}")
            return self.train_images[torch.randperm(len(self.train_images), generator=g)[:n]]
        picks = []
        for c, count in enumerate(torch.bincount(labels, minlength=len(FASHION_CLASSES)).tolist()):
            pool = (self.train_labels == c).nonzero().squeeze(1)
            if count > len(pool):
                raise ValueError(f"the floor needs {count} train images of class {c}; the split has {len(pool)}")
            picks.append(pool[torch.randperm(len(pool), generator=g)[:count]])
        return self.train_images[torch.cat(picks)]


def _cache_path(classifier_path: str, x_test: torch.Tensor) -> Path | None:
    """Where the test split's classifier features are cached: keyed by the SHA-256 of the classifier's weights,
    its source file and the test images, so a changed classifier or dataset can never reuse stale features.
    The ``cache_dir`` setting (``FASTDIFF_CACHE``, default ~/.cache/fastdiff; ``off`` disables it) is the folder."""
    root = settings.current().cache_dir
    if root is None:
        return None
    h = hashlib.sha256(Path(classifier_path).read_bytes())
    h.update(Path(_classifier_module.__file__).read_bytes())  # the network's code, not only its weights
    h.update(x_test.numpy().tobytes())
    return root / "eval" / f"fashion_test_features_{h.hexdigest()[:24]}.npz"


def _write_cache(path: Path, feats: torch.Tensor, logits: torch.Tensor) -> None:
    # The features are fp32 network outputs, so storing them as fp32 is lossless. Best effort: a read-only
    # home only costs the recomputation next time.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, features=feats.float().numpy(), logits=logits.float().numpy())
        os.replace(tmp, path)
    except OSError:
        pass


@lru_cache(maxsize=2)
def _cached_reference(classifier_path: str, root: str) -> RealReference:
    clf = load_classifier(classifier_path)
    x_test, y_test = load_fashion_mnist("test", root)
    x_train, y_train = load_fashion_mnist("train", root)
    cache = _cache_path(classifier_path, x_test)
    feats = logits = None
    if cache is not None and cache.exists():
        try:
            with np.load(cache) as z:
                feats, logits = torch.from_numpy(z["features"]).double(), torch.from_numpy(z["logits"])
        except (OSError, KeyError, ValueError):
            feats = logits = None  # a damaged cache entry is recomputed
    if feats is None or feats.shape[0] != len(x_test):
        # One pass over the test split gives both the FID reference and the accuracy (logits = fc(features)).
        feats = extract_features(clf.features, x_test)
        with torch.no_grad():
            logits = clf.fc(feats.float())
        if cache is not None:
            _write_cache(cache, feats, logits)
    acc = (logits.argmax(1) == y_test).double().mean().item()
    return RealReference(clf, x_test, y_test, x_train, y_train, feats, logits, gaussian_stats(feats), acc)


@dataclass
class EvalReport:
    """Everything ``fastdiff eval`` prints for one set of images."""

    name: str
    n: int
    fid: float
    fid_floor: float
    classifier_real_accuracy: float
    accuracy: float | None = None  # share of images classified as their requested label
    per_class_accuracy: dict[str, float] = field(default_factory=dict)
    inception_fid: float | None = None
    inception_real_n: int | None = None
    seconds: float | None = None  # time to produce the images (sampling), when known
    outline: Any = None  # sketch-to-image models: fastdiff.eval.sketch_eval.OutlineReport

    @property
    def accuracy_ratio(self) -> float | None:
        """Conditional accuracy relative to the classifier's accuracy on real images (target: >= 0.9)."""
        return None if self.accuracy is None else self.accuracy / self.classifier_real_accuracy

    def to_dict(self) -> dict:
        d = asdict(self)
        d["accuracy_ratio"] = self.accuracy_ratio
        return d


_INCEPTION_REAL_STATS: dict[int, tuple] = {}


def _inception_features(inception, images: torch.Tensor, batch: int = 50) -> torch.Tensor:
    # Model space [-1, 1] -> [0, 1], the input convention of FID Inception.
    return extract_features(inception, (images + 1.0) / 2.0, batch=batch)


def evaluate_images(images: torch.Tensor, labels: torch.Tensor | None = None, *, name: str = "images",
                    reference: RealReference | None = None, inception=None, inception_real: int | None = None,
                    floor_seed: int = 0, seconds: float | None = None) -> EvalReport:
    """Evaluate (N, 1, 32, 32) images in [-1, 1]; ``labels`` are the requested classes (optional).

    ``inception``: a loaded :class:`~fastdiff.eval.inception.FIDInceptionV3` to add Inception FID against the
    first ``inception_real`` test images (default: all 10,000).
    """
    ref = reference or RealReference.build()
    images = check_images(images)
    n = len(images)
    if n < 2:
        raise ValueError("FID needs at least 2 images")
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long)
    acc, per_class = (None, {})
    if labels is not None:
        acc, pc = conditional_accuracy(ref.classifier, images, labels)
        per_class = {FASHION_CLASSES[c]: float(v) for c, v in enumerate(pc.tolist()) if not math.isnan(v)}
    fid = frechet_distance(gaussian_stats(ref.features(images)), ref.test_stats)
    floor = frechet_distance(gaussian_stats(ref.features(ref.train_subset(n, labels, floor_seed))), ref.test_stats)
    report = EvalReport(name=name, n=n, fid=fid, fid_floor=floor, classifier_real_accuracy=ref.test_accuracy,
                        accuracy=acc, per_class_accuracy=per_class, seconds=seconds)
    if inception is not None:
        n_real = min(inception_real or len(ref.test_images), len(ref.test_images))
        # The real side is computed once per (network, reference, N), not once per row; the entry holds the
        # objects themselves so a recycled id() can never match.
        hit = _INCEPTION_REAL_STATS.get(n_real)
        if hit is None or hit[0] is not inception or hit[1] is not ref:
            hit = (inception, ref, gaussian_stats(_inception_features(inception, ref.test_images[:n_real])))
            _INCEPTION_REAL_STATS[n_real] = hit
        report.inception_fid = frechet_distance(gaussian_stats(_inception_features(inception, images)), hit[2])
        report.inception_real_n = n_real
    return report


def format_table(reports: list[EvalReport]) -> str:
    """A plain-text table, one row per evaluated set, with the real-data reference numbers beside it."""
    if not reports:
        return "(nothing evaluated)"
    has_inc = any(r.inception_fid is not None for r in reports)
    head = ["images", "N", "cond. acc", "acc / real", "FID (clf)", "floor (real/real)"]
    if has_inc:
        head.append("Inception FID")
    head.append("time")
    rows = []
    for r in reports:
        row = [r.name, str(r.n),
               "-" if r.accuracy is None else f"{r.accuracy:.4f}",
               "-" if r.accuracy_ratio is None else f"{r.accuracy_ratio:.3f}",
               f"{r.fid:.3f}", f"{r.fid_floor:.3f}"]
        if has_inc:
            row.append("-" if r.inception_fid is None else f"{r.inception_fid:.2f}")
        row.append("-" if r.seconds is None else f"{r.seconds:.1f} s")
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(head), line(["-" * w for w in widths]), *map(line, rows)]
    out.append(f"classifier accuracy on the 10,000 real test images: {reports[0].classifier_real_accuracy:.4f}; "
               "FID (clf) = Fréchet distance of the classifier's 128-d features vs the real test split; floor = the "
               "same for N real train images")
    if has_inc:
        real_n = next(r.inception_real_n for r in reports if r.inception_real_n)
        out.append(f"Inception FID: FID InceptionV3 pool3 features vs {real_n} real test images")
    return "\n".join(out)
