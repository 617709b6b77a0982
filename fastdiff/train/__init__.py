"""Training of pixel-space diffusion models: :class:`TrainConfig`, :class:`Trainer`, :func:`train`, and
:func:`load_run_model` / :func:`sample_grid` to use a run's checkpoint."""
from fastdiff.train.checkpoint import CheckpointError
from fastdiff.train.trainer import RunModel, TrainConfig, Trainer, load_run_model, sample_grid, train

__all__ = ["CheckpointError", "RunModel", "TrainConfig", "Trainer", "load_run_model", "sample_grid", "train"]
