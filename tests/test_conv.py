"""conv2d (fused residual add / SiLU) on every backend against an fp64 oracle and torch's own bf16 error."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

import fastdiff.ops as ops
from fastdiff.ops import Conv2d, conv2d, conv2d_ref
from fastdiff.ops.registry import BackendUnavailable, all_ops

from lowp import assert_close_lowp, max_err

OP = all_ops()["conv2d"]
HAS_CPU = not OP.availability()["cpu"]  # the cpu backend can run here

# (x shape, out channels, kernel, stride, padding, dilation, groups): SD1 UNet/VAE convolutions at small
# spatial size (conv_in 4->320, 3x3 320/640/1280, 1x1 shortcut 320->640, stride-2 downsample) plus odd ones.
CASES = [
    ((2, 320, 8, 8), 320, 3, 1, 1, 1, 1),
    ((2, 4, 8, 8), 320, 3, 1, 1, 1, 1),
    ((2, 320, 8, 8), 640, 1, 1, 0, 1, 1),
    ((1, 640, 5, 7), 640, 3, 1, 1, 1, 1),
    ((2, 1280, 4, 4), 1280, 3, 1, 1, 1, 1),
    ((2, 320, 9, 9), 320, 3, 2, 1, 1, 1),
    ((1, 3, 7, 5), 5, 3, 1, 1, 1, 1),
    ((1, 8, 11, 6), 12, 3, 1, 2, 2, 4),
    ((3, 6, 1, 1), 7, 1, 1, 0, 1, 1),
]
IDS = ["sd1-320", "conv_in", "shortcut1x1", "odd640", "sd1-1280", "down-s2", "tiny", "dil2-groups4", "1x1x1"]


def _make(case, dtype, *, layout="nchw", residual=None, seed=0):
    shape, cout, k, stride, pad, dil, groups = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    w = torch.randn(cout, shape[1] // groups, k, k, generator=gen) / (shape[1] // groups * k * k) ** 0.5
    b = torch.randn(cout, generator=gen) * 0.1
    out = F.conv2d(x, w, None, stride, pad, dil, groups).shape
    r = None
    if residual == "full":
        r = torch.randn(out, generator=gen)
    elif residual == "nc11":  # the ResBlock time-embedding term
        r = torch.randn(out[0], out[1], 1, 1, generator=gen)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "noncontig":  # a strided view of a larger tensor
        big = torch.randn(shape[0], shape[1], shape[2] * 2, shape[3], generator=gen)
        big[:, :, ::2] = x
        x = big[:, :, ::2]
        assert not x.is_contiguous()
    conf = dict(stride=stride, padding=pad, dilation=dil, groups=groups)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(w), cast(b), cast(r), conf


def _oracle(x, w, b, r, conf, silu):
    """Independent eager fp64 computation."""
    y = F.conv2d(x.double(), w.double(), b.double(), **conf)
    if r is not None:
        y = y + r.double()
    return y * torch.sigmoid(y) if silu else y


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("residual,silu", [(None, False), (None, True), ("full", False), ("nc11", False),
                                           ("full", True)])
def test_fp32_forward(backend, case, residual, silu):
    x, w, b, r, conf = _make(case, torch.float32, residual=residual)
    with ops.use_backend(backend):
        got = conv2d(x, w, b, residual=r, silu=silu, **conf)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _oracle(x, w, b, r, conf, silu), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["channels_last", "noncontig"])
@pytest.mark.parametrize("residual", [None, "full"])
def test_layouts(backend, layout, residual):
    case = CASES[0]
    x, w, b, r, conf = _make(case, torch.float32, layout=layout, residual=residual)
    if residual and layout == "channels_last":
        r = r.contiguous(memory_format=torch.channels_last)
    with ops.use_backend(backend):
        got = conv2d(x, w, b, residual=r, silu=True, **conf)
    want = conv2d_ref(x, w, b, residual=r, silu=True, **conf)
    torch.testing.assert_close(got.double(), _oracle(x, w, b, r, conf, True), rtol=1e-4, atol=1e-4)
    # The output's memory format is the one torch's own convolution picks.
    assert got.is_contiguous(memory_format=torch.channels_last) == want.is_contiguous(
        memory_format=torch.channels_last)
    assert got.is_contiguous() == want.is_contiguous()


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[6]], ids=["sd1-320", "shortcut1x1", "tiny"])
@pytest.mark.parametrize("residual,silu", [(None, True), ("full", False), ("nc11", True)])
@pytest.mark.parametrize("math", ["auto", "native", "fp32"])
def test_bf16_forward(backend, lowp_dtype, case, residual, silu, math, use_settings):
    """bf16 error vs the fp32 result is at most 2x the error of torch's own bf16 sequence (every math mode)."""
    use_settings(cpu_bf16_math=math)
    x, w, b, r, conf = _make(case, torch.float32, residual=residual)
    lp = lambda t: None if t is None else t.to(lowp_dtype)  # noqa: E731
    # The inputs are rounded to bf16 first: both sides see exactly the same bf16 operands.
    xb, wb, bb, rb = lp(x), lp(w), lp(b), lp(r)
    ref32 = conv2d_ref(xb.float(), wb.float(), bb.float(), residual=None if rb is None else rb.float(),
                       silu=silu, **conf)
    torch_bf16 = conv2d_ref(xb, wb, bb, residual=rb, silu=silu, **conf)
    with ops.use_backend(backend):
        got = conv2d(xb, wb, bb, residual=rb, silu=silu, **conf)
    assert_close_lowp(got, ref32, torch_bf16, f"conv2d {lowp_dtype} {backend} {math}")


@pytest.mark.parametrize("case", [CASES[0], CASES[5], CASES[7]], ids=["sd1-320", "down-s2", "dil2-groups4"])
@pytest.mark.parametrize("residual,silu", [(None, False), ("full", True), ("nc11", False)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_fp32_gradients(backend, case, residual, silu, layout):
    x, w, b, r, conf = _make(case, torch.float32, residual=residual, layout=layout)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b) + ((r,) if r is not None else ())]
    with ops.use_backend(backend):
        out = conv2d(*leaves[:3], residual=leaves[3] if r is not None else None, silu=silu, **conf)
    want_leaves = [t.detach().double().requires_grad_() for t in leaves]
    want = _oracle(*want_leaves[:3], want_leaves[3] if r is not None else None, conf, silu)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(g.float())
    want.backward(g)
    for got_leaf, want_leaf, name in zip(leaves, want_leaves, ["x", "weight", "bias", "residual"]):
        scale = want_leaf.grad.abs().max().item() + 1e-6
        assert max_err(got_leaf.grad, want_leaf.grad) <= 2e-5 * scale + 1e-5, f"grad {name}"


@pytest.mark.parametrize("residual,silu", [(None, True), ("full", False), ("nc11", False)])
def test_bf16_gradients(backend, lowp_dtype, residual, silu):
    """bf16 gradients: at most 2x the error of torch's own bf16 autograd, both vs the fp32 gradients."""
    x, w, b, r, conf = _make(CASES[0], lowp_dtype, residual=residual)
    g = torch.randn(F.conv2d(x.float(), w.float(), None, **conf).shape,
                    generator=torch.Generator().manual_seed(1)).to(lowp_dtype)

    def grads(dtype, fn):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, w, b) + ((r,) if r is not None else ())]
        fn(*leaves[:3], residual=leaves[3] if r is not None else None, silu=silu, **conf).backward(g.to(dtype))
        return [t.grad for t in leaves]

    g32 = grads(torch.float32, conv2d_ref)
    g_torch = grads(lowp_dtype, conv2d_ref)
    with ops.use_backend(backend):
        g_got = grads(lowp_dtype, conv2d)
    for got, ref32, tbf, name in zip(g_got, g32, g_torch, ["x", "weight", "bias", "residual"]):
        assert_close_lowp(got, ref32, tbf, f"grad {name}")


def test_unbatched_and_same_padding():
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 9, 7, generator=gen), torch.randn(6, 4, 3, 3, generator=gen)
    torch.testing.assert_close(conv2d(x, w, padding=1), F.conv2d(x, w, padding=1))
    torch.testing.assert_close(conv2d(x, w, padding="same"), F.conv2d(x, w, padding="same"))
    w2 = torch.randn(6, 4, 2, 4, generator=gen)  # even kernel: asymmetric 'same' padding goes to the reference
    torch.testing.assert_close(conv2d(x[None], w2, padding="same"), F.conv2d(x[None], w2, padding="same"))


def test_dispatch_reasons():
    x, w, b, r, conf = _make(CASES[6], torch.float32)
    args = lambda xx, ww, rr=None: (xx, ww, None, (1, 1), (1, 1), (1, 1), 1, rr, False, None)  # noqa: E731
    if HAS_CPU:  # plain fp32 (nothing to fuse) is left to eager F.conv2d; bf16 takes the cpu path
        assert OP.why_skipped("cpu", *args(x, w)) and OP.select(*args(x, w)) == "ref"
        assert OP.select(*args(x.bfloat16(), w.bfloat16())) == "cpu"
    why = OP.reasons("cpu", *args(x.half(), w.half()))
    assert any("float16" in s for s in why)
    assert OP.select(*args(x.half(), w.half())) == "ref"
    with ops.use_backend("cpu"), pytest.raises(BackendUnavailable, match="float16"):
        conv2d(x.half(), w.half(), padding=1)
    # A residual broadcast oneDNN cannot fuse goes to the reference and still gives the right answer.
    r = torch.randn(1, 1, 7, 5)
    assert OP.select(*args(x, w, r)) == "ref"
    torch.testing.assert_close(conv2d(x, w, padding=1, residual=r), F.conv2d(x, w, padding=1) + r)


def test_bad_input():
    x, w = torch.randn(1, 4, 6, 6), torch.randn(5, 4, 3, 3)
    with pytest.raises(TypeError, match="dtype"):
        conv2d(x, w.double())
    with pytest.raises(ValueError, match="channels"):
        conv2d(x, torch.randn(5, 3, 3, 3))
    with pytest.raises(ValueError, match="residual"):
        conv2d(x, w, padding=1, residual=torch.randn(1, 5, 5, 6))
    with pytest.raises(TypeError, match="residual dtype"):
        conv2d(x, w, padding=1, residual=torch.randn(1, 5, 6, 6).double())
    with pytest.raises(ValueError, match="padding"):
        conv2d(x, w, padding="full")
    with pytest.raises(ValueError, match="stride"):
        conv2d(x, w, stride=0)
    with pytest.raises(ValueError, match="shape"):
        conv2d(torch.randn(2, 1, 4, 6, 6), w)
    # Empty batch: the documented result is torch's (an empty output), never a oneDNN call.
    e = torch.randn(0, 4, 6, 6)
    assert OP.select(e, w, None, (1, 1), (1, 1), (1, 1), 1, None, False, None) == "ref"
    assert conv2d(e, w, padding=1).shape == (0, 5, 6, 6)
    # NaN propagates exactly as in torch's convolution.
    xn = x.clone()
    xn[0, 0, 2, 2] = float("nan")
    assert torch.equal(conv2d(xn, w, padding=1).isnan(), F.conv2d(xn, w, padding=1).isnan())


# ------------------------------------------------------------------------------------------- Conv2d module

@pytest.mark.parametrize("kw", [dict(kernel_size=3, padding=1), dict(kernel_size=1),
                                dict(kernel_size=3, stride=2, padding=1, bias=False),
                                dict(kernel_size=3, padding="same", padding_mode="reflect"),
                                dict(kernel_size=3, padding=1, groups=2, dilation=2)])
def test_module_is_a_drop_in(kw):
    torch.manual_seed(0)
    ours, theirs = Conv2d(8, 12, **kw), torch.nn.Conv2d(8, 12, **kw)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 8, 9, 7)
    for mode in ("train", "eval"):
        getattr(ours, mode)(), getattr(theirs, mode)()
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_module_packed_weight_cache():
    torch.manual_seed(0)
    ours, theirs = Conv2d(8, 12, 3, padding=1).eval(), torch.nn.Conv2d(8, 12, 3, padding=1).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 8, 9, 7).contiguous(memory_format=torch.channels_last)
    # forced: automatic choice leaves a plain fp32 convolution to eager F.conv2d (no packed weight then)
    with torch.no_grad(), ops.use_backend("cpu" if HAS_CPU else None):
        torch.testing.assert_close(ours(x), theirs(x))
        torch.testing.assert_close(ours(x), theirs(x))  # the second call with one shape packs
        if HAS_CPU:
            assert ours._fd_pack is not None  # inference, channels_last: the packed weight is cached
        for update in (lambda m: m.weight.mul_(-2.0),
                       lambda m: m.load_state_dict({"weight": torch.randn(12, 8, 3, 3), "bias": m.bias.clone()})):
            update(ours)
            theirs.load_state_dict(ours.state_dict())
            torch.testing.assert_close(ours(x), theirs(x))  # a stale cache would fail here
        xc = torch.randn(1, 8, 5, 6).contiguous(memory_format=torch.channels_last)  # another shape and layout
        got = ours(xc)
        torch.testing.assert_close(got, theirs(xc))
        assert got.is_contiguous(memory_format=torch.channels_last)
        xn = x.contiguous()
        assert ours(xn).is_contiguous()  # an NCHW input gets an NCHW output
        torch.testing.assert_close(ours(xn), theirs(xn))
        ours_bf16 = copy.deepcopy(ours).bfloat16()
        assert ours_bf16._fd_pack is None
        assert ours_bf16(x.bfloat16()).dtype == torch.bfloat16
    clone = pickle.loads(pickle.dumps(ours))
    assert clone._fd_pack is None
    torch.testing.assert_close(clone(x), theirs(x))
    # Training: no cache, gradients flow to the parameters like nn.Conv2d's.
    ours.train(), theirs.train()
    ours.zero_grad(), theirs.zero_grad()
    ours(x).square().sum().backward()
    theirs(x).square().sum().backward()
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, rtol=1e-4, atol=1e-4)


def test_module_fused_arguments():
    torch.manual_seed(0)
    ours = Conv2d(8, 12, 3, padding=1)
    x, r = torch.randn(2, 8, 9, 7), torch.randn(2, 12, 9, 7)
    want = F.silu(F.conv2d(x, ours.weight, ours.bias, padding=1) + r)
    torch.testing.assert_close(ours(x, residual=r, silu=True), want)
