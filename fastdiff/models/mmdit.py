"""The MMDiT of Stable Diffusion 3 / 3.5 (rectified-flow latent transformer with joint text-image attention).

Attribute paths equal diffusers' ``SD3Transformer2DModel`` keys (``pos_embed.proj``, ``pos_embed.pos_embed``,
``time_text_embed.timestep_embedder.linear_1``, ``transformer_blocks.3.attn.add_q_proj``,
``transformer_blocks.0.attn2.norm_q``, ``norm_out.linear``, ``proj_out``, ...), so a diffusers ``transformer/``
folder loads by a strict copy; the original ``model.diffusion_model.joint_blocks.*`` names (fused qkv, ...) are
mapped in :mod:`fastdiff.io.sd3_checkpoint`.

The network (D = heads * 64; SD3-medium: 24 blocks, D 1536):

    x (B, C, H, W) -> 2x2 patches -> linear (the conv ``pos_embed.proj``) + cropped 2-D sin-cos table
        = image tokens (B, N = HW/4, D)
    text (B, L, 4096) -> context_embedder = text tokens (B, L, D)
    c = SiLU(timestep_embedder(sinusoidal(t, 256)) + text_embedder(pooled (B, 2048)))     one vector per sample
    block i (adaLN-Zero on both streams, one joint attention):
        x_m = LN(x) (1 + scale) + shift, ctx_m likewise with the context's own modulation
        [x_a; ctx_a] = attention([q_x; q_ctx], [k_x; k_ctx], [v_x; v_ctx])   (concat along tokens, one softmax)
        x += gate * to_out(x_a);   ctx += gate_c * to_add_out(ctx_a)
        SD3.5 MMDiT-X blocks (``dual_attention_layers``): x += gate2 * attn2(LN(x_in)(1 + scale2) + shift2),
            a second self-attention on the image tokens only (its own modulation, same input LN)
        x += gate_mlp * ff(LN(x)(1 + scale_mlp) + shift_mlp)   (GELU-tanh MLP, 4 D), ctx likewise
        the last block is "context pre-only": its text stream is used as keys/values and then dropped (no
        to_add_out, no ff_context, and a (scale, shift) continuous adaLN instead of adaLN-Zero)
    -> LN(x)(1 + scale) + shift (norm_out) -> proj_out -> unpatchify (B, out_channels, H, W)

SD3.5 adds RMSNorm over each head's q and k (``qk_norm="rms_norm"``: norm_q, norm_k, norm_added_q,
norm_added_k, eps 1e-6). The fused fastdiff ops do the elementwise work: ``layer_norm_modulate`` (LN without
affine, eps 1e-6, plus the modulation, one pass), ``gate_residual``, ``rms_norm``, Linear with the GELU-tanh /
bias / residual fused into the matmul's output write, and one ``attention`` call per block.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.models.blocks import TimestepEmbedding
from fastdiff.ops import Linear, RMSNorm, attention, gate_residual, layer_norm_modulate, linear, timestep_embedding

__all__ = ["MMDiTConfig", "MMDiT", "SD3_MEDIUM", "SD35_MEDIUM", "SD35_LARGE", "TINY", "PRESETS",
           "sincos_pos_embed_2d"]

_LN_EPS = 1e-6      # every LayerNorm of the MMDiT (no affine) and the q/k RMSNorms
_TIME_CHANNELS = 256  # diffusers' Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
_QK_NORMS = (None, "rms_norm")


@dataclass(frozen=True)
class MMDiTConfig:
    """The fields of diffusers' ``SD3Transformer2DModel`` config.json (defaults: SD3-medium)."""

    sample_size: int = 128          # latent side the model was trained at: sets the pos-embed grid spacing
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 24
    attention_head_dim: int = 64
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096  # width of the text encoders' token features (T5-XXL / padded CLIP)
    caption_projection_dim: int = 1536  # context_embedder output; the blocks need it equal to the hidden size
    pooled_projection_dim: int = 2048   # CLIP-L + CLIP-G pooled features
    out_channels: int = 16
    pos_embed_max_size: int = 192   # side of the (square) positional table, in patches
    dual_attention_layers: tuple[int, ...] = ()  # SD3.5 MMDiT-X blocks with the image-only attn2
    qk_norm: str | None = None      # None (SD3) or "rms_norm" (SD3.5)

    def __post_init__(self):
        object.__setattr__(self, "dual_attention_layers", tuple(sorted(int(i) for i in self.dual_attention_layers)))
        for f in ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                  "num_attention_heads", "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim",
                  "out_channels", "pos_embed_max_size"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"MMDiTConfig.{f} must be a positive integer, got {v!r}")
        if self.qk_norm not in _QK_NORMS:
            raise ValueError(f"MMDiTConfig.qk_norm must be one of {_QK_NORMS}, got {self.qk_norm!r}")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad or len(set(self.dual_attention_layers)) != len(self.dual_attention_layers):
            raise ValueError(f"dual_attention_layers {self.dual_attention_layers} must be distinct block indices "
                             f"in [0, {self.num_layers})")
        if self.caption_projection_dim != self.hidden_size:
            # diffusers builds such a model and fails in the first block's add_k_proj: refuse it up front
            raise ValueError(f"caption_projection_dim {self.caption_projection_dim} must equal num_attention_heads x "
                             f"attention_head_dim = {self.hidden_size} (the text tokens join the image tokens)")
        if self.hidden_size % 4:
            raise ValueError(f"hidden size {self.hidden_size} must be a multiple of 4 (2-D sin-cos embedding)")

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "MMDiTConfig":
        """From an ``SD3Transformer2DModel`` config.json dict (missing keys take diffusers' defaults)."""
        cls_name = cfg.get("_class_name", "SD3Transformer2DModel")
        if cls_name != "SD3Transformer2DModel":
            raise ValueError(f"not an SD3 transformer config: _class_name {cls_name!r}")
        defaults = {  # SD3Transformer2DModel.__init__'s defaults, for configs that leave a key out
            "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 18, "attention_head_dim": 64,
            "num_attention_heads": 18, "joint_attention_dim": 4096, "caption_projection_dim": 1152,
            "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 96,
            "dual_attention_layers": (), "qk_norm": None,
        }
        unknown = sorted(k for k in cfg if not k.startswith("_") and k not in defaults)
        if unknown:
            raise ValueError(f"unsupported SD3Transformer2DModel config keys: {', '.join(unknown)}")
        kw = {k: cfg.get(k, d) for k, d in defaults.items()}
        if kw["out_channels"] is None:  # diffusers: out_channels None means in_channels
            kw["out_channels"] = kw["in_channels"]
        if kw["pos_embed_max_size"] is None:
            raise ValueError("pos_embed_max_size=None (an uncropped, interpolated position table) is not supported; "
                             "every SD3/SD3.5 release sets it")
        kw["dual_attention_layers"] = tuple(kw["dual_attention_layers"] or ())
        return cls(**kw)

    def to_diffusers(self) -> dict:
        d = {"_class_name": "SD3Transformer2DModel"}
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        d["dual_attention_layers"] = list(self.dual_attention_layers)
        return d


# The published transformer/config.json of each release (stabilityai/stable-diffusion-3-medium-diffusers,
# stable-diffusion-3.5-medium, stable-diffusion-3.5-large).
SD3_MEDIUM = MMDiTConfig()
SD35_MEDIUM = MMDiTConfig(pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD35_LARGE = MMDiTConfig(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, qk_norm="rms_norm")
# Every feature at test size: qk norm, one MMDiT-X block, the pre-only last block, a crop of a 24x24 table.
TINY = MMDiTConfig(sample_size=32, in_channels=4, num_layers=3, num_attention_heads=2, joint_attention_dim=48,
                   caption_projection_dim=128, pooled_projection_dim=40, out_channels=4, pos_embed_max_size=24,
                   dual_attention_layers=(0,), qk_norm="rms_norm")
PRESETS = {"sd3_medium": SD3_MEDIUM, "sd35_medium": SD35_MEDIUM, "sd35_large": SD35_LARGE, "tiny": TINY}


# ------------------------------------------------------------------------------------------------ embeddings
def sincos_pos_embed_2d(dim: int, grid: int, base_size: int, device=None) -> torch.Tensor:
    """The (grid*grid, dim) fp32 2-D sin-cos table of SD3 (diffusers' ``get_2d_sincos_pos_embed`` values).

    Position (row i, col j) is token i*grid + j; coordinates are scaled to ``p * base_size / grid`` so the
    table spans the trained size. Channels [0, dim/2) encode the column j, [dim/2, dim) the row i, each half
    as [sin(p w_k), cos(p w_k)] with w_k = 10000^(-k / (dim/4)). The 1-D tables are computed in float64 from
    the fp32 coordinates (as diffusers does, so the values are bit-identical) and then broadcast, instead of
    evaluating sin/cos on all grid*grid positions (1.8 GB of float64 for SD3.5's 384x384 table).
    """
    pos = torch.arange(grid, dtype=torch.float32, device=device) / (grid / base_size)
    quarter = dim // 4
    omega = torch.arange(quarter, dtype=torch.float64, device=device) / quarter
    omega = 1.0 / 10000 ** omega
    ang = torch.outer(pos.double(), omega)
    e = torch.cat([torch.sin(ang), torch.cos(ang)], dim=1).float()  # (grid, dim/2): row p encodes coordinate p
    cols = e[None, :, :].expand(grid, grid, dim // 2)  # [i, j] -> e[j]
    rows = e[:, None, :].expand(grid, grid, dim // 2)  # [i, j] -> e[i]
    return torch.cat([cols, rows], dim=-1).reshape(grid * grid, dim)


class PatchEmbed(nn.Module):
    """``proj`` (a p x p, stride-p conv, diffusers' parameter) + the centre crop of the ``pos_embed`` table.

    The conv is computed as one matmul over flattened patches, with the positional table added in the same
    output write (Linear's fused residual). ``pos_embed`` is a persistent buffer (1, max*max, D), as diffusers
    registers it when ``pos_embed_max_size`` is set, so it is part of the state dict and of the checkpoints.
    """

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.max_size = cfg.pos_embed_max_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        table = sincos_pos_embed_2d(cfg.hidden_size, cfg.pos_embed_max_size, cfg.sample_size // cfg.patch_size)
        self.register_buffer("pos_embed", table[None], persistent=True)

    def cropped_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """(1, h*w, D): the h x w window at the centre of the max x max table (rounded to the top-left)."""
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        table = self.pos_embed.view(1, self.max_size, self.max_size, -1)
        return table[:, top:top + h, left:left + w].reshape(1, h * w, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        p = self.patch_size
        h, w = hh // p, ww // p
        # (B, C, h, p, w, p) -> (B, h, w, C, p, p): each token's patch in the conv weight's (C, kh, kw) order
        patches = x.reshape(b, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * p * p)
        pos = self.cropped_pos_embed(h, w).to(x.dtype).expand(b, -1, -1)
        return linear(patches, self.proj.weight.view(self.proj.out_channels, -1), self.proj.bias, residual=pos)


class CombinedTimestepTextProjEmbeddings(nn.Module):
    """``timestep_embedder(sinusoidal(t, 256, cos first)) + text_embedder(pooled)``: the conditioning vector."""

    def __init__(self, dim: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(_TIME_CHANNELS, dim)
        self.text_embedder = TimestepEmbedding(pooled_dim, dim)

    def forward(self, t: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, _TIME_CHANNELS, flip_sin_to_cos=True, downscale_freq_shift=0)
        # the two sums are added as diffusers adds them (not fused into linear_2's residual) so the
        # rounding in bf16 is the same order of operations
        return self.timestep_embedder(freq.to(pooled.dtype)) + self.text_embedder(pooled)


# ------------------------------------------------------------------------------------------------ blocks
class AdaLNZero(nn.Module):
    """The ``linear`` of diffusers' AdaLayerNormZero (n = 6) / SD35AdaLayerNormZeroX (n = 9): c -> n vectors
    (shift, scale, gate, ...) in that order. The LayerNorm itself (no parameters) runs fused with the
    modulation in :func:`layer_norm_modulate` wherever a vector pair is used."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.linear = Linear(dim, n * dim)

    def forward(self, c_silu: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(c_silu).chunk(self.n, dim=1)


class AdaLNContinuous(nn.Module):
    """diffusers' AdaLayerNormContinuous(D, D, elementwise_affine=False, eps=1e-6): ``LN(x)(1 + scale) + shift``
    with the linear's output ordered (scale, shift) - the reverse of adaLN-Zero and of the original SD3 code,
    which is why the original checkpoints' halves are swapped at the io boundary."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, c_silu: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(c_silu.to(x.dtype)).chunk(2, dim=1)
        return layer_norm_modulate(x, shift, scale, eps=_LN_EPS)


class FeedForward(nn.Module):
    """``net.0.proj`` (D -> 4D, GELU-tanh fused into the matmul), ``net.1`` dropout slot, ``net.2`` (4D -> D)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        proj = nn.Module()
        proj.proj = Linear(dim, mult * dim)
        self.net = nn.ModuleList([proj, nn.Identity(), Linear(mult * dim, dim)])

    def forward(self, x):
        return self.net[2](self.net[0].proj(x, activation="gelu_tanh"))


def _qk_norm(cfg: MMDiTConfig) -> RMSNorm | None:
    return RMSNorm(cfg.attention_head_dim, eps=_LN_EPS) if cfg.qk_norm == "rms_norm" else None


class JointAttention(nn.Module):
    """One softmax over image and text tokens together (diffusers' Attention + JointAttnProcessor2_0).

    Image tokens: to_q/to_k/to_v, to_out.0; text tokens: add_q_proj/add_k_proj/add_v_proj, to_add_out (absent in
    the pre-only last block). Queries and keys of each stream get their own RMSNorm per head under SD3.5.
    """

    def __init__(self, cfg: MMDiTConfig, pre_only: bool):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.pre_only = pre_only
        self.norm_q, self.norm_k = _qk_norm(cfg), _qk_norm(cfg)
        self.to_q, self.to_k, self.to_v = Linear(d, d), Linear(d, d), Linear(d, d)
        self.add_k_proj, self.add_v_proj = Linear(d, d), Linear(d, d)
        # In the pre-only block the text outputs are dropped, so the text queries (add_q_proj, norm_added_q)
        # cannot change the result; they are kept so the state dict matches the checkpoints, but not computed.
        self.add_q_proj = Linear(d, d)
        self.to_out = nn.ModuleList([Linear(d, d)])
        self.to_add_out = None if pre_only else Linear(d, d)
        self.norm_added_q, self.norm_added_k = _qk_norm(cfg), _qk_norm(cfg)

    def _heads(self, t: torch.Tensor, norm: RMSNorm | None) -> torch.Tensor:
        """(B, L, D) -> (B, L, heads, head_dim), RMS-normalised per head when ``norm`` (contiguous: no copy)."""
        t = t.view(t.shape[0], t.shape[1], self.heads, -1)
        return norm(t) if norm is not None else t

    def forward(self, x: torch.Tensor, ctx: torch.Tensor):
        b, n, d = x.shape
        q = self._heads(self.to_q(x), self.norm_q)
        k = torch.cat([self._heads(self.to_k(x), self.norm_k), self._heads(self.add_k_proj(ctx), self.norm_added_k)], 1)
        v = torch.cat([self._heads(self.to_v(x), None), self._heads(self.add_v_proj(ctx), None)], 1)
        if not self.pre_only:  # image queries first, then text: the order of diffusers' concat
            q = torch.cat([q, self._heads(self.add_q_proj(ctx), self.norm_added_q)], 1)
        o = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, heads, Lq, head_dim)
        o = o.transpose(1, 2).reshape(b, q.shape[1], d)
        x_out = self.to_out[0](o[:, :n])
        return x_out, (None if self.pre_only else self.to_add_out(o[:, n:]))


class SelfAttention(nn.Module):
    """The MMDiT-X ``attn2``: plain self-attention on the image tokens (to_q/to_k/to_v, to_out.0, qk norm)."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.norm_q, self.norm_k = _qk_norm(cfg), _qk_norm(cfg)
        self.to_q, self.to_k, self.to_v = Linear(d, d), Linear(d, d), Linear(d, d)
        self.to_out = nn.ModuleList([Linear(d, d)])

    _heads = JointAttention._heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k = self._heads(self.to_q(x), self.norm_q), self._heads(self.to_k(x), self.norm_k)
        v = self._heads(self.to_v(x), None)
        o = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.to_out[0](o.transpose(1, 2).reshape(b, n, d))


class JointTransformerBlock(nn.Module):
    """One MMDiT block (diffusers' JointTransformerBlock names); see the module doc for the math."""

    def __init__(self, cfg: MMDiTConfig, index: int):
        super().__init__()
        d = cfg.hidden_size
        self.context_pre_only = index == cfg.num_layers - 1
        self.use_dual_attention = index in cfg.dual_attention_layers
        self.norm1 = AdaLNZero(d, 9 if self.use_dual_attention else 6)
        self.norm1_context = AdaLNContinuous(d) if self.context_pre_only else AdaLNZero(d, 6)
        self.attn = JointAttention(cfg, pre_only=self.context_pre_only)
        self.attn2 = SelfAttention(cfg) if self.use_dual_attention else None
        self.ff = FeedForward(d)
        self.ff_context = None if self.context_pre_only else FeedForward(d)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, c_silu: torch.Tensor):
        mod = self.norm1(c_silu)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod[:6]
        x_in = x
        x_m = layer_norm_modulate(x, shift_msa, scale_msa, eps=_LN_EPS)
        if self.context_pre_only:
            ctx_m = self.norm1_context(ctx, c_silu)
        else:
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(c_silu)
            ctx_m = layer_norm_modulate(ctx, c_shift_msa, c_scale_msa, eps=_LN_EPS)

        x_a, ctx_a = self.attn(x_m, ctx_m)
        x = gate_residual(x, gate_msa, x_a)
        if self.attn2 is not None:
            # MMDiT-X: the second attention reads the block's input, normalised once more with its own pair
            shift_msa2, scale_msa2, gate_msa2 = mod[6:]
            x = gate_residual(x, gate_msa2, self.attn2(layer_norm_modulate(x_in, shift_msa2, scale_msa2, eps=_LN_EPS)))
        x = gate_residual(x, gate_mlp, self.ff(layer_norm_modulate(x, shift_mlp, scale_mlp, eps=_LN_EPS)))

        if self.context_pre_only:
            return None, x
        ctx = gate_residual(ctx, c_gate_msa, ctx_a)
        ctx = gate_residual(ctx, c_gate_mlp, self.ff_context(layer_norm_modulate(ctx, c_shift_mlp, c_scale_mlp,
                                                                                 eps=_LN_EPS)))
        return ctx, x


# ------------------------------------------------------------------------------------------------ model
class MMDiT(nn.Module):
    """``mmdit(latents (B, C, H, W), timestep (B,) or scalar, text (B, L, joint_dim), pooled (B, pooled_dim))``
    -> the model output (B, out_channels, H, W) (SD3: the flow velocity)."""

    def __init__(self, cfg: MMDiTConfig = SD3_MEDIUM):
        super().__init__()
        self.config = cfg
        d = cfg.hidden_size
        self.pos_embed = PatchEmbed(cfg)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(d, cfg.pooled_projection_dim)
        self.context_embedder = Linear(cfg.joint_attention_dim, cfg.caption_projection_dim)
        self.transformer_blocks = nn.ModuleList([JointTransformerBlock(cfg, i) for i in range(cfg.num_layers)])
        self.norm_out = AdaLNContinuous(d)
        self.proj_out = Linear(d, cfg.patch_size * cfg.patch_size * cfg.out_channels)

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    def _check(self, x, t, ctx, pooled) -> torch.Tensor:
        cfg = self.config
        p, m = cfg.patch_size, cfg.pos_embed_max_size
        for name, v in (("hidden_states", x), ("encoder_hidden_states", ctx), ("pooled_projections", pooled)):
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"MMDiT: {name} must be a tensor, got {type(v).__name__}")
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"MMDiT expects latents (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        b, _, hh, ww = x.shape
        if hh % p or ww % p or hh == 0 or ww == 0:
            raise ValueError(f"MMDiT: latent height and width ({hh}x{ww}) must be positive multiples of the patch "
                             f"size {p}")
        if hh // p > m or ww // p > m:
            raise ValueError(f"MMDiT: latents of {hh}x{ww} are {hh // p}x{ww // p} patches, larger than the "
                             f"{m}x{m} positional table (at most {m * p}x{m * p} latents)")
        if ctx.dim() != 3 or ctx.shape[-1] != cfg.joint_attention_dim:
            raise ValueError(f"MMDiT expects text embeddings (B, L, {cfg.joint_attention_dim}), got {tuple(ctx.shape)}")
        if pooled.dim() != 2 or pooled.shape[-1] != cfg.pooled_projection_dim:
            raise ValueError(f"MMDiT expects pooled text embeddings (B, {cfg.pooled_projection_dim}), got "
                             f"{tuple(pooled.shape)}")
        if ctx.shape[0] != b or pooled.shape[0] != b:
            raise ValueError(f"MMDiT: batch sizes differ: latents {b}, text {ctx.shape[0]}, pooled {pooled.shape[0]}")
        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t[None]
        if t.dim() != 1 or t.shape[0] not in (1, b):
            raise ValueError(f"MMDiT: timestep must be a scalar or a (B,) = ({b},) tensor, got shape {tuple(t.shape)}")
        return t.expand(b)

    def forward(self, hidden_states: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor) -> torch.Tensor:
        t = self._check(hidden_states, timestep, encoder_hidden_states, pooled_projections)
        cfg, dt = self.config, self.dtype
        b, _, hh, ww = hidden_states.shape
        p = cfg.patch_size

        x = self.pos_embed(hidden_states.to(dt))
        # Every adaLN linear (each block's two, and norm_out's) reads SiLU(c): computed once here.
        c_silu = F.silu(self.time_text_embed(t, pooled_projections.to(dt)))
        ctx = self.context_embedder(encoder_hidden_states.to(dt))
        for blk in self.transformer_blocks:
            ctx, x = blk(x, ctx, c_silu)

        x = self.proj_out(self.norm_out(x, c_silu))  # (B, h*w, p*p*C_out), each token (p, q, c)
        h, w = hh // p, ww // p
        x = x.view(b, h, w, p, p, cfg.out_channels).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, q)
        return x.reshape(b, cfg.out_channels, hh, ww)
