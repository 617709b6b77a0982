"""fastdiff: diffusion models for one consumer GPU, with a first-class CPU path."""
from fastdiff import _ext

__version__ = "0.1.0"

_ext.warn_once()

__all__ = ["__version__"]
