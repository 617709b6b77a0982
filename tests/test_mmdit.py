"""The SD3 / SD3.5 MMDiT against diffusers' SD3Transformer2DModel, and the original-checkpoint key mapping
against diffusers' own single-file converter.

Oracles: diffusers' ``SD3Transformer2DModel`` on the same random weights (every parameter re-drawn, norm
weights around 1, so a swapped or unused tensor shows up), ``convert_sd3_transformer_checkpoint_to_diffusers``
for the original layout, and the published transformer/config.json of each release (written out below).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from lowp import assert_close_lowp
from fastdiff.io.sd3_checkpoint import (MMDIT_PREFIX, infer_mmdit_config, load_mmdit_original,
                                        mmdit_from_original, mmdit_to_original)
from fastdiff.io.sd_checkpoint import CheckpointError
from fastdiff.models import mmdit
from fastdiff.models.mmdit import MMDiT, MMDiTConfig

try:
    import diffusers
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
except ImportError:  # the reference implementations are test extras: fastdiff's own tests still run
    diffusers = convert_sd3_transformer_checkpoint_to_diffusers = None
needs_reference = pytest.mark.skipif(diffusers is None, reason="needs diffusers (the reference)")

_SMALL = dict(sample_size=32, in_channels=4, num_layers=3, num_attention_heads=2, joint_attention_dim=48,
              caption_projection_dim=128, pooled_projection_dim=40, pos_embed_max_size=24)
# SD3 style: no qk norm, no MMDiT-X blocks; out_channels != in_channels to catch an unpatchify mix-up
SD3_SMALL = MMDiTConfig(**_SMALL, out_channels=8)
# SD3.5 style: qk RMSNorm and MMDiT-X blocks, one of them the pre-only last block
SD35_SMALL = MMDiTConfig(**_SMALL, out_channels=4, qk_norm="rms_norm", dual_attention_layers=(0, 2))
SMALL = {"sd3": SD3_SMALL, "sd35": SD35_SMALL}


def _diffusers_model(cfg: MMDiTConfig):
    return diffusers.SD3Transformer2DModel(**{k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"})


def _randomize(model: torch.nn.Module, seed: int = 1234) -> torch.nn.Module:
    """Every parameter re-drawn: norm scales 1 + 0.2 N, weights 0.5 / sqrt(fan_in) N, biases 0.1 N (so the
    activations stay O(1) through the blocks and every tensor matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            z = torch.randn(p.shape, generator=g)
            if p.dim() == 1 and "norm" in name.rsplit(".", 2)[-2] and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * z)
            elif p.dim() == 1:
                p.copy_(0.1 * z)
            else:
                p.copy_(0.5 / math.sqrt(p[0].numel()) * z)
    return model.eval()


def _pair(cfg: MMDiTConfig):
    ref = _randomize(_diffusers_model(cfg))
    ours = MMDiT(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _inputs(cfg: MMDiTConfig, b: int, h: int, w: int, length: int = 11, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.in_channels, h, w, generator=g)
    ctx = torch.randn(b, length, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(b, cfg.pooled_projection_dim, generator=g)
    return x.to(dtype), ctx.to(dtype), pooled.to(dtype)


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 2e-5):
    """fp32 parity: max error within ``rel`` of the reference's magnitude (both do the same fp32 math)."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, (ours.shape, ref.shape, ours.dtype, ref.dtype)
    scale = ref.abs().max().item()
    assert scale > 1e-2, "degenerate reference output"
    err = (ours - ref).abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} vs scale {scale:.3g}"


# ------------------------------------------------------------------------------------------ parity, fp32/bf16
@needs_reference
@pytest.mark.parametrize("style", SMALL)
def test_matches_diffusers_fp32(style):
    cfg = SMALL[style]
    ref, ours = _pair(cfg)
    with torch.no_grad():
        # batch 2, non-square 8x12 patches cropped from the 24x24 table, one timestep per sample (SD3's t
        # are sigma * 1000, fractional)
        x, ctx, pooled = _inputs(cfg, 2, 16, 24)
        t = torch.tensor([999.0, 3.5])
        want = ref(x, ctx, pooled, t).sample
        _assert_close(ours(x, t, ctx, pooled), want)
        _assert_close(ours(x.to(memory_format=torch.channels_last), t, ctx, pooled), want)
        # the timesteps really are per sample: swapping them changes each output
        assert (ours(x, t.flip(0), ctx, pooled) - want).abs().amax((1, 2, 3)).min() > 1e-3
        # odd crop offsets (7x5 patches of 24: top 8, left 9), batch 1, scalar timestep, another text length
        x1, ctx1, pooled1 = _inputs(cfg, 1, 14, 10, length=5, seed=1)
        _assert_close(ours(x1, 500.0, ctx1, pooled1), ref(x1, ctx1, pooled1, torch.tensor([500.0])).sample)
        # the whole table (24x24 patches = the largest latent)
        x2, ctx2, pooled2 = _inputs(cfg, 1, 48, 48, length=3, seed=2)
        _assert_close(ours(x2, 250.0, ctx2, pooled2), ref(x2, ctx2, pooled2, torch.tensor([250.0])).sample)


@needs_reference
@pytest.mark.parametrize("style", SMALL)
def test_bf16_error_within_2x_diffusers(style):
    cfg = SMALL[style]
    ref, ours = _pair(cfg)
    x, ctx, pooled = _inputs(cfg, 2, 16, 24)
    t = torch.tensor([999.0, 3.5])
    with torch.no_grad():
        want32 = ref(x, ctx, pooled, t).sample
        bf = dict(dtype=torch.bfloat16)
        ref16 = copy.deepcopy(ref).to(**bf)
        ours16 = copy.deepcopy(ours).to(**bf)
        xb, cb, pb = x.to(**bf), ctx.to(**bf), pooled.to(**bf)
        theirs16 = ref16(xb, cb, pb, t).sample
        got16 = ours16(xb, t, cb, pb)
    assert_close_lowp(got16, want32, theirs16, what=f"MMDiT {style} bf16")


@needs_reference
def test_gradients_match_diffusers():
    """Training parity: the same loss gives the same gradient for every parameter and the input."""
    cfg = SD35_SMALL
    ref, ours = _pair(cfg)
    x, ctx, pooled = _inputs(cfg, 2, 8, 12, length=4)
    t = torch.tensor([700.0, 20.0])
    w = torch.randn(2, cfg.out_channels, 8, 12, generator=torch.Generator().manual_seed(5))
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    (ref(xr, ctx, pooled, t).sample * w).sum().backward()
    (ours(xo, t, ctx, pooled) * w).sum().backward()
    _assert_close(xo.grad, xr.grad, rel=1e-4)
    theirs = dict(ref.named_parameters())
    scale = max(p.grad.abs().max().item() for p in theirs.values() if p.grad is not None)
    for name, p in ours.named_parameters():
        want = theirs[name].grad
        got = p.grad
        if want is None or not want.any():
            # the pre-only block's text queries cannot reach the output: diffusers gets zeros, fastdiff skips them
            assert name.startswith(f"transformer_blocks.{cfg.num_layers - 1}.attn.") and (
                "add_q_proj" in name or "norm_added_q" in name), name
            assert got is None or not got.any(), name
            continue
        err = (got - want).abs().max().item()
        assert err <= 1e-4 * scale, f"{name}: grad error {err:.3g} (largest grad {scale:.3g})"


@needs_reference
def test_pos_embed_buffer_equals_diffusers():
    """The persistent (1, max^2, D) table at init, bit for bit, also for a sample size whose grid step is
    not a round number (diffusers: coordinates j / (max / base) in fp32, sin/cos in float64)."""
    for cfg in (SD3_SMALL, MMDiTConfig(**{**_SMALL, "sample_size": 40}, out_channels=4)):
        ref = _diffusers_model(cfg)
        ours = MMDiT(cfg)
        assert "pos_embed.pos_embed" in ref.state_dict() and "pos_embed.pos_embed" in ours.state_dict()
        assert torch.equal(ours.pos_embed.pos_embed, ref.pos_embed.pos_embed)


# ------------------------------------------------------------------------------------------- key mapping
@needs_reference
@pytest.mark.parametrize("style", SMALL)
def test_original_keys_against_diffusers_converter(style):
    cfg = SMALL[style]
    ours = _randomize(MMDiT(cfg), seed=7)
    sd = ours.state_dict()
    orig = mmdit_to_original(sd, prefix=MMDIT_PREFIX)
    top = {"joint_blocks", "x_embedder", "pos_embed", "t_embedder", "y_embedder", "context_embedder", "final_layer"}
    assert all(k.startswith(MMDIT_PREFIX) and k.removeprefix(MMDIT_PREFIX).split(".")[0] in top for k in orig)
    # the layout features of each style are present under their original names
    last = cfg.num_layers - 1
    assert f"{MMDIT_PREFIX}joint_blocks.0.x_block.attn.qkv.weight" in orig
    assert f"{MMDIT_PREFIX}joint_blocks.{last}.context_block.attn.proj.weight" not in orig
    assert (f"{MMDIT_PREFIX}joint_blocks.0.x_block.attn.ln_q.weight" in orig) == (cfg.qk_norm is not None)
    assert (f"{MMDIT_PREFIX}joint_blocks.0.x_block.attn2.qkv.weight" in orig) == bool(cfg.dual_attention_layers)

    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(orig))  # it pops from its argument
    assert set(converted) == set(sd), set(converted) ^ set(sd)
    for k, v in sd.items():
        assert torch.equal(converted[k], v), k
    # and diffusers' model takes it strictly
    _diffusers_model(cfg).load_state_dict(converted, strict=True)

    back = mmdit_from_original(orig)
    assert set(back) == set(sd) and all(torch.equal(back[k], v) for k, v in sd.items())
    assert infer_mmdit_config(orig) == cfg
    assert infer_mmdit_config({k: v.to(torch.bfloat16) for k, v in orig.items()}) == cfg  # bf16 files

    # loading the original layout gives the same network (bit-identical output)
    loaded = load_mmdit_original(orig)
    x, ctx, pooled = _inputs(cfg, 2, 8, 6)
    with torch.no_grad():
        assert torch.equal(loaded(x, 10.0, ctx, pooled), ours(x, 10.0, ctx, pooled))


def test_original_mapping_is_strict():
    cfg = SD35_SMALL
    orig = mmdit_to_original(MMDiT(cfg).state_dict())
    with pytest.raises(CheckpointError, match=r"joint_blocks\.0\.x_block\.attn\.bogus\.weight"):
        mmdit_from_original({**orig, "joint_blocks.0.x_block.attn.bogus.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="first_stage_model.encoder.conv_in.weight"):
        mmdit_from_original({**orig, "first_stage_model.encoder.conv_in.weight": torch.zeros(1)})
    sd = MMDiT(cfg).state_dict()
    with pytest.raises(CheckpointError, match="q, k and v"):
        mmdit_to_original({k: v for k, v in sd.items() if k != "transformer_blocks.1.attn.to_k.weight"})
    with pytest.raises(CheckpointError, match="not part of fastdiff"):
        mmdit_to_original({**sd, "transformer_blocks.0.attn.extra.weight": torch.zeros(1)})
    # a tensor missing from the file, or of the wrong shape: the strict load lists it
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): transformer_blocks\.1\.ff\.net\.2\.bias"):
        load_mmdit_original({k: v for k, v in orig.items() if k != "joint_blocks.1.x_block.mlp.fc2.bias"})
    bad = dict(orig)
    bad["joint_blocks.1.x_block.mlp.fc2.bias"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_mmdit_original(bad, config=cfg)
    with pytest.raises(CheckpointError, match="not an SD3 MMDiT"):
        infer_mmdit_config({"x": torch.zeros(1)})


# --------------------------------------------------------------------------------------- full size, on meta
# transformer/config.json of the public releases, written out here as the oracle
SD3_MEDIUM_JSON = {
    "_class_name": "SD3Transformer2DModel", "attention_head_dim": 64, "caption_projection_dim": 1536,
    "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24,
    "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
    "sample_size": 128,
}
SD35_MEDIUM_JSON = {
    "_class_name": "SD3Transformer2DModel", "attention_head_dim": 64, "caption_projection_dim": 1536,
    "dual_attention_layers": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], "in_channels": 16,
    "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 24, "out_channels": 16,
    "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 384, "qk_norm": "rms_norm",
    "sample_size": 128,
}
SD35_LARGE_JSON = {
    "_class_name": "SD3Transformer2DModel", "attention_head_dim": 64, "caption_projection_dim": 2432,
    "in_channels": 16, "joint_attention_dim": 4096, "num_attention_heads": 38, "num_layers": 38,
    "out_channels": 16, "patch_size": 2, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
    "qk_norm": "rms_norm", "sample_size": 128,
}


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@needs_reference
@pytest.mark.parametrize("preset,cfg_json,billions", [
    (mmdit.SD3_MEDIUM, SD3_MEDIUM_JSON, (2.0, 2.1)),
    # parameters only; with the stored 384x384 table SD3.5-medium is the published "2.5B" (2.47B), and
    # SD3.5-large with its 192x192 table the published "8.1B"
    (mmdit.SD35_MEDIUM, SD35_MEDIUM_JSON, (2.2, 2.3)),
    (mmdit.SD35_LARGE, SD35_LARGE_JSON, (8.0, 8.1)),
], ids=["sd3_medium", "sd35_medium", "sd35_large"])
def test_full_size_key_sets_equal_diffusers(preset, cfg_json, billions):
    assert MMDiTConfig.from_diffusers(cfg_json) == preset
    assert MMDiTConfig.from_diffusers(preset.to_diffusers()) == preset
    with torch.device("meta"):
        ref = diffusers.SD3Transformer2DModel(**{k: v for k, v in cfg_json.items() if k != "_class_name"})
        ours = MMDiT(preset)
    assert _shapes(ours) == _shapes(ref)
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters())
    table = ours.pos_embed.pos_embed.numel()
    msg = f"{n:,} parameters (+ {table:,} in the pos_embed table = {n + table:,})"
    assert billions[0] * 1e9 < n < billions[1] * 1e9, msg
    print(msg)
    # the original layout of the full model: shapes alone give the config back (meta: no values to read the
    # sample size from; every release's 128 is the fallback)
    orig = mmdit_to_original(ours.state_dict(), prefix=MMDIT_PREFIX)
    assert infer_mmdit_config(orig) == preset
    assert tuple(orig[MMDIT_PREFIX + "pos_embed"].shape) == (1, preset.pos_embed_max_size ** 2, preset.hidden_size)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input():
    cfg = SD35_SMALL
    m = MMDiT(cfg).eval()
    x, ctx, pooled = _inputs(cfg, 2, 8, 8)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"latents \(B, 4, H, W\)"):
            m(torch.randn(2, 3, 8, 8), 1.0, ctx, pooled)
        with pytest.raises(ValueError, match="multiples of the patch size 2"):
            m(torch.randn(2, 4, 9, 8), 1.0, ctx, pooled)
        with pytest.raises(ValueError, match=r"larger than the 24x24 positional table \(at most 48x48"):
            m(torch.randn(2, 4, 50, 8), 1.0, ctx, pooled)
        with pytest.raises(ValueError, match=r"text embeddings \(B, L, 48\)"):
            m(x, 1.0, torch.randn(2, 5, 40), pooled)
        with pytest.raises(ValueError, match=r"pooled text embeddings \(B, 40\)"):
            m(x, 1.0, ctx, torch.randn(2, 48))
        with pytest.raises(ValueError, match="batch sizes differ"):
            m(x, 1.0, ctx[:1], pooled)
        with pytest.raises(ValueError, match="timestep"):
            m(x, torch.tensor([1.0, 2.0, 3.0]), ctx, pooled)
        with pytest.raises(TypeError, match="encoder_hidden_states must be a tensor"):
            m(x, 1.0, None, pooled)


def test_bad_config():
    with pytest.raises(ValueError, match="caption_projection_dim 96 must equal"):
        MMDiTConfig(**{**_SMALL, "caption_projection_dim": 96})
    with pytest.raises(ValueError, match="dual_attention_layers"):
        MMDiTConfig(**_SMALL, dual_attention_layers=(3,))
    with pytest.raises(ValueError, match="qk_norm"):
        MMDiTConfig(**_SMALL, qk_norm="layer_norm")
    with pytest.raises(ValueError, match="unsupported SD3Transformer2DModel config keys: foo"):
        MMDiTConfig.from_diffusers({**SD3_MEDIUM_JSON, "foo": 1})
    with pytest.raises(ValueError, match="not an SD3 transformer"):
        MMDiTConfig.from_diffusers({**SD3_MEDIUM_JSON, "_class_name": "FluxTransformer2DModel"})
    assert MMDiTConfig.from_diffusers({**SD3_MEDIUM_JSON, "out_channels": None}).out_channels == 16
