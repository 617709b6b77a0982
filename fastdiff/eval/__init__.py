"""Measuring sample quality without any downloaded network.

- :mod:`~fastdiff.eval.classifier`: the small Fashion-MNIST CNN this project trains and ships
  (``fastdiff/assets/fashion_classifier.safetensors``; retrain with ``python -m fastdiff.eval.train_classifier``).
- :mod:`~fastdiff.eval.metrics`: Fréchet distance of feature Gaussians (FID) and conditional accuracy.
- :mod:`~fastdiff.eval.inception`: the FID InceptionV3, for users who have the standard weights file.
- :mod:`~fastdiff.eval.evaluate`: the numbers ``fastdiff eval`` prints (accuracy, FID, real-vs-real floor).
- :mod:`~fastdiff.eval.segmentation`: Dice and IoU of an ensemble of sampled masks (diffusion segmenters).

    from fastdiff.eval import evaluate_images
    report = evaluate_images(images, labels)        # images (N, 1, 32, 32) in [-1, 1]
    print(report.accuracy, report.fid, report.fid_floor)
"""
from fastdiff.eval.classifier import FashionClassifier, load_classifier
from fastdiff.eval.evaluate import EvalReport, RealReference, evaluate_images, format_table
from fastdiff.eval.inception import FIDInceptionV3, load_fid_inception
from fastdiff.eval.metrics import conditional_accuracy, fid_from_features, frechet_distance, gaussian_stats
from fastdiff.eval.segmentation import SegmentationScores, dice_iou, evaluate_segmentation, segmentation_scores

__all__ = [
    "FashionClassifier",
    "load_classifier",
    "EvalReport",
    "RealReference",
    "evaluate_images",
    "format_table",
    "FIDInceptionV3",
    "load_fid_inception",
    "conditional_accuracy",
    "fid_from_features",
    "frechet_distance",
    "gaussian_stats",
    "SegmentationScores",
    "dice_iou",
    "evaluate_segmentation",
    "segmentation_scores",
]
