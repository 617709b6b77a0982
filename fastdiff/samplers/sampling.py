"""Samplers: pure functions with one signature, each matching the diffusers scheduler of the same name.

    sample_xxx(model, x, schedule, *, steps, cond=None, uncond=None, guidance=None, generator=None,
               callback=None, **sampler_options) -> sample

- ``model``: a :class:`~fastdiff.samplers.model.Denoiser` (or a bare eps/flow network), see model.py.
- ``x``: standard normal noise of the output's shape. Samplers that work in sigma space scale it themselves
  (Euler: ``x * sigma_max``), so every sampler starts from the same tensor a user draws.
- ``schedule``: a :class:`NoiseSchedule` (DDPM, DDIM, Euler, Euler a, DPM++ 2M) or :class:`FlowSchedule`.
- ``guidance``: classifier-free guidance scale with ``uncond`` the null conditioning; ONE batched forward
  per step, guidance fused into the update.
- ``generator``: a ``torch.Generator`` (or a list, one per sample, as diffusers) for the sampler's own noise.
  Noise is drawn in the same order and shape as diffusers draws it, so a seeded run reproduces diffusers.
- ``callback(i, t, x)``: after step ``i`` (timestep ``t``) with the new state, in the parameterisation of the
  matching diffusers scheduler (sigma-scaled for Euler samplers).
- img2img (DDPM, DDIM, Euler, Euler a, DPM++ 2M): ``init`` = the clean sample x0 and ``start`` = the first
  step to run; ``x`` is then the noise, and the state starts as ``init`` noised to step ``start``'s level by
  that scheduler's own ``add_noise`` (diffusers' img2img: ``timesteps[t_start:]``, ``add_noise(init, noise,
  timesteps[t_start])``).
- inpainting by mask blending (same samplers): ``keep=(x0, noise, mask)``; after every step the state outside
  the mask (mask 0) is replaced by ``x0`` noised with ``noise`` to the next step's level (the clean ``x0`` after
  the last step), as diffusers' StableDiffusionInpaintPipeline does for 4-channel UNets.

Every one-step update is ``out = a * x0 + b * x + s * noise`` with ``x0`` linear in (x, model output); the
coefficients are derived in fp64 and the update runs through :func:`fastdiff.ops.sampler_step` (fused CFG +
prediction + update, one pass). No noise is added at the last step.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

from fastdiff.ops import sampler_step
from fastdiff.samplers.model import Denoiser, as_denoiser, guided_forward
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


# --------------------------------------------------------------------------------------------------------------
# Shared plumbing.
# --------------------------------------------------------------------------------------------------------------

def _check_inputs(x, schedule, want) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x must be a floating-point tensor of standard normal noise")
    if not isinstance(schedule, want):
        raise TypeError(f"this sampler needs a {want.__name__}, got {type(schedule).__name__}"
                        + (" (use sample_flow_euler for rectified-flow models)" if isinstance(schedule, FlowSchedule)
                           else ""))


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


def _check_start(init, start: int, n: int, x: torch.Tensor) -> None:
    """img2img arguments: ``init`` (the clean sample) with x's shape, ``start`` a step index of the schedule."""
    if not isinstance(start, int) or not 0 <= start < n:
        raise ValueError(f"start must be a step index in 0..{n - 1}, got {start!r} (img2img: strength too low?)")
    if start and init is None:
        raise ValueError("start > 0 needs init, the clean sample to noise to that step (img2img)")
    if init is not None and tuple(init.shape) != tuple(x.shape):
        raise ValueError(f"init must have the noise's shape {tuple(x.shape)}, got {tuple(init.shape)}")


def _keep_blend(x: torch.Tensor, keep: tuple, ref: torch.Tensor) -> torch.Tensor:
    """Inpainting by mask blending: where ``mask`` is 0 the state is replaced by ``ref`` (the original, noised to
    the next step's level), where 1 it keeps the sample: ``(1 - mask) * ref + mask * x`` as diffusers."""
    mask = keep[2]
    return (1 - mask) * ref + mask * x


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


def _vp_noised(init: torch.Tensor, noise: torch.Tensor, abar: float) -> torch.Tensor:
    """q(x_t | x0) = sqrt(abar) x0 + sqrt(1 - abar) eps (diffusers' DDPM/DDIM ``add_noise``)."""
    return init.to(noise.dtype) * math.sqrt(abar) + noise * math.sqrt(1.0 - abar)


def _spacing(schedule: NoiseSchedule, spacing: str | None, default: str) -> str:
    return spacing or schedule.spacing or default


# --------------------------------------------------------------------------------------------------------------
# DDPM (Ho et al. 2020) -- diffusers DDPMScheduler, variance_type="fixed_small".
# --------------------------------------------------------------------------------------------------------------

def sample_ddpm(model, x: torch.Tensor, schedule: NoiseSchedule, *, steps: int, cond=None, uncond=None,
                guidance: float | None = None, generator=None, callback: Callback | None = None,
                clip: float | None = None, spacing: str | None = None,
                steps_offset: int | None = None, init: torch.Tensor | None = None,
        start: int = 0, keep: tuple | None = None) -> torch.Tensor:
    """Ancestral sampling from the DDPM posterior q(x_{t'} | x_t, x0) with x0 predicted by the model.

    With ``steps < T`` the chain jumps between the spaced timesteps t -> t' using the posterior of that
    jump (betas recomputed from abar, as diffusers). ``clip`` clamps the x0 estimate (pixel models: 1.0).
    Default spacing ``leading`` (diffusers' default).
    """
    _check_inputs(x, schedule, NoiseSchedule)
    model = as_denoiser(model, "eps")
    ts = schedule.timesteps(steps, variant="ddim", spacing=_spacing(schedule, spacing, "leading"),
                            steps_offset=steps_offset)
    acp = schedule.alphas_cumprod.tolist()
    _check_start(init, start, len(ts), x)
    _check_keep(keep, x)
    if init is not None:
        x = _vp_noised(init, x, acp[int(ts[start])])

    def keep_ref(j):  # the original noised to step j's level (diffusers' add_noise at timesteps[j])
        return keep[0] if j >= len(ts) else _vp_noised(keep[0], keep[1], acp[int(ts[j])])
    for i, t in enumerate(ts.tolist()):
        if i < start:
            continue
        prev = ts[i + 1] if i + 1 < len(ts) else -1
        a_t = acp[t]
        a_p = acp[prev] if prev >= 0 else 1.0
        alpha_t_step = a_t / a_p            # alpha_t of the (possibly skipped) step t -> t'
        beta_t_step = 1.0 - alpha_t_step
        # DDPM eq. 7: posterior mean  mu = sqrt(abar_{t'}) beta_t / (1 - abar_t) x0
        #                                + sqrt(alpha_t) (1 - abar_{t'}) / (1 - abar_t) x_t
        c_x0 = math.sqrt(a_p) * beta_t_step / (1.0 - a_t)
        c_xt = math.sqrt(alpha_t_step) * (1.0 - a_p) / (1.0 - a_t)
        # DDPM eq. 6-7: the posterior q(x_{t'} | x_t, x0) has variance beta tilde = (1 - abar_{t'}) / (1 - abar_t)
        # beta_t (variance "fixed_small"; floored at 1e-20 like diffusers). Algorithm 2: z = 0 at the last step.
        last = i + 1 == len(ts)
        std = 0.0 if last else math.sqrt(max((1.0 - a_p) / (1.0 - a_t) * beta_t_step, 1e-20))
        px, pm = x0_coefs(model.prediction, math.sqrt(a_t), math.sqrt(1.0 - a_t))
        m, g = guided_forward(model, x, t, cond, uncond, guidance)
        noise = _randn(x, generator) if std > 0.0 else None
        x = _update(x, m, g, px, pm, c_x0, c_xt, std, noise, clip)
        if keep is not None:
            x = _keep_blend(x, keep, keep_ref(i + 1))
        if callback is not None:
            callback(i, float(t), x)
    return x


# --------------------------------------------------------------------------------------------------------------
# DDIM (Song et al. 2021) -- diffusers DDIMScheduler.
# --------------------------------------------------------------------------------------------------------------

def sample_ddim(model, x: torch.Tensor, schedule: NoiseSchedule, *, steps: int, cond=None, uncond=None,
                guidance: float | None = None, generator=None, callback: Callback | None = None,
                eta: float = 0.0, clip: float | None = None, set_alpha_to_one: bool = True,
                spacing: str | None = None, steps_offset: int | None = None, init: torch.Tensor | None = None,
        start: int = 0, keep: tuple | None = None) -> torch.Tensor:
    """DDIM, eq. 12 with sigma_t(eta) of eq. 16; eta = 0 is deterministic, eta = 1 DDPM-like.

    As diffusers, the previous timestep is ``t - T // steps`` for every spacing (for ``linspace`` this can
    differ by one from the next listed timestep), and after the last step ``abar`` is 1
    (``set_alpha_to_one``) or ``abar_0``. ``clip`` clamps x0 while eps stays the model's (diffusers'
    ``use_clipped_model_output=False``). Default spacing ``leading``.
    """
    _check_inputs(x, schedule, NoiseSchedule)
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    model = as_denoiser(model, "eps")
    ts = schedule.timesteps(steps, variant="ddim", spacing=_spacing(schedule, spacing, "leading"),
                            steps_offset=steps_offset)
    acp = schedule.alphas_cumprod.tolist()
    final = 1.0 if set_alpha_to_one else acp[0]
    jump = schedule.num_train_timesteps // steps
    _check_start(init, start, len(ts), x)
    _check_keep(keep, x)
    if init is not None:
        x = _vp_noised(init, x, acp[int(ts[start])])

    def keep_ref(j):  # the original noised to step j's level (diffusers' add_noise at timesteps[j])
        return keep[0] if j >= len(ts) else _vp_noised(keep[0], keep[1], acp[int(ts[j])])
    for i, t in enumerate(ts.tolist()):
        if i < start:
            continue
        prev = t - jump
        a_t = acp[t]
        a_p = acp[prev] if prev >= 0 else final
        alpha, sigma = math.sqrt(a_t), math.sqrt(1.0 - a_t)
        # eq. 16: sigma_t(eta) = eta sqrt((1 - abar_{t'}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t'})
        std = eta * math.sqrt((1.0 - a_p) / (1.0 - a_t) * (1.0 - a_t / a_p))
        last = i + 1 == len(ts)
        if last:
            std_noise = 0.0  # no noise when producing the sample (diffusers adds std * z here if abar_final < 1)
        else:
            std_noise = std
        # eq. 12: x_{t'} = sqrt(abar_{t'}) x0 + sqrt(1 - abar_{t'} - sigma_t^2) eps + sigma_t z
        c_x0 = math.sqrt(a_p)
        c_dir = math.sqrt(max(1.0 - a_p - std * std, 0.0))
        px, pm = x0_coefs(model.prediction, alpha, sigma)
        ex, em = eps_coefs(model.prediction, alpha, sigma)
        m, g = guided_forward(model, x, t, cond, uncond, guidance)
        noise = _randn(x, generator) if std_noise > 0.0 else None
        if clip is None:
            # eps = ex x + em m = (x - alpha x0) / sigma exactly, so eq. 12 is a*x0 + b*x with
            # a = sqrt(abar') - c_dir alpha / sigma  and  b = c_dir / sigma, folded further in _update.
            x = sampler_step(x, m, c_x0 * pm + c_dir * em, c_x0 * px + c_dir * ex, std_noise, noise,
                             pred=(0.0, 1.0), guidance_scale=g)
        else:
            # Clamping x0 while the direction keeps the model's eps leaves a term in m outside the clamp:
            #   x' = c_x0 clamp(px x + pm m) + (c_dir ex) x + (c_dir em) m + std z.
            # The op has one spare input slot: m goes there when there is no noise (eta = 0), else it is one
            # extra axpy. With guidance, m is the guided output, formed first by the op (one pass).
            if g is not None:
                m = sampler_step(x, m, 1.0, 0.0, pred=(0.0, 1.0), guidance_scale=g)
            if noise is None:
                x = sampler_step(x, m, c_x0, c_dir * ex, c_dir * em, m, pred=(px, pm), clip=clip)
            else:
                y = sampler_step(x, m, c_x0, c_dir * ex, std_noise, noise, pred=(px, pm), clip=clip)
                x = y.add_(m, alpha=c_dir * em)
        if keep is not None:
            x = _keep_blend(x, keep, keep_ref(i + 1))
        if callback is not None:
            callback(i, float(t), x)
    return x


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


def _init_sigma(sigmas: np.ndarray, spacing: str) -> float:
    # diffusers' init_noise_sigma: sigma_max for linspace/trailing, sqrt(sigma_max^2 + 1) for leading.
    smax = float(sigmas.max())
    return smax if spacing in ("linspace", "trailing") else math.sqrt(smax * smax + 1.0)


def _sigma_x0_coefs(prediction: str, sigma: float) -> tuple[float, float]:
    """x0 = px * x + pm * m for the sigma-space state x (the network saw x / sqrt(sigma^2 + 1))."""
    c_in = 1.0 / math.sqrt(sigma * sigma + 1.0)  # = alpha of the VP sample the network sees
    px, pm = x0_coefs(prediction, c_in, sigma * c_in)
    return px * c_in, pm


def sample_euler(model, x: torch.Tensor, schedule: NoiseSchedule, *, steps: int, cond=None, uncond=None,
                 guidance: float | None = None, generator=None, callback: Callback | None = None,
                 karras: bool = False, spacing: str | None = None,
                 steps_offset: int | None = None, init: torch.Tensor | None = None,
        start: int = 0, keep: tuple | None = None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - x0) / sigma (Karras et al. 2022, Alg. 1 with
    churn 0), as diffusers' EulerDiscreteScheduler. ``karras=True``: EDM sigmas (``use_karras_sigmas``).
    Default spacing ``linspace``. ``generator`` is unused (deterministic); accepted for the common signature."""
    _check_inputs(x, schedule, NoiseSchedule)
    model = as_denoiser(model, "eps")
    ts, sigmas, sp = _euler_sigmas(schedule, steps, spacing, steps_offset, karras)
    _check_start(init, start, len(ts), x)
    _check_keep(keep, x)
    # txt2img: unit noise scaled to the first sigma (init_noise_sigma); img2img: x0 + sigma_start * noise
    # (diffusers' EulerDiscreteScheduler.add_noise in sigma space).
    x = x * _init_sigma(sigmas, sp) if init is None else init.to(x.dtype) + x * float(sigmas[start])

    def keep_ref(j):  # the original at step j's sigma (diffusers' add_noise at timesteps[j])
        return keep[0] if j >= len(ts) else keep[0] + keep[1] * float(sigmas[j])
    for i, t in enumerate(ts.tolist()):
        if i < start:
            continue
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        c_in = 1.0 / math.sqrt(sigma * sigma + 1.0)
        m, g = guided_forward(model, x * c_in, t, cond, uncond, guidance)
        px, pm = _sigma_x0_coefs(model.prediction, sigma)
        # Alg. 1 step: d = (x - x0) / sigma; x' = x + (sigma' - sigma) d = (sigma'/sigma) x + (1 - sigma'/sigma) x0
        r = sigma_next / sigma
        x = _update(x, m, g, px, pm, 1.0 - r, r)
        if keep is not None:
            x = _keep_blend(x, keep, keep_ref(i + 1))
        if callback is not None:
            callback(i, float(t), x)
    return x


def sample_euler_ancestral(model, x: torch.Tensor, schedule: NoiseSchedule, *, steps: int, cond=None,
                           uncond=None, guidance: float | None = None, generator=None,
                           callback: Callback | None = None, spacing: str | None = None,
                           steps_offset: int | None = None, init: torch.Tensor | None = None,
        start: int = 0, keep: tuple | None = None) -> torch.Tensor:
    """Euler ancestral (k-diffusion ``sample_euler_ancestral``, eta 1), as diffusers' EulerAncestralDiscreteScheduler.

    Each step goes deterministically down to sigma_down and adds fresh noise of std sigma_up, with
    sigma_up^2 = sigma'^2 (sigma^2 - sigma'^2) / sigma^2 and sigma_down^2 = sigma'^2 - sigma_up^2, so the
    marginal noise level after the step is sigma'. Default spacing ``linspace``.
    """
    _check_inputs(x, schedule, NoiseSchedule)
    model = as_denoiser(model, "eps")
    ts, sigmas, sp = _euler_sigmas(schedule, steps, spacing, steps_offset, karras=False)
    _check_start(init, start, len(ts), x)
    _check_keep(keep, x)
    # txt2img: unit noise scaled to the first sigma (init_noise_sigma); img2img: x0 + sigma_start * noise
    # (diffusers' EulerDiscreteScheduler.add_noise in sigma space).
    x = x * _init_sigma(sigmas, sp) if init is None else init.to(x.dtype) + x * float(sigmas[start])

    def keep_ref(j):  # the original at step j's sigma (diffusers' add_noise at timesteps[j])
        return keep[0] if j >= len(ts) else keep[0] + keep[1] * float(sigmas[j])
    for i, t in enumerate(ts.tolist()):
        if i < start:
            continue
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        sigma_up = math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2)
        sigma_down = math.sqrt(sigma_next ** 2 - sigma_up ** 2)
        c_in = 1.0 / math.sqrt(sigma * sigma + 1.0)
        m, g = guided_forward(model, x * c_in, t, cond, uncond, guidance)
        px, pm = _sigma_x0_coefs(model.prediction, sigma)
        r = sigma_down / sigma
        noise = _randn(x, generator) if sigma_up > 0.0 else None  # sigma_up = 0 exactly at the last step
        x = _update(x, m, g, px, pm, 1.0 - r, r, sigma_up, noise)
        if keep is not None:
            x = _keep_blend(x, keep, keep_ref(i + 1))
        if callback is not None:
            callback(i, float(t), x)
    return x


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


def sample_dpmpp_2m(model, x: torch.Tensor, schedule: NoiseSchedule, *, steps: int, cond=None, uncond=None,
                    guidance: float | None = None, generator=None, callback: Callback | None = None,
                    karras: bool = False, spacing: str | None = None,
                    steps_offset: int | None = None, init: torch.Tensor | None = None,
        start: int = 0, keep: tuple | None = None) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 Algorithm 2 (multistep, data prediction), in VP space.

    With lambda = log(alpha / sigma) and h = lambda_{t'} - lambda_t:
      first step (DPM-Solver++(1), eq. 9 = DDIM): x' = (sigma'/sigma) x - alpha' (e^{-h} - 1) x0
      later steps: D = (1 + 1/(2r)) x0_t - 1/(2r) x0_{prev}, r = h_prev / h;  x' = (sigma'/sigma) x - alpha' (e^{-h} - 1) D
      last step (final sigma 0, diffusers' lower_order_final): x' = x0.
    Default spacing ``linspace``; ``karras=True`` uses EDM sigmas (``use_karras_sigmas``).
    ``generator`` is unused (deterministic); accepted for the common signature.
    """
    _check_inputs(x, schedule, NoiseSchedule)
    model = as_denoiser(model, "eps")
    ts, sigmas = _dpm_timesteps_sigmas(schedule, steps, spacing, steps_offset, karras)

    def alpha_sigma(k_sigma: float) -> tuple[float, float]:
        a = 1.0 / math.sqrt(k_sigma * k_sigma + 1.0)
        return a, k_sigma * a

    _check_start(init, start, len(ts), x)
    _check_keep(keep, x)
    if init is not None:  # diffusers' DPMSolverMultistepScheduler.add_noise: alpha_t x0 + sigma_t eps (VP)
        a0, s0 = alpha_sigma(float(sigmas[start]))
        x = init.to(x.dtype) * a0 + x * s0

    def keep_ref(j):  # the original at step j's (alpha, sigma) (diffusers' add_noise at timesteps[j])
        if j >= len(ts):
            return keep[0]
        a, sg = alpha_sigma(float(sigmas[j]))
        return keep[0] * a + keep[1] * sg
    x0_prev, h_prev = None, None
    for i, t in enumerate(ts.tolist()):
        if i < start:
            continue  # the multistep history starts empty at `start`: its first step is first order
        alpha_s, sigma_s = alpha_sigma(float(sigmas[i]))
        m, g = guided_forward(model, x, t, cond, uncond, guidance)
        px, pm = x0_coefs(model.prediction, alpha_s, sigma_s)
        # x0 of this step (guidance + conversion fused, one pass).
        x0 = sampler_step(x, m, pm, px, pred=(0.0, 1.0), guidance_scale=g)
        k_next = float(sigmas[i + 1])
        if k_next == 0.0:
            x = x0  # lambda' = +inf: e^{-h} = 0, sigma' = 0, alpha' = 1
            h = None
        else:
            alpha_t, sigma_t = alpha_sigma(k_next)
            h = (math.log(alpha_t) - math.log(sigma_t)) - (math.log(alpha_s) - math.log(sigma_s))
            c_x = sigma_t / sigma_s
            c_d = -alpha_t * math.expm1(-h)  # -alpha' (e^{-h} - 1)
            if x0_prev is None:
                x = sampler_step(x, x0, c_d, c_x)
            else:
                r = h_prev / h
                # x' = c_x x + c_d ((1 + 1/(2r)) x0 - 1/(2r) x0_prev): the op's "noise" slot carries x0_prev.
                x = sampler_step(x, x0, c_d * (1.0 + 0.5 / r), c_x, -c_d * 0.5 / r, x0_prev)
        x0_prev, h_prev = x0, h
        if keep is not None:
            x = _keep_blend(x, keep, keep_ref(i + 1))
        if callback is not None:
            callback(i, float(t), x)
    return x


# --------------------------------------------------------------------------------------------------------------
# Rectified flow (SD3) -- diffusers FlowMatchEulerDiscreteScheduler.
# --------------------------------------------------------------------------------------------------------------

def sample_flow_euler(model, x: torch.Tensor, schedule: FlowSchedule, *, steps: int, cond=None, uncond=None,
                      guidance: float | None = None, generator=None, callback: Callback | None = None,
                      init: torch.Tensor | None = None, start: int = 0) -> torch.Tensor:
    """Euler on the flow ODE dx/ds = v(x, s), v = eps - x0: x' = x + (s' - s) v (Esser et al. 2024, Sec. 2).

    The network sees timestep 1000 * s. ``generator`` is unused (deterministic). img2img: ``init`` (the clean
    latents) is noised to step ``start``'s sigma, ``x_s = s * noise + (1 - s) * init`` with ``x`` as the noise
    (diffusers' ``FlowMatchEulerDiscreteScheduler.scale_noise``), and steps ``start..steps-1`` run.
    """
    _check_inputs(x, schedule, FlowSchedule)
    model = as_denoiser(model, "flow")
    # The schedule's points are its sigmas rounded to fp32, as diffusers stores them: the network sees
    # t = fp32(s) * T, and the step sizes are differences of those same points (taken exactly in fp64). Step
    # sizes from the unrounded fp64 sigmas would move every latent coherently along v by up to half an fp32
    # ulp of s per step, off the trajectory the timesteps describe.
    sigmas = schedule.sigmas(steps).astype(np.float32).astype(np.float64)
    _check_start(init, start, steps, x)
    if init is not None:
        s0 = float(sigmas[start])
        x = s0 * x + (1.0 - s0) * init.to(x.dtype)
    t_scale = schedule.num_train_timesteps
    for i in range(start, steps):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        t = float(np.float32(s) * np.float32(t_scale))
        m, g = guided_forward(model, x, t, cond, uncond, guidance)
        if model.prediction == "flow":
            x = sampler_step(x, m, s_next - s, 1.0, guidance_scale=g)
        else:  # another prediction type on a flow schedule: via x0, x' = (s'/s) x + (1 - s'/s) x0
            px, pm = x0_coefs(model.prediction, 1.0 - s, s)
            r = s_next / s
            x = _update(x, m, g, px, pm, 1.0 - r, r)
        if callback is not None:
            callback(i, t, x)
    return x
