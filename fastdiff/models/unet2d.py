"""Pixel-space UNet of Ho et al. (DDPM), laid out like diffusers' ``UNet2DModel``.

Every attribute path equals the diffusers ``state_dict`` key (``conv_in``, ``time_embedding.linear_1``,
``down_blocks.1.attentions.0.to_q``, ...), so a diffusers folder loads by a strict copy
(:mod:`fastdiff.io.diffusers_unet2d`) and a fastdiff checkpoint loads back into diffusers.

The network, for resolution levels i = 0..L-1 with channels c_i:

    x -> conv_in -> [down level i: layers_per_block x (ResBlock [+ self-attention]) -> stride-2 conv]
      -> mid (ResBlock, self-attention, ResBlock)
      -> [up level i: (layers_per_block + 1) x (concat skip -> ResBlock [+ self-attention]) -> 2x nearest + conv]
      -> GroupNorm -> SiLU -> conv_out

Time t enters every ResBlock through a sinusoidal embedding and a 2-layer MLP; a class label (optional) adds
a learned embedding to it. With ``null_class=True`` the last class index (``num_classes``) is the "no label"
class used for classifier-free guidance (trained by class dropout, see :mod:`fastdiff.train`).

Fused ops: the ResBlocks are :class:`fastdiff.models.blocks.ResBlock` (GroupNorm + SiLU in one pass, the time
term and the skip fused into the convolutions as oneDNN post-ops), attention runs :func:`fastdiff.ops.attention`
with the residual fused into its output projection, and every convolution and linear layer is fastdiff's
(:class:`~fastdiff.ops.Conv2d`, :class:`~fastdiff.ops.Linear`: under bf16 autocast they compute in the dtype
that is fastest on this CPU, see :mod:`fastdiff.ops._onednn`). Activations are channels_last throughout.
Speed vs diffusers' UNet2DModel on the same weights: benchmarks/bench_unet2d.py.
``fastdiff.ops.use_backend("ref")`` runs the same model on the pure-PyTorch references.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastdiff.models.blocks import ResBlock, TimestepEmbedding, Upsample2D, apply_group_norm
from fastdiff.ops import Conv2d, Linear, attention, timestep_embedding_ref
from fastdiff.ops._onednn import bf16_math_dtype

__all__ = [
    "UNet2DConfig",
    "UNet2D",
    "FASHION32",
    "TINY",
    "CIFAR10_DDPM",
    "PRESETS",
]

_DOWN_TYPES = ("DownBlock2D", "AttnDownBlock2D")
_UP_TYPES = ("UpBlock2D", "AttnUpBlock2D")


@dataclass(frozen=True)
class UNet2DConfig:
    """Architecture of a :class:`UNet2D`. Field names follow diffusers' ``UNet2DModel`` config.json.

    ``num_classes`` / ``null_class`` are fastdiff's view of diffusers' ``num_class_embeds``:
    ``num_class_embeds = num_classes + null_class``.
    """

    sample_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 256, 256)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 2
    # Channels per attention head; None means one head spanning all channels (diffusers' convention).
    attention_head_dim: int | None = 8
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    # 0 = pad right/bottom by one then a stride-2 conv without padding (the TF DDPM port); 1 = symmetric.
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    add_attention: bool = True  # the mid block's attention
    dropout: float = 0.0
    center_input_sample: bool = False
    num_classes: int | None = None
    null_class: bool = False
    class_names: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"block_out_channels has {n} levels but down_block_types has {len(self.down_block_types)} "
                f"and up_block_types {len(self.up_block_types)}"
            )
        for t in self.down_block_types:
            if t not in _DOWN_TYPES:
                raise ValueError(f"unsupported down block type {t!r}; supported: {_DOWN_TYPES}")
        for t in self.up_block_types:
            if t not in _UP_TYPES:
                raise ValueError(f"unsupported up block type {t!r}; supported: {_UP_TYPES}")
        groups = self.norm_num_groups or min(self.block_out_channels[0] // 4, 32)
        for c in self.block_out_channels:
            if c % groups:
                raise ValueError(f"channels {c} not divisible by norm_num_groups {groups}")
        attn_channels = [c for c, t in zip(self.block_out_channels, self.down_block_types) if t.startswith("Attn")]
        attn_channels += [c for c, t in zip(self.block_out_channels[::-1], self.up_block_types) if t.startswith("Attn")]
        attn_channels += [self.block_out_channels[-1]] if self.add_attention else []
        for c in attn_channels:
            if self.attention_head_dim is not None and c % self.attention_head_dim:
                raise ValueError(f"attention channels {c} not divisible by attention_head_dim {self.attention_head_dim}")
        if self.null_class and not self.num_classes:
            raise ValueError("null_class=True needs num_classes")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class_names for {self.num_classes} classes")

    @property
    def num_class_embeds(self) -> int | None:
        if not self.num_classes:
            return None
        return self.num_classes + int(self.null_class)

    @property
    def null_label(self) -> int | None:
        """The class index meaning "no label" (classifier-free guidance), or None."""
        return self.num_classes if self.null_class else None

    def to_dict(self) -> dict:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNet2DConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown UNet2DConfig fields: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# Ho et al. 2020 CIFAR-10 model exactly as google/ddpm-cifar10-32 publishes it (35.7M parameters).
CIFAR10_DDPM = UNet2DConfig(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    attention_head_dim=None,
    norm_num_groups=32,
    norm_eps=1e-6,
    flip_sin_to_cos=False,
    freq_shift=1,
    downsample_padding=0,
)

FASHION_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)

# The bundled default model: class-conditional 32x32 grayscale (Fashion-MNIST padded 28 -> 32), 3.9M
# parameters, 1.07 GFLOP a forward pass. Thin at 32x32 (where convolutions cost the most), attention only at
# 8x8: sized so that CPU training sees a few hundred thousand images in a few hours on one core, and a CFG
# batch of 80 runs a denoising step in a fraction of a second on two.
FASHION32 = UNet2DConfig(
    sample_size=32,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 128),
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    attention_head_dim=32,
    norm_num_groups=8,
    norm_eps=1e-5,
    num_classes=10,
    null_class=True,
    class_names=FASHION_CLASSES,
)

# For tests: the same structure at a few thousand parameters.
TINY = UNet2DConfig(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    block_out_channels=(16, 32),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    attention_head_dim=8,
    norm_num_groups=8,
    num_classes=10,
    null_class=True,
)

PRESETS = {"fashion32": FASHION32, "cifar10_ddpm": CIFAR10_DDPM, "tiny": TINY}


class _Checkpointable(nn.Module):
    """A block whose activations can be recomputed in the backward pass instead of kept (gradient
    checkpointing, Chen et al. 2016): with ``grad_checkpointing`` set, a training forward keeps only the block's
    inputs and reruns the block during backward (non-reentrant :func:`torch.utils.checkpoint.checkpoint`,
    which restores the RNG and autocast state, so the loss and gradients equal the plain pass)."""

    grad_checkpointing: bool = False

    def __call__(self, *args):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(super().__call__, *args, use_reentrant=False)
        return super().__call__(*args)


class ResnetBlock2D(_Checkpointable, ResBlock):
    """diffusers' ``ResnetBlock2D``: GroupNorm -> SiLU -> conv3x3 (+ time projection) -> GroupNorm -> SiLU ->
    dropout -> conv3x3, plus the skip; out = (shortcut(x) + h) / output_scale_factor, shortcut a 1x1 conv when
    the channel count changes. The fused implementation is :class:`fastdiff.models.blocks.ResBlock` (time term
    and skip as convolution post-ops, channels_last inside); this adds gradient checkpointing."""

    def __init__(self, cin: int, cout: int, temb: int, groups: int, eps: float, dropout: float,
                 output_scale_factor: float = 1.0):
        super().__init__(cin, cout, temb, groups=groups, eps=eps, dropout=dropout,
                         output_scale_factor=output_scale_factor)


class SpatialSelfAttention(_Checkpointable):
    """Self-attention over the H*W positions with a pre-GroupNorm and a residual (diffusers ``Attention``
    as built for UNet2DModel). Keys: group_norm, to_q, to_k, to_v, to_out.0."""

    def __init__(self, channels: int, head_dim: int | None, groups: int, eps: float,
                 rescale_output_factor: float = 1.0):
        super().__init__()
        head_dim = head_dim or channels
        self.heads = channels // head_dim
        self.head_dim = head_dim
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = Linear(channels, channels)
        self.to_k = Linear(channels, channels)
        self.to_v = Linear(channels, channels)
        self.to_out = nn.ModuleList([Linear(channels, channels)])
        self.rescale_output_factor = rescale_output_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = apply_group_norm(x, self.group_norm)
        y = y.flatten(2).transpose(1, 2)  # (B, HW, C)

        def heads(t):
            return t.view(b, h * w, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.to_q(y)), heads(self.to_k(y)), heads(self.to_v(y))
        if q.dtype == torch.bfloat16 and q.device.type == "cpu" and bf16_math_dtype() == torch.float32:
            # On CPUs without fast bf16 dot products (fastdiff.ops._onednn) torch's bf16 SDPA backward ran
            # 4-6x slower than fp32 at this model's shapes (b32, 4 heads, 64 tokens, head dim 32: 59 vs 16 ms
            # fwd+bwd, 1 thread): attend in fp32 and round the output to bf16 once.
            with torch.autocast("cpu", enabled=False):  # else autocast casts SDPA's inputs back to bf16
                o = attention(q.float(), k.float(), v.float()).to(torch.bfloat16)
        else:
            o = attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v, fastdiff's dispatched kernel
        o = o.transpose(1, 2).reshape(b, h * w, c)
        if self.rescale_output_factor == 1.0 and x.is_contiguous(memory_format=torch.channels_last):
            # A channels_last map viewed as (B, HW, C) tokens is contiguous: the residual is added as the
            # output projection's post-op, and the result viewed back is channels_last again.
            o = self.to_out[0](o, residual=x.flatten(2).transpose(1, 2).to(o.dtype))
            return o.transpose(1, 2).reshape(b, c, h, w)
        out = self.to_out[0](o).transpose(1, 2).reshape(b, c, h, w) + x
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out


class Downsample2D(nn.Module):
    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:  # TF "SAME" padding for an even input: one extra row/column at the end
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class DownBlock(nn.Module):
    """One resolution level of the encoder. ``forward`` returns (h, skips), one skip per ResBlock + one
    after the downsampler."""

    def __init__(self, cin, cout, temb, n, attn, cfg: UNet2DConfig, groups, add_downsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(cin if i == 0 else cout, cout, temb, groups, cfg.norm_eps, cfg.dropout) for i in range(n)
        )
        self.attentions = nn.ModuleList(
            SpatialSelfAttention(cout, cfg.attention_head_dim, groups, cfg.norm_eps) for _ in range(n)
        ) if attn else None
        self.downsamplers = nn.ModuleList([Downsample2D(cout, cfg.downsample_padding)]) if add_downsample else None

    def forward(self, h, temb):
        skips = []
        for i, res in enumerate(self.resnets):
            h = res(h, temb)
            if self.attentions is not None:
                h = self.attentions[i](h)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class UpBlock(nn.Module):
    """One resolution level of the decoder: each ResBlock first concatenates the matching encoder skip."""

    def __init__(self, cin, cprev, cout, temb, n, attn, cfg: UNet2DConfig, groups, add_upsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D((cprev if i == 0 else cout) + (cin if i == n - 1 else cout), cout, temb, groups,
                          cfg.norm_eps, cfg.dropout)
            for i in range(n)
        )
        self.attentions = nn.ModuleList(
            SpatialSelfAttention(cout, cfg.attention_head_dim, groups, cfg.norm_eps) for _ in range(n)
        ) if attn else None
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if add_upsample else None

    def forward(self, h, skips, temb):
        for i, res in enumerate(self.resnets):
            h = res(torch.cat([h, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                h = self.attentions[i](h)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h)
        return h


class MidBlock(nn.Module):
    def __init__(self, c, temb, cfg: UNet2DConfig, groups):
        super().__init__()
        s = cfg.mid_block_scale_factor
        self.resnets = nn.ModuleList(
            ResnetBlock2D(c, c, temb, groups, cfg.norm_eps, cfg.dropout, s) for _ in range(2)
        )
        self.attentions = nn.ModuleList(
            [SpatialSelfAttention(c, cfg.attention_head_dim or c, groups, cfg.norm_eps, s)]
        ) if cfg.add_attention else None

    def forward(self, h, temb):
        h = self.resnets[0](h, temb)
        if self.attentions is not None:
            h = self.attentions[0](h)
        return self.resnets[1](h, temb)


class UNet2D(nn.Module):
    """The DDPM UNet. ``forward(x, t, class_labels=None)`` predicts the network target (eps, v or x0,
    decided by the schedule used to train it) with the shape of ``x``."""

    def __init__(self, config: UNet2DConfig = FASHION32):
        super().__init__()
        self.config = cfg = config
        ch = cfg.block_out_channels
        groups = cfg.norm_num_groups
        temb = ch[0] * 4
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        self.class_embedding = nn.Embedding(cfg.num_class_embeds, temb) if cfg.num_class_embeds else None

        self.down_blocks = nn.ModuleList()
        cout = ch[0]
        for i, kind in enumerate(cfg.down_block_types):
            cin, cout = cout, ch[i]
            self.down_blocks.append(DownBlock(cin, cout, temb, cfg.layers_per_block, kind == "AttnDownBlock2D",
                                              cfg, groups, add_downsample=i < len(ch) - 1))
        self.mid_block = MidBlock(ch[-1], temb, cfg, groups)

        self.up_blocks = nn.ModuleList()
        rch = list(reversed(ch))
        cout = rch[0]
        for i, kind in enumerate(cfg.up_block_types):
            cprev, cout = cout, rch[i]
            cin = rch[min(i + 1, len(ch) - 1)]
            self.up_blocks.append(UpBlock(cin, cprev, cout, temb, cfg.layers_per_block + 1,
                                          kind == "AttnUpBlock2D", cfg, groups, add_upsample=i < len(ch) - 1))
        self.conv_norm_out = nn.GroupNorm(groups or min(ch[0] // 4, 32), ch[0], eps=cfg.norm_eps)
        self.conv_out = Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float | int,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"expected x of shape (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"H and W must be multiples of {factor}, got {tuple(x.shape[2:])}")
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        # the torch-op form of fastdiff.ops.timestep_embedding: the fused kernel differs by an ulp (~1e-6 in the
        # output), and trained UNet2D checkpoints keep their exact samples
        emb = timestep_embedding_ref(t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                     downscale_freq_shift=cfg.freq_shift)
        emb = self.time_embedding(emb.to(self.conv_in.weight.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this model is class-conditional: pass class_labels "
                                 f"(0..{cfg.num_classes - 1}{', or the null label ' + str(cfg.null_label) if cfg.null_class else ''})")
            class_labels = torch.as_tensor(class_labels, device=x.device)
            if class_labels.ndim == 0:
                class_labels = class_labels.expand(x.shape[0])
            if class_labels.min() < 0 or class_labels.max() >= cfg.num_class_embeds:
                raise ValueError(f"class label outside 0..{cfg.num_class_embeds - 1}: {class_labels.tolist()}")
            emb = emb + self.class_embedding(class_labels).to(emb.dtype)
        elif class_labels is not None:
            raise ValueError("class_labels given to an unconditional model")

        # Activations stay channels_last from here to the output: oneDNN's convolutions read and write that
        # layout directly (NCHW is reordered around every convolution), the fused GroupNorm has a
        # channels-last path, and attention's (B, HW, C) token view of a channels_last map is free.
        # (With one input channel a channels_last tensor is also NCHW-contiguous, and torch's convolution then
        # returns NCHW: make conv_in's output channels_last explicitly, or every block of the first level would
        # convert to channels_last and back.)
        h = self.conv_in(x.contiguous(memory_format=torch.channels_last)).contiguous(memory_format=torch.channels_last)
        skips = [h]
        for block in self.down_blocks:
            h, s = block(h, emb)
            skips.extend(s)
        h = self.mid_block(h, emb)
        for block in self.up_blocks:
            h = block(h, skips, emb)
        return self.conv_out(apply_group_norm(h, self.conv_norm_out, silu=True)).contiguous()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_grad_checkpointing(self, enabled: bool = True) -> "UNet2D":
        """Recompute every ResBlock and attention block in the backward pass instead of keeping its activations
        (training memory for compute: roughly one extra forward pass). Not part of the config: it changes no
        weight and no output."""
        for m in self.modules():
            if isinstance(m, _Checkpointable):
                m.grad_checkpointing = bool(enabled)
        return self

    @property
    def grad_checkpointing(self) -> bool:
        return any(m.grad_checkpointing for m in self.modules() if isinstance(m, _Checkpointable))

