"""Train the evaluation classifier on real Fashion-MNIST and write it (plus its model card).

    python -m fastdiff.eval.train_classifier --out fastdiff/assets/fashion_classifier.safetensors

Deterministic for a given ``--seed`` and thread count (one thread by default: the machine is shared and a
single thread makes the float reductions' order fixed). Training uses the full 60,000-image train split; the
10,000-image test split is touched only once, at the end, to measure the accuracy written into the card.

Recipe: AdamW with a one-cycle learning rate, batch 128, random translations of up to +-2 px (a roll is an
exact shift here: the 2 px border of the 32x32 model space is all background), no flips (Fashion-MNIST's
shoes all face one way, and a classifier judging generated samples should know that).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastdiff.eval.classifier import ClassifierConfig, FashionClassifier, save_classifier
from fastdiff.eval.data import FASHION_CLASSES, load_fashion_mnist

__all__ = ["train_classifier", "evaluate_accuracy", "random_shift", "main"]


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by its own integer (dy, dx) in [-max_shift, max_shift] (a per-sample roll)."""
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    dy = torch.randint(-max_shift, max_shift + 1, (n,), generator=generator)
    dx = torch.randint(-max_shift, max_shift + 1, (n,), generator=generator)
    rows = (torch.arange(h)[None, :] - dy[:, None]) % h  # (n, h): source row of each output row
    cols = (torch.arange(w)[None, :] - dx[:, None]) % w
    idx_n = torch.arange(n)[:, None, None]
    return x[:, 0][idx_n, rows[:, :, None], cols[:, None, :]][:, None]


@torch.no_grad()
def evaluate_accuracy(model: FashionClassifier, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        correct += (model(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum().item()
    return correct / len(images)


def train_classifier(*, epochs: int = 10, batch: int = 128, lr: float = 2e-3, weight_decay: float = 5e-4,
                     max_shift: int = 2, seed: int = 0, limit: int | None = None, log=print) -> tuple[FashionClassifier, dict]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = load_fashion_mnist("train")
    if limit is not None:
        x_train, y_train = x_train[:limit], y_train[:limit]
    model = FashionClassifier(ClassifierConfig()).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.25)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        loss_sum, correct = 0.0, 0
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            x = random_shift(x_train[idx], max_shift, gen).contiguous(memory_format=torch.channels_last)
            y = y_train[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == y).sum().item()
        log(f"epoch {epoch + 1}/{epochs}: loss {loss_sum / len(perm):.4f}, train acc {correct / len(perm):.4f}, "
            f"{time.perf_counter() - t0:.0f} s")
    train_seconds = time.perf_counter() - t0
    model = model.to(memory_format=torch.contiguous_format).eval()
    x_test, y_test = load_fashion_mnist("test")
    acc = evaluate_accuracy(model, x_test, y_test)
    per_class = {}
    with torch.no_grad():
        pred = torch.cat([model(x_test[i:i + 500]).argmax(1) for i in range(0, len(x_test), 500)])
    for c, name in enumerate(FASHION_CLASSES):
        m = y_test == c
        per_class[name] = (pred[m] == c).float().mean().item()
    stats = {"test_accuracy": acc, "per_class_accuracy": per_class, "train_seconds": train_seconds,
             "epochs": epochs, "batch": batch, "lr": lr, "weight_decay": weight_decay, "max_shift": max_shift,
             "seed": seed, "train_images": len(x_train), "threads": torch.get_num_threads(),
             "params": sum(p.numel() for p in model.parameters())}
    log(f"test accuracy {acc:.4f} (10,000 real test images), trained in {train_seconds:.0f} s")
    return model, stats


def _model_card(stats: dict, out: Path, argv: list[str]) -> str:
    per_class = "\n".join(f"| {name} | {acc:.3f} |" for name, acc in stats["per_class_accuracy"].items())
    return f"""# fastdiff Fashion-MNIST evaluation classifier

`{out.name}`: the feature network and judge of `fastdiff eval` (conditional accuracy and classifier-feature FID
of generated Fashion-MNIST samples). Trained by this project; no pretrained weights involved.

## Architecture
`fastdiff.eval.classifier.FashionClassifier` ({stats['params']:,} parameters, fp32 safetensors, config in the
file's metadata). Input (N, 1, 32, 32) in [-1, 1].

| layer | output |
|---|---|
| conv3x3 1->32, BatchNorm, ReLU, maxpool 2 | 32 x 16 x 16 |
| conv3x3 32->64, BatchNorm, ReLU, maxpool 2 | 64 x 8 x 8 |
| conv3x3 64->128, BatchNorm, ReLU, maxpool 2 | 128 x 4 x 4 |
| conv3x3 128->128, BatchNorm, ReLU, global average pool | 128 (FID features) |
| linear 128->10 | logits |

## Data and preprocessing
Fashion-MNIST train split (all {stats['train_images']:,} images) from the IDX files of Debian's
`dataset-fashion-mnist` (`/usr/share/datasets/fashion-mnist/`). Each 28x28 image is scaled to [-1, 1]
(`x * 2/255 - 1`, the loader of `fastdiff.io.datasets`) and padded with 2 px of background (-1) on each side to 32x32: the same pixel space the
bundled diffusion model is trained in. Augmentation: random shifts of up to +-{stats['max_shift']} px; no flips.

## Training
`python -m fastdiff.eval.train_classifier {' '.join(argv)}`

AdamW (lr {stats['lr']}, one-cycle schedule, weight decay {stats['weight_decay']}), batch {stats['batch']},
{stats['epochs']} epochs, seed {stats['seed']}, {stats['threads']} CPU thread(s): {stats['train_seconds']:.0f} s on a
shared 2-core x86-64 CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}.

## Measured
Accuracy on the 10,000 real test images: **{stats['test_accuracy']:.4f}**

| class | test accuracy |
|---|---|
{per_class}

The accuracy is re-measured by `tests/test_eval.py` (it must stay >= 0.90).

## Intended use and limits
Only for comparing 32x32 grayscale Fashion-MNIST-like images. FID on these 128-d features is not comparable
with Inception FID numbers from papers; compare models with each other and with the real-vs-real floor that
`fastdiff eval` prints beside every FID.
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m fastdiff.eval.train_classifier", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="safetensors file to write (a .md model card goes beside it)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--limit", type=int, default=None, help="train on the first N images only (smoke tests)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, stats = train_classifier(epochs=args.epochs, batch=args.batch, lr=args.lr, seed=args.seed, limit=args.limit)
    save_classifier(model, args.out, metadata={"test_accuracy": f"{stats['test_accuracy']:.4f}",
                                               "stats": json.dumps(stats)})
    card = args.out.with_suffix(".md")
    card.write_text(_model_card(stats, args.out, argv))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB) and {card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
