"""How well a sketch-to-image model draws garments along a sketch (``fastdiff eval --checkpoint`` of a
``conditioning="sketch"`` run or folder, and the bundled ``fashion-sketch`` model).

The sketches are those of real Fashion-MNIST test images (``per_class`` of each class, the first ones in file
order), drawn with :func:`fastdiff.sketch` and the thresholds stored in the model's condition record (those its
trainer drew its conditions with). One image is generated per sketch by ``draw`` (the caller's: the ``fastdiff``
command passes one built on :func:`fastdiff.generate`), then:

- **class accuracy**: the shipped classifier's label of each generated image against the label of the test
  image whose sketch it followed (a sketch carries the class only through its outline), and the
  classifier-feature FID, both from :func:`fastdiff.eval.evaluate.evaluate_images`;
- **outline F1**: the edge map of each generated image (the same Canny) against its sketch, with one pixel of
  tolerance: precision is the share of generated edge pixels within one pixel (8-neighbourhood) of a sketch
  edge, recall the share of sketch edge pixels within one pixel of a generated edge. The same score between
  each sketch and the sketch of another test image of its class is reported beside it as the chance level.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["OutlineReport", "edge_maps", "outline_f1", "sketch_test_set", "evaluate_sketch_model"]


@dataclass
class OutlineReport:
    f1: float          # mean over images of the generated edges' F1 against their sketch
    precision: float
    recall: float
    chance_f1: float   # the same score between a sketch and another test image's sketch of the same class
    n: int

    def format(self) -> str:
        return (f"outline F1 {self.f1:.3f} (precision {self.precision:.3f}, recall {self.recall:.3f}; "
                f"another image of the class: {self.chance_f1:.3f}), {self.n} sketches")


def _near(edges: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(edges.float(), 3, stride=1, padding=1) > 0


def outline_f1(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Per-image (F1, precision, recall) of edge maps (B, 1, H, W) (nonzero = edge) with one pixel of tolerance,
    as a float64 (B, 3) tensor; an image with no edges on either side scores 1 on that side."""
    if pred.shape != true.shape or pred.dim() != 4:
        raise ValueError(f"pred {tuple(pred.shape)} and true {tuple(true.shape)} must be (B, 1, H, W) of one shape")
    p, t = pred != 0, true != 0
    n_p, n_t = p.flatten(1).sum(1).double(), t.flatten(1).sum(1).double()
    hit_p = (p & _near(t)).flatten(1).sum(1).double()
    hit_t = (t & _near(p)).flatten(1).sum(1).double()
    prec = torch.where(n_p == 0, 1.0, hit_p / n_p.clamp_min(1))
    rec = torch.where(n_t == 0, 1.0, hit_t / n_t.clamp_min(1))
    f1 = torch.where(prec + rec == 0, 0.0, 2 * prec * rec / (prec + rec).clamp_min(1e-12))
    return torch.stack([f1, prec, rec], 1)


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def edge_maps(images_u8: torch.Tensor, params: dict) -> torch.Tensor:
    """uint8 (N, 1, H, W) edge maps, 255 on edges, of uint8 images: :func:`fastdiff.sketch` with ``params``."""
    from fastdiff.sketch import sketch

    return sketch(images_u8, **params).mul_(255).to(torch.uint8)


def sketch_test_set(per_class: int, params: dict, root=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images in [-1, 1] (N, 1, 32, 32), labels, sketches uint8 0/255 (N, 1, 32, 32)): the first ``per_class``
    test images of each class, class by class, and their sketches (``fastdiff.sketch(image, **params)``)."""
    from fastdiff.eval.data import load_fashion_mnist

    if not isinstance(per_class, int) or isinstance(per_class, bool) or per_class < 1:
        raise ValueError(f"per_class must be a positive integer, got {per_class!r}")
    images, labels = load_fashion_mnist("test", root)
    idx = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in range(10)])
    images, labels = images[idx], labels[idx]
    return images, labels, edge_maps(_to_uint8(images), params)


def evaluate_sketch_model(draw, params: dict, *, per_class: int = 20, seed: int = 0, reference=None, root=None,
                          batch: int = 100):
    """(EvalReport, OutlineReport, generated images, sketches) of a sketch-to-image model (module doc).

    ``draw(sketches, seed)`` returns one image per sketch (float (B, 1, H, W) in [0, 1], edges 1) as PIL images;
    it is called once per ``batch`` sketches with ``seed + index of the first``. ``params``: the model's sketch
    thresholds (its condition record's ``sketch`` entry)."""
    import time

    import numpy as np

    from fastdiff.eval.evaluate import evaluate_images

    images, labels, sketches = sketch_test_set(per_class, params, root)
    out, t0 = [], time.perf_counter()
    for s in range(0, len(sketches), batch):
        pil = draw(sketches[s:s + batch].float() / 255.0, seed + s)
        out.append(torch.from_numpy(np.stack([np.asarray(im.convert("L")) for im in pil]))[:, None])
    seconds = time.perf_counter() - t0
    gen_u8 = torch.cat(out)
    generated = gen_u8.float().mul_(2.0 / 255.0).sub_(1.0)
    report = evaluate_images(generated, labels, name=f"sketch {per_class}/class", reference=reference,
                             seconds=seconds)
    scores = outline_f1(edge_maps(gen_u8, params), sketches)
    # chance: each sketch against the next test image's sketch of the same class (a rotation within the class)
    other = torch.cat([torch.roll(torch.arange(c * per_class, (c + 1) * per_class), 1) for c in range(10)])
    chance = outline_f1(sketches[other], sketches) if per_class > 1 else torch.full_like(scores, float("nan"))
    m = scores.mean(0).tolist()
    outline = OutlineReport(f1=m[0], precision=m[1], recall=m[2], chance_f1=float(chance[:, 0].mean()),
                            n=len(scores))
    return report, outline, generated, sketches
