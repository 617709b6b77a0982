"""Autoencoder metrics: PSNR (closed form), SSIM (scikit-image's structural_similarity as the oracle, and the
formula on constant images), reconstruction FID and codebook usage."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastdiff.eval.metrics import codebook_usage, psnr, reconstruction_fid, reconstruction_metrics, ssim


def test_psnr_closed_form():
    x = torch.zeros(2, 1, 8, 8)
    y = x.clone()
    y[0] += 0.1  # MSE 0.01
    y[1, :, :4] += 0.2  # MSE 0.02 (half the pixels off by 0.2)
    p = psnr(x, y, data_range=2.0)
    assert p.tolist() == pytest.approx([10 * math.log10(4 / 0.01), 10 * math.log10(4 / 0.02)])
    assert psnr(x, y, data_range=1.0)[0].item() == pytest.approx(20.0)
    assert psnr(x, x).isinf().all()
    with pytest.raises(ValueError, match="psnr needs"):
        psnr(x, torch.zeros(2, 1, 8, 7))


def _structured(n, c, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    base = torch.stack([torch.sin(3 * xx * (i + 1)) * torch.cos(2 * yy) for i in range(n * c)]).reshape(n, c, h, w)
    return (0.8 * base + 0.1 * torch.randn(n, c, h, w, generator=g)).clamp(-1, 1)


@pytest.mark.parametrize("c,h,w,noise", [(1, 32, 32, 0.05), (1, 32, 32, 0.5), (3, 24, 40, 0.2), (1, 11, 13, 0.1)])
def test_ssim_matches_scikit_image(c, h, w, noise):
    metrics = pytest.importorskip("skimage.metrics")
    x = _structured(3, c, h, w, 0)
    y = (x + noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    ours = ssim(x, y, data_range=2.0)
    for i in range(len(x)):
        ref = metrics.structural_similarity(x[i].double().numpy(), y[i].double().numpy(), data_range=2.0,
                                            gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                            channel_axis=0)
        assert ours[i].item() == pytest.approx(ref, abs=1e-10)


def test_ssim_constant_images_and_identity():
    a, b, L = 0.3, -0.2, 2.0
    x = torch.full((1, 1, 16, 16), a, dtype=torch.float64)
    y = torch.full((1, 1, 16, 16), b, dtype=torch.float64)
    c1 = (0.01 * L) ** 2
    # no variance: the structure term is C2 / C2 = 1, only the luminance term remains
    assert ssim(x, y, data_range=L).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-12)
    z = _structured(2, 1, 16, 16, 3)
    assert ssim(z, z).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))


def test_reconstruction_fid_and_usage():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten())
    x = _structured(64, 1, 16, 16, 5)
    assert reconstruction_fid(net, x, x) == pytest.approx(0.0, abs=1e-9)
    small = reconstruction_fid(net, x, (x + 0.05 * torch.randn(x.shape)).clamp(-1, 1))
    large = reconstruction_fid(net, x, (x + 0.5 * torch.randn(x.shape)).clamp(-1, 1))
    assert 0 < small < large
    u = codebook_usage(torch.arange(8).repeat(5), 16)
    assert u["codes_used"] == 8 and u["usage"] == 0.5 and u["perplexity"] == pytest.approx(8.0)
    with pytest.raises(ValueError, match="indices must be in"):
        codebook_usage(torch.tensor([16]), 16)
    m = reconstruction_metrics(x, x * 0.9, feature_fn=net, indices=torch.arange(16), num_codes=16)
    assert set(m) == {"n", "psnr", "ssim", "rfid", "codes_used", "usage", "perplexity"}
    assert m["perplexity"] == pytest.approx(16.0)
    assert m["psnr"] == pytest.approx(float(np.mean(psnr(x, x * 0.9).numpy())))


def test_cli_eval_autoencoder(tmp_path):
    """``fastdiff eval --autoencoder`` on a tiny random VQ model: its JSON equals the metrics computed here."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from fastdiff.eval.data import fashion_mnist_dir

    if not (fashion_mnist_dir() / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not installed at {fashion_mnist_dir()} (apt-get install dataset-fashion-mnist)")
    from fastdiff.eval.evaluate import RealReference
    from fastdiff.eval.metrics import conditional_accuracy
    from fastdiff.io.autoencoder_folder import load_autoencoder, save_autoencoder
    from fastdiff.models.vq import VQConfig, VQModel

    torch.manual_seed(0)
    cfg = VQConfig(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                   norm_num_groups=8, num_vq_embeddings=16, vq_embed_dim=4)
    save_autoencoder(VQModel(cfg), tmp_path / "vq")
    out = subprocess.run([sys.executable, "-m", "fastdiff", "eval", "--autoencoder", str(tmp_path / "vq"),
                          "--per-class", "3", "--json", str(tmp_path / "r.json"), "--threads", "1"],
                         capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    assert "psnr" in out.stdout and rep["n"] == 30
    ref = RealReference.build()
    pick = torch.cat([(ref.test_labels == c).nonzero().flatten()[:3] for c in range(10)])
    x, y = ref.test_images[pick], ref.test_labels[pick]
    model = load_autoencoder(tmp_path / "vq")
    with torch.no_grad():
        o = model(x)
    rec = o.sample.clamp(-1, 1)
    assert rep["psnr"] == pytest.approx(float(psnr(x, rec).mean()), rel=1e-5)
    assert rep["ssim"] == pytest.approx(float(ssim(x, rec).mean()), rel=1e-5, abs=1e-7)
    assert rep["rfid"] == pytest.approx(reconstruction_fid(ref.classifier.features, x, rec), rel=1e-4)
    assert rep["usage"] == codebook_usage(o.quant.indices, 16)["usage"]
    assert rep["accuracy"] == pytest.approx(conditional_accuracy(ref.classifier, rec, y)[0])
    bad = subprocess.run([sys.executable, "-m", "fastdiff", "eval", "--autoencoder", str(tmp_path)],
                         capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert bad.returncode == 2 and "no config.json" in bad.stderr
