"""The packed weight of fastdiff's Conv2d / Linear replaces the plain one in inference, and every way of reading the
weight (attribute, state_dict, .to(), train(), pickling, LoRA-style reassignment) gets the exact plain values back.

Oracle: an ``nn.Conv2d`` / ``nn.Linear`` holding a copy of the same weights (torch's own op), and the layer's own
output before anything was packed (the packed weight is the same numbers in oneDNN's layout, so the output is
bit-identical).
"""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

import fastdiff.ops as ops
from fastdiff import settings
from fastdiff.ops import Conv2d, Linear
from fastdiff.ops._onednn import onednn_has_bf16
from fastdiff.ops._packed import packed_bytes, plain_bytes
from fastdiff.ops.registry import all_ops

from lowp import assert_close_lowp

pytestmark = pytest.mark.skipif(bool(all_ops()["conv2d"].availability()["cpu"]),
                                reason="oneDNN (the cpu backend of conv2d/linear) cannot run here")

# (module kwargs, input shape): the SD1 layer kinds at small size (3x3, strided 3x3, 1x1, conv_in's 4 channels),
# a grouped one, and linears (attention projection, the GEGLU projection, the 77-token cross-attention k/v)
CONVS = [
    (dict(in_channels=32, out_channels=32, kernel_size=3, padding=1), (2, 32, 9, 7)),
    (dict(in_channels=32, out_channels=48, kernel_size=3, stride=2, padding=1), (2, 32, 9, 9)),
    (dict(in_channels=32, out_channels=64, kernel_size=1), (2, 32, 8, 8)),
    (dict(in_channels=4, out_channels=32, kernel_size=3, padding=1), (1, 4, 8, 8)),
    (dict(in_channels=32, out_channels=32, kernel_size=3, padding=1, groups=2, bias=False), (2, 32, 6, 6)),
]
LINEARS = [(dict(in_features=64, out_features=64), (2, 50, 64)),
           (dict(in_features=64, out_features=256), (3, 64)),
           (dict(in_features=48, out_features=40, bias=False), (2, 77, 48))]
MATHS = ["fp32"] + (["native"] if onednn_has_bf16() else [])


def _layers():
    for kw, shape in CONVS:
        name = f"conv{kw['kernel_size']}-s{kw.get('stride', 1)}-g{kw.get('groups', 1)}-c{kw['in_channels']}"
        yield pytest.param("conv", kw, shape, id=name)
    for kw, shape in LINEARS:
        yield pytest.param("linear", kw, shape, id=f"linear{kw['in_features']}x{kw['out_features']}")


def _build(kind, kw, shape, dtype, seed=0):
    torch.manual_seed(seed)
    ours = (Conv2d if kind == "conv" else Linear)(**kw)
    theirs = (torch.nn.Conv2d if kind == "conv" else torch.nn.Linear)(**kw)
    theirs.load_state_dict(ours.state_dict())
    ours, theirs = ours.to(dtype).eval(), theirs.to(dtype).eval()
    x = torch.randn(shape).to(dtype)
    if kind == "conv":
        x = x.contiguous(memory_format=torch.channels_last)  # the layout the packed weight serves
    return ours, theirs, x


def _is_replaced(m) -> bool:
    return "_fd_dropped" in m.__dict__ and 0 in m._parameters["weight"].stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("math", MATHS)
@pytest.mark.parametrize("kind,kw,shape", list(_layers()))
def test_packed_replaces_plain_with_the_same_output(kind, kw, shape, dtype, math):
    ours, theirs, x = _build(kind, kw, shape, dtype)
    ours.pack_wider = True  # Linear's default leaves a bf16 weight with fp32 math unpacked (test_linear_pack_wider)
    plain = ours.weight.detach().clone()
    with torch.no_grad(), ops.use_backend("cpu"), settings.override(cpu_bf16_math=math):
        first = ours(x)  # plain weight, converted and reordered inside the call
        assert not _is_replaced(ours) and packed_bytes(ours) == 0
        second = ours(x)  # packs, and the packed copy replaces the plain weight
        assert _is_replaced(ours)
        third = ours(x)
        assert torch.equal(first, second) and torch.equal(first, third)
        # memory: the layer holds the packed copy and the bias, no plain weight
        assert plain_bytes(ours) == (ours.bias.numel() * ours.bias.element_size() if ours.bias is not None else 0)
        assert packed_bytes(ours) >= plain.numel() * (4 if math == "fp32" else dtype.itemsize)
        want = theirs(x)
    if dtype == torch.float32:
        torch.testing.assert_close(third, want, rtol=1e-5, atol=1e-5)
    else:  # the low-precision rule against fp64, beside torch's own bf16 layer
        w64, b64 = theirs.weight.double(), None if theirs.bias is None else theirs.bias.double()
        ref = F.linear(x.double(), w64, b64) if kind == "linear" else F.conv2d(
            x.double(), w64, b64, theirs.stride, theirs.padding, theirs.dilation, theirs.groups)
        assert_close_lowp(third, ref, want, f"{kind} bf16 {math}")
    # the state dict has the exact plain values, and the layer stays packed
    sd = ours.state_dict()
    assert torch.equal(sd["weight"], plain) and sd["weight"].stride() == plain.stride() and _is_replaced(ours)
    # reading the attribute puts the plain weight back exactly; the next call replaces it again
    assert torch.equal(ours.weight, plain) and not _is_replaced(ours)
    with torch.no_grad(), ops.use_backend("cpu"), settings.override(cpu_bf16_math=math):
        assert torch.equal(ours(x), first) and _is_replaced(ours)


@pytest.mark.parametrize("kind,kw,shape", list(_layers()))
def test_every_way_of_reading_the_weight_restores_it(kind, kw, shape):
    ours, theirs, x = _build(kind, kw, shape, torch.bfloat16)
    plain = ours.weight.detach().clone()

    ours.pack_wider = True

    def packed(m):
        with torch.no_grad(), ops.use_backend("cpu"):
            out = [m(x) for _ in range(3)]
        assert _is_replaced(m)
        return out[-1]

    y = packed(ours)
    # pickling and deep copies carry the plain weight, never the opaque packed tensor
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert "_fd_pack" not in clone.__dict__ and torch.equal(clone.weight, plain)
        assert torch.equal(packed(clone), y)
    # eval, but a gradient wanted for the input (guidance by gradient): the plain weight serves the backward
    g = copy.deepcopy(ours)
    packed(g)
    xg = x.clone().requires_grad_()
    with ops.use_backend("cpu"):
        g(xg).float().sum().backward()
    assert not _is_replaced(g) and torch.equal(g.weight, plain) and torch.isfinite(xg.grad).all()
    # .to(): converts the real values
    packed(ours)
    ours.float()
    assert ours.weight.dtype == torch.float32 and torch.equal(ours.weight, plain.float()) and packed_bytes(ours) == 0
    ours.bfloat16()
    # load_state_dict into a packed layer
    packed(ours)
    new = {k: (v * -2 if k == "weight" else v) for k, v in theirs.state_dict().items()}
    ours.load_state_dict(new)
    assert torch.equal(ours.weight, plain * -2) and packed_bytes(ours) == 0
    ours.load_state_dict(theirs.state_dict())
    # train(): plain weight back, no packed copy, gradients as torch's layer gives them
    packed(ours)
    ours.train(), theirs.train()
    assert not _is_replaced(ours) and packed_bytes(ours) == 0 and torch.equal(ours._parameters["weight"], plain)
    ours.float(), theirs.float()
    xf = x.float().requires_grad_()
    ours(xf).square().sum().backward()
    xt = x.float().requires_grad_()
    theirs(xt).square().sum().backward()
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-4)


def test_lora_style_reassignment_and_restore_are_exact():
    """What LoRA fusing does (adapters/lora.py): keep ``weight.data``, assign a fused tensor, later assign the kept
    base back; through a packed layer each step must compute with exactly the weight assigned."""
    ours, theirs, x = _build("linear", dict(in_features=64, out_features=64), (2, 50, 64), torch.bfloat16)
    ours.pack_wider = True
    with torch.no_grad(), ops.use_backend("cpu"):
        base_out = [ours(x) for _ in range(3)][-1]
        assert _is_replaced(ours)
        base = ours.weight.data  # restores the plain weight
        delta = torch.randn(64, 64) * 0.1
        fused = (base.float() + delta).to(base.dtype)
        ours.weight.data = fused
        ours.__dict__.pop("_fd_pack", None)
        fused_out = [ours(x) for _ in range(3)]
        assert _is_replaced(ours)
        assert torch.equal(fused_out[0], fused_out[2])
        torch.testing.assert_close(fused_out[2], F.linear(x.float(), fused.float(), theirs.bias.float()).to(x.dtype),
                                   rtol=1.6e-2, atol=1e-2)
        ours.weight.data = base  # unfuse: the kept base tensor, bit-exact
        assert [torch.equal(ours(x), base_out) for _ in range(3)] == [True] * 3
        assert torch.equal(ours.weight, theirs.weight)


def test_another_input_shape_and_nchw_input():
    ours, theirs, x = _build("conv", CONVS[0][0], CONVS[0][1], torch.bfloat16)
    with torch.no_grad(), ops.use_backend("cpu"):
        [ours(x) for _ in range(2)]
        assert _is_replaced(ours)
        xs = torch.randn(1, 32, 5, 6).bfloat16().contiguous(memory_format=torch.channels_last)
        ref = ours.__class__(**CONVS[0][0]).bfloat16().eval()
        ref.load_state_dict(theirs.state_dict())
        ref.pack_policy = "off"
        assert torch.equal(ours(xs), ref(xs))  # another shape: plain weight back, packed again for that shape
        [ours(xs) for _ in range(2)]
        assert _is_replaced(ours)
        xn = x.contiguous()  # NCHW: the op takes the plain weight
        assert torch.equal(ours(xn), ref(xn)) and not _is_replaced(ours)


def test_autocast_keeps_the_plain_weight_and_matches_the_unpacked_call():
    ours, _, x = _build("linear", dict(in_features=64, out_features=256), (3, 64), torch.float32)
    ours.pack_wider = True  # the bf16-cast weight computed in fp32 on CPUs without native bf16 math
    with torch.no_grad(), ops.use_backend("cpu"), torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [ours(x) for _ in range(3)]
    assert outs[0].dtype == torch.bfloat16 and "_fd_pack" in ours.__dict__ and not _is_replaced(ours)
    assert torch.equal(outs[0], outs[2])  # the cached copy was made from the bf16-cast weight, as the op casts it


@pytest.mark.parametrize("policy", ["cache", "off"])
def test_policies(policy):
    ours, _, x = _build("conv", CONVS[0][0], CONVS[0][1], torch.bfloat16)
    ours.pack_policy = policy
    with torch.no_grad(), ops.use_backend("cpu"):
        outs = [ours(x) for _ in range(3)]
    assert torch.equal(outs[0], outs[2]) and not _is_replaced(ours)
    assert (packed_bytes(ours) > 0) == (policy == "cache")
    ours.pack_policy = "sometimes"
    with pytest.raises(ValueError, match="pack_policy must be one of"):
        ours(x)


def test_linear_pack_wider():
    """By default a Linear packs only when the packed copy has the weight's width: a bf16 weight computed in fp32
    (CPUs without native bf16 math) stays plain and converts per call; an fp32 one is packed."""
    for dtype, math in [(torch.bfloat16, "fp32"), (torch.float32, "fp32")] + [(torch.bfloat16, m) for m in MATHS[1:]]:
        ours, theirs, x = _build("linear", dict(in_features=64, out_features=64), (2, 50, 64), dtype)
        with torch.no_grad(), ops.use_backend("cpu"), settings.override(cpu_bf16_math=math):
            outs = [ours(x) for _ in range(3)]
        assert torch.equal(outs[0], outs[2])
        assert _is_replaced(ours) == (dtype == torch.float32 or math == "native"), (dtype, math)


def test_ema_update_after_packed_sampling():
    """The trainer samples its EMA model in eval mode (which replaces weights by packed copies), then writes the EMA
    parameters in place: restore_plain_weights gives back the exact weights, and the multi-tensor EMA lerp then
    equals the same lerp on a model that never packed (without the restore, the lerp writes into a placeholder)."""
    from fastdiff.models.unet2d import PRESETS, UNet2D
    from fastdiff.train.trainer import ema_update_

    torch.manual_seed(0)
    model = UNet2D(PRESETS["tiny"])
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    never = copy.deepcopy(ema)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        x, t, y = torch.randn(2, 1, 32, 32), torch.tensor([3, 700]), torch.tensor([1, 4])
        for _ in range(3):
            ema(x, t, y)
    assert packed_bytes(ema) > 0, "nothing packed: the test would not exercise the replaced weights"
    ops.restore_plain_weights(ema)
    assert packed_bytes(ema) == 0
    for a, b in zip(ema.state_dict().values(), never.state_dict().values()):
        assert torch.equal(a, b)
    ema_update_(ema.parameters(), model.parameters(), 0.9)
    ema_update_(never.parameters(), model.parameters(), 0.9)
    for a, b in zip(ema.parameters(), never.parameters()):
        assert torch.equal(a, b)
