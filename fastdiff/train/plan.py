"""Memory plan of a training configuration on the GPU it targets, worked out before any step runs.

    fastdiff train --plan --model cifar10_ddpm --precision bf16 [--gpu-memory 16] [--optimizer adamw8bit]
    fastdiff train --plan --kind autoencoder --model fashion_f4
    fastdiff train --plan --autoencoder runs/ae --conditioning text --model fashion_tiny_sd
    fastdiff.train.plan(TrainConfig(model="cifar10_ddpm"), gpu_memory_gb=16)

Every model kind the trainer trains has a plan: a class-conditioned UNet2D (pixels or latents), a
text-conditioned SD-layout UNet with its CLIP text encoder (pixels or latents), and a KL autoencoder.
What a training step holds on the device, P = number of trained parameters, B = micro-batch:

    weights            4 P          fp32 master weights (autocast computes in bf16/fp16 from casts of them)
    gradients          4 P          fp32, one per parameter
    optimizer state    8 P          AdamW: exp_avg + exp_avg_sq in fp32
                       ~2 P         8-bit AdamW (fastdiff.train.optim): two uint8 moments + one fp32 absmax per
                                    256-value block and moment (2.03 bytes a value); tensors under 4,096 values
                                    keep fp32 moments (8 bytes a value)
    optimizer step     4 P          AdamW's foreach step: one param-sized fp32 temporary (sqrt(v) / bias corr.)
                       24 Pmax      8-bit AdamW: its step works one tensor at a time, with fp32 m, v, sqrt(v), the
                                    normalised moment and int32 code indices of the largest tensor (Pmax values)
    EMA                4 P          the fp32 EMA copy used for sampling
    frozen autoencoder 4 P_vae      latent diffusion: the autoencoder that decodes sample grids (fp32, no grads;
                                    the cached latents stay in host memory)
    activations        A0 + a B     the saved-for-backward tensors of the forward pass (measured, see below)
    working set        W0 + w B     the not-saved tensors alive at the forward's peak, on top of the saved ones
    batch tensors      diffusion: 5 x C H W x 4 B (x0, noise, x_t, target, output in fp32, C H W the latent's
                       in latent runs) + 77 x 8 B token ids for captions; autoencoder: 3 x C H W x 4 B (input,
                       fp32 reconstruction, error) + 2 x c h w x 4 B (noise, z at the latent size)

Activations are measured, not guessed: the network runs one real forward pass on the CPU at two small batches
(2 and 4) under the precision the configuration asks for, and :func:`torch.autograd.graph.saved_tensors_hooks`
records every tensor autograd keeps for the backward pass; unique storages are counted once and parameters
are left out (they are the weights above). The bytes are linear in the batch, S(B) = A0 + a B, so the two
probes give the per-sample cost a and the batch-independent rest A0 (under autocast: the bf16 copies of the
weights, which autocast caches for the pass). The same passes run under a dispatch mode that follows every
storage the ops create until it is freed; the most bytes alive at once, less the saved bytes, is the forward's
working set (the concatenated skips and residual sums of a UNet's last block, alive next to nearly all the
saved tensors), fitted the same way and added to the activations. bf16 and fp16 autocast both store 2-byte
activations; fp16 is probed with bf16 on the CPU (fp16 arithmetic is extremely slow there, and the sizes are the
same).

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
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastdiff.models import clip_text, unet_sd, vae as vae_models
from fastdiff.models.unet2d import UNet2D, UNet2DConfig, _Checkpointable
from fastdiff.train.captions import CaptionTable, TextConditionedUNet
from fastdiff.train.optim import state_bytes as _adamw8bit_state_bytes

__all__ = ["MemoryPlan", "ActivationBytes", "plan", "measure_activations", "optimizer_state_bytes",
           "reserve_bytes", "GiB"]

GiB = 1024 ** 3
_RESERVE_FIXED = 1 * GiB
_RESERVE_FRACTION = 0.10


def reserve_bytes(gpu_memory: int) -> int:
    """Memory kept back for the CUDA context, library workspaces and allocator fragmentation."""
    return int(_RESERVE_FIXED + _RESERVE_FRACTION * gpu_memory)


def optimizer_state_bytes(params, optimizer: str) -> int:
    """Device bytes of the optimizer state of ``params`` (tensors or shapes) after the first step.

    ``adamw``: two fp32 moments (8 bytes a value; the scalar step counters stay on the host).
    ``adamw8bit``: :class:`fastdiff.train.optim.AdamW8bit`, see the module docstring (its code books are two
    256-entry constants outside the state).
    """
    sizes = [p.numel() if isinstance(p, torch.Tensor) else math.prod(p) for p in params]
    if optimizer == "adamw":
        return 8 * sum(sizes)
    if optimizer == "adamw8bit":
        return sum(_adamw8bit_state_bytes(n) for n in sizes)
    raise ValueError(f"optimizer must be adamw or adamw8bit, got {optimizer!r}")


@dataclass(frozen=True)
class ActivationBytes:
    """Saved-for-backward bytes of one training forward pass: ``fixed + per_sample * batch``."""

    per_sample: int
    fixed: int
    probes: tuple[tuple[int, int], ...]  # (batch, bytes) as measured
    # the forward's working set on top of the saved bytes: the most bytes of not-saved tensors alive at once
    # during the pass (the up path's concatenations and residual sums at the end of a UNet, say)
    transient_per_sample: int = 0
    transient_fixed: int = 0

    def at(self, batch: int) -> int:
        """Saved-for-backward bytes at ``batch``."""
        return self.fixed + self.per_sample * batch

    def peak(self, batch: int) -> int:
        """Saved bytes plus the forward's working set at ``batch``: what the activations take at their peak."""
        return self.at(batch) + self.transient_fixed + self.transient_per_sample * batch


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


def _probe_inputs(cfg: UNet2DConfig, batch: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, cfg.num_class_embeds, (batch,), generator=g) if cfg.num_class_embeds else None
    return x, t, y


def training_forward(model: torch.nn.Module, batch: int, *, captions: CaptionTable | None = None):
    """What one training micro-batch of ``batch`` runs through ``model`` (random inputs of the right shapes):
    ``unet(x_t, t, label)``; ``net(x_t, t, caption ids)`` for a text-conditioned UNet; for an autoencoder the
    encoder, the reparameterised sample ``z`` and the decoder, with the KL term's inputs kept."""
    g = torch.Generator().manual_seed(0)
    if isinstance(model, UNet2D):
        return model(*_probe_inputs(model.config, batch))
    if isinstance(model, TextConditionedUNet):
        c = model.unet.config
        x = torch.randn(batch, c.in_channels, c.sample_size, c.sample_size, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        if captions is None:
            raise ValueError("a text-conditioned model needs the caption table to probe")
        ids = captions.ids[torch.randint(0, len(captions.ids), (batch,), generator=g)]
        return model(x, t, ids)
    if isinstance(model, vae_models.AutoencoderKL):
        c = model.config
        x = torch.rand(batch, c.in_channels, c.sample_size, c.sample_size, generator=g) * 2 - 1
        post = model.encode(x)
        mean, logvar = post.mean.float(), post.logvar.float()
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=g)
        rec = model.decode(z)
        kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean()
        return (rec.float() - x).abs().mean() + kl
    raise TypeError(f"no training forward for {type(model).__name__}")


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages the ops of a pass create that are alive at once (a storage counts from the op
    that returns it until it is freed; ``skip``: storage pointers left out, the parameters). Only tensors ops
    return are seen, not a backend's private workspaces (the reserve covers cuDNN's and cuBLAS's)."""

    def __init__(self, skip):
        super().__init__()
        self.skip, self.live, self.now, self.peak = skip, {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                ptr = st.data_ptr()
                if ptr and ptr not in self.skip and ptr not in self.live:
                    self.live[ptr] = st.nbytes()
                    self.now += self.live[ptr]
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(st, self._free, ptr)  # a storage's Python object lives as long as it does
        return out

    def _free(self, ptr):
        self.now -= self.live.pop(ptr, 0)


def _saved_bytes(model: torch.nn.Module, batch: int, precision: str, captions: CaptionTable | None = None
                 ) -> tuple[int, int, int]:
    """(bytes kept for backward by one forward pass at ``batch``, largest bytes one checkpointable block keeps
    inside itself, the most bytes of not-kept tensors alive at one time during the pass). With checkpointing
    on, block inputs (held by the checkpoint for the recomputation) count as kept."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    # Every save goes through a holder; only holders still alive after the pass count. A graph that dies
    # during the forward (a side computation whose result is dropped) frees its holders at once.
    saves: list[tuple[weakref.ref, int, int, int | None]] = []  # (holder, storage ptr, bytes, block)
    kept: dict[int, int] = {}
    active: list[int] = []   # id of the checkpointable block running now (blocks do not nest)
    hold: list[torch.Tensor] = []

    def pack(tensor):
        # The holder keeps a detached alias (same storage): holding the tensor itself would, for a tensor saved
        # as its own node's output (exp, sigmoid, ...), close a cycle tensor -> grad_fn -> holder -> tensor that
        # no garbage collection breaks, and keep alive a side graph a real pass frees as soon as it is dropped
        # (an autoencoder posterior's unused std, say).
        holder = _Saved(tensor.detach())
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
    live = _LiveBytes(params)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda holder: holder.tensor), autocast, live:
            out = training_forward(model, batch, captions=captions)
        largest_block = tally_saved(saves, kept)
        del out  # the graph (and what it saved) is freed without a backward pass
    finally:
        for h in handles:
            h.remove()
    return sum(kept.values()), largest_block, max(0, live.peak - sum(kept.values()))


def tally_saved(saves, kept: dict) -> int:
    """Add the saved tensors still alive (``saves``: (weakref, storage key, bytes, block index or None)) to ``kept``
    (storage key -> bytes, one entry per storage) and return the bytes saved inside the largest block."""
    per_block: dict[int, dict] = {}
    for ref, key, nbytes, block in saves:
        if ref() is not None:
            kept[key] = nbytes
            if block is not None:
                per_block.setdefault(block, {})[key] = nbytes
    return max((sum(d.values()) for d in per_block.values()), default=0)


class _Saved:
    """What autograd stores for a saved tensor while the plan measures (weak-referenceable). Python scalar
    operands that autograd saves (``0.5 * x`` keeps 0.5 as a host-side 0-dim tensor) never reach the hooks:
    they live in host memory, not on the device, and the plan rightly leaves them out."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


def measure_activations(unet_config: UNet2DConfig | None, precision: str = "bf16", *,
                        grad_checkpointing: bool = False, batches: tuple[int, int] = (2, 4),
                        model: torch.nn.Module | None = None, captions: CaptionTable | None = None
                        ) -> ActivationBytes:
    """Saved-for-backward bytes of a training forward pass of ``unet_config`` (or of ``model``, any kind
    :func:`training_forward` runs), fitted as ``fixed + a * batch`` from real passes at the two ``batches`` on
    the CPU (see the module docstring)."""
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be bf16, fp32 or fp16, got {precision!r}")
    b1, b2 = batches
    if not 0 < b1 < b2:
        raise ValueError(f"batches must be two increasing positive sizes, got {batches}")
    if model is None:
        torch.manual_seed(0)
        model = UNet2D(unet_config)
    if grad_checkpointing and not isinstance(model, UNet2D):
        raise ValueError("grad_checkpointing is available for the class-conditioned UNet2D only")
    was_training, was_ckpt = model.training, getattr(model, "grad_checkpointing", False)
    model.train()
    probes, transients = [], []
    try:
        with torch.enable_grad():
            for b in (b1, b2):
                if grad_checkpointing:
                    model.set_grad_checkpointing(False)
                    _, block, _ = _saved_bytes(model, b, precision)  # one block recomputed at a time
                    model.set_grad_checkpointing(True)
                    kept, _, working = _saved_bytes(model, b, precision)
                    probes.append((b, kept + block))
                else:
                    if isinstance(model, UNet2D):
                        model.set_grad_checkpointing(False)
                    kept, _, working = _saved_bytes(model, b, precision, captions)
                    probes.append((b, kept))
                transients.append(working)
    finally:
        if isinstance(model, UNet2D):
            model.set_grad_checkpointing(was_ckpt)
        model.train(was_training)
    (_, s1), (_, s2) = probes
    per_sample = (s2 - s1) // (b2 - b1)
    t1, t2 = transients
    t_per = max(0, -(-(t2 - t1) // (b2 - b1)))  # rounded up: the plan bounds the peak from above
    return ActivationBytes(per_sample=per_sample, fixed=max(0, s1 - per_sample * b1), probes=tuple(probes),
                           transient_per_sample=t_per, transient_fixed=max(0, t1 - t_per * b1, t2 - t_per * b2))


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
    activations_checkpointed: ActivationBytes | None   # None: the model kind has no gradient checkpointing
    batch_size: int
    kind: str = "diffusion"       # what trains: unet2d | text-unet | autoencoder, "latent " prefixed in latent runs
    frozen_weights: int = 0       # latent runs: the fp32 autoencoder kept on the device to decode samples

    @property
    def fixed(self) -> int:
        """Bytes that do not grow with the batch (without the activations' own fixed part)."""
        return (self.weights + self.gradients + self.optimizer_state + self.optimizer_workspace + self.ema
                + self.frozen_weights)

    def _act(self, grad_checkpointing: bool) -> ActivationBytes:
        if not grad_checkpointing:
            return self.activations
        if self.activations_checkpointed is None:
            raise ValueError(f"gradient checkpointing is not available for {self.kind}")
        return self.activations_checkpointed

    def total(self, batch: int, *, grad_checkpointing: bool = False) -> int:
        return self.fixed + self._act(grad_checkpointing).peak(batch) + self.batch_tensors_per_sample * batch

    def max_batch(self, *, grad_checkpointing: bool = False) -> int:
        """The largest micro-batch whose total fits in the memory left after the reserve (0: none fits)."""
        act = self._act(grad_checkpointing)
        free = self.gpu_memory - self.reserve - self.fixed - act.fixed - act.transient_fixed
        per = act.per_sample + act.transient_per_sample + self.batch_tensors_per_sample
        return max(0, free // per) if per > 0 else 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["max_batch"] = self.max_batch()
        d["max_batch_checkpointed"] = (self.max_batch(grad_checkpointing=True)
                                       if self.activations_checkpointed is not None else None)
        return d

    def format(self) -> str:
        def mb(n):
            return f"{n / 2 ** 20:10.1f} MiB"

        a, ac = self.activations, self.activations_checkpointed
        b = self.batch_size
        prec = self.precision + (" (probed as bf16: same 2-byte activations)" if self.precision == "fp16" else "")
        usable = self.gpu_memory - self.reserve
        lines = [
            f"memory plan: {self.model} ({self.kind}), {self.num_parameters / 1e6:.2f}M parameters, {prec}, "
            f"{self.optimizer}, GPU {self.gpu_memory / GiB:.1f} GiB",
            f"  weights (fp32)            {mb(self.weights)}",
            f"  gradients (fp32)          {mb(self.gradients)}",
            f"  optimizer state           {mb(self.optimizer_state)}   ({self.optimizer}, "
            f"{self.optimizer_state / max(self.num_parameters, 1):.2f} bytes a parameter)",
            f"  optimizer step workspace  {mb(self.optimizer_workspace)}",
            f"  EMA weights (fp32)        {mb(self.ema)}",
        ]
        if self.frozen_weights:
            lines.append(f"  frozen autoencoder (fp32) {mb(self.frozen_weights)}")
        lines += [
            f"  activations per sample    {mb(a.per_sample)}   (+{mb(a.fixed).strip()} fixed; measured at batch "
            f"{a.probes[0][0]} and {a.probes[1][0]})",
            f"  forward working set       {mb(a.transient_per_sample)}   (+{mb(a.transient_fixed).strip()} fixed; "
            "not-saved tensors alive at the forward's peak)",
            (f"    with grad checkpointing {mb(ac.per_sample)}   (+{mb(ac.fixed).strip()} fixed)" if ac is not None
             else "    with grad checkpointing: not available for this model kind"),
            f"  batch tensors per sample  {mb(self.batch_tensors_per_sample)}",
            f"  reserve (CUDA context, workspaces, fragmentation: 1 GiB + 10%) {self.reserve / 2 ** 20:.0f} MiB",
            f"  at batch {b}: {self.total(b) / GiB:.2f} GiB"
            + (f", with grad checkpointing {self.total(b, grad_checkpointing=True) / GiB:.2f} GiB" if ac else "")
            + ("   <- does not fit" if self.total(b) > usable else ""),
            f"  largest batch that fits: {self.max_batch()}"
            + (f" ; with --grad-checkpointing: {self.max_batch(grad_checkpointing=True)}" if ac else ""),
        ]
        return "\n".join(lines)


def architecture(cfg, channels: int, size: int, num_classes: int, class_names: tuple[str, ...]) -> torch.nn.Module:
    """The network a new run of ``cfg`` trains on data of ``channels`` x ``size`` x ``size`` (latents in latent
    runs), built as the trainer builds it (preset + overrides + what the data fixes), with seed 0."""
    overrides = dict(cfg.model_overrides)
    torch.manual_seed(0)
    try:
        if cfg.kind == "autoencoder":
            c = vae_models.VAEConfig(**{**asdict(vae_models.PRESETS[cfg.model]), **overrides,
                                        "in_channels": channels, "out_channels": channels, "sample_size": size})
            return vae_models.AutoencoderKL(c)
        if cfg.conditioning == "text":
            text = clip_text.PRESETS[cfg.text_encoder]
            c = unet_sd.UNetSDConfig(**{**asdict(unet_sd.PRESETS[cfg.model]), **overrides, "in_channels": channels,
                                        "out_channels": channels, "sample_size": size,
                                        "cross_attention_dim": text.hidden_size})
            return TextConditionedUNet(c, text)
    except TypeError as e:
        raise ValueError(f"model_overrides: {e}") from None
    unet = cfg.unet_config(num_classes, class_names, channels)
    return UNet2D(UNet2DConfig.from_dict({**unet.to_dict(), "sample_size": size}))


def plan(cfg, *, gpu_memory_gb: float = 16.0, channels: int | None = None, num_classes: int | None = None,
         class_names: tuple[str, ...] | None = None, dataset=None, probe_batches: tuple[int, int] = (2, 4)
         ) -> MemoryPlan:
    """The :class:`MemoryPlan` of a :class:`~fastdiff.train.TrainConfig` on a GPU of ``gpu_memory_gb`` GiB.

    The network's input channels and classes come from ``dataset`` (an ImageDataset), from ``channels`` /
    ``num_classes``, or else from loading ``cfg.dataset`` (which also checks that the dataset is readable).
    Latent runs (``cfg.autoencoder``) read the autoencoder to size the latents. No training step runs and nothing
    is written.
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
    size, frozen = cfg.image_size, 0
    if cfg.autoencoder:
        from fastdiff.train.latents import load_autoencoder

        vae = load_autoencoder(cfg.autoencoder)
        if vae.config.in_channels != channels:
            raise ValueError(f"the autoencoder takes {vae.config.in_channels}-channel images, the data has "
                             f"{channels}")
        if size % vae.downscale:
            raise ValueError(f"image_size {size} must be a multiple of the autoencoder's downscale factor "
                             f"{vae.downscale}")
        channels, size = vae.config.latent_channels, size // vae.downscale
        frozen = 4 * sum(p.numel() for p in vae.parameters())
        del vae
    model = architecture(cfg, channels, size, num_classes, names)
    captions = CaptionTable(names) if isinstance(model, TextConditionedUNet) else None
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    act = measure_activations(None, cfg.precision, batches=probe_batches, model=model, captions=captions)
    act_ck = (measure_activations(None, cfg.precision, grad_checkpointing=True, batches=probe_batches, model=model)
              if isinstance(model, UNet2D) else None)
    pixels = channels * size * size
    if cfg.kind == "autoencoder":
        lat = model.config.latent_channels * (size // model.downscale) ** 2
        kind, batch_tensors = "autoencoder", 3 * pixels * 4 + 2 * lat * 4
    else:
        kind = "text-unet" if captions is not None else "unet2d"
        batch_tensors = 5 * pixels * 4 + (77 * 8 if captions is not None else 0)
    if cfg.autoencoder:
        kind = "latent " + kind
    gpu = int(gpu_memory_gb * GiB)
    workspace = (4 * n if cfg.optimizer == "adamw"
                 else 24 * max((p.numel() for p in params if p.numel() >= 4096), default=0))
    return MemoryPlan(
        model=cfg.model, num_parameters=n, precision=cfg.precision, optimizer=cfg.optimizer, gpu_memory=gpu,
        reserve=reserve_bytes(gpu), weights=4 * n, gradients=4 * n,
        optimizer_state=optimizer_state_bytes(params, cfg.optimizer),
        optimizer_workspace=workspace, ema=4 * n,
        batch_tensors_per_sample=batch_tensors,
        activations=act, activations_checkpointed=act_ck, batch_size=cfg.batch_size, kind=kind,
        frozen_weights=frozen)
