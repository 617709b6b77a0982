"""The Stable Diffusion 1.x UNet (latent eps-prediction with text cross-attention).

Attribute paths equal diffusers' ``UNet2DConditionModel`` keys (``conv_in``, ``time_embedding.linear_1``,
``down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k``, ``up_blocks.3.resnets.2.conv_shortcut``, ...),
so a diffusers ``unet/`` folder loads by a strict copy; the original ``model.diffusion_model.*`` names
(``input_blocks.1.0.in_layers.0``, ...) are mapped in :mod:`fastdiff.io.sd_checkpoint`.

The network (SD1: channels c = 320/640/1280/1280, 8 heads, context 768):

    t -> sinusoidal(c0, cos first) -> linear -> SiLU -> linear = temb (4 c0)
    x -> conv_in -> down level i: layers_per_block x (ResBlock(temb) [-> Transformer(context)]) -> stride-2 conv
      -> mid: ResBlock, Transformer, ResBlock
      -> up level i: (layers_per_block + 1) x (concat skip -> ResBlock [-> Transformer]) -> 2x nearest + conv
      -> GroupNorm -> SiLU -> conv_out

    Transformer(x, ctx): GroupNorm -> proj_in (1x1 conv) -> tokens (B, HW, C) ->
        x += attn1(norm1(x))             self-attention
        x += attn2(norm2(x), ctx)        cross-attention to the text embeddings
        x += ff(norm3(x))                net.2(GEGLU(net.0.proj(.))), inner width 4 C
      -> proj_out (1x1 conv) -> + input
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.models.blocks import ResBlock, TimestepEmbedding, apply_group_norm
from fastdiff.ops import Conv2d, LayerNorm, Linear, attention, geglu, timestep_embedding

__all__ = ["UNetSDConfig", "UNetSD", "SD15", "SD15_INPAINT", "TINY", "FASHION_TINY_SD", "PRESETS"]

_DOWN = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


@dataclass(frozen=True)
class UNetSDConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    # Which down levels carry transformers (the up levels mirror them); the mid block always has one.
    cross_attention: tuple[bool, ...] = (True, True, True, False)
    layers_per_block: int = 2
    num_heads: int = 8  # per transformer; head_dim = channels / num_heads (diffusers' SD1 "attention_head_dim": 8)
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False  # SD1: 1x1 conv proj_in/proj_out
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    sample_size: int = 64

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        object.__setattr__(self, "cross_attention", tuple(bool(a) for a in self.cross_attention))
        if len(self.cross_attention) != len(self.block_out_channels):
            raise ValueError("cross_attention needs one flag per entry of block_out_channels")
        for c in self.block_out_channels:
            if c % self.norm_num_groups or c % self.num_heads:
                raise ValueError(f"channels {c} must be multiples of norm_num_groups {self.norm_num_groups} "
                                 f"and num_heads {self.num_heads}")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "UNetSDConfig":
        """From a ``UNet2DConditionModel`` config.json dict; raises for features SD1 does not have."""
        down = tuple(cfg.get("down_block_types", ()))
        up = tuple(cfg.get("up_block_types", ()))
        if not down or any(t not in _DOWN for t in down) or any(t not in _UP for t in up):
            raise ValueError(f"unsupported UNet block types {down} / {up}")
        attn = tuple(_DOWN[t] for t in down)
        if tuple(_UP[t] for t in reversed(up)) != attn:
            raise ValueError(f"up_block_types {up} do not mirror down_block_types {down}")
        mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        if mid != "UNetMidBlock2DCrossAttn":
            raise ValueError(f"unsupported mid_block_type {mid!r}")
        unsupported = {
            "class_embed_type": None, "addition_embed_type": None, "encoder_hid_dim": None,
            "time_cond_proj_dim": None, "num_class_embeds": None, "dual_cross_attention": False,
            "only_cross_attention": False, "center_input_sample": False, "resnet_time_scale_shift": "default",
            "time_embedding_type": "positional", "act_fn": "silu", "conv_in_kernel": 3, "conv_out_kernel": 3,
            "transformer_layers_per_block": 1, "class_embeddings_concat": False, "attention_type": "default",
        }
        for key, ok in unsupported.items():
            if cfg.get(key, ok) != ok:
                raise ValueError(f"unsupported UNet config {key}={cfg[key]!r} (SD1 has {ok!r}): "
                                 "this is not an SD1-style UNet (SDXL and SD2 variants are not supported here)")
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        if isinstance(heads, (list, tuple)):
            if len(set(heads)) != 1:
                raise ValueError(f"per-block head counts {heads} are not supported (SD2 style)")
            heads = heads[0]
        cad = cfg.get("cross_attention_dim", 1280)
        if isinstance(cad, (list, tuple)):
            cad = cad[0]
        return cls(in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4),
                   block_out_channels=tuple(cfg["block_out_channels"]), cross_attention=attn,
                   layers_per_block=cfg.get("layers_per_block", 2), num_heads=int(heads), cross_attention_dim=cad,
                   norm_num_groups=cfg.get("norm_num_groups", 32), norm_eps=cfg.get("norm_eps", 1e-5),
                   use_linear_projection=cfg.get("use_linear_projection", False),
                   flip_sin_to_cos=cfg.get("flip_sin_to_cos", True), freq_shift=cfg.get("freq_shift", 0),
                   sample_size=cfg.get("sample_size", 64))

    def to_diffusers(self) -> dict:
        return {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "in_channels": self.in_channels,
                "out_channels": self.out_channels, "block_out_channels": list(self.block_out_channels),
                "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.cross_attention],
                "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.cross_attention)],
                "mid_block_type": "UNetMidBlock2DCrossAttn", "layers_per_block": self.layers_per_block,
                "attention_head_dim": self.num_heads, "cross_attention_dim": self.cross_attention_dim,
                "norm_num_groups": self.norm_num_groups, "norm_eps": self.norm_eps,
                "use_linear_projection": self.use_linear_projection, "flip_sin_to_cos": self.flip_sin_to_cos,
                "freq_shift": self.freq_shift, "sample_size": self.sample_size, "center_input_sample": False,
                "downsample_padding": 1, "mid_block_scale_factor": 1}


SD15 = UNetSDConfig()
SD15_INPAINT = UNetSDConfig(in_channels=9)  # latents + mask + masked-image latents
TINY = UNetSDConfig(block_out_channels=(32, 64), cross_attention=(True, False), layers_per_block=2, num_heads=2,
                    cross_attention_dim=32, norm_num_groups=8, sample_size=16)
# SD1 layout at small size for 8x8x4 latents (a 32x32 image through an f4 autoencoder) and a 128-wide text
# encoder (fastdiff.models.clip_text.SMALL): levels 8x8 and 4x4 with cross-attention, 2x2 without, as SD1's last.
FASHION_TINY_SD = UNetSDConfig(block_out_channels=(64, 128, 128), cross_attention=(True, True, False),
                               layers_per_block=2, num_heads=4, cross_attention_dim=128, norm_num_groups=32,
                               sample_size=8)
PRESETS = {"sd15": SD15, "sd15_inpaint": SD15_INPAINT, "tiny": TINY, "fashion_tiny_sd": FASHION_TINY_SD}


def ResnetBlock2D(cin: int, cout: int, temb: int, groups: int, eps: float) -> ResBlock:
    """GroupNorm+SiLU -> conv1 -> + time_emb_proj(SiLU(temb)) -> GroupNorm+SiLU -> conv2, + (1x1) shortcut:
    fastdiff's fused ResBlock (diffusers' ResnetBlock2D names)."""
    return ResBlock(cin, cout, temb_channels=temb, groups=groups, eps=eps)


class Attention(nn.Module):
    """Multi-head attention: to_q/to_k/to_v without bias, to_out.0 with bias (diffusers ``Attention``)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = Linear(dim, dim, bias=False)
        self.to_k = Linear(context_dim or dim, dim, bias=False)
        self.to_v = Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([Linear(dim, dim)])

    def forward(self, x, context=None, residual=None):
        """``residual + to_out(attention(x, context))``, the add fused into the output projection."""
        ctx = x if context is None else context
        b, n, d = x.shape
        h = self.heads

        def split(t):
            return t.view(b, t.shape[1], h, d // h).transpose(1, 2)

        o = attention(split(self.to_q(x)), split(self.to_k(ctx)), split(self.to_v(ctx)))
        return self.to_out[0](o.transpose(1, 2).reshape(b, n, d), residual=residual)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = Linear(dim, 2 * inner)

    def forward(self, x):
        return geglu(self.proj(x))


class FeedForward(nn.Module):
    """``net.0`` = GEGLU projection, ``net.1`` = dropout slot (identity at inference), ``net.2`` = output linear."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Identity(), Linear(mult * dim, dim)])

    def forward(self, x, residual=None):
        return self.net[2](self.net[0](x), residual=residual)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        x = self.attn1(self.norm1(x), residual=x)
        x = self.attn2(self.norm2(x), context, residual=x)
        return self.ff(self.norm3(x), residual=x)


class Transformer2D(nn.Module):
    def __init__(self, channels: int, heads: int, context_dim: int, groups: int, linear_proj: bool):
        super().__init__()
        self.linear_proj = linear_proj
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        proj = (lambda: Linear(channels, channels)) if linear_proj else (lambda: Conv2d(channels, channels, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, heads, context_dim)])
        self.proj_out = proj()

    def forward(self, x, context):
        b, c, h, w = x.shape
        y = apply_group_norm(x, self.norm)
        if self.linear_proj:
            y = self.proj_in(y.flatten(2).transpose(1, 2))
        else:
            y = self.proj_in(y).flatten(2).transpose(1, 2)
        for blk in self.transformer_blocks:
            y = blk(y, context)
        if self.linear_proj:
            return self.proj_out(y).transpose(1, 2).reshape(b, c, h, w) + x
        return self.proj_out(y.transpose(1, 2).reshape(b, c, h, w), residual=x)


class Downsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size):
        # nearest to the skip's size: 2x when the latent size divides evenly, else diffusers' upsample_size
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, cin, cout, cfg: UNetSDConfig, attn: bool, down: bool):
        super().__init__()
        g, e, te = cfg.norm_num_groups, cfg.norm_eps, cfg.time_embed_dim
        n = cfg.layers_per_block
        self.resnets = nn.ModuleList([ResnetBlock2D(cin if i == 0 else cout, cout, te, g, e) for i in range(n)])
        self.attentions = nn.ModuleList([
            Transformer2D(cout, cfg.num_heads, cfg.cross_attention_dim, g, cfg.use_linear_projection)
            for _ in range(n)]) if attn else None
        self.downsamplers = nn.ModuleList([Downsample2D(cout)]) if down else None

    def forward(self, x, temb, context, skips: list):
        for i, r in enumerate(self.resnets):
            x = r(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x


class UpBlock(nn.Module):
    def __init__(self, cprev, cout, cskip_last, cfg: UNetSDConfig, attn: bool, up: bool):
        super().__init__()
        g, e, te = cfg.norm_num_groups, cfg.norm_eps, cfg.time_embed_dim
        n = cfg.layers_per_block + 1
        self.resnets = nn.ModuleList([
            ResnetBlock2D((cprev if i == 0 else cout) + (cskip_last if i == n - 1 else cout), cout, te, g, e)
            for i in range(n)])
        self.attentions = nn.ModuleList([
            Transformer2D(cout, cfg.num_heads, cfg.cross_attention_dim, g, cfg.use_linear_projection)
            for _ in range(n)]) if attn else None
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if up else None

    def forward(self, x, temb, context, skips: list):
        for i, r in enumerate(self.resnets):
            x = r(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, skips[-1].shape[-2:])
        return x


class MidBlock(nn.Module):
    def __init__(self, c, cfg: UNetSDConfig):
        super().__init__()
        g, e, te = cfg.norm_num_groups, cfg.norm_eps, cfg.time_embed_dim
        self.resnets = nn.ModuleList([ResnetBlock2D(c, c, te, g, e) for _ in range(2)])
        self.attentions = nn.ModuleList([
            Transformer2D(c, cfg.num_heads, cfg.cross_attention_dim, g, cfg.use_linear_projection)])

    def forward(self, x, temb, context):
        return self.resnets[1](self.attentions[0](self.resnets[0](x, temb), context), temb)


def _broadcasts_to(r: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether ``x + r`` has ``x``'s shape (a residual may be spatially pooled: (B, C, 1, 1))."""
    try:
        return torch.broadcast_shapes(r.shape, x.shape) == x.shape
    except RuntimeError:
        return False


class UNetSD(nn.Module):
    """``unet(latents (B,C,h,w), timesteps (B,) or scalar, context (B,T,cross_attention_dim))`` -> model output."""

    def __init__(self, cfg: UNetSDConfig = SD15):
        super().__init__()
        self.config = cfg
        ch = cfg.block_out_channels
        n = len(ch)
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim)
        self.down_blocks = nn.ModuleList([
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg, cfg.cross_attention[i], down=i < n - 1) for i in range(n)])
        self.mid_block = MidBlock(ch[-1], cfg)
        rch, rattn = tuple(reversed(ch)), tuple(reversed(cfg.cross_attention))
        self.up_blocks = nn.ModuleList([
            UpBlock(rch[max(i - 1, 0)], rch[i], rch[min(i + 1, n - 1)], cfg, rattn[i], up=i < n - 1)
            for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                down_block_additional_residuals: list[torch.Tensor] | tuple[torch.Tensor, ...] | None = None,
                mid_block_additional_residual: torch.Tensor | None = None) -> torch.Tensor:
        """The model output. ``down_block_additional_residuals`` (one per skip connection: conv_in's output, every
        down layer and downsampler, in that order) and ``mid_block_additional_residual`` are added to the skips
        and to the mid block's output, as a ControlNet's outputs are (:mod:`fastdiff.models.controlnet`)."""
        cfg = self.config
        if sample.dim() != 4 or sample.shape[1] != cfg.in_channels:
            raise ValueError(f"UNet expects latents (B, {cfg.in_channels}, h, w), got {tuple(sample.shape)}")
        if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[-1] != cfg.cross_attention_dim:
            raise ValueError(f"UNet expects text embeddings (B, T, {cfg.cross_attention_dim}), "
                             f"got {tuple(encoder_hidden_states.shape)}")
        b = sample.shape[0]
        if encoder_hidden_states.shape[0] != b:
            raise ValueError(f"batch of latents ({b}) and text embeddings ({encoder_hidden_states.shape[0]}) differ")
        t = torch.as_tensor(timestep, device=sample.device)
        if t.dim() == 0:
            t = t[None]
        if t.dim() != 1 or t.shape[0] not in (1, b):
            raise ValueError(f"timestep must be a scalar or a (B,) tensor, got shape {tuple(t.shape)}")
        t = t.expand(b)
        temb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = self.time_embedding(temb.to(self.dtype))
        context = encoder_hidden_states.to(self.dtype)

        x = self.conv_in(sample.to(self.dtype))
        skips = [x]
        for blk in self.down_blocks:
            x = blk(x, temb, context, skips)
        if down_block_additional_residuals is not None:
            res = list(down_block_additional_residuals)
            if len(res) != len(skips) or any(not _broadcasts_to(r, s) for r, s in zip(res, skips)):
                raise ValueError(f"down_block_additional_residuals must be {len(skips)} tensors broadcasting to "
                                 f"{[tuple(s.shape) for s in skips]}, got {[tuple(r.shape) for r in res]}")
            skips = [s + r.to(s.dtype) for s, r in zip(skips, res)]
        x = self.mid_block(x, temb, context)
        if mid_block_additional_residual is not None:
            if not _broadcasts_to(mid_block_additional_residual, x):
                raise ValueError(f"mid_block_additional_residual must broadcast to {tuple(x.shape)}, "
                                 f"got {tuple(mid_block_additional_residual.shape)}")
            x = x + mid_block_additional_residual.to(x.dtype)
        for blk in self.up_blocks:
            x = blk(x, temb, context, skips)
        return self.conv_out(apply_group_norm(x, self.conv_norm_out, silu=True))
