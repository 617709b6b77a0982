"""Segmentation scores of a diffusion model that generates masks from images (MedSegDiff-style ensembles).

A diffusion segmenter is sampled ``N`` times per image with different noise; the ensemble's prediction is the
pixel-wise mean of the N sampled masks, thresholded (MedSegDiff, Wu et al. 2023, Sec. 3.4, fuse their samples
the same way). Scores per image, then averaged over the images:

    Dice = 2 |P & T| / (|P| + |T|)        IoU = |P & T| / |P | T|

with both 1 when prediction and truth are empty (nothing to find, nothing found).

    from fastdiff.eval.segmentation import ensemble_mask, segmentation_scores, evaluate_segmentation
    scores = evaluate_segmentation(pipe, images, masks, ensemble=5)   # pipe: a segmentation PixelPipeline
    print(scores.dice, scores.iou)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SegmentationScores", "dice_iou", "ensemble_mask", "segmentation_scores", "evaluate_segmentation"]


@dataclass(frozen=True)
class SegmentationScores:
    """Mean Dice and IoU over ``n`` images (``per_image``: (n, 2) tensor of Dice, IoU) of an ensemble of
    ``ensemble`` samples each."""

    dice: float
    iou: float
    n: int
    ensemble: int
    per_image: torch.Tensor

    def format(self) -> str:
        return f"Dice {self.dice:.4f}  IoU {self.iou:.4f}  ({self.n} images, ensemble of {self.ensemble})"


def _as_bool(m: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(m).__name__}")
    if m.dtype == torch.bool:
        return m
    if not ((m == 0) | (m == 1)).all():
        raise ValueError(f"{name} must be a bool or 0/1 mask; threshold it first (ensemble_mask)")
    return m.bool()


def dice_iou(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Per-image (Dice, IoU) of binary masks (B, ...) as a float64 (B, 2) tensor; both 1 when both are empty."""
    p, t = _as_bool(pred, "pred"), _as_bool(true, "true")
    if p.shape != t.shape or p.dim() < 2:
        raise ValueError(f"pred {tuple(p.shape)} and true {tuple(t.shape)} must be batches (B, ...) of one shape")
    p, t = p.flatten(1), t.flatten(1)
    inter = (p & t).sum(1).double()
    size = p.sum(1).double() + t.sum(1).double()
    union = (p | t).sum(1).double()
    empty = union == 0
    dice = torch.where(empty, 1.0, 2 * inter / size.clamp_min(1))
    iou = torch.where(empty, 1.0, inter / union.clamp_min(1))
    return torch.stack([dice, iou], 1)


def ensemble_mask(samples: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """The ensemble's mask: samples (N, B, 1, H, W) in the model's [-1, 1] (mask 1, background -1), averaged
    over N, then ``> threshold`` (0: the midpoint). Returns bool (B, 1, H, W)."""
    if samples.dim() < 3:
        raise ValueError(f"samples must be (N, B, ...) (N ensemble members), got {tuple(samples.shape)}")
    return samples.float().mean(0) > threshold


def segmentation_scores(samples: torch.Tensor, true: torch.Tensor, threshold: float = 0.0) -> SegmentationScores:
    """Dice and IoU of the ensemble of ``samples`` (N, B, 1, H, W) in [-1, 1] against the true masks (B, 1, H, W),
    bool or 0/1."""
    per = dice_iou(ensemble_mask(samples, threshold), true)
    return SegmentationScores(float(per[:, 0].mean()), float(per[:, 1].mean()), per.shape[0], samples.shape[0], per)


@torch.no_grad()
def evaluate_segmentation(pipe, images: torch.Tensor, masks: torch.Tensor, *, ensemble: int = 5, seed: int = 0,
                          sampler: str = "ddim", steps: int | None = None, guidance=None,
                          batch_size: int = 256) -> SegmentationScores:
    """Sample a segmentation model ``ensemble`` times per image and score the ensemble's masks.

    ``pipe``: a pipeline whose ``sample(None, n=B, condition=images, seed=..., ...)`` returns masks in [0, 1]
    (a :class:`~fastdiff.pipelines.pixel.PixelPipeline` of a ``conditioning="segmentation"`` run). ``images``:
    (B, C, H, W) in [0, 1]; ``masks``: (B, 1, H, W) bool or 0/1. Member ``k`` of the ensemble uses seed
    ``seed + k`` (and each batch of ``batch_size`` images its own offset), so a call is reproducible.
    ``guidance``: None (default) samples the conditional model alone, as MedSegDiff does."""
    if not isinstance(ensemble, int) or ensemble < 1:
        raise ValueError(f"ensemble must be a positive integer, got {ensemble!r}")
    if images.shape[0] != masks.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {masks.shape[0]} masks")
    members = []
    for k in range(ensemble):
        outs = []
        for j, s in enumerate(range(0, images.shape[0], batch_size)):
            img = images[s:s + batch_size]
            x = pipe.sample(None, n=img.shape[0], condition=img, seed=seed + k + 1_000_003 * j, sampler=sampler,
                            steps=steps, guidance=guidance)
            outs.append(x * 2 - 1)
        members.append(torch.cat(outs))
    return segmentation_scores(torch.stack(members), masks)
