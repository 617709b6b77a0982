"""Writing LoRA files for SD1 in the two formats users' tools read.

A LoRA here is a mapping ``(component, module) -> (down, up)``: ``component`` is ``"unet"`` or
``"text_encoder"``, ``module`` the fastdiff module path (diffusers' names: ``down_blocks.0.attentions.0.
transformer_blocks.0.attn1.to_q``, ``text_model.encoder.layers.0.self_attn.q_proj``), ``down`` (r, in) and
``up`` (out, r); every layer shares one ``alpha``, so ``delta W = alpha / r * up @ down``.

- kohya / sd-scripts (what A1111 and ComfyUI load): ``lora_unet_<module with "_">.lora_down.weight``,
  ``.lora_up.weight``, ``.alpha``; ``lora_te_...`` for the text encoder; kohya's ``ss_network_*`` header fields.
- diffusers / peft (``pytorch_lora_weights.safetensors``, what ``load_lora_weights`` reads):
  ``unet.<module>.lora_A.weight`` (down) / ``.lora_B.weight`` (up), ``text_encoder.<module>`` without the
  ``text_model.`` level (transformers 5 names; fastdiff reads both), and peft's rank and alpha in the header's
  ``lora_adapter_metadata`` JSON (``unet.r``, ``unet.lora_alpha``, ``unet.target_modules``, likewise for the text
  encoder).

Both files load back into fastdiff with ``pipe.load_lora(path)`` (:mod:`fastdiff.adapters.lora_keys`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch

__all__ = ["LORA_FORMATS", "lora_state_dict", "save_lora"]

LORA_FORMATS = ("kohya", "peft")
_COMPONENTS = {"unet": ("lora_unet_", "unet."), "text_encoder": ("lora_te_", "text_encoder.")}


def _check(layers: Mapping, alpha: float) -> int:
    if not layers:
        raise ValueError("save_lora: no LoRA layers to save")
    ranks = set()
    for (comp, module), (down, up) in layers.items():
        if comp not in _COMPONENTS:
            raise ValueError(f"save_lora: component must be one of {', '.join(_COMPONENTS)}, got {comp!r}")
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"save_lora: {comp}.{module}: down (r, in) and up (out, r) expected, got "
                             f"{tuple(down.shape)} and {tuple(up.shape)}")
        ranks.add(down.shape[0])
    if len(ranks) != 1:
        raise ValueError(f"save_lora: every layer must have the same rank (one alpha / r), got ranks {sorted(ranks)}")
    if not (isinstance(alpha, (int, float)) and alpha > 0):
        raise ValueError(f"save_lora: alpha must be a positive number, got {alpha!r}")
    return ranks.pop()


def lora_state_dict(layers: Mapping[tuple[str, str], tuple[torch.Tensor, torch.Tensor]], *, alpha: float,
                    fmt: str = "peft", dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor],
                                                                                  dict[str, str]]:
    """(tensors on their device, safetensors header metadata) of ``layers`` in format ``fmt`` (``kohya`` or
    ``peft``)."""
    if fmt not in LORA_FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(LORA_FORMATS)}, got {fmt!r}")
    rank = _check(layers, alpha)

    def cast(t):
        t = t.detach()
        return (t.to(dtype) if dtype is not None else t).contiguous()

    sd: dict[str, torch.Tensor] = {}
    if fmt == "kohya":
        for (comp, module), (down, up) in layers.items():
            flat = _COMPONENTS[comp][0] + module.replace(".", "_")
            sd[f"{flat}.lora_down.weight"] = cast(down)
            sd[f"{flat}.lora_up.weight"] = cast(up)
            sd[f"{flat}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32, device=down.device)
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
                "ss_base_model_version": "sd_v1"}
        return sd, meta
    targets: dict[str, set[str]] = {}
    for (comp, module), (down, up) in layers.items():
        name = module.removeprefix("text_model.") if comp == "text_encoder" else module
        sd[f"{_COMPONENTS[comp][1]}{name}.lora_A.weight"] = cast(down)
        sd[f"{_COMPONENTS[comp][1]}{name}.lora_B.weight"] = cast(up)
        targets.setdefault(comp, set()).add(name)
    peft = {}
    for comp, names in targets.items():
        peft.update({f"{comp}.r": rank, f"{comp}.lora_alpha": float(alpha), f"{comp}.target_modules": sorted(names)})
    return sd, {"format": "pt", "lora_adapter_metadata": json.dumps(peft)}


def save_lora(path: str | os.PathLike, layers: Mapping[tuple[str, str], tuple[torch.Tensor, torch.Tensor]], *,
              alpha: float, fmt: str = "peft", dtype: torch.dtype | None = None) -> Path:
    """Write ``layers`` as a ``.safetensors`` LoRA file in format ``fmt``; the file is replaced atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_lora: path must end in .safetensors, got {str(path)!r}")
    sd, meta = lora_state_dict(layers, alpha=alpha, fmt=fmt, dtype=dtype)
    sd = {k: v.cpu() for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path
