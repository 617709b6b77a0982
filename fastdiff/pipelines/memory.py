"""Inference memory of the big pipelines, worked out from the real configurations without allocating them.

    python -m fastdiff.pipelines.memory [SIZE]          # the SD3-medium table (weights + activations per component)

Weights: parameters x bytes per value, counted on models built on the ``meta`` device (no memory is used).
8-bit T5 (bitsandbytes ``Linear8bitLt``): each linear weight takes 1 byte a value plus one fp32 scale per output
row; embeddings and norms keep the 16-bit dtype.

Activations: the peak of the bytes held by tensors that a forward pass creates (inputs and weights excluded),
measured by running the real forward on ``meta`` tensors under a dispatch mode that sees every op's outputs and
frees them when the last tensor on a storage dies (:func:`peak_activation_bytes`). The pure-PyTorch reference
ops run there (``ref`` backend), so the figure is an upper bound for the fused kernels, which skip some of the
reference's temporaries; attention alone is counted as a flash kernel holds it (the output and one fp32
log-sum-exp per query row, as the triton / flash_attn backends on the GPU), not as the reference's full score
matrix (which at 1024x1024 would add 3.8 GB per matrix). tests/test_sd3_memory.py runs real forwards on the CPU
in a fresh process and checks these figures against the measured peak resident memory.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["peak_activation_bytes", "weight_bytes", "ComponentMemory", "sd3_memory_table", "format_table"]

GiB = 1024 ** 3
MiB = 1024 ** 2


class _LiveBytes(TorchDispatchMode):
    """Tracks bytes of storages created by ops inside the mode; ``peak`` is their largest simultaneous sum."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list] = {}  # storage id -> [bytes, number of live tensors on it]

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # a view of a tensor made before the pass (a weight's transpose, a slice of a table) allocates nothing
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = st._cdata
            entry = self._refs.get(key)
            if entry is None and key in inputs:
                continue
            if entry is None:
                entry = self._refs[key] = [st.nbytes(), 0]
                self.live += entry[0]
                self.peak = max(self.peak, self.live)
            entry[1] += 1
            weakref.finalize(t, self._release, key)
        return out


class _flash_attention_memory:
    """Inside: the ``ref`` attention allocates what a flash kernel does (output + fp32 log-sum-exp), no scores."""

    def __enter__(self):
        import importlib

        self._impl = importlib.import_module("fastdiff.ops.attention")._op.impls["ref"]
        self._fn = self._impl.fn

        def flash_like(q, k, v, attn_mask=None, scale=None):
            torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)  # the log-sum-exp of each query row
            return torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)

        self._impl.fn = flash_like
        return self

    def __exit__(self, *exc):
        self._impl.fn = self._fn


def peak_activation_bytes(fn, *args, **kwargs) -> tuple[int, object]:
    """(peak bytes of the tensors ``fn(*args, **kwargs)`` creates while it runs, its result). Works on meta
    tensors (shapes only) and on real ones."""
    mode = _LiveBytes()
    with torch.no_grad(), mode:
        out = fn(*args, **kwargs)
    return mode.peak, out


def weight_bytes(model: torch.nn.Module, dtype: torch.dtype | None = None, *, int8_linears: bool = False) -> int:
    """Bytes of ``model``'s parameters and buffers in ``dtype`` (or their own); ``int8_linears``: nn.Linear
    weights at 1 byte a value + an fp32 scale per row (bitsandbytes LLM.int8 storage)."""
    linear_weights = set()
    total = 0
    if int8_linears:
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                linear_weights.add(id(m.weight))
                total += m.weight.numel() + 4 * m.weight.shape[0]
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in linear_weights:
            continue
        size = torch.empty((), dtype=dtype).element_size() if dtype is not None and t.is_floating_point() \
            else t.element_size()
        total += t.numel() * size
    return total


@dataclass(frozen=True)
class ComponentMemory:
    name: str
    parameters: int
    weights: dict           # dtype name -> bytes
    activations: int        # peak activation bytes of one call, in the 16-bit dtype
    call: str               # what the activation figure is for


def _meta(cls, cfg):
    with torch.device("meta"):
        return cls(cfg).eval()


def sd3_memory_table(height: int = 1024, width: int = 1024, batch: int = 2, *, mmdit_preset: str = "sd3_medium",
                     dtype: torch.dtype = torch.float16) -> list[ComponentMemory]:
    """SD3-medium's components at ``height`` x ``width``, ``batch`` (2 = one guided step), computed on meta."""
    from fastdiff.models import clip_text, mmdit, t5, vae
    from fastdiff.ops import use_backend

    dtypes = {"fp32": torch.float32, "fp16/bf16": torch.float16}
    rows = []
    comps = [
        ("MMDiT", _meta(mmdit.MMDiT, mmdit.PRESETS[mmdit_preset])),
        ("VAE", _meta(vae.AutoencoderKL, vae.SD3)),
        ("CLIP-L", _meta(clip_text.CLIPTextModel, clip_text.CLIP_L14_PROJ)),
        ("CLIP-G", _meta(clip_text.CLIPTextModel, clip_text.CLIP_BIGG14)),
        ("T5-XXL", _meta(t5.T5EncoderModel, t5.T5_XXL)),
    ]
    h, w = height // 8, width // 8
    with use_backend("ref"), _flash_attention_memory():
        for name, m in comps:
            m = m.to(dtype)
            n = sum(p.numel() for p in m.parameters())
            weights = {k: weight_bytes(m, d) for k, d in dtypes.items()}
            if name == "T5-XXL":
                weights["int8"] = weight_bytes(m, torch.float16, int8_linears=True)
            if name == "MMDiT":
                cfg = m.config
                x = torch.empty(batch, cfg.in_channels, h, w, device="meta", dtype=dtype)
                ctx = torch.empty(batch, 77 + 256, cfg.joint_attention_dim, device="meta", dtype=dtype)
                pooled = torch.empty(batch, cfg.pooled_projection_dim, device="meta", dtype=dtype)
                t = torch.empty(batch, device="meta")
                act, _ = peak_activation_bytes(m, x, t, ctx, pooled)
                call = f"one guided step, {height}x{width} (batch {batch})"
            elif name == "VAE":
                z = torch.empty(1, 16, h, w, device="meta", dtype=dtype)
                act, _ = peak_activation_bytes(m.decode, z)
                call = f"decode one {height}x{width} image"
            elif name == "T5-XXL":
                ids = torch.zeros(batch, 256, dtype=torch.long, device="meta")
                act, _ = peak_activation_bytes(m, ids)
                call = f"encode {batch} prompts (256 tokens)"
            else:
                ids = torch.zeros(batch, 77, dtype=torch.long, device="meta")
                act, _ = peak_activation_bytes(m.encode_sd3, ids)
                call = f"encode {batch} prompts (77 tokens)"
            rows.append(ComponentMemory(name, n, weights, act, call))
    return rows


def format_table(rows: list[ComponentMemory]) -> str:
    """A Markdown table of :func:`sd3_memory_table` rows (GiB)."""
    def g(b):
        return f"{b / GiB:.2f} GiB" if b >= 0.1 * GiB else f"{b / MiB:.0f} MiB"
    lines = ["| component | parameters | fp32 weights | fp16/bf16 weights | int8 weights | peak activations "
             "(fp16/bf16) | for |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.name} | {r.parameters / 1e6:,.1f} M | {g(r.weights['fp32'])} | "
                     f"{g(r.weights['fp16/bf16'])} | {g(r.weights['int8']) if 'int8' in r.weights else '-'} "
                     f"| {g(r.activations)} | {r.call} |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    import sys

    size = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    print(format_table(sd3_memory_table(size, size)))
