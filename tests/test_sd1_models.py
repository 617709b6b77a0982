"""SD1 models against their public references on the same random weights.

Oracles: transformers' CLIPTokenizer (built from the vocab.json/merges.txt fastdiff derives from the bundled CLIP
vocabulary, local files only) and CLIPTextModel, diffusers' UNet2DConditionModel and AutoencoderKL. Every
parameter is re-drawn at random (norm weights included), so a swapped or unused tensor shows up.
"""
from __future__ import annotations

import pytest
import torch
from lowp import assert_close_fp32 as _assert_close

from fastdiff.models import clip_text, unet_sd, vae
from fastdiff.models.clip_tokenizer import CLIPTokenizer, read_clip_bpe

try:
    import diffusers
    import transformers
except ImportError:  # the reference implementations are test extras: fastdiff's own tests still run
    diffusers = transformers = None
needs_reference = pytest.mark.skipif(diffusers is None or transformers is None,
                                     reason="needs diffusers and transformers (the reference implementation)")

PROMPTS = [
    "a photo of a cat",
    "A Photo Of A CAT!!!",
    "",
    "   leading and trailing   whitespace\t\nand\ttabs  ",
    "an astronaut riding a horse, highly detailed, 8k, trending on artstation, (masterpiece:1.2), [blurry]",
    "don't stop, it's what we're doing; I'll've they'd",
    "café crème brûlée, naïve Zoë, Ångström",
    "東京の夜景、ネオン 🌃🐱 — “quotes” ‘single’ … «guillemets»",
    "émoji 👩‍🚀 and math ∑ x² ≥ 0, numbers 1234567 3.14159",
    "html &amp; entities <b>bold</b> C:\\path\\to\\file http://example.com/a?b=c#d",
    "ﬁ ligature, full-width ＡＢＣ１２３, combining e\u0301 vs é",
    "word " * 120,  # far over 77 tokens: truncated to bos + 75 + eos
    "<|endoftext|> literal special token and <|startoftext|>",
]


def _randomize_norms_around_one(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere; norm scales around 1 so activations stay O(1) through deep stacks."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = p.dim() == 1 and any(s in name for s in ("norm", "layer_norm")) and name.endswith("weight")
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g) if is_norm else 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


# --------------------------------------------------------------------------------------------- tokenizer
@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer.from_bundled()


@pytest.fixture(scope="module")
def hf_tok_dir(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("clip_tok")
    tok.save_pretrained(d)
    return d


def test_vocab_derivation():
    vocab, merges = read_clip_bpe()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["a</w>"] == 256 + list(vocab).index("a")
    assert sorted(vocab.values()) == list(range(49408))


def test_known_ids(tok):
    assert tok.encode("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]
    ids = tok("a photo of a cat")
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == 49407).all()


@needs_reference
@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_tokenizer_matches_transformers(tok, hf_tok_dir, pad):
    ours = CLIPTokenizer.from_bundled(pad_token=pad)
    ref = transformers.CLIPTokenizer.from_pretrained(hf_tok_dir, local_files_only=True, pad_token=pad)
    want = ref(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    got = ours(PROMPTS)
    assert torch.equal(got, want), [p for p, a, b in zip(PROMPTS, got, want) if not torch.equal(a, b)]
    # untruncated ids too (where text is dropped, the pipeline warns; it needs the full count)
    for p in PROMPTS:
        assert ours.encode(p) == ref(p).input_ids, p


def test_truncation_and_padding(tok):
    long = tok(["word " * 120])
    assert long.shape == (1, 77) and long[0, 0] == 49406 and long[0, -1] == 49407
    assert (long[0, 1:-1] != 49407).all()
    with pytest.raises(ValueError, match="exceeds"):
        tok(["word " * 120], truncation=False)
    sd3 = CLIPTokenizer.from_bundled(pad_token="!")(["a cat"])
    assert sd3[0, :4].tolist() == [49406, 320, 2368, 49407] and (sd3[0, 4:] == 0).all()
    with pytest.raises(TypeError):
        tok([1, 2])


def test_tokenizer_files_roundtrip(tok, hf_tok_dir):
    again = CLIPTokenizer.from_pretrained(hf_tok_dir)
    assert again.vocab == tok.vocab and again.merges == tok.merges
    assert torch.equal(again(PROMPTS), tok(PROMPTS))


# ------------------------------------------------------------------------------------------ text encoder
def _hf_clip(cfg: clip_text.CLIPTextConfig):
    hc = {k: v for k, v in cfg.to_transformers().items() if k not in ("architectures", "model_type", "torch_dtype")}
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(**hc)).eval()


def _copy_clip(ref) -> clip_text.CLIPTextModel:
    ours = clip_text.CLIPTextModel(clip_text.TINY).eval()
    ours.load_state_dict({"text_model." + k.removeprefix("text_model."): v for k, v in ref.state_dict().items()},
                         strict=True)
    return ours


@needs_reference
def test_clip_text_matches_transformers(tok):
    ref = _randomize_norms_around_one(_hf_clip(clip_text.TINY))
    ours = _copy_clip(ref)
    ids = tok(["a photo of a cat", "café 🌃, (masterpiece:1.2)", "word " * 120])
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        hidden, pooled = ours.encode(ids)
        _assert_close(hidden, out.last_hidden_state)
        _assert_close(pooled, out.pooler_output)
        # clip skip 1: penultimate block's output through the final layer norm (diffusers' definition)
        _assert_close(ours(ids, clip_skip=1), ref.final_layer_norm(out.hidden_states[-2]))
        # "!"-padded ids with an attention mask (SD3's CLIP-G use)
        ids2 = CLIPTokenizer.from_bundled(pad_token="!")(["a cat", "a photo of a dog"])
        mask = (torch.arange(77)[None] <= (ids2 == 49407).int().argmax(-1)[:, None]).long()
        out2 = ref(ids2, attention_mask=mask)
        h2, p2 = ours.encode(ids2, mask)
        _assert_close(h2, out2.last_hidden_state)
        _assert_close(p2, out2.pooler_output)


# -------------------------------------------------------------------------------------------------- UNet
def _diffusers_unet(cfg: unet_sd.UNetSDConfig):
    kw = {k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"}
    return diffusers.UNet2DConditionModel(**kw)


@needs_reference
@pytest.mark.parametrize("cfg", [unet_sd.TINY, unet_sd.UNetSDConfig(
    in_channels=9, block_out_channels=(16, 32, 32), cross_attention=(False, True, True), layers_per_block=1,
    num_heads=4, cross_attention_dim=24, norm_num_groups=4)], ids=["tiny", "inpaint-3level"])
def test_unet_matches_diffusers(cfg):
    ref = _randomize_norms_around_one(_diffusers_unet(cfg))
    ours = unet_sd.UNetSD(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, 16, 24, generator=g)
    ctx = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    with torch.no_grad():
        _assert_close(ours(x, torch.tensor([999, 1]), ctx), ref(x, torch.tensor([999, 1]), ctx).sample)
        _assert_close(ours(x, 500, ctx), ref(x, 500, ctx).sample)  # scalar timestep broadcast
        # latent sizes that do not halve evenly (diffusers' upsample_size path), batch 1, fractional t
        x1 = torch.randn(1, cfg.in_channels, 13, 9, generator=g)
        t = torch.tensor([321.5])
        _assert_close(ours(x1, t, ctx[:1]), ref(x1, t, ctx[:1]).sample)


def test_unet_bad_input():
    m = unet_sd.UNetSD(unet_sd.TINY)
    with pytest.raises(ValueError, match="latents"):
        m(torch.randn(1, 3, 8, 8), 1, torch.randn(1, 7, 32))
    with pytest.raises(ValueError, match="text embeddings"):
        m(torch.randn(1, 4, 8, 8), 1, torch.randn(1, 7, 16))
    with pytest.raises(ValueError, match="timestep"):
        m(torch.randn(2, 4, 8, 8), torch.tensor([1, 2, 3]), torch.randn(2, 7, 32))


# --------------------------------------------------------------------------------------------------- VAE
@needs_reference
def test_vae_matches_diffusers():
    cfg = vae.TINY
    ref = diffusers.AutoencoderKL(**{k: v for k, v in cfg.to_diffusers().items() if k != "_class_name"})
    ref = _randomize_norms_around_one(ref)
    ours = vae.AutoencoderKL(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 32, 48, generator=g) * 2 - 1
    with torch.no_grad():
        post_ref = ref.encode(img).latent_dist
        post = ours.encode(img)
        _assert_close(post.mean, post_ref.mean)
        _assert_close(post.std, post_ref.std)
        s1 = post.sample(torch.Generator().manual_seed(7))
        s2 = post_ref.sample(torch.Generator().manual_seed(7))
        _assert_close(s1, s2)
        z = torch.randn(2, 4, 5, 7, generator=g)
        _assert_close(ours.decode(z), ref.decode(z).sample)
    assert ours.scaling_factor == 0.18215
    with pytest.raises(ValueError, match="multiples"):
        ours.encode(torch.randn(1, 3, 31, 32))


# ------------------------------------------------------------------------------------ full-size, on meta
# config.json of the public SD1.5 release: the sd15_json fixture (tests/conftest.py)


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@needs_reference
def test_full_size_key_sets_equal_references(sd15_json):
    SD15_UNET_JSON, SD15_VAE_JSON, SD15_TEXT_JSON = sd15_json["unet"], sd15_json["vae"], sd15_json["text"]
    assert unet_sd.UNetSDConfig.from_diffusers(SD15_UNET_JSON) == unet_sd.SD15
    assert vae.VAEConfig.from_diffusers(SD15_VAE_JSON) == vae.SD15
    with torch.device("meta"):
        ref_u = diffusers.UNet2DConditionModel(**SD15_UNET_JSON)
        ref_v = diffusers.AutoencoderKL(**SD15_VAE_JSON)
        ref_t = transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD15_TEXT_JSON))
        ours_u, ours_v = unet_sd.UNetSD(unet_sd.SD15), vae.AutoencoderKL(vae.SD15)
        ours_t = clip_text.CLIPTextModel(clip_text.SD15)
        ours_ui = unet_sd.UNetSD(unet_sd.SD15_INPAINT)
    assert _shapes(ours_u) == _shapes(ref_u)
    assert _shapes(ours_v) == _shapes(ref_v)
    assert _shapes(ours_t) == {"text_model." + k.removeprefix("text_model."): s for k, s in _shapes(ref_t).items()}
    assert sum(v.numel() for v in ours_u.parameters()) == 859_520_964  # the published SD1.5 UNet size
    assert _shapes(ours_ui)["conv_in.weight"] == (320, 9, 3, 3)


@needs_reference
def test_vae_tiled_decode_and_encode_match_diffusers_tiling():
    """fastdiff's tiled decode/encode equal diffusers' AutoencoderKL with enable_tiling() on the same weights
    (small tiles so a multi-tile image exercises both blends); one tile is exactly the untiled decode."""
    from fastdiff.models.vae_tiling import tiled_decode, tiled_encode

    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(**{k: v for k, v in vae.TINY.to_diffusers().items() if k != "_class_name"}).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            is_norm = p.dim() == 1 and "norm" in name and name.endswith("weight")
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if is_norm else 0.1 * torch.randn(p.shape, generator=g))
    ours = vae.AutoencoderKL(vae.TINY).eval()
    ours.load_state_dict(ref.state_dict())
    ref.enable_tiling()
    ref.tile_sample_min_size, ref.tile_latent_min_size = 16, 16 // ours.downscale
    z = torch.randn(1, 4, 20, 28, generator=g)
    x = torch.rand(1, 3, 40, 56, generator=g) * 2 - 1
    with torch.no_grad():
        want = ref.decode(z).sample
        got = tiled_decode(ours, z, tile=16)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        want_e = ref.encode(x).latent_dist.mean
        got_e = tiled_encode(ours, x, tile=16).mean
        torch.testing.assert_close(got_e, want_e, rtol=1e-4, atol=1e-4)
        small = torch.randn(1, 4, 2, 2, generator=g)  # one tile: exactly the untiled decode
        torch.testing.assert_close(tiled_decode(ours, small, tile=16), ours.decode(small), rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiple"):
        tiled_decode(ours, z, tile=15)
