"""Builders of the small random SD1 ControlNets the pipeline tests compare with diffusers."""
from __future__ import annotations

import torch

import diffusers

HINT = (8, 16, 16, 32)  # narrower than SD1's (16, 32, 96, 256): same depth and strides, a faster test


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (zero convolutions included); norm scales around 1 so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = p.dim() == 1 and "norm" in name and name.endswith("weight")
            r = 0.2 * torch.randn(p.shape, generator=g)
            p.copy_(1.0 + r if is_norm else r)
    return model.eval()


def random_controlnet(unet, seed: int, hint: tuple[int, ...] = HINT):
    """diffusers' ``ControlNetModel.from_unet(unet)`` with EVERY weight re-drawn (the zero convolutions and the
    hint encoder's ``conv_out`` too: left at zero they would make the ControlNet a no-op)."""
    net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=hint)
    return randomize(net, seed)
