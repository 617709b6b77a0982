"""LoRA and ControlNet fine-tuning of a pretrained SD1 model: what the trainer's ``lora`` and ``controlnet`` kinds
add to a run (the loss of a micro-batch, the trainable parameters, the files a run exports).

Both kinds load an SD1 checkpoint (``TrainConfig.base``: a diffusers folder or an original single file) and a
folder of captioned images (``TrainConfig.data``, :mod:`fastdiff.train.image_folder`), freeze every base weight
and train the latent-diffusion loss of the base model's own schedule and prediction type (its
``scheduler_config``)::

    z0 = scaling_factor * E[z | x]         (the VAE posterior mean; cached once with ``cache``)
    t ~ U{0..T-1};  eps ~ N(0, I);  z_t = alpha_t z0 + sigma_t eps
    c = CLIP(caption), the empty caption with probability ``class_dropout``
    loss = || net(z_t, t, c) - target ||^2,    target = eps | v = alpha_t eps - sigma_t z0

- ``lora``: ``net`` is the UNet with a rank-``rank`` LoRA on every attention projection (``to_q``, ``to_k``,
  ``to_v``, ``to_out.0`` of self- and cross-attention), and with ``lora_text_encoder`` on the CLIP text
  encoder's ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` too. The LoRA runs as fastdiff's inference side path
  (:mod:`fastdiff.adapters.lora`, attached through the same file reader ``pipe.load_lora`` uses), with its
  factors made trainable: ``down`` starts as a Linear's default (Kaiming-uniform) init and ``up`` at zero, so
  step 0 is the base model (Hu et al. 2021). Scale alpha / r.
  A run exports ``lora/pytorch_lora_weights.safetensors`` (diffusers/peft) and ``lora/lora_kohya.safetensors``
  (kohya/A1111) at every checkpoint.
- ``controlnet``: ``net`` is the frozen UNet plus a ControlNet made from it (:meth:`ControlNet.from_unet`: the
  encoder copied, the zero convolutions at zero, so step 0 is the base model; Zhang et al. 2023), controlled by
  ``control`` maps of the training images (``canny``: :func:`fastdiff.control.canny` edges), computed once.
  A run exports ``controlnet/`` (a diffusers ``ControlNetModel`` folder that ``fastdiff.load_controlnet`` and
  diffusers read) at every checkpoint.

The exported weights are the trained ones, not the run's EMA (the EMA is kept in the checkpoint as for every
kind). Gradient checkpointing recomputes each ResBlock and transformer block of the UNet (and the ControlNet)
in the backward pass.
"""
from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastdiff.adapters.lora import LoraSet
from fastdiff.adapters.lora_save import lora_state_dict, save_lora
from fastdiff.control import canny
from fastdiff.io.controlnet_checkpoint import save_controlnet_diffusers
from fastdiff.io.sd_checkpoint import load_sd1_components
from fastdiff.models.blocks import ResBlock
from fastdiff.models.controlnet import ControlNet, controlled_unet
from fastdiff.models.unet_sd import Transformer2D
from fastdiff.samplers.schedules import NoiseSchedule, normalize_prediction
from fastdiff.train.image_folder import load_captioned_folder

__all__ = ["ADAPTER_KINDS", "CONTROLS", "UNET_LORA_TARGETS", "TEXT_LORA_TARGETS", "AdapterRun", "LoraWeights",
           "attach_lora", "check_adapter_config", "lora_target_modules", "set_block_checkpointing"]

ADAPTER_KINDS = ("lora", "controlnet")
CONTROLS = ("canny",)
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
LORA_DIR = "lora"
PEFT_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
CONTROLNET_DIR = "controlnet"
HINT_WIDTHS = (16, 32, 96, 256)
_LORA_NAME = "trained_lora"  # a key of an nn.ModuleDict: not the name of a Module attribute (train, training)


def check_adapter_config(cfg) -> None:
    """ValueError naming the first LoRA / ControlNet field no run can use (called by ``TrainConfig.check``)."""
    if not isinstance(cfg.base, str) or not cfg.base:
        raise ValueError(f"base must name an SD1 checkpoint (diffusers folder or single file) for kind {cfg.kind}")
    if not isinstance(cfg.data, str) or not cfg.data:
        raise ValueError(f"data must name a folder of images with captions for kind {cfg.kind}")
    if isinstance(cfg.rank, bool) or not isinstance(cfg.rank, int) or cfg.rank < 1:
        raise ValueError(f"rank must be a positive integer, got {cfg.rank!r}")
    if not (isinstance(cfg.alpha, (int, float)) and cfg.alpha > 0):
        raise ValueError(f"alpha must be a positive number, got {cfg.alpha!r}")
    if cfg.control not in CONTROLS:
        raise ValueError(f"control must be one of {', '.join(CONTROLS)}; got {cfg.control!r}")
    if cfg.lora_text_encoder and cfg.kind != "lora":
        raise ValueError("lora_text_encoder goes with kind lora")
    if cfg.autoencoder or cfg.hflip:
        raise ValueError(f"kind {cfg.kind} trains on the base model's own VAE latents: autoencoder and hflip "
                         "do not apply")
    if cfg.schedule == "flow" or cfg.prediction == "flow":
        raise ValueError(f"kind {cfg.kind} uses the base model's schedule and prediction (SD1: DDPM); "
                         "schedule/prediction flow do not apply")


def lora_target_modules(unet: nn.Module, text_encoder: nn.Module | None = None) -> list[tuple[str, str]]:
    """``(component, module)`` of every layer a trained LoRA covers, in a fixed order."""
    out = [("unet", n) for n, _ in unet.named_modules() if n.endswith(tuple("." + t for t in UNET_LORA_TARGETS))
           and (".attn1." in n or ".attn2." in n)]
    if text_encoder is not None:
        out += [("text_encoder", n) for n, _ in text_encoder.named_modules()
                if n.endswith(tuple("." + t for t in TEXT_LORA_TARGETS))]
    return out


class LoraWeights(nn.Module):
    """The trainable LoRA factors of a run: ``down.i`` (r, in) and ``up.i`` (out, r) of layer ``targets[i]``."""

    def __init__(self, targets: list[tuple[str, str]], shapes: list[tuple[int, int]], rank: int, alpha: float):
        super().__init__()
        self.targets = list(targets)
        self.rank, self.alpha = rank, float(alpha)
        self.down = nn.ParameterList()
        self.up = nn.ParameterList()
        for fan_in, fan_out in shapes:
            d = torch.empty(rank, fan_in)
            nn.init.kaiming_uniform_(d, a=math.sqrt(5))  # what nn.Linear (and peft's lora_A) start from
            self.down.append(nn.Parameter(d))
            self.up.append(nn.Parameter(torch.zeros(fan_out, rank)))

    def layers(self) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
        return {k: (d, u) for k, d, u in zip(self.targets, self.down, self.up)}


def _checkpointed(module: nn.Module):
    plain = type(module).forward.__get__(module)

    def forward(*args, **kwargs):
        if torch.is_grad_enabled():
            return checkpoint(plain, *args, use_reentrant=False, **kwargs)
        return plain(*args, **kwargs)

    return forward


def set_block_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Recompute every ResBlock and transformer block of an SD-style UNet / ControlNet in the backward pass
    (their forward is wrapped per instance; the module tree and state_dict stay as they are). Returns how many
    blocks are affected."""
    n = 0
    for m in model.modules():
        if isinstance(m, (ResBlock, Transformer2D)):
            if enabled:
                m.forward = _checkpointed(m)
            else:
                m.__dict__.pop("forward", None)
            n += 1
    return n


def attach_lora(weights: LoraWeights, comps: dict[str, nn.Module | None]) -> LoraSet:
    """Attach ``weights`` to the components' layers through the file reader inference uses (a peft state dict:
    the same names, shapes and alpha / r), then make each side path's factors the trainable parameters of
    ``weights`` (the same tensors the optimizer updates). Returns the :class:`LoraSet` (LoRA name ``trained_lora``)."""
    sd, meta = lora_state_dict(weights.layers(), alpha=weights.alpha, fmt="peft")
    lset = LoraSet(comps)
    lset.load(sd, metadata=meta, name=_LORA_NAME)
    adapters = {}
    for comp, model in lset.components.items():
        for name, m in model.named_modules():
            if hasattr(m, "lora_adapters") and _LORA_NAME in m.lora_adapters:
                adapters[(comp, name)] = m.lora_adapters[_LORA_NAME]
    if set(adapters) != set(weights.targets):
        raise RuntimeError(f"LoRA attached to {len(adapters)} layers, expected {len(weights.targets)}")
    for key, d, u in zip(weights.targets, weights.down, weights.up):
        a = adapters[key]
        del a._buffers["down"], a._buffers["up"]
        # plain attributes, not registered: the side path computes with the trainable tensors of ``weights``,
        # while the model's own parameters() and state_dict() stay those of the frozen base model
        a.__dict__["down"], a.__dict__["up"] = d, u
    return lset


class AdapterRun:
    """The frozen SD1 model, the captioned data and the trainable part of a ``lora`` / ``controlnet`` run."""

    def __init__(self, cfg, device: torch.device, autocast):
        self.cfg, self.device, self._autocast = cfg, device, autocast
        c = load_sd1_components(cfg.base, dtype=torch.float32, device=device)
        self.unet, self.vae, self.text_encoder, self.tokenizer = c.unet, c.vae, c.text_encoder, c.tokenizer
        for m in (self.unet, self.vae, self.text_encoder):
            m.requires_grad_(False).eval()
        self.scheduler_config = dict(c.scheduler_config)
        self.prediction = normalize_prediction(self.scheduler_config.get("prediction_type", "epsilon"))
        if self.prediction not in ("eps", "v"):
            raise ValueError(f"base: prediction type {self.prediction!r} is not trained here (eps and v are)")
        self.schedule = NoiseSchedule.from_diffusers_config(self.scheduler_config)
        self._alpha = self.schedule.alphas.float().to(device)
        self._sigma = self.schedule.sigmas_vp.float().to(device)
        ucfg = self.unet.config
        factor = self.vae.downscale * 2 ** (len(ucfg.block_out_channels) - 1)
        if cfg.image_size % factor:
            raise ValueError(f"image_size {cfg.image_size} must be a multiple of {factor} for this model (VAE "
                             f"downscale {self.vae.downscale}, {len(ucfg.block_out_channels)} UNet levels)")
        self.images = load_captioned_folder(cfg.data, size=cfg.image_size, channels=self.vae.config.in_channels)

        train_text = cfg.kind == "lora" and cfg.lora_text_encoder
        if cfg.kind == "lora":
            targets = lora_target_modules(self.unet, self.text_encoder if train_text else None)
            comps = {"unet": self.unet, "text_encoder": self.text_encoder}
            shapes = [(comps[k].get_submodule(m).in_features, comps[k].get_submodule(m).out_features)
                      for k, m in targets]
            self.trainable = LoraWeights(targets, shapes, cfg.rank, cfg.alpha).to(device)
            self._attach_lora(comps)
            self.controlnet = None
        else:
            # SD1's hint encoder (16, 32, 96, 256) downscales 8x like its VAE; a VAE of another downscale f gets
            # the first log2(f) + 1 of those widths, so the control image is at the output resolution
            hint = HINT_WIDTHS[:int(math.log2(self.vae.downscale)) + 1]
            self.trainable = self.controlnet = ControlNet.from_unet(self.unet, conditioning_embedding_out_channels=hint)
            self.controls = (canny(self.images.images) > 0.5).to(torch.uint8)  # (N, 3, H, W), 0/1
        self.trainable.train()
        if cfg.grad_checkpointing:
            for m in (self.unet, self.controlnet, self.text_encoder if train_text else None):
                if m is not None:
                    set_block_checkpointing(m)
        self.train_text = train_text

        self.latents = self.text_cache = None
        if cfg.cache:
            self.latents = torch.cat([self._encode_images(torch.arange(i, min(i + 16, len(self.images))))
                                      for i in range(0, len(self.images), 16)])
            if not train_text:
                texts = self.images.captions + [""]
                self.text_cache = torch.cat([self._encode_text(texts[i:i + 16]) for i in range(0, len(texts), 16)])

    # ------------------------------------------------------------------------------------------ set-up
    def _attach_lora(self, comps: dict) -> None:
        self.lora_set = attach_lora(self.trainable, comps)

    def arch(self) -> dict:
        """What a resumed run must find unchanged: the base UNet, the adapter's shape."""
        d = {"kind": self.cfg.kind, "unet_sd": asdict(self.unet.config), "vae": asdict(self.vae.config)}
        if self.cfg.kind == "lora":
            d.update(rank=self.cfg.rank, alpha=float(self.cfg.alpha),
                     targets=[list(t) for t in self.trainable.targets])
        else:
            d.update(control=self.cfg.control, controlnet=asdict(self.controlnet.config))
        return d

    # ------------------------------------------------------------------------------------------ the loss
    @torch.no_grad()
    def _encode_images(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.images.pixels(idx).to(self.device)
        with self._autocast():
            z = self.vae.encode(x).mean
        return self.vae.to_latents(z.float())

    def _encode_text(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts).to(self.device)
        with torch.set_grad_enabled(self.train_text and torch.is_grad_enabled()), self._autocast():
            return self.text_encoder(ids).float()

    def _context(self, idx: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        if self.text_cache is not None:
            rows = torch.where(drop, torch.full_like(idx, len(self.images)), idx)
            return self.text_cache[rows.to(self.text_cache.device)]
        texts = ["" if d else c for c, d in zip(self.images.text(idx), drop.tolist())]
        return self._encode_text(texts)

    def loss(self, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """The mean-squared diffusion loss of the images ``idx`` (noise, timesteps and dropout drawn from ``g``)."""
        cfg = self.cfg
        b = len(idx)
        t = torch.randint(0, self.schedule.num_train_timesteps, (b,), generator=g)
        drop = torch.rand(b, generator=g) < cfg.class_dropout
        z0 = self.latents[idx.to(self.latents.device)] if self.latents is not None else self._encode_images(idx)
        noise = torch.randn(z0.shape, generator=g).to(self.device)
        t = t.to(self.device)
        a, s = self._alpha[t][:, None, None, None], self._sigma[t][:, None, None, None]
        zt = a * z0 + s * noise
        target = noise if self.prediction == "eps" else a * noise - s * z0   # v = alpha eps - sigma z0
        ctx = self._context(idx, drop)
        with self._autocast():
            if self.controlnet is None:
                out = self.unet(zt, t, ctx)
            else:
                hint = self.controls[idx].to(self.device, torch.float32)
                out = controlled_unet(self.unet, zt, t, ctx, [(self.controlnet, hint, 1.0)])
        return F.mse_loss(out.float(), target)

    # ------------------------------------------------------------------------------------------ export
    def export(self, run_dir: str | Path, trained: nn.Module) -> Path:
        """Write the trained adapter (``trained``: the run's trainable module) where users' tools read it."""
        run_dir = Path(run_dir)
        if self.cfg.kind == "lora":
            out = run_dir / LORA_DIR
            layers = trained.layers()
            save_lora(out / PEFT_FILE, layers, alpha=trained.alpha, fmt="peft")
            save_lora(out / KOHYA_FILE, layers, alpha=trained.alpha, fmt="kohya")
            return out
        out = run_dir / CONTROLNET_DIR
        save_controlnet_diffusers(trained, out)
        return out
