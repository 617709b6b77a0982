"""The small Fashion-MNIST classifier that judges generated samples (shipped as a package asset).

Input: (N, 1, 32, 32) in [-1, 1], the diffusion model's pixel space (see :mod:`fastdiff.eval.data`).

    conv3x3(1->32)   BN ReLU  maxpool2   32x32 -> 16x16
    conv3x3(32->64)  BN ReLU  maxpool2   16x16 -> 8x8
    conv3x3(64->128) BN ReLU  maxpool2    8x8  -> 4x4
    conv3x3(128->128) BN ReLU global-average-pool   -> 128 features  (used for FID)
    linear(128->10)                                  -> logits

The 128 pooled features play the role Inception's 2048-d pool3 plays in the standard FID: a summary of the
image fitted by a network trained to tell the classes apart. Four convolutions and ~240k parameters keep it
trainable in minutes on one CPU thread and its fp32 weights under 1 MB.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ClassifierConfig",
    "FashionClassifier",
    "DEFAULT_CLASSIFIER_PATH",
    "load_classifier",
    "save_classifier",
]


@dataclass(frozen=True)
class ClassifierConfig:
    channels: tuple[int, ...] = (32, 64, 128, 128)
    in_channels: int = 1
    num_classes: int = 10
    image_size: int = 32


class _ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        # No conv bias: BatchNorm's shift makes it redundant.
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FashionClassifier(nn.Module):
    """A 4-conv CNN: ``forward`` gives logits, ``features`` the 128-d penultimate features."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.config = config
        chans = (config.in_channels, *config.channels)
        self.blocks = nn.ModuleList(_ConvBNReLU(a, b) for a, b in zip(chans[:-1], chans[1:]))
        self.fc = nn.Linear(chans[-1], config.num_classes)

    @property
    def feature_dim(self) -> int:
        return self.config.channels[-1]

    def _check(self, x: torch.Tensor) -> None:
        c, s = self.config.in_channels, self.config.image_size
        if x.ndim != 4 or x.shape[1] != c or x.shape[-2:] != (s, s):
            raise ValueError(f"classifier expects (N, {c}, {s}, {s}) images in [-1, 1], got {tuple(x.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < len(self.blocks) - 1:
                x = F.max_pool2d(x, 2)
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


# The shipped asset. `importlib.resources` finds it in an installed wheel and in an editable checkout alike.
DEFAULT_CLASSIFIER_PATH = Path(str(resources.files("fastdiff") / "assets" / "fashion_classifier.safetensors"))


def save_classifier(model: FashionClassifier, path: str | os.PathLike, *, metadata: dict[str, str] | None = None,
                    dtype: torch.dtype = torch.float32) -> None:
    """Save weights (+ BN statistics) as safetensors; the config travels in the metadata."""
    from safetensors.torch import save_file

    import json

    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    meta = {"config": json.dumps(asdict(model.config)), "format": "fastdiff.fashion_classifier"}
    meta.update(metadata or {})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)  # atomic: a kill mid-write never leaves a half file under the real name


def load_classifier(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> FashionClassifier:
    """Load the shipped classifier (or one at ``path``), strictly, in eval mode and fp32."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path) if path is not None else DEFAULT_CLASSIFIER_PATH
    if not path.exists():
        raise FileNotFoundError(
            f"classifier weights not found: {path}. Regenerate them with "
            "`python -m fastdiff.eval.train_classifier --out fastdiff/assets/fashion_classifier.safetensors`.")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "fastdiff.fashion_classifier":
        raise ValueError(f"{path} is not a fastdiff Fashion-MNIST classifier (metadata format={meta.get('format')!r})")
    cfg = json.loads(meta["config"])
    cfg["channels"] = tuple(cfg["channels"])
    model = FashionClassifier(ClassifierConfig(**cfg))
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(path)).items()}
    model.load_state_dict(state, strict=True)  # lists missing / unexpected keys on mismatch
    return model.eval().to(device)
