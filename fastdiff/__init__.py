"""fastdiff: diffusion models for one consumer GPU, with a first-class CPU path."""
from fastdiff import _ext
from fastdiff._argtypes import InvalidArgument
from fastdiff.sketch import sketch  # edge maps (sketch-to-image conditioning); torch only
from fastdiff import control  # ControlNet control images: canny, scribble, segmentation colours; torch only

__version__ = "0.1.0"

_ext.warn_once()


def generate(prompt=None, **kwargs):
    """Images from a model as PIL images (the bundled Fashion-MNIST model by default); see
    :func:`fastdiff.pipelines.generate.generate`. Imported lazily so ``import fastdiff`` stays light."""
    from fastdiff.pipelines.generate import generate as _generate

    return _generate(prompt, **kwargs)


def load_pipeline(path=None, **kwargs):
    """The pipeline a path holds (SD1 diffusers folder or single file, pixel model, training run); see
    :func:`fastdiff.pipelines.load.load_pipeline`. Imported lazily."""
    from fastdiff.pipelines.load import load_pipeline as _load

    return _load(path, **kwargs)


def load_controlnet(path, **kwargs):
    """An SD1 ControlNet from a diffusers folder or an original ``control_*`` single file; see
    :func:`fastdiff.io.controlnet_checkpoint.load_controlnet`. Imported lazily."""
    from fastdiff.io.controlnet_checkpoint import load_controlnet as _load

    return _load(path, **kwargs)


__all__ = ["__version__", "control", "generate", "load_controlnet", "load_pipeline", "sketch", "InvalidArgument"]
