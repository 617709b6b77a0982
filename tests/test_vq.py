"""The vector quantiser and VQ-VAE against closed forms and brute force.

Oracles: a brute-force argmin over explicit distances; the EMA formulas (van den Oord et al. 2017, appendix A.1)
worked by hand on a 2-code case; the perplexity of a uniform histogram (= K); the identity's gradient for the
straight-through estimator. The diffusers parity of the whole VQModel is in tests/test_ae_io.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from fastdiff.models.vq import PRESETS, TINY, VQConfig, VQModel, VectorQuantizer, codebook_perplexity


def _quantizer(k, d, **kw):
    torch.manual_seed(0)
    return VectorQuantizer(k, d, **kw)


@pytest.mark.parametrize("k,d,n", [(64, 4, 300), (7, 3, 50), (512, 8, 1000)])
def test_nearest_equals_bruteforce_argmin(k, d, n):
    q = _quantizer(k, d)
    g = torch.Generator().manual_seed(k)
    with torch.no_grad():
        q.embedding.weight.copy_(torch.randn(k, d, generator=g))
    z = torch.randn(n, d, generator=g) * 1.5
    # explicit differences in float64, not the |z|^2 - 2 z.e + |e|^2 expansion the quantiser uses
    brute = ((z.double()[:, None, :] - q.embedding.weight.double()[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(q.nearest(z), brute)
    # and through forward, on a (B, D, h, w) map
    zmap = z[: (n // 10) * 10].reshape(-1, 10, d).permute(0, 2, 1).reshape(-1, d, 2, 5)
    out = q.eval()(zmap)
    assert torch.equal(out.indices.flatten(), brute[: (n // 10) * 10])
    # z + (e - z) in floating point: the code up to one rounding
    torch.testing.assert_close(out.z_q, q.embedding.weight[out.indices].permute(0, 3, 1, 2))


def test_ema_update_hand_computed():
    d, eps = 0.5, 0.1
    q = VectorQuantizer(2, 2, decay=d, eps=eps, restart_after=None).train()
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        q.reset_ema()
    # three vectors: two nearest to code 0, one nearest to code 1
    z = torch.tensor([[0.1, 0.0], [0.2, 0.2], [0.9, 1.1]]).T.reshape(1, 2, 1, 3)
    out = q(z)
    assert out.indices.flatten().tolist() == [0, 0, 1]
    # N = d*1 + (1-d)*[2, 1] = [1.5, 1.0]; m0 = d*[0,0] + (1-d)*[0.3, 0.2]; m1 = d*[1,1] + (1-d)*[0.9, 1.1]
    n_ema = [1.5, 1.0]
    m0, m1 = [0.15, 0.10], [0.95, 1.05]
    total = 2.5
    smooth = [(n + eps) / (total + 2 * eps) * total for n in n_ema]  # [1.6/2.7*2.5, 1.1/2.7*2.5]
    want = torch.tensor([[m0[0] / smooth[0], m0[1] / smooth[0]], [m1[0] / smooth[1], m1[1] / smooth[1]]])
    torch.testing.assert_close(q.ema_cluster_size, torch.tensor(n_ema), rtol=0, atol=1e-7)
    torch.testing.assert_close(q.ema_embed_sum, torch.tensor([m0, m1]), rtol=0, atol=1e-7)
    torch.testing.assert_close(q.embedding.weight, want, rtol=1e-6, atol=1e-7)
    # the quantised output is the codebook before the update
    torch.testing.assert_close(out.z_q.flatten(2)[0].T, torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]))
    # eval mode leaves the codebook alone
    before = q.embedding.weight.clone()
    q.eval()(z)
    assert torch.equal(q.embedding.weight, before)


def test_perplexity_uniform_is_k_and_single_code_is_one():
    k = 16
    q = _quantizer(k, 2, restart_after=None).eval()
    with torch.no_grad():
        codes = torch.stack([torch.arange(k).float(), torch.zeros(k)], 1)
        q.embedding.weight.copy_(codes)
    z = codes.repeat(3, 1).T.reshape(1, 2, 3, k)  # every code exactly 3 times
    out = q(z)
    assert out.perplexity.item() == pytest.approx(k, rel=1e-6)
    assert out.usage.item() == 1.0
    one = q(torch.zeros(1, 2, 4, 4))
    assert one.perplexity.item() == pytest.approx(1.0, abs=1e-6)
    assert one.usage.item() == pytest.approx(1 / k)
    # a skewed histogram against exp(entropy) written out
    counts = torch.tensor([6, 2, 0, 0])
    p = [6 / 8, 2 / 8]
    assert codebook_perplexity(counts).item() == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)))


def test_straight_through_gradient_is_identity_and_losses_closed_form():
    q = _quantizer(8, 3, beta=0.3, ema=False, restart_after=None).train()
    z = torch.randn(2, 3, 4, 5, requires_grad=True)
    w = torch.randn(2, 3, 4, 5)
    out = q(z)
    (g,) = torch.autograd.grad((out.z_q * w).sum(), z)
    zi = z.detach().clone().requires_grad_(True)
    (g_identity,) = torch.autograd.grad((zi * w).sum(), zi)
    assert torch.equal(g, g_identity)
    # the forward value is the code itself
    zq = q.embedding.weight[out.indices].permute(0, 3, 1, 2)
    torch.testing.assert_close(out.z_q, zq.detach())
    mse = ((z.detach() - zq.detach()) ** 2).mean()
    torch.testing.assert_close(out.commitment_loss, 0.3 * mse)
    torch.testing.assert_close(out.codebook_loss, mse)
    # commitment pulls z only; the codebook loss moves the codebook only
    (gz,) = torch.autograd.grad(out.commitment_loss, z, retain_graph=True)
    torch.testing.assert_close(gz, 0.3 * 2 * (z.detach() - zq.detach()) / z.numel())
    (ge,) = torch.autograd.grad(out.codebook_loss, q.embedding.weight)
    assert ge.abs().sum() > 0


def test_ema_codebook_has_no_gradient_and_zero_codebook_loss():
    q = _quantizer(8, 3).train()
    assert not q.embedding.weight.requires_grad
    out = q(torch.randn(1, 3, 2, 2))
    assert out.codebook_loss.item() == 0.0


@pytest.mark.parametrize("ema", [False, True])
def test_restart_reseeds_exactly_the_dead_codes(ema):
    torch.manual_seed(0)
    q = VectorQuantizer(4, 2, ema=ema, decay=0.9, restart_after=2).train()
    with torch.no_grad():
        # codes 0 and 1 near the data, codes 2 and 3 far away: never chosen
        q.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [50.0, 50.0], [-50.0, 60.0]]))
        q.reset_ema()
    g = torch.Generator().manual_seed(1)
    batch = lambda: (torch.rand(2, 2, 3, 3, generator=g))  # noqa: E731 -- values in [0, 1): near codes 0 and 1
    q(batch())  # step 1: codes 2, 3 unused once
    assert q.steps_unused.tolist() == [0, 0, 1, 1]
    assert (q.embedding.weight[2:] - torch.tensor([[50.0, 50.0], [-50.0, 60.0]])).abs().max() < 0.01  # not re-seeded
    live_before = q.embedding.weight[:2].clone()
    z = batch()
    q(z)  # step 2: unused twice -> re-seeded from this batch
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    for k in (2, 3):
        hit = (flat == q.embedding.weight[k]).all(1)
        assert hit.any(), f"code {k} is not an encoder output of the batch"
    assert not torch.equal(q.embedding.weight[2], q.embedding.weight[3])  # distinct candidates
    assert q.steps_unused.tolist() == [0, 0, 0, 0]
    if ema:
        torch.testing.assert_close(q.ema_embed_sum[2:], q.embedding.weight[2:])
        assert q.ema_cluster_size[2:].tolist() == [1.0, 1.0]
    else:  # no EMA: the live codes are untouched by a restart
        assert torch.equal(q.embedding.weight[:2], live_before)


def test_vqmodel_shapes_roundtrip_and_errors():
    torch.manual_seed(0)
    m = VQModel(TINY).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    ze = m.encode(x)
    assert ze.shape == (2, TINY.vq_embed_dim, 8, 8)
    out = m(x)
    assert out.sample.shape == x.shape
    torch.testing.assert_close(m.decode(ze), out.sample)
    torch.testing.assert_close(m.decode_indices(out.quant.indices), out.sample)
    # quantize=False decodes the vectors as given
    torch.testing.assert_close(m.decode(out.quant.z_q, quantize=False), out.sample)
    # decode in training mode leaves the codebook alone; forward in training mode moves it (EMA)
    m.train()
    before = m.quantize.embedding.weight.clone()
    m.decode(ze)
    assert torch.equal(m.quantize.embedding.weight, before)
    m(x)
    assert not torch.equal(m.quantize.embedding.weight, before)
    m.eval()
    with pytest.raises(ValueError, match="multiples of 2"):
        m.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match="VQModel.decode expects"):
        m.decode(torch.zeros(1, 5, 8, 8))
    with pytest.raises(ValueError, match="decay"):
        VQConfig(decay=1.0)
    with pytest.raises(ValueError, match="unknown codebook"):
        TINY.with_codebook("k3")
    assert TINY.with_codebook("k512_d8").vq_embed_dim == 8
    assert set(PRESETS) >= {"tiny", "fashion_f4"}



def _ddp_worker(rank: int, world: int, port: int, out: str):
    import os

    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)  # the same initial codebook on every rank
        ema_only = VectorQuantizer(16, 3, decay=0.8, restart_after=None).train()
        torch.manual_seed(0)
        restarts = VectorQuantizer(16, 3, decay=0.8, restart_after=2).train()
        torch.manual_seed(1000 + rank)  # restart candidates differ per rank unless rank 0's are broadcast
        for step in range(4):
            z = _ddp_batch(step)[rank::world]  # this rank's shard of the global batch
            ema_only(z)
            restarts(z)
        torch.save({"ema_only": ema_only.state_dict(), "restarts": restarts.state_dict()}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _ddp_batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    return torch.randn(4, 3, 4, 4, generator=g) * 0.1


def test_ema_and_restarts_under_ddp_match_one_process(tmp_path):
    """Two gloo ranks with half the batch each end with one codebook: the single-process EMA of the whole
    batch (counts and sums all-reduced), and with restarts the same codebook on both ranks."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    torch.manual_seed(0)
    single = VectorQuantizer(16, 3, decay=0.8, restart_after=None).train()
    for step in range(4):
        single(_ddp_batch(step))
    for k, v in single.state_dict().items():
        torch.testing.assert_close(r0["ema_only"][k], v, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r1["ema_only"][k], v, rtol=1e-5, atol=1e-6)
    # restarts happened (the codebooks part from the EMA-only run), and both ranks re-seeded the same codes
    assert not torch.equal(r0["restarts"]["embedding.weight"], r0["ema_only"]["embedding.weight"])
    for k in r0["restarts"]:
        assert torch.equal(r0["restarts"][k], r1["restarts"][k]), k
