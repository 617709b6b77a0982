"""LoRA on SD1 against diffusers' ``load_lora_weights`` / ``set_adapters`` / ``fuse_lora`` (peft) as the oracle.

Random LoRA weights on the tiny random SD1 pipeline (the ``ref_folder`` fixture), written in each file format
users have (kohya with diffusers or original LDM names, LoCon conv layers, diffusers/peft with alpha in the
header metadata, the older attention-processor format); fastdiff's UNet outputs, prompt embeddings and images
must equal diffusers' with the same file loaded, fused and unfused. Unfusing restores the weights bit-exactly;
a scale change needs no reload; unsupported files fail with errors that name what is wrong.
"""
from __future__ import annotations

import json

import pytest
import torch

from fastdiff.adapters import LoraError
from fastdiff.io.checkpoint import CheckpointError
from fastdiff.pipelines.sd1 import load_sd1

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

_ATTN = (".to_q", ".to_k", ".to_v", ".to_out.0")
_TEXT = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


# ------------------------------------------------------------------------------------------ making LoRA files
def _unet_targets(pipe, convs: bool) -> dict[str, torch.nn.Module]:
    """Attention projections, feed-forwards, proj_in/out, time MLP; with ``convs`` the ResNet/sampler convs."""
    out = {}
    for n, m in pipe.unet.named_modules():
        if isinstance(m, torch.nn.Linear) and not n.startswith("time_embedding"):
            out[n] = m
        elif isinstance(m, torch.nn.Conv2d) and (convs or n.endswith(("proj_in", "proj_out"))):
            out[n] = m
    return out


def _text_targets(pipe) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in pipe.text_encoder.named_modules() if n.endswith(_TEXT)}


def _pair(m: torch.nn.Module, rank: int, g: torch.Generator, std: float):
    """Random (down, up) for a layer: a conv's down has its kernel, its up is 1x1 (LoCon)."""
    if isinstance(m, torch.nn.Conv2d):
        down = torch.randn(rank, m.in_channels, *m.kernel_size, generator=g) * std
        up = torch.randn(m.out_channels, rank, 1, 1, generator=g) * std
    else:
        down = torch.randn(rank, m.in_features, generator=g) * std
        up = torch.randn(m.out_features, rank, generator=g) * std
    return down, up


def _kohya(pipe, *, convs=False, ldm_names=False, text=True, rank=4, alpha=2.0, seed=0, std=0.3):
    from fastdiff.io.sd_checkpoint import unet_key_to_original

    g = torch.Generator().manual_seed(seed)
    sd = {}
    items = [("lora_unet_", n, m) for n, m in _unet_targets(pipe, convs).items()]
    if text:
        items += [("lora_te_", n, m) for n, m in _text_targets(pipe).items()]
    for prefix, n, m in items:
        name = n
        if ldm_names and prefix == "lora_unet_":
            name = unet_key_to_original(n + ".weight", pipe.unet.config).removesuffix(".weight")
        flat = prefix + name.replace(".", "_")
        down, up = _pair(m, rank, g, std)
        sd[f"{flat}.lora_down.weight"], sd[f"{flat}.lora_up.weight"] = down, up
        sd[f"{flat}.alpha"] = torch.tensor(alpha)
    return sd


def _peft(pipe, *, rank=4, alpha=8.0, seed=1, std=0.3, text_model_level=False):
    """diffusers' own format: ``unet.*.lora_A/B.weight`` + header metadata with peft's LoraConfig fields.

    Text-encoder names: transformers >= 5 (what diffusers writes and reads here) has no ``text_model.`` level;
    files written with transformers 4 have it (``text_model_level=True``)."""
    g = torch.Generator().manual_seed(seed)
    sd, meta = {}, {}
    for comp, targets in (("unet", _unet_targets(pipe, convs=True)), ("text_encoder", _text_targets(pipe))):
        if comp == "text_encoder" and not text_model_level:
            targets = {n.removeprefix("text_model."): m for n, m in targets.items()}
        for n, m in targets.items():
            down, up = _pair(m, rank, g, std)
            sd[f"{comp}.{n}.lora_A.weight"], sd[f"{comp}.{n}.lora_B.weight"] = down, up
        meta.update({f"{comp}.r": rank, f"{comp}.lora_alpha": alpha, f"{comp}.target_modules": sorted(targets)})
    return sd, {"lora_adapter_metadata": json.dumps(meta)}


def _old_processor(pipe, *, rank=4, seed=2, std=0.3):
    """The older diffusers attention-processor format: ``<attn>.processor.to_q_lora.down.weight``."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for n, m in _unet_targets(pipe, convs=False).items():
        if n.endswith(_ATTN):
            attn, proj = n.rsplit(".to_", 1)
            proj = "to_out" if proj == "out.0" else "to_" + proj
            down, up = _pair(m, rank, g, std)
            sd[f"unet.{attn}.processor.{proj}_lora.down.weight"] = down
            sd[f"unet.{attn}.processor.{proj}_lora.up.weight"] = up
    return sd


def _save(tmp_path, name, sd, metadata=None):
    path = tmp_path / f"{name}.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


# -------------------------------------------------------------------------------------------------- comparing
def _diffusers_pipe(d):
    ref = diffusers.StableDiffusionPipeline.from_pretrained(d / "sd", local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    return ref


def _inputs(pipe):
    g = torch.Generator().manual_seed(3)
    cfg = pipe.unet.config
    x = torch.randn(2, cfg.in_channels, 16, 16, generator=g)
    ctx = torch.randn(2, 7, cfg.cross_attention_dim, generator=g)
    return x, torch.tensor([10, 700]), ctx


@torch.no_grad()
def _unet_out(pipe, ref=False):
    x, t, ctx = _inputs(pipe)
    return pipe.unet(x, t, ctx).sample if ref else pipe.unet(x, t, ctx)


_PROMPTS = ["a photo of a cat", "an astronaut riding a horse"]


@torch.no_grad()
def _text_out(pipe, ref=False):
    if ref:
        return pipe.encode_prompt(_PROMPTS, "cpu", 1, False)[0]
    return pipe.encode_prompt(_PROMPTS)


def _assert_close(ours, want, base, rel=2e-5):
    """fp32 parity within ``rel`` of the reference's magnitude, and the LoRA must have moved the output."""
    assert ours.shape == want.shape
    scale = want.abs().max().item()
    err = (ours - want).abs().max().item()
    moved = (want - base).abs().max().item()
    assert moved > 1e3 * rel * scale, f"the LoRA barely changes the output ({moved:.3g} vs scale {scale:.3g})"
    assert err <= rel * scale, f"max abs error {err:.3g} vs scale {scale:.3g} (LoRA moved it by {moved:.3g})"


# ---------------------------------------------------------------------------------------------------- tests
# format -> (state dict, header metadata, the same LoRA in a file diffusers reads or None for the same file).
# diffusers does not read original-LDM module names for SD1 (its sgm remap targets SDXL's layout), so that
# file's oracle is the same weights under diffusers' names.
FORMATS = {
    "kohya": lambda p: (_kohya(p), None, None),
    "kohya_ldm_names": lambda p: (_kohya(p, ldm_names=True, seed=5), None, _kohya(p, seed=5)),
    "locon": lambda p: (_kohya(p, convs=True, alpha=1.0, seed=6, std=0.2), None, None),
    "locon_ldm_names": lambda p: (_kohya(p, convs=True, ldm_names=True, seed=7, std=0.2), None,
                                  _kohya(p, convs=True, seed=7, std=0.2)),
    "peft": lambda p: (*_peft(p), None),
    "peft_text_model_names": lambda p: (*_peft(p, seed=8, text_model_level=True), _peft(p, seed=8)),
    "old_processor": lambda p: (_old_processor(p), None, None),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_lora_matches_diffusers(ref_folder, tmp_path, fmt):
    d, _ = ref_folder
    ours = load_sd1(d / "sd")
    ref = _diffusers_pipe(d)
    base_u, base_t = _unet_out(ours), _text_out(ours)
    sd, meta, for_diffusers = FORMATS[fmt](ours)
    path = _save(tmp_path, fmt, sd, meta)
    for_diffusers, ref_meta = for_diffusers if isinstance(for_diffusers, tuple) else (for_diffusers, None)
    if for_diffusers is not None:  # same tensors under other names
        assert set(for_diffusers) != set(sd) and len(for_diffusers) == len(sd)
    ref_path = path if for_diffusers is None else _save(tmp_path, fmt + "_diffusers_names", for_diffusers, ref_meta)

    ref.load_lora_weights(str(ref_path), adapter_name="a")
    name = ours.load_lora(path, name="a")
    assert name == "a" and ours.lora_scales == {"a": 1.0}
    _assert_close(_unet_out(ours), _unet_out(ref, ref=True), base_u)
    if fmt != "old_processor":  # that format carries no text-encoder layers here
        _assert_close(_text_out(ours), _text_out(ref, ref=True), base_t)

    # a scale change takes effect on the next call, with no reload
    ref.set_adapters(["a"], adapter_weights=[0.4])
    ours.set_lora_scale("a", 0.4)
    _assert_close(_unet_out(ours), _unet_out(ref, ref=True), base_u)

    # fused: the same outputs, the same weights as diffusers' fused ones; unfused: base weights bit-exact
    before = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    ref.fuse_lora(lora_scale=1.0)
    ours.fuse_lora()
    _assert_close(_unet_out(ours), _unet_out(ref, ref=True), base_u)
    ours.unfuse_lora()
    after = ours.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    ref.unfuse_lora()
    _assert_close(_unet_out(ours), _unet_out(ref, ref=True), base_u)

    ours.unload_lora()
    assert ours.lora_scales == {}
    assert torch.equal(_unet_out(ours), base_u)
    assert type(ours.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q).__name__ == "Linear"


def test_several_loras_and_images_match_diffusers(ref_folder, tmp_path):
    """Two named LoRAs at once at their own scales (diffusers' set_adapters), then the txt2img image."""
    d, _ = ref_folder
    ours = load_sd1(d / "sd")
    ref = _diffusers_pipe(d)
    base_u = _unet_out(ours)
    style = _save(tmp_path, "style", _kohya(ours, seed=11, std=0.25))
    subject = _save(tmp_path, "subject", *_peft(ours, seed=12, std=0.25))
    ref.load_lora_weights(str(style), adapter_name="style")
    ref.load_lora_weights(str(subject), adapter_name="subject")
    ref.set_adapters(["style", "subject"], adapter_weights=[0.7, -0.5])
    assert ours.load_lora(style, scale=0.7) == "style"
    assert ours.load_lora(subject, scale=-0.5) == "subject"
    assert ours.lora_scales == {"style": 0.7, "subject": -0.5}
    _assert_close(_unet_out(ours), _unet_out(ref, ref=True), base_u)

    mine = ours.txt2img(_PROMPTS, steps=3, sampler="ddim", guidance=5.0, height=32, width=32,
                        generator=torch.Generator().manual_seed(4))
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    theirs = ref(_PROMPTS, num_inference_steps=3, guidance_scale=5.0, output_type="pt", height=32, width=32,
                 generator=torch.Generator().manual_seed(4)).images
    assert ((mine > 0.01) & (mine < 0.99)).float().mean() > 0.1
    err = (mine - theirs.float()).abs().max().item()
    assert err <= 1 / 255, f"max per-pixel difference {err * 255:.3f}/255"

    # one LoRA off (scale 0) equals having only the other; unloading one by name keeps the other
    ref.set_adapters(["style", "subject"], adapter_weights=[0.0, -0.5])
    ours.set_lora_scale("style", 0.0)
    _assert_close(_unet_out(ours), _unet_out(ref, ref=True), base_u)
    ours.unload_lora("style")
    ref.delete_adapters("style")
    assert ours.lora_scales == {"subject": -0.5}
    _assert_close(_unet_out(ours), _unet_out(ref, ref=True), base_u)
    with pytest.raises(ValueError, match="no LoRA named 'style'"):
        ours.set_lora_scale("style", 1.0)
    with pytest.raises(ValueError, match="loaded already"):
        ours.load_lora(subject, name="subject")
    with pytest.raises(ValueError, match="finite number"):
        ours.set_lora_scale("subject", float("nan"))


def test_unfuse_is_bit_exact_and_fused_matches_unfused(ref_folder, tmp_path):
    d, _ = ref_folder
    ours = load_sd1(d / "sd")
    before_u = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    before_t = {k: v.clone() for k, v in ours.text_encoder.state_dict().items()}
    ours.load_lora(_save(tmp_path, "a", _kohya(ours, convs=True, seed=21, std=0.2)), scale=0.8)
    ours.load_lora(_save(tmp_path, "b", *_peft(ours, seed=22, std=0.2)), scale=0.3)
    assert ours.unet.state_dict().keys() == before_u.keys()  # LoRA tensors are not part of the state dict
    unfused = _unet_out(ours)
    ours.fuse_lora()
    fused = _unet_out(ours)
    assert (fused - unfused).abs().max() <= 2e-5 * unfused.abs().max()
    assert not torch.equal(ours.unet.conv_in.weight, before_u["conv_in.weight"])
    ours.set_lora_scale("a", 0.2)  # re-fused at the new scale from the kept base weights
    ours.unfuse_lora()
    assert all(torch.equal(v, before_u[k]) for k, v in ours.unet.state_dict().items())
    assert all(torch.equal(v, before_t[k]) for k, v in ours.text_encoder.state_dict().items())
    again = _unet_out(ours)
    ours.set_lora_scale("a", 0.8)
    assert torch.equal(_unet_out(ours), unfused) and not torch.equal(again, unfused)
    ours.fuse_lora("b")
    ours.unload_lora()
    assert all(torch.equal(v, before_u[k]) for k, v in ours.unet.state_dict().items())


def _lora_error(ours, tmp_path, sd, match, name="bad"):
    with pytest.raises(LoraError, match=match) as e:
        ours.load_lora(_save(tmp_path, name, sd))
    assert "\n" not in str(e.value)
    assert ours.lora_scales == {}  # nothing half-loaded
    return str(e.value)


def test_errors_name_what_is_wrong(ref_folder, tmp_path):
    d, _ = ref_folder
    ours = load_sd1(d / "sd")
    base_u = _unet_out(ours)
    good = _kohya(ours, seed=31)
    # keys that match no layer are listed (and nothing of the file is applied)
    bad = {**good, "lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
           "lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
           "something_else.weight": torch.zeros(3)}
    msg = _lora_error(ours, tmp_path, bad, "3 LoRA keys match no layer")
    assert "lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight" in msg and "something_else.weight" in msg
    assert torch.equal(_unet_out(ours), base_u)
    # LoHa, LoKr, DoRA: refused by name
    flat = "lora_unet_down_blocks_0_attentions_0_proj_in"
    _lora_error(ours, tmp_path, {f"{flat}.hada_w1_a": torch.zeros(4, 32), f"{flat}.hada_w1_b": torch.zeros(4, 32)},
                "LoHa")
    _lora_error(ours, tmp_path, {f"{flat}.lokr_w1": torch.zeros(4, 4), f"{flat}.lokr_w2": torch.zeros(8, 8)}, "LoKr")
    _lora_error(ours, tmp_path, {**good, f"{flat}.dora_scale": torch.ones(1, 32)}, "DoRA")
    # another architecture, by key names and by shapes
    _lora_error(ours, tmp_path, {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight":
                                 torch.zeros(4, 1280)}, "made for SDXL")
    _lora_error(ours, tmp_path, {"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.zeros(4, 64)},
                r"made for SD3")
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    for width, arch in ((1024, "SD2"), (2048, "SDXL")):
        sd = {f"{k}.lora_down.weight": torch.zeros(4, width), f"{k}.lora_up.weight": torch.zeros(32, 4)}
        _lora_error(ours, tmp_path, sd, f"made for {arch}")
    # an unsafe pickle is refused; a tensors-only .pt loads (weights_only=True)


    class Payload:
        def __reduce__(self):
            return (print, ("ran code from a LoRA file",))

    evil = tmp_path / "evil.pt"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1), "p": Payload()}, evil)
    with pytest.raises(CheckpointError, match="refused to unpickle") as e:
        ours.load_lora(evil)
    assert "\n" not in str(e.value)
    pt = tmp_path / "good.pt"
    torch.save(good, pt)
    assert ours.load_lora(pt) == "good"
    assert not torch.equal(_unet_out(ours), base_u)


# ------------------------------------------------------------------------------------------------------- SD3
_SD3_TARGETS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
_KOHYA_SD3 = {"x_block_attn_proj": "attn.to_out.0", "context_block_attn_proj": "attn.to_add_out",
              "x_block_mlp_fc1": "ff.net.0.proj", "x_block_mlp_fc2": "ff.net.2",
              "context_block_mlp_fc1": "ff_context.net.0.proj", "context_block_mlp_fc2": "ff_context.net.2"}
_KOHYA_QKV = {"x_block_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
              "context_block_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}


def _sd3_loras(transformer, rank=4, alpha=2.0, seed=41, std=0.1):
    """The same random LoRA as (kohya file with fused qkv, diffusers/peft file with the qkv up rows split)."""
    g = torch.Generator().manual_seed(seed)
    mods = dict(transformer.named_modules())
    kohya, peft = {}, {}
    for i in range(len(transformer.transformer_blocks)):
        for flat, names in [(k, (v,)) for k, v in _KOHYA_SD3.items()] + list(_KOHYA_QKV.items()):
            paths = [f"transformer_blocks.{i}.{n}" for n in names]
            if not all(p in mods for p in paths):
                continue  # the last block's context stream is pre-only
            m = mods[paths[0]]
            down = torch.randn(rank, m.in_features, generator=g) * std
            up = torch.randn(m.out_features * len(paths), rank, generator=g) * std
            key = f"lora_unet_joint_blocks_{i}_{flat}"
            kohya[f"{key}.lora_down.weight"], kohya[f"{key}.lora_up.weight"] = down, up
            kohya[f"{key}.alpha"] = torch.tensor(alpha)
            for p, u in zip(paths, up.chunk(len(paths))):
                peft[f"transformer.{p}.lora_A.weight"], peft[f"transformer.{p}.lora_B.weight"] = down.clone(), u
    targets = sorted({k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in peft})
    meta = {"transformer.r": rank, "transformer.lora_alpha": alpha, "transformer.target_modules": targets}
    return kohya, peft, {"lora_adapter_metadata": json.dumps(meta)}


@pytest.mark.parametrize("fmt", ["peft", "kohya_fused_qkv"])
def test_sd3_lora_matches_diffusers(sd3_folder, tmp_path, fmt):
    """SD3 MMDiT with a LoRA: diffusers/peft ``transformer.*`` files, and kohya's original names whose fused qkv
    LoRA is applied to the q, k and v row slices (oracle: diffusers with the up rows split into three)."""
    import copy

    from fastdiff.pipelines.sd3 import load_sd3

    d, _ = sd3_folder
    ours = load_sd3(d / "sd3")
    ref = diffusers.StableDiffusion3Pipeline.from_pretrained(d / "sd3", local_files_only=True)
    kohya, peft, meta = _sd3_loras(ours.transformer)
    peft_path = _save(tmp_path, "sd3_peft", peft, meta)
    path = peft_path if fmt == "peft" else _save(tmp_path, "sd3_kohya", kohya)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 12, 8, generator=g)
    t = torch.tensor([999.0, 250.5])
    ctx, pooled = torch.randn(2, 20, 256, generator=g), torch.randn(2, 192, generator=g)
    with torch.no_grad():
        base = ours.transformer(x, t, ctx, pooled)
        ref.load_lora_weights(str(peft_path), adapter_name="a")
        ours.load_lora(path, scale=0.8, name="a")
        ref.set_adapters(["a"], adapter_weights=[0.8])
        kw = dict(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled)
        r64 = copy.deepcopy(ref.transformer).double()(**{k: v.double() for k, v in kw.items()}).sample

        def rms(a):
            return (a.double() - r64).pow(2).mean().sqrt().item()

        # the SD3 parity rule (see test_sd3_pipeline): fastdiff's fp32 error at most 2x diffusers' own fp32 error
        for step in ("unfused", "fused"):
            got = ours.transformer(x, t, ctx, pooled)
            e_ours, e_theirs = rms(got), rms(ref.transformer(**kw).sample)
            assert (r64 - base.double()).abs().max() > 0.05 * r64.abs().max(), "the LoRA barely changes the output"
            assert e_theirs < 1e-5 * r64.abs().max().item() and e_ours <= 2 * e_theirs, (step, e_ours, e_theirs)
            ours.fuse_lora()
        ours.unfuse_lora()
        ours.unload_lora()
        assert torch.equal(ours.transformer(x, t, ctx, pooled), base)
    with pytest.raises(LoraError, match="made for SD1/SD2"):
        ours.load_lora(_save(tmp_path, "sd1", {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight":
                                                torch.zeros(4, 32)}))


def test_cli_lora_gives_the_python_image(ref_folder, tmp_path):
    """``fastdiff generate --lora FILE:SCALE`` writes the image ``load_lora`` + ``generate`` give in Python."""
    import numpy as np
    from PIL import Image

    import fastdiff
    from fastdiff.cli import main

    d, _ = ref_folder
    ours = load_sd1(d / "sd")
    f = _save(tmp_path, "style", _kohya(ours, seed=21, std=0.25))
    out = tmp_path / "cli.png"
    args = ["generate", "--model", str(d / "sd"), "--prompt", "a cat", "--steps", "2", "--height", "32",
            "--width", "32", "--seed", "5", "--quiet", "--out", str(out)]
    assert main(args + ["--lora", f"{f}:0.6"]) == 0
    ours.load_lora(f, scale=0.6)
    want = fastdiff.generate("a cat", model=ours, steps=2, height=32, width=32, seed=5, progress=False)[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(want.convert("RGB")))
    ours.set_lora_scale("style", 0.0)
    base = fastdiff.generate("a cat", model=ours, steps=2, height=32, width=32, seed=5, progress=False)[0]
    assert not np.array_equal(np.asarray(base), np.asarray(want)), "the LoRA did not change the image"


def _rms(a, b):
    return ((a - b).square().mean().sqrt() / b.square().mean().sqrt()).item()


def test_lora_on_an_int8_unet_switches_without_reload(ref_folder, tmp_path):
    """A LoRA on a UNet quantised to int8: its side path runs in float beside the int8 layers, so the output is the
    fp32 model's with the same LoRA up to the int8 error (relative RMS < 0.1, the bound of the int8 quantisation
    test in tests/test_int8.py), while the int8 model without it is far off; a scale change, a second LoRA and an
    unload take effect on the next call, with no reload or re-quantisation."""
    d, _ = ref_folder
    f32, q = load_sd1(d / "sd"), load_sd1(d / "sd")
    q.quantize("int8")
    a = _save(tmp_path, "a", _kohya(f32, seed=31, std=0.3))
    b = _save(tmp_path, "b", *_peft(f32, seed=32, std=0.3))
    base8 = _unet_out(q)
    assert _rms(base8, _unet_out(f32)) < 0.1
    for step, (load, scales) in enumerate([(a, {"a": 0.8}), (None, {"a": 0.4}), (b, {"a": 0.8, "b": 0.5})]):
        for pipe in (f32, q):
            if load is not None:
                pipe.load_lora(load, scale=scales[load.stem])
            for name, sc in scales.items():
                pipe.set_lora_scale(name, sc)
        want, got = _unet_out(f32), _unet_out(q)
        assert _rms(got, want) < 0.1, f"step {step}: int8 + LoRA vs fp32 + LoRA {_rms(got, want):.4f}"
        assert _rms(base8, want) > 0.3, f"step {step}: the LoRA barely moves the output"
        if step == 0:
            first = got
    q.set_lora_scale("b", 0.0)
    assert torch.equal(_unet_out(q), first)  # b at scale 0 and a back at 0.8: the first output again
    q.set_lora_scale("b", 0.5)
    both = _unet_out(q)
    with pytest.raises(LoraError, match="^fuse_lora: LoRA 'a' is on .* int8-quantised layer"):
        q.fuse_lora()
    assert torch.equal(_unet_out(q), both)  # the refused fuse changed nothing
    q.unload_lora()
    torch.testing.assert_close(_unet_out(q), base8, rtol=0, atol=1e-6 * base8.abs().max().item())
    # quantising a model that carries a LoRA is refused before any layer changes
    before = _unet_out(f32)
    with pytest.raises(ValueError, match="^quantize_int8: .* carry LoRA side paths"):
        f32.quantize("int8")
    assert torch.equal(_unet_out(f32), before)


def test_lora_scale_change_under_torch_compile_needs_no_recompile(ref_folder, tmp_path):
    """A compiled LoRA'd UNet follows scale changes on the next call without recompiling (each LoRA's scale is a
    0-d buffer the graph reads, not a constant it bakes in): outputs equal the eager LoRA'd UNet at every scale."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    from fastdiff.ops._packed import PackedWeightMixin

    d, _ = ref_folder
    eager, comp = load_sd1(d / "sd"), load_sd1(d / "sd")
    path = _save(tmp_path, "a", _kohya(eager, seed=41, std=0.3))
    for pipe in (eager, comp):
        pipe.load_lora(path, scale=0.8)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(comp.unet, backend=counter)
    x, t, ctx = _inputs(comp)
    # warm-up: the layers pack their weights on the pack_after-th call (fastdiff.ops._packed), a path of its own
    with torch.no_grad():
        for _ in range(PackedWeightMixin.pack_after + 1):
            compiled(x, t, ctx)
    base = None
    for step, scale in enumerate((0.8, 0.3, 0.0, 1.2)):
        eager.set_lora_scale("a", scale)
        comp.set_lora_scale("a", scale)
        with torch.no_grad():
            got = compiled(x, t, ctx)
        want = _unet_out(eager)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
        if step == 0:
            frames = counter.frame_count
            base = want
        assert counter.frame_count == frames, f"scale {scale}: recompiled ({counter.frame_count} frames)"
    assert frames > 0 and not torch.allclose(want, base)
