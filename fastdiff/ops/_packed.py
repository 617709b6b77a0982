"""The packed-weight cache of :class:`fastdiff.ops.Conv2d` and :class:`fastdiff.ops.Linear`: a weight kept in
oneDNN's blocked layout that *replaces* the plain one in inference instead of sitting beside it.

oneDNN convolutions and inner products read their weights in a blocked layout (``OIhw8i8o`` and the like)
that depends on the CPU and, for convolutions, on the input shape. Given a plain weight, torch's oneDNN ops
reorder it on every call; a frozen inference weight can be reordered once. On CPUs without fast bf16 dot
products bf16 layers compute in fp32 (:func:`fastdiff.ops._onednn.onednn_math_dtype`), so the per-call work is
a bf16 -> fp32 conversion plus the reorder, and the packed copy is fp32.

What a layer does in inference (eval mode, no gradient wanted, no autocast, a CPU oneDNN call that takes
the packed weight):

1. The first ``pack_after - 1`` calls with one key (math dtype, and for convolutions the input shape) run on
   the plain weight, packing per call; the next one packs and keeps the result. So a layer that runs once or
   twice per image (the text encoder: prompt and negative prompt; an untiled VAE decode) never holds a
   packed copy, while a denoiser, called every step, packs at its second step.
2. Once packed, the plain weight is freed: the parameter keeps its identity, shape, dtype and device, but its
   data is a one-element NaN placeholder broadcast to the shape (a stray read gives NaN, never a plausible
   wrong number). The packed tensor holds the same values (a lossless conversion: the weight's own dtype, or
   fp32 for a bf16 weight), so the plain weight is recovered exactly by one reorder back
   (``to_dense(dtype)``).
3. The plain weight comes back whenever something outside this fast path reads it: ``layer.weight`` (so
   LoRA fusing, ``module.weight.dtype`` and any user code see the real tensor), ``state_dict`` (the plain
   values go into the dict), ``load_state_dict``, ``.to()`` / ``.float()`` and every other ``_apply``,
   ``train()``, pickling / ``deepcopy``, and a forward that needs the plain weight (gradients, autocast,
   another input shape, a backend that does not take packed weights). ``parameters()`` and
   ``named_parameters()`` hand out the parameter objects as they are (the placeholder while packed): read
   their values through one of the paths above.

``Conv2d.pack_policy`` / ``Linear.pack_policy`` (class attributes, or per instance) choose among ``"replace"``
(the above), ``"cache"`` (keep the packed copy beside the plain weight, the memory of both) and ``"off"``
(never pack: the per-call conversion and reorder every time). ``pack_wider`` (True for Conv2d, False for
Linear) says whether to pack when the packed copy is wider than the weight (fp32 for bf16).

Measured on full-size random SD1.5 in bf16 on a 2-core AVX2-only CPU (bf16 math in fp32, so packed copies are
fp32; load average 8-10 from other jobs, so take the ratios), one guided UNet step at 256x256, every layer timed in
place (``python benchmarks/bench_pack.py 256``, best of 2 per layer):

| kind | layers | s per step, plain weight | packed | saved | plain GiB | packed GiB | s saved per GiB packed |
|---|---|---|---|---|---|---|---|
| 3x3 convolutions | 52 | 28.95 | 10.07 | 18.88 | 1.008 | 2.015 | 9.4 |
| 1x1 convolutions | 46 | 4.37 | 2.80 | 1.58 | 0.089 | 0.179 | 8.8 |
| linears | 184 | 15.76 | 11.32 | 4.45 | 0.503 | 0.902 | 4.9 |

The whole step: 56.7 s unpacked, 39.1 s packed (1.45x); the step that packs, 63.2 s. Linears buy half the time
per byte of convolutions, hence ``Linear.pack_wider = False``: on such CPUs the UNet holds 2.19 GiB of packed
convolutions and 0.50 GiB of bf16 linears instead of 3.10 GiB all packed (an estimate from this table: +4.5 s on
that 56.7 s step, ~11%, less at 512x512 where the compute per weight byte is 4x). A whole 512x512 txt2img
(benchmarks/bench_memory.py) peaked at 5.97 GiB with everything packed and replacing, against 7.53 GiB with the
packed copies beside the plain weights and 3.88 GiB never packing; its peak is the VAE decode, with the UNet's
packed copies resident. Where bf16 math is native (AVX512-BF16 / AMX) the packed copy is bf16, the same bytes as
the plain weight, and every layer packs and replaces (not timed here: this CPU has no bf16 kernels).
"""
from __future__ import annotations

import ctypes
import functools

import torch

__all__ = ["PACK_POLICIES", "PackedWeightMixin", "packed_bytes", "plain_bytes", "plain_weight", "restore_plain_weights"]

PACK_POLICIES = ("replace", "cache", "off")


_TRIM_EVERY = 256 << 20  # bytes of freed plain weights between two malloc_trim calls
_freed = [0]


@functools.lru_cache(maxsize=None)
def _libc_malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to trim
        return None


def _note_freed(nbytes: int) -> None:
    """Hand the heap pages of freed plain weights back to the kernel now and then. glibc keeps freed blocks
    below its mmap threshold in the heap, resident; packing a whole SD1.5 UNet left 0.6 GiB of them (resident set
    4.36 GiB, 3.76 GiB after ``malloc_trim(0)``: benchmarks/bench_pack.py)."""
    _freed[0] += nbytes
    if _freed[0] >= _TRIM_EVERY:
        _freed[0] = 0
        trim = _libc_malloc_trim()
        if trim is not None:
            trim(0)


def _placeholder(weight: torch.Tensor) -> torch.Tensor:
    """A tensor with ``weight``'s shape, dtype and device holding one NaN element (no memory of its size)."""
    return torch.full((), float("nan"), dtype=weight.dtype, device=weight.device).expand(weight.shape)


class _Packer:
    """What a layer hands its op: ``packer(math, hint)`` gives the packed weight (or None: use the plain one).

    ``replace``: the packed copy may replace the plain weight. ``cast``: under autocast, the dtype autocast gives
    the weight before the op sees it (the packed copy is made from the weight so cast, as the op would).
    """

    __slots__ = ("module", "replace", "cast")

    def __init__(self, module: "PackedWeightMixin", replace: bool, cast: torch.dtype | None = None):
        self.module = module
        self.replace = replace
        self.cast = cast

    def __call__(self, math: torch.dtype, hint) -> torch.Tensor | None:
        m = self.module
        st = m.__dict__
        key = m._fd_key(math, hint) + (self.cast,)
        dropped = m._fd_dropped_state()
        if dropped is not None:
            if dropped[1] == key:
                return dropped[2]
            m._fd_restore(keep_pack=False)  # another input shape or math dtype: back to plain, repack below
        weight = m._parameters["weight"]
        if not m.pack_wider and math.itemsize > (self.cast or weight.dtype).itemsize:
            return None  # the packed copy would be wider than the weight (fp32 for bf16): not worth it here
        try:
            full_key = key + (weight._version, weight.data_ptr())
        except RuntimeError:  # an inference tensor has no version counter: do not cache
            return None
        cached = st.get("_fd_pack")
        if cached is not None and cached[0] == full_key:
            packed = cached[1]
        else:
            st.pop("_fd_pack", None)  # free a stale packed copy before making the next
            seen = st.get("_fd_seen")
            count = seen[1] + 1 if seen is not None and seen[0] == full_key else 1
            if count < m.pack_after:
                st["_fd_seen"] = (full_key, count)
                return None
            st.pop("_fd_seen", None)
            with torch.no_grad():
                w = weight.detach()
                packed = m._fd_make_pack(w.to(self.cast) if self.cast is not None else w, math, hint)
            st["_fd_pack"] = (full_key, packed)
        # Replace only when the packed copy holds the plain values exactly (the weight's dtype, or fp32 for bf16).
        if self.replace and self.cast is None and (
                math == weight.dtype or (weight.dtype == torch.bfloat16 and math == torch.float32)):
            with torch.inference_mode(False):
                hole = _placeholder(weight)
            st["_fd_dropped"] = (hole, key, packed, weight.dtype)
            freed = weight.numel() * weight.element_size()
            weight.data = hole
            _note_freed(freed)
        return packed


def plain_weight(weight: torch.Tensor, packer: _Packer | None) -> torch.Tensor:
    """The values of the weight an op was given: ``weight`` itself, unless it is the placeholder of a layer whose
    packed copy replaced it; then the layer's plain weight, restored."""
    if packer is None:
        return weight
    d = packer.module._fd_dropped_state()
    if d is None or d[0].data_ptr() != weight.data_ptr():
        return weight
    packer.module._fd_restore(keep_pack=False)
    return packer.module._parameters["weight"]


class PackedWeightMixin:
    """The packed-weight cache shared by :class:`fastdiff.ops.Conv2d` and :class:`fastdiff.ops.Linear`.

    A subclass defines ``_fd_key(math, hint)`` (what the packed layout depends on besides the weight),
    ``_fd_make_pack(weight, math, hint)`` and ``_fd_unpack(packed, dtype)``.
    """

    _fd_pack = None  # (key, packed weight) once packed; instances set it in their __dict__
    pack_policy: str = "replace"
    pack_after: int = 2  # calls with one key before the weight is packed (see the module docstring)
    pack_wider: bool = True  # pack also when the packed copy is wider than the weight (fp32 for a bf16 weight)

    def _fd_key(self, math, hint) -> tuple:
        raise NotImplementedError

    def _fd_make_pack(self, weight: torch.Tensor, math: torch.dtype, hint) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def _fd_unpack(packed: torch.Tensor, dtype: torch.dtype, shape) -> torch.Tensor:
        # oneDNN reorders back to the plain layout, converting to the weight's dtype in the same pass (a grouped
        # convolution's packed weight is 5-D: groups first, so a reshape gives the (O, I/g, kh, kw) order).
        return packed.to_dense(dtype).reshape(shape)

    # -------------------------------------------------------------------------------------------- state
    def _fd_dropped_state(self):
        """(placeholder, key, packed, dtype) while the plain weight is replaced, else None (a weight replaced or
        reassigned by other code since makes the packed copy stale: it is dropped)."""
        st = self.__dict__
        d = st.get("_fd_dropped")
        if d is None:
            return None
        p = self._parameters.get("weight")
        if p is None or p.data_ptr() != d[0].data_ptr() or p.shape != d[0].shape:
            del st["_fd_dropped"]
            st.pop("_fd_pack", None)
            return None
        return d

    def _fd_restore(self, keep_pack: bool) -> None:
        """Put the plain weight back (exactly: unpacked from the packed copy). ``keep_pack`` keeps the packed
        copy, keyed on the restored tensor, so the next inference call can replace the plain weight again."""
        d = self._fd_dropped_state()
        if d is not None:
            hole, key, packed, dtype = d
            p = self._parameters["weight"]
            with torch.no_grad(), torch.inference_mode(False):
                p.data = self._fd_unpack(packed, dtype, hole.shape)
            del self.__dict__["_fd_dropped"]
            if keep_pack:
                self.__dict__["_fd_pack"] = (key + (p._version, p.data_ptr()), packed)
        if not keep_pack:
            self.__dict__.pop("_fd_pack", None)
            self.__dict__.pop("_fd_seen", None)

    def _fd_packer(self, *inputs: torch.Tensor | None) -> _Packer | None:
        """The packer for this call with these activations, or None (training, gradients, packing off): then
        the plain weight is back in place and no packed copy is held."""
        if torch.compiler.is_compiling():
            # traced code cannot hold opaque oneDNN tensors or swap a parameter's data (inductor prepacks
            # weights by itself when freezing): the op gets the plain weight, which a traced call never frees
            return None
        policy = self.pack_policy
        if policy not in PACK_POLICIES:
            raise ValueError(f"{type(self).__name__}.pack_policy must be one of {PACK_POLICIES}, got {policy!r}")
        w = self._parameters["weight"]
        grad = torch.is_grad_enabled() and (w.requires_grad or any(t is not None and t.requires_grad
                                                                    for t in inputs))
        if policy == "off" or self.training or grad or w.device.type != "cpu":
            self._fd_restore(keep_pack=False)
            return None
        if torch.is_autocast_enabled("cpu"):
            # autocast casts the weight before the op sees it: the plain weight stays, the packed copy (made from
            # the cast weight) is a cache beside it
            self._fd_restore(keep_pack=True)
            cast = torch.get_autocast_dtype("cpu")
            return _Packer(self, replace=False, cast=cast if cast != w.dtype else None)
        return _Packer(self, replace=policy == "replace")

    # -------------------------------------------------------------------------------------------- torch hooks
    def __getattr__(self, name: str):
        if name == "weight" and "_fd_dropped" in self.__dict__ and not torch.compiler.is_compiling():
            self._fd_restore(keep_pack=True)
        return super().__getattr__(name)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        d = self._fd_dropped_state()
        if d is None or keep_vars:
            if d is not None:
                self._fd_restore(keep_pack=True)
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        # the plain values go into the dict; the layer stays packed
        super()._save_to_state_dict(destination, prefix, keep_vars)
        with torch.no_grad(), torch.inference_mode(False):
            destination[prefix + "weight"] = self._fd_unpack(d[2], d[3], d[0].shape)

    def _load_from_state_dict(self, *args, **kwargs):
        self._fd_restore(keep_pack=False)
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._fd_restore(keep_pack=False)
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True):
        if mode:
            self._fd_restore(keep_pack=False)
        return super().train(mode)

    def __getstate__(self):
        # The packed weight is an opaque oneDNN tensor: never pickle or deep-copy it (it is rebuilt on demand).
        self._fd_restore(keep_pack=True)
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        for k in ("_fd_pack", "_fd_seen", "_fd_dropped"):
            state.pop(k, None)
        return state


def restore_plain_weights(module: torch.nn.Module) -> torch.nn.Module:
    """Put back the plain weight of every fastdiff layer in ``module`` that replaced it by a packed copy, and drop
    the packed copies: call it before writing parameters in place through ``parameters()`` (an EMA update of a
    model that was sampled in eval mode), which hands out the placeholders of replaced weights."""
    for m in module.modules():
        if isinstance(m, PackedWeightMixin):
            m._fd_restore(keep_pack=False)
    return module


def packed_bytes(module: torch.nn.Module) -> int:
    """Bytes of the packed weights held by the fastdiff layers in ``module`` (replaced or cached beside)."""
    total = 0
    for m in module.modules():
        entry = m.__dict__.get("_fd_pack")
        d = m.__dict__.get("_fd_dropped")
        packed = d[2] if d is not None else entry[1] if entry is not None else None
        if packed is not None:
            total += packed.numel() * packed.element_size()
    return total


def plain_bytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers in ``module`` that hold memory (a replaced weight's placeholder
    counts as nothing)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.numel() == 0 or t.data_ptr() in seen or 0 in t.stride():
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
