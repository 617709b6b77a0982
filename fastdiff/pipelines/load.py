"""``fastdiff.load_pipeline``: one entry point that recognises what a path holds and returns its pipeline.

    pipeline folder with model_index.json  -> by its ``_class_name``:
        StableDiffusionPipeline / ...Img2Img / ...Inpaint  -> StableDiffusion1 (fastdiff/pipelines/sd1.py)
        DDPMPipeline / DDIMPipeline                        -> PixelPipeline (fastdiff/pipelines/pixel.py)
        StableDiffusion3Pipeline / ...Img2Img              -> StableDiffusion3 (fastdiff/pipelines/sd3.py)
    original single file (.safetensors / .ckpt)  -> SD1 or SD3 (the error names SD2 / SDXL / Flux files)
    UNet2DModel folder, training run folder      -> PixelPipeline
    None                                         -> the bundled default model
    a bundled model's name (fastdiff.pipelines.pixel.BUNDLED_MODELS: fashion32, fashion-sketch, fashion-tiny-sd)
                                                 -> its folder, as above
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fastdiff._argtypes import InvalidArgument, check_type
from fastdiff.io.checkpoint import safetensors_keys
from fastdiff.io.sd_checkpoint import detect_family
from fastdiff.pipelines.pixel import load_pixel_pipeline, resolve_model_path
from fastdiff.pipelines.sd1 import load_sd1
from fastdiff.pipelines.sd3 import load_sd3

__all__ = ["load_pipeline", "pipeline_kind"]

_SD1 = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"}
_PIXEL = {"DDPMPipeline", "DDIMPipeline"}
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SD3 = {"StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"}


def pipeline_kind(path: str | os.PathLike | None) -> str:
    """'sd1', 'pixel' or 'sd3' for what ``path`` holds (None: the bundled model, 'pixel'); errors say why not."""
    if path is None:
        return "pixel"
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model path {p} does not exist")
    if p.is_file():
        # A safetensors file is classified by the key names in its header (an SD3 file with T5 is ~10 GB); a
        # pickle cannot be read in part: it is taken for SD1, whose loader says what else it holds.
        keys = safetensors_keys(p)
        return "sd1" if keys is None else detect_family(keys)
    index = p / "model_index.json"
    if index.is_file():
        try:
            name = json.loads(index.read_text()).get("_class_name", "")
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{index} is not readable JSON: {e}") from None
        if name in _SD1:
            return "sd1"
        if name in _PIXEL:
            return "pixel"
        if name in _SD3:
            return "sd3"
        raise ValueError(f"{p}: model_index.json names {name!r}; fastdiff loads "
                         f"{', '.join(sorted(_SD1 | _PIXEL | _SD3))} folders")
    return "pixel"  # a UNet2DModel folder or a training run: load_pixel_pipeline says what is missing


def load_pipeline(path: str | os.PathLike | None = None, *, dtype: torch.dtype | None = torch.float32,
                  device: str | torch.device = "cpu"):
    """The pipeline for ``path`` (see the module doc): an SD1 file/folder gives a
    :class:`~fastdiff.pipelines.sd1.StableDiffusion1` whose ``.unet``, ``.vae``, ``.text_encoder`` and
    ``.tokenizer`` are fastdiff modules; an SD3 one a :class:`~fastdiff.pipelines.sd3.StableDiffusion3`
    (``.transformer``, ``.vae``, ``.encode_prompt``); a pixel model a
    :class:`~fastdiff.pipelines.pixel.PixelPipeline`. Bad arguments raise
    :class:`~fastdiff._argtypes.InvalidArgument` naming them, before anything is read."""
    check_type("path", path, (str, os.PathLike), "a path (str or os.PathLike)")
    if dtype is not None and dtype not in _DTYPES:
        raise InvalidArgument("dtype", f"must be one of {', '.join(map(str, _DTYPES))} or None, got {dtype!r}")
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidArgument("device", f"must be a torch device or its name ('cpu', 'cuda', 'cuda:1'), got "
                                        f"{device!r}") from None
    path = resolve_model_path(path)
    kind = pipeline_kind(path)
    if kind == "sd1":
        return load_sd1(path, dtype=dtype, device=device)
    if kind == "sd3":
        return load_sd3(path, dtype=dtype, device=device)
    return load_pixel_pipeline(path, device=device, dtype=dtype or torch.float32)
