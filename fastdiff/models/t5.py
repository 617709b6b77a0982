"""The T5 encoder (T5 v1.1 XXL: Stable Diffusion 3's third text encoder).

Attribute paths equal the keys of transformers' ``T5EncoderModel`` (``shared.weight``,
``encoder.embed_tokens.weight``, ``encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight``,
``encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight``, ``encoder.block.{i}.layer.0.layer_norm
.weight``, ``encoder.block.{i}.layer.1.DenseReluDense.{wi_0,wi_1,wo}.weight``, ``encoder.block.{i}.layer.1
.layer_norm.weight``, ``encoder.final_layer_norm.weight``), so a diffusers ``text_encoder_3/`` loads by a strict
copy (fastdiff/io/t5_checkpoint.py). ``encoder.embed_tokens`` IS the ``shared`` module, as in transformers where
the two are tied: one tensor, two state_dict keys.

The network (no biases anywhere, no dropout at inference)::

    x = shared(input_ids)
    bias = relative_attention_bias[bucket(j - i)]          (heads, L, L), from block 0, shared by all blocks
    per block:
        x = x + o(attention(q(n), k(n), v(n), scores = q k^T + bias + mask))     n = rms_norm(x)
        x = x + wo(gelu_tanh(wi_0(n)) * wi_1(n))                                  n = rms_norm(x)
    last_hidden_state = rms_norm(x)

* T5's norm is RMS without mean or bias: ``w * x / sqrt(mean(x^2) + eps)`` with the mean in fp32, exactly the
  semantics of :class:`fastdiff.ops.RMSNorm`.
* The attention has NO ``1/sqrt(d_kv)`` scale (Mesh TensorFlow folded it into the initialisation of q), so
  :func:`fastdiff.ops.attention` runs with ``scale=1.0``, and the position bias (plus ``finfo.min`` on padded
  keys) is its float mask.
* The position bias buckets the signed distance ``j - i`` (key minus query position): half the buckets for
  ``j > i``; within each half, distances below ``num_buckets / 4`` get their own bucket and larger ones share
  log-spaced buckets up to ``max_distance`` (Raffel et al. 2020, sec. 2.1; Mesh TF's
  ``_relative_position_bucket``).
* The gated-GELU FFN of T5 v1.1 uses the tanh GELU (transformers' ``gelu_new``); the activation is fused into
  ``wi_0``'s output write (``Linear(..., activation="gelu_tanh")``) and the residual into ``o`` / ``wo``.
* In bf16/fp16 the attention scores, the bias and the softmax are computed in fp32 (q, k, v are upcast for the
  attention only: at L = 256 it is ~1% of the FLOPs of the FFN).
* fp16: T5 v1.1's residual stream outgrows fp16's range (65504) and turns into inf/NaN. As transformers does
  (``wo`` kept in fp32, its output promoting the sum), the FFN's ``wo`` runs in fp32 and the residual stream is
  fp32 from the first FFN on; the sublayers still compute in fp16 from a normed fp16 input, and the fp16 stream
  of the first attention sublayer is clamped to fp16's range as in transformers. bf16 and fp32 need none of this.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.ops import Linear, RMSNorm, rms_norm
from fastdiff.ops import attention as _attention

__all__ = ["T5Config", "T5EncoderModel", "relative_position_bucket", "T5_XXL", "TINY", "PRESETS"]

_FFN = ("gated-gelu", "relu")


@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    # "gated-gelu": T5 v1.1 / flan-T5 / SD3 (wi_0, wi_1, wo; tanh GELU); "relu": the original T5 (wi, wo)
    feed_forward_proj: str = "gated-gelu"

    def __post_init__(self):
        if self.feed_forward_proj not in _FFN:
            raise ValueError(f"feed_forward_proj must be one of {_FFN}, got {self.feed_forward_proj!r}")
        if self.relative_attention_num_buckets < 4 or self.relative_attention_num_buckets % 4:
            # bidirectional: half per direction, and each half splits into exact and log-spaced buckets
            raise ValueError(f"relative_attention_num_buckets must be a positive multiple of 4, got "
                             f"{self.relative_attention_num_buckets}")
        if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 4:
            raise ValueError("relative_attention_max_distance must exceed relative_attention_num_buckets / 4")
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def from_transformers(cls, cfg: dict) -> "T5Config":
        """From a transformers ``T5Config`` config.json dict."""
        ffn = cfg.get("feed_forward_proj", "relu")
        act = cfg.get("dense_act_fn")
        if ffn not in _FFN:
            raise ValueError(f"unsupported T5 feed_forward_proj {ffn!r} (fastdiff supports {_FFN})")
        if ffn == "gated-gelu" and act not in (None, "gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported T5 activation {act!r} for gated-gelu (expected gelu_new)")
        return cls(vocab_size=cfg.get("vocab_size", 32128), d_model=cfg.get("d_model", 512), d_kv=cfg.get("d_kv", 64),
                   d_ff=cfg.get("d_ff", 2048), num_layers=cfg.get("num_layers", 6), num_heads=cfg.get("num_heads", 8),
                   relative_attention_num_buckets=cfg.get("relative_attention_num_buckets", 32),
                   relative_attention_max_distance=cfg.get("relative_attention_max_distance", 128),
                   layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-6), feed_forward_proj=ffn)

    def to_transformers(self) -> dict:
        """config.json dict for transformers' ``T5EncoderModel``."""
        gated = self.feed_forward_proj == "gated-gelu"
        return {"architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": self.vocab_size,
                "d_model": self.d_model, "d_kv": self.d_kv, "d_ff": self.d_ff, "num_layers": self.num_layers,
                "num_decoder_layers": self.num_layers, "num_heads": self.num_heads,
                "relative_attention_num_buckets": self.relative_attention_num_buckets,
                "relative_attention_max_distance": self.relative_attention_max_distance,
                "layer_norm_epsilon": self.layer_norm_epsilon, "feed_forward_proj": self.feed_forward_proj,
                "dense_act_fn": "gelu_new" if gated else "relu", "is_gated_act": gated, "dropout_rate": 0.1,
                "initializer_factor": 1.0, "is_encoder_decoder": False, "use_cache": False,
                "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
                "dtype": "float32"}


# google/t5-v1_1-xxl's encoder, as in SD3's text_encoder_3/
T5_XXL = T5Config()
# Small test encoder; the real vocabulary size, so real tokenizer ids are valid inputs.
TINY = T5Config(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
PRESETS = {"t5_xxl": T5_XXL, "sd3": T5_XXL, "tiny": TINY}


def relative_position_bucket(relative_position: torch.Tensor, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
    """Bidirectional T5 bucket of each signed distance ``key_pos - query_pos`` (int tensor -> long tensor)."""
    half = num_buckets // 2
    bucket = (relative_position > 0).long() * half  # keys after the query use the upper half
    n = relative_position.abs()
    exact = half // 2  # distances 0 .. exact-1 get a bucket each
    # exact .. max_distance: log-spaced into the remaining half - exact buckets; farther ones clip to the last
    log_part = torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact) * (half - exact)
    far = (exact + log_part.long()).clamp(max=half - 1)
    return bucket + torch.where(n < exact, n, far)


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        inner = cfg.inner_dim
        self.q = Linear(cfg.d_model, inner, bias=False)
        self.k = Linear(cfg.d_model, inner, bias=False)
        self.v = Linear(cfg.d_model, inner, bias=False)
        self.o = Linear(inner, cfg.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + o(attention(x))``; ``bias`` fp32, broadcasting to (B, heads, L, L)."""
        b, n, _ = x.shape

        def heads(t):  # (B, L, heads * d_kv) -> (B, heads, L, d_kv), fp32 for the scores and softmax
            return t.view(b, n, self.num_heads, self.d_kv).transpose(1, 2).float()

        o = _attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), bias, scale=1.0)
        o = o.to(x.dtype).transpose(1, 2).reshape(b, n, self.num_heads * self.d_kv)
        if residual.dtype != x.dtype:  # fp16 model, fp32 residual stream (see the module doc)
            return residual + self.o(o).float()
        y = self.o(o, residual=residual)
        return _clamp_fp16(y) if y.dtype == torch.float16 else y


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """transformers' fp16 guard: clamp to fp16's range (1000 inside it once an inf has appeared). The bound is a
    tensor, so no host sync (and the model still runs on meta tensors, as the memory table does)."""
    big = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), big - 1000.0, big).to(x.dtype)
    return x.clamp(-limit, limit)


def _norm(layer_norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """``layer_norm(x)``; an fp32 stream into an fp16 norm is normed in fp32 and then rounded to fp16."""
    w = layer_norm.weight
    if x.dtype == w.dtype:
        return layer_norm(x)
    return rms_norm(x, (x.shape[-1],), w.float(), layer_norm.eps).to(w.dtype)


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_relative_attention_bias)
        self.layer_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)

    def forward(self, x, bias):
        return self.SelfAttention(_norm(self.layer_norm, x), bias, residual=x)


def _ffn_out(wo: Linear, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + wo(h)``; in fp16, wo runs in fp32 and the stream is fp32 from here on (see the module doc)."""
    if h.dtype == torch.float16:
        return F.linear(h.float(), wo.weight.float()) + residual.float()
    return wo(h, residual=residual)


class T5DenseGatedActDense(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x, residual):
        return _ffn_out(self.wo, self.wi_0(x, activation="gelu_tanh") * self.wi_1(x), residual)


class T5DenseActDense(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi = Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x, residual):
        return _ffn_out(self.wo, F.relu(self.wi(x)), residual)


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        gated = cfg.feed_forward_proj == "gated-gelu"
        self.DenseReluDense = T5DenseGatedActDense(cfg) if gated else T5DenseActDense(cfg)
        self.layer_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)

    def forward(self, x):
        return self.DenseReluDense(_norm(self.layer_norm, x), residual=x)


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_relative_attention_bias), T5LayerFF(cfg)])

    def forward(self, x, bias):
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    def __init__(self, cfg: T5Config, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.block = nn.ModuleList([T5Block(cfg, i == 0) for i in range(cfg.num_layers)])
        self.final_layer_norm = RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)


class T5EncoderModel(nn.Module):
    """``model(input_ids, attention_mask=None)`` -> last_hidden_state (batch, tokens, d_model)."""

    def __init__(self, cfg: T5Config = T5_XXL):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg, self.shared)  # tied: the same module under both names

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.final_layer_norm.weight.dtype

    def position_bias(self, n: int, device=None) -> torch.Tensor:
        """(1, heads, n, n) fp32 relative position bias of block 0 (query i, key j)."""
        emb = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
        device = emb.weight.device if device is None else device
        pos = torch.arange(n, device=device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.config.relative_attention_num_buckets,
                                           self.config.relative_attention_max_distance)
        return emb.weight.float()[buckets].permute(2, 0, 1).unsqueeze(0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or \
                input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            got = f"{tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) \
                else type(input_ids).__name__
            raise ValueError(f"input_ids must be an integer (batch, tokens) tensor, got {got}")
        b, n = input_ids.shape
        x = self.shared(input_ids)
        bias = self.position_bias(n, x.device)
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (b, n):
                raise ValueError(f"attention_mask must have the shape of input_ids {(b, n)}, got "
                                 f"{tuple(attention_mask.shape)}")
            # padded keys get finfo.min added, as transformers does (a row with every key padded then
            # averages all values instead of producing NaN)
            keep = attention_mask.to(device=x.device, dtype=torch.bool)[:, None, None, :]
            bias = bias.masked_fill(~keep, torch.finfo(torch.float32).min)
        for block in self.encoder.block:
            x = block(x, bias)
        return _norm(self.encoder.final_layer_norm, x)
