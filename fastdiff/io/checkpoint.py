"""What every checkpoint reader and writer of fastdiff shares: file reading, strict loading, diffusers folders,
the KL-VAE in both layouts, and the one error they raise.

* :func:`open_state_dict` opens ``.safetensors`` lazily (:class:`LazyTensor` handles: name, shape and dtype from
  the header, the data read when a model takes it) or a pickle through ``torch.load(weights_only=True)`` (never
  code); :func:`read_state_dict` reads everything at once; :func:`safetensors_keys` reads a safetensors header
  only (a 10 GB file is classified in microseconds).
* :func:`load_state_dict_strict` copies a state dict into a model built on the meta device
  (:func:`build_on_meta`): every key present with its shape, or :class:`CheckpointError` listing what differs.
  Lazy tensors are read and converted one at a time, straight into the model's dtype (see "Streaming" below).
* diffusers / transformers folders: :func:`read_json`, :func:`read_config`, :func:`component_weights`
  (``{stem}[.{variant}].safetensors``, ``.bin``, sharded ``*.index.json``), :func:`load_component`, and
  :func:`save_pipeline_folder` with :func:`write_component` for the way back.
* the KL-VAE of SD1 and SD3 in the original (LDM) layout: :func:`vae_key_to_original`,
  :func:`vae_from_original`, :func:`vae_to_original`.

Streaming. Loading an fp32 SD1.5 file into a bf16 model must never hold the fp32 set (3.4 GB for the UNet alone)
beside the bf16 one. A safetensors file is therefore read tensor by tensor: the header gives each tensor's dtype,
shape and byte range; :meth:`LazyTensor.load` allocates the tensor in the *target* dtype and fills it from the
file through one small bounce buffer (:data:`_CHUNK` bytes), so the peak is the model being built plus one chunk.
The bytes are read with ``pread`` on the file, not through a memory map: mapped file pages count in the
process's resident set until the map is closed, so ``safetensors.safe_open`` (which maps the whole file) shows
the whole file resident while it is open. Measured on a 1.0 GB fp32 file converted to bf16 (process base 0.52
GB): ``safe_open`` + ``get_tensor(k).to(bf16)`` peaked at 2.02 GB resident, ``load_file`` then convert at 2.02
GB, reading each tensor with ``readinto`` then convert at 1.07 GB. Pickles (``.ckpt``) have no such header:
zip-format ones are opened with ``torch.load(mmap=True)`` (pages are read as each tensor is converted; the map
is resident until the state dict is dropped), legacy ones are read whole.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from fastdiff.models.clip_tokenizer import CLIPTokenizer
from fastdiff.models.vae import AutoencoderKL, VAEConfig

__all__ = [
    "CheckpointError",
    "LazyTensor",
    "VAE_PREFIX",
    "bounce_buffer",
    "build_on_meta",
    "clip_tokenizer_in",
    "component_weights",
    "format_keys",
    "load_component",
    "load_state_dict_strict",
    "materialize",
    "max_key_index",
    "open_pipeline_folder",
    "open_state_dict",
    "read_config",
    "read_json",
    "read_state_dict",
    "safetensors_keys",
    "save_pipeline_folder",
    "scheduler_config_in",
    "state_to_save",
    "tensor_map",
    "infer_vae_config",
    "vae_attention_as_linear",
    "vae_from_original",
    "vae_key_to_original",
    "vae_to_original",
    "write_component",
]

VAE_PREFIX = "first_stage_model."


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: wrong architecture, missing/unexpected keys, bad file."""


def format_keys(keys, n: int = 12) -> str:
    """The first ``n`` of ``keys`` (sorted), comma-separated, and how many more there are."""
    keys = sorted(keys)
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


# ---------------------------------------------------------------------------------------------- reading files
def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:2] == b"PK":
        return "zip-pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def safetensors_keys(path: str | os.PathLike) -> list[str] | None:
    """The tensor names of a safetensors file, read from its header alone; None when ``path`` is not one.

    The format starts with an 8-byte little-endian header length and a JSON header mapping each name to its
    dtype, shape and offsets (``__metadata__`` is not a tensor)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return None
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000:
                return None
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    return [k for k in header if k != "__metadata__"]


# safetensors dtype names -> torch dtypes (those this torch has)
_ST_DTYPES = {name: getattr(torch, attr) for name, attr in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"),
    ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"), ("U16", "uint16"),
    ("U32", "uint32"), ("U64", "uint64"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
    if hasattr(torch, attr)}
_CHUNK = 8 << 20  # bytes of the bounce buffer a converting read goes through (see "Streaming" above)


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A writable byte view of contiguous CPU tensor ``t``'s memory (any dtype, bf16 included); ``t`` must
    outlive it."""
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


def _pread_into(fd: int, offset: int, view: memoryview, path: Path) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): "
                                  f"the data ends at byte {offset + got}")
        got += n


class LazyTensor:
    """One tensor of a safetensors file, not read yet: its shape and dtype (from the header) and the byte range
    holding it. The loaders treat it like a tensor for everything shapes decide (``shape``, ``dim()``,
    ``is_floating_point()``); :meth:`map` records a transform (a slice, a split) to apply once read; :meth:`load`
    reads it, converting to the target dtype chunk by chunk (the file's full-precision copy of a large tensor
    is never allocated: see "Streaming" in the module doc)."""

    __slots__ = ("path", "offset", "file_dtype", "file_shape", "shape", "dtype", "fns")
    is_meta = False
    device = torch.device("cpu")

    def __init__(self, path: Path, offset: int, file_dtype: torch.dtype, file_shape: tuple[int, ...],
                 fns: tuple = (), shape: tuple[int, ...] | None = None, dtype: torch.dtype | None = None):
        self.path, self.offset, self.file_dtype, self.file_shape, self.fns = path, offset, file_dtype, file_shape, fns
        self.shape = torch.Size(file_shape if shape is None else shape)
        self.dtype = file_dtype if dtype is None else dtype

    def dim(self) -> int:
        return len(self.shape)

    def size(self, d: int | None = None):
        return self.shape if d is None else self.shape[d]

    def numel(self) -> int:
        return math.prod(self.shape)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def __repr__(self) -> str:
        return f"LazyTensor({self.path.name}@{self.offset}, shape={tuple(self.shape)}, dtype={self.dtype})"

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "LazyTensor":
        """This tensor with ``fn`` applied when it is read; the new shape and dtype come from running ``fn`` on
        a meta tensor (no data)."""
        meta = fn(torch.empty(self.shape, dtype=self.dtype, device="meta"))
        return LazyTensor(self.path, self.offset, self.file_dtype, self.file_shape, self.fns + (fn,),
                          tuple(meta.shape), meta.dtype)

    def load(self, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", *,
             scratch: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor, read from the file; floating tensors cast to ``dtype`` (None: as stored), on ``device``.
        ``scratch``: a uint8 bounce buffer to reuse across calls (:func:`bounce_buffer`); one is made if None."""
        target = dtype if dtype is not None and self.dtype.is_floating_point else self.dtype
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if self.fns:  # read as stored, transform, then cast (transforms are slices and splits: one tensor's size)
                t = torch.empty(self.file_shape, dtype=self.file_dtype)
                self._fill(fd, t, scratch)
                for fn in self.fns:
                    t = fn(t)
                t = t.to(target).contiguous()
                if t.untyped_storage().nbytes() > t.numel() * t.element_size():
                    t = t.clone()  # a slice of the stored tensor: do not keep the whole of it alive
            else:
                t = torch.empty(self.file_shape, dtype=target)
                self._fill(fd, t, scratch)
        finally:
            os.close(fd)
        return t.to(device)

    def _fill(self, fd: int, dst: torch.Tensor, scratch: torch.Tensor | None) -> None:
        """Read the stored tensor into ``dst`` (contiguous, the stored shape, any dtype): directly when the dtypes
        agree, else through the bounce buffer ``scratch`` (:data:`_CHUNK` bytes), converted by ``copy_`` (torch's
        round-to-nearest-even, the same as ``.to``)."""
        numel = dst.numel()
        if numel == 0:
            return
        if dst.dtype == self.file_dtype:
            _pread_into(fd, self.offset, _bytes_of(dst), self.path)
            return
        item = self.file_dtype.itemsize
        if scratch is None:
            scratch = bounce_buffer()
        per = max(1, scratch.numel() // item)
        flat = dst.view(-1)
        for start in range(0, numel, per):
            m = min(per, numel - start)
            part = scratch[:m * item].view(self.file_dtype)
            _pread_into(fd, self.offset + start * item, _bytes_of(part), self.path)
            flat[start:start + m].copy_(part)


def bounce_buffer() -> torch.Tensor:
    """The scratch a converting read goes through (:data:`_CHUNK` bytes); one per model load, reused by every
    tensor, so converting leaves no trail of freed chunks in the allocator."""
    return torch.empty(max(_CHUNK, 16), dtype=torch.uint8)


def materialize(v, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", *,
                scratch: torch.Tensor | None = None) -> torch.Tensor:
    """``v`` (a tensor or a :class:`LazyTensor`) as a contiguous tensor on ``device``, floating point cast to
    ``dtype`` (None: as it is); ``scratch``: see :meth:`LazyTensor.load`."""
    if isinstance(v, LazyTensor):
        return v.load(dtype, device, scratch=scratch).contiguous()
    if dtype is not None and v.is_floating_point():
        v = v.to(dtype)
    return v.to(device).contiguous()


def tensor_map(v, fn: Callable[[torch.Tensor], torch.Tensor]):
    """``fn(v)`` for a tensor; for a :class:`LazyTensor`, ``fn`` recorded to run when it is read."""
    return v.map(fn) if isinstance(v, LazyTensor) else fn(v)


def _open_safetensors(path: Path) -> dict[str, LazyTensor]:
    """The tensors of a safetensors file as :class:`LazyTensor` handles, the header checked against the file:
    known dtypes, byte ranges that match the shapes and lie inside the file."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {why}")

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(100_000_000, size - 8):
            raise bad(f"the header claims {n} bytes, the file has {size}")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    base, out = 8 + n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            a, b = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r}: dtype/shape/data_offsets missing or unknown ({info!r:.120})") from None
        if min(shape, default=0) < 0 or b - a != math.prod(shape) * dtype.itemsize or a < 0:
            raise bad(f"tensor {name!r}: byte range [{a}, {b}) does not hold a {info['dtype']} tensor of shape {shape}")
        if base + b > size:
            raise bad(f"tensor {name!r} ends at byte {base + b}, the file has {size}")
        out[name] = LazyTensor(path, base + a, dtype, shape)
    return out


def open_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor | LazyTensor]:
    """The tensors of a ``.safetensors`` file as :class:`LazyTensor` handles (nothing read but the header), or of
    a ``.ckpt``/``.pt``/``.bin`` pickle (unwrapping ``state_dict``) as tensors.

    Pickles go through ``torch.load(weights_only=True)``, which refuses anything but tensors and plain
    containers; such a refusal, a truncated file or a non-weights file raises :class:`CheckpointError`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file (a diffusers folder needs model_index.json)")
    kind = _sniff(path)
    if path.suffix == ".safetensors" or kind == "safetensors":
        sd = _open_safetensors(path)
    elif kind in ("zip-pickle", "pickle"):
        try:
            # zip pickles are memory-mapped: each tensor is paged in as the model takes it
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=kind == "zip-pickle")
        except pickle.UnpicklingError as e:  # keep torch's finding, drop its advice to load with weights_only=False
            found = " ".join(str(e).split("WeightsUnpickler error:", 1)[-1].split("Check the documentation", 1)[0].split())
            raise CheckpointError(
                f"{path}: refused to unpickle: the file holds objects other than tensors and plain containers "
                f"({found}); fastdiff never runs code from a checkpoint: use a .safetensors file") from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt?): {e}") from None
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path}: expected a state dict (mapping of names to tensors), got {type(obj).__name__}")
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"{path}: entries that are not tensors: {format_keys(bad)}")
        sd = dict(obj)
    else:
        raise CheckpointError(f"{path}: unknown file format (expected .safetensors, or a torch .ckpt/.pt/.bin)")
    if not sd:
        raise CheckpointError(f"{path}: the file holds no tensors")
    return sd


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` or ``.ckpt``/``.pt``/``.bin`` file, read now, as stored, on the CPU
    (:func:`open_state_dict` without the laziness; same checks and errors)."""
    return {k: materialize(v) for k, v in open_state_dict(path).items()}


# ------------------------------------------------------------------------------------------- strict loading
def build_on_meta(cls, cfg):
    """``cls(cfg)`` with its parameters on the meta device: no memory until :func:`load_state_dict_strict`."""
    with torch.device("meta"):
        return cls(cfg)


def load_state_dict_strict(model: nn.Module, sd: Mapping[str, torch.Tensor], what: str, *,
                           dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Copy ``sd`` into ``model`` (built on any device, meta included): every key present with the same shape.

    Errors list missing keys, unexpected keys and shape mismatches (checked before any data is read). Tensors
    (or :class:`LazyTensor` handles, read here one at a time) are cast to ``dtype`` (floating point only) and
    moved to ``device``; the model's parameters are replaced by them (no second copy).
    """
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        msg = [f"{what}: the checkpoint does not match the model"]
        if missing:
            msg.append(f"missing keys ({len(missing)}): {format_keys(missing)}")
        if unexpected:
            msg.append(f"unexpected keys ({len(unexpected)}): {format_keys(unexpected)}")
        if shapes:
            msg.append(f"shape mismatches ({len(shapes)}): {format_keys(shapes, 6)}")
        raise CheckpointError("\n  ".join(msg))
    # one tensor at a time, in the target dtype: a lazy tensor is read and converted chunk by chunk, so the
    # largest transient is one chunk (see "Streaming" in the module doc)
    scratch = bounce_buffer() if any(isinstance(v, LazyTensor) for v in sd.values()) else None
    out = {k: materialize(sd[k], dtype, device, scratch=scratch) for k in own}
    del scratch
    model.load_state_dict(out, strict=True, assign=True)
    return model


def state_to_save(model: nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """``model``'s state dict on the CPU, contiguous, floating tensors cast to ``dtype`` (None: as they are)."""
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
            for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------- diffusers folders
def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"missing {path}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON: {e}") from None


def read_config(path: Path, parse: Callable[[dict], Any]) -> Any:
    """``parse(json of path)``; a config the model cannot take raises :class:`CheckpointError` naming the file."""
    raw = read_json(path)
    try:
        return parse(raw)
    except CheckpointError:
        raise
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: {e}") from None


def component_weights(folder: Path, stem: str, variant: str | None) -> dict[str, torch.Tensor | LazyTensor]:
    """Weights of one diffusers component: ``{stem}[.{variant}].safetensors`` (or sharded/.bin), opened by
    :func:`open_state_dict` (safetensors lazily)."""
    variants = [variant] if variant else [None, "fp16"]
    for var in variants:
        mid = f".{var}" if var else ""
        for ext in (".safetensors", ".bin"):
            f = folder / f"{stem}{mid}{ext}"
            if f.is_file():
                return open_state_dict(f)
            index = folder / f"{stem}{mid}{ext}.index.json"
            if index.is_file():
                shards = sorted(set(read_json(index).get("weight_map", {}).values()))
                if not shards:
                    raise CheckpointError(f"{index}: empty weight_map")
                out: dict[str, torch.Tensor | LazyTensor] = {}
                for s in shards:
                    out.update(open_state_dict(folder / s))
                return out
    want = f"{stem}.{variant}.safetensors" if variant else f"{stem}.safetensors (or .fp16.safetensors / .bin)"
    raise CheckpointError(f"{folder}: no weights file {want}")


def load_component(folder: Path, cls, cfg, stem: str, *, variant: str | None = None,
                   dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                   state: Callable[[dict], dict] | None = None) -> nn.Module:
    """One component folder of a diffusers pipeline as ``cls(cfg)``, strictly, in eval mode. ``state``
    renames the file's keys first (e.g. CLIP's ``text_model.`` level)."""
    sd = component_weights(folder, stem, variant)
    if state is not None:
        sd = state(sd)
    return load_state_dict_strict(build_on_meta(cls, cfg), sd, f"{folder.name}/", dtype=dtype, device=device).eval()


def open_pipeline_folder(folder: Path, parts: tuple[str, ...]) -> str:
    """The ``_class_name`` of a diffusers pipeline folder whose ``parts`` sub-folders all exist."""
    if not folder.is_dir():
        raise FileNotFoundError(f"not a directory: {folder}")
    cls = read_json(folder / "model_index.json").get("_class_name", "")
    for part in parts:
        if not (folder / part).is_dir():
            raise CheckpointError(f"{folder}: missing the {part}/ folder")
    return cls


def scheduler_config_in(folder: Path, default: Mapping) -> dict:
    """``scheduler/scheduler_config.json`` of a pipeline folder, or a copy of ``default`` when it has none."""
    path = folder / "scheduler" / "scheduler_config.json"
    return read_json(path) if path.is_file() else dict(default)


def clip_tokenizer_in(folder: Path, **bundled) -> CLIPTokenizer:
    """The CLIP tokenizer saved in ``folder``, or the bundled one (``bundled``: its options) when there is none."""
    return CLIPTokenizer.from_pretrained(folder) if folder.is_dir() else CLIPTokenizer.from_bundled(**bundled)


def write_component(folder: Path, config: dict, weights: Mapping[str, torch.Tensor], stem: str) -> None:
    """One component folder of a diffusers pipeline: ``config.json`` and ``{stem}.safetensors``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "config.json", "w") as f:
        json.dump(config, f, indent=2)
    save_file(dict(weights), str(folder / f"{stem}.safetensors"), metadata={"format": "pt"})


def save_pipeline_folder(folder: str | os.PathLike, index: dict,
                         components: Mapping[str, tuple[dict, Mapping[str, torch.Tensor], str]],
                         tokenizers: Mapping[str, Any], scheduler_config: Mapping) -> None:
    """A diffusers pipeline folder: ``model_index.json`` (``index``), one folder per component
    (``name -> (config, weights, file stem)``), the tokenizers and ``scheduler/scheduler_config.json``."""
    folder = Path(folder)
    for name, (config, weights, stem) in components.items():
        write_component(folder / name, config, weights, stem)
    for name, tok in tokenizers.items():
        tok.save_pretrained(folder / name)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    with open(folder / "scheduler" / "scheduler_config.json", "w") as f:
        json.dump(dict(scheduler_config), f, indent=2)
    with open(folder / "model_index.json", "w") as f:
        json.dump(index, f, indent=2)


# ------------------------------------------------------------------------------------ the KL-VAE, LDM layout
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key_to_original(key: str, cfg: VAEConfig) -> str:
    """diffusers AutoencoderKL key -> key under ``first_stage_model.`` in an original checkpoint."""
    n = len(cfg.block_out_channels)
    m = re.match(r"(encoder|decoder)\.(.+)", key)
    if not m:
        if key.startswith(("quant_conv.", "post_quant_conv.")):
            return key
        raise KeyError(f"no original name for VAE key {key!r}")
    part, rest = m.group(1), m.group(2)
    if rest.startswith("conv_norm_out."):
        return f"{part}.norm_out.{rest[len('conv_norm_out.'):]}"
    if rest.startswith(("conv_in.", "conv_out.")):
        return key
    mm = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", rest)
    if mm:
        kind, j, tail = mm.group(1), int(mm.group(2)), mm.group(3)
        if kind == "resnets":
            return f"{part}.mid.block_{j + 1}.{tail.replace('conv_shortcut', 'nin_shortcut')}"
        for d, o in _VAE_ATTN.items():
            if tail.startswith(d + "."):
                return f"{part}.mid.attn_1.{o}.{tail[len(d) + 1:]}"
    mm = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", rest)
    if mm:
        side, b, kind, j, tail = mm.group(1), int(mm.group(2)), mm.group(3), int(mm.group(4)), mm.group(5)
        level = b if side == "down" else n - 1 - b  # the LDM decoder numbers its levels from the lowest resolution
        name = "down" if side == "down" else "up"
        if kind == "resnets":
            return f"{part}.{name}.{level}.block.{j}.{tail.replace('conv_shortcut', 'nin_shortcut')}"
        return f"{part}.{name}.{level}.{'downsample' if side == 'down' else 'upsample'}.{tail}"
    raise KeyError(f"no original name for VAE key {key!r}")


def _is_vae_attn_matrix(key: str) -> bool:
    return ".mid_block.attentions.0.to_" in key and key.endswith(".weight")


def vae_attention_as_linear(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LDM stores the VAE's attention projections as 1x1 convolutions; fastdiff (as diffusers) as matrices."""
    return {k: (tensor_map(v, _first_pixel) if _is_vae_attn_matrix(k) and v.dim() == 4 else v) for k, v in sd.items()}


def _first_pixel(t: torch.Tensor) -> torch.Tensor:
    return t[:, :, 0, 0]


def max_key_index(keys, pattern: str) -> int:
    """The largest integer the first group of ``pattern`` matches in ``keys`` (-1 when none matches)."""
    idx = [int(m.group(1)) for k in keys for m in [re.match(pattern, k)] if m]
    return max(idx) if idx else -1


def infer_vae_config(v: Mapping[str, torch.Tensor], **fixed) -> VAEConfig:
    """The KL-VAE config of original-layout VAE keys (``encoder.down.{i}.block.{j}``, no prefix) from shapes:
    channels, depth, latent channels (4 for SD1, 16 for SD3) and whether the quant convs exist. ``fixed``
    sets what shapes cannot show (scaling_factor, shift_factor, norm groups)."""
    if "encoder.conv_in.weight" not in v:
        raise CheckpointError("no VAE weights (first_stage_model.encoder.*) in the checkpoint")
    levels = max_key_index(v, r"encoder\.down\.(\d+)\.") + 1
    lpb = max_key_index(v, r"encoder\.down\.0\.block\.(\d+)\.") + 1
    chans = tuple(int(v[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(levels))
    return VAEConfig(in_channels=int(v["encoder.conv_in.weight"].shape[1]),
                     out_channels=int(v["decoder.conv_out.weight"].shape[0]),
                     latent_channels=int(v["decoder.conv_in.weight"].shape[1]), block_out_channels=chans,
                     layers_per_block=lpb, use_quant_conv="quant_conv.weight" in v,
                     use_post_quant_conv="post_quant_conv.weight" in v, **fixed)


def vae_from_original(sd: Mapping[str, torch.Tensor], cfg: VAEConfig | None = None, *, what: str,
                      dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                      **fixed) -> AutoencoderKL:
    """An :class:`AutoencoderKL` from original-layout keys (no ``first_stage_model.`` prefix), strictly; the
    config is read from the shapes unless given (``fixed``: what shapes cannot show, see :func:`infer_vae_config`).
    Keys the renaming does not know keep their original names, so the strict copy reports them."""
    cfg = cfg or infer_vae_config(sd, **fixed)
    vae = build_on_meta(AutoencoderKL, cfg)
    to_new = {vae_key_to_original(k, cfg): k for k in vae.state_dict()}
    vsd = vae_attention_as_linear({to_new.get(k, VAE_PREFIX + k): v for k, v in sd.items()})
    return load_state_dict_strict(vae, vsd, what, dtype=dtype, device=device).eval()


def vae_to_original(sd: Mapping[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """A VAE state dict under its original names, ``first_stage_model.`` prefix included."""
    out = {}
    for k, v in sd.items():
        if _is_vae_attn_matrix(k):
            v = v[:, :, None, None].contiguous()  # LDM's attention projections are 1x1 convs
        out[VAE_PREFIX + vae_key_to_original(k, cfg)] = v
    return out
