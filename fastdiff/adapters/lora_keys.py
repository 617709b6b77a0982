"""LoRA files -> one list of low-rank pairs keyed by the fastdiff module they apply to.

Formats read (the component each key belongs to in brackets):

- kohya / sd-scripts / A1111 (LoCon included): ``lora_unet_<module>`` [unet], ``lora_te_<module>`` [text encoder],
  each with ``.lora_down.weight`` (r, in) or (r, in, kh, kw), ``.lora_up.weight`` (out, r) or (out, r, 1, 1) and an
  optional ``.alpha``; ``<module>`` is the module path with every "." written "_", in diffusers' names
  (``down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``) or the original LDM ones
  (``input_blocks_1_1_transformer_blocks_0_attn1_to_q``, ``input_blocks_1_0_in_layers_2``). Scale: alpha / r
  (no alpha: 1).
- diffusers / peft: ``unet.<module>.lora_A.weight`` / ``.lora_B.weight`` and ``text_encoder.<module>...``; alpha
  from the safetensors header's ``lora_adapter_metadata`` (peft's ``lora_alpha``, ``alpha_pattern``,
  ``use_rslora``) or ``<module>.alpha`` keys, else alpha = r (scale 1).
- the older diffusers attention-processor format: ``<attention>.processor.to_q_lora.down.weight`` (``to_k``,
  ``to_v``, ``to_out`` -> ``to_out.0``), text-encoder ``self_attn.to_q_lora`` (-> ``q_proj``, ``to_out`` ->
  ``out_proj``) and ``<module>.lora_linear_layer.down.weight`` / ``<module>.lora.down.weight``. Scale 1.

LoHa / LoKr (``hada_*``, ``lokr_*``), Tucker LoCon (``lora_mid``) and DoRA (``dora_scale``,
``lora_magnitude_vector``) are refused by name. A LoRA made for another architecture (SDXL, SD2, SD3, Flux) is
named as such, from its key names or its shapes; keys that match no module of the model are listed.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from fastdiff.io.checkpoint import CheckpointError, format_keys
from fastdiff.quant.int8 import Int8Conv2d, Int8Linear

__all__ = ["LoraError", "LoraPair", "convert_lora_state_dict"]


class LoraError(CheckpointError):
    """A LoRA file that cannot be applied to this model: unsupported format, other architecture, unknown keys."""


@dataclass
class LoraPair:
    """One low-rank update ``delta W = scale * up @ down`` of module ``module`` in component ``component``."""

    component: str
    module: str
    down: torch.Tensor   # (r, in) or (r, in, kh, kw)
    up: torch.Tensor     # (out, r) or (out, r, 1, 1)
    scale: float         # alpha / r (or alpha / sqrt(r) for rsLoRA)
    key: str             # the file's key of the down weight, for messages


# ------------------------------------------------------------------------------------------ refused formats
_REFUSED = [
    (("hada_w1", "hada_w2", "hada_t1", "hada_t2"), "LoHa (LyCORIS Hadamard-product, hada_* keys)"),
    (("lokr_w1", "lokr_w2", "lokr_t2"), "LoKr (LyCORIS Kronecker-product, lokr_* keys)"),
    (("dora_scale", "lora_magnitude_vector"), "DoRA (dora_scale / lora_magnitude_vector keys)"),
    (("lora_mid",), "LoCon with a Tucker-decomposed middle (lora_mid keys)"),
    ((".oft_", "oft_blocks", ".boft_"), "OFT/BOFT"),
]


def _refuse_unsupported(keys: list[str]) -> None:
    for marks, what in _REFUSED:
        hit = [k for k in keys if any(m in k for m in marks)]
        if hit:
            raise LoraError(f"{what} is not supported: only plain LoRA (down/up or lora_A/lora_B pairs) is; "
                            f"found {format_keys(hit, 4)}")


# ------------------------------------------------------------------------------------ other architectures
def _foreign_architecture(keys: list[str], arch: str) -> str | None:
    """The name of the architecture a LoRA's key names say it was made for, when that is not ``arch``."""
    def any_key(*pats):
        return any(re.search(p, k) for p in pats for k in keys)

    flux = any_key(r"^lora_unet_(double|single)_blocks_", r"^(transformer\.)?(single_transformer_blocks|"
                   r"double_blocks|single_blocks)\.", r"^lora_transformer_single_transformer_blocks_")
    sd3 = any_key(r"^lora_unet_joint_blocks_", r"^lora_te3_", r"^text_encoder_3\.", r"^transformer\.transformer_blocks\.",
                  r"context_block", r"^lora_transformer_transformer_blocks_")
    sdxl = any_key(r"^lora_te2_", r"^text_encoder_2\.", r"label_emb", r"add_embedding",
                   r"transformer_blocks[._][1-9]", r"^lora_te1_")
    if flux:
        found = "Flux"
    elif sd3:
        found = "SD3 (MMDiT)"
    elif sdxl:
        found = "SDXL"
    else:
        found = None
    if arch == "sd1":
        return found
    if arch == "sd3":
        if found in ("Flux",):
            return found
        if any_key(r"^lora_unet_(down|up|mid|input|output|middle)_block", r"^unet\.", r"\.processor\.to_q_lora"):
            return "SDXL" if sdxl else "SD1/SD2 (a UNet)"
    return None


def _shape_architecture(component: str, module: str, want_in: int, got_in: int) -> str | None:
    """Name the architecture a LoRA's input width betrays (cross-attention context / CLIP hidden width)."""
    if component == "unet" and re.search(r"attn2\.to_[kv]$", module):
        return {1024: "SD2 (1024-wide OpenCLIP-H text embeddings)",
                2048: "SDXL (2048-wide text embeddings)", 768: "SD1 (768-wide CLIP-L text embeddings)"}.get(got_in)
    if component.startswith("text_encoder"):
        return {1024: "SD2 (OpenCLIP-H text encoder, width 1024)", 1280: "SDXL (OpenCLIP-G text encoder, width 1280)",
                768: "SD1 (CLIP-L text encoder, width 768)"}.get(got_in)
    return None


# ------------------------------------------------------------------------------------------- name tables
def _lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear / Conv2d (float or int8) of ``model`` by its module path."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d, Int8Linear, Int8Conv2d)) and n}


def _underscore_table(component: str, model: nn.Module, modules: Mapping[str, nn.Module]) -> dict[str, str]:
    """kohya's flat names (path with "_" for ".") -> module path; for the SD1 UNet the original LDM names too."""
    table: dict[str, str] = {}
    clash: set[str] = set()

    def add(flat, name):
        if flat in table and table[flat] != name:
            clash.add(flat)
        table[flat] = name

    for name in modules:
        add(name.replace(".", "_"), name)
    cfg = getattr(model, "config", None)
    if component == "unet" and cfg is not None and hasattr(cfg, "layers_per_block"):
        from fastdiff.io.sd_checkpoint import unet_key_to_original

        for name in modules:
            try:
                orig = unet_key_to_original(name + ".weight", cfg)
            except KeyError:
                continue
            add(orig.removesuffix(".weight").replace(".", "_"), name)
    if component == "transformer" and hasattr(cfg, "num_layers"):
        table.update(_mmdit_original_table(model, modules))
    for flat in clash:  # an ambiguous flat name maps to nothing (reported as unmatched)
        del table[flat]
    return table


def _mmdit_original_table(model: nn.Module, modules: Mapping[str, nn.Module]) -> dict[str, str]:
    """kohya's SD3 names (the original ``joint_blocks_{i}_x_block_attn_qkv``, ...) -> module path; a fused qkv
    maps to ``"qkv:" + "|".join(q, k, v paths)``, its up rows split three ways when the LoRA is applied. The two
    adaLN layers stored with swapped halves (final layer, last context block) are left out."""
    from fastdiff.io.sd3_checkpoint import _BLOCK, _CONTEXT_ADALN, _QKV, _TOP

    table = {orig.replace(".", "_"): ours for orig, ours in _TOP.items() if ours in modules}
    n_blocks = len(getattr(model, "transformer_blocks", ()))
    for i in range(n_blocks):
        for orig, ours in _BLOCK.items():
            if ours in modules or f"transformer_blocks.{i}.{ours}" in modules:
                if orig == _CONTEXT_ADALN and i == n_blocks - 1:
                    continue
                table[f"joint_blocks_{i}_{orig}".replace(".", "_")] = f"transformer_blocks.{i}.{ours}"
        for orig, parts in _QKV.items():
            paths = [f"transformer_blocks.{i}.{p}" for p in parts]
            if all(p in modules for p in paths):
                table[f"joint_blocks_{i}_{orig}".replace(".", "_")] = "qkv:" + "|".join(paths)
    return {k: v for k, v in table.items() if v.startswith("qkv:") or v in modules}


# ------------------------------------------------------------------------------------------------ parsing
_KOHYA_PREFIX = {"sd1": {"lora_unet_": "unet", "lora_te_": "text_encoder"},
                 "sd3": {"lora_unet_": "transformer", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2",
                         "lora_te3_": "text_encoder_3"}}
_OLD_ATTN = re.compile(r"^(.*?)(\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_OLD_LINEAR = re.compile(r"^(.*)\.(lora_linear_layer|lora)\.(down|up)\.weight$")
_PEFT = re.compile(r"^(.*)\.lora_(A|B)(?:\.default)?\.weight$")


def _split_component(key: str, components: Mapping[str, nn.Module], default: str) -> tuple[str, str]:
    head, _, rest = key.partition(".")
    if head in components:
        return head, rest
    if head == "base_model" and rest.startswith("model."):  # a raw peft save of one model
        return default, rest[len("model."):]
    return default, key


def _old_attention_target(component: str, path: str, proj: str) -> str:
    if component.startswith("text_encoder"):
        return f"{path}.{ {'to_q': 'q_proj', 'to_k': 'k_proj', 'to_v': 'v_proj', 'to_out': 'out_proj'}[proj] }"
    return f"{path}.{'to_out.0' if proj == 'to_out' else proj}"


def _peft_alpha(meta: Mapping | None, module: str, rank: int) -> tuple[float, bool]:
    """(alpha, use_rslora) for ``module`` from peft's LoraConfig fields in the file's metadata (alpha = r if none)."""
    if not meta:
        return float(rank), False
    alpha = meta.get("lora_alpha", rank)
    for pat, a in (meta.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?{pat}$", module):
            alpha = a
            break
    return float(alpha), bool(meta.get("use_rslora", False))


def convert_lora_state_dict(sd: Mapping[str, torch.Tensor], components: Mapping[str, nn.Module], *,
                            arch: str = "sd1", metadata: Mapping | None = None) -> list[LoraPair]:
    """The low-rank pairs of a LoRA state dict, each matched to a Linear/Conv2d of ``components``.

    ``components``: name -> model (SD1: ``unet``, ``text_encoder``; SD3: ``transformer``, ``text_encoder``,
    ``text_encoder_2``, ``text_encoder_3``). ``metadata``: the safetensors header metadata (its
    ``lora_adapter_metadata`` JSON carries peft's alphas). Raises :class:`LoraError` for an unsupported format,
    another architecture, shapes that do not fit, or keys that match no module (all of them listed).
    """
    keys = list(sd)
    if not keys:
        raise LoraError("the LoRA file holds no tensors")
    _refuse_unsupported(keys)
    other = _foreign_architecture(keys, arch)
    if other:
        raise LoraError(f"this LoRA was made for {other}, not {'SD1' if arch == 'sd1' else 'SD3'}: "
                        f"keys such as {format_keys(keys, 3)}")
    default = "unet" if arch == "sd1" else "transformer"
    modules = {c: _lora_modules(m) for c, m in components.items() if m is not None}
    peft_meta = _peft_metadata(metadata)

    found: dict[tuple[str, str], dict] = {}   # (component, module, source) -> {"down","up","alpha","key"}
    used: set[str] = set()
    unmatched: list[str] = []

    def slot(comp, module, key):
        return found.setdefault((comp, module), {"key": key, "comp": comp})

    kohya = _KOHYA_PREFIX[arch]
    tables: dict[str, dict[str, str]] = {}
    for key in keys:
        prefix = next((p for p in kohya if key.startswith(p)), None)
        if prefix is not None:
            comp = kohya[prefix]
            flat, _, suffix = key.partition(".")
            if comp not in modules:
                unmatched.append(key)
                continue
            if comp not in tables:
                tables[comp] = _underscore_table(comp, components[comp], modules[comp])
            module = tables[comp].get(flat[len(prefix):])
            field = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(suffix)
            if module is None or field is None:
                unmatched.append(key)
                continue
            s = slot(comp, module, key)
            s[field] = sd[key]
            s["kind"] = "kohya"
            used.add(key)
            continue
        comp, rest = _split_component(key, modules, default)
        m = _PEFT.match(rest)
        if m:
            s = slot(comp, m.group(1), key)
            s["down" if m.group(2) == "A" else "up"] = sd[key]
            s["kind"] = "peft"
            used.add(key)
            continue
        m = _OLD_ATTN.match(rest)
        if m:
            s = slot(comp, _old_attention_target(comp, m.group(1), m.group(3)), key)
            s[m.group(4)] = sd[key]
            s["kind"] = "old"
            used.add(key)
            continue
        m = _OLD_LINEAR.match(rest)
        if m:
            s = slot(comp, m.group(1), key)
            s[m.group(3)] = sd[key]
            s["kind"] = "old"
            used.add(key)
            continue
        if rest.endswith(".alpha"):
            s = slot(comp, rest[: -len(".alpha")], key)
            s["alpha"] = sd[key]
            used.add(key)
            continue
        unmatched.append(key)

    pairs: list[LoraPair] = []
    for (comp, module), s in list(found.items()):
        if module.startswith("qkv:") and "down" in s and "up" in s:
            # a LoRA on a fused (3D, D) qkv: one down, the up's rows [q; k; v] go to the three projections
            parts = module[len("qkv:"):].split("|")
            if s["up"].shape[0] % 3:
                raise LoraError(f"fused qkv LoRA {s['key']}: up has {s['up'].shape[0]} rows, not a multiple of 3")
            del found[(comp, module)]
            for part, up in zip(parts, s["up"].chunk(3, dim=0)):
                found[(comp, part)] = {**s, "up": up}
    for (comp, module), s in found.items():
        if comp.startswith("text_encoder") and comp in modules and module not in modules[comp]:
            # transformers >= 5 names CLIP's layers without the "text_model." level; files from either era load
            module = "text_model." + module if "text_model." + module in modules[comp] else module
        if comp not in modules or module not in modules[comp]:
            unmatched.append(s["key"])
            continue
        if "down" not in s or "up" not in s:
            raise LoraError(f"LoRA for {comp}.{module} has {'no up' if 'down' in s else 'no down'} weight "
                            f"(key {s['key']})")
        target = modules[comp][module]
        down, up = _fit_shapes(comp, module, target, s["down"], s["up"], s["key"])
        rank = down.shape[0]
        if s.get("kind") == "peft" and "alpha" not in s:
            alpha, rs = _peft_alpha(peft_meta.get(comp), module, rank)
            scale = alpha / math.sqrt(rank) if rs else alpha / rank
        else:
            alpha = s.get("alpha")
            scale = 1.0 if alpha is None else float(torch.as_tensor(alpha).float().item()) / rank
        pairs.append(LoraPair(comp, module, down, up, scale, s["key"]))
    if unmatched:
        have = ", ".join(f"{c} ({len(m)} linear/conv layers)" for c, m in modules.items())
        raise LoraError(f"{len(unmatched)} LoRA keys match no layer of this model ({have}): "
                        f"{format_keys(unmatched, 8)}")
    if not pairs:
        raise LoraError(f"no LoRA pairs found; keys: {format_keys(keys, 6)}")
    return pairs


def _peft_metadata(metadata: Mapping | None) -> dict[str, dict]:
    """diffusers' ``lora_adapter_metadata`` (``{"unet.r": 4, "unet.lora_alpha": 8, ...}``) -> per component."""
    import json

    if not metadata or "lora_adapter_metadata" not in metadata:
        return {}
    raw = metadata["lora_adapter_metadata"]
    try:
        flat = json.loads(raw) if isinstance(raw, str) else dict(raw)
    except ValueError:
        raise LoraError("the file's lora_adapter_metadata is not valid JSON") from None
    out: dict[str, dict] = {}
    for k, v in flat.items():
        comp, _, field = k.partition(".")
        if field:
            out.setdefault(comp, {})[field] = v
    return out


def _fit_shapes(comp: str, module: str, target: nn.Module, down: torch.Tensor, up: torch.Tensor, key: str):
    """Check the pair against the layer (and reshape 1x1-conv pairs of linear layers and back)."""
    is_conv = isinstance(target, (nn.Conv2d, Int8Conv2d))
    if is_conv:
        want_in, want_out = target.in_channels, target.out_channels
        kh, kw = target.kernel_size
        if target.groups != 1 or target.padding_mode != "zeros":
            raise LoraError(f"{comp}.{module}: LoRA on a grouped or non-zero-padded convolution is not supported")
        if down.dim() == 2 and (kh, kw) == (1, 1):
            down = down[:, :, None, None]
        if up.dim() == 2:
            up = up[:, :, None, None]
    else:
        want_in, want_out = target.in_features, target.out_features
        if down.dim() == 4 and down.shape[2:] == (1, 1):
            down = down[:, :, 0, 0]
        if up.dim() == 4 and up.shape[2:] == (1, 1):
            up = up[:, :, 0, 0]
    got_in, got_out = down.shape[1] if down.dim() > 1 else -1, up.shape[0]
    if got_in != want_in or got_out != want_out:
        other = _shape_architecture(comp, module, want_in, got_in)
        where = f"{comp}.{module} takes {want_in} -> {want_out} features, the LoRA ({key}) {got_in} -> {got_out}"
        if other:
            raise LoraError(f"this LoRA was made for {other}, not this model: {where}")
        raise LoraError(f"LoRA shapes do not fit: {where}")
    ok = (down.dim() == 4 and up.dim() == 4 and down.shape[2:] == target.kernel_size and up.shape[2:] == (1, 1)
          if is_conv else down.dim() == 2 and up.dim() == 2)
    if not ok or down.shape[0] != up.shape[1]:
        raise LoraError(f"LoRA shapes do not fit {comp}.{module} ({type(target).__name__}): down "
                        f"{tuple(down.shape)}, up {tuple(up.shape)} ({key})")
    return down, up
