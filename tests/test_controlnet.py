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
from lowp import assert_close_fp32 as _assert_close

from fastdiff.models import controlnet as cn
from fastdiff.models import unet_sd

diffusers = pytest.importorskip("diffusers")

THREE_LEVEL = unet_sd.UNetSDConfig(block_out_channels=(16, 32, 32), cross_attention=(False, True, True),
                                   layers_per_block=1, num_heads=4, cross_attention_dim=24, norm_num_groups=4)
from sd1_builders import HINT, random_controlnet, randomize  # noqa: E402


def _randomize(model: torch.nn.Module, seed: int = 1234) -> torch.nn.Module:
    return randomize(model, seed)


def _diffusers_unet(cfg: unet_sd.UNetSDConfig):
    return diffusers.UNet2DConditionModel(**{k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"})


def _reference_pair(cfg: unet_sd.UNetSDConfig, seed: int = 0):
    """(diffusers UNet, diffusers ControlNetModel from it), every weight random, the two differently."""
    unet = _randomize(_diffusers_unet(cfg), seed)
    return unet, random_controlnet(unet, seed + 1)


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
        want = ref_unet(x1, t1, ctx1, down_block_additional_residuals=rd1, mid_block_additional_residual=rm1).sample
        _assert_close(unet(x1, t1, ctx1, d1, m1), want)


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


def test_gradients_match_diffusers():
    """A ControlNet trains through fastdiff's fused ops: the gradients of a loss on the frozen UNet's output
    with the residuals added equal diffusers' for every ControlNet parameter (zero convolutions included)."""
    ref_unet, ref = _reference_pair(unet_sd.TINY, seed=11)
    ours = cn.ControlNet(cn.ControlNetConfig.from_diffusers(dict(ref.config)))
    ours.load_state_dict(ref.state_dict(), strict=True)
    unet = unet_sd.UNetSD(unet_sd.TINY).eval().requires_grad_(False)
    unet.load_state_dict(ref_unet.state_dict(), strict=True)
    ref_unet.requires_grad_(False)
    ours.train()
    ref.train()
    x, t, ctx, hint = _inputs(unet_sd.TINY, h=8, w=8, seed=2)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    down, mid = ours(x, t, ctx, hint)
    ((unet(x, t, ctx, down, mid) - target) ** 2).mean().backward()
    rdown, rmid = ref(x, t, ctx, hint, return_dict=False)
    out = ref_unet(x, t, ctx, down_block_additional_residuals=rdown, mid_block_additional_residual=rmid).sample
    ((out - target) ** 2).mean().backward()
    theirs = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        want = theirs[name].grad
        scale = want.abs().max().item()  # some biases of the zero convolutions get gradients of only ~3e-4
        assert p.grad is not None and scale > 0, name
        assert (p.grad - want).abs().max().item() <= 2e-5 * scale, name


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


# ----------------------------------------------------------------------------------------------- loading
import fastdiff  # noqa: E402
from fastdiff.io import controlnet_checkpoint as cck  # noqa: E402
from fastdiff.io.checkpoint import CheckpointError  # noqa: E402

TINY_CN = cn.ControlNetConfig(unet=unet_sd.TINY, conditioning_embedding_out_channels=HINT)


def _original_state_dict(ref) -> dict[str, torch.Tensor]:
    """The original ``control_model.*`` layout of a diffusers ControlNet's weights (fastdiff's inverse map)."""
    cfg = cn.ControlNetConfig.from_diffusers(dict(ref.config))
    return {cck.CONTROL_PREFIX + cck.controlnet_key_to_original(k, cfg): v.contiguous()
            for k, v in ref.state_dict().items()}


@pytest.fixture(scope="module")
def ref_files(tmp_path_factory):
    """(diffusers UNet, diffusers ControlNet, its save_pretrained folder, an original-layout .safetensors)."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("cn")
    ref_unet, ref = _reference_pair(unet_sd.TINY, seed=5)
    ref.save_pretrained(d / "folder", safe_serialization=True)
    save_file(_original_state_dict(ref), str(d / "control_tiny.safetensors"))
    return ref_unet, ref, d / "folder", d / "control_tiny.safetensors"


def _check_loaded(net: cn.ControlNet, ref_unet, ref):
    unet = unet_sd.UNetSD(unet_sd.TINY).eval()
    unet.load_state_dict(ref_unet.state_dict(), strict=True)
    x, t, ctx, hint = _inputs(unet_sd.TINY, seed=7)
    down, mid, rdown, rmid = _check_residuals(net, ref, x, t, ctx, hint, 0.9)
    with torch.no_grad():
        want = ref_unet(x, t, ctx, down_block_additional_residuals=rdown, mid_block_additional_residual=rmid).sample
        _assert_close(unet(x, t, ctx, down, mid), want)


def test_load_diffusers_folder(ref_files):
    ref_unet, ref, folder, _ = ref_files
    net = fastdiff.load_controlnet(folder)
    assert net.config == TINY_CN and not net.training
    _check_loaded(net, ref_unet, ref)
    half = cck.load_controlnet(folder, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_load_original_single_file(ref_files, tmp_path):
    ref_unet, ref, _, single = ref_files
    net = fastdiff.load_controlnet(single, config=TINY_CN)
    _check_loaded(net, ref_unet, ref)
    # the shapes alone give everything but the head count and norm groups (SD1's 8 and 32 by default)
    got = cck.infer_controlnet_config({k[len(cck.CONTROL_PREFIX):]: v
                                       for k, v in _original_state_dict(ref).items()})
    assert got.unet == unet_sd.UNetSDConfig(**{**TINY_CN.unet.__dict__, "num_heads": 8, "norm_num_groups": 32})
    assert got.conditioning_embedding_out_channels == HINT
    # fastdiff writes the same file back; a .pth pickle of plain tensors and a file that bundles the SD1
    # model (the first releases) load too
    cck.save_controlnet_single_file(net, tmp_path / "again.safetensors")
    from safetensors.torch import load_file
    a, b = load_file(single), load_file(tmp_path / "again.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    bundled = dict(a, **{"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(3),
                         "first_stage_model.decoder.conv_in.weight": torch.zeros(2), "betas": torch.zeros(1000)})
    torch.save({"state_dict": bundled}, tmp_path / "control_sd15_tiny.pth")
    _check_loaded(cck.load_controlnet(tmp_path / "control_sd15_tiny.pth", config=TINY_CN), ref_unet, ref)


def test_original_names_match_diffusers_converter(ref_files):
    """fastdiff's original names, fed to diffusers' converter of original ControlNet files, come back as the
    same diffusers names and tensors: for the tiny model and for the full-size SD1.5 ControlNet (on meta)."""
    from diffusers.loaders import single_file_utils as sfu

    _, ref, _, _ = ref_files
    ours = ref.state_dict()
    back = sfu.convert_controlnet_checkpoint(_original_state_dict(ref), {"layers_per_block": 2})
    assert back.keys() == ours.keys() and all(back[k] is ours[k] or torch.equal(back[k], ours[k]) for k in ours)
    with torch.device("meta"):
        full = cn.ControlNet(cn.SD15)
    ours = full.state_dict()
    orig = {cck.CONTROL_PREFIX + cck.controlnet_key_to_original(k, cn.SD15): v for k, v in ours.items()}
    assert len([k for k in orig if ".zero_convs." in k]) == 2 * 12
    assert {k for k in orig if "input_hint_block" in k and k.endswith("weight")} == {
        f"control_model.input_hint_block.{i}.weight" for i in range(0, 16, 2)}
    back = sfu.convert_controlnet_checkpoint(orig, {"layers_per_block": 2})
    assert back.keys() == ours.keys() and all(back[k] is ours[k] for k in ours)
    shapes = cck.infer_controlnet_config({k[len(cck.CONTROL_PREFIX):]: v for k, v in orig.items()})
    assert shapes == cn.SD15
    # the full-size model has diffusers' SD1.5 ControlNet's tensors (361M parameters), and its config
    with torch.device("meta"):
        ref_full = diffusers.ControlNetModel(**{k: v for k, v in cn.SD15.to_diffusers().items() if k != "_class_name"})
    assert {k: tuple(v.shape) for k, v in ref_full.state_dict().items()} == {k: tuple(v.shape) for k, v in ours.items()}
    assert cn.ControlNetConfig.from_diffusers(dict(ref_full.config)) == cn.SD15
    assert 360e6 < sum(v.numel() for v in ours.values()) < 362e6


def test_missing_and_unexpected_keys_named(ref_files, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, _, single = ref_files
    sd = load_file(single)
    gone = "control_model.zero_convs.3.0.weight"
    bad = {k: v for k, v in sd.items() if k != gone}
    bad["control_model.input_hint_block.16.weight"] = torch.zeros(3)
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as e:
        cck.load_controlnet(tmp_path / "bad.safetensors", config=TINY_CN)
    msg = str(e.value)
    assert "missing keys (1): controlnet_down_blocks.3.weight" in msg
    assert "unexpected keys (1): control_model.input_hint_block.16.weight" in msg
    wrong = dict(sd, **{"control_model.middle_block_out.0.bias": torch.zeros(5)})
    save_file(wrong, tmp_path / "shape.safetensors")
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\): controlnet_mid_block.bias"):
        cck.load_controlnet(tmp_path / "shape.safetensors", config=TINY_CN)
    save_file(dict(sd, stray=torch.zeros(1)), tmp_path / "stray.safetensors")
    with pytest.raises(CheckpointError, match="unexpected keys outside control_model.*: stray"):
        cck.load_controlnet(tmp_path / "stray.safetensors", config=TINY_CN)


def test_unet_files_are_not_controlnets(ref_files, tmp_path):
    from safetensors.torch import save_file

    from fastdiff.io import sd_checkpoint as ck

    ref_unet, _, _, _ = ref_files
    unet = unet_sd.UNetSD(unet_sd.TINY)
    original = {ck.UNET_PREFIX + ck.unet_key_to_original(k, unet.config): v.contiguous()
                for k, v in unet.state_dict().items()}
    save_file(original, tmp_path / "unet_only.safetensors")
    save_file({k[len(ck.UNET_PREFIX):]: v for k, v in original.items()}, tmp_path / "unet_bare.safetensors")
    save_file({k: v.contiguous() for k, v in ref_unet.state_dict().items()}, tmp_path / "unet_diffusers.safetensors")
    for name in ("unet_only", "unet_bare", "unet_diffusers"):
        with pytest.raises(CheckpointError, match="not a ControlNet") as e:
            cck.load_controlnet(tmp_path / f"{name}.safetensors")
        assert "\n" not in str(e.value) and "UNet" in str(e.value)
    ref_unet.save_pretrained(tmp_path / "unet_folder")
    with pytest.raises(CheckpointError, match="unet_folder: a UNet2DConditionModel folder, not a ControlNet"):
        cck.load_controlnet(tmp_path / "unet_folder")
    with pytest.raises(FileNotFoundError, match="nope"):
        cck.load_controlnet(tmp_path / "nope.safetensors")


class _Payload:
    """A pickle that would run code when loaded unsafely (it would create a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"control_model.input_hint_block.0.weight": torch.zeros(1), "evil": _Payload(str(marker))},
               tmp_path / "control_evil.pth")
    with pytest.raises(CheckpointError, match="refused to unpickle"):
        cck.load_controlnet(tmp_path / "control_evil.pth")
    assert not marker.exists()


def test_several_controlnets_on_a_guided_batch_match_diffusers():
    """``controlled_unet`` with two ControlNets equals diffusers' MultiControlNetModel + UNet, on a guided batch
    [uncond; cond] whose halves share each control image (diffusers concatenates the image twice)."""
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    ref_unet, ref1 = _reference_pair(unet_sd.TINY, seed=20)
    ref2 = _randomize(diffusers.ControlNetModel.from_unet(ref_unet, conditioning_embedding_out_channels=HINT), 30)
    unet = unet_sd.UNetSD(unet_sd.TINY).eval()
    unet.load_state_dict(ref_unet.state_dict(), strict=True)
    nets = []
    for r in (ref1, ref2):
        nets.append(cn.ControlNet(cn.ControlNetConfig.from_diffusers(dict(r.config))).eval())
        nets[-1].load_state_dict(r.state_dict(), strict=True)
    x, t, ctx, h1 = _inputs(unet_sd.TINY, b=2, seed=4)
    h2 = torch.rand(h1.shape, generator=torch.Generator().manual_seed(5))
    x2, ctx2, t2 = torch.cat([x, x.flip(0)]), torch.cat([ctx, ctx.flip(0)]), torch.tensor([700, 700, 700, 700])
    with torch.no_grad():
        got = cn.controlled_unet(unet, x2, t2, ctx2, [(nets[0], h1, 0.7), (nets[1], h2, 1.3)])
        down, mid = MultiControlNetModel([ref1, ref2])(x2, t2, ctx2, [torch.cat([h1, h1]), torch.cat([h2, h2])],
                                                       [0.7, 1.3], return_dict=False)
        want = ref_unet(x2, t2, ctx2, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        _assert_close(got, want)
        ours_down, ours_mid = cn.controlnet_residuals(x2, t2, ctx2, [(nets[0], h1, 0.7), (nets[1], h2, 1.3)])
        for a, b in zip(ours_down, down, strict=True):
            _assert_close(a, b)
        _assert_close(ours_mid, mid)
        assert cn.controlnet_residuals(x2, t2, ctx2, [(nets[0], h1, 0)]) == (None, None)
        # a ControlNet at scale 0 (outside its control_start..control_end) is skipped: the plain UNet, bit for bit
        assert torch.equal(cn.controlled_unet(unet, x, t, ctx, [(nets[0], h1, 0.0)]), unet(x, t, ctx))
        with pytest.raises(ValueError, match="does not divide"):
            cn.controlled_unet(unet, torch.cat([x, x[:1]]), 5, torch.cat([ctx, ctx[:1]]), [(nets[0], h1, 1.0)])
