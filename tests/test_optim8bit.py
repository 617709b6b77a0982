"""8-bit AdamW (fastdiff.train.optim).

Oracles: bitsandbytes (its dynamic code books, its CPU block-wise quantiser and its CPU AdamW8bit step, which
use blocks of 256), an independent fp64 simulation written here for blocks of 2048 (nearest code by brute force
over the code book), torch's AdamW for convergence, the storage of the real state for the byte count, and the
uninterrupted run for resume.
"""
import math

import pytest
import torch
from torch import nn

from fastdiff.io.datasets import load_sklearn_digits
from fastdiff.io.run_checkpoint import load_checkpoint
from fastdiff.train import TrainConfig, Trainer
from fastdiff.train.optim import AdamW8bit, dequantize_blockwise, dynamic_code, quantize_blockwise, state_bytes

torch.set_num_threads(1)


def _bnb():
    bnb = pytest.importorskip("bitsandbytes")
    return bnb


def test_code_books():
    for signed in (True, False):
        q = dynamic_code(signed)
        assert q.numel() == 256 and torch.equal(q, q.sort().values) and len(set(q.tolist())) == 256
        assert q.max() == 1.0 and (q == 0).sum() == 1
        pos = q[q > 0]
        # six decades below 1: the smallest magnitude is the midpoint of the first of 1 (signed) or 2 intervals
        # of [0.1, 1] at 1e-6
        assert math.isclose(float(pos.min()), 0.55e-6 if signed else 0.325e-6, rel_tol=1e-6)
        # dynamic resolution: the decade [0.1, 1) holds the most codes (64 signed, 128 unsigned)
        assert int(((pos >= 0.1) & (pos < 1)).sum()) == (64 if signed else 128)
        if signed:
            assert torch.equal(q[q < 0].flip(0), -pos[pos < 1])
    bnb = _bnb()
    for signed in (True, False):
        assert torch.equal(dynamic_code(signed), bnb.functional.create_dynamic_map(signed=signed))


@pytest.mark.parametrize("n", [256 * 7, 5000])
def test_quantize_matches_bitsandbytes(n):
    bnb = _bnb()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g) * torch.logspace(-6, 0, n)[torch.randperm(n, generator=g)]
    x[:256] = 0  # an all-zero block
    for signed, data in ((True, x), (False, x.abs())):
        codes, absmax = quantize_blockwise(data, signed=signed, block_size=256)
        ref_codes, ref_state = bnb.functional.quantize_blockwise(data, code=dynamic_code(signed), blocksize=256)
        torch.testing.assert_close(absmax, ref_state.absmax, rtol=0, atol=0)
        live = absmax.repeat_interleave(256)[:n] > 0
        assert (codes[~live] == int(torch.argmin(dynamic_code(signed).abs()))).all()   # a zero block: code of 0
        # fastdiff takes the nearest code everywhere; bitsandbytes' CPU quantiser agrees on the normalised values
        # above 1e-2 (where the moments that move a weight live) and picks coarser codes for some tiny ones
        q = dynamic_code(signed)
        xn = data / torch.where(absmax > 0, absmax, 1.0).repeat_interleave(256)[:n]
        err, ref_err = (q[codes.long()] - xn).abs(), (q[ref_codes.long()] - xn).abs()
        assert (err <= ref_err).all()
        big = live & (xn.abs() > 1e-2)
        assert (codes[big] != ref_codes[big]).float().mean() < 1e-2  # near-ties only: err <= ref_err above
        back = dequantize_blockwise(codes, absmax, signed=signed, block_size=256)
        ref_back = bnb.functional.dequantize_blockwise(ref_codes, ref_state)
        blocks = absmax.repeat_interleave(256)[:n]
        assert (back - ref_back).abs().max() <= (blocks * 0.9 / 64).max()


class _Net(nn.Module):
    """Tensors above and below the 4096-value threshold, and one whose size is no multiple of the block."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 96)        # 6144 weights: 8-bit, 24 blocks of 256; 96 biases: fp32 states
        self.b = nn.Linear(96, 50)        # 4800 weights: 8-bit, last block partial
        self.c = nn.Linear(50, 8)         # 400 weights: fp32 states

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _regression(seed=0, n=256):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=g)
    w = torch.randn(64, 8, generator=g) / 8
    return x, torch.sin(x @ w)


def _run(opt_fn, steps, seed=0):
    torch.manual_seed(seed)
    net = _Net()
    opt = opt_fn(net.parameters())
    x, y = _regression()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (net(x) - y).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return net, opt, losses


def test_step_matches_bitsandbytes_adamw8bit():
    bnb = _bnb()
    kw = dict(lr=3e-3, betas=(0.9, 0.99), weight_decay=0.01)
    # one step from zero moments: the same fp32 arithmetic (bitsandbytes' CPU path dequantises, updates in fp32
    # and requantises too), so the weights agree to fp32 rounding (measured <= 1.5e-8)
    net, opt, _ = _run(lambda p: AdamW8bit(p, **kw), 1)
    ref, ref_opt, _ = _run(lambda p: bnb.optim.AdamW8bit(p, **kw), 1)
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7, msg=name)
    st, ref_st = opt.state[net.a.weight], ref_opt.state[ref.a.weight]
    assert st["exp_avg_q"].dtype == torch.uint8 and st["exp_avg_q"].shape == net.a.weight.shape
    torch.testing.assert_close(st["exp_avg_absmax"], ref_st["absmax1"], rtol=1e-6, atol=0)
    torch.testing.assert_close(st["exp_avg_sq_absmax"], ref_st["absmax2"], rtol=1e-6, atol=0)
    # over 30 steps the two stored moments part where bitsandbytes' CPU quantiser picks a coarser code than the
    # nearest one for small normalised values (test_quantize_matches_bitsandbytes), which moves the weights of
    # elements with tiny second moments; the loss curves stay together (measured 2e-4 relative at step 30)
    _, _, losses = _run(lambda p: AdamW8bit(p, **kw), 30)
    _, _, ref_losses = _run(lambda p: bnb.optim.AdamW8bit(p, **kw), 30)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-3, atol=0)
    assert losses[-1] < 0.2 * losses[0]


def _nearest_fp64(x, code, block):
    """Brute-force quantise/dequantise in fp64: each value to the code nearest its normalised value."""
    flat = x.reshape(-1)
    out = torch.empty_like(flat)
    for s in range(0, flat.numel(), block):
        b = flat[s:s + block]
        amax = b.abs().max()
        if amax == 0:
            out[s:s + block] = 0
            continue
        idx = (b[:, None] / amax - code[None, :]).abs().argmin(1)
        out[s:s + block] = code[idx] * amax
    return out.view_as(x)


def test_block_2048_against_fp64_simulation():
    lr, (b1, b2), eps, wd, steps = 3e-3, (0.9, 0.999), 1e-8, 0.01, 15
    net, opt, _ = _run(lambda p: AdamW8bit(p, lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, block_size=2048),
                       steps)
    assert opt.state[net.a.weight]["exp_avg_absmax"].numel() == 3  # 6144 / 2048
    # the same run simulated in fp64: the moments stored through the code books, the rest exact
    torch.manual_seed(0)
    sim = _Net().double()
    x, y = _regression()
    x, y = x.double(), y.double()
    qs, qu = dynamic_code(True).double(), dynamic_code(False).double()
    m = {n: torch.zeros_like(p) for n, p in sim.named_parameters()}
    v = {n: torch.zeros_like(p) for n, p in sim.named_parameters()}
    for t in range(1, steps + 1):
        sim.zero_grad()
        (sim(x) - y).square().mean().backward()
        with torch.no_grad():
            for n, p in sim.named_parameters():
                m[n] = b1 * m[n] + (1 - b1) * p.grad
                v[n] = b2 * v[n] + (1 - b2) * p.grad ** 2
                p.mul_(1 - lr * wd)
                p.sub_(lr / (1 - b1 ** t) * m[n] / ((v[n] / (1 - b2 ** t)).sqrt() + eps))
                if p.numel() >= 4096:
                    m[n], v[n] = _nearest_fp64(m[n], qs, 2048), _nearest_fp64(v[n], qu, 2048)
    for (name, p), q in zip(net.named_parameters(), sim.parameters()):
        # fp32-state tensors: fp32 vs fp64 rounding only (measured <= 4e-6). 8-bit-state tensors: a value that
        # lands near a code midpoint rounds to either neighbour in fp32 vs fp64, and where the second moment is
        # tiny that code step moves the weight (measured <= 4.4e-4 after 15 steps of lr 3e-3; a wrong code book,
        # block size or update would be off by O(lr) per step on most elements)
        atol = 1e-3 if p.numel() >= 4096 else 1e-5
        torch.testing.assert_close(p.double(), q, rtol=0, atol=atol, msg=name)
    # the stored fp32 state dequantises to the simulation's quantised moments
    st = opt.state[net.a.weight]
    mq = dequantize_blockwise(st["exp_avg_q"], st["exp_avg_absmax"], signed=True, block_size=2048)
    assert (mq.double() - m["a.weight"]).abs().max() < 0.05 * m["a.weight"].abs().max()


def test_converges_like_adamw():
    kw = dict(lr=3e-3, betas=(0.9, 0.999), weight_decay=0.0)
    _, _, l8 = _run(lambda p: AdamW8bit(p, **kw), 300)
    _, _, l32 = _run(lambda p: torch.optim.AdamW(p, **kw), 300)
    assert l32[-1] < 0.05 * l32[0]                  # the problem is learnt ...
    assert l8[-1] < 0.05 * l8[0]                    # ... by the 8-bit optimizer too
    assert abs(math.log(l8[-1] / l32[-1])) < math.log(1.5), (l8[-1], l32[-1])


def test_state_bytes_are_the_real_storage():
    net, opt, _ = _run(lambda p: AdamW8bit(p), 1)
    for p in net.parameters():
        real = sum(v.untyped_storage().nbytes() for v in opt.state[p].values() if isinstance(v, torch.Tensor))
        assert real == state_bytes(p.numel()), tuple(p.shape)
    big = net.a.weight.numel()
    assert state_bytes(big) / big == 2 + 8 / 256                       # 2.03 bytes a parameter
    assert state_bytes(big, block_size=2048) == 2 * big + 8 * 3
    assert state_bytes(100) == 8 * 100                                 # fp32 AdamW's 8 bytes a parameter


def test_bad_arguments_are_clear():
    p = [nn.Parameter(torch.zeros(3))]
    for kw, msg in ((dict(lr=0), "lr must be positive"), (dict(betas=(0.9, 1.0)), "betas must be in"),
                    (dict(block_size=1), "block_size must be an integer >= 2")):
        with pytest.raises(ValueError, match=msg):
            AdamW8bit(p, **kw)


def test_trainer_resume_is_bit_exact_with_adamw8bit(tmp_path):
    digits = load_sklearn_digits(size=16)
    base = dict(model="tiny", dataset="digits", image_size=16, batch_size=8, log_every=2, sample_every=0,
                ckpt_every_steps=3, threads=1, warmup_steps=0, optimizer="adamw8bit", max_steps=6)

    def trainer(name, resume=False):
        return Trainer(TrainConfig(run_dir=str(tmp_path / name), **base), dataset=digits, resume=resume,
                       progress=False)

    a = trainer("a")
    assert isinstance(a.optimizer, AdamW8bit)
    full = a.run()
    first = trainer("b").run(max_steps=3)
    rest = trainer("b", resume=True).run()
    assert first + rest == full
    ma, _, oa, _ = load_checkpoint(tmp_path / "a")
    mb, _, ob, _ = load_checkpoint(tmp_path / "b")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    codes = [v for st in oa["state"].values() for k, v in st.items() if k.endswith("_q")]
    assert codes and all(c.dtype == torch.uint8 for c in codes)
    for i, st in oa["state"].items():
        for k, v in st.items():
            assert (torch.equal(v, ob["state"][i][k]) if isinstance(v, torch.Tensor) else v == ob["state"][i][k])
