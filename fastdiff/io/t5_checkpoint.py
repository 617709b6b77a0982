"""T5 encoder checkpoints (SD3's ``text_encoder_3``): transformers folders, lone state dicts, SD3 single files.

Layouts a user has:

* a transformers / diffusers folder: ``config.json`` + ``model.safetensors`` (or a sharded
  ``model.safetensors.index.json``, a ``model.fp16.safetensors`` variant, a ``.bin``); a diffusers SD3 root
  (with ``text_encoder_3/``) is accepted too;
* a single state dict with transformers' ``T5EncoderModel`` keys (ComfyUI's ``t5xxl_fp16.safetensors``);
* an SD3 single file, where the encoder sits under ``text_encoders.t5xxl.transformer.`` beside the MMDiT, VAE and
  CLIP towers: :func:`t5_from_prefixed` takes that part.

fastdiff's :class:`~fastdiff.models.t5.T5EncoderModel` has transformers' names, so loading is a strict copy
(:func:`fastdiff.io.checkpoint.load_state_dict_strict`) into a model built on the meta device: the weights
are allocated once, as read. The only key handling, all by name:

* ``shared.weight`` and ``encoder.embed_tokens.weight`` are one tied tensor. transformers 5 saves only
  ``shared.weight``; older files have both (then they must be equal) or, rarely, only the second.
* a full encoder-decoder checkpoint's ``decoder.*`` and ``lm_head.weight`` are not the encoder's and are ignored
  (transformers' ``T5EncoderModel`` ignores them too).

Anything else missing or unexpected raises :class:`~fastdiff.io.checkpoint.CheckpointError` listing the keys.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

import torch

from fastdiff.io.checkpoint import (CheckpointError, build_on_meta, component_weights, format_keys,
                                    load_state_dict_strict, materialize, open_state_dict, read_json, state_to_save)
from fastdiff.models.t5 import T5Config, T5EncoderModel

__all__ = ["SD3_T5_PREFIX", "load_t5_encoder", "t5_from_prefixed", "t5_from_state_dict", "t5_state_to_save",
           "infer_t5_config", "quantize_8bit"]

SD3_T5_PREFIX = "text_encoders.t5xxl.transformer."
_SHARED, _EMBED = "shared.weight", "encoder.embed_tokens.weight"
_REL_BIAS = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"


def _untie(sd: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """The encoder's keys with the tied embedding under both names (one tensor), decoder keys dropped."""
    out = {k: v for k, v in sd.items() if not (k.startswith("decoder.") or k == "lm_head.weight")}
    shared, embed = out.get(_SHARED), out.get(_EMBED)
    if shared is not None and embed is not None:
        if shared.shape != embed.shape or not torch.equal(materialize(shared), materialize(embed)):
            raise CheckpointError(f"{what}: {_SHARED} and {_EMBED} differ; T5 ties them (one tensor)")
    emb = shared if shared is not None else embed
    if emb is not None:
        out[_SHARED] = out[_EMBED] = emb
    return out


def infer_t5_config(sd: Mapping[str, torch.Tensor]) -> T5Config:
    """A T5 encoder config from tensor shapes (transformers' key names, prefix already stripped).

    Shapes fix vocabulary, widths, depth, heads and buckets; ``relative_attention_max_distance`` (128) and
    ``layer_norm_epsilon`` (1e-6) are not in the weights and take T5's values.
    """
    emb = sd.get(_SHARED, sd.get(_EMBED))
    rel = sd.get(_REL_BIAS)
    q = sd.get("encoder.block.0.layer.0.SelfAttention.q.weight")
    if emb is None or rel is None or q is None:
        absent = [k for k, t in ((f"{_SHARED} (or {_EMBED})", emb), (_REL_BIAS, rel),
                                 ("encoder.block.0.layer.0.SelfAttention.q.weight", q)) if t is None]
        raise CheckpointError(f"not a T5 encoder state dict: no {', '.join(absent)}; "
                              f"top-level key prefixes: {format_keys({k.split('.')[0] for k in sd})}")
    layers = 1 + max(int(m.group(1)) for k in sd for m in [re.match(r"encoder\.block\.(\d+)\.", k)] if m)
    heads = int(rel.shape[1])
    wi0 = sd.get("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")
    wi = wi0 if wi0 is not None else sd.get("encoder.block.0.layer.1.DenseReluDense.wi.weight")
    if wi is None:
        raise CheckpointError("not a T5 encoder state dict: no encoder.block.0.layer.1.DenseReluDense.wi_0 / wi")
    if q.shape[0] % heads:
        raise CheckpointError(f"T5 q projection of {q.shape[0]} rows does not split into {heads} heads")
    try:
        return T5Config(vocab_size=int(emb.shape[0]), d_model=int(emb.shape[1]), d_kv=int(q.shape[0]) // heads,
                        d_ff=int(wi.shape[0]), num_layers=layers, num_heads=heads,
                        relative_attention_num_buckets=int(rel.shape[0]),
                        feed_forward_proj="gated-gelu" if wi0 is not None else "relu")
    except ValueError as e:
        raise CheckpointError(f"cannot build a T5 config from the weights: {e}") from None


def t5_from_state_dict(sd: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None = torch.float32,
                       device: str | torch.device = "cpu", config: T5Config | None = None,
                       what: str = "T5 encoder") -> T5EncoderModel:
    """A state dict with transformers' ``T5EncoderModel`` keys -> fastdiff T5EncoderModel (strict, eval mode)."""
    sd = _untie(sd, what)
    cfg = config or infer_t5_config(sd)
    if _SHARED in sd:
        # convert the tied embedding once, so its two keys stay one tensor through the strict copy
        emb = materialize(sd[_SHARED], dtype, device)
        sd[_SHARED] = sd[_EMBED] = emb
    model = load_state_dict_strict(build_on_meta(T5EncoderModel, cfg), sd, what, dtype=dtype, device=device)
    if model.shared.weight is not model.encoder.embed_tokens.weight:  # the module is shared; guard the invariant
        raise AssertionError("T5EncoderModel: shared and encoder.embed_tokens came apart")
    return model.eval()


def t5_from_prefixed(sd: Mapping[str, torch.Tensor], prefix: str = SD3_T5_PREFIX, *,
                     dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu",
                     config: T5Config | None = None) -> T5EncoderModel:
    """The T5 encoder stored under ``prefix`` in a larger state dict (SD3 single files:
    ``text_encoders.t5xxl.transformer.``). Keys outside the prefix belong to other components and are left
    alone; within it loading is strict."""
    part = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not part:
        raise CheckpointError(f"no T5 encoder weights under {prefix!r}; top-level key prefixes: "
                              f"{format_keys({k.split('.')[0] for k in sd})}")
    return t5_from_state_dict(part, dtype=dtype, device=device, config=config, what=f"T5 encoder ({prefix}*)")


def load_t5_encoder(path: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32,
                    device: str | torch.device = "cpu", config: T5Config | None = None,
                    variant: str | None = None) -> T5EncoderModel:
    """A T5 encoder from a transformers folder, a state-dict file, or an SD3 single file (see module doc).

    ``dtype`` casts floating tensors (None keeps the file's); ``variant`` picks ``model.{variant}.safetensors``
    in a folder (by default ``model.safetensors``, else ``model.fp16.safetensors``).
    """
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file() and (p / "text_encoder_3").is_dir():
            p = p / "text_encoder_3"  # a diffusers SD3 pipeline folder
        if config is None:
            raw = read_json(p / "config.json")
            archs = raw.get("architectures") or []
            if raw.get("model_type") not in (None, "t5") or any("T5" not in a for a in archs):
                raise CheckpointError(f"{p}: config.json describes {archs or raw.get('model_type')}, not a T5 encoder")
            try:
                config = T5Config.from_transformers(raw)
            except ValueError as e:
                raise CheckpointError(f"{p}: {e}") from None
        return t5_from_state_dict(component_weights(p, "model", variant), dtype=dtype, device=device, config=config,
                                  what=f"T5 encoder {p}")
    sd = open_state_dict(p)
    if any(k.startswith(SD3_T5_PREFIX) for k in sd):
        return t5_from_prefixed(sd, SD3_T5_PREFIX, dtype=dtype, device=device, config=config)
    return t5_from_state_dict(sd, dtype=dtype, device=device, config=config, what=f"T5 encoder {p}")


def t5_state_to_save(model: T5EncoderModel, dtype: torch.dtype | None, *, tied_copies: bool = False) -> dict:
    """What a file holds of a T5 encoder. T5 ties ``encoder.embed_tokens`` to ``shared``: transformers' folders
    store the table once (safetensors refuses aliased tensors); SD3 single files hold both names (diffusers'
    single-file loader reads ``encoder.embed_tokens`` and does not tie it), so ``tied_copies`` writes a copy."""
    sd = state_to_save(model, dtype)
    if _SHARED in sd and _EMBED in sd:
        if tied_copies:
            sd[_EMBED] = sd[_EMBED].clone()
        else:
            del sd[_EMBED]
    return sd


def quantize_8bit(model: T5EncoderModel, *, threshold: float = 6.0) -> T5EncoderModel:
    """Replace the encoder's projections (q, k, v, o, wi_0, wi_1 / wi, wo) by bitsandbytes' LLM.int8()
    ``Linear8bitLt`` (per-row absmax int8 weights; activation features above ``threshold`` in fp16), in place.

    Needs the optional ``bitsandbytes`` (CUDA; CPU too from 0.50). Embeddings, norms and the position bias keep
    the model's dtype; the attribute paths (``...SelfAttention.q.weight``) stay. On CPU bitsandbytes 0.50 runs
    these as weight-only int8 (floating activations); tests/test_t5.py checks them against that rounding.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ImportError("quantize_8bit needs the optional bitsandbytes package (pip install bitsandbytes)") \
            from None
    from fastdiff.models.t5 import T5Attention, T5DenseActDense, T5DenseGatedActDense

    cls = _int8_linear_class(bnb)
    device = model.shared.weight.device
    for module in list(model.modules()):
        if isinstance(module, T5Attention):
            names = ("q", "k", "v", "o")
        elif isinstance(module, T5DenseGatedActDense):
            names = ("wi_0", "wi_1", "wo")
        elif isinstance(module, T5DenseActDense):
            names = ("wi", "wo")
        else:
            continue
        for name in names:
            lin = getattr(module, name)
            q = cls(lin.in_features, lin.out_features, bias=False, has_fp16_weights=False, threshold=threshold)
            # Int8Params quantizes when moved to the device (bitsandbytes' convention)
            q.weight = bnb.nn.Int8Params(lin.weight.detach().to("cpu", torch.float16), requires_grad=False,
                                         has_fp16_weights=False)
            setattr(module, name, q.to(device))
    return model


_INT8_CLASS = None


def _int8_linear_class(bnb):
    """``Linear8bitLt`` with fastdiff Linear's call signature (``activation``, ``residual``), made once."""
    global _INT8_CLASS
    if _INT8_CLASS is None:
        import torch.nn.functional as F

        class Int8Linear(bnb.nn.Linear8bitLt):
            def forward(self, x, activation: str | None = None, residual: torch.Tensor | None = None):
                y = super().forward(x).to(x.dtype)
                if residual is not None:
                    y = y + residual
                if activation == "gelu_tanh":
                    y = F.gelu(y, approximate="tanh")
                elif activation is not None:
                    raise ValueError(f"unsupported activation {activation!r}")
                return y

        _INT8_CLASS = Int8Linear
    return _INT8_CLASS
