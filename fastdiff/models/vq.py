"""VQ-VAE: the KL autoencoder's encoder and decoder around a vector quantiser (van den Oord et al. 2017).

Laid out like diffusers' ``VQModel`` (keys ``encoder.*``, ``quant_conv``, ``quantize.embedding.weight``,
``post_quant_conv``, ``decoder.*``), built from the same :class:`~fastdiff.models.vae.Encoder` and
:class:`~fastdiff.models.vae.Decoder` as :class:`~fastdiff.models.vae.AutoencoderKL`; the only difference in the
encoder is a single latent instead of [mean, logvar] at ``conv_out`` (diffusers' ``double_z=False``)::

    encode: x -> Encoder -> z (B, latent_channels, H/f, W/f) -> quant_conv -> z_e (B, D, H/f, W/f)
    quantise: z_e -> nearest of the K codebook rows e_k (squared Euclidean distance) -> z_q
    decode: z_q -> post_quant_conv -> Decoder -> image

The quantiser (:class:`VectorQuantizer`):

* nearest code ``k(i) = argmin_k |z_i - e_k|^2``, computed in fp32 as ``|z|^2 - 2 z.e + |e|^2``;
* straight-through estimator: the decoder sees ``z + sg(z_q - z)``, whose value is ``z_q`` and whose gradient
  with respect to ``z`` is the identity (eq. 3 of the paper copies the decoder's gradient to the encoder);
* commitment loss ``beta * mean |z - sg(z_q)|^2``; without EMA also the codebook loss ``mean |sg(z) - z_q|^2``;
* EMA codebook (paper, appendix A.1): with ``n_k`` the batch count of code k and ``s_k`` the sum of the vectors
  assigned to it, ``N_k <- d N_k + (1-d) n_k``, ``m_k <- d m_k + (1-d) s_k``, Laplace-smoothed sizes
  ``N~_k = (N_k + eps) / (sum N + K eps) * sum N`` and ``e_k = m_k / N~_k``. ``N`` starts at 1 and ``m`` at the
  initial codebook, so ``e = m / N~`` holds from the first step (a zero start divides an unused code by ``eps``);
* dead-code restarts: a code unused for ``restart_after`` consecutive training steps is replaced by an encoder
  output of the current batch (drawn at random without replacement) and its EMA state by that one vector;
* logged per call: perplexity ``exp(-sum p_k log p_k)`` of the batch's code histogram (K for a uniform
  assignment, 1 when one code takes everything) and usage, the fraction of codes the batch used.

Under ``torch.distributed`` the batch counts and sums are all-reduced before the EMA update and restarts take
rank 0's candidates, so every rank keeps the same codebook.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fastdiff.models.vae import Decoder, Encoder, VAEConfig
from fastdiff.ops import Conv2d

__all__ = ["VQConfig", "VQModel", "VectorQuantizer", "QuantizerOutput", "VQOutput", "CODEBOOKS", "PRESETS",
           "codebook_perplexity"]

# Codebook presets: name -> (num_vq_embeddings K, vq_embed_dim D).
CODEBOOKS = {
    "k64_d4": (64, 4),
    "k256_d4": (256, 4),
    "k512_d8": (512, 8),
    "k1024_d16": (1024, 16),
    "k8192_d3": (8192, 3),  # LDM's vq-f4 (diffusers' CompVis/ldm-celebahq-256 vqvae)
}


@dataclass(frozen=True)
class VQConfig:
    """Architecture (the fields diffusers' ``VQModel`` config has) and the quantiser's training settings."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    num_vq_embeddings: int = 8192
    vq_embed_dim: int = 3
    scaling_factor: float = 1.0
    sample_size: int = 256
    # training of the quantiser (not part of the diffusers config)
    beta: float = 0.25  # commitment weight
    ema: bool = True  # EMA codebook updates; False: the codebook learns from the codebook loss
    decay: float = 0.99
    eps: float = 1e-5  # Laplace smoothing of the EMA cluster sizes
    restart_after: int | None = 100  # steps a code may stay unused before it is re-seeded; None: never

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        for name in ("in_channels", "out_channels", "latent_channels", "num_vq_embeddings", "vq_embed_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.restart_after is not None and self.restart_after < 1:
            raise ValueError(f"restart_after must be >= 1 or None, got {self.restart_after}")
        self.autoencoder_config()  # checks channels against norm_num_groups

    def autoencoder_config(self) -> VAEConfig:
        """The encoder/decoder part as the KL autoencoder's config (its ``latent_channels`` is the VQ one's)."""
        return VAEConfig(in_channels=self.in_channels, out_channels=self.out_channels,
                         latent_channels=self.latent_channels, block_out_channels=self.block_out_channels,
                         layers_per_block=self.layers_per_block, norm_num_groups=self.norm_num_groups,
                         sample_size=self.sample_size)

    def with_codebook(self, name: str) -> "VQConfig":
        """This config with a :data:`CODEBOOKS` preset (K, D); the latent has D channels too."""
        if name not in CODEBOOKS:
            raise ValueError(f"unknown codebook {name!r}; choose from {', '.join(CODEBOOKS)}")
        k, d = CODEBOOKS[name]
        return replace(self, num_vq_embeddings=k, vq_embed_dim=d, latent_channels=d)

    @classmethod
    def from_diffusers(cls, cfg: dict, **training) -> "VQConfig":
        """From a diffusers ``VQModel`` config.json dict (group norm, SiLU, mid-block attention only)."""
        n = len(cfg.get("block_out_channels", (64,)))
        for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            got = tuple(cfg.get(key, (want,) * n))
            if got != (want,) * n:
                raise ValueError(f"unsupported VQModel {key} {got}: fastdiff's VQ-VAE has {want} blocks")
        if cfg.get("act_fn", "silu") != "silu":
            raise ValueError(f"unsupported VQModel act_fn {cfg.get('act_fn')!r}: only 'silu'")
        if cfg.get("norm_type", "group") != "group":
            raise ValueError(f"unsupported VQModel norm_type {cfg.get('norm_type')!r}: only 'group'")
        if cfg.get("mid_block_add_attention", True) is False:
            raise ValueError("unsupported VQModel mid_block_add_attention=false: fastdiff's mid block has attention")
        if cfg.get("lookup_from_codebook", False):
            raise ValueError("unsupported VQModel lookup_from_codebook=true")
        latent = cfg.get("latent_channels", 3)
        return cls(in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
                   latent_channels=latent, block_out_channels=tuple(cfg.get("block_out_channels", (64,))),
                   layers_per_block=cfg.get("layers_per_block", 1), norm_num_groups=cfg.get("norm_num_groups", 32),
                   num_vq_embeddings=cfg.get("num_vq_embeddings", 256),
                   vq_embed_dim=cfg.get("vq_embed_dim") or latent,
                   scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
                   sample_size=cfg.get("sample_size", 32), **training)

    def to_diffusers(self) -> dict:
        n = len(self.block_out_channels)
        return {"_class_name": "VQModel", "act_fn": "silu", "in_channels": self.in_channels,
                "out_channels": self.out_channels, "latent_channels": self.latent_channels,
                "block_out_channels": list(self.block_out_channels), "layers_per_block": self.layers_per_block,
                "norm_num_groups": self.norm_num_groups, "num_vq_embeddings": self.num_vq_embeddings,
                "vq_embed_dim": self.vq_embed_dim, "scaling_factor": self.scaling_factor,
                "sample_size": self.sample_size, "down_block_types": ["DownEncoderBlock2D"] * n,
                "up_block_types": ["UpDecoderBlock2D"] * n, "norm_type": "group",
                "mid_block_add_attention": True, "lookup_from_codebook": False, "force_upcast": False}


# Presets. TINY is for tests; FASHION_F4 takes 32x32 grey Fashion-MNIST to an 8x8x4 code map (f4);
# LDM_F4 is LDM's vq-f4 (3 levels, 8192 codes of dimension 3).
TINY = VQConfig(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                norm_num_groups=8, num_vq_embeddings=64, vq_embed_dim=4, sample_size=32, restart_after=20)
FASHION_F4 = VQConfig(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(64, 128, 128),
                      layers_per_block=1, norm_num_groups=32, num_vq_embeddings=256, vq_embed_dim=4, sample_size=32)
LDM_F4 = VQConfig()
PRESETS = {"tiny": TINY, "fashion_f4": FASHION_F4, "ldm_f4": LDM_F4}


class QuantizerOutput(NamedTuple):
    """What one quantiser call returns. ``loss = commitment_loss + codebook_loss`` (the latter 0 with EMA);
    ``indices`` is (B, h, w); ``perplexity`` and ``usage`` are detached scalars for logging."""

    z_q: torch.Tensor
    loss: torch.Tensor
    commitment_loss: torch.Tensor
    codebook_loss: torch.Tensor
    indices: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor


class VQOutput(NamedTuple):
    sample: torch.Tensor
    quant: QuantizerOutput


def codebook_perplexity(counts: torch.Tensor) -> torch.Tensor:
    """``exp(H(p))`` of a code histogram, ``p = counts / sum(counts)`` (0 log 0 = 0): the effective number of
    codes in use, K for a uniform assignment over K codes."""
    p = counts.double() / counts.sum().clamp_min(1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum())


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class VectorQuantizer(nn.Module):
    """Nearest-code quantiser with straight-through gradients, commitment loss, EMA updates and restarts.

    Keys: ``embedding.weight`` (K, D) as in diffusers; the EMA state is kept in buffers ``ema_cluster_size`` (K),
    ``ema_embed_sum`` (K, D) and ``steps_unused`` (K) so that a training checkpoint resumes exactly (the
    diffusers layout leaves them out, and :meth:`reset_ema` rebuilds them from the codebook).
    """

    def __init__(self, num_embeddings: int, embed_dim: int, *, beta: float = 0.25, ema: bool = True,
                 decay: float = 0.99, eps: float = 1e-5, restart_after: int | None = 100):
        super().__init__()
        self.num_embeddings, self.embed_dim = num_embeddings, embed_dim
        self.beta, self.use_ema, self.decay, self.eps, self.restart_after = beta, ema, decay, eps, restart_after
        self.embedding = nn.Embedding(num_embeddings, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_embeddings, 1.0 / num_embeddings)  # diffusers' init
        if ema:
            # The EMA owns the codebook: no optimiser may move it.
            self.embedding.weight.requires_grad_(False)
        self.register_buffer("ema_cluster_size", torch.ones(num_embeddings))
        self.register_buffer("ema_embed_sum", self.embedding.weight.detach().clone().float())
        self.register_buffer("steps_unused", torch.zeros(num_embeddings, dtype=torch.long))

    @torch.no_grad()
    def reset_ema(self) -> None:
        """EMA state consistent with the current codebook: every size 1, every sum the code itself."""
        self.ema_cluster_size.fill_(1.0)
        self.ema_embed_sum.copy_(self.embedding.weight.float())
        self.steps_unused.zero_()

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook row for each row of ``flat`` (N, D), squared Euclidean distance."""
        if flat.dim() != 2 or flat.shape[1] != self.embed_dim:
            raise ValueError(f"nearest expects (N, {self.embed_dim}) vectors, got {tuple(flat.shape)}")
        z = flat.float()
        e = self.embedding.weight.float()
        # |z - e|^2 = |z|^2 - 2 z.e + |e|^2; |z|^2 does not change the argmin but keeps the numbers distances.
        d = z.pow(2).sum(1, keepdim=True) - 2.0 * (z @ e.t()) + e.pow(2).sum(1)[None]
        return d.argmin(1)

    def snap(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D, h, w) -> (nearest codes (B, D, h, w) with straight-through gradients, indices (B, h, w)); no
        losses, no statistics and no codebook update, in any mode (what decoding a latent needs)."""
        if z.dim() != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(f"VectorQuantizer expects (B, {self.embed_dim}, h, w), got {tuple(z.shape)}")
        b, _, h, w = z.shape
        idx = self.nearest(z.detach().permute(0, 2, 3, 1).reshape(-1, self.embed_dim)).reshape(b, h, w)
        z_q = self.lookup(idx).to(z.dtype)
        return z + (z_q - z).detach(), idx

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w) -> codebook vectors (B, D, h, w)."""
        return self.embedding.weight[indices].permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        if z.dim() != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(f"VectorQuantizer expects (B, {self.embed_dim}, h, w), got {tuple(z.shape)}")
        b, _, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.embed_dim)
        idx = self.nearest(flat.detach())
        z_q = self.embedding.weight[idx].to(z.dtype)  # (N, D), the codebook before this step's update
        counts = torch.bincount(idx, minlength=self.num_embeddings)

        commitment = self.beta * F.mse_loss(flat, z_q.detach())
        codebook = z.new_zeros(()) if self.use_ema else F.mse_loss(z_q, flat.detach())
        if self.training and self.use_ema:
            self._ema_update(flat.detach().float(), idx, counts)
        if self.training and self.restart_after is not None:
            self._restart_dead(flat.detach(), counts)

        z_st = flat + (z_q - flat).detach()  # straight-through: value z_q, gradient identity to z
        z_st = z_st.reshape(b, h, w, self.embed_dim).permute(0, 3, 1, 2)
        return QuantizerOutput(z_st, commitment + codebook, commitment, codebook, idx.reshape(b, h, w),
                               codebook_perplexity(counts).float(),
                               (counts > 0).float().mean())

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> None:
        n = counts.to(self.ema_cluster_size.dtype)
        s = torch.zeros_like(self.ema_embed_sum).index_add_(0, idx, flat)
        if _distributed():
            torch.distributed.all_reduce(n)
            torch.distributed.all_reduce(s)
        d = self.decay
        self.ema_cluster_size.mul_(d).add_(n, alpha=1 - d)
        self.ema_embed_sum.mul_(d).add_(s, alpha=1 - d)
        total = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.eps) / (total + self.num_embeddings * self.eps) * total
        self.embedding.weight.copy_(self.ema_embed_sum / smoothed[:, None])

    @torch.no_grad()
    def _restart_dead(self, flat: torch.Tensor, counts: torch.Tensor) -> None:
        used = counts > 0
        if _distributed():
            u = used.to(torch.int32)
            torch.distributed.all_reduce(u)
            used = u > 0
        self.steps_unused.add_(1).masked_fill_(used, 0)
        dead = (self.steps_unused >= self.restart_after).nonzero().flatten()
        if dead.numel() == 0:
            return
        # Candidates: distinct encoder outputs of this batch (with replacement only if the batch is smaller).
        n = flat.shape[0]
        pick = (torch.randperm(n, device=flat.device)[:dead.numel()] if n >= dead.numel()
                else torch.randint(n, (dead.numel(),), device=flat.device))
        new = flat[pick].to(self.embedding.weight.dtype)
        if _distributed():
            torch.distributed.broadcast(new, src=0)
        self.embedding.weight[dead] = new
        self.ema_embed_sum[dead] = new.float()
        self.ema_cluster_size[dead] = 1.0
        self.steps_unused[dead] = 0


class _VQEncoder(Encoder):
    """The KL autoencoder's encoder with one latent at ``conv_out`` (diffusers' ``double_z=False``)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__(cfg)
        self.conv_out = Conv2d(cfg.block_out_channels[-1], cfg.latent_channels, 3, padding=1)


class VQModel(nn.Module):
    """Encoder -> quant_conv -> :class:`VectorQuantizer` -> post_quant_conv -> Decoder (diffusers' ``VQModel``).

    ``encode`` returns the continuous pre-quantisation latent (diffusers' ``encode(x).latents``); ``decode``
    snaps it to the nearest codes first unless ``quantize=False`` (diffusers' ``force_not_quantize``);
    ``forward`` does both and also returns the quantiser's losses and statistics. Only ``forward`` in training
    mode updates the codebook (EMA and restarts).
    """

    def __init__(self, cfg: VQConfig = TINY):
        super().__init__()
        self.config = cfg
        ae = cfg.autoencoder_config()
        self.encoder = _VQEncoder(ae)
        self.quant_conv = Conv2d(cfg.latent_channels, cfg.vq_embed_dim, 1)
        self.quantize = VectorQuantizer(cfg.num_vq_embeddings, cfg.vq_embed_dim, beta=cfg.beta, ema=cfg.ema,
                                        decay=cfg.decay, eps=cfg.eps, restart_after=cfg.restart_after)
        self.post_quant_conv = Conv2d(cfg.vq_embed_dim, cfg.latent_channels, 1)
        self.decoder = Decoder(ae)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight (the adaptive GAN weight compares gradient norms there)."""
        return self.decoder.conv_out.weight

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, C, H, W) in [-1, 1], H and W multiples of the downscale factor -> z_e (B, D, H/f, W/f)."""
        f = self.downscale
        if x.dim() != 4 or x.shape[1] != self.config.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"VQModel.encode expects (B, {self.config.in_channels}, H, W) with H, W multiples of "
                             f"{f}, got {tuple(x.shape)}")
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """z_e (or, with ``quantize=False``, already quantised vectors) (B, D, h, w) -> image."""
        if z.dim() != 4 or z.shape[1] != self.config.vq_embed_dim:
            raise ValueError(f"VQModel.decode expects (B, {self.config.vq_embed_dim}, h, w), got {tuple(z.shape)}")
        if quantize:
            z = self.quantize.snap(z)[0]  # never updates the codebook: decoding is not a training step
        return self.decoder(self.post_quant_conv(z))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w) -> image."""
        return self.decoder(self.post_quant_conv(self.quantize.lookup(indices).to(self.dtype)))

    def forward(self, x: torch.Tensor) -> VQOutput:
        q = self.quantize(self.encode(x))
        return VQOutput(self.decoder(self.post_quant_conv(q.z_q)), q)
