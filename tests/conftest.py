"""Shared fixtures of the test suite.

Backends, instruction sets and routing rows. A test module that names its op (``OP = all_ops()["geglu"]``) and
whose tests take a ``backend`` argument runs each test on every backend that can run here (ref, cpu, cuda)
and, for the cpu backend,

- at every instruction-set level of the C++ kernels (``cpu-scalar``, ``cpu-avx2``, ``cpu-avx512``,
  ``cpu-avx512_bf16``, through ``fastdiff.settings.override(cpu_isa=...)``) when the op's cpu path is a
  compiled kernel; a level this CPU cannot run is skipped with the features it lacks;
- under each distinct choice of the routing table (``cpu-route_avx2``: eager activations and fp32 bf16 math;
  ``cpu-route_avx512``: oneDNN's fused post-ops; ``cpu-route_avx512_bf16_2x``: native bf16 math) when the op
  is routed by CPU capability (:mod:`fastdiff.ops.routing`). These run on any CPU: routing only picks between
  torch ops, so an AVX2-only machine exercises what an AVX-512 one would choose.

The ``cpu_isa`` and ``cpu_route`` fixtures give the same levels and rows to tests that want them directly.
The low-precision tolerance rule is one function, :func:`lowp.assert_close_lowp`, in ``tests/lowp.py``.

Device cases (ids ``on_cuda-<backend>``). The same tests also run each GPU backend the op has (``cuda``,
``triton``, ``flash_attn``; an op with none, such as conv2d and linear, runs ``ref`` on the GPU: what runs
there) on CUDA tensors. The test body is unchanged: while such a case runs, every fastdiff op call copies its
CPU tensor arguments to the GPU keeping their strides (channels_last, non-contiguous views), runs the forced
backend there and copies the result back keeping its strides; both copies are differentiable, so the test's
forward and backward checks compare the GPU kernel with the test's own oracle on the same input values. A
test that takes ``lowp_dtype`` (the low-precision dtype it checks, bf16 on the CPU) runs each device case in
bf16 and in fp16. On a machine without CUDA the device cases are skipped with the reason "no CUDA device"
(one skipped case per test and backend; the rest of its grid is deselected); on a GPU, an input a backend declares it does not run (flash-attn with a mask, fp32) is skipped with that
backend's reasons.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest
import torch
from torch.utils._pytree import tree_map

from fastdiff import settings
from fastdiff.ops import registry, routing

from devices import HAS_CUDA, NO_CUDA
# Backends that run CUDA tensors; an op with none of them runs ``ref`` in its device cases.
DEVICE_BACKENDS = ("cuda", "triton", "flash_attn")
LOWP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Ops whose cpu path follows the routing table, and the columns of the table each one reads.
ROUTED_OPS = {"linear": ("bf16_math", "linear_activation"), "conv2d": ("bf16_math",), "attention": ("bf16_math", "sdpa_bf16_min_keys", "train_sdpa_bf16_min_keys",
                                     "sdpa_bf16_upcast_min_scores")}


def _route_choices(columns=("bf16_math", "linear_activation")) -> tuple[str, ...]:
    """One row of the routing table per distinct choice it makes in ``columns`` (the first row making it)."""
    seen, out = set(), []
    for name, row in routing.ROUTES.items():
        key = tuple(getattr(row, c) for c in columns)
        if key not in seen:
            seen.add(key)
            out.append(name)
    return tuple(out)


ROUTE_CHOICES = _route_choices()


def isa_skip_reason(isa: str) -> str | None:
    """Why this CPU cannot run the C++ kernels at ``isa`` (None: it can)."""
    missing = routing.missing_features(isa)
    return f"this CPU lacks {', '.join(missing)} (needed for cpu_isa={isa})" if missing else None


def _isa_params(prefix: str) -> list:
    out = []
    for isa in settings.ISA_LEVELS:
        why = isa_skip_reason(isa)
        out.append(pytest.param(f"{prefix}{isa}", id=f"{prefix.replace(':', '-')}{isa}",
                                marks=[pytest.mark.skip(reason=why)] if why else []))
    return out


def backend_params(op) -> list:
    """pytest params for every backend of ``op`` that can run here, the cpu one per ISA level / routing row."""
    out = []
    for name, why in op.availability().items():
        if why or name not in ("ref", "cpu", "cuda"):
            continue
        if name != "cpu":
            out.append(pytest.param(name, id=name))
            continue
        if op.impls["cpu"].needs_backend:  # a compiled kernel: each instruction set
            out += _isa_params("cpu:")
        if op.name in ROUTED_OPS:
            out += [pytest.param(f"cpu@{r}", id=f"cpu-route_{r}") for r in _route_choices(ROUTED_OPS[op.name])]
        if not op.impls["cpu"].needs_backend and op.name not in ROUTED_OPS:
            out.append(pytest.param("cpu", id="cpu"))
    return out


def _explicitly_parametrized(metafunc, name: str) -> bool:
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", "")
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        if name in names:
            return True
    return False


@dataclass(frozen=True)
class DeviceCase:
    """A backend run on CUDA tensors (see the module doc)."""

    name: str
    device: str = "cuda"


def device_params(op, lowp: bool = False) -> list:
    """pytest params for the device cases of ``op``: each GPU backend it has (else ``ref``) on CUDA tensors, and
    with ``lowp`` each of them in bf16 and fp16, as ``(case, dtype)`` pairs. Skipped without a CUDA device; on
    one, a backend that cannot run at all here (flash-attn not installed) is skipped with its reasons."""
    names = [b for b in DEVICE_BACKENDS if b in op.impls] or ["ref"]
    whole = op.availability()
    out = []
    for name in names:
        why = NO_CUDA if not HAS_CUDA else "; ".join(whole[name])
        marks = [pytest.mark.skip(reason=why)] if why else []
        if lowp:
            out += [pytest.param(DeviceCase(name), dt, id=f"on_cuda-{name}-{k}", marks=marks)
                    for k, dt in LOWP_DTYPES.items()]
        else:
            out.append(pytest.param(DeviceCase(name), id=f"on_cuda-{name}", marks=marks))
    return out


def pytest_generate_tests(metafunc):
    op = getattr(metafunc.module, "OP", None)
    if op is None or "backend" not in metafunc.fixturenames or _explicitly_parametrized(metafunc, "backend"):
        return
    if "lowp_dtype" in metafunc.fixturenames:
        # (backend, low-precision dtype) together: the CPU cases keep their ids and check bf16
        cpu = [pytest.param(p.values[0], torch.bfloat16, id=p.id, marks=p.marks) for p in backend_params(op)]
        metafunc.parametrize("backend,lowp_dtype", cpu + device_params(op, lowp=True), indirect=["backend"])
    else:
        metafunc.parametrize("backend", backend_params(op) + device_params(op), indirect=True)


def pytest_collection_modifyitems(config, items):
    """Without CUDA, one skipped case stands for each test's device cases of one backend (the grids of shapes,
    layouts and dtypes are skipped for the same reason); the others are deselected, so the skip count says how
    many tests would run on a GPU without repeating each grid. With CUDA every case runs."""
    if HAS_CUDA:
        return
    seen, keep, dropped = set(), [], []
    for item in items:
        case = getattr(getattr(item, "callspec", None), "params", {}).get("backend")
        if isinstance(case, DeviceCase):
            key = (item.module.__name__ if item.module else "", item.originalname, case.name)
            if key in seen:
                dropped.append(item)
                continue
            seen.add(key)
        keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


# ----------------------------------------------------------------------------------- running a case on a device

def _copy_keeping_strides(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on ``device`` with the same sizes and strides (an expanded view, stride 0, becomes dense)."""
    if any(st == 0 and sz > 1 for st, sz in zip(t.stride(), t.shape)):
        return t.to(device)
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
    out.copy_(t)
    return out


class _ToDevice(torch.autograd.Function):
    """Differentiable strided copy between devices: the gradient goes back to the source device."""

    @staticmethod
    def forward(ctx, t, device):
        ctx.source = t.device
        return _copy_keeping_strides(t, device)

    @staticmethod
    def backward(ctx, grad):
        return _copy_keeping_strides(grad, ctx.source), None


_on_device = threading.local()


def _call_on_device(case: DeviceCase, original):
    """An ``Op.__call__`` that runs the op on ``case.device`` and gives the result back on the CPU."""

    def call(op, *args, **kwargs):
        if getattr(_on_device, "active", False) or registry.current_backend() != case.name:
            return original(op, *args, **kwargs)  # an op called by another op, or outside the forced block
        move = lambda t, dev: _ToDevice.apply(t, dev) if isinstance(t, torch.Tensor) else t  # noqa: E731
        args, kwargs = tree_map(lambda t: move(t, case.device), (args, kwargs))
        why = op.reasons(case.name, *args, **kwargs)
        if why:
            pytest.skip(f"{case.name} does not run this input on {case.device}: " + "; ".join(why))
        _on_device.active = True
        try:
            out = original(op, *args, **kwargs)
        finally:
            _on_device.active = False
        return tree_map(lambda t: move(t, "cpu"), out)

    return call


def _settings_for(spec: str) -> tuple[str, dict]:
    """'cpu:avx2' -> ('cpu', {cpu_isa: 'avx2'}); 'cpu@avx512' -> ('cpu', {cpu_route: 'avx512'}); 'ref' -> ('ref', {})."""
    if ":" in spec:
        name, isa = spec.split(":", 1)
        return name, {"cpu_isa": isa}
    if "@" in spec:
        name, route = spec.split("@", 1)
        return name, {"cpu_route": route}
    return spec, {}


@pytest.fixture
def backend(request, monkeypatch):
    """The backend name to force (``with use_backend(backend):``), with its ISA level / routing row in force;
    for a device case, with every op call running on the device (see the module doc)."""
    if isinstance(request.param, DeviceCase):
        monkeypatch.setattr(registry.Op, "__call__", _call_on_device(request.param, registry.Op.__call__))
        yield request.param.name
        return
    name, changes = _settings_for(request.param)
    with settings.override(**changes):
        yield name


@pytest.fixture(params=_isa_params(""))
def cpu_isa(request):
    """Each instruction-set level of the C++ kernels this CPU has, in force for the test."""
    with settings.override(cpu_isa=request.param):
        yield request.param


@pytest.fixture(params=ROUTE_CHOICES, ids=lambda r: f"route_{r}")
def cpu_route(request):
    """Each distinct row of the routing table, in force for the test."""
    with settings.override(cpu_route=request.param):
        yield routing.ROUTES[request.param]


# ---------------------------------------------------------------------------------------- Stable Diffusion 1

@pytest.fixture
def use_settings():
    """``use_settings(cpu_bf16_math="native")``: fastdiff.settings.override for the rest of the test."""
    entered = []

    def enter(**changes):
        ctx = settings.override(**changes)
        ctx.__enter__()
        entered.append(ctx)

    yield enter
    for ctx in reversed(entered):
        ctx.__exit__(None, None, None)


def randomize_weights(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights around a working point: norm scales near 1, the rest N(0, 0.2^2); eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm = p.dim() == 1 and "norm" in name and name.endswith("weight")
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g) if is_norm else 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="session")
def randomize():
    """:func:`randomize_weights`, for tests that build their own random models."""
    return randomize_weights


@pytest.fixture(scope="session")
def ref_folder(tmp_path_factory):
    """A tiny random StableDiffusionPipeline saved by diffusers (fp32 in ``sd``, fp16 variant in ``sd16``) and
    the diffusers pipeline loaded from it: ``(folder, pipeline)``."""
    import shutil

    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from fastdiff.io import sd_checkpoint as ck
    from fastdiff.models import clip_text, unet_sd, vae
    from fastdiff.models.clip_tokenizer import CLIPTokenizer

    d = tmp_path_factory.mktemp("sd1_diffusers")
    unet = randomize_weights(diffusers.UNet2DConditionModel(
        **{k: v for k, v in unet_sd.TINY.to_diffusers().items() if k != "_class_name"}), 1)
    ae = randomize_weights(
        diffusers.AutoencoderKL(**{k: v for k, v in vae.TINY.to_diffusers().items() if k != "_class_name"}), 2)
    tc = {k: v for k, v in clip_text.TINY.to_transformers().items()
          if k not in ("architectures", "model_type", "torch_dtype")}
    text = randomize_weights(transformers.CLIPTextModel(transformers.CLIPTextConfig(**tc)), 3)
    CLIPTokenizer.from_bundled().save_pretrained(d / "_tok")
    tok = transformers.CLIPTokenizer.from_pretrained(d / "_tok", local_files_only=True)
    sched = diffusers.PNDMScheduler.from_config(ck.SD1_SCHEDULER_CONFIG)  # keeps clip_sample=False for DDIM
    pipe = diffusers.StableDiffusionPipeline(vae=ae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.save_pretrained(d / "sd")
    pipe.to(torch.float16).save_pretrained(d / "sd16", variant="fp16")  # (casts pipe in place)
    shutil.rmtree(d / "_tok")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(d / "sd", local_files_only=True)
    return d, ref


# config.json of the public SD1.5 release (runwayml/stable-diffusion-v1-5), written out here as the oracle
SD15_JSON = {
    "unet": {
        "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False, "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    },
    "vae": {
        "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
        "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
    },
    "text": {
        "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072, "max_position_embeddings": 77,
        "num_attention_heads": 12, "num_hidden_layers": 12, "vocab_size": 49408, "layer_norm_eps": 1e-05,
        "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    },
}


@pytest.fixture(scope="session")
def sd15_json():
    """The SD1.5 release's config.json contents (unet, vae, text), the oracle of the full-size tests."""
    import copy

    return copy.deepcopy(SD15_JSON)


@pytest.fixture(scope="session")
def sd3_folder(tmp_path_factory):
    """A tiny random StableDiffusion3Pipeline saved by diffusers (tests/sd3_builders.py), with T5 and without."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from sd3_builders import build_sd3_folder

    return build_sd3_folder(tmp_path_factory.mktemp("sd3_diffusers"))
