"""linear (fused activation / residual) on every backend against an fp64 oracle and torch's own bf16 error."""
import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

import fastdiff.ops as ops
from fastdiff.ops import Linear, linear, linear_ref
from fastdiff.ops.registry import BackendUnavailable, all_ops

from lowp import assert_close_lowp, max_err

OP = all_ops()["linear"]
HAS_CPU = not OP.availability()["cpu"]  # the cpu backend can run here

# (x shape, out features): SD1 attention/FF projections at few tokens (320/640/1280 channels, the 768-d text
# context), the time embedding MLP (320 -> 1280, batch 2), SD3 1536-wide, plus odd shapes.
CASES = [
    ((2, 16, 320), 320),
    ((2, 16, 320), 2560),
    ((2, 8, 640), 640),
    ((2, 4, 1280), 1280),
    ((2, 77, 768), 320),
    ((2, 320), 1280),
    ((1, 8, 1536), 1536),
    ((3, 5, 7), 11),
    ((1, 1, 1), 1),
]
IDS = ["sd1-320", "ff-320x2560", "sd1-640", "sd1-1280", "ctx-768", "temb", "sd3-1536", "odd", "1x1"]


def _oracle(x, w, b, r, act):
    """Independent eager fp64 computation (GELU from its closed forms)."""
    y = x.double() @ w.double().t()
    if b is not None:
        y = y + b.double()
    if r is not None:
        y = y + r.double()
    if act == "silu":
        y = y * torch.sigmoid(y)
    elif act == "gelu":
        y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
    elif act == "gelu_tanh":
        y = 0.5 * y * (1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y ** 3)))
    return y


def _make(case, dtype, residual=False, bias=True, seed=0):
    shape, n = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    w = torch.randn(n, shape[-1], generator=gen) / shape[-1] ** 0.5
    b = torch.randn(n, generator=gen) * 0.1 if bias else None
    r = torch.randn(shape[:-1] + (n,), generator=gen) if residual else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(w), cast(b), cast(r)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("act", [None, "silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("residual", [False, True])
def test_fp32_forward(backend, case, act, residual):
    x, w, b, r = _make(case, torch.float32, residual)
    with ops.use_backend(backend):
        got = linear(x, w, b, activation=act, residual=r)
    assert got.dtype == torch.float32 and got.shape == x.shape[:-1] + (w.shape[0],)
    torch.testing.assert_close(got.double(), _oracle(x, w, b, r, act), rtol=1e-4, atol=1e-4)


def test_no_bias_noncontiguous_and_1d(backend):
    x, w, _, _ = _make(CASES[0], torch.float32, bias=False)
    xt = x.transpose(0, 1)  # (16, 2, 320), not contiguous
    with ops.use_backend(backend):
        torch.testing.assert_close(linear(xt, w).double(), _oracle(xt, w, None, None, None), rtol=1e-4, atol=1e-4)
        v = x[0, 0]
        torch.testing.assert_close(linear(v, w, activation="silu").double(), _oracle(v, w, None, None, "silu"),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", [CASES[0], CASES[4], CASES[7]], ids=["sd1-320", "ctx-768", "odd"])
@pytest.mark.parametrize("act,residual", [(None, False), ("gelu", False), ("silu", True)])
@pytest.mark.parametrize("math_mode", ["auto", "native", "fp32"])
def test_bf16_forward(backend, lowp_dtype, case, act, residual, math_mode, use_settings):
    use_settings(cpu_bf16_math=math_mode)
    x, w, b, r = _make(case, lowp_dtype, residual)
    up = lambda t: None if t is None else t.float()  # noqa: E731
    ref32 = linear_ref(up(x), up(w), up(b), activation=act, residual=up(r))
    torch_bf16 = linear_ref(x, w, b, activation=act, residual=r)
    with ops.use_backend(backend):
        got = linear(x, w, b, activation=act, residual=r)
    assert_close_lowp(got, ref32, torch_bf16, f"linear {lowp_dtype} {backend} {math_mode}")


@pytest.mark.parametrize("case", [CASES[0], CASES[5], CASES[7]], ids=["sd1-320", "temb", "odd"])
@pytest.mark.parametrize("act,residual,bias", [(None, False, True), ("gelu", True, True), ("silu", False, False)])
def test_fp32_gradients(backend, case, act, residual, bias):
    x, w, b, r = _make(case, torch.float32, residual, bias)
    inputs = [t for t in (x, w, b, r) if t is not None]
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    it = iter(leaves)
    lx, lw = next(it), next(it)
    lb = next(it) if b is not None else None
    lr = next(it) if r is not None else None
    with ops.use_backend(backend):
        out = linear(lx, lw, lb, activation=act, residual=lr)
    wl = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(wl)
    ox, ow = next(it), next(it)
    ob = next(it) if b is not None else None
    orr = next(it) if r is not None else None
    want = _oracle(ox, ow, ob, orr, act)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(g.float())
    want.backward(g)
    for a, o in zip(leaves, wl):
        assert max_err(a.grad, o.grad) <= 2e-5 * (o.grad.abs().max().item() + 1e-6) + 1e-5


@pytest.mark.parametrize("act,residual", [(None, True), ("gelu", False)])
def test_bf16_gradients(backend, lowp_dtype, act, residual):
    x, w, b, r = _make(CASES[0], lowp_dtype, residual)
    g = torch.randn(x.shape[:-1] + (w.shape[0],), generator=torch.Generator().manual_seed(1)).to(lowp_dtype)

    def grads(dtype, fn):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, w, b) + ((r,) if r is not None else ())]
        fn(*leaves[:3], activation=act, residual=leaves[3] if r is not None else None).backward(g.to(dtype))
        return [t.grad for t in leaves]

    g32, g_torch = grads(torch.float32, linear_ref), grads(lowp_dtype, linear_ref)
    with ops.use_backend(backend):
        g_got = grads(lowp_dtype, linear)
    for got, ref32, tbf, name in zip(g_got, g32, g_torch, ["x", "weight", "bias", "residual"]):
        assert_close_lowp(got, ref32, tbf, f"grad {name}")


def test_dispatch_reasons_and_bad_input():
    x, w, b, _ = _make(CASES[7], torch.float32)
    if HAS_CPU:  # a small plain fp32 linear: cpu can run it, automatic choice leaves it to eager
        assert not OP.reasons("cpu", x, w, b, None, None, None)
        assert OP.why_skipped("cpu", x, w, b, None, None, None) and OP.select(x, w, b, None, None, None) == "ref"
    assert any("float16" in s for s in OP.reasons("cpu", x.half(), w.half(), None, None, None, None))
    with ops.use_backend("cpu"), pytest.raises(BackendUnavailable, match="float16"):
        linear(x.half(), w.half())
    torch.testing.assert_close(linear(x.half(), w.half()), F.linear(x.half(), w.half()))  # auto: ref
    with pytest.raises(ValueError, match="do not match"):
        linear(x, w.t())
    with pytest.raises(TypeError, match="dtype"):
        linear(x, w.double())
    with pytest.raises(ValueError, match="bias"):
        linear(x, w, torch.randn(3))
    with pytest.raises(ValueError, match="activation"):
        linear(x, w, activation="relu6")
    with pytest.raises(ValueError, match="residual"):
        linear(x, w, residual=torch.randn(3, 5, 1))
    e = torch.randn(0, 7)
    assert OP.select(e, w, b, None, None, None) == "ref"
    assert linear(e, w, b).shape == (0, 11)
    xn = x.clone()
    xn[1, 2, 3] = float("nan")
    assert torch.equal(linear(xn, w, b).isnan(), F.linear(xn, w, b).isnan())


def test_module_is_a_drop_in_and_cache():
    torch.manual_seed(0)
    ours, theirs = Linear(32, 48), torch.nn.Linear(32, 48)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert list(Linear(4, 5, bias=False).state_dict()) == ["weight"]
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(ours(x), theirs(x))
    ours.eval(), theirs.eval()
    # forced: automatic choice leaves matmuls this small to eager F.linear (no packed weight then)
    with torch.no_grad(), ops.use_backend("cpu" if HAS_CPU else None):
        torch.testing.assert_close(ours(x), theirs(x))
        torch.testing.assert_close(ours(x), theirs(x))  # the second call packs
        if HAS_CPU:
            assert ours._fd_pack is not None
        for rows in (1, 7, 300):  # one packed weight serves every token count
            xr = torch.randn(rows, 32)
            torch.testing.assert_close(ours(xr), theirs(xr))
        ours.weight.mul_(0.5)
        theirs.load_state_dict(ours.state_dict())
        torch.testing.assert_close(ours(x), theirs(x))  # stale cache would fail
        torch.testing.assert_close(ours(x, activation="gelu"), F.gelu(theirs(x)))
        assert copy.deepcopy(ours)._fd_pack is None
    clone = pickle.loads(pickle.dumps(ours))
    torch.testing.assert_close(clone(x), theirs(x))
    ours.train(), theirs.train()
    ours(x).square().sum().backward()
    theirs(x).square().sum().backward()
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad, rtol=1e-4, atol=1e-4)
