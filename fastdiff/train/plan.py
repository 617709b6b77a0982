"""Memory plan of a training configuration on the GPU it targets, worked out before any step runs.

    fastdiff train --plan --model cifar10_ddpm --precision bf16 [--gpu-memory 16] [--optimizer adamw8bit]
    fastdiff.train.plan(TrainConfig(model="cifar10_ddpm"), gpu_memory_gb=16)

What a training step holds on the device, P = number of parameters, B = micro-batch:

    weights            4 P          fp32 master weights (autocast computes in bf16/fp16 from casts of them)
    gradients          4 P          fp32, one per parameter
    optimizer state    8 P          AdamW: exp_avg + exp_avg_sq in fp32
                       ~2 P         8-bit AdamW (bitsandbytes): two uint8 states + one fp32 absmax per 256-value
                                    block and state; tensors under 4,096 values keep fp32 states (8 bytes a value)
    optimizer step     4 P          AdamW's foreach step: one param-sized fp32 temporary (sqrt(v) / bias corr.)
    EMA                4 P          the fp32 EMA copy used for sampling
    activations        A0 + a B     the saved-for-backward tensors of the forward pass (measured, see below)
    batch tensors      5 x C H W x 4 B   x0, noise, x_t, target, output in fp32

Activations are measured, not guessed: the network runs one real forward pass on the CPU at two small batches
(2 and 4) under the precision the configuration asks for, and :func:`torch.autograd.graph.saved_tensors_hooks`
records every tensor autograd keeps for the backward pass; unique storages are counted once and parameters
are left out (they are the weights above). The bytes are linear in the batch, S(B) = A0 + a B, so the two
probes give the per-sample cost a and the batch-independent rest A0 (under autocast: the bf16 copies of the
weights, which autocast caches for the pass). bf16 and fp16 autocast both store 2-byte activations; fp16 is
probed with bf16 on the CPU (fp16 arithmetic is extremely slow there, and the sizes are the same).

With gradient checkpointing (every ResBlock and attention block recomputed in the backward pass) the pass
keeps only what runs outside those blocks plus each block's inputs; during backward one block at a time is
recomputed, so the largest block's own activations (measured in the plain pass) are added as a transient.

What fits: the GPU's memory minus a reserve for the CUDA context, cuDNN/cuBLAS workspaces and allocator
fragmentation (1 GiB + 10 % of the memory; a CUDA context alone takes 300-600 MB), minus everything that does
not grow with the batch, divided by the per-sample bytes. The sum is an upper bound of the step's peak: it
gives no credit for activations freed while gradients are being allocated in the backward pass.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import asdict, dataclass

import torch

from fastdiff.models.unet2d import UNet2D, UNet2DConfig, _Checkpointable

__all__ = ["MemoryPlan", "ActivationBytes", "plan", "measure_activations", "optimizer_state_bytes",
           "reserve_bytes", "GiB"]

GiB = 1024 ** 3
_RESERVE_FIXED = 1 * GiB
_RESERVE_FRACTION = 0.10
# bitsandbytes' 8-bit optimizers: blockwise quantisation in blocks of 256 values, one fp32 absmax per block and
# state; tensors with fewer than ``min_8bit_size`` (4096) values keep two fp32 states; two 256-entry fp32
# quantisation maps shared by all tensors.
_BNB_BLOCK = 256
_BNB_MIN_8BIT = 4096
_BNB_QMAPS = 2 * 256 * 4


def reserve_bytes(gpu_memory: int) -> int:
    """Memory kept back for the CUDA context, library workspaces and allocator fragmentation."""
    return int(_RESERVE_FIXED + _RESERVE_FRACTION * gpu_memory)


def optimizer_state_bytes(params, optimizer: str) -> int:
    """Device bytes of the optimizer state of ``params`` (tensors or shapes) after the first step.

    ``adamw``: two fp32 moments (8 bytes a value; the scalar step counters stay on the host).
    ``adamw8bit``: bitsandbytes' AdamW8bit, see the module docstring.
    """
    sizes = [p.numel() if isinstance(p, torch.Tensor) else math.prod(p) for p in params]
    if optimizer == "adamw":
        return 8 * sum(sizes)
    if optimizer == "adamw8bit":
        total = _BNB_QMAPS
        for n in sizes:
            if n < _BNB_MIN_8BIT:
                total += 8 * n
            else:
                total += 2 * n + 2 * 4 * -(-n // _BNB_BLOCK)
        return total
    raise ValueError(f"optimizer must be adamw or adamw8bit, got {optimizer!r}")


@dataclass(frozen=True)
class ActivationBytes:
    """Saved-for-backward bytes of one training forward pass: ``fixed + per_sample * batch``."""

    per_sample: int
    fixed: int
    probes: tuple[tuple[int, int], ...]  # (batch, bytes) as measured

    def at(self, batch: int) -> int:
        return self.fixed + self.per_sample * batch


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


def _probe_inputs(cfg: UNet2DConfig, batch: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, cfg.num_class_embeds, (batch,), generator=g) if cfg.num_class_embeds else None
    return x, t, y


def _saved_bytes(model: UNet2D, batch: int, precision: str) -> tuple[int, int]:
    """(bytes kept for backward by one forward pass at ``batch``, largest bytes one checkpointable block keeps
    inside itself). With checkpointing on, block inputs (held by the checkpoint for the recomputation) count
    as kept."""
    x, t, y = _probe_inputs(model.config, batch)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    # Every save goes through a holder; only holders still alive after the pass count. A graph that dies
    # during the forward (a side computation whose result is dropped) frees its holders at once.
    saves: list[tuple[weakref.ref, int, int, int | None]] = []  # (holder, storage ptr, bytes, block)
    kept: dict[int, int] = {}
    active: list[int] = []   # id of the checkpointable block running now (blocks do not nest)
    hold: list[torch.Tensor] = []

    def pack(tensor):
        holder = _Saved(tensor)
        ptr, nbytes = _storage_key(tensor)
        if ptr not in params:
            saves.append((weakref.ref(holder), ptr, nbytes, active[-1] if active else None))
        return holder

    def pre(module, args):
        active.append(id(module))
        if module.grad_checkpointing:
            for a in args:
                if isinstance(a, torch.Tensor):
                    hold.append(a)
                    ptr, nbytes = _storage_key(a)
                    if ptr not in params:
                        kept[ptr] = nbytes

    def post(module, args, out):
        active.pop()

    handles = []
    for m in model.modules():
        if isinstance(m, _Checkpointable):
            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision in ("bf16", "fp16")
                else contextlib.nullcontext())
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda holder: holder.tensor), autocast:
            out = model(x, t, y)
        per_block: dict[int, dict[int, int]] = {}
        for ref, ptr, nbytes, block in saves:
            if ref() is not None:
                kept[ptr] = nbytes
                if block is not None:
                    per_block.setdefault(block, {})[ptr] = nbytes
        del out  # the graph (and what it saved) is freed without a backward pass
    finally:
        for h in handles:
            h.remove()
    largest_block = max((sum(d.values()) for d in per_block.values()), default=0)
    return sum(kept.values()), largest_block


class _Saved:
    """What autograd stores for a saved tensor while the plan measures (weak-referenceable)."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


def measure_activations(unet_config: UNet2DConfig, precision: str = "bf16", *, grad_checkpointing: bool = False,
                        batches: tuple[int, int] = (2, 4), model: UNet2D | None = None) -> ActivationBytes:
    """Saved-for-backward bytes of a training forward pass of ``unet_config``, fitted as ``fixed + a * batch``
    from real passes at the two ``batches`` on the CPU (see the module docstring)."""
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be bf16, fp32 or fp16, got {precision!r}")
    b1, b2 = batches
    if not 0 < b1 < b2:
        raise ValueError(f"batches must be two increasing positive sizes, got {batches}")
    if model is None:
        torch.manual_seed(0)
        model = UNet2D(unet_config)
    was_training, was_ckpt = model.training, model.grad_checkpointing
    model.train()
    probes = []
    try:
        with torch.enable_grad():
            for b in (b1, b2):
                if grad_checkpointing:
                    model.set_grad_checkpointing(False)
                    _, transient = _saved_bytes(model, b, precision)  # one block recomputed at a time
                    model.set_grad_checkpointing(True)
                    kept, _ = _saved_bytes(model, b, precision)
                    probes.append((b, kept + transient))
                else:
                    model.set_grad_checkpointing(False)
                    probes.append((b, _saved_bytes(model, b, precision)[0]))
    finally:
        model.set_grad_checkpointing(was_ckpt)
        model.train(was_training)
    (_, s1), (_, s2) = probes
    per_sample = (s2 - s1) // (b2 - b1)
    return ActivationBytes(per_sample=per_sample, fixed=max(0, s1 - per_sample * b1), probes=tuple(probes))


@dataclass
class MemoryPlan:
    """Bytes a configuration needs on a GPU of ``gpu_memory`` bytes, and the largest micro-batch that fits."""

    model: str
    num_parameters: int
    precision: str
    optimizer: str
    gpu_memory: int
    reserve: int
    weights: int
    gradients: int
    optimizer_state: int
    optimizer_workspace: int
    ema: int
    batch_tensors_per_sample: int
    activations: ActivationBytes
    activations_checkpointed: ActivationBytes
    batch_size: int

    @property
    def fixed(self) -> int:
        """Bytes that do not grow with the batch (without the activations' own fixed part)."""
        return self.weights + self.gradients + self.optimizer_state + self.optimizer_workspace + self.ema

    def total(self, batch: int, *, grad_checkpointing: bool = False) -> int:
        act = self.activations_checkpointed if grad_checkpointing else self.activations
        return self.fixed + act.at(batch) + self.batch_tensors_per_sample * batch

    def max_batch(self, *, grad_checkpointing: bool = False) -> int:
        """The largest micro-batch whose total fits in the memory left after the reserve (0: none fits)."""
        act = self.activations_checkpointed if grad_checkpointing else self.activations
        free = self.gpu_memory - self.reserve - self.fixed - act.fixed
        per = act.per_sample + self.batch_tensors_per_sample
        return max(0, free // per) if per > 0 else 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["max_batch"] = self.max_batch()
        d["max_batch_checkpointed"] = self.max_batch(grad_checkpointing=True)
        return d

    def format(self) -> str:
        def mb(n):
            return f"{n / 2 ** 20:10.1f} MiB"

        a, ac = self.activations, self.activations_checkpointed
        b = self.batch_size
        prec = self.precision + (" (probed as bf16: same 2-byte activations)" if self.precision == "fp16" else "")
        lines = [
            f"memory plan: {self.model}, {self.num_parameters / 1e6:.2f}M parameters, {prec}, {self.optimizer}, "
            f"GPU {self.gpu_memory / GiB:.1f} GiB",
            f"  weights (fp32)            {mb(self.weights)}",
            f"  gradients (fp32)          {mb(self.gradients)}",
            f"  optimizer state           {mb(self.optimizer_state)}   ({self.optimizer})",
            f"  optimizer step workspace  {mb(self.optimizer_workspace)}",
            f"  EMA weights (fp32)        {mb(self.ema)}",
            f"  activations per sample    {mb(a.per_sample)}   (+{mb(a.fixed).strip()} fixed; measured at batch "
            f"{a.probes[0][0]} and {a.probes[1][0]})",
            f"    with grad checkpointing {mb(ac.per_sample)}   (+{mb(ac.fixed).strip()} fixed)",
            f"  batch tensors per sample  {mb(self.batch_tensors_per_sample)}",
            f"  reserve (CUDA context, workspaces, fragmentation: 1 GiB + 10%) {self.reserve / 2 ** 20:.0f} MiB",
            f"  at batch {b}: {self.total(b) / GiB:.2f} GiB, with grad checkpointing "
            f"{self.total(b, grad_checkpointing=True) / GiB:.2f} GiB"
            + ("   <- does not fit" if self.total(b) > self.gpu_memory - self.reserve else ""),
            f"  largest batch that fits: {self.max_batch()} ; with --grad-checkpointing: "
            f"{self.max_batch(grad_checkpointing=True)}",
        ]
        return "\n".join(lines)


def plan(cfg, *, gpu_memory_gb: float = 16.0, channels: int | None = None, num_classes: int | None = None,
         class_names: tuple[str, ...] | None = None, dataset=None, probe_batches: tuple[int, int] = (2, 4)
         ) -> MemoryPlan:
    """The :class:`MemoryPlan` of a :class:`~fastdiff.train.TrainConfig` on a GPU of ``gpu_memory_gb`` GiB.

    The network's input channels and classes come from ``dataset`` (an ImageDataset), from ``channels`` /
    ``num_classes``, or else from loading ``cfg.dataset`` (which also checks that the dataset is readable).
    No training step runs and nothing is written.
    """
    cfg.check()
    if not gpu_memory_gb > 0:
        raise ValueError(f"gpu memory must be positive (GiB), got {gpu_memory_gb}")
    if channels is None or num_classes is None:
        if dataset is None:
            from fastdiff.io.datasets import load_dataset

            dataset = load_dataset(cfg.dataset, "train", size=cfg.image_size)
        channels = dataset.image_shape[0] if channels is None else channels
        num_classes = dataset.num_classes if num_classes is None else num_classes
        class_names = dataset.class_names
    names = tuple(class_names) if class_names else tuple(str(i) for i in range(num_classes))
    ucfg = cfg.unet_config(num_classes, names, channels)
    torch.manual_seed(0)
    model = UNet2D(ucfg)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    act = measure_activations(ucfg, cfg.precision, batches=probe_batches, model=model)
    act_ck = measure_activations(ucfg, cfg.precision, grad_checkpointing=True, batches=probe_batches, model=model)
    gpu = int(gpu_memory_gb * GiB)
    return MemoryPlan(
        model=cfg.model, num_parameters=n, precision=cfg.precision, optimizer=cfg.optimizer, gpu_memory=gpu,
        reserve=reserve_bytes(gpu), weights=4 * n, gradients=4 * n,
        optimizer_state=optimizer_state_bytes(params, cfg.optimizer),
        optimizer_workspace=4 * n if cfg.optimizer == "adamw" else 0, ema=4 * n,
        batch_tensors_per_sample=5 * channels * cfg.image_size ** 2 * 4,
        activations=act, activations_checkpointed=act_ck, batch_size=cfg.batch_size)
