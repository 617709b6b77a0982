"""Which CPU path is faster depends on the CPU: the routing table, keyed by CPU capability.

Every choice fastdiff makes because a measurement on one kind of CPU disagreed with another lives in
:data:`ROUTES`, one row per capability class, each row naming the benchmarks (``file::test id`` under
``benchmarks/``) that decide its values. The ops ask :func:`current_route` and never look at the CPU
themselves. Choices that held on every CPU measured (tiny matmuls go eager, a plain fp32 convolution goes to
``F.conv2d``) stay with their op.

Training has rows of its own: an op's ``cpu`` backend may win a forward alone and lose forward + backward (its
backward is torch's, and the fused forward saves nothing the backward needs), so each row lists the ops whose
``cpu`` forward + backward did not beat ``ref`` on that class (``train_ref``, measured by
``benchmarks/bench_train_ops.py``); for inputs that require grad, automatic choice runs ``ref`` for them
(:func:`train_ref_reason`, asked by the ops' ``slower`` hooks). A row not yet measured for training lists none:
the inference choice stands.

The class of this CPU comes from its features (:func:`detect_caps`) through :func:`route_name`, pure logic
that the tests check for every row. Two settings (:mod:`fastdiff.settings`) change it:

- ``cpu_isa`` (``FASTDIFF_CPU_ISA``) lowers the instruction set: the C++ kernels dispatch to it and the routing
  takes that level's row (an AVX-512 CPU with ``cpu_isa="avx2"`` routes as an AVX2-only one);
- ``cpu_route`` (``FASTDIFF_CPU_ROUTE``) takes any row outright. Routing only chooses between torch ops
  that run on every x86 CPU (oneDNN picks its own instructions), so any row runs anywhere: an AVX2-only CPU
  can run, test and time what an AVX-512 CPU would choose.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fastdiff import settings as _settings

__all__ = [
    "ISA_FEATURES",
    "ROUTES",
    "CpuCaps",
    "CpuRoute",
    "cpu_flags",
    "current_caps",
    "current_route",
    "detect_caps",
    "detected_isa",
    "missing_features",
    "route_name",
    "sdpa_reason",
    "train_ref_reason",
]

_BENCH = "benchmarks/bench_conv_block.py::"
_TRAIN = "benchmarks/bench_train_ops.py::"

# The /proc/cpuinfo flags each instruction-set level of the C++ kernels needs (csrc/cpu/isa.cpp checks the same).
ISA_FEATURES: dict[str, tuple[str, ...]] = {
    "scalar": (),
    "avx2": ("avx2", "fma"),
    "avx512": ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq"),
    "avx512_bf16": ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"),
}
_ISA_RANK = {name: i for i, name in enumerate(_settings.ISA_LEVELS)}


@dataclass(frozen=True)
class CpuCaps:
    """The CPU facts routing depends on."""

    isa: str = "avx2"     # one of settings.ISA_LEVELS: the widest vector level in use
    amx: bool = False     # AMX tiles (bf16 matrix multiply units), usable by oneDNN
    vendor: str = ""      # CPUID vendor: 'GenuineIntel', 'AuthenticAMD', ...


@dataclass(frozen=True)
class CpuRoute:
    """One row of the routing table: what the cpu backends do on one capability class."""

    name: str
    capability: str          # the capability class, in words
    bf16_math: str           # 'native' | 'fp32': what oneDNN conv/linear (and CPU attention) compute bf16 inputs in
    linear_activation: str   # 'fused': oneDNN's unary post-op; 'eager': the unfused matmul, then the activation
    evidence: tuple[str, ...]  # the benchmarks (file::test id) whose ratios decide this row
    # Training (inputs that require grad): "op:dtype" entries ("conv2d:fp32") whose cpu forward + backward did not
    # beat ref on this class; automatic choice runs ref for them. Empty: the inference choice (not measured).
    train_ref: tuple[str, ...] = ()
    train_evidence: tuple[str, ...] = ()  # the benchmarks behind train_ref
    # bf16 attention of the ``cpu`` backend: from this many keys on it runs torch SDPA instead of fastdiff's kernel,
    # in inference (``sdpa_bf16_min_keys``) and in training (``train_sdpa_bf16_min_keys``: forward and backward).
    # None: the kernel runs.
    sdpa_bf16_min_keys: int | None = None
    train_sdpa_bf16_min_keys: int | None = None
    # bf16 inference sent to torch SDPA computes in fp32 (upcast, round once) from this score-matrix size (Lq * Lk
    # per head) on; None: never (torch's bf16 kernel is the faster one on this class). The default was measured with
    # benchmarks/bench_attention.py on a 2-core Zen 5 (upcast time / bf16 SDPA time, same run): 4096^2 d40 0.61,
    # 2048^2 d40 0.82, 1178^2 d64 0.89, 1024^2 d80 1.04, 512^2 d80 1.41, 256^2 d160 1.27, 4096x77 d40 1.92.
    sdpa_bf16_upcast_min_scores: int | None = 1_200_000


ROUTES: dict[str, CpuRoute] = {r.name: r for r in (
    CpuRoute(
        "amx", "AVX-512 with AMX tiles",
        bf16_math="native", linear_activation="fused",
        # AMX multiplies bf16 tiles at 8x the fp32 FMA rate: the native bf16 kernels, as on the AVX512-BF16 row
        # whose bf16 dot products are faster than fp32.
        evidence=(_BENCH + "test_resblock[bf16-native_bf16_math]", _BENCH + "test_resblock[bf16-nchw]"),
        # Training, forward + backward, one thread, a 2-core Xeon with AMX (ref time / cpu time, same run): convolutions
        # 0.84-1.04 (median 0.97: the same oneDNN kernels, torch's backward either way; bf16 at 300-820 GFLOP/s on the
        # tiles), linears 0.89-1.02, GroupNorm (+ SiLU) 1.1-3.5 except at 8x8 maps in fp32. fastdiff's attention
        # kernel (vdpbf16ps, no tiles) fwd+bwd in bf16 took 2.4x torch SDPA's time at 256 keys d256, 1.6-2.1x at
        # 1024-4096 keys (d40-d80), but 0.26x at 64 keys d32 and 0.85x at 77 keys d40. In inference torch's bf16
        # SDPA (AMX tiles) beat the kernel at every SD1/SD3 shape (kernel 0.12-0.21x of SDPA's speed on self-
        # attention, 0.54-0.60x on 77-key cross-attention) and beat its own fp32 upcast (86 ms vs 201 ms at SD1's
        # 64x64 self-attention).
        sdpa_bf16_min_keys=1, sdpa_bf16_upcast_min_scores=None,
        train_ref=("conv2d:fp32", "conv2d:bf16", "linear:fp32", "linear:bf16"),
        train_evidence=(_TRAIN + "test_conv2d_train[cifar10-128to128x32-time-bf16]",
                        _TRAIN + "test_conv2d_train[cifar10-256to256x16-skip-fp32]",
                        _TRAIN + "test_linear_train[fashion32-b32x64x128-bf16]",
                        _TRAIN + "test_linear_train[cifar10-b8x256x256-fp32]",
                        _TRAIN + "test_attention_train[cifar10-b8h1x256d256-bf16]",
                        _TRAIN + "test_attention_train[sd-b1h8x1024d80-bf16]",
                        _TRAIN + "test_attention_train[fashion32-b32h4x64d32-bf16]",
                        "benchmarks/bench_attention.py::test_attention_fwd_vs_sdpa[sd1-64x64-self-bf16-cpu kernel]",
                        "benchmarks/bench_attention.py::test_attention_fwd_vs_sdpa[sd1-64x64-cross-bf16-cpu kernel]"),
        train_sdpa_bf16_min_keys=256),
    CpuRoute(
        "avx512_bf16_2x", "AVX-512 + AVX512-BF16 whose bf16 dot products run at twice the fp32 FMA rate (AMD)",
        bf16_math="native", linear_activation="fused",
        # bf16 dot products at twice the fp32 rate: the native bf16 kernels beat the fp32-math upcast
        evidence=(_BENCH + "test_resblock[bf16-native_bf16_math]", _BENCH + "test_resblock[bf16-nchw]",
                  _BENCH + "test_linear[fp32-2x1024x1536to6144-gelu_tanh]")),
    CpuRoute(
        "avx512_bf16", "AVX-512 + AVX512-BF16 at the fp32 FMA rate (Intel without AMX)",
        bf16_math="fp32", linear_activation="fused",
        # vdpbf16ps on one port = the fp32 FMA rate: native bf16 convolutions 1.5-2x slower than the fp32-math
        # upcast; fp32 linear + fused activation 0.95-1.07x F.linear (a tie: the fusion saves a pass)
        evidence=(_BENCH + "test_resblock[bf16-native_bf16_math]", _BENCH + "test_resblock[bf16-nchw]",
                  _BENCH + "test_linear[fp32-2x1024x1536to6144-gelu_tanh]")),
    CpuRoute(
        "avx512", "AVX-512 without bf16 dot products",
        bf16_math="fp32", linear_activation="fused",
        # bf16 is emulated without AVX512-BF16 (slower than fp32); oneDNN's fp32 kernels are the AVX-512 row's
        evidence=(_BENCH + "test_resblock[bf16-native_bf16_math]",
                  _BENCH + "test_linear[fp32-2x1024x1536to6144-gelu_tanh]")),
    CpuRoute(
        "avx2", "AVX2 + FMA only",
        bf16_math="fp32", linear_activation="eager",
        # oneDNN has no bf16 kernels here. Its fp32 inner product with a fused unary post-op lost to F.linear +
        # the eager activation at every shape with >= 256 rows (0.57-0.95x); the unfused oneDNN matmul, then the
        # activation, was 1.0-1.5x faster than the fused op (bf16 inputs, fp32 math: 1.34x at 2048x1536->6144)
        evidence=(_BENCH + "test_linear[fp32-2x1024x1536to6144-gelu_tanh]",
                  _BENCH + "test_linear[fp32-1x1024x1536to6144-gelu_tanh]",
                  _BENCH + "test_linear[bf16-2x1024x1536to6144-gelu_tanh]"),
        # Training, forward + backward, one thread, the UNet2D presets' shapes (ref time / cpu time, same run):
        # fp32 convolutions with the time term or the skip fused 0.95-1.10 (median 0.97: the same oneDNN kernels,
        # and the backward is torch's either way), fp32 linears with or without the residual 0.89-1.05. In bf16
        # the cpu paths compute in fp32 and win 6.6-20x (no bf16 kernels here); GroupNorm (+ SiLU) wins 1.1-2.1x
        # except at 8x8 maps in fp32 (0.7-1.0, per-call overhead), attention ties or wins (0.93-1.37).
        train_ref=("conv2d:fp32", "linear:fp32"),
        train_evidence=(_TRAIN + "test_conv2d_train[fashion32-32to32x32-skip-fp32]",
                        _TRAIN + "test_conv2d_train[cifar10-128to128x32-time-fp32]",
                        _TRAIN + "test_linear_train[fashion32-b32x64x128-res-fp32]",
                        _TRAIN + "test_linear_train[cifar10-b8x256x256-res-fp32]")),
    CpuRoute(
        "scalar", "neither AVX2 nor AVX-512",
        bf16_math="fp32", linear_activation="eager",
        # not measured on such a CPU: the avx2 row's choices (fp32 math, no fused unary post-op)
        evidence=(_BENCH + "test_linear[fp32-2x1024x1536to6144-gelu_tanh]",)),
)}


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def train_ref_reason(op: str, *tensors) -> str | None:
    """Why automatic choice leaves ``op``'s cpu backend to ``ref`` for these inputs (None: it does not).

    Only a training call counts (grad enabled and an input that requires grad); its dtype is the first tensor's.
    The ops' ``slower`` hooks ask this with their inputs on every call, so the common answers come first: no
    grad (inference), or a row that sends nothing to ``ref``.
    """
    if not torch.is_grad_enabled():
        return None
    route = current_route()
    if not route.train_ref:
        return None
    ts = [t for t in tensors if t is not None]
    if not ts or not any(t.requires_grad for t in ts):
        return None
    dtype = _DTYPE_NAMES.get(ts[0].dtype, str(ts[0].dtype))
    if f"{op}:{dtype}" not in route.train_ref:
        return None
    cited = [e for e in route.train_evidence if f"test_{op}_train" in e] or list(route.train_evidence)
    return (f"training in {dtype}: {op}'s cpu forward + backward did not beat ref on {route.capability} CPUs "
            f"(routing row {route.name!r}, {cited[0]})")


def sdpa_reason(q, k, v=None) -> str | None:
    """Why the ``cpu`` attention backend runs torch SDPA instead of fastdiff's kernel for these bf16 inputs (None:
    the kernel runs): the row's ``train_sdpa_bf16_min_keys`` for a training call (grad enabled and an input that
    requires grad), its ``sdpa_bf16_min_keys`` otherwise, and at least that many keys."""
    if q.dtype != torch.bfloat16:
        return None
    route = current_route()
    training = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v))
    n = route.train_sdpa_bf16_min_keys if training else route.sdpa_bf16_min_keys
    if n is None or k.shape[-2] < n:
        return None
    what, test = ("training", "test_attention_train") if training else ("inference", "test_attention_fwd_vs_sdpa")
    cited = [e for e in route.train_evidence if test in e] or list(route.train_evidence)
    return (f"bf16 {what} with {k.shape[-2]} keys (>= {n}): torch SDPA beat fastdiff's kernel on "
            f"{route.capability} CPUs (routing row {route.name!r}, {cited[0]})")


def route_name(caps: CpuCaps) -> str:
    """The row of :data:`ROUTES` for a CPU with these capabilities (pure logic)."""
    if caps.isa not in _ISA_RANK:
        raise ValueError(f"CpuCaps.isa must be one of {', '.join(_settings.ISA_LEVELS)}; got {caps.isa!r}")
    wide = _ISA_RANK[caps.isa] >= _ISA_RANK["avx512"]
    if wide and caps.amx:
        return "amx"
    if caps.isa == "avx512_bf16":
        return "avx512_bf16_2x" if caps.vendor == "AuthenticAMD" else "avx512_bf16"
    return caps.isa


# ------------------------------------------------------------------------------------------ this machine

@functools.lru_cache(maxsize=None)
def _cpuinfo() -> tuple[frozenset[str], str]:
    flags, vendor = None, ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key == "flags":
                    flags = frozenset(value.split())
                    break
    except OSError:
        pass
    if flags is None:  # not Linux: what torch's own dispatch saw
        import torch

        level = torch.backends.cpu.get_cpu_capability()
        names = set(ISA_FEATURES["avx512"] if level.startswith("AVX512") else
                    ISA_FEATURES["avx2"] if level == "AVX2" else ())
        if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
            names.add("avx512_bf16")
        flags = frozenset(names)
    return flags, vendor


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (/proc/cpuinfo names; from torch's capability where there is none)."""
    return _cpuinfo()[0]


def missing_features(isa: str, flags: frozenset[str] | None = None) -> list[str]:
    """The features ``isa`` needs that the CPU (or ``flags``) lacks; empty: it can run."""
    if isa not in ISA_FEATURES:
        raise ValueError(f"isa must be one of {', '.join(ISA_FEATURES)}; got {isa!r}")
    have = cpu_flags() if flags is None else flags
    return [f for f in ISA_FEATURES[isa] if f not in have]


def detected_isa() -> str:
    """The widest instruction-set level this CPU has."""
    return [isa for isa in _settings.ISA_LEVELS if not missing_features(isa)][-1]


@functools.lru_cache(maxsize=None)
def _amx() -> bool:
    import torch

    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # also asks the OS for the tile state
    return bool(probe()) if probe is not None else "amx_tile" in cpu_flags()


def detect_caps(isa: str | None = None) -> CpuCaps:
    """This CPU's capabilities, at instruction-set level ``isa`` (default: the widest it has)."""
    return CpuCaps(isa=isa or detected_isa(), amx=_amx(), vendor=_cpuinfo()[1])


_route_cache: tuple[_settings.Settings, CpuRoute] | None = None


def _check_isa(s: _settings.Settings) -> None:
    # settings listener: a cpu_isa this CPU cannot run is refused where it is set
    if s.cpu_isa is not None:
        missing = missing_features(s.cpu_isa)
        if missing:
            raise _settings.SettingsError(f"cpu_isa={s.cpu_isa} (FASTDIFF_CPU_ISA): this CPU lacks "
                                          f"{', '.join(missing)}; it supports at most {detected_isa()}")


_settings.on_change(_check_isa)


def current_caps() -> CpuCaps:
    """This CPU's capabilities at the instruction-set level the settings allow."""
    return detect_caps(_settings.current().cpu_isa)


def current_route() -> CpuRoute:
    """The routing row in force: ``settings.cpu_route`` if set, else the row of :func:`current_caps`."""
    global _route_cache
    s = _settings.current()
    hit = _route_cache
    if hit is not None and hit[0] is s:
        return hit[1]
    route = ROUTES[s.cpu_route or route_name(current_caps())]
    _route_cache = (s, route)
    return route
