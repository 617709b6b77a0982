"""fastdiff.samplers against diffusers' schedulers, step by step.

What is compared, precisely:

- Schedules: betas bit-exact with diffusers (linear, scaled-linear, squaredcos_cap_v2); alphas_cumprod equal to
  the fp64 cumulative product of those betas, and within fp32 rounding of diffusers' fp32 product; the timesteps
  of every spacing bit-exact with each diffusers scheduler; sigmas (Euler, DPM, Karras, flow) to fp32 rounding.
- Trajectories: a deterministic fake network f(x, t) is run through diffusers' loop (set_timesteps,
  scale_model_input, step) and through the fastdiff sampler from the same unit noise; every intermediate state
  (callback) and every network input (x, t) must agree to fp32 precision. Stochastic samplers draw their noise
  from identically seeded generators in the same order and shape as diffusers' ``randn_tensor``.
- The oracle by default is diffusers' step math on an fp64 copy of its own schedule (betas from diffusers'
  recipe, zero-SNR rescale by diffusers' function, both in fp64): diffusers keeps alphas_cumprod in fp32, whose
  rounding (``1 - abar`` cancels near t = 0; the zero-SNR rescale cancels in ``1 - abar_t/abar_{t-1}``) makes
  sigmas differ by up to 1e-4 relative, which would otherwise hide step-math errors. The untouched diffusers
  schedulers are compared too, at the SD1 configuration, with the looser tolerance that rounding explains.
- Deliberate difference: fastdiff adds no noise at the last step; where diffusers would (DDIM with eta > 0 and
  ``set_alpha_to_one=False``), the oracle's last step gets ``variance_noise=0``.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

try:
    import diffusers
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        FlowMatchEulerDiscreteScheduler,
    )
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as d_rescale
except ImportError:  # the reference implementations are test extras: fastdiff's own tests still run
    diffusers = DDIMScheduler = DDPMScheduler = DPMSolverMultistepScheduler = d_rescale = None
    EulerAncestralDiscreteScheduler = EulerDiscreteScheduler = FlowMatchEulerDiscreteScheduler = None
needs_reference = pytest.mark.skipif(diffusers is None, reason="needs diffusers (the reference)")

import fastdiff.samplers as S
from fastdiff.samplers.sampling import _dpm_timesteps_sigmas, _euler_sigmas

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' numpy 2 __array__ notice

EPS32 = float(torch.finfo(torch.float32).eps)
BETAS = [("linear", "linear", {}), ("scaled_linear", "scaled_linear", dict(beta_start=0.00085, beta_end=0.012)),
         ("cosine", "squaredcos_cap_v2", {})]
DPRED = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
SHAPE = (2, 3, 8, 8)


def fake_net(x, t, cond=None):
    """A deterministic stand-in for a network: smooth in x and t, O(1) outputs, depends on t per sample."""
    tt = t.float().reshape(-1, *([1] * (x.dim() - 1)))
    return 0.8 * torch.tanh(x) + 0.2 * torch.sin(3 * x + tt / 150)


class Recorder:
    """Wraps fake_net and records every (x, t) it is called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond=None):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        self.calls.append((x.clone(), t.clone()))
        return fake_net(x, t, cond)


def noise(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def fp64_oracle(cls, **cfg):
    """diffusers scheduler ``cls(**cfg)`` with its schedule tensors recomputed in fp64 by diffusers' own recipe."""
    s = cls(**cfg)
    if cls is FlowMatchEulerDiscreteScheduler:
        return s
    zs = cfg.get("rescale_betas_zero_snr", False)
    base = cls(**{**cfg, "rescale_betas_zero_snr": False}).betas.double()  # bit-exact fp32 recipe, widened
    betas = d_rescale(base) if zs else base
    s.betas, s.alphas = betas, 1.0 - betas
    s.alphas_cumprod = torch.cumprod(s.alphas, 0)
    if zs and cls in (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler):
        s.alphas_cumprod[-1] = 2.0 ** -24  # what these schedulers do to keep sigma_max finite
    if cls is DDIMScheduler:
        s.final_alpha_cumprod = (torch.tensor(1.0, dtype=torch.float64) if s.config.set_alpha_to_one
                                 else s.alphas_cumprod[0])
    if cls is DPMSolverMultistepScheduler:
        s.alpha_t, s.sigma_t = s.alphas_cumprod.sqrt(), (1 - s.alphas_cumprod).sqrt()
        s.lambda_t = s.alpha_t.log() - s.sigma_t.log()
    return s


def run_diffusers(sched, x, steps, seed=None, step_kw=None, zero_last_noise=False):
    """The diffusers sampling loop as its pipelines write it; returns (states after each step, recorder)."""
    rec = Recorder()
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    sched.set_timesteps(steps)
    lat = x * getattr(sched, "init_noise_sigma", 1.0)
    states = []
    n = len(sched.timesteps)
    for i, t in enumerate(sched.timesteps):
        out = rec(sched.scale_model_input(lat, t) if hasattr(sched, "scale_model_input") else lat, t)
        kw = dict(step_kw or {})
        if zero_last_noise and i == n - 1:
            kw["variance_noise"] = torch.zeros_like(lat)
        elif seed is not None:
            kw["generator"] = gen
        lat = sched.step(out, t, lat, **kw).prev_sample
        states.append(lat.clone())
    return states, rec, float((x * getattr(sched, "init_noise_sigma", 1.0)).abs().max())


def run_fastdiff(fn, x, schedule, steps, prediction, seed=None, **kw):
    rec = Recorder()
    states, ts = [], []

    def cb(i, t, xx):
        assert i == len(states)
        states.append(xx.clone())
        ts.append(t)

    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    out = fn(S.Denoiser(rec, prediction), x, schedule, steps=steps, generator=gen, callback=cb, **kw)
    assert out is states[-1] or torch.equal(out, states[-1])
    return states, rec, ts


def assert_traj_close(got, ref, start_scale, rtol=1e-5, ulps=8, what=""):
    """Every state within fp32 precision: ``|got - ref| <= ulps * eps32 * M + rtol * |ref|``, M the largest
    magnitude of any state so far (an fp32 update's rounding is relative to the largest operand it touches,
    and that absolute error is carried into later, smaller states)."""
    assert len(got) == len(ref), f"{what}: {len(got)} steps vs diffusers' {len(ref)}"
    m = start_scale
    for i, (g, r) in enumerate(zip(got, ref)):
        m = max(m, float(r.abs().max()))
        assert g.dtype == r.dtype and g.shape == r.shape
        err = (g.double() - r.double()).abs()
        bound = ulps * EPS32 * m + rtol * r.double().abs()
        worst = float((err - bound).max())
        assert worst <= 0, (f"{what}: step {i}: max err {float(err.max()):.3g} exceeds the fp32 bound "
                            f"(running max |x| {m:.3g})")


def assert_inputs_close(got: Recorder, ref: Recorder, got_states, ref_states, what=""):
    """The network saw the same timesteps (to fp32 rounding) and the same inputs.

    The first input is the same noise times the same scale; later inputs are the previous state times the
    sampler's input scale (1 for VP samplers, 1/sqrt(sigma^2 + 1) for Euler), compared as that scale (states
    are compared separately, with the error they carry from large-sigma steps).
    """
    assert len(got.calls) == len(ref.calls), f"{what}: {len(got.calls)} network calls vs {len(ref.calls)}"
    for i, ((gx, gt), (rx, rt)) in enumerate(zip(got.calls, ref.calls)):
        assert torch.allclose(gt, rt, rtol=1e-6, atol=1e-4), f"{what}: call {i}: t {gt[0]} vs {rt[0]}"
        if i == 0:
            torch.testing.assert_close(gx, rx, rtol=2e-6, atol=0, msg=f"{what}: first network input")
        else:
            def scale(x_in, state):
                x_in, state = x_in.double(), state.double()
                return float((x_in * state).sum() / (state * state).sum())
            gs, rs = scale(gx, got_states[i - 1]), scale(rx, ref_states[i - 1])
            assert math.isclose(gs, rs, rel_tol=2e-6), f"{what}: call {i}: input scale {gs} vs diffusers {rs}"


def _sched(kind, zero_snr=False, **kw):
    return S.make_schedule(kind, zero_snr=zero_snr, **kw)


def _cfg(dkind, extra, prediction, spacing, zero_snr=False, **kw):
    return dict(beta_schedule=dkind, **extra, prediction_type=DPRED[prediction], timestep_spacing=spacing,
                rescale_betas_zero_snr=zero_snr, **kw)


# ------------------------------------------------------------------------------------------------------------
# Schedules.
# ------------------------------------------------------------------------------------------------------------

@needs_reference
@pytest.mark.parametrize("t", [1000, 37])
@pytest.mark.parametrize("kind,dkind,extra", BETAS)
def test_betas_bit_exact_and_cumprod_fp64(kind, dkind, extra, t):
    ours = S.make_schedule(kind, t, **extra)
    ref = DDPMScheduler(num_train_timesteps=t, beta_schedule=dkind, **extra)
    assert ours.betas.dtype == torch.float64 and ours.alphas_cumprod.dtype == torch.float64
    assert torch.equal(ours.betas.float(), ref.betas)
    assert torch.equal(ours.alphas_cumprod, torch.cumprod(1.0 - ref.betas.double(), 0))
    # diffusers' fp32 cumulative product drifts by its own rounding only (<= ~t/2 ulps measured: ~5e-7 rel).
    rel = (ref.alphas_cumprod.double() / ours.alphas_cumprod - 1).abs().max().item()
    assert rel < 2e-6, rel


@needs_reference
@pytest.mark.parametrize("kind,dkind,extra", BETAS)
def test_zero_terminal_snr(kind, dkind, extra):
    ours = S.make_schedule(kind, zero_snr=True, **extra)
    plain = S.make_schedule(kind, **extra)
    acp = ours.alphas_cumprod
    assert acp[-1].item() == 0.0 and ours.betas[-1].item() == 1.0  # SNR(T) = 0 (Lin et al., eq. 4 ff.)
    assert math.isclose(acp[0].item(), plain.alphas_cumprod[0].item(), rel_tol=1e-12)  # first abar kept
    assert bool((acp[1:] < acp[:-1]).all())
    # sqrt(abar) is an affine map of the original sqrt(abar) (Algorithm 1): check it directly.
    s0, s = plain.alphas_cumprod.sqrt(), acp.sqrt()
    want = (s0 - s0[-1]) * (s0[0] / (s0[0] - s0[-1]))
    assert torch.allclose(s, want, rtol=1e-12, atol=1e-15)
    # diffusers' function run in fp64 on diffusers' betas gives the same betas
    ref64 = d_rescale(DDPMScheduler(beta_schedule=dkind, **extra).betas.double())
    assert torch.allclose(ours.betas, ref64, rtol=1e-12, atol=1e-15)
    # Stock diffusers does the rescale in fp32, where shifting sqrt(abar) cancels: its sqrt(abar) is right to a
    # few ulp(1) in absolute terms (measured <= 3), which is all fp32 can promise for the small late values.
    stock = DDPMScheduler(beta_schedule=dkind, rescale_betas_zero_snr=True, **extra).alphas_cumprod.double()
    assert (stock.sqrt() - acp.sqrt()).abs().max().item() < 8 * EPS32


STEP_COUNTS = [1, 7, 10, 33, 50, 999, 1000]


@needs_reference
@pytest.mark.parametrize("spacing", S.SPACINGS)
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_bit_exact(spacing, offset):
    for steps in STEP_COUNTS:
        for cls, variant in [(DDPMScheduler, "ddim"), (DDIMScheduler, "ddim"), (EulerDiscreteScheduler, "euler"),
                             (EulerAncestralDiscreteScheduler, "euler"), (DPMSolverMultistepScheduler, "dpm")]:
            d = cls(timestep_spacing=spacing, steps_offset=offset)
            d.set_timesteps(steps)
            ours = S.spaced_timesteps(1000, steps, spacing, offset, variant=variant)
            want = d.timesteps.numpy()
            assert ours.dtype == want.dtype, (cls.__name__, ours.dtype, want.dtype)
            assert np.array_equal(ours, want), (cls.__name__, spacing, offset, steps)


def test_spacing_errors():
    with pytest.raises(ValueError, match="spacing"):
        S.spaced_timesteps(1000, 10, "uniform")
    with pytest.raises(ValueError, match="exceed"):
        S.spaced_timesteps(1000, 1001)
    with pytest.raises(ValueError, match="positive"):
        S.spaced_timesteps(1000, 0)
    with pytest.raises(ValueError, match="prediction"):
        S.normalize_prediction("noise")
    with pytest.raises(ValueError, match="beta schedule"):
        S.make_schedule("sigmoid")


@needs_reference
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("spacing", S.SPACINGS)
@pytest.mark.parametrize("kind,dkind,extra,zs", [b + (False,) for b in BETAS] + [("linear", "linear", {}, True)])
def test_sigmas_match_diffusers(kind, dkind, extra, zs, spacing, karras):
    sched = _sched(kind, zs, **extra)
    for steps in (4, 25):
        cfg = dict(beta_schedule=dkind, **extra, timestep_spacing=spacing, rescale_betas_zero_snr=zs,
                   use_karras_sigmas=karras)
        d = fp64_oracle(EulerDiscreteScheduler, **cfg)
        d.set_timesteps(steps)
        ts, sig, _ = _euler_sigmas(sched, steps, spacing, None, karras)
        np.testing.assert_allclose(sig, d.sigmas.double().numpy(), rtol=2 * EPS32, atol=0)
        np.testing.assert_allclose(ts.astype(np.float32), d.timesteps.numpy(), rtol=1e-6, atol=1e-4)
        d = fp64_oracle(DPMSolverMultistepScheduler, **cfg)
        d.set_timesteps(steps)
        ts, sig = _dpm_timesteps_sigmas(sched, steps, spacing, None, karras)
        np.testing.assert_allclose(sig, d.sigmas.double().numpy(), rtol=2 * EPS32, atol=0)
        assert np.array_equal(ts, d.timesteps.numpy())


@needs_reference
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_sigmas_match_diffusers(shift):
    for steps in (1, 4, 28, 50):
        d = FlowMatchEulerDiscreteScheduler(shift=shift)
        d.set_timesteps(steps)
        ours = S.FlowSchedule(shift=shift).sigmas(steps)
        np.testing.assert_allclose(ours, d.sigmas.double().numpy(), rtol=2 * EPS32, atol=1e-7)


@needs_reference
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_prediction_conversions(prediction):
    sched = S.linear_schedule()
    gen = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64), torch.randn(4, 3, 5, 5, generator=gen,
                                                                                         dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    xt = sched.add_noise(x0, eps, t)
    target = sched.target(prediction, x0, eps, t)
    a, s = sched.alpha_sigma(t)
    for i in range(4):
        got_x0 = S.to_x0(prediction, target[i], xt[i], a[i].item(), s[i].item())
        got_eps = S.to_eps(prediction, target[i], xt[i], a[i].item(), s[i].item())
        assert torch.allclose(got_x0, x0[i], atol=1e-9 / max(a[i].item(), 1e-3))
        assert torch.allclose(got_eps, eps[i], atol=1e-9 / max(s[i].item(), 1e-3))
    # diffusers in fp32: at t = 0, 1 - abar = 1e-4 cancels, so its sqrt(1 - abar) = 0.01 is off by up to
    # eps32 / (2 * 0.01) ~ 6e-6 (relative to the noise, |noise| < 5 here).
    ref = DDPMScheduler()
    x32, e32 = x0.float(), eps.float()
    tol = dict(rtol=1e-5, atol=5 * EPS32 / (2 * 0.01) * 5)
    torch.testing.assert_close(sched.add_noise(x32, e32, t), ref.add_noise(x32, e32, t), **tol)
    if prediction == "v":
        torch.testing.assert_close(sched.target("v", x32, e32, t), ref.get_velocity(x32, e32, t), **tol)


def test_flow_conversions():
    fs = S.FlowSchedule(shift=3.0)
    gen = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64), torch.randn(3, 2, 4, 4, generator=gen,
                                                                                         dtype=torch.float64)
    sig = torch.tensor([0.1, 0.5, 0.97], dtype=torch.float64)
    xt = fs.add_noise(x0, eps, sig)
    v = fs.target(x0, eps)
    for i in range(3):
        s = sig[i].item()
        assert torch.allclose(S.to_x0("flow", v[i], xt[i], 1 - s, s), x0[i], atol=1e-12)
        assert torch.allclose(S.to_eps("flow", v[i], xt[i], 1 - s, s), eps[i], atol=1e-12)


# ------------------------------------------------------------------------------------------------------------
# Trajectories, step by step.
# ------------------------------------------------------------------------------------------------------------

def _check(fn, dcls, kind, zs, prediction, spacing, steps, seed=None, fkw=None, dcfg=None, step_kw=None,
           zero_last=False, stock=False, rtol=1e-5, final_tol=1e-4):
    dkind, extra = {k: (dk, e) for k, dk, e in BETAS}[kind]
    cfg = _cfg(dkind, extra, prediction, spacing, zs, **(dcfg or {}))
    dsched = dcls(**cfg) if stock else fp64_oracle(dcls, **cfg)
    x = noise()
    ref, rrec, start = run_diffusers(dsched, x, steps, seed, step_kw, zero_last)
    got, grec, ts = run_fastdiff(fn, x, _sched(kind, zs, **extra), steps, prediction, seed,
                                 spacing=spacing, **(fkw or {}))
    what = f"{fn.__name__} {kind} zs={zs} {prediction} {spacing} steps={steps} {fkw or ''}"
    assert_traj_close(got, ref, start, rtol=rtol, what=what)
    # and, independent of the large-sigma rounding budget above, the final sample to 1e-4 of its scale
    fin = float((got[-1] - ref[-1]).abs().max()) / max(1.0, float(ref[-1].abs().max()))
    assert fin <= final_tol, f"{what}: final sample off by {fin:.3g} of its scale"
    assert_inputs_close(grec, rrec, got, ref, what)
    np.testing.assert_allclose(np.float32(ts), dsched.timesteps.numpy().astype(np.float32), rtol=1e-6, atol=1e-4)


GRID = list(itertools.product(["linear", "scaled_linear", "cosine"], S.SPACINGS, ["eps", "v", "x0"]))


@needs_reference
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("kind,spacing,prediction", GRID)
def test_ddpm_matches_diffusers(kind, spacing, prediction, clip):
    _check(S.sample_ddpm, DDPMScheduler, kind, False, prediction, spacing, 10, seed=7,
           fkw=dict(clip=1.0 if clip else None), dcfg=dict(clip_sample=clip, variance_type="fixed_small"))


@needs_reference
@pytest.mark.parametrize("spacing", S.SPACINGS)
def test_ddpm_zero_snr_and_offset(spacing):
    _check(S.sample_ddpm, DDPMScheduler, "linear", True, "v", spacing, 20, seed=1, dcfg=dict(clip_sample=False))
    _check(S.sample_ddpm, DDPMScheduler, "scaled_linear", False, "eps", spacing, 20, seed=2,
           fkw=dict(steps_offset=1), dcfg=dict(clip_sample=False, steps_offset=1))


@needs_reference
def test_ddpm_full_chain():
    """The original 1000-step ancestral chain (Ho et al.: linear betas, clipped x0)."""
    _check(S.sample_ddpm, DDPMScheduler, "linear", False, "eps", "leading", 1000, seed=0,
           fkw=dict(clip=1.0), dcfg=dict(clip_sample=True))


@needs_reference
@pytest.mark.parametrize("eta,clip", [(0.0, False), (0.0, True), (0.5, False), (1.0, True)])
@pytest.mark.parametrize("kind,spacing,prediction", GRID)
def test_ddim_matches_diffusers(kind, spacing, prediction, eta, clip):
    _check(S.sample_ddim, DDIMScheduler, kind, False, prediction, spacing, 10, seed=3,
           fkw=dict(eta=eta, clip=1.0 if clip else None), dcfg=dict(clip_sample=clip), step_kw=dict(eta=eta))


@needs_reference
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("spacing", S.SPACINGS)
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_alpha_to_one_zero_snr_offset(spacing, eta, set_alpha_to_one):
    common = dict(fkw=dict(eta=eta, set_alpha_to_one=set_alpha_to_one), step_kw=dict(eta=eta),
                  zero_last=eta > 0 and not set_alpha_to_one)
    _check(S.sample_ddim, DDIMScheduler, "scaled_linear", False, "eps", spacing, 25, seed=4,
           dcfg=dict(clip_sample=False, set_alpha_to_one=set_alpha_to_one, steps_offset=1),
           **{**common, "fkw": dict(common["fkw"], steps_offset=1)})
    _check(S.sample_ddim, DDIMScheduler, "cosine", True, "v", spacing, 25, seed=5,
           dcfg=dict(clip_sample=False, set_alpha_to_one=set_alpha_to_one), **common)


# The cosine schedule starts at sigma ~ 2e4 (abar_999 ~ 2.4e-9) for the spacings that include t = 999. diffusers'
# fp32 update ``x + (x - x0) / sigma * dt`` then cancels two ~8e4-sized terms to produce a state of size ~sigma',
# losing ~1e-2 absolute in the first step; that reaches the final sample at ~2e-4 of its scale.
# test_euler_large_sigma_fp64 shows it is diffusers' rounding: fastdiff is the closer of the two to fp64 math.
LARGE_SIGMA_FINAL_TOL = 5e-4


@needs_reference
@pytest.mark.parametrize("kind,spacing,prediction", GRID)
def test_euler_matches_diffusers(kind, spacing, prediction):
    large = kind == "cosine" and spacing != "leading"
    _check(S.sample_euler, EulerDiscreteScheduler, kind, False, prediction, spacing, 12,
           final_tol=LARGE_SIGMA_FINAL_TOL if large else 1e-4)


def _euler_fp64(x, sigmas, timesteps, prediction):
    """Karras Alg. 1 (churn 0) in fp64 on fake_net, written from the paper: the precision oracle."""
    x = x.double() * float(sigmas[0])
    for i, t in enumerate(timesteps):
        s, s1 = float(sigmas[i]), float(sigmas[i + 1])
        c_in = 1 / math.sqrt(s * s + 1)
        m = fake_net(x * c_in, torch.full((x.shape[0],), float(np.float32(t)), dtype=torch.float64))
        x0 = {"eps": x - s * m, "x0": m, "v": x * c_in * c_in - s * c_in * m}[prediction]
        x = x + (x - x0) / s * (s1 - s)
    return x


@needs_reference
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_euler_large_sigma_fp64(spacing, prediction):
    """Where fastdiff and diffusers differ beyond 1e-4 (sigma_max ~ 2e4), fastdiff is the more accurate one."""
    x = noise()
    d = fp64_oracle(EulerDiscreteScheduler, beta_schedule="squaredcos_cap_v2", timestep_spacing=spacing,
                    prediction_type=DPRED[prediction])
    ref32, _, _ = run_diffusers(d, x, 12)
    got, _, _ = run_fastdiff(S.sample_euler, x, S.cosine_schedule(), 12, prediction, spacing=spacing)
    ts, sig, _ = _euler_sigmas(S.cosine_schedule(), 12, spacing, None, False)
    exact = _euler_fp64(x, sig, ts, prediction)
    scale = float(exact.abs().max())
    e_fd = float((got[-1].double() - exact).abs().max()) / scale
    e_df = float((ref32[-1].double() - exact).abs().max()) / scale
    assert e_fd <= 2e-6, e_fd
    assert e_fd <= max(e_df, 4 * EPS32), (e_fd, e_df)  # never less accurate than diffusers beyond rounding
    print(f"fp64 oracle: fastdiff {e_fd:.2g}, diffusers {e_df:.2g}")


@needs_reference
@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
@pytest.mark.parametrize("spacing", S.SPACINGS)
def test_euler_karras_and_zero_snr(kind, spacing):
    _check(S.sample_euler, EulerDiscreteScheduler, kind, False, "eps", spacing, 15, fkw=dict(karras=True),
           dcfg=dict(use_karras_sigmas=True))
    _check(S.sample_euler, EulerDiscreteScheduler, kind, True, "v", spacing, 15)


@needs_reference
@pytest.mark.parametrize("kind,spacing,prediction", [g for g in GRID if g[2] != "x0"])
def test_euler_ancestral_matches_diffusers(kind, spacing, prediction):
    _check(S.sample_euler_ancestral, EulerAncestralDiscreteScheduler, kind, False, prediction, spacing, 12, seed=9)


@needs_reference
@pytest.mark.parametrize("spacing", S.SPACINGS)
def test_euler_ancestral_zero_snr(spacing):
    _check(S.sample_euler_ancestral, EulerAncestralDiscreteScheduler, "scaled_linear", True, "v", spacing, 15,
           seed=10)


@needs_reference
@pytest.mark.parametrize("kind,spacing,prediction", GRID)
def test_dpmpp_2m_matches_diffusers(kind, spacing, prediction):
    _check(S.sample_dpmpp_2m, DPMSolverMultistepScheduler, kind, False, prediction, spacing, 10)


@needs_reference
@pytest.mark.parametrize("steps", [1, 2, 3, 20])
@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "cosine"])
def test_dpmpp_2m_karras_zero_snr_steps(kind, steps):
    _check(S.sample_dpmpp_2m, DPMSolverMultistepScheduler, kind, False, "eps", "linspace", steps,
           fkw=dict(karras=True), dcfg=dict(use_karras_sigmas=True))
    _check(S.sample_dpmpp_2m, DPMSolverMultistepScheduler, kind, True, "v", "trailing", steps)
    _check(S.sample_dpmpp_2m, DPMSolverMultistepScheduler, kind, False, "eps", "leading", steps,
           fkw=dict(steps_offset=1), dcfg=dict(steps_offset=1))


@needs_reference
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 5, 28])
def test_flow_euler_matches_diffusers(shift, steps):
    x = noise()
    d = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref, rrec, start = run_diffusers(d, x, steps)
    got, grec, _ = run_fastdiff(S.sample_flow_euler, x, S.FlowSchedule(shift=shift), steps, "flow")
    assert_traj_close(got, ref, start, what=f"flow shift={shift} steps={steps}")
    assert_inputs_close(grec, rrec, got, ref, "flow")


@needs_reference
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [4, 28])
def test_flow_euler_steps_between_the_timesteps_it_shows(shift, steps, monkeypatch):
    """The flow Euler step sizes are differences of diffusers' fp32 sigmas, the same points whose T * s the
    network is given as its timestep. (Steps between the unrounded fp64 sigmas would drift off those points by up
    to half an fp32 ulp of s per step, the same way for every latent: below what an fp32 trajectory resolves,
    so the step sizes are read where the sampler hands them to the step op.)"""
    d = FlowMatchEulerDiscreteScheduler(shift=shift)
    d.set_timesteps(steps)
    points = d.sigmas.double().tolist()  # fp32 values, exact in fp64
    sizes, seen = [], []
    step_op = S.sampling.sampler_step

    def spy(x, m, a, b, *args, **kw):
        sizes.append(a)
        return step_op(x, m, a, b, *args, **kw)

    def net(x, t, cond=None):
        seen.append(t.double().reshape(-1)[0].item())
        return fake_net(x, t)

    monkeypatch.setattr(S.sampling, "sampler_step", spy)
    S.sample_flow_euler(S.Denoiser(net, "flow"), noise(), S.FlowSchedule(shift=shift), steps=steps)
    assert sizes == [points[i + 1] - points[i] for i in range(steps)]
    assert seen == d.timesteps.double().tolist()


@needs_reference
@pytest.mark.parametrize("name,dcls,fkw", [
    ("ddpm", DDPMScheduler, {}), ("ddim", DDIMScheduler, {}), ("euler", EulerDiscreteScheduler, {}),
    ("euler_a", EulerAncestralDiscreteScheduler, {}), ("dpmpp_2m", DPMSolverMultistepScheduler, {})])
def test_sd1_config_against_stock_diffusers(name, dcls, fkw):
    """The untouched diffusers schedulers (fp32 alphas_cumprod) at SD1's scheduler config.

    Tolerance 1e-4 relative: diffusers' fp32 sigma at t = 1 carries ~1e-4 relative error (``1 - abar``
    cancels), and that is the size of the difference it makes to a trajectory.
    """
    sched = S.scaled_linear_schedule(spacing="leading", steps_offset=1)
    x = noise()
    d = dcls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading",
             steps_offset=1, **({"clip_sample": False} if dcls in (DDPMScheduler, DDIMScheduler) else {}),
             **({"set_alpha_to_one": False} if dcls is DDIMScheduler else {}))
    ref, rrec, start = run_diffusers(d, x, 20, seed=0)
    kw = dict(set_alpha_to_one=False) if name == "ddim" else {}
    got, grec, _ = run_fastdiff(S.SAMPLERS[name], x, sched, 20, "eps", seed=0, **kw, **fkw)
    assert_traj_close(got, ref, start, rtol=1e-4, what=f"stock {name}")


# ------------------------------------------------------------------------------------------------------------
# Classifier-free guidance, the model wrapper, errors.
# ------------------------------------------------------------------------------------------------------------

def cond_net(calls):
    def net(x, t, cond):
        calls.append((x.shape[0], None if cond is None else cond.clone()))
        c = cond.float().reshape(-1, *([1] * (x.dim() - 1)))
        return fake_net(x, t) + 0.3 * torch.cos(c + x)
    return net


CFG_CASES = [("ddpm", {}), ("ddpm", dict(clip=1.0)), ("ddim", dict(eta=0.5)), ("ddim", dict(clip=1.0)),
             ("ddim", dict(eta=1.0, clip=1.0)), ("euler", {}), ("euler_a", {}), ("dpmpp_2m", {}),
             ("flow_euler", {})]


@pytest.mark.parametrize("name,kw", CFG_CASES)
def test_cfg_one_batched_forward_equals_two_passes(name, kw):
    """guidance g in one batched forward == u + g (c - u) from two separate unbatched forwards."""
    g = 4.5
    cond, uncond = torch.tensor([1, 2]), torch.tensor([0])  # uncond of batch 1 broadcasts
    sched = S.FlowSchedule(shift=3.0) if name == "flow_euler" else S.linear_schedule()
    pred = "flow" if name == "flow_euler" else ("eps" if "clip" in kw else "v")
    calls = []
    batched = S.SAMPLERS[name](S.Denoiser(cond_net(calls), pred), noise(), sched, steps=8, cond=cond,
                               uncond=uncond, guidance=g, generator=torch.Generator().manual_seed(0), **kw)
    assert len(calls) == 8 and all(b == 2 * SHAPE[0] for b, _ in calls)  # one forward per step, batch 2B
    assert torch.equal(calls[0][1], torch.tensor([0, 0, 1, 2]))  # cat([uncond, cond])

    two = []
    net = cond_net(two)

    def two_pass(x, t, c):
        u = net(x, t, torch.zeros_like(c))
        cc = net(x, t, c)
        return u + g * (cc - u)

    separate = S.SAMPLERS[name](S.Denoiser(two_pass, pred), noise(), sched, steps=8, cond=cond,
                                generator=torch.Generator().manual_seed(0), **kw)
    assert len(two) == 16 and all(b == SHAPE[0] for b, _ in two)
    torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-5)


def test_guidance_one_is_conditional():
    calls = []
    sched = S.linear_schedule()
    a = S.sample_ddim(S.Denoiser(cond_net(calls), "eps"), noise(), sched, steps=5, cond=torch.tensor([1, 2]),
                      uncond=torch.tensor([0, 0]), guidance=1.0)
    assert all(b == SHAPE[0] for b, _ in calls)
    b = S.sample_ddim(S.Denoiser(cond_net([]), "eps"), noise(), sched, steps=5, cond=torch.tensor([1, 2]))
    assert torch.equal(a, b)


def test_cat_cond_structures():
    c = {"emb": torch.ones(2, 3), "pooled": (torch.ones(2, 4), torch.ones(2, 1))}
    u = {"emb": torch.zeros(1, 3), "pooled": (torch.zeros(2, 4), torch.zeros(2, 1))}
    out = S.cat_cond(u, c)
    assert out["emb"].shape == (4, 3) and out["emb"][:2].sum() == 0 and out["emb"][2:].sum() == 6
    assert out["pooled"][0].shape == (4, 4) and isinstance(out["pooled"], tuple)
    with pytest.raises(ValueError, match="keys"):
        S.cat_cond({"emb": torch.zeros(2, 3)}, c)
    with pytest.raises(ValueError, match="beyond the batch"):
        S.cat_cond(torch.zeros(2, 5), torch.zeros(2, 3))


def test_bf16_network_keeps_fp32_state():
    """Denoiser(dtype=bf16) runs the network in bf16 and casts its output back; the sampler state stays fp32.
    Oracle: the same sampler on an fp32 network that rounds its input and output through bf16 itself."""
    seen = []

    def net(x, t, cond):
        seen.append(x.dtype)
        return fake_net(x.float(), t).to(x.dtype)

    def emulated(x, t, cond):
        return fake_net(x.bfloat16().float(), t).bfloat16().float()

    out = S.sample_dpmpp_2m(S.Denoiser(net, "eps", dtype=torch.bfloat16), noise(), S.linear_schedule(), steps=6)
    ref = S.sample_dpmpp_2m(S.Denoiser(emulated, "eps"), noise(), S.linear_schedule(), steps=6)
    assert set(seen) == {torch.bfloat16} and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_no_noise_at_last_step():
    """The final ancestral step must be deterministic given the state before it."""
    sched = S.linear_schedule()
    for fn, kw in [(S.sample_ddpm, {}), (S.sample_ddim, dict(eta=1.0, set_alpha_to_one=False)),
                   (S.sample_euler_ancestral, {})]:
        outs = [fn(S.Denoiser(fake_net, "eps"), noise(), sched, steps=1, generator=torch.Generator().manual_seed(s),
                   **kw) for s in (0, 1)]
        assert torch.equal(outs[0], outs[1]), fn.__name__


def test_generator_list_matches_per_sample_draws():
    sched = S.linear_schedule()
    x = noise()
    both = S.sample_ddpm(S.Denoiser(fake_net, "eps"), x, sched, steps=5,
                         generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)])
    one = S.sample_ddpm(S.Denoiser(fake_net, "eps"), x[1:], sched, steps=5,
                        generator=[torch.Generator().manual_seed(1)])
    torch.testing.assert_close(both[1:], one, rtol=0, atol=0)


def test_errors():
    sched = S.linear_schedule()
    m = S.Denoiser(fake_net, "eps")
    with pytest.raises(ValueError, match="uncond"):
        S.sample_ddim(m, noise(), sched, steps=4, cond=torch.tensor([1, 2]), guidance=3.0)
    with pytest.raises(TypeError, match="FlowSchedule"):
        S.sample_flow_euler(m, noise(), sched, steps=4)
    with pytest.raises(TypeError, match="sample_flow_euler"):
        S.sample_euler(m, noise(), S.FlowSchedule(), steps=4)
    with pytest.raises(ValueError, match="exceed"):
        S.sample_ddpm(m, noise(), sched, steps=1001)
    with pytest.raises(ValueError, match="zero-SNR"):
        S.sample_ddim(m, noise(), S.linear_schedule(zero_snr=True), steps=4, spacing="trailing")
    with pytest.raises(ValueError, match="outside"):
        S.sample_ddim(m, noise(), S.linear_schedule(steps_offset=1), steps=1000)
    with pytest.raises(ValueError, match="unknown sampler"):
        S.get_sampler("plms")
    with pytest.raises(ValueError, match="shape"):
        S.sample_ddim(S.Denoiser(lambda x, t, c: x[:, :1], "eps"), noise(), sched, steps=2)


def test_registry_and_signature():
    import inspect
    assert set(S.SAMPLERS) == {"ddpm", "ddim", "euler", "euler_a", "dpmpp_2m", "flow_euler"}
    for name, fn in S.SAMPLERS.items():
        params = inspect.signature(fn).parameters
        assert list(params)[:3] == ["model", "x", "schedule"], name
        for k in ("steps", "cond", "uncond", "guidance", "generator", "callback"):
            assert params[k].kind is inspect.Parameter.KEYWORD_ONLY, (name, k)


@needs_reference
def test_schedule_from_diffusers_config():
    sd1 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
           "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False,
           "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
    s = S.NoiseSchedule.from_diffusers_config(sd1)
    d = DDIMScheduler.from_config(sd1)
    assert s.kind == "scaled_linear" and s.spacing is None and s.steps_offset == 1
    assert torch.equal(s.betas.float(), d.betas)
    d.set_timesteps(50)
    assert np.array_equal(s.timesteps(50), d.timesteps.numpy())  # leading (DDIM default) + offset 1
    zs = {"beta_schedule": "linear", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    s = S.NoiseSchedule.from_diffusers_config(zs)
    assert s.zero_snr and s.spacing == "trailing" and s.alphas_cumprod[-1].item() == 0.0
    d = DDIMScheduler.from_config(zs)
    d.set_timesteps(10)
    assert np.array_equal(s.timesteps(10), d.timesteps.numpy())


@pytest.mark.parametrize("name", sorted(S.SAMPLERS))
def test_driver_start_keep_callback_for_every_sampler(name):
    """The one driver gives every sampler the same run: steps start..n-1 each call back once, in order; a keep
    mask of ones changes nothing, a mask of zeros returns the original exactly (it is blended in after the last
    step at its clean level); unknown arguments are refused by name."""
    fn = S.SAMPLERS[name]
    sched = S.FlowSchedule(shift=3.0) if name == "flow_euler" else S.linear_schedule()
    model = S.Denoiser(fake_net, "flow" if name == "flow_euler" else "eps")
    kw = dict(steps=6, generator=torch.Generator().manual_seed(1))
    seen = []
    plain = fn(model, noise(), sched, **kw)
    x0 = 0.5 * noise(2)
    part = fn(model, noise(), sched, init=x0, start=2, callback=lambda i, t, x: seen.append(i), **dict(
        kw, generator=torch.Generator().manual_seed(1)))
    assert seen == [2, 3, 4, 5] and torch.isfinite(part).all()
    ones = fn(model, noise(), sched, keep=(x0, noise(3), torch.ones(1, 1, 8, 8)),
              **dict(kw, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(ones, plain)
    zeros = fn(model, noise(), sched, keep=(x0, noise(3), torch.zeros(1, 1, 8, 8)),
               **dict(kw, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(zeros, x0)
    with pytest.raises(TypeError, match="unknown sampler argument.*bogus"):
        fn(model, noise(), sched, bogus=1, **kw)
