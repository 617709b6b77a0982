"""The SD1 ControlNet (Zhang, Rao & Agrawala 2023): a trainable copy of the UNet's encoder that reads a control
image (edges, depth, pose, a segmentation map ...) and returns residuals for the frozen UNet's skip connections.

Attribute paths equal diffusers' ``ControlNetModel`` keys (``controlnet_cond_embedding.blocks.3``,
``down_blocks.1.attentions.0...``, ``controlnet_down_blocks.11``, ``controlnet_mid_block``), so a diffusers folder
loads by a strict copy; the original ``control_model.*`` names (``input_hint_block``, ``zero_convs``,
``middle_block_out``) are mapped in :mod:`fastdiff.io.controlnet_checkpoint`. The encoder is built from the
UNet's own blocks (:mod:`fastdiff.models.unet_sd`), so there is one implementation of each.

    hint (B, 3, H, W) in [0, 1] -> conv_in 3->16, SiLU -> [conv c->c, SiLU, conv c->c' stride 2, SiLU] for
        16->32->96->256 -> conv_out 256->c0 (a zero convolution at initialisation) = hint features at H/8 x W/8
    x -> conv_in(x) + hint features -> down blocks (the UNet's: every layer's output and every downsampler's is
        a skip, 12 for SD1.5 together with conv_in's) -> mid block
    down residual i = zero_conv_i(skip i) (1x1 convolutions), mid residual = zero_conv(mid output),
    each times ``conditioning_scale``

The UNet adds them to its skips and to its mid output (:meth:`fastdiff.models.unet_sd.UNetSD.forward`'s
``down_block_additional_residuals`` / ``mid_block_additional_residual``). The zero convolutions start at zero
(:meth:`ControlNet.from_unet`), so an untrained ControlNet leaves the UNet's output unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from fastdiff.models.blocks import TimestepEmbedding
from fastdiff.models.unet_sd import DownBlock, MidBlock, UNetSD, UNetSDConfig
from fastdiff.models.unet_sd import SD15 as UNET_SD15
from fastdiff.models.unet_sd import TINY as UNET_TINY
from fastdiff.ops import Conv2d, timestep_embedding

__all__ = ["ControlNetConfig", "ControlNet", "ControlNetConditioningEmbedding", "controlled_unet",
           "controlnet_residuals", "SD15", "TINY", "PRESETS"]


@dataclass(frozen=True)
class ControlNetConfig:
    # The encoder's architecture: the UNet's config (its decoder fields are not used here).
    unet: UNetSDConfig = field(default_factory=lambda: UNET_SD15)
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    channel_order: str = "rgb"  # "bgr": the control image's channels are reversed before the hint encoder
    global_pool_conditions: bool = False  # residuals averaged over space (the "shuffle" ControlNets)

    def __post_init__(self):
        # the fields only a UNet's decoder reads take one value, so equal encoders give equal configs
        object.__setattr__(self, "unet", replace(self.unet, out_channels=self.unet.in_channels, sample_size=64))
        object.__setattr__(self, "conditioning_embedding_out_channels",
                           tuple(int(c) for c in self.conditioning_embedding_out_channels))
        if not self.conditioning_embedding_out_channels:
            raise ValueError("conditioning_embedding_out_channels must name at least one width")
        if self.channel_order not in ("rgb", "bgr"):
            raise ValueError(f"channel_order must be 'rgb' or 'bgr', got {self.channel_order!r}")

    @property
    def hint_downscale(self) -> int:
        """How much smaller the hint features are than the control image (8 for SD1: 512 px -> 64 latents)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @property
    def num_down_residuals(self) -> int:
        u = self.unet
        n = len(u.block_out_channels)
        return 1 + n * u.layers_per_block + (n - 1)

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "ControlNetConfig":
        """From a ``ControlNetModel`` config.json dict; raises for features an SD1 ControlNet does not have."""
        down = list(cfg.get("down_block_types", ()))
        unet_cfg = dict(cfg)
        # the encoder config of a UNet, with the decoder it would mirror (UNetSDConfig validates the rest)
        unet_cfg["up_block_types"] = [t.replace("Down", "Up") for t in reversed(down)]
        unet_cfg["out_channels"] = cfg.get("in_channels", 4)
        unet_cfg.setdefault("cross_attention_dim", 1280)  # ControlNetModel's default
        unet = UNetSDConfig.from_diffusers(unet_cfg)
        if cfg.get("addition_embed_type_num_heads", 64) != 64 or cfg.get("encoder_hid_dim_type") is not None:
            raise ValueError("unsupported ControlNet config (SDXL-style text/time embeddings): not an SD1 ControlNet")
        hint = cfg.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)
        return cls(unet=unet, conditioning_channels=cfg.get("conditioning_channels", 3),
                   conditioning_embedding_out_channels=tuple(hint),
                   channel_order=cfg.get("controlnet_conditioning_channel_order", "rgb"),
                   global_pool_conditions=bool(cfg.get("global_pool_conditions", False)))

    def to_diffusers(self) -> dict:
        out = self.unet.to_diffusers()
        for k in ("out_channels", "up_block_types", "center_input_sample", "sample_size"):
            out.pop(k, None)
        out.update({"_class_name": "ControlNetModel", "conditioning_channels": self.conditioning_channels,
                    "conditioning_embedding_out_channels": list(self.conditioning_embedding_out_channels),
                    "controlnet_conditioning_channel_order": self.channel_order,
                    "global_pool_conditions": self.global_pool_conditions})
        return out


SD15 = ControlNetConfig()
TINY = ControlNetConfig(unet=UNET_TINY, conditioning_embedding_out_channels=(8, 16, 16, 32))
PRESETS = {"sd15": SD15, "tiny": TINY}


class ControlNetConditioningEmbedding(nn.Module):
    """The hint encoder: control image -> features at the latent resolution (keys ``conv_in``, ``blocks.{j}``,
    ``conv_out``; the original's ``input_hint_block.{0, 2, 4, ..., 14}``). Each SiLU is fused into its conv."""

    def __init__(self, out_channels: int, in_channels: int, widths: tuple[int, ...]):
        super().__init__()
        self.conv_in = Conv2d(in_channels, widths[0], 3, padding=1)
        blocks = []
        for c, c_next in zip(widths[:-1], widths[1:]):
            blocks += [Conv2d(c, c, 3, padding=1), Conv2d(c, c_next, 3, padding=1, stride=2)]
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = Conv2d(widths[-1], out_channels, 3, padding=1)

    def forward(self, hint: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(hint, silu=True)
        for conv in self.blocks:
            h = conv(h, silu=True)
        return self.conv_out(h)


class ControlNet(nn.Module):
    """``controlnet(latents, timesteps, context, control_image, conditioning_scale)`` ->
    ``(down_residuals, mid_residual)``: the UNet encoder's skips and mid output through zero convolutions.

    ``controlnet_cond`` is the control image (B or 1, conditioning_channels, H, W), values in [0, 1], at the
    output resolution: ``hint_downscale`` (8) times the latents' height and width.
    """

    def __init__(self, cfg: ControlNetConfig = SD15):
        super().__init__()
        self.config = cfg
        u = cfg.unet
        ch = u.block_out_channels
        n = len(ch)
        self.conv_in = Conv2d(u.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], u.time_embed_dim)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            ch[0], cfg.conditioning_channels, cfg.conditioning_embedding_out_channels)
        self.down_blocks = nn.ModuleList([
            DownBlock(ch[max(i - 1, 0)], ch[i], u, u.cross_attention[i], down=i < n - 1) for i in range(n)])
        # one zero convolution per skip: conv_in's output, then per level its layers and its downsampler
        skip_ch = [ch[0]]
        for i, c in enumerate(ch):
            skip_ch += [c] * u.layers_per_block + ([c] if i < n - 1 else [])
        self.controlnet_down_blocks = nn.ModuleList([Conv2d(c, c, 1) for c in skip_ch])
        self.mid_block = MidBlock(ch[-1], u)
        self.controlnet_mid_block = Conv2d(ch[-1], ch[-1], 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @classmethod
    def from_unet(cls, unet: UNetSD, *, conditioning_channels: int = 3,
                  conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)) -> "ControlNet":
        """A new ControlNet for ``unet``: its encoder weights copied (time embedding, conv_in, down and mid
        blocks), the hint encoder's convolutions at PyTorch's default initialisation, and the hint encoder's
        ``conv_out`` and every zero convolution at zero, so it starts as a no-op on the UNet's output."""
        cfg = ControlNetConfig(unet=unet.config,
                               conditioning_channels=conditioning_channels,
                               conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels))
        net = cls(cfg).to(device=unet.conv_in.weight.device, dtype=unet.dtype)
        for name in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
            getattr(net, name).load_state_dict(getattr(unet, name).state_dict(), strict=True)
        zero = [net.controlnet_cond_embedding.conv_out, net.controlnet_mid_block, *net.controlnet_down_blocks]
        with torch.no_grad():
            for m in zero:
                for p in m.parameters():
                    p.zero_()
        return net

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                controlnet_cond: torch.Tensor, conditioning_scale: float = 1.0
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        cfg, u = self.config, self.config.unet
        if sample.dim() != 4 or sample.shape[1] != u.in_channels:
            raise ValueError(f"ControlNet expects latents (B, {u.in_channels}, h, w), got {tuple(sample.shape)}")
        b, _, h, w = sample.shape
        if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[-1] != u.cross_attention_dim \
                or encoder_hidden_states.shape[0] != b:
            raise ValueError(f"ControlNet expects text embeddings ({b}, T, {u.cross_attention_dim}), "
                             f"got {tuple(encoder_hidden_states.shape)}")
        f = cfg.hint_downscale
        if (controlnet_cond.dim() != 4 or controlnet_cond.shape[0] not in (1, b)
                or controlnet_cond.shape[1] != cfg.conditioning_channels
                or tuple(controlnet_cond.shape[2:]) != (h * f, w * f)):
            raise ValueError(f"controlnet_cond must be a control image ({b} or 1, {cfg.conditioning_channels}, "
                             f"{h * f}, {w * f}) ({f}x the latents' size), got {tuple(controlnet_cond.shape)}")
        t = torch.as_tensor(timestep, device=sample.device)
        if t.dim() == 0:
            t = t[None]
        if t.dim() != 1 or t.shape[0] not in (1, b):
            raise ValueError(f"timestep must be a scalar or a (B,) tensor, got shape {tuple(t.shape)}")
        temb = timestep_embedding(t.expand(b), u.block_out_channels[0], u.flip_sin_to_cos, u.freq_shift)
        temb = self.time_embedding(temb.to(self.dtype))
        context = encoder_hidden_states.to(self.dtype)

        hint = controlnet_cond.to(self.dtype)
        if cfg.channel_order == "bgr":
            hint = hint.flip(1)
        hint = self.controlnet_cond_embedding(hint)
        x = self.conv_in(sample.to(self.dtype), residual=hint.expand(b, -1, -1, -1).contiguous())
        skips = [x]
        for blk in self.down_blocks:
            x = blk(x, temb, context, skips)
        x = self.mid_block(x, temb, context)

        down = [zc(s) for zc, s in zip(self.controlnet_down_blocks, skips)]
        mid = self.controlnet_mid_block(x)
        if conditioning_scale != 1.0:
            down = [d * conditioning_scale for d in down]
            mid = mid * conditioning_scale
        if cfg.global_pool_conditions:
            down = [d.mean(dim=(2, 3), keepdim=True) for d in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return down, mid


def controlnet_residuals(sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, controls
                         ) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
    """The summed ``(down_residuals, mid_residual)`` of every ``(controlnet, control_image, scale)`` in
    ``controls``, or ``(None, None)`` when none runs: the arguments of :class:`UNetSD`'s residual inputs.

    Several ControlNets' residuals are summed (diffusers' ``MultiControlNetModel``); one with ``scale == 0`` is
    not run at all (a denoiser outside ``[control_start, control_end]`` passes 0). A control image's batch may
    be 1, the sample's, or divide it: it is tiled, so ``b`` images serve a classifier-free-guided batch
    ``[uncond (b); cond (b)]``, each half seeing the same control. ``sample`` is the 4-channel latent also for
    an inpainting UNet (whose extra mask channels the ControlNet does not read).
    """
    b = sample.shape[0]
    down = mid = None
    for net, image, scale in controls:
        if scale == 0:
            continue
        n = image.shape[0]
        if n not in (1, b) and b % n:
            raise ValueError(f"a control image batch of {n} does not divide the sample batch of {b}")
        if n not in (1, b):
            image = image.repeat(b // n, 1, 1, 1)
        d, m = net(sample, timestep, encoder_hidden_states, image, conditioning_scale=scale)
        down = d if down is None else [a + r for a, r in zip(down, d)]
        mid = m if mid is None else mid + m
    return down, mid


def controlled_unet(unet: UNetSD, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                    controls) -> torch.Tensor:
    """``unet``'s output with the residuals of ``controls`` added (:func:`controlnet_residuals`); with every
    scale 0 (or no controls) this is the plain UNet call."""
    down, mid = controlnet_residuals(sample, timestep, encoder_hidden_states, controls)
    return unet(sample, timestep, encoder_hidden_states, down_block_additional_residuals=down,
                mid_block_additional_residual=mid)
