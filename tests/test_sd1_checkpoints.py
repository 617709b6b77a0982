"""SD1 checkpoint loading and saving, on random tiny models in the real file layouts.

The diffusers folder is written by diffusers' own ``save_pretrained`` (fp32 and an fp16 variant); the original
single file is written by fastdiff and read back by diffusers' ``from_single_file`` (offline, config from the
local folder): outputs of all three loaders must agree. The full-size key mapping is cross-checked against
diffusers' own LDM converter on meta tensors. Bad files must fail with clear errors and never run code.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from fastdiff.io import sd_checkpoint as ck
from fastdiff.io.checkpoint import vae_to_original
from fastdiff.models import clip_text, unet_sd, vae
from fastdiff.models.clip_tokenizer import CLIPTokenizer
from fastdiff.pipelines.sd1 import StableDiffusion1, load_sd1

try:
    import diffusers
    import transformers
except ImportError:  # the reference implementations are test extras: fastdiff's own tests still run
    diffusers = transformers = None
needs_reference = pytest.mark.skipif(diffusers is None or transformers is None,
                                     reason="needs diffusers and transformers (the reference implementation)")
from safetensors.torch import load_file, save_file

TINY = ck.SD1Configs(unet_sd.TINY, vae.TINY, clip_text.TINY)


def _no_grad_close(a, b, rel=2e-5):
    scale = b.abs().max().item()
    assert scale > 1e-3
    err = (a - b).abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3g} vs scale {scale:.3g}"


def _inputs(seed=0, cin=4):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, cin, 16, 16, generator=g), torch.tensor([999, 10]), torch.randn(2, 77, 32, generator=g),
            torch.rand(1, 3, 32, 32, generator=g) * 2 - 1)


def _check_against(ours: StableDiffusion1, ref, rel=2e-5):
    x, t, ctx, img = _inputs()
    ids = ours.tokenizer(["a photo of a cat", "café 🌃"])
    with torch.no_grad():
        _no_grad_close(ours.unet(x, t, ctx), ref.unet(x, t, ctx).sample, rel)
        _no_grad_close(ours.vae.decode(x[:, :4]), ref.vae.decode(x[:, :4]).sample, rel)
        _no_grad_close(ours.vae.encode(img).mean, ref.vae.encode(img).latent_dist.mean, rel)
        _no_grad_close(ours.text_encoder(ids), ref.text_encoder(ids)[0], rel)
    assert torch.equal(ids, ref.tokenizer(["a photo of a cat", "café 🌃"], padding="max_length", max_length=77,
                                          truncation=True, return_tensors="pt").input_ids)


def _same_weights(a: StableDiffusion1, b: StableDiffusion1):
    for m, n in ((a.unet, b.unet), (a.vae, b.vae), (a.text_encoder, b.text_encoder)):
        sa, sb = m.state_dict(), n.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------------------------------- diffusers folders
@needs_reference
def test_load_diffusers_folder(ref_folder):
    d, ref = ref_folder
    pipe = load_sd1(d / "sd")
    assert isinstance(pipe.unet, unet_sd.UNetSD) and isinstance(pipe.vae, vae.AutoencoderKL)
    assert isinstance(pipe.text_encoder, clip_text.CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert pipe.unet.config == unet_sd.TINY and pipe.vae.config == vae.TINY and pipe.text_encoder.config == clip_text.TINY
    assert pipe.scheduler_config["beta_schedule"] == "scaled_linear"
    _check_against(pipe, ref)


@needs_reference
def test_load_fp16_variant(ref_folder):
    d, ref = ref_folder
    files = os.listdir(d / "sd16" / "unet")
    assert "diffusion_pytorch_model.fp16.safetensors" in files
    pipe16 = load_sd1(d / "sd16", dtype=None)  # keep the file's dtype
    assert pipe16.unet.dtype == torch.float16
    pipe = load_sd1(d / "sd16", dtype=torch.float32, variant="fp16")
    assert pipe.unet.dtype == torch.float32
    # fp32 model holding the fp16-rounded weights == the reference rounded to fp16
    for ours, theirs in ((pipe.unet, ref.unet), (pipe.vae, ref.vae)):
        sd = theirs.state_dict()
        for k, v in ours.state_dict().items():
            assert torch.equal(v, sd[k].half().float()), k
    with pytest.raises(ck.CheckpointError, match="no weights file"):
        load_sd1(d / "sd16", variant="bf16")


# --------------------------------------------------------------------------------- original single files
@needs_reference
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_roundtrip_and_diffusers_reads_it(ref_folder, tmp_path, suffix):
    d, ref = ref_folder
    pipe = load_sd1(d / "sd")
    path = tmp_path / f"model{suffix}"
    pipe.save_single_file(path)
    sd = ck.read_state_dict(path)
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in sd)
    assert any(k.startswith("first_stage_model.encoder.down.") for k in sd)
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in sd)
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].dim() == 4  # LDM 1x1 conv layout
    again = load_sd1(path, configs=TINY)
    _same_weights(pipe, again)
    _check_against(again, ref)
    if suffix == ".safetensors":
        # diffusers' own LDM converter, offline, reading the architecture from the local folder
        theirs = diffusers.StableDiffusionPipeline.from_single_file(str(path), config=str(d / "sd"),
                                                                    local_files_only=True)
        _check_against(again, theirs)


@needs_reference
def test_single_file_variants(ref_folder, tmp_path):
    """fp16, no state_dict wrapper, EMA copy, schedule buffers and CLIP position_ids present."""
    d, ref = ref_folder
    pipe = load_sd1(d / "sd")
    pipe.save_single_file(tmp_path / "a.safetensors", dtype=torch.float16)
    sd = load_file(tmp_path / "a.safetensors")
    assert all(v.dtype == torch.float16 for v in sd.values())
    unet_keys = [k for k in sd if k.startswith("model.diffusion_model.")]
    ema = {"model_ema." + k[len("model."):].replace(".", ""): torch.full_like(sd[k], 0.5) for k in unet_keys}
    extra = {"betas": torch.linspace(0.00085, 0.012, 1000), "alphas_cumprod": torch.rand(1000),
             "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(10, dtype=torch.int32),
             "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    torch.save({**sd, **ema, **extra}, tmp_path / "b.ckpt")  # no "state_dict" wrapper
    p = load_sd1(tmp_path / "b.ckpt", configs=TINY)  # EMA ignored: the model.* weights
    assert p.unet.dtype == torch.float32
    for k, v in p.unet.state_dict().items():
        assert torch.equal(v, ref.unet.state_dict()[k].half().float()), k
    p_ema = load_sd1(tmp_path / "b.ckpt", configs=TINY, use_ema=True, dtype=None)
    assert p_ema.unet.dtype == torch.float16
    assert all((v == 0.5).all() for v in p_ema.unet.state_dict().values())
    with pytest.raises(ck.CheckpointError, match="EMA"):
        load_sd1(tmp_path / "a.safetensors", configs=TINY, use_ema=True)


def test_inpainting_recognised(tmp_path, randomize):
    cfgs = ck.SD1Configs(unet_sd.UNetSDConfig(**{**unet_sd.TINY.__dict__, "in_channels": 9}), vae.TINY, clip_text.TINY)
    pipe = StableDiffusion1(randomize(unet_sd.UNetSD(cfgs.unet), 4), randomize(vae.AutoencoderKL(vae.TINY), 5),
                            randomize(clip_text.CLIPTextModel(clip_text.TINY), 6), CLIPTokenizer.from_bundled())
    pipe.save_single_file(tmp_path / "inpaint.safetensors")
    sd = ck.read_state_dict(tmp_path / "inpaint.safetensors")
    assert ck.detect_architecture(sd) == "sd1-inpaint"
    inferred = ck.infer_sd1_configs(sd, vae=vae.TINY, text=clip_text.TINY).unet
    assert inferred.in_channels == 9 and inferred.block_out_channels == (32, 64)
    assert inferred.cross_attention == (True, False) and inferred.layers_per_block == 2
    loaded = load_sd1(tmp_path / "inpaint.safetensors", configs=cfgs)
    assert loaded.is_inpainting
    _same_weights(pipe, loaded)
    pipe.save_pretrained(tmp_path / "inpaint_folder")
    assert load_sd1(tmp_path / "inpaint_folder").is_inpainting


def test_infer_full_size_config_from_keys():
    """Shapes of a full SD1.5 original checkpoint (on meta) give back the SD15 configs."""
    with torch.device("meta"):
        p = StableDiffusion1(unet_sd.UNetSD(unet_sd.SD15), vae.AutoencoderKL(vae.SD15),
                             clip_text.CLIPTextModel(clip_text.SD15), None)
    sd = _original_meta_state_dict(p)
    assert ck.detect_architecture(sd) == "sd1"
    got = ck.infer_sd1_configs(sd)
    assert got.unet == unet_sd.SD15 and got.vae == vae.SD15 and got.text == clip_text.SD15


def _original_meta_state_dict(p):
    sd = {}
    for k, v in p.unet.state_dict().items():
        sd[ck.UNET_PREFIX + ck.unet_key_to_original(k, p.unet.config)] = v
    sd.update(vae_to_original(p.vae.state_dict(), p.vae.config))
    for k, v in p.text_encoder.state_dict().items():
        sd[ck.TEXT_PREFIX + k] = v
    return sd


@needs_reference
def test_full_size_mapping_matches_diffusers_converter(sd15_json):
    """Our original names for every full-size SD1.5 tensor, fed to diffusers' LDM converter, come back under
    the same diffusers names (tensor identity for the UNet; shape and name for the VAE's reshaped attention)."""
    from diffusers.loaders import single_file_utils as sfu

    SD15_UNET_JSON, SD15_VAE_JSON = sd15_json["unet"], sd15_json["vae"]

    with torch.device("meta"):
        u, a = unet_sd.UNetSD(unet_sd.SD15), vae.AutoencoderKL(vae.SD15)
    ours = u.state_dict()
    orig = {ck.UNET_PREFIX + ck.unet_key_to_original(k, u.config): v for k, v in ours.items()}
    back = sfu.convert_ldm_unet_checkpoint(orig, SD15_UNET_JSON)
    assert back.keys() == ours.keys()
    assert all(back[k] is ours[k] for k in ours)
    orig = vae_to_original(a.state_dict(), a.config)
    back = sfu.convert_ldm_vae_checkpoint(orig, SD15_VAE_JSON)
    ours = a.state_dict()
    assert back.keys() == ours.keys()
    assert all(tuple(back[k].shape) == tuple(ours[k].shape) for k in ours)


# ------------------------------------------------------------------------------------------- bad inputs
@pytest.fixture(scope="module")
def good_file(ref_folder, tmp_path_factory):
    d, _ = ref_folder
    path = tmp_path_factory.mktemp("good") / "good.safetensors"
    load_sd1(d / "sd").save_single_file(path)
    return path


def test_wrong_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_sd1(tmp_path / "nope.safetensors")
    with pytest.raises(ck.CheckpointError, match="model_index.json"):
        load_sd1(tmp_path)  # a folder that is not a diffusers pipeline


@needs_reference
def test_truncated_and_corrupt(good_file, tmp_path):
    data = good_file.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match="truncated or corrupt"):
        load_sd1(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.ckpt").write_bytes(os.urandom(4096))
    with pytest.raises(ck.CheckpointError):
        load_sd1(tmp_path / "junk.ckpt")
    torch.save({"state_dict": {"a": torch.zeros(2)}}, tmp_path / "t.ckpt")
    raw = (tmp_path / "t.ckpt").read_bytes()
    (tmp_path / "t2.ckpt").write_bytes(raw[: len(raw) - 200])
    with pytest.raises(ck.CheckpointError, match="truncated or corrupt"):
        load_sd1(tmp_path / "t2.ckpt")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ck.CheckpointError):
        load_sd1(tmp_path / "empty.safetensors")


class _Payload:
    """A pickle that would run code when loaded unsafely (it would create a marker file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": _Payload(str(marker))}, tmp_path / "evil.ckpt")
    with pytest.raises(ck.CheckpointError, match="refused to unpickle") as err:
        load_sd1(tmp_path / "evil.ckpt")
    assert not marker.exists()
    assert "weights_only=False" not in str(err.value) and "\n" not in str(err.value)  # no advice to run the code
    # plain non-tensor entries inside the state dict are reported, not loaded
    torch.save({"state_dict": {"x": torch.zeros(1), "step": 5}}, tmp_path / "mixed.ckpt")
    with pytest.raises(ck.CheckpointError, match="not tensors: step"):
        load_sd1(tmp_path / "mixed.ckpt")


@needs_reference
def test_missing_unexpected_and_shape_errors(good_file, tmp_path):
    sd = load_file(good_file)
    gone = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight"
    bad = dict(sd)
    del bad[gone]
    bad["model.diffusion_model.input_blocks.1.1.extra.weight"] = torch.zeros(3)
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(ck.CheckpointError) as e:
        load_sd1(tmp_path / "bad.safetensors", configs=TINY)
    msg = str(e.value)
    assert "missing keys (1): down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight" in msg
    assert "unexpected keys (1): model.diffusion_model.input_blocks.1.1.extra.weight" in msg
    bad = dict(sd)
    bad["first_stage_model.decoder.conv_out.bias"] = torch.zeros(4)
    save_file(bad, tmp_path / "shape.safetensors")
    with pytest.raises(ck.CheckpointError, match=r"shape mismatches \(1\): decoder.conv_out.bias"):
        load_sd1(tmp_path / "shape.safetensors", configs=TINY)
    bad = dict(sd)
    bad["some_lora.weight"] = torch.zeros(1)
    save_file(bad, tmp_path / "stray.safetensors")
    with pytest.raises(ck.CheckpointError, match="outside the UNet / VAE / text encoder: some_lora.weight"):
        load_sd1(tmp_path / "stray.safetensors", configs=TINY)


@needs_reference
@pytest.mark.parametrize("extra,what", [
    ({"cond_stage_model.model.transformer.resblocks.0.ln_1.weight": torch.zeros(4)}, "SD2"),
    ({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(4)}, "SDXL"),
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(4)}, "SD3"),
])
def test_other_architectures_named(good_file, tmp_path, extra, what):
    sd = {**load_file(good_file), **extra}
    save_file(sd, tmp_path / "other.safetensors")
    with pytest.raises(ck.CheckpointError, match=what):
        load_sd1(tmp_path / "other.safetensors", configs=TINY)


def test_sd2_context_width_named(tmp_path):
    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
          "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 1024)}
    with pytest.raises(ck.CheckpointError, match="SD2"):
        ck.detect_architecture(sd)
    with pytest.raises(ck.CheckpointError, match="standalone VAE"):
        ck.detect_architecture({"encoder.down.0.block.0.conv1.weight": torch.zeros(1)})


@needs_reference
def test_other_architecture_folder(ref_folder, tmp_path):
    d, _ = ref_folder
    shutil.copytree(d / "sd", tmp_path / "xl")
    idx = json.loads((tmp_path / "xl" / "model_index.json").read_text())
    idx["_class_name"] = "StableDiffusionXLPipeline"
    (tmp_path / "xl" / "model_index.json").write_text(json.dumps(idx))
    with pytest.raises(ck.CheckpointError, match="StableDiffusionXLPipeline"):
        load_sd1(tmp_path / "xl")
    shutil.copytree(d / "sd", tmp_path / "nounet")
    shutil.rmtree(tmp_path / "nounet" / "unet")
    with pytest.raises(ck.CheckpointError, match="unet/"):
        load_sd1(tmp_path / "nounet")


@needs_reference
def test_standalone_vae(ref_folder, good_file, tmp_path):
    """A lone VAE file in the original layout (as vae-ft-mse-*.safetensors), in diffusers layout, or a vae/ folder."""
    d, ref = ref_folder
    sd = load_file(good_file)
    orig = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    orig["loss.logvar"] = torch.zeros(())  # training leftovers some VAE files carry
    save_file(orig, tmp_path / "vae_orig.safetensors")
    want = ref.vae.state_dict()
    for src in (tmp_path / "vae_orig.safetensors", d / "sd" / "vae",
                d / "sd" / "vae" / "diffusion_pytorch_model.safetensors"):
        got = ck.load_vae(src, config=vae.TINY)
        assert got.state_dict().keys() == want.keys()
        assert all(torch.equal(got.state_dict()[k], want[k]) for k in want), src
    assert ck.load_vae(d / "sd" / "vae").config == vae.TINY  # folder: config.json
    with pytest.raises(ck.CheckpointError, match="full SD checkpoint"):
        ck.load_vae(good_file)
