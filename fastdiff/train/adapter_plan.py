"""Memory plan of LoRA fine-tuning of an SD1 model on one GPU (``fastdiff train --kind lora --plan``).

What a LoRA training step holds on the device (P_base: the frozen weights, P_lora: the LoRA factors,
B: micro-batch, h x w: latents of an ``image_size`` image):

    frozen weights      4 P_base     UNet, text encoder and VAE in fp32, as the trainer loads and keeps them
    LoRA weights        4 P_lora     fp32, like every trained parameter of the trainer
    gradients           4 P_lora
    optimizer state     8 P_lora     AdamW (bitsandbytes AdamW8bit: see fastdiff.train.plan)
    optimizer step      4 P_lora     AdamW's step temporary
    EMA                 4 P_lora
    activations         A0 + a B     saved for the backward pass, measured (below)
    batch tensors       5 x 4 h w x 4 B + 77 x d x 4 B   z0, noise, z_t, target, output (fp32) and the context

Activations are measured as :mod:`fastdiff.train.plan` measures them for the pixel UNets: one real training
forward pass at two small batches, every tensor autograd keeps for the backward pass recorded through
:func:`torch.autograd.graph.saved_tensors_hooks` (unique storages, parameters and buffers left out), fitted as
``A0 + a B``; with gradient checkpointing the blocks' inputs plus the largest single block's own saves (its
recomputation in the backward pass). Here the pass runs on the ``meta`` device (shapes only, so the real SD1.5
UNet at 512x512 costs no memory and little time), in the 2-byte dtype under bf16/fp16 (what autocast makes of
activations) or fp32, with fastdiff's reference ops (an upper bound for the fused kernels, which save less) and
attention counted as a flash kernel keeps it for its backward (q, k, v, the output and one fp32 log-sum-exp per
query row, not the L x L scores). Under autocast the bf16 copies of the frozen weights that the pass casts are
added (2 bytes a weight of the UNet, and of the text encoder when it carries a LoRA).

Not counted: the VAE encoder's activations when latents are not cached (``--cache``: a no-grad pass before the
step, whose peak is freed before the UNet runs), the CUDA context and allocator slack (the reserve, 1 GiB + 10 %
of the memory, as in fastdiff.train.plan).
"""
from __future__ import annotations

import contextlib
import importlib
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from fastdiff.models import clip_text, unet_sd, vae as vae_models
from fastdiff.train.adapters import LoraWeights, attach_lora, lora_target_modules, set_block_checkpointing
from fastdiff.train.plan import GiB, ActivationBytes, optimizer_state_bytes, reserve_bytes, tally_saved

__all__ = ["LoraMemoryPlan", "lora_plan", "measure_lora_activations"]


class _FlashSaved(torch.autograd.Function):
    """Attention that keeps for its backward what a flash kernel keeps: q, k, v, the output, the fp32 LSE."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never called: the plan runs forward passes only
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


@contextlib.contextmanager
def _flash_attention():
    """Inside: fastdiff's ``ref`` attention (what runs on meta tensors) is the flash-like stand-in."""
    impl = importlib.import_module("fastdiff.ops.attention")._op.impls["ref"]
    fn = impl.fn
    impl.fn = lambda q, k, v, attn_mask=None, scale=None: _FlashSaved.apply(q, k, v)
    try:
        yield
    finally:
        impl.fn = fn


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class _Saved:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


def _saved_bytes(run, batch: int, blocks: list[nn.Module], checkpointed: bool) -> tuple[int, int]:
    """(bytes kept for backward by ``run(batch)``, the largest bytes one block keeps inside itself)."""
    import weakref

    params = run.frozen  # weights: counted as weights, not as activations
    saves = []
    kept: dict[int, int] = {}
    active: list[int] = []
    hold: list[torch.Tensor] = []

    def pack(tensor):
        # a detached alias (same storage), as fastdiff.train.plan holds it: the tensor itself would close a
        # tensor -> grad_fn -> holder cycle and keep alive side graphs a real pass frees
        holder = _Saved(tensor.detach())
        k = _key(tensor)
        if k not in params:
            saves.append((weakref.ref(holder), k, tensor.untyped_storage().nbytes(), active[-1] if active else None))
        return holder

    def pre(module, args, kwargs=None):
        active.append(id(module))
        if checkpointed:
            for a in args:
                if isinstance(a, torch.Tensor) and _key(a) not in params:
                    hold.append(a)
                    kept[_key(a)] = a.untyped_storage().nbytes()

    def post(module, args, out):
        active.pop()

    handles = []
    for m in blocks:
        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda h: h.tensor):
            out = run(batch)
        largest_block = tally_saved(saves, kept)
        del out
    finally:
        for h in handles:
            h.remove()
    return sum(kept.values()), largest_block


class _LoraProbe:
    """A LoRA'd UNet (and text encoder) built on ``device`` in ``dtype`` with frozen base weights; calling it
    with a batch runs one training forward pass on random inputs and returns the output."""

    def __init__(self, unet_cfg, text_cfg, latent_size: int, rank: int, alpha: float, text_lora: bool, dtype,
                 device):
        with torch.device(device):
            torch.manual_seed(0)
            self.unet = unet_sd.UNetSD(unet_cfg).to(dtype).requires_grad_(False)
            self.text = clip_text.CLIPTextModel(text_cfg).to(dtype).requires_grad_(False) if text_lora else None
            targets = lora_target_modules(self.unet, self.text)
            comps = {"unet": self.unet, "text_encoder": self.text}
            shapes = [(comps[c].get_submodule(m).in_features, comps[c].get_submodule(m).out_features)
                      for c, m in targets]
            self.lora = LoraWeights(targets, shapes, rank, alpha).to(device=device, dtype=dtype)
        attach_lora(self.lora, comps)
        self.unet_cfg, self.text_cfg, self.latent_size, self.dtype, self.device = (
            unet_cfg, text_cfg, latent_size, dtype, torch.device(device))
        self.frozen = {_key(t) for m in (self.unet, self.text) if m is not None
                       for t in [*m.parameters(), *m.buffers()]} | {_key(p) for p in self.lora.parameters()}

    def blocks(self) -> list[nn.Module]:
        return [m for n in (self.unet, self.text) if n is not None for m in n.modules()
                if isinstance(m, (unet_sd.Transformer2D, _res_block()))]

    def __call__(self, batch: int):
        g = torch.Generator().manual_seed(batch)
        s, c = self.latent_size, self.unet_cfg
        x = torch.randn(batch, c.in_channels, s, s, generator=g).to(self.device, self.dtype)
        t = torch.randint(0, 1000, (batch,), generator=g).to(self.device)
        if self.text is not None:
            ids = torch.randint(0, self.text_cfg.vocab_size, (batch, self.text_cfg.max_position_embeddings),
                                generator=g).to(self.device)
            ctx = self.text(ids)
        else:
            ctx = torch.randn(batch, 77, c.cross_attention_dim, generator=g).to(self.device, self.dtype)
        return self.unet(x, t, ctx)


def _res_block():
    from fastdiff.models.blocks import ResBlock

    return ResBlock


def measure_lora_activations(unet_cfg, text_cfg, *, latent_size: int, rank: int = 4, alpha: float = 4.0,
                             precision: str = "bf16", text_lora: bool = False, grad_checkpointing: bool = False,
                             batches: tuple[int, int] = (1, 2), device="meta", flash_attention: bool = True
                             ) -> ActivationBytes:
    """Saved-for-backward bytes of a LoRA training forward pass, ``fixed + per_sample * batch`` (module doc)."""
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be bf16, fp32 or fp16, got {precision!r}")
    b1, b2 = batches
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    probe = _LoraProbe(unet_cfg, text_cfg, latent_size, rank, alpha, text_lora, dtype, device)
    blocks = probe.blocks()
    probes = []
    with _flash_attention() if flash_attention else contextlib.nullcontext():
        for b in (b1, b2):
            if grad_checkpointing:
                _, transient = _saved_bytes(probe, b, blocks, checkpointed=False)
                for m in (probe.unet, probe.text):
                    if m is not None:
                        set_block_checkpointing(m, True)
                kept, _ = _saved_bytes(probe, b, blocks, checkpointed=True)
                for m in (probe.unet, probe.text):
                    if m is not None:
                        set_block_checkpointing(m, False)
                probes.append((b, kept + transient))
            else:
                probes.append((b, _saved_bytes(probe, b, blocks, checkpointed=False)[0]))
    (_, s1), (_, s2) = probes
    per_sample = (s2 - s1) // (b2 - b1)
    return ActivationBytes(per_sample=per_sample, fixed=max(0, s1 - per_sample * b1), probes=tuple(probes))


def _params(cls, cfg) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in cls(cfg).parameters())


@dataclass
class LoraMemoryPlan:
    """Bytes a LoRA fine-tuning configuration needs on a GPU of ``gpu_memory`` bytes."""

    image_size: int
    rank: int
    precision: str
    optimizer: str
    text_lora: bool
    cache: bool
    gpu_memory: int
    reserve: int
    base_parameters: int
    lora_parameters: int
    base_weights: int
    autocast_copies: int
    lora_weights: int
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
        return (self.base_weights + self.autocast_copies + self.lora_weights + self.gradients + self.optimizer_state
                + self.optimizer_workspace + self.ema)

    def total(self, batch: int, *, grad_checkpointing: bool = False) -> int:
        act = self.activations_checkpointed if grad_checkpointing else self.activations
        return self.fixed + act.at(batch) + self.batch_tensors_per_sample * batch

    def max_batch(self, *, grad_checkpointing: bool = False) -> int:
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

        a, ac, b = self.activations, self.activations_checkpointed, self.batch_size
        usable = self.gpu_memory - self.reserve
        lines = [
            f"memory plan: LoRA rank {self.rank} on the SD1.5 configuration at {self.image_size}x{self.image_size}"
            f"{' (+ text encoder)' if self.text_lora else ''}, {self.precision}, {self.optimizer}, "
            f"GPU {self.gpu_memory / GiB:.1f} GiB",
            f"  frozen weights (fp32)     {mb(self.base_weights)}   ({self.base_parameters / 1e6:.1f}M: UNet, "
            f"text encoder, VAE)",
            f"  autocast weight copies    {mb(self.autocast_copies)}",
            f"  LoRA weights (fp32)       {mb(self.lora_weights)}   ({self.lora_parameters / 1e6:.2f}M)",
            f"  gradients (fp32)          {mb(self.gradients)}",
            f"  optimizer state           {mb(self.optimizer_state)}   ({self.optimizer})",
            f"  optimizer step workspace  {mb(self.optimizer_workspace)}",
            f"  EMA weights (fp32)        {mb(self.ema)}",
            f"  activations per sample    {mb(a.per_sample)}   (+{mb(a.fixed).strip()} fixed; counted on meta "
            f"tensors at batch {a.probes[0][0]} and {a.probes[1][0]})",
            f"    with grad checkpointing {mb(ac.per_sample)}   (+{mb(ac.fixed).strip()} fixed)",
            f"  batch tensors per sample  {mb(self.batch_tensors_per_sample)}",
            f"  reserve (CUDA context, workspaces, fragmentation: 1 GiB + 10%) {self.reserve / 2 ** 20:.0f} MiB",
            f"  at batch {b}: {self.total(b) / GiB:.2f} GiB, with grad checkpointing "
            f"{self.total(b, grad_checkpointing=True) / GiB:.2f} GiB (usable {usable / GiB:.2f} GiB)"
            + ("   <- does not fit" if self.total(b) > usable else ""),
            f"  largest batch that fits: {self.max_batch()} ; with --grad-checkpointing: "
            f"{self.max_batch(grad_checkpointing=True)}",
        ]
        return "\n".join(lines)


def lora_plan(*, image_size: int = 512, rank: int = 4, alpha: float = 4.0, precision: str = "bf16",
              optimizer: str = "adamw", text_lora: bool = False, cache: bool = True, batch_size: int = 1,
              gpu_memory_gb: float = 16.0, unet=unet_sd.SD15, text=clip_text.SD15, vae=vae_models.SD15,
              probe_batches: tuple[int, int] = (1, 2)) -> LoraMemoryPlan:
    """The :class:`LoraMemoryPlan` of LoRA fine-tuning of the SD1 model ``unet`` / ``text`` / ``vae`` (default:
    the SD1.5 configuration) at ``image_size`` on a GPU of ``gpu_memory_gb`` GiB. Nothing is allocated."""
    if not gpu_memory_gb > 0:
        raise ValueError(f"gpu memory must be positive (GiB), got {gpu_memory_gb}")
    f = 2 ** (len(vae.block_out_channels) - 1)
    if image_size % (f * 2 ** (len(unet.block_out_channels) - 1)):
        raise ValueError(f"image_size {image_size} must be a multiple of {f * 2 ** (len(unet.block_out_channels) - 1)}")
    latent = image_size // f
    n_unet, n_text, n_vae = (_params(unet_sd.UNetSD, unet), _params(clip_text.CLIPTextModel, text),
                             _params(vae_models.AutoencoderKL, vae))
    n_base = n_unet + n_text + n_vae  # the trainer keeps the VAE also when the latents are cached
    kw = dict(latent_size=latent, rank=rank, alpha=alpha, precision=precision, text_lora=text_lora,
              batches=probe_batches)
    act = measure_lora_activations(unet, text, **kw)
    act_ck = measure_lora_activations(unet, text, grad_checkpointing=True, **kw)
    probe = _LoraProbe(unet, text, latent, rank, alpha, text_lora, torch.float32, "meta")
    lora_shapes = [tuple(p.shape) for p in probe.lora.parameters()]
    n_lora = sum(math.prod(s) for s in lora_shapes)
    gpu = int(gpu_memory_gb * GiB)
    copies = 0 if precision == "fp32" else 2 * (n_unet + (n_text if text_lora else 0))
    return LoraMemoryPlan(
        image_size=image_size, rank=rank, precision=precision, optimizer=optimizer, text_lora=text_lora,
        cache=cache, gpu_memory=gpu, reserve=reserve_bytes(gpu), base_parameters=n_base, lora_parameters=n_lora,
        base_weights=4 * n_base, autocast_copies=copies, lora_weights=4 * n_lora, gradients=4 * n_lora,
        optimizer_state=optimizer_state_bytes(lora_shapes, optimizer),
        optimizer_workspace=4 * n_lora if optimizer == "adamw" else 0, ema=4 * n_lora,
        batch_tensors_per_sample=5 * unet.in_channels * latent ** 2 * 4 + 77 * unet.cross_attention_dim * 4,
        activations=act, activations_checkpointed=act_ck, batch_size=batch_size)
