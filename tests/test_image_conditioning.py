"""Image conditioning: sketch maps and the shapes set, Dice/IoU, tiny sketch and segmentation runs through the one
trainer (resume included), and the sketch pipeline (fastdiff.generate(sketch=...), fastdiff generate --sketch)."""
import subprocess
import sys

import pytest
import torch
from PIL import Image

import fastdiff
from fastdiff._argtypes import InvalidArgument
from fastdiff.eval.segmentation import dice_iou, ensemble_mask, evaluate_segmentation, segmentation_scores
from fastdiff.io.datasets import ImageDataset
from fastdiff.io.images import image_grid
from fastdiff.pipelines.pixel import load_pixel_pipeline
from fastdiff.samplers import Denoiser, sample_ddim
from fastdiff.train import TrainConfig, Trainer
from fastdiff.train.conditions import CACHE_FILE, shapes_dataset, sketch_maps

BASE = dict(model="tiny", image_size=16, batch_size=8, log_every=1, sample_every=0, ckpt_every_steps=2, threads=1,
            warmup_steps=1, precision="fp32", sample_steps=2)


# ---------------------------------------------------------------------------------------------------------------
# Dice / IoU
# ---------------------------------------------------------------------------------------------------------------

def test_dice_iou_closed_form():
    pred = torch.zeros(4, 1, 4, 4, dtype=torch.bool)
    true = torch.zeros(4, 1, 4, 4, dtype=torch.bool)
    pred[0, 0, 0:2] = True                      # rows 0-1 (8 px) vs rows 1-2 (8 px): overlap 4, union 12
    true[0, 0, 1:3] = True
    true[1, 0, 0, 0] = True                     # nothing predicted, something there
    pred[3, 0], true[3, 0] = True, True         # perfect
    out = dice_iou(pred, true)                  # image 2: both empty
    expected = torch.tensor([[8 / 16, 4 / 12], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(out, expected)
    # Dice = 2 IoU / (1 + IoU) for any pair of masks
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(16, 1, 8, 8, generator=g) > 0.6, torch.rand(16, 1, 8, 8, generator=g) > 0.4
    d = dice_iou(a, b)
    torch.testing.assert_close(d[:, 0], 2 * d[:, 1] / (1 + d[:, 1]))
    with pytest.raises(ValueError, match="0/1 mask"):
        dice_iou(torch.full((1, 1, 2, 2), 0.5), true[:1, :, :2, :2])


def test_ensemble_mask_is_the_thresholded_mean():
    # three members in [-1, 1]; pixel values chosen so the mean is +1/3, -1/3, +1, -1
    s = torch.tensor([[1.0, -1.0, 1.0, -1.0], [1.0, -1.0, 1.0, -1.0], [-1.0, 1.0, 1.0, -1.0]]).view(3, 1, 1, 2, 2)
    m = ensemble_mask(s)
    assert m.tolist() == [[[[True, False], [True, False]]]]
    true = torch.tensor([[[[1, 1], [1, 0]]]])
    sc = segmentation_scores(s, true)
    assert sc.ensemble == 3 and sc.n == 1
    assert sc.dice == pytest.approx(2 * 2 / (2 + 3)) and sc.iou == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------

def test_shapes_dataset_is_deterministic_and_documented():
    img, mask = shapes_dataset(12, size=16, seed=3)
    img2, mask2 = shapes_dataset(12, size=16, seed=3)
    assert torch.equal(img, img2) and torch.equal(mask, mask2)
    assert img.shape == mask.shape == (12, 1, 16, 16) and img.dtype == mask.dtype == torch.uint8
    # scene i does not depend on how many scenes are drawn; other seeds and the test split are other scenes
    first, _ = shapes_dataset(3, size=16, seed=3)
    assert torch.equal(first, img[:3])
    assert not torch.equal(shapes_dataset(12, size=16, seed=4)[1], mask)
    assert not torch.equal(shapes_dataset(12, size=16, seed=3, split="test")[1], mask)
    assert set(mask.unique().tolist()) <= {0, 255}
    frac = (mask > 0).float().mean((1, 2, 3))
    assert (frac > 0).all() and (frac < 1).all()          # 1-3 shapes of 1/5..1/2 the side: never empty/full
    # shapes are grey 0..200 on a white canvas, plus noise: shape pixels are darker than the canvas on average
    on, off = img[mask > 0].float().mean(), img[mask == 0].float().mean()
    assert off - on > 80


def test_sketch_maps_are_fastdiff_sketch_and_cached(tmp_path, monkeypatch):
    images, _ = shapes_dataset(40, size=16, seed=0)
    maps = sketch_maps(images, chunk=7)
    for i in (0, 13, 39):  # the oracle: fastdiff.sketch of each image alone
        assert torch.equal(maps[i, 0] > 0, fastdiff.sketch(images[i, 0].float()) > 0)
    data = ImageDataset(images, torch.zeros(40, dtype=torch.int64), ("scene",), "scenes")
    cfg = TrainConfig(run_dir=str(tmp_path / "run"), conditioning="sketch", max_steps=2, **BASE)
    tr = Trainer(cfg, dataset=data, progress=False)
    assert torch.equal(tr.conditions.conditions, maps)
    assert (tmp_path / "run" / CACHE_FILE).is_file()
    tr.run()
    # the resumed run reads the cache (computing the maps again would fail here)
    import fastdiff.train.conditions as cond

    monkeypatch.setattr(cond, "sketch_maps", lambda *a, **k: pytest.fail("sketch maps computed again"))
    tr2 = Trainer(TrainConfig.from_dict({**cfg.to_dict(), "max_steps": 3}), dataset=data, resume=True,
                  progress=False)
    assert torch.equal(tr2.conditions.conditions, maps)


# ---------------------------------------------------------------------------------------------------------------
# Segmentation: a tiny run end to end, resumed, scored
# ---------------------------------------------------------------------------------------------------------------

def test_segmentation_run_resumes_exactly_and_is_scored(tmp_path):
    kw = dict(conditioning="segmentation", dataset="shapes:48:1", **BASE)
    full = Trainer(TrainConfig(run_dir=str(tmp_path / "a"), max_steps=4, **kw), progress=False).run()
    first = Trainer(TrainConfig(run_dir=str(tmp_path / "b"), max_steps=4, **kw), progress=False).run(max_steps=2)
    tr = Trainer(TrainConfig(run_dir=str(tmp_path / "b"), max_steps=4, **kw), resume=True, progress=False)
    assert tr.step == 2
    assert first + tr.run() == full  # the resumed run replays the uninterrupted one
    assert tr.unet_config.in_channels == 2 and tr.unet_config.out_channels == 1
    tr.write_pictures()  # rows: condition image, guided EMA sample, training mask
    grid = Image.open(tmp_path / "b" / "samples-latest.png")
    assert grid.size[0] >= 8 * 16 and grid.size[1] >= 3 * 16

    pipe = load_pixel_pipeline(tmp_path / "b")
    assert pipe.condition["kind"] == "segmentation" and pipe.condition_argument == "image"
    images, masks = shapes_dataset(3, size=16, seed=1, split="test")
    sc = evaluate_segmentation(pipe, images.float() / 255, masks > 0, ensemble=2, steps=2)
    assert sc.n == 3 and sc.ensemble == 2 and sc.per_image.shape == (3, 2)
    # the scores are those of the ensemble the pipeline samples (same seeds)
    members = torch.stack([pipe.sample(None, n=3, condition=images.float() / 255, seed=k, steps=2, guidance=None)
                           * 2 - 1 for k in range(2)])
    torch.testing.assert_close(sc.per_image, dice_iou(members.mean(0) > 0, masks > 0))
    with pytest.raises(InvalidArgument, match="^image: this model is segmentation-conditioned"):
        pipe.sample(None, n=1)


def test_segmentation_config_errors(tmp_path):
    with pytest.raises(ValueError, match="dataset must be 'shapes'"):
        Trainer(TrainConfig(run_dir=str(tmp_path / "x"), conditioning="segmentation", dataset="digits", **BASE),
                progress=False)
    with pytest.raises(ValueError, match="takes no autoencoder"):
        TrainConfig(conditioning="sketch", autoencoder=str(tmp_path)).check()
    small = ImageDataset(shapes_dataset(8, size=8)[0], torch.zeros(8, dtype=torch.int64), ("scene",), "small")
    with pytest.raises(ValueError, match=r"images of \(8, 8\) pixels but the configuration wants 16x16"):
        Trainer(TrainConfig(run_dir=str(tmp_path / "y"), conditioning="sketch", **BASE), dataset=small,
                progress=False)
    assert not (tmp_path / "y").exists()  # no sketch map drawn or cached


# ---------------------------------------------------------------------------------------------------------------
# Sketch: tiny run -> pipeline
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sketch_run(tmp_path_factory):
    images, _ = shapes_dataset(48, size=16, seed=5)
    labels = torch.arange(48) % 3
    data = ImageDataset(images, labels, ("a", "b", "c"), "scenes")
    run = tmp_path_factory.mktemp("sketch") / "run"
    Trainer(TrainConfig(run_dir=str(run), conditioning="sketch", max_steps=3, **BASE), dataset=data,
            progress=False).run()
    return run, images


def test_sketch_pipeline_guidance_contrasts_sketch_with_zeros(sketch_run):
    run, images = sketch_run
    pipe = load_pixel_pipeline(run)
    assert pipe.condition["kind"] == "sketch" and pipe.condition["sketch"]["high"] == 0.3
    s = fastdiff.sketch(images[0].float())                        # (1, 16, 16), edges 1 on 0
    out = pipe.sample(None, n=2, condition=s, seed=0, steps=3, guidance=2.0)
    # oracle: the same DDIM run with a hand-made network call: [x, 2s - 1] conditional, [x, 0] unconditional
    unet = pipe.unet

    def net(x, t, c):
        return unet(torch.cat([x, c], 1), t)

    c = (2 * s - 1)[None].expand(2, -1, -1, -1)
    x = torch.randn((2, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    ref = sample_ddim(Denoiser(net, pipe.prediction), x, pipe.schedule, steps=3, cond=c, uncond=torch.zeros_like(c),
                      guidance=2.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, (ref / 2 + 0.5).clamp(0, 1))
    # the output follows the condition: guidance, another sketch, the seed each change it; the seed reproduces it
    assert not torch.equal(out, pipe.sample(None, n=2, condition=s, seed=0, steps=3, guidance=1.0))
    other = fastdiff.sketch(images[1].float())
    assert not torch.equal(out, pipe.sample(None, n=2, condition=other, seed=0, steps=3, guidance=2.0))
    assert torch.equal(out, pipe.sample(None, n=2, condition=s, seed=0, steps=3, guidance=2.0))
    assert not torch.equal(out, pipe.sample(None, n=2, condition=s, seed=1, steps=3, guidance=2.0))


def test_sketch_is_resized_and_validated(sketch_run):
    run, images = sketch_run
    pipe = load_pixel_pipeline(run)
    s = fastdiff.sketch(images[2].float())[0]                    # (16, 16)
    base = pipe.condition_tensor(s)
    big = s.repeat_interleave(2, 0).repeat_interleave(2, 1)      # a 32x32 drawing of the same lines
    torch.testing.assert_close(pipe.condition_tensor(big), base)  # max-pooled back: the lines survive exactly
    small = s[::2, ::2]                                          # an 8x8 sketch is scaled up by nearest neighbour
    torch.testing.assert_close(pipe.condition_tensor(small)[0, 0],
                               (2 * small - 1).repeat_interleave(2, 0).repeat_interleave(2, 1))
    pil = fastdiff.sketch(Image.fromarray(images[2, 0].numpy()))  # PIL edges 255 on 0 -> the same input
    torch.testing.assert_close(pipe.condition_tensor(pil), base)
    cases = [(s * 255, "values must lie in"), (s[:, :12], "must be square"), (s[None, None].expand(1, 3, -1, -1),
             "1 channel"), (s[None, None].expand(3, 1, -1, -1), "a batch of 3 for 2 images")]
    for bad, msg in cases:
        with pytest.raises(InvalidArgument, match="^sketch: .*" + msg):
            pipe.sample(None, n=2, condition=bad, steps=2)
    with pytest.raises(InvalidArgument, match="^sketch: this model is sketch-conditioned"):
        fastdiff.generate(model=str(run), n=2, steps=2)


def test_generate_with_a_sketch_run_and_its_exported_folder(sketch_run, tmp_path):
    run, images = sketch_run
    s = fastdiff.sketch(images[3].float())
    ims = fastdiff.generate(model=str(run), sketch=s, n=4, seed=0, steps=3, progress=False)
    assert len(ims) == 4 and all(isinstance(im, Image.Image) and im.size == (16, 16) for im in ims)
    again = fastdiff.generate(model=str(run), sketch=s, n=4, seed=0, steps=3, progress=False)
    assert [im.tobytes() for im in ims] == [im.tobytes() for im in again]
    folder = load_pixel_pipeline(run).save(tmp_path / "exported", dtype=None)
    exported = load_pixel_pipeline(folder)
    assert exported.condition == load_pixel_pipeline(run).condition
    same = fastdiff.generate(model=str(folder), sketch=s, n=4, seed=0, steps=3, progress=False)
    assert [im.tobytes() for im in ims] == [im.tobytes() for im in same]
    # the trainer's export (model card + folder) keeps the condition record too
    from fastdiff.train.export import export_run

    card = export_run(run, tmp_path / "card", dtype=torch.float32)
    assert load_pixel_pipeline(card).condition == exported.condition
    text = (card / "README.md").read_text()
    assert "sketch-conditional" in text and "no class labels" in text
    assert "- Condition: the sketch image as extra input channels (`fastdiff.sketch(image, high=0.3, low=0.15" in text
    # a batch of sketches: one image each
    batch = fastdiff.sketch(images[:3].float())
    assert len(fastdiff.generate(model=str(run), sketch=batch, seed=0, steps=2, progress=False)) == 3
    with pytest.raises(InvalidArgument, match="^n: 2 images for a batch of 3 sketches"):
        fastdiff.generate(model=str(run), sketch=batch, n=2, steps=2)
    # a model without a condition: the sketch is refused by name
    with pytest.raises(InvalidArgument, match="^sketch: model .* takes no sketch"):
        fastdiff.generate(sketch=s, n=1, steps=2)
    # the named model: a missing sketch is refused before anything loads
    with pytest.raises(InvalidArgument, match="^sketch: the fashion-sketch model"):
        fastdiff.generate(model="fashion-sketch", n=4)


def test_cli_generate_sketch(sketch_run, tmp_path):
    run, images = sketch_run
    path = tmp_path / "sketch.png"
    fastdiff.sketch(Image.fromarray(images[4, 0].numpy())).save(path)
    out = tmp_path / "grid.png"
    cmd = [sys.executable, "-m", "fastdiff", "generate", "--model", str(run), "--sketch", str(path), "--n", "4",
           "--steps", "2", "--out", str(out), "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    img = Image.open(out)
    assert img.text["fastdiff:sketch"] == str(path)
    expected = fastdiff.generate(model=str(run), sketch=str(path), n=4, seed=0, steps=2, progress=False)
    assert image_grid(expected, 4, row_labels=None).tobytes() == img.convert(img.mode).tobytes()
    r = subprocess.run([sys.executable, "-m", "fastdiff", "generate", "--model", "fashion-sketch", "--out",
                        str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and "--sketch" in r.stderr


# ---------------------------------------------------------------------------------------------------------------
# Evaluating a sketch-to-image model (fastdiff eval --checkpoint of a sketch run)
# ---------------------------------------------------------------------------------------------------------------

def test_outline_f1_closed_form():
    from fastdiff.eval.sketch_eval import outline_f1

    true = torch.zeros(3, 1, 12, 12)
    true[:, :, 3, 2:10] = 1                      # a horizontal edge of 8 pixels
    pred = torch.zeros(3, 1, 12, 12)
    pred[0, :, 4, 2:10] = 1                      # one row off: inside the tolerance
    pred[1, :, 6, 2:10] = 1                      # three rows off: nothing matches
    pred[2, :, 3, 2:6] = 1                       # half the edge, exactly on it...
    pred[2, :, 9, 0:4] = 1                       # ...and 4 stray pixels
    s = outline_f1(pred, true)
    torch.testing.assert_close(s[0], torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(s[1], torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64))
    # precision 4/8 on the edge; recall: the sketch's pixels within one pixel of a generated one: columns 2..6 = 5/8
    p, r = 4 / 8, 5 / 8
    torch.testing.assert_close(s[2], torch.tensor([2 * p * r / (p + r), p, r], dtype=torch.float64))
    with pytest.raises(ValueError, match="must be"):
        outline_f1(pred[:, 0], true[:, 0])


@pytest.fixture(scope="module")
def fashion_sketch_run(tmp_path_factory):
    from fastdiff.eval.data import load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    u8 = ((images[:64] + 1) * 127.5).round().to(torch.uint8)
    data = ImageDataset(u8, labels[:64], tuple(str(i) for i in range(10)), "fashion-test-64")
    run = tmp_path_factory.mktemp("fsketch") / "run"
    Trainer(TrainConfig(run_dir=str(run), conditioning="sketch", max_steps=2,
                        **{**BASE, "image_size": 32}), dataset=data, progress=False).run()
    return run


def test_sketch_eval_scores_one_image_per_test_sketch(fashion_sketch_run, tmp_path):
    import json

    from fastdiff.cli import sketch_model
    from fastdiff.eval.data import load_fashion_mnist
    from fastdiff.eval.sketch_eval import evaluate_sketch_model, outline_f1, sketch_test_set
    from fastdiff.train.conditions import SKETCH_PARAMS

    draw, params = sketch_model(fashion_sketch_run)
    assert params == SKETCH_PARAMS   # the thresholds the trainer drew its conditions with
    assert sketch_model(tmp_path) is None
    images, labels, sketches = sketch_test_set(2, params)
    all_images, all_labels = load_fashion_mnist("test")
    for c in range(10):   # the first two test images of each class, in file order, and fastdiff.sketch of each
        first = torch.nonzero(all_labels == c).flatten()[:2]
        torch.testing.assert_close(images[2 * c:2 * c + 2], all_images[first])
        assert labels[2 * c:2 * c + 2].tolist() == [c, c]
    u8 = ((images + 1) * 127.5).round().to(torch.uint8)
    want = torch.stack([fastdiff.sketch(u8[i]) for i in range(len(u8))]).mul(255).to(torch.uint8)
    assert torch.equal(sketches, want.reshape(sketches.shape))

    report, outline, generated, used = evaluate_sketch_model(lambda sk, seed: draw(sk, seed=seed, steps=2), params,
                                                             per_class=2, batch=8)
    assert torch.equal(used, sketches) and generated.shape == (20, 1, 32, 32) and report.n == 20
    # the samples are what generate() draws for those sketches with the same seeds (one call per batch of 8)
    expected = fastdiff.generate(model=str(fashion_sketch_run), sketch=sketches[8:16].float() / 255, n=8, seed=8,
                                 steps=2, progress=False)
    exp = torch.stack([torch.from_numpy(__import__("numpy").asarray(im.convert("L"))) for im in expected])
    torch.testing.assert_close(generated[8:16, 0], exp.float() * (2 / 255) - 1)
    gen_u8 = ((generated + 1) * 127.5).round().to(torch.uint8)
    f1 = outline_f1(sketch_maps(gen_u8), sketches).mean(0)
    assert outline.f1 == pytest.approx(float(f1[0])) and outline.n == 20
    assert 0.0 < outline.chance_f1 < 1.0 and report.accuracy is not None

    out = tmp_path / "eval.json"
    r = subprocess.run([sys.executable, "-m", "fastdiff", "eval", "--checkpoint", str(fashion_sketch_run),
                        "--per-class", "2", "--steps", "2", "--batch", "8", "--json", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "outline F1" in r.stderr
    row = json.loads(out.read_text())[0]
    assert row["n"] == 20 and row["outline"]["f1"] == pytest.approx(outline.f1)
    r = subprocess.run([sys.executable, "-m", "fastdiff", "eval", "--checkpoint", str(fashion_sketch_run),
                        "--per-class", "2", "--sampler", "ddim:2", "--sampler", "ddpm:2"], capture_output=True, text=True)
    assert r.returncode == 2 and "--sampler" in r.stderr


def test_bundled_fashion_sketch_follows_test_sketches():
    """The bundled sketch-to-image model: its folder's defaults (guidance 1.5, no x0 clamp) and, on the sketches of
    one test image per class, generated garments whose own edges follow the sketch better than another test image
    of the same class does (the model card's outline F1 on 1,000 sketches: 0.9 against 0.70 by chance)."""
    from fastdiff.eval.sketch_eval import outline_f1, sketch_test_set

    pipe = load_pixel_pipeline("fashion-sketch")
    assert pipe.condition["kind"] == "sketch" and pipe.default_guidance == 1.5 and pipe.clip is None
    images, labels, sketches = sketch_test_set(2, pipe.condition["sketch"])
    first, second = sketches[0::2], sketches[1::2]
    ims = fastdiff.generate(model=pipe, sketch=first.float() / 255, seed=0, progress=False)
    gen = torch.stack([torch.from_numpy(__import__("numpy").array(im.convert("L"))) for im in ims])[:, None]
    ours = outline_f1(sketch_maps(gen), first)[:, 0]
    chance = outline_f1(second, first)[:, 0]
    assert ours.mean() > chance.mean() + 0.1, (ours, chance)
