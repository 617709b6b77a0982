"""LoRA on fastdiff models: a low-rank side path beside each Linear / Conv2d, several LoRAs at once, scales that
change without a reload, fuse / unfuse with the base weights restored bit-exactly.

Unfused, a LoRA'd Linear in inference computes (``s`` = the user's scale times alpha / r)::

    y = base(x, residual)                             # exactly the base layer's call, as without the LoRA
    for each LoRA:  y += (s * x @ down^T) @ up^T      # rank-r GEMMs, the second accumulated into y in place

and with autograd (or an activation to apply after the sum), and for a LoRA'd Conv2d::

    side = residual                                   # the caller's fused residual, if any
    for each LoRA:  side = up(down(x) * s) + side     # the add is the up-projection's fused residual post-op
    y = act?(base(x) + side)                          # ... and the base layer's, so no extra pass over y

through fastdiff's public :func:`~fastdiff.ops.linear` / :func:`~fastdiff.ops.conv2d` (a conv LoRA's ``down``
has the base kernel, stride and padding, ``up`` is 1x1). Nothing copies a weight per step: the cost is two
rank-r matmuls per layer (benchmarks/bench_lora.py measures the step against the base step). The scale is a 0-d buffer filled in place, so :meth:`LoraSet.set_scale` takes effect
on the next call (no reload, no recompile under ``torch.compile``).

Fused, ``W <- W + sum(s * up @ down)`` is computed in fp32 and rounded once; the base tensor is kept aside and
put back by :meth:`LoraSet.unfuse` (bit-exact: nothing is subtracted). A LoRA'd layer keeps its class
(a subclass of it), its parameter names and its ``state_dict``; the LoRA tensors are non-persistent buffers, so
``.to(device / dtype)`` moves them with the model.

Pipelines get it through :class:`LoraMixin` (``pipe.load_lora(path, scale, name)``, ``set_lora_scale``,
``fuse_lora``, ``unfuse_lora``, ``unload_lora``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from fastdiff.adapters.lora_keys import LoraError, LoraPair, convert_lora_state_dict
from fastdiff.io.checkpoint import read_state_dict
from fastdiff.ops import Conv2d, Linear, conv2d, linear
from fastdiff.ops._onednn import onednn_math_dtype
from fastdiff.quant.int8 import Int8Conv2d, Int8Linear

__all__ = ["LoraError", "LoraLinear", "LoraConv2d", "LoraSet", "LoraMixin", "read_lora_file"]


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors header metadata) of a LoRA file; pickles only through ``weights_only=True``."""
    path = Path(path)
    sd = read_state_dict(path)
    meta: dict[str, str] = {}
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception:  # not a safetensors file: a torch pickle has no header metadata
        meta = {}
    return sd, meta


class _Handle:
    """One loaded LoRA: its name, the user's scale and whether it is fused; shared by all its layers."""

    def __init__(self, name: str, scale: float):
        self.name = name
        self.scale = float(scale)
        self.fused = False
        self.adapters: list[_Adapter] = []


class _Adapter(nn.Module):
    """One LoRA's pair on one layer: non-persistent buffers ``down``, ``up`` and the effective 0-d ``scale``."""

    def __init__(self, down: torch.Tensor, up: torch.Tensor, alpha_scale: float, handle: _Handle):
        super().__init__()
        self.register_buffer("down", down, persistent=False)
        self.register_buffer("up", up, persistent=False)
        self.register_buffer("scale", torch.tensor(alpha_scale * handle.scale, dtype=torch.float32), persistent=False)
        self.alpha_scale = float(alpha_scale)
        self.__dict__["handle"] = handle  # a plain attribute, not a submodule

    def refresh_scale(self) -> None:
        with torch.no_grad():
            self.scale.fill_(self.alpha_scale * self.handle.scale)

    def delta(self, shape) -> torch.Tensor:
        """``s * up @ down`` in fp32, shaped like the layer's weight."""
        d = self.up.flatten(1).float() @ self.down.flatten(1).float()
        return (d * (self.alpha_scale * self.handle.scale)).reshape(shape)


class _LoraLayer:
    """What LoRA'd Linear and Conv2d share: the adapter dict, fusing and restoring."""

    lora_adapters: nn.ModuleDict
    lora_fusable = True  # int8 layers: False (their weight is int8; the LoRA stays a float side path)

    def _active(self):
        return [a for a in self.lora_adapters.values() if not a.handle.fused]

    def _refresh_weight(self) -> None:
        """Weight = the kept base + every fused LoRA's delta (or the base itself when none is fused)."""
        fused = [a for a in self.lora_adapters.values() if a.handle.fused]
        base = self.__dict__.get("_lora_base_weight")
        if not fused:
            if base is not None:
                self.weight.data = base
                del self.__dict__["_lora_base_weight"]
        else:
            if base is None:
                base = self.__dict__["_lora_base_weight"] = self.weight.data
            w = base.float()
            for a in fused:
                w = w + a.delta(base.shape).to(w.device)
            self.weight.data = w.to(base.dtype)
        self.__dict__.pop("_fd_pack", None)  # the pre-packed weight belongs to the old tensor


def _tracks_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class LoraLinear(Linear, _LoraLayer):
    """A fastdiff :class:`~fastdiff.ops.Linear` with LoRA side paths (same parameters and state_dict)."""

    def forward(self, input: torch.Tensor, activation: str | None = None, residual: torch.Tensor | None = None):
        active = self._active()
        if not active:
            return super().forward(input, activation=activation, residual=residual)
        if activation is None and not _tracks_grad(input, self.weight, residual, *(a.down for a in active),
                                                   *(a.up for a in active)):
            # Inference: the base layer runs exactly as without the LoRA, then each rank-r side path is
            # accumulated into its output in place (``y += (s * x @ down^T) @ up^T``: one GEMM with beta = 1,
            # no separate add, no second output-sized tensor).
            y = super().forward(input, residual=residual)
            _accumulate(y, input, active)
            return y
        # autograd (or an activation after the sum): the side path as the base layer's fused residual
        return super().forward(input, activation=activation, residual=_linear_side(input, active, residual))


def _linear_side(x: torch.Tensor, adapters, residual: torch.Tensor | None) -> torch.Tensor | None:
    """``residual + sum_a s_a * up_a(down_a(x))`` over ``adapters`` (a layer's unfused LoRAs), through fastdiff's
    linear (each up projection adds onto the running sum as its fused residual)."""
    side = residual
    for a in adapters:
        h = linear(x, a.down) * a.scale.to(x.dtype)
        side = linear(h, a.up, residual=side)
    return side


def _conv_side(layer, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor | None:
    """The LoCon side sum of a convolution (as :func:`_linear_side`), with the layer's stride/padding/dilation."""
    side = residual
    for a in layer._active():
        h = conv2d(x, a.down, None, layer.stride, layer.padding, layer.dilation) * a.scale.to(x.dtype)
        side = conv2d(h, a.up, residual=side)
    return side


def _accumulate(y: torch.Tensor, x: torch.Tensor, adapters) -> None:
    """``y += sum_a (s_a * x @ down_a^T) @ up_a^T`` in place (y is the base output, just allocated).

    The two matmuls run in the dtype the base layer computes in (:func:`~fastdiff.ops._onednn.onednn_math_dtype`:
    fp32 for bf16 tensors on CPUs without fast bf16 dot products, where torch's bf16 matmul is ~10x slower);
    the rank-r intermediate is tiny, so scaling it costs nothing.
    """
    x2 = x.reshape(-1, x.shape[-1])
    y2 = y.view(-1, y.shape[-1])
    math = onednn_math_dtype(y.dtype) if y.device.type == "cpu" else y.dtype
    if math == y.dtype:
        for a in adapters:
            h = torch.mm(x2, a.down.t())
            h.mul_(a.scale)
            y2.addmm_(h, a.up.t())
        return
    xm = x2.to(math)
    side = None
    for a in adapters:
        h = torch.mm(xm, a.down.t().to(math))
        h.mul_(a.scale)
        up = a.up.t().to(math)
        side = torch.mm(h, up) if side is None else side.addmm_(h, up)
    y2.add_(side)  # fp32 side into the rounded base output: one more rounding, as the residual path had


class LoraConv2d(Conv2d, _LoraLayer):
    """A fastdiff :class:`~fastdiff.ops.Conv2d` with LoRA side paths (LoCon; same parameters and state_dict)."""

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None, silu: bool = False):
        return super().forward(input, residual=_conv_side(self, input, residual), silu=silu)


class _LoraInt8:
    """What the LoRA'd int8 layers share: nothing to fuse into (the int8 weight is left as it is)."""

    lora_fusable = False

    def _refresh_weight(self) -> None:
        pass  # LoraSet.fuse refuses int8 layers before anything is marked fused


class LoraInt8Linear(_LoraInt8, Int8Linear, _LoraLayer):
    """An :class:`~fastdiff.quant.int8.Int8Linear` with LoRA side paths in float, added before the activation."""

    def forward(self, input: torch.Tensor, activation: str | None = None, residual: torch.Tensor | None = None):
        side = _linear_side(input, self._active(), residual)
        return super().forward(input, activation=activation, residual=side)


class LoraInt8Conv2d(_LoraInt8, Int8Conv2d, _LoraLayer):
    """An :class:`~fastdiff.quant.int8.Int8Conv2d` with LoRA (LoCon) side paths in float."""

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None, silu: bool = False):
        return super().forward(input, residual=_conv_side(self, input, residual), silu=silu)


_LORA_CLASS = {Linear: LoraLinear, Conv2d: LoraConv2d, Int8Linear: LoraInt8Linear, Int8Conv2d: LoraInt8Conv2d}
_BASE_CLASS = {v: k for k, v in _LORA_CLASS.items()}


def _attach(module: nn.Module, pair: LoraPair, handle: _Handle) -> _Adapter:
    if type(module) in _LORA_CLASS:
        module.__class__ = _LORA_CLASS[type(module)]
        module.lora_adapters = nn.ModuleDict()
    elif type(module) not in _BASE_CLASS:
        raise LoraError(f"{pair.component}.{pair.module} is a {type(module).__name__}; LoRA applies to fastdiff "
                        "Linear and Conv2d layers")
    # the side path's dtype: the layer's weight's (an int8 layer's float dtype, on its int8 weight's device)
    device, dtype = ((module.weight_int8.device, module.dtype) if isinstance(module, (Int8Linear, Int8Conv2d))
                     else (module.weight.device, module.weight.dtype))
    a = _Adapter(pair.down.to(device, dtype), pair.up.to(device, dtype), pair.scale, handle)
    module.lora_adapters[handle.name] = a
    return a


def _detach(module: nn.Module, name: str) -> None:
    del module.lora_adapters[name]
    module._refresh_weight()
    if not len(module.lora_adapters):
        del module.lora_adapters
        module.__class__ = _BASE_CLASS[type(module)]


class LoraSet:
    """The LoRAs loaded into a set of components (``{"unet": unet, "text_encoder": te}``), by name."""

    def __init__(self, components: Mapping[str, nn.Module], arch: str = "sd1"):
        self.components = {k: v for k, v in components.items() if v is not None}
        self.arch = arch
        self.loras: dict[str, _Handle] = {}
        self._modules_of: dict[str, list[nn.Module]] = {}

    # -------------------------------------------------------------------------------------------- loading
    def load(self, path_or_state_dict, scale: float = 1.0, name: str | None = None,
             metadata: Mapping | None = None) -> str:
        """Load a LoRA (a file path or a state dict) beside the model's layers; returns its name."""
        if isinstance(path_or_state_dict, Mapping):
            sd, meta = dict(path_or_state_dict), dict(metadata or {})
            stem = "lora"
        else:
            sd, meta = read_lora_file(path_or_state_dict)
            stem = Path(path_or_state_dict).stem
        scale = _check_scale(scale)
        if name is None:
            name, i = stem, 2
            while name in self.loras:
                name, i = f"{stem}_{i}", i + 1
        elif not isinstance(name, str) or not name:
            raise ValueError(f"load_lora: name must be a non-empty string, got {name!r}")
        elif name in self.loras:
            raise ValueError(f"load_lora: a LoRA named {name!r} is loaded already (loaded: {sorted(self.loras)}); "
                             "unload it first or pass another name")
        if "." in name:
            raise ValueError(f"load_lora: name {name!r} may not contain '.'")
        pairs = convert_lora_state_dict(sd, self.components, arch=self.arch, metadata=meta)
        handle = _Handle(name, scale)
        done: list[nn.Module] = []
        try:
            for p in pairs:
                module = self.components[p.component].get_submodule(p.module)
                handle.adapters.append(_attach(module, p, handle))
                done.append(module)
        except Exception:
            for m in done:
                _detach(m, name)
            raise
        self.loras[name] = handle
        self._modules_of[name] = done
        return name

    def _get(self, name: str) -> _Handle:
        if name not in self.loras:
            raise ValueError(f"no LoRA named {name!r} is loaded (loaded: {sorted(self.loras) or 'none'})")
        return self.loras[name]

    def set_scale(self, name: str, scale: float) -> None:
        """Set a LoRA's strength; takes effect on the next call. A fused LoRA is re-fused at the new scale."""
        h = self._get(name)
        h.scale = _check_scale(scale)
        for a in h.adapters:
            a.refresh_scale()
        if h.fused:
            for m in self._modules_of[name]:
                m._refresh_weight()

    def scales(self) -> dict[str, float]:
        return {n: h.scale for n, h in self.loras.items()}

    def fuse(self, names: Iterable[str] | None = None) -> None:
        """Fold the LoRAs (all, or ``names``) into the weights: ``W + s * up @ down`` in fp32, rounded once."""
        todo = [self._get(n) for n in (list(self.loras) if names is None else _names(names))]
        for h in todo:
            int8 = [m for m in self._modules_of[h.name] if not m.lora_fusable]
            if int8 and not h.fused:
                raise LoraError(f"fuse_lora: LoRA {h.name!r} is on {len(int8)} int8-quantised layer(s), whose int8 "
                                "weights are not refolded; it runs as a float side path (fuse before quantize())")
        for h in todo:
            n = h.name
            if not h.fused:
                h.fused = True
                for m in self._modules_of[n]:
                    m._refresh_weight()

    def unfuse(self) -> None:
        """Put every layer's kept base weight back (bit-exact) and run the LoRAs as side paths again."""
        for n, h in self.loras.items():
            if h.fused:
                h.fused = False
                for m in self._modules_of[n]:
                    m._refresh_weight()

    def unload(self, name: str | None = None) -> None:
        """Remove one LoRA (or all): its layers return to their base weights and class."""
        for n in (list(self.loras) if name is None else [self._get(name).name]):
            for m in self._modules_of.pop(n):
                _detach(m, n)
            del self.loras[n]


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale != scale or abs(scale) == float("inf"):
        raise ValueError(f"LoRA scale must be a finite number, got {scale!r}")
    return float(scale)


def _names(names) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


class LoraMixin:
    """LoRA methods for a pipeline holding ``unet`` + ``text_encoder`` (SD1) or ``transformer`` + text encoders
    (SD3). The LoRA state lives in ``self._lora_set`` (created on first use)."""

    def _loras(self) -> LoraSet:
        s = self.__dict__.get("_lora_set")
        if s is None:
            if getattr(self, "unet", None) is not None:
                comps, arch = {"unet": self.unet, "text_encoder": getattr(self, "text_encoder", None)}, "sd1"
            elif getattr(self, "transformer", None) is not None:
                comps = {c: getattr(self, c, None) for c in
                         ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")}
                arch = "sd3"
            else:
                raise TypeError(f"{type(self).__name__} has no unet or transformer to load a LoRA into")
            s = self.__dict__["_lora_set"] = LoraSet(comps, arch)
        return s

    def load_lora(self, path, scale: float = 1.0, name: str | None = None) -> str:
        """Load a LoRA file (``.safetensors``; ``.pt``/``.ckpt`` tensors only) at ``scale``; returns its name
        (default: the file's stem). Several LoRAs can be loaded at once; each adds its own side path."""
        return self._loras().load(path, scale=scale, name=name)

    def set_lora_scale(self, name: str, scale: float) -> None:
        """Change a loaded LoRA's strength; the next call uses it (no reload)."""
        self._loras().set_scale(name, scale)

    @property
    def lora_scales(self) -> dict[str, float]:
        """The loaded LoRAs and their scales."""
        return self._loras().scales() if self.__dict__.get("_lora_set") is not None else {}

    def fuse_lora(self, names: Iterable[str] | str | None = None) -> None:
        """Fold the LoRAs into the weights (faster steps; ``unfuse_lora`` restores the base bit-exactly)."""
        self._loras().fuse(names)

    def unfuse_lora(self) -> None:
        self._loras().unfuse()

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA by name, or all of them."""
        if self.__dict__.get("_lora_set") is not None:
            self._loras().unload(name)
