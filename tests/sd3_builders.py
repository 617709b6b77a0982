"""Builders of the small random Stable Diffusion 3 models the SD3 tests compare with diffusers (shared by
tests/test_sd3_pipeline.py and tests/test_gpu_pipelines.py)."""
from __future__ import annotations

import torch

from fastdiff.models.clip_tokenizer import CLIPTokenizer
from fastdiff.models.t5_tokenizer import T5Tokenizer

import diffusers
import transformers

# Widths chosen so the SD3 assembly is exercised for real: CLIP-L 64 + CLIP-G 128 = 192 < joint 256 (zero-padded),
# pooled 64 + 128 = 192. What weight shapes cannot show takes SD3's values, so an original single file of these
# models loads without being told a config: head dim 64 everywhere, 32 VAE norm groups.
_MMDIT = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=64, num_attention_heads=2,
              joint_attention_dim=256, caption_projection_dim=128, pooled_projection_dim=192, out_channels=16,
              pos_embed_max_size=24)
_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64], layers_per_block=1,
            latent_channels=16, norm_num_groups=32, sample_size=32, scaling_factor=1.5305, shift_factor=0.0609,
            use_quant_conv=False, use_post_quant_conv=False)


def _randomize(model, seed):
    """Every parameter re-drawn: norm scales around 1, matrices with std 1/sqrt(fan_in) (activations stay O(1)
    through the stacks, so fp32 agreement can be asked for tightly), biases and embeddings small."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() >= 2 and "embed" not in name and "shared" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def _clip(hidden, heads, act, eos, seed):
    cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=hidden, num_hidden_layers=3,
                                      num_attention_heads=heads, intermediate_size=2 * hidden + 5,
                                      projection_dim=hidden, hidden_act=act, bos_token_id=49406, eos_token_id=eos,
                                      pad_token_id=1, max_position_embeddings=77)
    return _randomize(transformers.CLIPTextModelWithProjection(cfg), seed)


def _t5(seed):
    cfg = transformers.T5Config(vocab_size=32128, d_model=256, d_kv=64, d_ff=200, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                                feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
                                layer_norm_epsilon=1e-6, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return _randomize(transformers.T5EncoderModel(cfg), seed)


def build_sd3_folder(d):
    """A tiny random StableDiffusion3Pipeline saved by diffusers in ``d`` (``sd3`` with T5, ``sd3_no_t5``
    without) and the diffusers pipeline loaded from it: ``(d, pipeline)``."""
    transformer = _randomize(diffusers.SD3Transformer2DModel(**_MMDIT), 1)
    ae = _randomize(diffusers.AutoencoderKL(**_VAE), 2)
    # CLIP-L: eos id in the config (first-eos pooling); CLIP-G: the hub configs' eos_token_id=2 (argmax pooling)
    clip_l, clip_g = _clip(64, 1, "quick_gelu", 49407, 3), _clip(128, 2, "gelu", 2, 4)
    # SD3 single files carry CLIP-L without text_projection and diffusers' from_single_file then uses the
    # identity; with an identity projection here both readings of fastdiff's single file agree
    with torch.no_grad():
        clip_l.text_projection.weight.copy_(torch.eye(64))
    CLIPTokenizer.from_bundled().save_pretrained(d / "_tok")
    CLIPTokenizer.from_bundled(pad_token="!").save_pretrained(d / "_tok2")
    T5Tokenizer.from_bundled().save_pretrained(d / "_tok3")
    tok_l = transformers.CLIPTokenizer.from_pretrained(d / "_tok", local_files_only=True)
    tok_g = transformers.CLIPTokenizer.from_pretrained(d / "_tok2", local_files_only=True)
    tok_t5 = transformers.T5TokenizerFast.from_pretrained(d / "_tok3", local_files_only=True)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = diffusers.StableDiffusion3Pipeline(transformer=transformer, scheduler=sched, vae=ae, text_encoder=clip_l,
                                              tokenizer=tok_l, text_encoder_2=clip_g, tokenizer_2=tok_g,
                                              text_encoder_3=_t5(5), tokenizer_3=tok_t5)
    pipe.save_pretrained(d / "sd3")
    no_t5 = diffusers.StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})
    no_t5.save_pretrained(d / "sd3_no_t5")
    ref = diffusers.StableDiffusion3Pipeline.from_pretrained(d / "sd3", local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    return d, ref
