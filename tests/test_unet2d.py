"""fastdiff UNet2D vs diffusers UNet2DModel on the same weights, loaded from a diffusers folder."""
import json

import pytest
import torch

from fastdiff.io.checkpoint import CheckpointError
from fastdiff.io.diffusers_unet2d import load_unet2d, save_unet2d
from fastdiff.models.unet2d import CIFAR10_DDPM, FASHION32, UNet2D, UNet2DConfig

try:
    import diffusers
except ImportError:  # the reference implementations are test extras: fastdiff's own tests still run
    diffusers = None
needs_reference = pytest.mark.skipif(diffusers is None, reason="needs diffusers (the reference)")

SMALL_UNCOND = dict(  # the CIFAR-10 layout (padding-0 downsampling, flip=False, shift 1), 1-head attention
    sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=None, norm_num_groups=8, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1,
    downsample_padding=0,
)
SMALL_COND = dict(  # class-conditional, multi-head attention, diffusers' default padding/flip
    sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=8, norm_num_groups=8, num_class_embeds=11,
)


def _diffusers_folder(tmp_path, kw, seed=0):
    torch.manual_seed(seed)
    ref = diffusers.UNet2DModel(**kw).eval()
    with torch.no_grad():  # the default init zeroes nothing, but randomize everything to be sure
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ref.save_pretrained(tmp_path / "unet", safe_serialization=True)
    return ref, tmp_path / "unet"


@needs_reference
@pytest.mark.parametrize("kw", [SMALL_UNCOND, SMALL_COND], ids=["uncond_cifar_layout", "class_cond"])
def test_matches_diffusers_fp32(tmp_path, kw):
    ref, folder = _diffusers_folder(tmp_path, kw)
    ours = load_unet2d(folder)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, kw["in_channels"], 16, 16, generator=g)
    t = torch.tensor([0, 417, 999])
    labels = torch.tensor([0, 4, 10]) if kw.get("num_class_embeds") else None
    with torch.no_grad():
        want = ref(x, t, class_labels=labels).sample
        got = ours(x, t, labels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Fractional timesteps (Euler/DPM spacings) and a scalar timestep follow the same embedding.
    with torch.no_grad():
        torch.testing.assert_close(ours(x, 250.5, labels), ref(x, torch.tensor(250.5), class_labels=labels).sample,
                                   rtol=1e-5, atol=1e-5)


@needs_reference
def test_save_roundtrip_loads_in_diffusers(tmp_path):
    torch.manual_seed(0)
    kw = {k: v for k, v in SMALL_COND.items() if k != "num_class_embeds"}
    ours = UNet2D(UNet2DConfig(**kw, num_classes=10, null_class=True, class_names=tuple("abcdefghij"))).eval()
    folder = save_unet2d(ours, tmp_path / "m")
    back = load_unet2d(folder)
    assert back.config == ours.config and back.config.class_names == ours.config.class_names
    ref = diffusers.UNet2DModel.from_pretrained(folder, local_files_only=True).eval()
    assert ref.config.num_class_embeds == 11  # 10 classes + the null class
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, torch.tensor([5, 900]), torch.tensor([3, 10])),
                                   ref(x, torch.tensor([5, 900]), class_labels=torch.tensor([3, 10])).sample,
                                   rtol=1e-5, atol=1e-5)


@needs_reference
def test_cifar10_preset_is_ho_et_al_35_7m():
    ours = UNet2D(CIFAR10_DDPM)
    n = ours.num_parameters()
    kw = {k: getattr(CIFAR10_DDPM, k) for k in SMALL_UNCOND}
    with torch.device("meta"):
        ref = diffusers.UNet2DModel(**kw)
    assert n == sum(p.numel() for p in ref.parameters())
    assert round(n / 1e6, 1) == 35.7
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}


@needs_reference
def test_fashion32_preset_keys_match_diffusers():
    cfg = FASHION32
    kw = {k: getattr(cfg, k) for k in SMALL_UNCOND}
    with torch.device("meta"):
        ref = diffusers.UNet2DModel(**kw, num_class_embeds=cfg.num_class_embeds)
    ours = UNet2D(cfg)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ref.state_dict().items()}


@needs_reference
def test_strict_loading_lists_missing_and_unexpected(tmp_path):
    _, folder = _diffusers_folder(tmp_path, SMALL_COND)
    from safetensors.torch import load_file, save_file
    sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    sd.pop("conv_in.weight")
    sd["extra.weight"] = torch.zeros(1)
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"(?s)missing keys \(1\): conv_in.weight.*unexpected keys \(1\): extra.weight"):
        load_unet2d(folder)


@needs_reference
def test_shape_mismatch_and_unsupported_config(tmp_path):
    _, folder = _diffusers_folder(tmp_path, SMALL_COND)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["block_out_channels"] = [16, 48]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_unet2d(folder)
    cfg["block_out_channels"] = [16, 32]
    cfg["resnet_time_scale_shift"] = "scale_shift"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="resnet_time_scale_shift"):
        load_unet2d(folder)
    with pytest.raises(CheckpointError, match="no such folder"):
        load_unet2d(tmp_path / "nope")


def test_bad_inputs():
    m = UNet2D(UNet2DConfig(**{k: v for k, v in SMALL_COND.items() if k != "num_class_embeds"},
                            num_classes=10, null_class=True))
    x = torch.randn(2, 1, 16, 16)
    with pytest.raises(ValueError, match="class-conditional"):
        m(x, 3)
    with pytest.raises(ValueError, match="class label outside"):
        m(x, 3, torch.tensor([0, 11]))
    with pytest.raises(ValueError, match="multiples of 2"):
        m(torch.randn(2, 1, 15, 15), 3, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="expected x of shape"):
        m(torch.randn(2, 3, 16, 16), 3, torch.tensor([0, 1]))
