"""fastdiff.eval: Fréchet distance vs closed forms, the shipped classifier on real data, FID Inception layout."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from fastdiff import settings
from fastdiff.eval.data import (
    class_index,
    fashion_mnist_dir,
    load_image_set,
    save_image_set,
    to_model_space,
)
from fastdiff.eval.inception import FIDInceptionV3, InceptionE, load_fid_inception
from fastdiff.eval.metrics import (
    conditional_accuracy,
    extract_features,
    fid_from_features,
    frechet_distance,
    gaussian_stats,
)

HAVE_FASHION = (fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").exists()
needs_fashion = pytest.mark.skipif(not HAVE_FASHION, reason=f"Fashion-MNIST not installed at {fashion_mnist_dir()} "
                                   "(apt-get install dataset-fashion-mnist)")


def _random_fid_inception(seed=0):
    # Random weights at a scale that keeps activations O(1) through the 94 conv layers (He init; BN in eval
    # mode with unit statistics is then the identity), so features and their FID are not vanishingly small.
    torch.manual_seed(seed)
    net = FIDInceptionV3().eval()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net


def _random_cov(d, rng, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / (rank or d) + (0 if rank else 0.1 * np.eye(d))


# ------------------------------------------------------------------------------------------------------------
# Fréchet distance
# ------------------------------------------------------------------------------------------------------------

def test_frechet_diagonal_closed_form():
    # Diagonal covariances commute: (S1 S2)^(1/2) = diag(sqrt(a b)), so FD = |dmu|^2 + sum (sqrt a - sqrt b)^2.
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    by_hand = (1 + 0 + 4) + ((1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 0.5) ** 2)  # = 5 + 8.25
    assert by_hand == 13.25
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(13.25, rel=1e-12)


def test_frechet_one_dimensional_and_scaled():
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2.  S2 = c^2 S1 (any S1): tr(S1 + c^2 S1 - 2 c S1) = (1 - c)^2 tr S1.
    assert frechet_distance(np.array([0.5]), np.array([[4.0]]), np.array([-1.0]), np.array([[0.25]])) == \
        pytest.approx(1.5 ** 2 + 1.5 ** 2, rel=1e-12)
    rng = np.random.default_rng(0)
    s1 = _random_cov(16, rng)
    mu = rng.standard_normal(16)
    assert frechet_distance(mu, s1, mu, 9.0 * s1) == pytest.approx(4.0 * np.trace(s1), rel=1e-10)


@pytest.mark.parametrize("d", [2, 7, 64])
def test_frechet_matches_scipy_sqrtm_general(d):
    # Non-commuting full-rank covariances: the oracle is the textbook formula with scipy's sqrtm of S1 S2.
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_cov(d, rng), _random_cov(d, rng)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    assert np.abs(covmean.imag).max() < 1e-6 * np.abs(covmean.real).max()
    oracle = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(oracle, rel=1e-9, abs=1e-9)
    # symmetric in its arguments, like the distance it is
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(oracle, rel=1e-9, abs=1e-9)


def test_frechet_identity_is_zero_even_when_singular():
    rng = np.random.default_rng(1)
    for n, d in [(500, 32), (50, 128)]:  # the second covariance has rank 49 < 128 (singular)
        f = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
        assert fid_from_features(f, f) == pytest.approx(0.0, abs=1e-9 * np.trace(np.cov(f.T)))
    # a singular pair that is not identical: the formula still holds (rank-deficient S1, S2 = S1 scaled)
    s = _random_cov(20, rng, rank=5)
    assert frechet_distance(np.zeros(20), s, np.zeros(20), 4.0 * s) == pytest.approx(np.trace(s), rel=1e-8)


def test_fid_of_samples_converges_to_closed_form():
    # Gaussian samples with known parameters: the fitted-Gaussian FD approaches the exact one as N grows.
    rng = np.random.default_rng(2)
    d = 4
    mu1, mu2 = np.zeros(d), np.array([1.0, 0.0, 0.5, 0.0])
    s1, s2 = _random_cov(d, rng), _random_cov(d, rng)
    exact = frechet_distance(mu1, s1, mu2, s2)
    n = 200_000
    x1 = rng.multivariate_normal(mu1, s1, size=n)
    x2 = rng.multivariate_normal(mu2, s2, size=n)
    est = fid_from_features(x1, x2)
    # the estimator's error shrinks like 1/sqrt(N); at N = 2e5 it is well under 1% of this FD
    assert est == pytest.approx(exact, rel=0.02)
    st = gaussian_stats(torch.from_numpy(x1[:1000]))
    assert np.allclose(st.sigma, np.cov(x1[:1000].T)) and st.n == 1000


def test_frechet_bad_input():
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_stats(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="NaN"):
        gaussian_stats(np.array([[0.0, np.nan], [1.0, 2.0]]))


# ------------------------------------------------------------------------------------------------------------
# Data plumbing
# ------------------------------------------------------------------------------------------------------------

def test_padding_to_model_space():
    img = torch.full((1, 28, 28), 255, dtype=torch.uint8)
    x = to_model_space(img)
    assert x.shape == (1, 1, 32, 32)
    assert (x[0, 0, 2:30, 2:30] == 1).all() and x[0, 0, :2].eq(-1).all() and x[0, 0, :, 30:].eq(-1).all()
    assert (x == 1).sum() == 28 * 28


def test_image_set_roundtrip(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 1, 32, 32, generator=g) * 2 - 1
    labels = torch.tensor([0, 3, 3, 9, 7, 1])
    save_image_set(tmp_path / "s.npz", images, labels)
    back, back_labels = load_image_set(tmp_path / "s.npz")
    assert torch.equal(back_labels, labels)
    assert (back - images).abs().max() <= 1 / 127.5 / 2 + 1e-6  # uint8 rounding only
    # a folder with one subfolder per class (names or indices)
    for i, (img, lab) in enumerate(zip(back, labels)):
        d = tmp_path / "folder" / (["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                                     "sneaker", "bag", "ankle_boot"][lab] if i % 2 else str(int(lab)))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(((img[0] + 1) * 127.5).round().byte().numpy()).save(d / f"{i}.png")
    fx, fy = load_image_set(tmp_path / "folder")
    pairs = lambda xs, ys: sorted((int(c), tuple(im.flatten().tolist())) for im, c in zip(xs, ys))  # noqa: E731
    assert pairs(fx, fy) == pairs(back, labels)  # same (image, label) pairs, in folder order
    assert class_index("Ankle Boot") == 9 and class_index("t-shirt") == 0 and class_index("7") == 7
    with pytest.raises(ValueError, match="unknown Fashion-MNIST class"):
        class_index("hat")
    np.savez(tmp_path / "bad.npz", images=np.full((2, 32, 32), 3.0, np.float32))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        load_image_set(tmp_path / "bad.npz")


# ------------------------------------------------------------------------------------------------------------
# FID InceptionV3: layout of pytorch-fid's pt_inception-2015-12-05 weights (random weights here)
# ------------------------------------------------------------------------------------------------------------

def test_inception_parameter_count_matches_torchvision_layout():
    # torchvision documents inception_v3 (aux classifier, 1000 classes) at 27,161,264 parameters. The FID
    # network drops AuxLogits (conv0 768->128 1x1 + BN, conv1 128->768 5x5 + BN, fc 768->1000) and has 1008
    # classes: the difference is computed from those layer shapes.
    aux = 768 * 128 + 2 * 128 + 128 * 768 * 25 + 2 * 768 + 768 * 1000 + 1000
    expected = 27_161_264 - aux + 8 * 2048 + 8
    assert sum(p.numel() for p in FIDInceptionV3().parameters()) == expected


def test_inception_layout_strict_load_and_features(tmp_path):
    net = _random_fid_inception()
    for m in net.modules():  # non-trivial BN statistics, so a failed copy would show in the outputs
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    state = net.state_dict()
    # the key names of pytorch-fid's file (spot checks of every block type) with their shapes
    expect = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_5d.branch5x5_2.conv.weight": (64, 48, 5, 5),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    for k, shape in expect.items():
        assert tuple(state[k].shape) == shape, k
    assert not any(k.startswith("AuxLogits") for k in state)
    # 94 conv+BN units: 5 stem + 3x7 (A) + 4 (B) + 4x10 (C) + 6 (D) + 2x9 (E)
    assert sum(k.endswith(".conv.weight") for k in state) == 5 + 21 + 4 + 40 + 6 + 18

    # Saved as pytorch-fid's file is (a plain .pth state dict), with and without BN step counters.
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    path2 = tmp_path / "no_counters.pth"
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path2)
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = net(x)
        for p in (path, path2):
            got = load_fid_inception(p)(x)
            assert got.shape == (2, 2048)
            torch.testing.assert_close(got, want, rtol=0, atol=0)

    # spatial shapes at 299x299 (the comments of the reference layout)
    shapes = {}
    hooks = [getattr(net, n).register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, tuple(o.shape[1:])))
             for n in ("Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e", "Mixed_7a", "Mixed_7c")]
    with torch.no_grad():
        net(torch.rand(1, 3, 40, 40))
    for h in hooks:
        h.remove()
    assert shapes == {"Conv2d_4a_3x3": (192, 71, 71), "Mixed_5d": (288, 35, 35), "Mixed_6e": (768, 17, 17),
                      "Mixed_7a": (1280, 8, 8), "Mixed_7c": (2048, 8, 8)}


def test_inception_wrong_files_give_clear_errors(tmp_path):
    state = FIDInceptionV3().state_dict()
    cases = {
        "missing.pth": ({k: v for k, v in state.items() if k != "Mixed_6b.branch1x1.conv.weight"},
                        "missing keys: Mixed_6b.branch1x1.conv.weight"),
        "extra.pth": ({**state, "AuxLogits.fc.weight": torch.zeros(1008, 768)}, "unexpected keys: AuxLogits.fc.weight"),
        "shape.pth": ({**state, "fc.weight": torch.zeros(1000, 2048)}, r"fc.weight: file \(1000, 2048\)"),
        "other.pth": ({"conv.weight": torch.zeros(3)}, "not the FID InceptionV3 weights file"),
    }
    for name, (sd, msg) in cases.items():
        torch.save(sd, tmp_path / name)
        with pytest.raises(ValueError, match=msg):
            load_fid_inception(tmp_path / name)
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch state dict"):
        load_fid_inception(tmp_path / "garbage.pth")
    with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05"):
        load_fid_inception(tmp_path / "absent.pth")


def test_inception_fid_quirks():
    # TF-style average pooling divides by the real pixels only: a constant map stays constant at the border.
    from fastdiff.eval.inception import _avg_pool_tf

    assert torch.equal(_avg_pool_tf(torch.ones(1, 1, 5, 5)), torch.ones(1, 1, 5, 5))
    # Mixed_7c pools its pool branch with a max pool: its output differs from the average-pool variant only
    # in the pool branch's 192 channels (the last ones).
    torch.manual_seed(0)
    e_max = InceptionE(64, pool="max").eval()
    e_avg = InceptionE(64, pool="avg").eval()
    e_avg.load_state_dict(e_max.state_dict())
    x = torch.randn(1, 64, 8, 8)
    with torch.no_grad():
        a, b = e_max(x), e_avg(x)
    assert torch.equal(a[:, :-192], b[:, :-192]) and not torch.allclose(a[:, -192:], b[:, -192:])
    assert FIDInceptionV3().Mixed_7c.pool == "max" and FIDInceptionV3().Mixed_7b.pool == "avg"


# ------------------------------------------------------------------------------------------------------------
# The shipped classifier on the real data
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from fastdiff.eval import evaluate

    # A fresh feature cache for this module: the reference pass really runs the classifier here, and the CLI
    # subprocesses (which inherit the variable) reuse its result instead of recomputing it.
    cache = tmp_path_factory.mktemp("cache")
    env = pytest.MonkeyPatch()
    env.setenv("FASTDIFF_CACHE", str(cache))  # for the subprocesses
    evaluate._cached_reference.cache_clear()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    with settings.override(cache_dir=cache):
        yield evaluate.RealReference.build()
    env.undo()


@needs_fashion
def test_shipped_classifier_accuracy(reference):
    from fastdiff.eval.classifier import DEFAULT_CLASSIFIER_PATH

    assert DEFAULT_CLASSIFIER_PATH.stat().st_size < 2 * 1024 * 1024
    assert len(reference.test_images) == 10_000
    acc = (reference.test_logits.argmax(1) == reference.test_labels).double().mean().item()
    assert acc >= 0.90
    assert acc == reference.test_accuracy
    # the conditional-accuracy metric on real labelled images is exactly the classifier's accuracy (checked on
    # 2,000 test images against the reference pass's logits, and per class)
    x, y = reference.test_images[:2000], reference.test_labels[:2000]
    metric, per_class = conditional_accuracy(reference.classifier, x, y)
    direct = (reference.test_logits[:2000].argmax(1) == y).double()
    assert metric == direct.mean().item()
    for c in range(10):
        assert per_class[c].item() == pytest.approx(direct[y == c].mean().item(), abs=1e-12)
    with torch.no_grad():  # the features used for FID are the classifier's own penultimate layer
        torch.testing.assert_close(reference.classifier.features(x[:100]).double(), reference.test_features[:100])


@needs_fashion
def test_evaluate_real_images(reference):
    from fastdiff.eval.evaluate import evaluate_images, format_table

    x, y = reference.test_images[:1000], reference.test_labels[:1000]
    rep = evaluate_images(x, y, name="real test", reference=reference)
    assert rep.accuracy == (reference.test_logits[:1000].argmax(1) == y).double().mean().item()
    assert rep.n == 1000 and rep.classifier_real_accuracy == reference.test_accuracy
    # real test images vs the test split: as close to it as the floor (1000 real train images) is
    assert 0 < rep.fid < 2 * rep.fid_floor
    # a set compared with the statistics of itself: FID 0
    assert frechet_distance(gaussian_stats(reference.test_features), reference.test_stats) < 1e-8
    # images asked to be of another class are recognised as not that class
    wrong, _ = conditional_accuracy(reference.classifier, x, (y + 1) % 10)
    assert wrong < 0.1
    noise = evaluate_images(torch.rand(300, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1,
                            name="noise", reference=reference)
    assert noise.accuracy is None and noise.fid > 20 * noise.fid_floor
    table = format_table([rep, noise])
    assert "floor" in table and "real test" in table and f"{rep.fid:.3f}" in table


@needs_fashion
def test_sampling_an_exact_denoiser_recovers_its_targets(reference):
    # The eps a perfect network predicts when class y's data is one image x_y: eps = (x - sqrt(abar) x_y) / sqrt(1 - abar).
    # DDIM then lands on x_y exactly, so the evaluation must report the classifier's verdict on those targets.
    from fastdiff.eval.evaluate import evaluate_images
    from fastdiff.eval.generate import sample_per_class
    from fastdiff.samplers import Denoiser, linear_schedule

    pred = reference.test_logits.argmax(1)
    targets = torch.stack([reference.test_images[((reference.test_labels == c) & (pred == c)).nonzero()[0, 0]]
                           for c in range(10)])
    sched = linear_schedule()
    acp = sched.alphas_cumprod.double()

    def net(x, t, y):
        a = acp[t.long()].view(-1, 1, 1, 1)
        return ((x.double() - a.sqrt() * targets[y].double()) / (1 - a).sqrt()).float()

    images, labels, _ = sample_per_class(Denoiser(net, "eps"), sched, sampler="ddim", steps=10, per_class=3,
                                         num_classes=10, batch=7, seed=0)
    assert torch.equal(labels, torch.arange(10).repeat_interleave(3))
    torch.testing.assert_close(images, targets[labels], atol=1e-4, rtol=0)
    rep = evaluate_images(images, labels, reference=reference)
    assert rep.accuracy == 1.0


@needs_fashion
def test_cli_eval_images(tmp_path, reference):
    x, y = reference.test_images[:300], reference.test_labels[:300]
    save_image_set(tmp_path / "real.npz", x, y)
    out = subprocess.run([sys.executable, "-m", "fastdiff", "eval", "--images", str(tmp_path / "real.npz"),
                          "--json", str(tmp_path / "r.json"), "--threads", "1"],
                         capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    assert "floor" in out.stdout and "real.npz" in out.stdout
    rep = json.loads((tmp_path / "r.json").read_text())[0]
    with torch.no_grad():
        xq, _ = load_image_set(tmp_path / "real.npz")
        direct = (reference.classifier(xq).argmax(1) == y).double().mean().item()
    assert rep["n"] == 300 and rep["accuracy"] == pytest.approx(direct)
    bad = subprocess.run([sys.executable, "-m", "fastdiff", "eval", "--images", str(tmp_path / "nope.npz")],
                         capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert bad.returncode == 2 and "argument --images: path does not exist" in bad.stderr


@needs_fashion
def test_cli_eval_checkpoint(tmp_path, reference):
    # A 2-step tiny run written by the trainer, then `fastdiff eval --checkpoint` samples it with two samplers.
    # Its samples are noise-like, so only the plumbing is checked: N, labels, reproducibility, the table.
    from fastdiff.eval._checkpoint import load_for_sampling
    from fastdiff.eval.evaluate import evaluate_images
    from fastdiff.eval.generate import sample_per_class
    from fastdiff.io.datasets import load_fashion_mnist as load_ds
    from fastdiff.train import TrainConfig, train

    ds = load_ds(split="test")
    ds.images, ds.labels = ds.images[:64], ds.labels[:64]
    run = tmp_path / "run"
    train(TrainConfig(run_dir=str(run), model="tiny", max_steps=2, batch_size=8, warmup_steps=1, sample_every=0,
                      precision="fp32", threads=1), dataset=ds, progress=False)
    out = subprocess.run([sys.executable, "-m", "fastdiff", "eval", "--checkpoint", str(run), "--sampler", "ddim:3",
                          "--sampler", "dpmpp_2m:2", "--per-class", "2", "--precision", "fp32", "--guidance", "2",
                          "--json", str(tmp_path / "r.json"), "--threads", "1"],
                         capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["name"] for r in rows] == ["ddim 3", "dpmpp_2m 2"] and all(r["n"] == 20 for r in rows)
    assert "ddim 3" in out.stdout and "dpmpp_2m 2" in out.stdout
    # the same seed in-process reproduces the CLI's numbers
    m = load_for_sampling(run, precision="fp32")
    images, labels, _ = sample_per_class(m.denoiser, m.schedule, sampler="ddim", steps=3, per_class=2,
                                         num_classes=10, null_label=m.null_label, guidance=2.0, seed=0,
                                         spacing="trailing")
    rep = evaluate_images(images, labels, reference=reference)
    assert rep.accuracy == pytest.approx(rows[0]["accuracy"]) and rep.fid == pytest.approx(rows[0]["fid"])


@needs_fashion
def test_inception_fid_through_evaluate(reference):
    # Random-weight FID Inception (the real weights are not available here): the same 4 real images as the
    # real side give Inception FID 0; other images do not. Checks the [-1, 1] -> [0, 1] plumbing and the cache
    # of the real side.
    from fastdiff.eval import evaluate

    full = _random_fid_inception()

    class FirstFeatures(torch.nn.Module):
        # The plumbing is what is under test here (the 2048-d output has its own test); 64 features keep the
        # Frechet eigen-decompositions cheap (a 2048x2048 eigh takes ~20 s on this CPU).
        def forward(self, x):
            return full(x)[:, :64]

    net = FirstFeatures()
    x, y = reference.test_images[:4], reference.test_labels[:4]
    same = evaluate.evaluate_images(x, y, reference=reference, inception=net, inception_real=4)
    with torch.no_grad():
        feats = net((x + 1) / 2).double()
    scale = np.trace(np.cov(feats.numpy().T))
    assert same.inception_real_n == 4 and same.inception_fid == pytest.approx(0.0, abs=1e-9 * scale)
    other = evaluate.evaluate_images(reference.test_images[4:8], y, reference=reference, inception=net,
                                     inception_real=4)
    assert other.inception_fid > 1e-3 * scale
    assert evaluate._INCEPTION_REAL_STATS[4][0] is net
    assert "Inception FID" in evaluate.format_table([same, other])
