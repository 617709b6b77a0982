"""SD1 ResBlock, fused conv and linear vs the eager PyTorch they replace (target: ResBlock >= 1.3x eager in bf16
at 64x64x320).

Everything runs in inference mode with modules in eval (the sampling path): fastdiff's Conv2d/Linear then use
their cached pre-packed weights, exactly as in a model. The eager side is diffusers' ResnetBlock2D / plain
nn.Conv2d, nn.Linear + the eager elementwise ops, in the same dtype and NCHW, as a diffusers user runs them.
Both sides allocate their outputs (conftest raises the malloc thresholds so neither pays page faults).

Also measured in the same run, to justify the choices in fastdiff/ops/_onednn.py and fastdiff/models/blocks.py:
the block with bf16 math forced native (``FASTDIFF_CPU_BF16_MATH=native``) vs the automatic policy, and a
channels_last input vs NCHW.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from fastdiff.models.blocks import ResBlock
from fastdiff.ops import Conv2d, Linear, all_ops
from fastdiff.ops._onednn import bf16_math_dtype

diffusers_resnet = pytest.importorskip("diffusers.models.resnet")

DTYPES = [torch.float32, torch.bfloat16]
DT_IDS = ["fp32", "bf16"]


def _dt(dtype):
    return str(dtype).replace("torch.", "").replace("float32", "fp32").replace("bfloat16", "bf16")


def _conv_flops(n, cin, cout, k, h, w):
    return 2.0 * n * cin * cout * k * k * h * w


@pytest.fixture(scope="module")
def blocks():
    torch.manual_seed(0)
    ref = diffusers_resnet.ResnetBlock2D(in_channels=320, out_channels=320, temb_channels=1280, groups=32,
                                         eps=1e-5).eval()
    ours = ResBlock(320, 320, 1280, groups=32, eps=1e-5).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("variant", ["nchw", "channels_last", "native_bf16_math"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_resblock(compare, blocks, dtype, variant, monkeypatch):
    """SD1 ResBlock, 320 channels, 64x64 latents (512px), batch 2 (CFG), temb 1280."""
    if variant == "native_bf16_math":
        if dtype != torch.bfloat16:
            pytest.skip("the bf16 math policy only concerns bf16")
        monkeypatch.setenv("FASTDIFF_CPU_BF16_MATH", "native")
    ref, ours = (b.to(dtype) for b in blocks)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 320, 64, 64, generator=gen).to(dtype)
    t = torch.randn(2, 1280, generator=gen).to(dtype)
    xf = x.contiguous(memory_format=torch.channels_last) if variant == "channels_last" else x
    with torch.inference_mode():
        want, got = ref(x, t), ours(xf, t)
        tol = 1e-3 if dtype == torch.float32 else 0.1
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
        flops = 2 * _conv_flops(2, 320, 320, 3, 64, 64)
        math = "native bf16" if variant == "native_bf16_math" else _dt(bf16_math_dtype() if dtype == torch.bfloat16
                                                                       else dtype)
        ratio = compare("ResBlock vs diffusers", f"2x320x64x64 {_dt(dtype)} {variant} [{math} math]",
                        lambda: ours(xf, t), lambda: ref(x, t), flops=flops)
    print(f"\nResBlock {_dt(dtype)} {variant}: {ratio:.2f}x eager diffusers ResnetBlock2D")


# (x shape, out channels, kernel, fused): SD1 UNet convolutions at 512px with CFG batch 2.
CONV_CASES = [
    ((2, 320, 64, 64), 320, 3, "residual"),   # conv2 of a ResBlock + skip
    ((2, 320, 64, 64), 320, 3, "temb"),       # conv1 of a ResBlock + (N, C, 1, 1) time term
    ((2, 640, 32, 32), 640, 3, "residual"),
    ((2, 320, 64, 64), 640, 1, "none"),       # 1x1 shortcut
]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0][1]}to{c[1]}k{c[2]}-{c[0][2]}px-{c[3]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_conv(compare, case, dtype, layout):
    """Fused conv vs nn.Conv2d + eager add/SiLU, both on the same input layout (like with like)."""
    shape, cout, k, fused = case
    torch.manual_seed(0)
    ours = Conv2d(shape[1], cout, k, padding=k // 2).to(dtype).eval()
    theirs = torch.nn.Conv2d(shape[1], cout, k, padding=k // 2).to(dtype).eval()
    theirs.load_state_dict(ours.state_dict())
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape).to(dtype).contiguous(memory_format=fmt)
    r = None
    if fused == "residual":
        r = torch.randn(shape[0], cout, shape[2], shape[3]).to(dtype).contiguous(memory_format=fmt)
    elif fused == "temb":
        r = torch.randn(shape[0], cout, 1, 1).to(dtype)
    silu = fused == "silu"

    def eager():
        y = theirs(x)
        if r is not None:
            y = y + r
        return F.silu(y) if silu else y

    with torch.inference_mode():
        torch.testing.assert_close(ours(x, residual=r, silu=silu).float(), eager().float(),
                                   rtol=2e-2 if dtype == torch.bfloat16 else 1e-3,
                                   atol=5e-2 if dtype == torch.bfloat16 else 1e-3)
        backend = all_ops()["conv2d"].select(x, ours.weight, ours.bias, (1, 1), (k // 2, k // 2), (1, 1), 1, r,
                                             silu, None)
        ratio = compare(f"conv2d (+fused) [{backend}]", f"{shape[1]}->{cout} k{k} {shape[2]}px {fused} {layout} "
                        f"{_dt(dtype)}", lambda: ours(x, residual=r, silu=silu), eager,
                        flops=_conv_flops(shape[0], shape[1], cout, k, shape[2], shape[3]))
    print(f"\nconv {shape}->{cout} k{k} {fused} {layout} {_dt(dtype)}: {ratio:.2f}x eager")


# (x shape, out features, activation): SD1 projections at 512px with CFG batch 2 (4096/1024/256 tokens), the
# cross-attention context (77 tokens of 768), the SD3 1536-wide projection at 1024px, an SD3 MLP fc1 + GELU, the
# SD3 image-stream MLP fc1 of a guided 512px step (2 x 1024 tokens), a CLIP-L MLP fc1 (2 x 77 tokens, erf GELU).
LINEAR_CASES = [
    ((2, 4096, 320), 320, None),
    ((2, 1024, 640), 640, None),
    ((2, 256, 1280), 1280, None),
    ((2, 77, 768), 320, None),
    ((1, 4096, 1536), 1536, None),
    ((1, 1024, 1536), 6144, "gelu_tanh"),
    ((2, 1024, 1536), 6144, "gelu_tanh"),
    ((2, 77, 768), 3072, "gelu"),
    ((2, 320), 1280, "silu"),
]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}to{c[1]}-{c[2]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_linear(compare, case, dtype):
    shape, n, act = case
    torch.manual_seed(0)
    ours = Linear(shape[-1], n).to(dtype).eval()
    theirs = torch.nn.Linear(shape[-1], n).to(dtype).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(shape).to(dtype)
    eager_act = {None: lambda y: y, "silu": F.silu, "gelu": F.gelu,
                 "gelu_tanh": lambda y: F.gelu(y, approximate="tanh")}[act]
    rows = x.numel() // shape[-1]
    with torch.inference_mode():
        torch.testing.assert_close(ours(x, activation=act).float(), eager_act(theirs(x)).float(),
                                   rtol=2e-2 if dtype == torch.bfloat16 else 1e-3,
                                   atol=5e-2 if dtype == torch.bfloat16 else 1e-3)
        backend = all_ops()["linear"].select(x, ours.weight, ours.bias, act, None, None)
        ratio = compare(f"linear (+act) [{backend}]", f"{rows}x{shape[-1]}->{n} {act or ''} {_dt(dtype)}",
                        lambda: ours(x, activation=act), lambda: eager_act(theirs(x)),
                        flops=2.0 * rows * shape[-1] * n)
    print(f"\nlinear {rows}x{shape[-1]}->{n} {act} {_dt(dtype)}: {ratio:.2f}x eager")


def test_dispatch_choice_is_reported():
    """Which backend runs these ops here (printed with -s; the benchmarks above time exactly that choice)."""
    x, w = torch.randn(1, 4, 8, 8), torch.randn(4, 4, 3, 3)
    conv = all_ops()["conv2d"].select(x, w, None, (1, 1), (1, 1), (1, 1), 1, None, False, None)
    lin = all_ops()["linear"].select(x[0, 0], w[0, 0], None, None, None, None)
    print(f"\nconv2d -> {conv}, linear -> {lin}; bf16 math: {_dt(bf16_math_dtype())} "
          f"(FASTDIFF_CPU_BF16_MATH={os.environ.get('FASTDIFF_CPU_BF16_MATH', 'auto')})")
