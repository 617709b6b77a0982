"""Stable Diffusion 3 / 3.5 checkpoints: the one place that renames keys between the layouts.

fastdiff's MMDiT (fastdiff/models/mmdit.py) uses diffusers' ``SD3Transformer2DModel`` names, so a diffusers
``transformer/`` folder is a strict copy. The ORIGINAL single files (Stability's ``sd3_medium.safetensors``,
``sd3.5_medium.safetensors``, ...) hold the MMDiT under ``model.diffusion_model.`` in the layout of the SD3
reference code (``mmdit.py`` / ``mmditx.py``)::

    x_embedder.proj.*              -> pos_embed.proj.*                 (the patch conv)
    pos_embed                      -> pos_embed.pos_embed              (the sin-cos table, stored)
    t_embedder.mlp.{0,2}.*         -> time_text_embed.timestep_embedder.linear_{1,2}.*
    y_embedder.mlp.{0,2}.*         -> time_text_embed.text_embedder.linear_{1,2}.*
    context_embedder.*             -> context_embedder.*
    joint_blocks.{i}.x_block.      -> transformer_blocks.{i}.
        attn.qkv.*   (fused, q;k;v rows)  -> attn.to_q / to_k / to_v
        attn.proj.*                       -> attn.to_out.0
        attn.ln_q / ln_k.weight           -> attn.norm_q / norm_k          (SD3.5 qk RMSNorm)
        attn2.{qkv, proj, ln_q, ln_k}     -> attn2.{to_q/k/v, to_out.0, norm_q, norm_k}   (SD3.5 MMDiT-X)
        adaLN_modulation.1.*              -> norm1.linear
        mlp.fc1 / fc2                     -> ff.net.0.proj / ff.net.2
    joint_blocks.{i}.context_block. -> transformer_blocks.{i}.
        attn.qkv.*                        -> attn.add_q_proj / add_k_proj / add_v_proj
        attn.proj.*                       -> attn.to_add_out
        attn.ln_q / ln_k.weight           -> attn.norm_added_q / norm_added_k
        adaLN_modulation.1.*              -> norm1_context.linear          (halves swapped in the last block)
        mlp.fc1 / fc2                     -> ff_context.net.0.proj / ff_context.net.2
    final_layer.linear.*           -> proj_out.*
    final_layer.adaLN_modulation.1.* -> norm_out.linear.*              (halves swapped)

The swaps: the original final layer and the last ("pre-only") context block split their 2-D modulation as
(shift, scale); diffusers' AdaLayerNormContinuous, which replaces them, splits (scale, shift). The 6-way and
9-way adaLN-Zero orders agree. Both directions are strict: a key that fits no rule raises
:class:`~fastdiff.io.checkpoint.CheckpointError` listing it, so nothing is silently dropped.
"""
from __future__ import annotations

import math
import re
from typing import Mapping

import torch

from fastdiff.io.checkpoint import (CheckpointError, build_on_meta, format_keys, load_state_dict_strict,
                                    materialize, tensor_map)
from fastdiff.models.mmdit import MMDiT, MMDiTConfig, sincos_pos_embed_2d

__all__ = [
    "MMDIT_PREFIX",
    "mmdit_from_original",
    "mmdit_to_original",
    "infer_mmdit_config",
    "load_mmdit_original",
]

MMDIT_PREFIX = "model.diffusion_model."

# Top-level modules, original -> fastdiff (applied to their .weight / .bias; pos_embed is a bare tensor).
_TOP = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
    "final_layer.linear": "proj_out",
}
_FINAL_ADALN = ("final_layer.adaLN_modulation.1", "norm_out.linear")  # (shift, scale) <-> (scale, shift)

# Modules inside joint_blocks.{i} -> inside transformer_blocks.{i}, one to one.
_BLOCK = {
    "x_block.attn.proj": "attn.to_out.0",
    "x_block.attn.ln_q": "attn.norm_q",
    "x_block.attn.ln_k": "attn.norm_k",
    "x_block.attn2.proj": "attn2.to_out.0",
    "x_block.attn2.ln_q": "attn2.norm_q",
    "x_block.attn2.ln_k": "attn2.norm_k",
    "x_block.adaLN_modulation.1": "norm1.linear",
    "x_block.mlp.fc1": "ff.net.0.proj",
    "x_block.mlp.fc2": "ff.net.2",
    "context_block.attn.proj": "attn.to_add_out",
    "context_block.attn.ln_q": "attn.norm_added_q",
    "context_block.attn.ln_k": "attn.norm_added_k",
    "context_block.adaLN_modulation.1": "norm1_context.linear",  # swapped halves in the last block
    "context_block.mlp.fc1": "ff_context.net.0.proj",
    "context_block.mlp.fc2": "ff_context.net.2",
}
_CONTEXT_ADALN = "context_block.adaLN_modulation.1"
# Fused projections of the original attention: rows [q; k; v] of one (3D, D) weight / (3D,) bias.
_QKV = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_PARAM = ("weight", "bias")
_ORIG_BLOCK = re.compile(r"joint_blocks\.(\d+)\.(.+)\.(weight|bias)$")
_OURS_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.(.+)\.(weight|bias)$")


def _swap_halves_now(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _swap_halves(t):
    """(shift, scale) <-> (scale, shift) along dim 0; its own inverse (a lazy tensor: when it is read)."""
    return tensor_map(t, _swap_halves_now)


def _qkv_part(j: int):
    def part(t: torch.Tensor) -> torch.Tensor:
        return t.chunk(3, dim=0)[j]
    return part


def _strip(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(MMDIT_PREFIX): v for k, v in sd.items()}


def _last_block(keys, pattern: re.Pattern, what: str) -> int:
    idx = [int(m.group(1)) for k in keys if (m := pattern.match(k))]
    if not idx:
        raise CheckpointError(f"no {what} keys: not an SD3 MMDiT state dict")
    return max(idx)


def mmdit_from_original(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original SD3 MMDiT keys (with or without ``model.diffusion_model.``) -> fastdiff / diffusers keys.

    Fused qkv tensors are split (views, no copy; lazy tensors split when read); the final layer's and the last
    context block's adaLN halves are swapped. Pass only the MMDiT's tensors: any key that is not part of an SD3/SD3.5 MMDiT raises
    :class:`CheckpointError` with the list.
    """
    sd = _strip(sd)
    last = _last_block(sd, _ORIG_BLOCK, "joint_blocks.*")
    top = {f"{o}.{p}": f"{n}.{p}" for o, n in _TOP.items() for p in _PARAM}
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for k, v in sd.items():
        if k == "pos_embed":
            out["pos_embed.pos_embed"] = v
        elif k in top:
            out[top[k]] = v
        elif k.startswith(_FINAL_ADALN[0] + ".") and k.rsplit(".", 1)[1] in _PARAM:
            out[f"{_FINAL_ADALN[1]}.{k.rsplit('.', 1)[1]}"] = _swap_halves(v)
        elif (m := _ORIG_BLOCK.match(k)) and (m.group(2) in _BLOCK or m.group(2) in _QKV):
            i, mod, p = int(m.group(1)), m.group(2), m.group(3)
            pre = f"transformer_blocks.{i}."
            if mod in _QKV:
                if v.shape[0] % 3:
                    raise CheckpointError(f"{k}: fused qkv of {v.shape[0]} rows is not a multiple of 3")
                for j, name in enumerate(_QKV[mod]):
                    out[f"{pre}{name}.{p}"] = tensor_map(v, _qkv_part(j))
            else:
                out[f"{pre}{_BLOCK[mod]}.{p}"] = _swap_halves(v) if (mod == _CONTEXT_ADALN and i == last) else v
        else:
            unknown.append(k)
    if unknown:
        raise CheckpointError(f"keys that are not part of an SD3 MMDiT ({len(unknown)}): {format_keys(unknown)}")
    return out


def mmdit_to_original(sd: Mapping[str, torch.Tensor], *, prefix: str = "") -> dict[str, torch.Tensor]:
    """fastdiff / diffusers MMDiT keys -> the original layout (the inverse of :func:`mmdit_from_original`),
    each key prefixed by ``prefix`` (``MMDIT_PREFIX`` for a single file). q, k and v are concatenated back
    into ``qkv``; a projection missing one of the three raises."""
    last = _last_block(sd, _OURS_BLOCK, "transformer_blocks.*")
    top = {f"{n}.{p}": f"{o}.{p}" for o, n in _TOP.items() for p in _PARAM}
    block = {n: o for o, n in _BLOCK.items()}
    qkv_part = {name: (orig, j) for orig, names in _QKV.items() for j, name in enumerate(names)}
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, list] = {}  # original qkv key -> [q, k, v]
    unknown = []
    for k, v in sd.items():
        if k == "pos_embed.pos_embed":
            out["pos_embed"] = v
        elif k in top:
            out[top[k]] = v
        elif k.startswith(_FINAL_ADALN[1] + ".") and k.rsplit(".", 1)[1] in _PARAM:
            out[f"{_FINAL_ADALN[0]}.{k.rsplit('.', 1)[1]}"] = _swap_halves(v)
        elif (m := _OURS_BLOCK.match(k)) and (m.group(2) in block or m.group(2) in qkv_part):
            i, mod, p = int(m.group(1)), m.group(2), m.group(3)
            pre = f"joint_blocks.{i}."
            if mod in qkv_part:
                orig, j = qkv_part[mod]
                pending.setdefault(f"{pre}{orig}.{p}", [None, None, None])[j] = v
            else:
                orig = block[mod]
                out[f"{pre}{orig}.{p}"] = _swap_halves(v) if (orig == _CONTEXT_ADALN and i == last) else v
        else:
            unknown.append(k)
    if unknown:
        raise CheckpointError(f"keys that are not part of fastdiff's MMDiT ({len(unknown)}): {format_keys(unknown)}")
    for key, parts in pending.items():
        if any(t is None for t in parts):
            raise CheckpointError(f"{key}: q, k and v projections are not all present (got "
                                  f"{['qkv'[j] for j, t in enumerate(parts) if t is not None]})")
        out[key] = torch.cat(parts, dim=0)
    return {prefix + k: v for k, v in out.items()}


def _infer_sample_size(pos: torch.Tensor, max_size: int, patch: int, dim: int) -> int | None:
    """The ``sample_size`` a standard SD3 table was built for, read from its values (None if not one).

    Token (row 0, col j) holds sin(j s), cos(j s) in channels 0 and dim/4, with s = base / max_size and
    base = sample_size / patch. s from token 1's phase, refined at a column whose phase is near 3 rad
    (the error of a bf16 table is divided by that column index), then checked against a recomputed row.
    """
    if pos.is_meta or max_size < 2:
        return None
    pos = materialize(pos)  # the table's values (a lazy tensor is read: one small table)
    row = pos.reshape(-1, dim)[:max_size].double()
    s = math.atan2(row[1, 0].item(), row[1, dim // 4].item())
    if not s > 0:
        return None
    j = min(max_size - 1, max(1, int(3.0 / s)))
    s = math.atan2(row[j, 0].item(), row[j, dim // 4].item()) / j
    base = round(s * max_size)
    if base < 1:
        return None
    want = sincos_pos_embed_2d(dim, max_size, base)[:max_size].double()
    tol = 1e-2 if pos.dtype in (torch.float16, torch.bfloat16) else 1e-5
    return base * patch if (want - row).abs().max().item() <= tol else None


def infer_mmdit_config(sd: Mapping[str, torch.Tensor]) -> MMDiTConfig:
    """An original-layout MMDiT state dict's :class:`MMDiTConfig`, from its shapes (meta tensors are fine).

    Depth from the joint_blocks count; hidden size, input channels and patch from ``x_embedder.proj``; heads
    = hidden / head_dim, with head_dim from the qk-norm weights when present, else SD3's 64; the table side
    from ``pos_embed``'s length; qk_norm from ``ln_q``; dual-attention layers from the blocks holding attn2;
    text widths from ``context_embedder``; ``sample_size`` from the table's values (128, every release's, when
    the values cannot tell: it only sets the table at init, and the table is loaded from the file).
    """
    sd = _strip(sd)

    def need(k):
        if k not in sd:
            raise CheckpointError(f"not an SD3 MMDiT state dict: missing {k}")
        return sd[k]

    xw = need("x_embedder.proj.weight")
    hidden, cin, patch = xw.shape[0], xw.shape[1], xw.shape[2]
    blocks = {int(m.group(1)) for k in sd if (m := _ORIG_BLOCK.match(k))}
    num_layers = max(blocks) + 1 if blocks else 0
    if sorted(blocks) != list(range(num_layers)) or not num_layers:
        raise CheckpointError(f"joint_blocks indices {sorted(blocks)[:8]}... are not 0..n-1")
    ln_q = sd.get("joint_blocks.0.x_block.attn.ln_q.weight")
    head_dim = ln_q.shape[0] if ln_q is not None else 64
    if hidden % head_dim:
        raise CheckpointError(f"hidden size {hidden} is not a multiple of the head dim {head_dim}")
    pos = need("pos_embed")
    n_pos = pos.shape[-2]
    max_size = math.isqrt(n_pos)
    if max_size * max_size != n_pos:
        raise CheckpointError(f"pos_embed has {n_pos} positions, not a square table")
    ctx_w = need("context_embedder.weight")
    final_w = need("final_layer.linear.weight")
    dual = tuple(sorted({int(m.group(1)) for k in sd if (m := _ORIG_BLOCK.match(k)) and
                         m.group(2).startswith("x_block.attn2.")}))
    sample = _infer_sample_size(pos, max_size, patch, hidden)
    try:
        return MMDiTConfig(
            sample_size=sample or 128, patch_size=patch, in_channels=cin, num_layers=num_layers,
            attention_head_dim=head_dim, num_attention_heads=hidden // head_dim,
            joint_attention_dim=ctx_w.shape[1], caption_projection_dim=ctx_w.shape[0],
            pooled_projection_dim=need("y_embedder.mlp.0.weight").shape[1],
            out_channels=final_w.shape[0] // (patch * patch), pos_embed_max_size=max_size,
            dual_attention_layers=dual, qk_norm="rms_norm" if ln_q is not None else None)
    except ValueError as e:
        raise CheckpointError(f"inconsistent SD3 MMDiT shapes: {e}") from None


def load_mmdit_original(sd: Mapping[str, torch.Tensor], *, config: MMDiTConfig | None = None,
                        dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> MMDiT:
    """An :class:`MMDiT` from an original-layout state dict (config inferred unless given), strict: every
    key used, every parameter present with its shape, else :class:`CheckpointError`."""
    cfg = config or infer_mmdit_config(sd)
    return load_state_dict_strict(build_on_meta(MMDiT, cfg), mmdit_from_original(sd), "SD3 MMDiT", dtype=dtype,
                                  device=device).eval()
