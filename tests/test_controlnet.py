"""The SD1 ControlNet against diffusers' ``ControlNetModel`` on the same random weights, and its loaders.

Oracle: diffusers. Its ControlNet is built with ``ControlNetModel.from_unet`` of a small ``UNet2DConditionModel``
and then EVERY parameter is re-drawn at random, the zero convolutions and the hint encoder's ``conv_out``
included (left at zero they would hide any error in what feeds them). The 12-style list of down residuals and
the mid residual are compared one by one, then diffusers' UNet and fastdiff's with the same residuals added.
The original single-file names fastdiff writes are cross-checked against diffusers' own converter of original
ControlNet checkpoints.
"""
from __future__ import annotations

import pytest
import torch

from fastdiff.models import controlnet as cn
from fastdiff.models import unet_sd

diffusers = pytest.importorskip("diffusers")

THREE_LEVEL = unet_sd.UNetSDConfig(block_out_channels=(16, 32, 32), cross_attention=(False, True, True),
                                   layers_per_block=1, num_heads=4, cross_attention_dim=24, norm_num_groups=4)
HINT = (8, 16, 16, 32)  # narrower than SD1's (16, 32, 96, 256): same depth and strides, a faster test


def _randomize(model: torch.nn.Module, seed: int = 1234) -> torch.nn.Module:
    """Random weights everywhere (zero convolutions included); norm scales around 1 so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = p.dim() == 1 and "norm" in name and name.endswith("weight")
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g) if is_norm else 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 2e-5):
    """fp32 parity: max error within ``rel`` of the reference's magnitude (the SD1 model tests' rule)."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    scale = ref.abs().max().item()
    assert scale > 1e-3, "degenerate reference output"
    err = (ours - ref).abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} vs scale {scale:.3g}"


def _diffusers_unet(cfg: unet_sd.UNetSDConfig):
    return diffusers.UNet2DConditionModel(**{k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"})


def _reference_pair(cfg: unet_sd.UNetSDConfig, seed: int = 0):
    """(diffusers UNet, diffusers ControlNetModel from it), every weight random, the two differently."""
    unet = _randomize(_diffusers_unet(cfg), seed)
    net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=HINT)
    return unet, _randomize(net, seed + 1)


def _inputs(cfg: unet_sd.UNetSDConfig, b=2, h=8, w=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, cfg.in_channels, h, w, generator=g), torch.tensor([999, 3][:b]),
            torch.randn(b, 77, cfg.cross_attention_dim, generator=g), torch.rand(b, 3, 8 * h, 8 * w, generator=g))


def _check_residuals(ours: cn.ControlNet, ref, x, t, ctx, hint, scale):
    with torch.no_grad():
        down, mid = ours(x, t, ctx, hint, conditioning_scale=scale)
        rdown, rmid = ref(x, t, ctx, hint, conditioning_scale=scale, return_dict=False)
    assert len(down) == len(rdown) == ours.config.num_down_residuals
    for i, (a, b) in enumerate(zip(down, rdown)):
        assert a.shape == b.shape, i
        _assert_close(a, b)
    _assert_close(mid, rmid)
    return down, mid, rdown, rmid


# ------------------------------------------------------------------------------------------------- model
@pytest.mark.parametrize("cfg", [unet_sd.TINY, THREE_LEVEL], ids=["tiny", "3level"])
def test_controlnet_and_unet_match_diffusers(cfg):
    ref_unet, ref = _reference_pair(cfg)
    ccfg = cn.ControlNetConfig.from_diffusers(dict(ref.config))
    assert ccfg.unet.block_out_channels == cfg.block_out_channels and ccfg.conditioning_embedding_out_channels == HINT
    ours = cn.ControlNet(ccfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    unet = unet_sd.UNetSD(cfg).eval()
    unet.load_state_dict(ref_unet.state_dict(), strict=True)

    x, t, ctx, hint = _inputs(cfg)
    down, mid, rdown, rmid = _check_residuals(ours, ref, x, t, ctx, hint, 1.0)
    assert len(down) == 1 + len(cfg.block_out_channels) * (cfg.layers_per_block + 1) - 1
    with torch.no_grad():
        got = unet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid)
        want = ref_unet(x, t, ctx, down_block_additional_residuals=rdown, mid_block_additional_residual=rmid).sample
        _assert_close(got, want)
        # the residuals change the output: a test of the addition, not of a no-op
        plain = ref_unet(x, t, ctx).sample
        assert (want - plain).abs().max() > 0.1 * plain.abs().max()
    # a scaled ControlNet, a scalar timestep, one control image for the whole batch (broadcast)
    _check_residuals(ours, ref, x, 500, ctx, hint[:1], 0.35)
    # batch 1, odd latent sizes (13 x 9: the down path rounds up, the up path follows the skips' sizes)
    x1, t1, ctx1, hint1 = _inputs(cfg, b=1, h=13, w=9, seed=3)
    d1, m1, rd1, rm1 = _check_residuals(ours, ref, x1, torch.tensor([321.5]), ctx1, hint1, 0.8)
    with torch.no_grad():
        _assert_close(unet(x1, t1, ctx1, d1, m1),
                      ref_unet(x1, t1, ctx1, down_block_additional_residuals=rd1, mid_block_additional_residual=rm1).sample)


def test_from_unet_copies_the_encoder_and_starts_at_zero():
    ref_unet = _randomize(_diffusers_unet(unet_sd.TINY))
    unet = unet_sd.UNetSD(unet_sd.TINY).eval()
    unet.load_state_dict(ref_unet.state_dict(), strict=True)
    ours = cn.ControlNet.from_unet(unet, conditioning_embedding_out_channels=HINT)
    ref = diffusers.ControlNetModel.from_unet(ref_unet, conditioning_embedding_out_channels=HINT)
    a, b = ours.state_dict(), ref.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if k.startswith("controlnet_cond_embedding.") and not k.startswith("controlnet_cond_embedding.conv_out"):
            assert a[k].shape == b[k].shape, k  # fresh random initialisation in both
        else:
            assert torch.equal(a[k], b[k]), k  # copied from the UNet, or zero
    x, t, ctx, hint = _inputs(unet_sd.TINY)
    with torch.no_grad():
        down, mid = ours(x, t, ctx, hint)
        assert all(float(d.abs().max()) == 0.0 for d in down) and float(mid.abs().max()) == 0.0
        assert torch.equal(unet(x, t, ctx, down, mid), unet(x, t, ctx))


def test_config_roundtrip_through_diffusers():
    cfg = cn.ControlNetConfig(unet=THREE_LEVEL, conditioning_embedding_out_channels=HINT, channel_order="bgr",
                              global_pool_conditions=True)
    kw = {k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"}
    ref = diffusers.ControlNetModel(**kw)
    assert cn.ControlNetConfig.from_diffusers(dict(ref.config)) == cfg
    assert set(cn.ControlNet(cfg).state_dict()) == set(ref.state_dict())


def test_bgr_and_global_pool_match_diffusers():
    cfg = cn.ControlNetConfig(unet=unet_sd.TINY, conditioning_embedding_out_channels=HINT, channel_order="bgr",
                              global_pool_conditions=True)
    ref = _randomize(diffusers.ControlNetModel(**{k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"}))
    ours = cn.ControlNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t, ctx, hint = _inputs(unet_sd.TINY)
    down, mid, _, _ = _check_residuals(ours, ref, x, t, ctx, hint, 1.0)
    assert mid.shape[-2:] == (1, 1)
    unet = _randomize(unet_sd.UNetSD(unet_sd.TINY))
    with torch.no_grad():  # pooled residuals broadcast over the skips
        out = unet(x, t, ctx, down, mid)
    assert out.shape == x.shape


def test_bad_inputs():
    net = cn.ControlNet(cn.TINY)
    unet = unet_sd.UNetSD(unet_sd.TINY)
    x, t, ctx, hint = _inputs(unet_sd.TINY)
    with pytest.raises(ValueError, match="controlnet_cond"):
        net(x, t, ctx, hint[..., :-8])  # not 8x the latents
    with pytest.raises(ValueError, match="controlnet_cond"):
        net(x, t, ctx, hint[:, :1])
    with pytest.raises(ValueError, match="latents"):
        net(x[:, :3], t, ctx, hint)
    with pytest.raises(ValueError, match="text embeddings"):
        net(x, t, ctx[:1], hint)
    with torch.no_grad():
        down, mid = net(x, t, ctx, hint)
    with pytest.raises(ValueError, match="down_block_additional_residuals must be 6"):
        unet(x, t, ctx, down_block_additional_residuals=down[:-1])
    with pytest.raises(ValueError, match="mid_block_additional_residual"):
        unet(x, t, ctx, mid_block_additional_residual=mid[:, 1:])
    with pytest.raises(ValueError, match="channel_order"):
        cn.ControlNetConfig(channel_order="rgba")
