"""Autoencoder folders against diffusers: diffusers opens what fastdiff saves and fastdiff opens what diffusers
saves, with the same encode/decode outputs on random weights (oracle: diffusers' VQModel and AutoencoderKL)."""
from __future__ import annotations

import json

import pytest
import torch

from fastdiff.io.autoencoder_folder import load_autoencoder, save_autoencoder
from fastdiff.io.checkpoint import CheckpointError
from fastdiff.models import vae
from fastdiff.models.vq import TINY, VQConfig, VQModel

try:
    import diffusers
except ImportError:  # the reference implementations are test extras: fastdiff's own tests still run
    diffusers = None
needs_reference = pytest.mark.skipif(diffusers is None, reason="needs diffusers (the reference)")

# latent 3 -> codes of dimension 5: quant_conv and post_quant_conv change the width
VQ_WIDE = VQConfig(in_channels=1, out_channels=1, latent_channels=3, block_out_channels=(16, 32, 32),
                   layers_per_block=1, norm_num_groups=8, num_vq_embeddings=32, vq_embed_dim=5, beta=0.5,
                   decay=0.9, restart_after=7)


def _diffusers_kwargs(cfg) -> dict:
    return {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}


def _image(cfg, seed=0):
    return torch.rand(2, cfg.in_channels, 16, 24, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@torch.no_grad()
def _same_vq(ours: VQModel, ref, x):
    h_ref = ref.encode(x).latents
    h = ours.encode(x)
    torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-4)
    # diffusers' decode quantises with cdist + argmin: the same codes, the same image
    idx_ref = ref.quantize(h_ref)[2][2].flatten()
    assert torch.equal(ours.quantize(h_ref).indices.flatten(), idx_ref)
    torch.testing.assert_close(ours.decode(h_ref), ref.decode(h_ref).sample, rtol=1e-4, atol=1e-4)


@needs_reference
@pytest.mark.parametrize("cfg", [TINY, VQ_WIDE], ids=["tiny", "wide"])
def test_diffusers_opens_fastdiff_vq(cfg, tmp_path, randomize):
    torch.manual_seed(0)
    ours = randomize(VQModel(cfg), 1)
    ours.quantize.reset_ema()
    save_autoencoder(ours, tmp_path / "vq")
    ref = diffusers.VQModel.from_pretrained(tmp_path / "vq").eval()
    # every diffusers tensor came from the file (nothing left at its init)
    ours_sd = ours.state_dict()
    for k, v in ref.state_dict().items():
        assert torch.equal(v, ours_sd[k]), k
    _same_vq(ours, ref, _image(cfg))


@needs_reference
def test_fastdiff_opens_diffusers_vq(tmp_path, randomize):
    ref = randomize(diffusers.VQModel(**_diffusers_kwargs(VQ_WIDE)), 2)
    ref.save_pretrained(tmp_path / "vq")
    ours = load_autoencoder(tmp_path / "vq")
    assert isinstance(ours, VQModel)
    assert not ours.training
    _same_vq(ours, ref, _image(VQ_WIDE, 1))
    # EMA state rebuilt from the codebook; training settings are the defaults (diffusers stores none)
    torch.testing.assert_close(ours.quantize.ema_embed_sum, ours.quantize.embedding.weight)
    assert ours.quantize.ema_cluster_size.eq(1).all()
    assert ours.config.beta == VQConfig().beta


@needs_reference
def test_vq_training_settings_roundtrip_and_no_ema_state_in_folder(tmp_path):
    torch.manual_seed(0)
    ours = VQModel(VQ_WIDE)
    save_autoencoder(ours, tmp_path / "vq", dtype=torch.float16)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "vq" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("quantize.embedding.weight").dtype == torch.float16
    assert not any("ema_" in k or "steps_unused" in k for k in keys)
    assert keys == {k for k in diffusers.VQModel(**_diffusers_kwargs(VQ_WIDE)).state_dict()}
    back = load_autoencoder(tmp_path / "vq")
    assert back.config == VQ_WIDE
    assert back.quantize.embedding.weight.dtype == torch.float32


@needs_reference
def test_kl_roundtrip_both_ways(tmp_path, randomize):
    cfg = vae.TINY
    ours = randomize(vae.AutoencoderKL(cfg), 3)
    save_autoencoder(ours, tmp_path / "kl")
    ref = diffusers.AutoencoderKL.from_pretrained(tmp_path / "kl").eval()
    x = _image(cfg, 2)
    z = torch.randn(2, cfg.latent_channels, 8, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x).mean, ref.encode(x).latent_dist.mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.encode(x).std, ref.encode(x).latent_dist.std, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, rtol=1e-4, atol=1e-4)
    # and back: a diffusers-saved AutoencoderKL
    ref2 = randomize(diffusers.AutoencoderKL(**_diffusers_kwargs(cfg)), 4)
    ref2.save_pretrained(tmp_path / "kl2")
    ours2 = load_autoencoder(tmp_path / "kl2")
    assert isinstance(ours2, vae.AutoencoderKL)
    with torch.no_grad():
        torch.testing.assert_close(ours2.encode(x).mean, ref2.encode(x).latent_dist.mean, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours2.decode(z), ref2.decode(z).sample, rtol=1e-4, atol=1e-4)


def test_pipeline_subfolder_and_errors(tmp_path):
    torch.manual_seed(0)
    save_autoencoder(VQModel(TINY), tmp_path / "pipe" / "vqvae")
    assert isinstance(load_autoencoder(tmp_path / "pipe"), VQModel)
    # strict: a tensor too many is listed
    from safetensors.torch import load_file, save_file

    f = tmp_path / "pipe" / "vqvae" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    sd["quantize.extra"] = torch.zeros(1)
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match="quantize.extra"):
        load_autoencoder(tmp_path / "pipe")
    cfg = json.loads((tmp_path / "pipe" / "vqvae" / "config.json").read_text())
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**cfg, "_class_name": "UNet2DModel"}))
    with pytest.raises(CheckpointError, match="expected 'VQModel' or 'AutoencoderKL'"):
        load_autoencoder(tmp_path / "bad")
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**cfg, "norm_type": "spatial"}))
    with pytest.raises(CheckpointError, match="norm_type"):
        load_autoencoder(tmp_path / "bad")
    with pytest.raises(TypeError, match="VQModel or AutoencoderKL"):
        save_autoencoder(torch.nn.Linear(1, 1), tmp_path / "x")
