"""KL autoencoder of latent diffusion (the SD1 VAE), laid out like diffusers' ``AutoencoderKL``.

Attribute paths equal diffusers' keys (``encoder.down_blocks.0.resnets.0.norm1.weight``,
``decoder.mid_block.attentions.0.to_q.weight``, ``quant_conv.weight``, ...). The original LDM names
(``encoder.down.0.block.0``, ``mid.attn_1.q`` as 1x1 convs, ...) are mapped in :mod:`fastdiff.io.sd_checkpoint`.

    encode: x (B,3,H,W) in [-1,1] -> conv_in -> levels of ResBlocks + stride-2 conv (asymmetric pad)
            -> mid (ResBlock, single-head self-attention, ResBlock) -> GroupNorm+SiLU -> conv_out
            -> quant_conv -> [mean, logvar] (B, 2*4, H/8, W/8) -> DiagonalGaussian
    decode: z -> post_quant_conv -> conv_in -> mid -> levels of (ResBlocks, 2x nearest + conv)
            -> GroupNorm+SiLU -> conv_out -> image

Latents the UNet sees are ``scaling_factor * z`` (0.18215 for SD1); ``encode``/``decode`` work on unscaled z
like diffusers, and the pipeline applies the factor.

SD3's VAE is the same network with 16 latent channels, no ``quant_conv`` / ``post_quant_conv`` (its config
says ``use_quant_conv: false``), and latents ``scaling_factor * (z - shift_factor)`` (1.5305, 0.0609): preset
``SD3``. :meth:`AutoencoderKL.to_latents` / :meth:`from_latents` apply either convention.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.models.blocks import ResBlock, Upsample2D, apply_group_norm
from fastdiff.ops import Conv2d, Linear, attention

__all__ = ["VAEConfig", "AutoencoderKL", "DiagonalGaussian", "SD15", "SD3", "TINY", "TINY_SD3", "SMALL_F4", "FASHION_F4",
           "PRESETS"]


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    sample_size: int = 512

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"block_out_channels {self.block_out_channels} must be multiples of "
                             f"norm_num_groups {self.norm_num_groups}")

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "VAEConfig":
        """From an ``AutoencoderKL`` config.json dict (only the SD1-style KL autoencoder)."""
        n = len(cfg.get("block_out_channels", (64,)))
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            got = tuple(cfg.get(key, (want,) * n))
            if got != (want,) * n:
                raise ValueError(f"unsupported AutoencoderKL {key} {got}: fastdiff's VAE has {want} blocks")
        if cfg.get("act_fn", "silu") != "silu" or cfg.get("mid_block_add_attention", True) is False:
            raise ValueError("unsupported AutoencoderKL config (act_fn / mid_block_add_attention)")
        return cls(in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
                   latent_channels=cfg.get("latent_channels", 4),
                   block_out_channels=tuple(cfg.get("block_out_channels", (64,))),
                   layers_per_block=cfg.get("layers_per_block", 1), norm_num_groups=cfg.get("norm_num_groups", 32),
                   scaling_factor=cfg.get("scaling_factor", 0.18215),
                   shift_factor=float(cfg.get("shift_factor") or 0.0),
                   use_quant_conv=bool(cfg.get("use_quant_conv", True)),
                   use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
                   sample_size=cfg.get("sample_size", 512))

    def to_diffusers(self) -> dict:
        n = len(self.block_out_channels)
        return {"_class_name": "AutoencoderKL", "act_fn": "silu", "in_channels": self.in_channels,
                "out_channels": self.out_channels, "latent_channels": self.latent_channels,
                "block_out_channels": list(self.block_out_channels), "layers_per_block": self.layers_per_block,
                "norm_num_groups": self.norm_num_groups, "scaling_factor": self.scaling_factor,
                "sample_size": self.sample_size, "down_block_types": ["DownEncoderBlock2D"] * n,
                "up_block_types": ["UpDecoderBlock2D"] * n,
                "shift_factor": self.shift_factor if self.shift_factor else None,
                "use_quant_conv": self.use_quant_conv, "use_post_quant_conv": self.use_post_quant_conv}


SD15 = VAEConfig()
# SD3 / SD3.5: 16 latent channels, no quant convs, shifted latents (diffusers' stabilityai/stable-diffusion-3-medium
# vae/config.json)
SD3 = VAEConfig(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                use_post_quant_conv=False, sample_size=1024)
TINY = VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=32)
TINY_SD3 = VAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=32,
                     latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                     use_post_quant_conv=False)
# Small autoencoders to train from scratch (fastdiff.train, kind="autoencoder"): f4 (two stride-2 levels), 4 latent
# channels. ``scaling_factor`` is a placeholder here: latent diffusion measures it from the data (1 / std of the
# latents, as LDM does) and stores it with the latent run.
SMALL_F4 = VAEConfig(block_out_channels=(64, 128, 128), layers_per_block=1, norm_num_groups=32, scaling_factor=1.0,
                     sample_size=32)
# Grey 32x32 (Fashion-MNIST padded to 32): 32x32x1 -> 8x8x4 latents.
FASHION_F4 = VAEConfig(in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=1,
                       norm_num_groups=16, scaling_factor=1.0, sample_size=32)
PRESETS = {"sd15": SD15, "sd3": SD3, "tiny": TINY, "tiny_sd3": TINY_SD3, "small_f4": SMALL_F4,
           "fashion_f4": FASHION_F4}

_EPS = 1e-6  # every VAE norm uses eps 1e-6 (the UNet uses 1e-5)


class DiagonalGaussian:
    """N(mean, exp(logvar)) per latent element; logvar clamped to [-30, 20] as in LDM."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype,
                            device=generator.device if generator is not None else self.mean.device)
        return self.mean + self.std * noise.to(self.mean.device)


def VAEResnetBlock(cin: int, cout: int, groups: int) -> ResBlock:
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus a 1x1 ``conv_shortcut`` when channels change
    (diffusers' ResnetBlock2D without a time embedding, eps 1e-6): fastdiff's fused ResBlock."""
    return ResBlock(cin, cout, temb_channels=None, groups=groups, eps=_EPS)


class VAEAttention(nn.Module):
    """Single-head self-attention over the H*W positions with a GroupNorm in front and a residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=_EPS)
        self.to_q = Linear(channels, channels)
        self.to_k = Linear(channels, channels)
        self.to_v = Linear(channels, channels)
        self.to_out = nn.ModuleList([Linear(channels, channels)])

    def forward(self, x):
        b, c, h, w = x.shape
        y = apply_group_norm(x, self.group_norm).flatten(2).transpose(1, 2)[:, None]  # (B, 1, HW, C)
        o = attention(self.to_q(y), self.to_k(y), self.to_v(y))[:, 0]
        return self.to_out[0](o).transpose(1, 2).reshape(b, c, h, w) + x


class VAEMidBlock(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([VAEResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([VAEAttention(channels, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class _Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one row/column at the bottom/right (LDM's asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _EncoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, n: int, groups: int, down: bool):
        super().__init__()
        self.resnets = nn.ModuleList([VAEResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(n)])
        self.downsamplers = nn.ModuleList([_Downsample(cout)]) if down else None

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class _DecoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, n: int, groups: int, up: bool):
        super().__init__()
        self.resnets = nn.ModuleList([VAEResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(n)])
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if up else None

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            _EncoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, down=i < len(ch) - 1)
            for i in range(len(ch))])
        self.mid_block = VAEMidBlock(ch[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=_EPS)
        self.conv_out = Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for blk in self.down_blocks:
            x = blk(x)
        x = self.mid_block(x)
        return self.conv_out(apply_group_norm(x, self.conv_norm_out, silu=True))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = VAEMidBlock(ch[0], g)
        self.up_blocks = nn.ModuleList([
            _DecoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, up=i < len(ch) - 1)
            for i in range(len(ch))])
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=_EPS)
        self.conv_out = Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for blk in self.up_blocks:
            x = blk(x)
        return self.conv_out(apply_group_norm(x, self.conv_norm_out, silu=True))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig = SD15):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # absent in SD3's VAE: identity maps then (diffusers stores no weights for them either)
        self.quant_conv = (Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
                           if cfg.use_quant_conv else nn.Identity())
        self.post_quant_conv = (Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
                                if cfg.use_post_quant_conv else nn.Identity())

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def shift_factor(self) -> float:
        return self.config.shift_factor

    def to_latents(self, z: torch.Tensor) -> torch.Tensor:
        """VAE space -> the space the denoiser works in: ``scaling_factor * (z - shift_factor)``."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_latents`: ``latents / scaling_factor + shift_factor``."""
        return latents / self.config.scaling_factor + self.config.shift_factor

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Image (B, C, H, W) in [-1, 1], H and W multiples of the downscale factor -> posterior over z."""
        f = self.downscale
        if x.dim() != 4 or x.shape[1] != self.config.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"VAE.encode expects (B, {self.config.in_channels}, H, W) with H, W multiples of {f}, "
                             f"got {tuple(x.shape)}")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, latent_channels, h, w) -> image (B, C, h*f, w*f), roughly in [-1, 1]."""
        if z.dim() != 4 or z.shape[1] != self.config.latent_channels:
            raise ValueError(f"VAE.decode expects (B, {self.config.latent_channels}, h, w), got {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
        post = self.encode(x)
        return self.decode(post.sample(generator) if sample else post.mode())
