"""One trainer for diffusion models (pixel or latent, class labels or captions) and KL autoencoders:
:class:`TrainConfig`, :class:`Trainer`, :func:`train`, and
:func:`load_run_model` / :func:`sample_grid` to use a run's checkpoint, :func:`plan` for the GPU memory a
configuration needs."""
from fastdiff.io.checkpoint import CheckpointError
from fastdiff.io.run_checkpoint import RunModel, load_run_model
from fastdiff.train.trainer import TrainConfig, Trainer, sample_grid, train
from fastdiff.train.plan import MemoryPlan, plan  # noqa: E402  (the function shadows the module name on purpose)

__all__ = ["CheckpointError", "MemoryPlan", "RunModel", "TrainConfig", "Trainer", "load_run_model", "plan",
           "sample_grid", "train"]
