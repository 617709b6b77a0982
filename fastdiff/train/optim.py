"""8-bit AdamW: AdamW whose two moments are stored block-wise quantised to 8 bits (Dettmers et al. 2022,
"8-bit Optimizers via Block-wise Quantization", ICLR; the scheme of bitsandbytes' 8-bit optimizers).

Storage of a moment tensor of n values (n >= ``min_8bit_size``):

    codes   uint8 (n,)                 index into a 256-entry code book q (values in [-1, 1], sorted)
    absmax  fp32  (ceil(n / block),)   the largest |value| of each block of ``block_size`` consecutive values

    value_i = q[codes_i] * absmax[i // block_size]

so a moment costs 1 byte a value plus 4 bytes a block: 2 + 8 / block_size bytes a parameter for both moments
(2.03 at block 256, 2.004 at block 2048) against 8 for fp32 AdamW. Tensors under ``min_8bit_size`` values
(biases, norms) keep fp32 moments: for them the saving is nothing and the error would be the largest.

The code book is the paper's *dynamic* (tree) quantisation: a value is sign x 10^-E x f, where the exponent E is
told by the run of zero bits after the sign, the first one bit ends that run, and the bits after it are a
linear fraction: f is the midpoint of one of 2^k equal intervals of [0.1, 1], k = the bits left. With 7 bits
after the sign, E = 6 - k for k = 0..6 gives 1 + 2 + ... + 64 = 127 magnitudes from 5.5e-7 to 0.993, spanning six
decades with few values for tiny ones and 64 for the last decade, plus exact 0 and 1. The first moment is
signed; the second moment is never negative, so its sign bit becomes one more fraction bit (2^(k+1) intervals
per decade: 254 magnitudes, plus 0 and 1). Normalising by the block's absmax maps the block's largest value to
exactly +-1 (or 1), so outliers cost one block, not the whole tensor.

A step, per tensor (all arithmetic in fp32; Loshchilov & Hutter's decoupled weight decay, Kingma & Ba's bias
correction as in ``torch.optim.AdamW``)::

    m, v   <- dequantise(codes, absmax)                 (fp32 moments of the tensor)
    m      <- beta1 m + (1 - beta1) g
    v      <- beta2 v + (1 - beta2) g^2
    p      <- p (1 - lr wd) - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    codes, absmax <- quantise(m, v)                      (absmax of each updated block; nearest code)

The update uses the fp32 moments of this step; only what is stored between steps is 8-bit. The arithmetic is
deterministic, so a run resumed from a checkpoint (which stores the codes and absmax exactly) replays an
uninterrupted one bit for bit.
"""
from __future__ import annotations

import math

import torch

__all__ = ["AdamW8bit", "dynamic_code", "quantize_blockwise", "dequantize_blockwise", "state_bytes"]

_MAX_EXPONENT = 7      # bits after the sign that can hold the run of zeros (E = 0..6)


def dynamic_code(signed: bool) -> torch.Tensor:
    """The sorted 256-entry fp32 code book of the dynamic (tree) quantisation (module docstring)."""
    values = [0.0, 1.0]
    for k in range(_MAX_EXPONENT):                   # k fraction bits at the decade 10^(k - 6)
        intervals = 2 ** (k if signed else k + 1)
        # the grid of [0.1, 1], its midpoints and their scaling to the decade, all in fp32
        edges = torch.linspace(0.1, 1.0, intervals + 1, dtype=torch.float32)
        mids = (10.0 ** (k - (_MAX_EXPONENT - 1)) * ((edges[:-1] + edges[1:]) / 2)).tolist()
        values += mids + ([-f for f in mids] if signed else [])
    code = torch.tensor(sorted(values), dtype=torch.float32)
    assert code.numel() == 256
    return code


_CODES: dict[tuple[bool, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _code_and_bounds(signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(code book, the 255 midpoints between neighbouring codes) on ``device``, built once."""
    key = (signed, torch.device(device))
    if key not in _CODES:
        code = dynamic_code(signed)
        _CODES[key] = (code.to(device), ((code[1:] + code[:-1]) / 2).to(device))
    return _CODES[key]


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``x`` flattened and zero-padded to whole blocks: (blocks, block_size)."""
    flat = x.reshape(-1)
    pad = -flat.numel() % block_size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block_size)


def quantize_blockwise(x: torch.Tensor, *, signed: bool, block_size: int,
                       out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes shaped like ``x``, fp32 absmax per block): each value to the nearest code of its block's
    normalised value ``x / absmax`` (a block of zeros has absmax 0 and the code of 0)."""
    code, bounds = _code_and_bounds(signed, x.device)
    xb = _blocks(x.float(), block_size)
    absmax = xb.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    idx = torch.bucketize(xb / scale[:, None], bounds, out_int32=True)   # nearest code (ties to the lower)
    codes = idx.reshape(-1)[: x.numel()].to(torch.uint8).view(x.shape)
    if out is not None:
        out[0].copy_(codes)
        out[1].copy_(absmax)
        return out
    return codes, absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, *, signed: bool,
                         block_size: int) -> torch.Tensor:
    """The fp32 values ``code[codes] * absmax[block]``, shaped like ``codes``."""
    code, _ = _code_and_bounds(signed, codes.device)
    vals = _blocks(code[codes.reshape(-1).int()], block_size)
    return (vals * absmax[:, None]).reshape(-1)[: codes.numel()].view(codes.shape)


def state_bytes(numel: int, *, block_size: int = 256, min_8bit_size: int = 4096) -> int:
    """Bytes of :class:`AdamW8bit`'s state for one tensor of ``numel`` values (both moments)."""
    if numel < min_8bit_size:
        return 8 * numel
    return 2 * numel + 2 * 4 * -(-numel // block_size)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with block-wise dynamically quantised 8-bit moments (module docstring).

    Same arguments as :class:`torch.optim.AdamW` (``amsgrad``, ``maximize`` and the foreach/fused switches
    aside), plus ``block_size`` (values per absmax block: 256, or the paper's 2048) and ``min_8bit_size``
    (tensors with fewer values keep fp32 moments). Works on any device; parameters must be floating point.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, block_size: int = 256, min_8bit_size: int = 4096):
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if not isinstance(block_size, int) or block_size < 2:
            raise ValueError(f"block_size must be an integer >= 2 (256 or 2048 are the usual), got {block_size!r}")
        if not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be an integer >= 0, got {min_8bit_size!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, block_size=block_size,
                        min_8bit_size=min_8bit_size)
        super().__init__(params, defaults)

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        st = self.state[p]
        st["step"] = 0
        if p.numel() >= group["min_8bit_size"]:
            blocks = -(-p.numel() // group["block_size"])
            code0 = lambda signed: int(torch.argmin(dynamic_code(signed).abs()))  # noqa: E731  (the code of 0)
            st["exp_avg_q"] = torch.full(p.shape, code0(True), dtype=torch.uint8, device=p.device)
            st["exp_avg_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
            st["exp_avg_sq_q"] = torch.full(p.shape, code0(False), dtype=torch.uint8, device=p.device)
            st["exp_avg_sq_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
        else:
            st["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            st["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        return st

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            bs = group["block_size"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not support sparse gradients")
                st = self.state[p] if self.state[p] else self._init_state(p, group)
                quantised = "exp_avg_q" in st
                g = p.grad.float()
                if quantised:
                    m = dequantize_blockwise(st["exp_avg_q"], st["exp_avg_absmax"], signed=True, block_size=bs)
                    v = dequantize_blockwise(st["exp_avg_sq_q"], st["exp_avg_sq_absmax"], signed=False,
                                             block_size=bs)
                else:
                    m, v = st["exp_avg"], st["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1.0 - b1)
                v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
                st["step"] += 1
                t = st["step"]
                c1, c2 = 1.0 - b1 ** t, math.sqrt(1.0 - b2 ** t)
                p32 = p.float() if p.dtype != torch.float32 else p
                if wd:
                    p32.mul_(1.0 - lr * wd)
                p32.addcdiv_(m, v.sqrt().div_(c2).add_(eps), value=-lr / c1)
                if p32 is not p:
                    p.copy_(p32)
                if quantised:
                    quantize_blockwise(m, signed=True, block_size=bs, out=(st["exp_avg_q"], st["exp_avg_absmax"]))
                    quantize_blockwise(v, signed=False, block_size=bs,
                                       out=(st["exp_avg_sq_q"], st["exp_avg_sq_absmax"]))
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """As :meth:`torch.optim.Optimizer.load_state_dict`, keeping the dtypes of the saved state (the base class
        would cast the uint8 codes and fp32 absmax to the parameters' dtype)."""
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            if i not in saved:
                continue
            st = {k: (v.to(p.device) if isinstance(v, torch.Tensor) else v) for k, v in saved[i].items()}
            expect = ({"step", "exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax"}
                      if "exp_avg_q" in st else {"step", "exp_avg", "exp_avg_sq"})
            if set(st) != expect:
                raise ValueError(f"AdamW8bit state of parameter {i}: keys {sorted(st)}, expected {sorted(expect)}")
            moment = st.get("exp_avg_q", st.get("exp_avg"))
            if moment.shape != p.shape:
                raise ValueError(f"AdamW8bit state of parameter {i} has shape {tuple(moment.shape)}, the parameter "
                                 f"{tuple(p.shape)}")
            st["step"] = int(st["step"])
            self.state[p] = st
