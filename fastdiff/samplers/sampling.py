"""Samplers: each a plan of noise levels and a short step rule, run by one driver; each matches the diffusers
scheduler of the same name.

    sample_xxx(model, x, schedule, *, steps, <the sampler's own options>, cond=None, uncond=None, guidance=None,
               generator=None, callback=None, init=None, start=0, keep=None, progress=False) -> sample

The arguments every sampler takes (the driver's, :func:`_run`):

- ``model``: a :class:`~fastdiff.samplers.model.Denoiser` (or a bare eps/flow network), see model.py.
- ``x``: standard normal noise of the output's shape. Samplers that work in sigma space scale it themselves
  (Euler: ``x * sigma_max``), so every sampler starts from the same tensor a user draws.
- ``schedule``: a :class:`NoiseSchedule` (DDPM, DDIM, Euler, Euler a, DPM++ 2M) or :class:`FlowSchedule`;
  its sampling settings (spacing, DDPM/DDIM's x0 clamp, DDIM's final alpha) are the defaults of the options.
- ``guidance``: classifier-free guidance scale with ``uncond`` the null conditioning; ONE batched forward
  per step, guidance fused into the update.
- ``generator``: a ``torch.Generator`` (or a list, one per sample, as diffusers) for the sampler's own noise.
  Noise is drawn in the same order and shape as diffusers draws it, so a seeded run reproduces diffusers.
- ``callback(i, t, x)``: after step ``i`` (timestep ``t``) with the new state, in the parameterisation of the
  matching diffusers scheduler (sigma-scaled for Euler samplers). ``progress``: a progress bar over the steps
  that run.
- img2img: ``init`` = the clean sample x0 and ``start`` = the first step to run; ``x`` is then the noise, and
  the state starts as ``init`` noised to step ``start``'s level by that scheduler's own ``add_noise``
  (diffusers' img2img: ``timesteps[t_start:]``, ``add_noise(init, noise, timesteps[t_start])``).
- inpainting by mask blending: ``keep=(x0, noise, mask)``; after every step the state outside the mask (mask 0)
  is replaced by ``x0`` noised with ``noise`` to the next step's level (the clean ``x0`` after the last step), as
  diffusers' StableDiffusionInpaintPipeline does for 4-channel UNets.

A plan (:class:`_Plan`) holds what the driver needs of the noise levels: the timesteps the network sees, the
scaling of the state before the network call, and how a clean sample is noised to step ``j``'s level (for
img2img and the keep blend). A step rule ``step(i, x, m, g) -> x'`` turns the network output ``m`` (guided with
scale ``g``) into the next state; like k-diffusion's samplers it is the only part that differs between samplers.

Every one-step update is ``out = a * x0 + b * x + s * noise`` with ``x0`` linear in (x, model output); the
coefficients are derived in fp64 and the update runs through :func:`fastdiff.ops.sampler_step` (fused CFG +
prediction + update, one pass). No noise is added at the last step.
"""
from __future__ import annotations

import abc

import inspect
import math
from typing import Any, Callable

import numpy as np
import torch

from fastdiff.ops import sampler_step
from fastdiff.samplers.model import as_denoiser, guided_forward
from fastdiff.samplers.schedules import (
    FlowSchedule,
    NoiseSchedule,
    eps_coefs,
    karras_sigmas,
    x0_coefs,
    _sigma_to_t,
)

__all__ = [
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_flow_euler",
]

Callback = Callable[[int, float, torch.Tensor], Any]
Step = Callable[[int, torch.Tensor, torch.Tensor, "float | None"], torch.Tensor]


# --------------------------------------------------------------------------------------------------------------
# Plans: the noise levels of a run, and how a clean sample is noised to each.
# --------------------------------------------------------------------------------------------------------------

class _Plan(abc.ABC):
    """The timesteps of a sampling run and its noise levels, in one sampler's parameterisation of the state.
    Each sampler family's plan says how a clean sample is noised to its levels (:meth:`noised`)."""

    def __init__(self, timesteps) -> None:
        self.timesteps = list(timesteps)  # what the network sees at step i (python numbers)

    def __len__(self) -> int:
        return len(self.timesteps)

    def initial(self, noise: torch.Tensor) -> torch.Tensor:
        """The state before the first step of a run from pure noise."""
        return noise

    def model_input(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """What the network sees of the state at step ``i``."""
        return x

    @abc.abstractmethod
    def noised(self, x0: torch.Tensor, noise: torch.Tensor, j: int) -> torch.Tensor:
        """The clean ``x0`` noised with ``noise`` to the level step ``j`` starts from (``x0`` itself after the
        last step): the matching diffusers scheduler's ``add_noise`` at ``timesteps[j]``."""


class _VPPlan(_Plan):
    """DDPM / DDIM: the state is the VP sample ``sqrt(abar) x0 + sqrt(1 - abar) eps`` the network was trained on."""

    def __init__(self, timesteps, alphas_cumprod: list[float]) -> None:
        super().__init__(timesteps)
        self.acp = alphas_cumprod

    def noised(self, x0, noise, j):
        if j >= len(self):
            return x0
        abar = self.acp[int(self.timesteps[j])]  # q(x_t | x0), DDPM eq. 4
        return x0.to(noise.dtype) * math.sqrt(abar) + noise * math.sqrt(1.0 - abar)


class _SigmaPlan(_Plan):
    """Euler samplers (Karras et al. 2022): the state is ``x0 + sigma eps``; the network sees it divided by
    ``sqrt(sigma^2 + 1)``, the VP sample at that noise level."""

    def __init__(self, timesteps, sigmas: np.ndarray, init_sigma: float) -> None:
        super().__init__(timesteps)
        self.sigmas = sigmas  # one per step, then 0
        self.init_sigma = init_sigma

    def initial(self, noise):
        return noise * self.init_sigma  # diffusers' init_noise_sigma

    def model_input(self, i, x):
        sigma = float(self.sigmas[i])
        return x * (1.0 / math.sqrt(sigma * sigma + 1.0))

    def noised(self, x0, noise, j):
        if j >= len(self):
            return x0
        return x0.to(noise.dtype) + noise * float(self.sigmas[j])


class _DPMPlan(_Plan):
    """DPM-Solver++: the state is the VP sample, its level given as the k-diffusion sigma."""

    def __init__(self, timesteps, sigmas: np.ndarray) -> None:
        super().__init__(timesteps)
        self.sigmas = sigmas  # one per step, then 0

    def alpha_sigma(self, j: int) -> tuple[float, float]:
        k = float(self.sigmas[j])
        a = 1.0 / math.sqrt(k * k + 1.0)
        return a, k * a

    def noised(self, x0, noise, j):
        if j >= len(self):
            return x0
        a, s = self.alpha_sigma(j)  # diffusers' DPMSolverMultistepScheduler.add_noise: alpha_t x0 + sigma_t eps
        return x0.to(noise.dtype) * a + noise * s


class _FlowPlan(_Plan):
    """Rectified flow: the state is ``(1 - s) x0 + s eps``; the network sees timestep ``T * s``."""

    def __init__(self, sigmas: np.ndarray, num_train_timesteps: int) -> None:
        # diffusers passes the fp32 sigma times T as the timestep (``sigmas``: already fp32 values).
        super().__init__(float(np.float32(s) * np.float32(num_train_timesteps)) for s in sigmas[:-1])
        self.sigmas = sigmas  # one per step, then 0

    def noised(self, x0, noise, j):
        if j >= len(self):
            return x0
        s = float(self.sigmas[j])  # diffusers' scale_noise
        return s * noise + (1.0 - s) * x0.to(noise.dtype)


# --------------------------------------------------------------------------------------------------------------
# The driver.
# --------------------------------------------------------------------------------------------------------------

def _check_inputs(x, schedule, want) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor of standard normal noise")
    if not isinstance(schedule, want):
        raise TypeError(f"this sampler needs a {want.__name__}, got {type(schedule).__name__}"
                        + (" (use sample_flow_euler for rectified-flow models)" if isinstance(schedule, FlowSchedule)
                           else ""))


def _check_start(init, start: int, n: int, x: torch.Tensor) -> None:
    """img2img arguments: ``init`` (the clean sample) with x's shape, ``start`` a step index of the plan."""
    if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start < n:
        raise ValueError(f"start must be a step index in 0..{n - 1}, got {start!r} (img2img: strength too low?)")
    if start and init is None:
        raise ValueError("start > 0 needs init, the clean sample to noise to that step (img2img)")
    if init is not None and tuple(init.shape) != tuple(x.shape):
        raise ValueError(f"init must have the noise's shape {tuple(x.shape)}, got {tuple(init.shape)}")


def _check_keep(keep, x: torch.Tensor) -> None:
    if keep is None:
        return
    if not isinstance(keep, (tuple, list)) or len(keep) != 3:
        raise ValueError("keep must be (x0, noise, mask): the original sample, its noise and the repaint mask")
    x0, noise, mask = keep
    if tuple(x0.shape) != tuple(x.shape) or tuple(noise.shape) != tuple(x.shape):
        raise ValueError(f"keep: x0 and noise must have the sample's shape {tuple(x.shape)}")
    try:
        torch.broadcast_shapes(tuple(mask.shape), tuple(x.shape))
    except RuntimeError:
        raise ValueError(f"keep: mask {tuple(mask.shape)} does not broadcast to {tuple(x.shape)}") from None


def _run(model, x: torch.Tensor, plan: _Plan, step: Step, *, cond=None, uncond=None, guidance: float | None = None,
         generator=None, callback: Callback | None = None, init: torch.Tensor | None = None, start: int = 0,
         keep: tuple | None = None, progress: bool = False, **unknown) -> torch.Tensor:
    """Run ``step`` over ``plan`` from step ``start``: what every sampler shares (see the module doc).

    ``generator`` is the step rule's (it draws the sampler's own noise); it is accepted here so that every
    sampler takes the same arguments."""
    if unknown:
        raise TypeError(f"unknown sampler argument(s) {', '.join(sorted(unknown))}: every sampler takes cond, "
                        "uncond, guidance, generator, callback, init, start, keep and progress, and the options its "
                        "docstring names")
    _check_start(init, start, len(plan), x)
    _check_keep(keep, x)
    x = plan.initial(x) if init is None else plan.noised(init, x, start)
    steps = range(start, len(plan))
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="sampling", unit="step", leave=False)
    for i in steps:
        t = plan.timesteps[i]
        m, g = guided_forward(model, plan.model_input(i, x), t, cond, uncond, guidance)
        x = step(i, x, m, g)
        if keep is not None:  # inpainting: (1 - mask) * original at the next level + mask * sample, as diffusers
            x = (1 - keep[2]) * plan.noised(keep[0], keep[1], i + 1) + keep[2] * x
        if callback is not None:
            callback(i, float(t), x)
    return x


def _sampler(fn):
    """Show the driver's arguments in a sampler's signature (``help``, ``inspect.signature``): the sampler takes
    them as ``**run`` and hands them to :func:`_run`."""
    own = inspect.signature(fn)
    shared = [p for p in inspect.signature(_run).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    fn.__signature__ = own.replace(parameters=[p for p in own.parameters.values()
                                               if p.kind is not inspect.Parameter.VAR_KEYWORD] + shared)
    return fn


def _randn(x: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal noise like x, drawn as diffusers' randn_tensor draws it (CPU generator -> CPU draw)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
        if len(generator) > 1:
            return torch.cat([_randn(x[i:i + 1], g) for i, g in enumerate(generator)])
        generator = generator[0]
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _update(x, m, g, px, pm, a, b, s=0.0, noise=None, clip=None) -> torch.Tensor:
    """``out = a * clamp(px*x + pm*m) + b*x + s*noise`` (m guided with scale g) in one fused pass.

    Without a clamp the prediction is folded into the output coefficients in fp64:
    ``out = (a*pm) m + (a*px + b) x + s noise`` -- fewer roundings than forming x0 first.
    """
    if noise is None:
        s = 0.0
    if clip is None:
        return sampler_step(x, m, a * pm, a * px + b, s, noise, pred=(0.0, 1.0), guidance_scale=g)
    return sampler_step(x, m, a, b, s, noise, pred=(px, pm), clip=clip, guidance_scale=g)


def _spacing(schedule: NoiseSchedule, spacing: str | None, default: str) -> str:
    return spacing or schedule.spacing or default


# --------------------------------------------------------------------------------------------------------------
# DDPM (Ho et al. 2020) -- diffusers DDPMScheduler, variance_type="fixed_small".
# --------------------------------------------------------------------------------------------------------------

@_sampler
def sample_ddpm(model, x: torch.Tensor, schedule: NoiseSchedule, *, steps: int, clip: float | None = None,
                spacing: str | None = None, steps_offset: int | None = None, **run) -> torch.Tensor:
    """Ancestral sampling from the DDPM posterior q(x_{t'} | x_t, x0) with x0 predicted by the model.

    With ``steps < T`` the chain jumps between the spaced timesteps t -> t' using the posterior of that
    jump (betas recomputed from abar, as diffusers). ``clip`` clamps the x0 estimate (default: the schedule's
    ``clip_sample``). Default spacing: the schedule's, else ``leading`` (diffusers' default).
    """
    _check_inputs(x, schedule, NoiseSchedule)
    model = as_denoiser(model, "eps")
    clip = schedule.clip_sample if clip is None else clip
    ts = schedule.timesteps(steps, variant="ddim", spacing=_spacing(schedule, spacing, "leading"),
                            steps_offset=steps_offset).tolist()
    plan = _VPPlan(ts, schedule.alphas_cumprod.tolist())
    acp, generator = plan.acp, run.get("generator")

    def step(i, x, m, g):
        t, last = ts[i], i + 1 == len(ts)
        a_t = acp[t]
        a_p = 1.0 if last else acp[ts[i + 1]]
        alpha_t_step = a_t / a_p            # alpha_t of the (possibly skipped) step t -> t'
        beta_t_step = 1.0 - alpha_t_step
        # DDPM eq. 7: posterior mean  mu = sqrt(abar_{t'}) beta_t / (1 - abar_t) x0
        #                                + sqrt(alpha_t) (1 - abar_{t'}) / (1 - abar_t) x_t
        c_x0 = math.sqrt(a_p) * beta_t_step / (1.0 - a_t)
        c_xt = math.sqrt(alpha_t_step) * (1.0 - a_p) / (1.0 - a_t)
        # DDPM eq. 6-7: the posterior q(x_{t'} | x_t, x0) has variance beta tilde = (1 - abar_{t'}) / (1 - abar_t)
        # beta_t (variance "fixed_small"; floored at 1e-20 like diffusers). Algorithm 2: z = 0 at the last step.
        std = 0.0 if last else math.sqrt(max((1.0 - a_p) / (1.0 - a_t) * beta_t_step, 1e-20))
        px, pm = x0_coefs(model.prediction, math.sqrt(a_t), math.sqrt(1.0 - a_t))
        noise = _randn(x, generator) if std > 0.0 else None
        return _update(x, m, g, px, pm, c_x0, c_xt, std, noise, clip)

    return _run(model, x, plan, step, **run)


# --------------------------------------------------------------------------------------------------------------
# DDIM (Song et al. 2021) -- diffusers DDIMScheduler.
# --------------------------------------------------------------------------------------------------------------

@_sampler
def sample_ddim(model, x: torch.Tensor, schedule: NoiseSchedule, *, steps: int, eta: float = 0.0,
                clip: float | None = None, set_alpha_to_one: bool | None = None, spacing: str | None = None,
                steps_offset: int | None = None, **run) -> torch.Tensor:
    """DDIM, eq. 12 with sigma_t(eta) of eq. 16; eta = 0 is deterministic, eta = 1 DDPM-like.

    As diffusers, the previous timestep is ``t - T // steps`` for every spacing (for ``linspace`` this can
    differ by one from the next listed timestep), and after the last step ``abar`` is 1
    (``set_alpha_to_one``) or ``abar_0``. ``clip`` clamps x0 while eps stays the model's (diffusers'
    ``use_clipped_model_output=False``). ``clip``, ``set_alpha_to_one`` and the spacing default to the
    schedule's settings (spacing: else ``leading``).
    """
    _check_inputs(x, schedule, NoiseSchedule)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    model = as_denoiser(model, "eps")
    clip = schedule.clip_sample if clip is None else clip
    set_alpha_to_one = schedule.set_alpha_to_one if set_alpha_to_one is None else set_alpha_to_one
    ts = schedule.timesteps(steps, variant="ddim", spacing=_spacing(schedule, spacing, "leading"),
                            steps_offset=steps_offset).tolist()
    plan = _VPPlan(ts, schedule.alphas_cumprod.tolist())
    acp, generator = plan.acp, run.get("generator")
    final = 1.0 if set_alpha_to_one else acp[0]
    jump = schedule.num_train_timesteps // steps

    def step(i, x, m, g):
        t, prev = ts[i], ts[i] - jump
        a_t = acp[t]
        a_p = acp[prev] if prev >= 0 else final
        alpha, sigma = math.sqrt(a_t), math.sqrt(1.0 - a_t)
        # eq. 16: sigma_t(eta) = eta sqrt((1 - abar_{t'}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t'})
        std = eta * math.sqrt((1.0 - a_p) / (1.0 - a_t) * (1.0 - a_t / a_p))
        # no noise when producing the sample (diffusers adds std * z at the last step if abar_final < 1)
        std_noise = 0.0 if i + 1 == len(ts) else std
        # eq. 12: x_{t'} = sqrt(abar_{t'}) x0 + sqrt(1 - abar_{t'} - sigma_t^2) eps + sigma_t z
        c_x0 = math.sqrt(a_p)
        c_dir = math.sqrt(max(1.0 - a_p - std * std, 0.0))
        px, pm = x0_coefs(model.prediction, alpha, sigma)
        ex, em = eps_coefs(model.prediction, alpha, sigma)
        noise = _randn(x, generator) if std_noise > 0.0 else None
        if clip is None:
            # eps = ex x + em m = (x - alpha x0) / sigma exactly, so eq. 12 is a*x0 + b*x with
            # a = sqrt(abar') - c_dir alpha / sigma  and  b = c_dir / sigma, folded further in _update.
            return sampler_step(x, m, c_x0 * pm + c_dir * em, c_x0 * px + c_dir * ex, std_noise, noise,
                                pred=(0.0, 1.0), guidance_scale=g)
        # Clamping x0 while the direction keeps the model's eps leaves a term in m outside the clamp:
        #   x' = c_x0 clamp(px x + pm m) + (c_dir ex) x + (c_dir em) m + std z.
        # The op has one spare input slot: m goes there when there is no noise (eta = 0), else it is one
        # extra axpy. With guidance, m is the guided output, formed first by the op (one pass).
        if g is not None:
            m = sampler_step(x, m, 1.0, 0.0, pred=(0.0, 1.0), guidance_scale=g)
        if noise is None:
            return sampler_step(x, m, c_x0, c_dir * ex, c_dir * em, m, pred=(px, pm), clip=clip)
        y = sampler_step(x, m, c_x0, c_dir * ex, std_noise, noise, pred=(px, pm), clip=clip)
        return y.add_(m, alpha=c_dir * em)

    return _run(model, x, plan, step, **run)


# --------------------------------------------------------------------------------------------------------------
# Sigma-space samplers (Karras et al. 2022): x = x0 + sigma eps, sigma = sqrt((1 - abar) / abar).
# --------------------------------------------------------------------------------------------------------------

def _euler_sigmas(schedule: NoiseSchedule, steps: int, spacing, steps_offset, karras: bool):
    """(timesteps, sigmas + [0]) as diffusers' EulerDiscreteScheduler.set_timesteps (interpolation linear)."""
    sp = _spacing(schedule, spacing, "linspace")
    ts = schedule.timesteps(steps, variant="euler", spacing=sp, steps_offset=steps_offset).astype(np.float64)
    all_sigmas = schedule.k_sigmas().numpy()
    sigmas = np.interp(ts, np.arange(len(all_sigmas)), all_sigmas)
    if karras:  # EDM eq. 5 between the spaced schedule's end points; timesteps by log-sigma interpolation
        sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), steps)
        ts = _sigma_to_t(sigmas, np.log(all_sigmas))
    return ts, np.concatenate([sigmas, [0.0]]), sp


def _sigma_plan(schedule: NoiseSchedule, steps: int, spacing, steps_offset, karras: bool) -> _SigmaPlan:
    ts, sigmas, sp = _euler_sigmas(schedule, steps, spacing, steps_offset, karras)
    # diffusers' init_noise_sigma: sigma_max for linspace/trailing, sqrt(sigma_max^2 + 1) for leading.
    smax = float(sigmas.max())
    return _SigmaPlan(ts.tolist(), sigmas, smax if sp in ("linspace", "trailing") else math.sqrt(smax * smax + 1.0))


def _sigma_x0_coefs(prediction: str, sigma: float) -> tuple[float, float]:
    """x0 = px * x + pm * m for the sigma-space state x (the network saw x / sqrt(sigma^2 + 1))."""
    c_in = 1.0 / math.sqrt(sigma * sigma + 1.0)  # = alpha of the VP sample the network sees
    px, pm = x0_coefs(prediction, c_in, sigma * c_in)
    return px * c_in, pm


@_sampler
def sample_euler(model, x: torch.Tensor, schedule: NoiseSchedule, *, steps: int, karras: bool = False,
                 spacing: str | None = None, steps_offset: int | None = None, **run) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - x0) / sigma (Karras et al. 2022, Alg. 1 with
    churn 0), as diffusers' EulerDiscreteScheduler. ``karras=True``: EDM sigmas (``use_karras_sigmas``).
    Default spacing: the schedule's, else ``linspace``. Deterministic (``generator`` is not drawn from)."""
    _check_inputs(x, schedule, NoiseSchedule)
    model = as_denoiser(model, "eps")
    plan = _sigma_plan(schedule, steps, spacing, steps_offset, karras)

    def step(i, x, m, g):
        sigma, sigma_next = float(plan.sigmas[i]), float(plan.sigmas[i + 1])
        px, pm = _sigma_x0_coefs(model.prediction, sigma)
        # Alg. 1 step: d = (x - x0) / sigma; x' = x + (sigma' - sigma) d = (sigma'/sigma) x + (1 - sigma'/sigma) x0
        r = sigma_next / sigma
        return _update(x, m, g, px, pm, 1.0 - r, r)

    return _run(model, x, plan, step, **run)


@_sampler
def sample_euler_ancestral(model, x: torch.Tensor, schedule: NoiseSchedule, *, steps: int,
                           spacing: str | None = None, steps_offset: int | None = None, **run) -> torch.Tensor:
    """Euler ancestral (k-diffusion ``sample_euler_ancestral``, eta 1), as diffusers' EulerAncestralDiscreteScheduler.

    Each step goes deterministically down to sigma_down and adds fresh noise of std sigma_up, with
    sigma_up^2 = sigma'^2 (sigma^2 - sigma'^2) / sigma^2 and sigma_down^2 = sigma'^2 - sigma_up^2, so the
    marginal noise level after the step is sigma'. Default spacing: the schedule's, else ``linspace``.
    """
    _check_inputs(x, schedule, NoiseSchedule)
    model = as_denoiser(model, "eps")
    plan = _sigma_plan(schedule, steps, spacing, steps_offset, karras=False)
    generator = run.get("generator")

    def step(i, x, m, g):
        sigma, sigma_next = float(plan.sigmas[i]), float(plan.sigmas[i + 1])
        sigma_up = math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2)
        sigma_down = math.sqrt(sigma_next ** 2 - sigma_up ** 2)
        px, pm = _sigma_x0_coefs(model.prediction, sigma)
        r = sigma_down / sigma
        noise = _randn(x, generator) if sigma_up > 0.0 else None  # sigma_up = 0 exactly at the last step
        return _update(x, m, g, px, pm, 1.0 - r, r, sigma_up, noise)

    return _run(model, x, plan, step, **run)


# --------------------------------------------------------------------------------------------------------------
# DPM-Solver++(2M) (Lu et al. 2022) -- diffusers DPMSolverMultistepScheduler(algorithm_type="dpmsolver++",
# solver_order=2, solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero").
# --------------------------------------------------------------------------------------------------------------

def _dpm_timesteps_sigmas(schedule: NoiseSchedule, steps: int, spacing, steps_offset, karras: bool):
    ts = schedule.timesteps(steps, variant="dpm", spacing=_spacing(schedule, spacing, "linspace"),
                            steps_offset=steps_offset)
    all_sigmas = schedule.k_sigmas().numpy()
    if karras:
        # diffusers: EDM sigmas over the full training range; timesteps from log-sigma interpolation, rounded
        # (truncated for the cosine schedule, which diffusers does not round before its int64 cast).
        sigmas = karras_sigmas(float(all_sigmas[0]), float(all_sigmas[-1]), steps)
        tf = _sigma_to_t(sigmas, np.log(all_sigmas))
        ts = (tf if schedule.kind == "cosine" else tf.round()).astype(np.int64)
    else:
        sigmas = np.interp(ts, np.arange(len(all_sigmas)), all_sigmas)
    return ts, np.concatenate([sigmas, [0.0]])


@_sampler
def sample_dpmpp_2m(model, x: torch.Tensor, schedule: NoiseSchedule, *, steps: int, karras: bool = False,
                    spacing: str | None = None, steps_offset: int | None = None, **run) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 Algorithm 2 (multistep, data prediction), in VP space.

    With lambda = log(alpha / sigma) and h = lambda_{t'} - lambda_t:
      first step (DPM-Solver++(1), eq. 9 = DDIM): x' = (sigma'/sigma) x - alpha' (e^{-h} - 1) x0
      later steps: D = (1 + 1/(2r)) x0_t - 1/(2r) x0_{prev}, r = h_prev / h;  x' = (sigma'/sigma) x - alpha' (e^{-h} - 1) D
      last step (final sigma 0, diffusers' lower_order_final): x' = x0.
    The history starts empty at ``start`` (img2img), so a run's first step is first order. Default spacing:
    the schedule's, else ``linspace``; ``karras=True`` uses EDM sigmas (``use_karras_sigmas``). Deterministic.
    """
    _check_inputs(x, schedule, NoiseSchedule)
    model = as_denoiser(model, "eps")
    ts, sigmas = _dpm_timesteps_sigmas(schedule, steps, spacing, steps_offset, karras)
    plan = _DPMPlan(ts.tolist(), sigmas)
    history: dict = {}  # x0 and h of the previous step

    def step(i, x, m, g):
        alpha_s, sigma_s = plan.alpha_sigma(i)
        px, pm = x0_coefs(model.prediction, alpha_s, sigma_s)
        # x0 of this step (guidance + conversion fused, one pass).
        x0 = sampler_step(x, m, pm, px, pred=(0.0, 1.0), guidance_scale=g)
        x0_prev, h_prev = history.get("x0"), history.get("h")
        if float(plan.sigmas[i + 1]) == 0.0:
            x, h = x0, None  # lambda' = +inf: e^{-h} = 0, sigma' = 0, alpha' = 1
        else:
            alpha_t, sigma_t = plan.alpha_sigma(i + 1)
            h = (math.log(alpha_t) - math.log(sigma_t)) - (math.log(alpha_s) - math.log(sigma_s))
            c_x = sigma_t / sigma_s
            c_d = -alpha_t * math.expm1(-h)  # -alpha' (e^{-h} - 1)
            if x0_prev is None:
                x = sampler_step(x, x0, c_d, c_x)
            else:
                r = h_prev / h
                # x' = c_x x + c_d ((1 + 1/(2r)) x0 - 1/(2r) x0_prev): the op's "noise" slot carries x0_prev.
                x = sampler_step(x, x0, c_d * (1.0 + 0.5 / r), c_x, -c_d * 0.5 / r, x0_prev)
        history.update(x0=x0, h=h)
        return x

    return _run(model, x, plan, step, **run)


# --------------------------------------------------------------------------------------------------------------
# Rectified flow (SD3) -- diffusers FlowMatchEulerDiscreteScheduler.
# --------------------------------------------------------------------------------------------------------------

@_sampler
def sample_flow_euler(model, x: torch.Tensor, schedule: FlowSchedule, *, steps: int, **run) -> torch.Tensor:
    """Euler on the flow ODE dx/ds = v(x, s), v = eps - x0: x' = x + (s' - s) v (Esser et al. 2024, Sec. 2).

    The network sees timestep 1000 * s. Deterministic. img2img: ``init`` (the clean latents) is noised to step
    ``start``'s sigma, ``x_s = s * noise + (1 - s) * init`` with ``x`` as the noise (diffusers'
    ``FlowMatchEulerDiscreteScheduler.scale_noise``), and steps ``start..steps-1`` run.
    """
    _check_inputs(x, schedule, FlowSchedule)
    model = as_denoiser(model, "flow")
    # The schedule's points are its sigmas rounded to fp32, as diffusers stores them: the network sees
    # t = fp32(s) * T, and the step sizes are differences of those same points (taken exactly in fp64). Step
    # sizes from the unrounded fp64 sigmas would move every latent coherently along v by up to half an fp32
    # ulp of s per step, off the trajectory the timesteps describe.
    plan = _FlowPlan(schedule.sigmas(steps).astype(np.float32).astype(np.float64), schedule.num_train_timesteps)

    def step(i, x, m, g):
        s, s_next = float(plan.sigmas[i]), float(plan.sigmas[i + 1])
        if model.prediction == "flow":
            return sampler_step(x, m, s_next - s, 1.0, guidance_scale=g)
        # another prediction type on a flow schedule: via x0, x' = (s'/s) x + (1 - s'/s) x0
        px, pm = x0_coefs(model.prediction, 1.0 - s, s)
        r = s_next / s
        return _update(x, m, g, px, pm, 1.0 - r, r)

    return _run(model, x, plan, step, **run)
