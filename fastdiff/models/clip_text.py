"""CLIP text transformer (the text tower of CLIP ViT-L/14: SD1's text encoder).

Attribute paths equal the keys of transformers' ``CLIPTextModel`` as stored in SD1 files
(``text_model.embeddings.token_embedding.weight``, ``text_model.encoder.layers.0.self_attn.q_proj.weight``,
..., ``text_model.final_layer_norm.bias``), so a diffusers ``text_encoder/`` or the
``cond_stage_model.transformer.*`` part of an original checkpoint loads by a strict copy.

The network: token + learned position embeddings, ``num_layers`` pre-norm blocks

    x = x + out_proj(causal_self_attention(layer_norm1(x)))
    x = x + fc2(act(fc1(layer_norm2(x))))          act = quick-GELU: z * sigmoid(1.702 z)

and a final layer norm. ``clip_skip = k`` stops k blocks early (the output of block L-k, then the final layer
norm), as diffusers' pipelines and A1111 define it; SD1 users set k=1 for some fine-tunes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.ops import LayerNorm, Linear, attention

__all__ = ["CLIPTextConfig", "CLIPTextTransformer", "CLIPTextModel", "CLIP_L14", "CLIP_L14_PROJ", "CLIP_BIGG14", "SD15",
           "TINY", "SMALL", "PRESETS"]


@dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"  # "gelu" for OpenCLIP towers (SD2, SD3's CLIP-G)
    eos_token_id: int = 49407  # the pooled output is taken at the first eos
    projection_dim: int | None = None  # CLIPTextModelWithProjection's text_projection width (SD3), else None

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"hidden_act must be 'quick_gelu' or 'gelu', got {self.hidden_act!r}")

    @classmethod
    def from_transformers(cls, cfg: dict) -> "CLIPTextConfig":
        """From a transformers ``CLIPTextConfig`` config.json dict."""
        if cfg.get("hidden_act", "quick_gelu") not in ("quick_gelu", "gelu"):
            raise ValueError(f"unsupported CLIP activation {cfg.get('hidden_act')!r}")
        return cls(vocab_size=cfg.get("vocab_size", 49408), hidden_size=cfg.get("hidden_size", 512),
                   num_layers=cfg.get("num_hidden_layers", 12), num_heads=cfg.get("num_attention_heads", 8),
                   intermediate_size=cfg.get("intermediate_size", 2048),
                   max_position_embeddings=cfg.get("max_position_embeddings", 77),
                   layer_norm_eps=cfg.get("layer_norm_eps", 1e-5), hidden_act=cfg.get("hidden_act", "quick_gelu"),
                   eos_token_id=cfg.get("eos_token_id", 49407),
                   projection_dim=(cfg.get("projection_dim", 768) if "WithProjection" in
                                   "".join(cfg.get("architectures") or ()) else None))

    def to_transformers(self) -> dict:
        """config.json dict for transformers' ``CLIPTextModel``."""
        arch = "CLIPTextModelWithProjection" if self.projection_dim else "CLIPTextModel"
        return {"architectures": [arch], "model_type": "clip_text_model", "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads, "intermediate_size": self.intermediate_size,
                "max_position_embeddings": self.max_position_embeddings, "layer_norm_eps": self.layer_norm_eps,
                "hidden_act": self.hidden_act, "bos_token_id": 49406, "eos_token_id": self.eos_token_id,
                "pad_token_id": 1, "projection_dim": self.projection_dim or self.hidden_size, "torch_dtype": "float32"}


CLIP_L14 = CLIPTextConfig()
SD15 = CLIP_L14
# Small test tower; the real vocabulary size, so real tokenizer ids are valid inputs.
TINY = CLIPTextConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=37)
# SD3's towers (text_encoder/ and text_encoder_2/ of the diffusers folders)
CLIP_L14_PROJ = CLIPTextConfig(projection_dim=768)
CLIP_BIGG14 = CLIPTextConfig(hidden_size=1280, num_layers=32, num_heads=20, intermediate_size=5120, hidden_act="gelu",
                             projection_dim=1280)
# A small tower to train from scratch with a small SD-layout UNet (fastdiff.train, conditioning="text").
SMALL = CLIPTextConfig(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512)
PRESETS = {"sd15": SD15, "clip_l14": CLIP_L14, "clip_l14_proj": CLIP_L14_PROJ, "clip_bigg14": CLIP_BIGG14,
           "tiny": TINY, "small": SMALL}


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[-1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:n]


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj = Linear(d, d)
        self.k_proj = Linear(d, d)
        self.v_proj = Linear(d, d)
        self.out_proj = Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + out_proj(attention(x))``, the add fused into the output projection."""
        b, n, d = x.shape

        def heads(t):
            return t.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

        o = attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)), mask)
        return self.out_proj(o.transpose(1, 2).reshape(b, n, d), residual=residual)


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.quick = cfg.hidden_act == "quick_gelu"
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x, residual):
        if self.quick:
            h = self.fc1(x)
            h = h * torch.sigmoid(1.702 * h)
        else:
            h = self.fc1(x, activation="gelu")
        return self.fc2(h, residual=residual)


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x, mask):
        x = self.self_attn(self.layer_norm1(x), mask, residual=x)
        return self.mlp(self.layer_norm2(x), residual=x)


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg) for _ in range(cfg.num_layers)])


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """``model(input_ids)`` -> (batch, tokens, hidden) text embeddings (what the SD1 UNet cross-attends to)."""

    def __init__(self, cfg: CLIPTextConfig = SD15):
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)
        if cfg.projection_dim:
            self.text_projection = Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.text_model.final_layer_norm.weight.dtype

    @staticmethod
    def _mask(attention_mask: torch.Tensor | None, n: int, device) -> torch.Tensor:
        """Bool mask (True = attend): causal (n, n), and with ``attention_mask`` (B, n) padded keys dropped."""
        causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()  # True: j <= i may be attended
        if attention_mask is None:
            return causal
        return causal[None, None] & attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]

    def _run(self, input_ids, attention_mask, stop: int, keep: int | None = None):
        """Embeddings through the first ``stop`` blocks; also the output of block ``keep`` (0 = embeddings)."""
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"input_ids must be an integer (batch, tokens) tensor, got {tuple(input_ids.shape)} "
                             f"{input_ids.dtype}")
        n = input_ids.shape[1]
        if n > self.config.max_position_embeddings:
            raise ValueError(f"{n} tokens exceed the {self.config.max_position_embeddings} positions of this encoder")
        tm = self.text_model
        x = tm.embeddings(input_ids)
        mask = self._mask(attention_mask, n, x.device)
        kept = x if keep == 0 else None
        for i, layer in enumerate(tm.encoder.layers[:stop]):
            x = layer(x, mask)
            if keep == i + 1:
                kept = x
        return x, kept

    def _pooled(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The final-normed state at the eos token. Configs with eos_token_id 2 (the hub's CLIP configs of SD3 and
        older ones) take the position of the largest id, as transformers does for them: that is the first
        <|endoftext|> (49407, the largest id) of a CLIP-tokenized prompt."""
        if self.config.eos_token_id == 2:
            eos = input_ids.to(torch.int).argmax(dim=-1)
        else:
            eos = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)
        return x[torch.arange(x.shape[0], device=x.device), eos]

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
               clip_skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(last hidden state after the final layer norm, pooled output at the first eos token)."""
        if not 0 <= clip_skip < self.config.num_layers:
            raise ValueError(f"clip_skip must be in [0, {self.config.num_layers}), got {clip_skip}")
        x, _ = self._run(input_ids, attention_mask, self.config.num_layers - clip_skip)
        x = self.text_model.final_layer_norm(x)
        return x, self._pooled(x, input_ids)

    def encode_sd3(self, input_ids: torch.Tensor, *, clip_skip: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """What SD3 takes from a CLIP tower: (the output of block ``L - 1 - clip_skip``, without the final layer
        norm: transformers' ``hidden_states[-(clip_skip + 2)]``; the projected pooled output ``text_embeds``)."""
        L = self.config.num_layers
        if not 0 <= clip_skip < L:
            raise ValueError(f"clip_skip must be in [0, {L}), got {clip_skip}")
        if not self.config.projection_dim:
            raise ValueError("encode_sd3 needs a CLIP tower with text_projection (CLIPTextModelWithProjection)")
        x, hidden = self._run(input_ids, None, L, keep=L - 1 - clip_skip)
        pooled = self._pooled(self.text_model.final_layer_norm(x), input_ids)
        return hidden, self.text_projection(pooled)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                clip_skip: int = 0) -> torch.Tensor:
        return self.encode(input_ids, attention_mask, clip_skip=clip_skip)[0]
