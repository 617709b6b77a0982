"""Tiled VAE decode / encode for images larger than the VAE was trained on (bounded memory per tile).

The image (or latent) is cut into overlapping square tiles, each tile runs through the decoder (encoder) alone,
and neighbouring tiles are cross-faded over the overlap before the non-overlapping parts are stitched: the
scheme of diffusers' ``AutoencoderKL.enable_tiling`` (same tile order, overlap and linear ramps), so a tiled
decode matches diffusers' tiled decode of the same weights. Memory per call is that of one tile (512 px by
default, the VAE's training size), whatever the image size; the result differs slightly from an untiled decode
because each tile's GroupNorm statistics are its own.

    img = tiled_decode(vae, z)                 # z: unscaled latents (B, C, h, w)
    post = tiled_encode(vae, x)                # x: images in [-1, 1]; returns the posterior
"""
from __future__ import annotations

import torch

__all__ = ["tiled_decode", "tiled_encode"]


def _blend_v(a: torch.Tensor, b: torch.Tensor, extent: int) -> torch.Tensor:
    """Cross-fade the bottom ``extent`` rows of ``a`` into the top rows of ``b`` (in place on b)."""
    extent = min(a.shape[2], b.shape[2], extent)
    if extent > 0:
        w = (torch.arange(extent, dtype=torch.float32) / extent).to(b.dtype).view(1, 1, extent, 1)
        b[:, :, :extent, :] = a[:, :, -extent:, :] * (1 - w) + b[:, :, :extent, :] * w
    return b


def _blend_h(a: torch.Tensor, b: torch.Tensor, extent: int) -> torch.Tensor:
    """Cross-fade the right ``extent`` columns of ``a`` into the left columns of ``b`` (in place on b)."""
    extent = min(a.shape[3], b.shape[3], extent)
    if extent > 0:
        w = (torch.arange(extent, dtype=torch.float32) / extent).to(b.dtype).view(1, 1, 1, extent)
        b[:, :, :, :extent] = a[:, :, :, -extent:] * (1 - w) + b[:, :, :, :extent] * w
    return b


def _tiled(x: torch.Tensor, fn, tile_in: int, tile_out: int, overlap: float) -> torch.Tensor:
    """Run ``fn`` on overlapping ``tile_in`` tiles of x (stride tile_in * (1 - overlap)) and stitch the
    ``tile_out``-sized results, blending ``tile_out * overlap`` rows / columns between neighbours."""
    if tile_in < 1 or not 0.0 <= overlap < 1.0:
        raise ValueError(f"tile size must be >= 1 and overlap in [0, 1), got {tile_in}, {overlap}")
    stride = max(1, int(tile_in * (1 - overlap)))
    extent = int(tile_out * overlap)
    keep = tile_out - extent
    rows = [[fn(x[:, :, i:i + tile_in, j:j + tile_in]) for j in range(0, x.shape[3], stride)]
            for i in range(0, x.shape[2], stride)]
    out_rows = []
    for i, row in enumerate(rows):
        parts = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = _blend_v(rows[i - 1][j], tile, extent)
            if j > 0:
                tile = _blend_h(row[j - 1], tile, extent)
            parts.append(tile[:, :, :keep, :keep])
        out_rows.append(torch.cat(parts, dim=3))
    return torch.cat(out_rows, dim=2)


def tiled_decode(vae, z: torch.Tensor, *, tile: int | None = None, overlap: float = 0.25) -> torch.Tensor:
    """Unscaled latents -> image, decoded in tiles of ``tile`` pixels (default: the VAE's sample size, 512 for
    SD1). Latents no larger than one tile are decoded whole (exactly ``vae.decode``)."""
    f = vae.downscale
    tile = tile or vae.config.sample_size
    if tile % f:
        raise ValueError(f"tile size {tile} must be a multiple of the VAE's downscale factor {f}")
    tl = tile // f
    if z.shape[-1] <= tl and z.shape[-2] <= tl:
        return vae.decode(z)
    return _tiled(z, lambda t: vae.decoder(vae.post_quant_conv(t)), tl, tile, overlap)


def tiled_encode(vae, x: torch.Tensor, *, tile: int | None = None, overlap: float = 0.25):
    """Images in [-1, 1] -> the posterior over unscaled latents, encoded in tiles of ``tile`` pixels. Images no
    larger than one tile are encoded whole (exactly ``vae.encode``)."""
    from fastdiff.models.vae import DiagonalGaussian

    f = vae.downscale
    tile = tile or vae.config.sample_size
    if tile % f:
        raise ValueError(f"tile size {tile} must be a multiple of the VAE's downscale factor {f}")
    if x.shape[-1] <= tile and x.shape[-2] <= tile:
        return vae.encode(x)
    if x.shape[-1] % f or x.shape[-2] % f:
        raise ValueError(f"image size {tuple(x.shape[-2:])} must be a multiple of {f}")
    moments = _tiled(x, lambda t: vae.quant_conv(vae.encoder(t)), tile, tile // f, overlap)
    return DiagonalGaussian(moments)
