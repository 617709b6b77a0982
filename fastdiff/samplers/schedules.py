"""Noise schedules, prediction types and timestep spacings: the arithmetic every sampler and trainer shares.

Two families:

- :class:`NoiseSchedule`: discrete-time variance preserving (DDPM), ``T`` betas and
  ``q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I)`` with ``alpha_t = sqrt(abar_t)``, ``sigma_t = sqrt(1 - abar_t)``
  (Ho et al. 2020, eq. 4). Betas are built exactly as diffusers builds them (fp32 ``torch.linspace`` for the
  linear schedules, the Glide cosine rounded through fp32), so a checkpoint trained with diffusers sees the
  same noise levels; every derived quantity (``abar``, sigmas, coefficients) is then computed in fp64.
- :class:`FlowSchedule`: rectified flow (SD3), ``x_t = (1 - s) x_0 + s eps`` with the shifted sigmas of
  diffusers' ``FlowMatchEulerDiscreteScheduler``.

Prediction types (what a network outputs): ``"eps"`` (noise), ``"v"`` (``alpha eps - sigma x0``, Salimans &
Ho 2022), ``"x0"`` (the clean sample) and ``"flow"`` (velocity ``eps - x0``). diffusers' names
(``epsilon``, ``v_prediction``, ``sample``, ``flow_prediction``) are accepted everywhere.

Timestep spacings ``leading`` / ``trailing`` / ``linspace`` follow diffusers exactly, including where its
schedulers differ from one another: DDPM/DDIM round to integers, Euler keeps fractional ``linspace``
timesteps, DPM-Solver spaces ``steps + 1`` points and drops the last (see :func:`spaced_timesteps`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "PREDICTIONS",
    "SPACINGS",
    "FlowSchedule",
    "NoiseSchedule",
    "cosine_schedule",
    "eps_coefs",
    "karras_sigmas",
    "linear_schedule",
    "make_schedule",
    "normalize_prediction",
    "prediction_target",
    "rescale_zero_terminal_snr",
    "scaled_linear_schedule",
    "spaced_timesteps",
    "to_eps",
    "to_x0",
    "x0_coefs",
]

PREDICTIONS = ("eps", "v", "x0", "flow")
SPACINGS = ("leading", "trailing", "linspace")

_PREDICTION_TO_DIFFUSERS = {"eps": "epsilon", "v": "v_prediction", "x0": "sample", "flow": "flow_prediction"}
_PREDICTION_ALIASES = {
    "eps": "eps", "epsilon": "eps",
    "v": "v", "v_prediction": "v",
    "x0": "x0", "sample": "x0", "original_sample": "x0",
    "flow": "flow", "flow_prediction": "flow", "velocity": "flow",
}


def normalize_prediction(name: str) -> str:
    """``"epsilon"`` -> ``"eps"``, ``"v_prediction"`` -> ``"v"``, ``"sample"`` -> ``"x0"``, ...; errors name the choices."""
    try:
        return _PREDICTION_ALIASES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown prediction type {name!r}; choose one of {', '.join(PREDICTIONS)} "
                         "(or diffusers' epsilon / v_prediction / sample / flow_prediction)") from None


# --------------------------------------------------------------------------------------------------------------
# Prediction conversions. A sample is x = alpha * x0 + sigma * eps (VP: alpha^2 + sigma^2 = 1; flow: alpha + sigma
# = 1). Every prediction is linear in (x, model output m), so a conversion is two fp64 coefficients; samplers fold
# them into the fused update (fastdiff.ops.sampler_step) instead of materialising x0 or eps.
# --------------------------------------------------------------------------------------------------------------

def x0_coefs(prediction: str, alpha: float, sigma: float) -> tuple[float, float]:
    """``(px, pm)`` with ``x0 = px * x + pm * m`` for a model output ``m`` of type ``prediction``."""
    p = normalize_prediction(prediction)
    alpha, sigma = float(alpha), float(sigma)
    if p == "eps":  # x = alpha x0 + sigma eps  ->  x0 = (x - sigma eps) / alpha   (DDPM eq. 15; DDIM eq. 12)
        if alpha == 0.0:
            raise ValueError("an eps-prediction model cannot be sampled at a zero-SNR timestep (alpha = 0): "
                             "x0 = (x - sigma eps) / alpha is undefined; zero terminal SNR needs v-prediction")
        return 1.0 / alpha, -sigma / alpha
    if p == "x0":
        return 0.0, 1.0
    if p == "v":  # v = alpha eps - sigma x0  ->  x0 = (alpha x - sigma v) / (alpha^2 + sigma^2)   (Salimans & Ho)
        n = alpha * alpha + sigma * sigma
        return alpha / n, -sigma / n
    # flow: v = eps - x0  ->  x = (alpha + sigma) x0 + sigma v  ->  x0 = (x - sigma v) / (alpha + sigma)
    n = alpha + sigma
    return 1.0 / n, -sigma / n


def eps_coefs(prediction: str, alpha: float, sigma: float) -> tuple[float, float]:
    """``(ex, em)`` with ``eps = ex * x + em * m`` for a model output ``m`` of type ``prediction``."""
    p = normalize_prediction(prediction)
    alpha, sigma = float(alpha), float(sigma)
    if p == "eps":
        return 0.0, 1.0
    if p == "x0":  # eps = (x - alpha x0) / sigma
        if sigma == 0.0:
            raise ValueError("eps is undefined from an x0 prediction at sigma = 0")
        return 1.0 / sigma, -alpha / sigma
    if p == "v":  # eps = (sigma x + alpha v) / (alpha^2 + sigma^2)
        n = alpha * alpha + sigma * sigma
        return sigma / n, alpha / n
    n = alpha + sigma  # flow: eps = v + x0 = (x + alpha v) / (alpha + sigma)
    return 1.0 / n, alpha / n


def to_x0(prediction: str, model_out: torch.Tensor, x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """The clean-sample estimate from a model output (coefficients in fp64, math in fp32 at least)."""
    px, pm = x0_coefs(prediction, alpha, sigma)
    dtype = torch.promote_types(x.dtype, torch.float32)
    return (px * x.to(dtype) + pm * model_out.to(dtype)).to(x.dtype)


def to_eps(prediction: str, model_out: torch.Tensor, x: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """The noise estimate from a model output (coefficients in fp64, math in fp32 at least)."""
    ex, em = eps_coefs(prediction, alpha, sigma)
    dtype = torch.promote_types(x.dtype, torch.float32)
    return (ex * x.to(dtype) + em * model_out.to(dtype)).to(x.dtype)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape + (1,) * (like.dim() - v.dim()))


def prediction_target(prediction: str, x0: torch.Tensor, noise: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """The training target for a network of type ``prediction`` (``alpha``, ``sigma``: floats or per-sample tensors)."""
    p = normalize_prediction(prediction)
    if p == "eps":
        return noise
    if p == "x0":
        return x0
    if p == "flow":
        return noise - x0
    a = _bcast(torch.as_tensor(alpha, device=x0.device), x0)
    s = _bcast(torch.as_tensor(sigma, device=x0.device), x0)
    return (a * noise.double() - s * x0.double()).to(x0.dtype)  # v = alpha eps - sigma x0


# --------------------------------------------------------------------------------------------------------------
# Betas.
# --------------------------------------------------------------------------------------------------------------

def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 (Common Diffusion Noise Schedules and Sample Steps are Flawed), Algorithm 1, in fp64.

    Shift ``sqrt(abar)`` so that its last value is 0 (zero SNR at t = T-1) and scale it so its first value is
    kept, then undo the cumulative product. The last beta becomes 1.
    """
    b = betas.double()
    abar_sqrt = torch.cumprod(1.0 - b, 0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt ** 2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def _linear_betas(t: int, beta_start: float, beta_end: float) -> torch.Tensor:
    # fp32 linspace exactly as diffusers (and the DDPM reference code) so the trained-for noise levels match.
    return torch.linspace(beta_start, beta_end, t, dtype=torch.float32).double()


def _scaled_linear_betas(t: int, beta_start: float, beta_end: float) -> torch.Tensor:
    # Latent diffusion's schedule: linear in sqrt(beta), squared (in fp32, as diffusers and the LDM code).
    return (torch.linspace(beta_start ** 0.5, beta_end ** 0.5, t, dtype=torch.float32) ** 2).double()


def _cosine_betas(t: int, max_beta: float = 0.999) -> torch.Tensor:
    # Nichol & Dhariwal 2021 eq. 17: abar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), s = 0.008; beta_t =
    # 1 - abar(t+1)/abar(t) clipped at max_beta (their eq. 17 text). Python floats (fp64), then stored
    # through fp32 exactly as diffusers' betas_for_alpha_bar ("squaredcos_cap_v2") stores them.
    def abar(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1.0 - abar((i + 1) / t) / abar(i / t), max_beta) for i in range(t)]
    return torch.tensor(betas, dtype=torch.float32).double()


# --------------------------------------------------------------------------------------------------------------
# Timestep spacings, exactly as diffusers' schedulers compute them.
# --------------------------------------------------------------------------------------------------------------

def spaced_timesteps(num_train_timesteps: int, steps: int, spacing: str = "leading", steps_offset: int = 0,
                     *, variant: str = "ddim") -> np.ndarray:
    """The descending timesteps of a ``steps``-step sampling run (Lin et al. 2023, Table 2 for the names).

    ``variant`` picks which diffusers scheduler family to reproduce:

    - ``"ddim"`` (DDPMScheduler, DDIMScheduler): int64. leading: ``arange(steps) * (T // steps) + offset``;
      trailing: ``round(arange(T, 0, -T/steps)) - 1``; linspace: ``round(linspace(0, T-1, steps))``.
    - ``"euler"`` (Euler, Euler ancestral): float32, as ``"ddim"`` except linspace is not rounded.
    - ``"dpm"`` (DPMSolverMultistepScheduler): int64; leading and linspace space ``steps + 1`` points and drop
      the last (``T // (steps + 1)`` for leading), trailing as ``"ddim"``.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    if variant not in ("ddim", "euler", "dpm"):
        raise ValueError(f"unknown spacing variant {variant!r}; choose ddim, euler or dpm")
    t = int(num_train_timesteps)
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if steps > t:
        raise ValueError(f"steps={steps} cannot exceed the {t} training timesteps of the schedule")
    if spacing == "trailing":
        ts = np.round(np.arange(t, 0, -t / steps)) - 1
    elif variant == "dpm":
        if spacing == "linspace":
            ts = np.linspace(0, t - 1, steps + 1).round()[::-1][:-1]
        else:
            ts = (np.arange(0, steps + 1) * (t // (steps + 1))).round()[::-1][:-1] + steps_offset
    elif spacing == "linspace":
        ts = np.linspace(0, t - 1, steps)[::-1]
        if variant == "ddim":
            ts = ts.round()
    else:  # leading
        ts = (np.arange(0, steps) * (t // steps)).round()[::-1] + steps_offset
    if variant == "euler":
        return np.ascontiguousarray(ts, dtype=np.float32)
    return np.ascontiguousarray(ts).astype(np.int64)


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (EDM) eq. 5: ``(sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``."""
    ramp = np.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional timestep of each sigma by linear interpolation in log sigma (as k-diffusion and diffusers)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigmas.shape)


# --------------------------------------------------------------------------------------------------------------
# Schedules.
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """A discrete-time variance-preserving schedule (``T`` betas, fp64).

    The sampling settings a checkpoint's scheduler config carries live here too, so a sampler reads them from
    the schedule and no pipeline restates them:

    - ``spacing`` / ``steps_offset``: the timestep spacing (SD1 ships ``leading`` with offset 1);
      ``spacing=None`` lets each sampler use its diffusers default (DDPM/DDIM leading, Euler/DPM linspace);
    - ``clip_sample``: DDPM and DDIM clamp their x0 estimate to ``[-clip_sample, clip_sample]`` (diffusers'
      ``clip_sample`` / ``clip_sample_range``); None: no clamp;
    - ``set_alpha_to_one``: DDIM's ``abar`` after the last step is 1, else ``abar_0``.

    ``kind`` names the beta recipe (``linear``, ``scaled_linear``, ``cosine``, ``custom``).
    """

    betas: torch.Tensor
    kind: str = "custom"
    zero_snr: bool = False
    spacing: str | None = None
    steps_offset: int = 0
    clip_sample: float | None = None
    set_alpha_to_one: bool = True
    alphas_cumprod: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        betas = torch.as_tensor(self.betas).detach().to("cpu", torch.float64).reshape(-1)
        if betas.numel() < 2:
            raise ValueError("a noise schedule needs at least 2 betas")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must lie in (0, 1]")
        if self.spacing is not None and self.spacing not in SPACINGS:
            raise ValueError(f"unknown timestep spacing {self.spacing!r}; choose one of {', '.join(SPACINGS)}")
        if self.clip_sample is not None and not self.clip_sample > 0:
            raise ValueError(f"clip_sample must be a positive number or None, got {self.clip_sample!r}")
        object.__setattr__(self, "betas", betas)
        # abar_t = prod_{s<=t} (1 - beta_s)   (Ho et al. 2020, eq. 4), in fp64.
        object.__setattr__(self, "alphas_cumprod", torch.cumprod(1.0 - betas, 0))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.betas.numel())

    @property
    def alphas(self) -> torch.Tensor:
        """sqrt(abar_t): the signal scale of x_t (fp64)."""
        return self.alphas_cumprod.sqrt()

    @property
    def sigmas_vp(self) -> torch.Tensor:
        """sqrt(1 - abar_t): the noise scale of x_t (fp64)."""
        return (1.0 - self.alphas_cumprod).sqrt()

    def k_sigmas(self) -> torch.Tensor:
        """k-diffusion / Karras sigma_t = sqrt((1 - abar_t) / abar_t) per training timestep (fp64).

        As diffusers' Euler and DPM-Solver schedulers, a zero-SNR final ``abar`` is replaced by 2^-24 so that
        sigma stays finite (sigma_max ~ 4096).
        """
        acp = self.alphas_cumprod.clone()
        if acp[-1] == 0:
            acp[-1] = 2.0 ** -24
        return ((1.0 - acp) / acp).sqrt()

    def alpha_sigma(self, t: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) gathered at integer timesteps ``t`` (fp64, on ``t``'s device)."""
        t = torch.as_tensor(t)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"timesteps must be integers, got {t.dtype}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_train_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps}), got "
                             f"[{int(t.min())}, {int(t.max())}]")
        acp = self.alphas_cumprod.to(t.device)[t]
        return acp.sqrt(), (1.0 - acp).sqrt()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): ``alpha_t x0 + sigma_t noise`` with ``t`` of shape (B,) (Ho et al. 2020, eq. 4)."""
        a, s = self.alpha_sigma(t)
        a, s = _bcast(a.to(x0.device), x0), _bcast(s.to(x0.device), x0)
        return (a * x0.double() + s * noise.double()).to(x0.dtype)

    def target(self, prediction: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The training target at integer timesteps ``t`` for a network of type ``prediction``."""
        a, s = self.alpha_sigma(t)
        return prediction_target(prediction, x0, noise, a.to(x0.device), s.to(x0.device))

    def timesteps(self, steps: int, *, variant: str = "ddim", spacing: str | None = None,
                  steps_offset: int | None = None, default_spacing: str = "leading") -> np.ndarray:
        """:func:`spaced_timesteps` with this schedule's spacing (argument > schedule > ``default_spacing``)."""
        spacing = spacing or self.spacing or default_spacing
        offset = self.steps_offset if steps_offset is None else steps_offset
        ts = spaced_timesteps(self.num_train_timesteps, steps, spacing, offset, variant=variant)
        if ts.size and (ts.max() >= self.num_train_timesteps or ts.min() < 0):
            raise ValueError(f"{spacing} spacing with steps={steps} and steps_offset={offset} gives timesteps "
                             f"outside [0, {self.num_train_timesteps}); use fewer steps or another spacing")
        return ts

    def with_sampling(self, **settings) -> "NoiseSchedule":
        """The same betas with other sampling settings (``spacing``, ``steps_offset``, ``clip_sample``,
        ``set_alpha_to_one``)."""
        unknown = set(settings) - {"spacing", "steps_offset", "clip_sample", "set_alpha_to_one"}
        if unknown:
            raise TypeError(f"with_sampling: unknown settings {sorted(unknown)}; choose spacing, steps_offset, "
                            "clip_sample or set_alpha_to_one")
        return dataclasses.replace(self, **settings)

    @classmethod
    def from_diffusers_config(cls, config: dict) -> "NoiseSchedule":
        """Build from a diffusers ``scheduler_config.json`` dict: the betas (recipe, zero SNR) and the sampling
        settings, each with the default diffusers' DDPM/DDIM schedulers apply when a key is absent."""
        t = int(config.get("num_train_timesteps", 1000))
        kind = config.get("beta_schedule", "linear")
        if config.get("trained_betas") is not None:
            betas = torch.tensor(config["trained_betas"], dtype=torch.float32).double()
            sched = cls(betas, kind="custom")
            if config.get("rescale_betas_zero_snr", False):
                sched = cls(rescale_zero_terminal_snr(sched.betas), kind="custom", zero_snr=True)
        else:
            sched = make_schedule(kind, t, beta_start=config.get("beta_start", 0.0001),
                                  beta_end=config.get("beta_end", 0.02),
                                  zero_snr=bool(config.get("rescale_betas_zero_snr", False)))
        clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample", True) else None
        return cls(sched.betas, kind=sched.kind, zero_snr=sched.zero_snr,
                   spacing=config.get("timestep_spacing"), steps_offset=int(config.get("steps_offset", 0)),
                   clip_sample=clip, set_alpha_to_one=bool(config.get("set_alpha_to_one", True)))

    def to_diffusers_config(self, prediction: str) -> dict:
        """The diffusers ``DDPMScheduler`` config of this schedule and a prediction type (what
        :meth:`from_diffusers_config` reads back to an equal schedule).

        Linear and scaled-linear betas are written as their recipe and end points (read back from the betas:
        ``linspace`` keeps both ends); any other schedule, or one rescaled to zero terminal SNR, as the exact
        ``trained_betas``, so diffusers rebuilds the same betas too."""
        cfg = {
            "_class_name": "DDPMScheduler",
            "num_train_timesteps": self.num_train_timesteps,
            "prediction_type": _PREDICTION_TO_DIFFUSERS[normalize_prediction(prediction)],
            "variance_type": "fixed_small",
            "clip_sample": self.clip_sample is not None,
            "clip_sample_range": self.clip_sample or 1.0,
        }
        if self.spacing is not None:
            cfg["timestep_spacing"] = self.spacing
        if self.steps_offset:
            cfg["steps_offset"] = self.steps_offset
        if not self.set_alpha_to_one:
            cfg["set_alpha_to_one"] = False
        betas = self.betas.double()
        if self.kind in ("linear", "scaled_linear") and not self.zero_snr:
            cfg.update(beta_schedule=self.kind, beta_start=_tidy(float(betas[0])), beta_end=_tidy(float(betas[-1])))
        elif self.kind == "cosine" and not self.zero_snr:
            cfg["beta_schedule"] = "squaredcos_cap_v2"
        else:
            cfg.update(beta_schedule="linear", trained_betas=betas.tolist())
        return cfg


def _tidy(x: float) -> float:
    """The shortest decimal (up to 8 digits) whose fp32 rounding is ``x`` (the betas are made in fp32, as in
    diffusers): 1e-4 in the JSON instead of 9.999999747378752e-05, rebuilding the same betas; else ``x``."""
    for digits in range(1, 9):
        short = float(f"{x:.{digits}g}")
        if torch.tensor(short, dtype=torch.float32).item() == x:
            return short
    return x


def _finish(betas: torch.Tensor, kind: str, zero_snr: bool, spacing, steps_offset) -> NoiseSchedule:
    if zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return NoiseSchedule(betas, kind=kind, zero_snr=zero_snr, spacing=spacing, steps_offset=steps_offset)


def linear_schedule(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, *,
                    zero_snr: bool = False, spacing: str | None = None, steps_offset: int = 0) -> NoiseSchedule:
    """Ho et al. 2020, Sec. 4: betas linear from 1e-4 to 0.02 over T = 1000 (diffusers ``linear``)."""
    return _finish(_linear_betas(num_train_timesteps, beta_start, beta_end), "linear", zero_snr, spacing,
                   steps_offset)


def scaled_linear_schedule(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                           *, zero_snr: bool = False, spacing: str | None = None,
                           steps_offset: int = 0) -> NoiseSchedule:
    """Latent diffusion / SD1: sqrt(beta) linear from sqrt(0.00085) to sqrt(0.012) (diffusers ``scaled_linear``)."""
    return _finish(_scaled_linear_betas(num_train_timesteps, beta_start, beta_end), "scaled_linear", zero_snr,
                   spacing, steps_offset)


def cosine_schedule(num_train_timesteps: int = 1000, max_beta: float = 0.999, *, zero_snr: bool = False,
                    spacing: str | None = None, steps_offset: int = 0) -> NoiseSchedule:
    """Nichol & Dhariwal 2021 cosine schedule (diffusers ``squaredcos_cap_v2``)."""
    return _finish(_cosine_betas(num_train_timesteps, max_beta), "cosine", zero_snr, spacing, steps_offset)


_KINDS = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "cosine", "squaredcos_cap_v2": "cosine"}


def make_schedule(kind: str, num_train_timesteps: int = 1000, *, beta_start: float | None = None,
                  beta_end: float | None = None, zero_snr: bool = False, spacing: str | None = None,
                  steps_offset: int = 0) -> NoiseSchedule:
    """A schedule by name: ``linear``, ``scaled_linear``, ``cosine`` (alias ``squaredcos_cap_v2``)."""
    name = _KINDS.get(kind)
    if name is None:
        raise ValueError(f"unknown beta schedule {kind!r}; choose one of {', '.join(_KINDS)}")
    kw = dict(zero_snr=zero_snr, spacing=spacing, steps_offset=steps_offset)
    if name == "cosine":
        return cosine_schedule(num_train_timesteps, **kw)
    fn = linear_schedule if name == "linear" else scaled_linear_schedule
    ends = {k: v for k, v in (("beta_start", beta_start), ("beta_end", beta_end)) if v is not None}
    return fn(num_train_timesteps, **ends, **kw)


@dataclass(frozen=True)
class FlowSchedule:
    """Rectified flow (Esser et al. 2024, SD3): ``x_t = (1 - s) x0 + s eps``, model predicts ``eps - x0``.

    ``shift`` warps sigmas toward noise, ``s' = shift s / (1 + (shift - 1) s)`` (SD3 eq. 23; SD3 uses 3.0).
    Timesteps given to the network are ``1000 * s``, as diffusers' ``FlowMatchEulerDiscreteScheduler``.
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 2:
            raise ValueError("num_train_timesteps must be at least 2")
        if not self.shift > 0:
            raise ValueError(f"shift must be positive, got {self.shift}")

    def _shifted(self, s):
        return self.shift * s / (1 + (self.shift - 1) * s)

    def sigmas(self, steps: int) -> np.ndarray:
        """``steps + 1`` descending sigmas in fp64 ending at 0, exactly as diffusers' set_timesteps.

        diffusers spaces ``steps`` timesteps linearly between the shifted training range
        ``[s'(1), s'(1/T)]`` and then shifts them again; reproduced here (it is what SD3 samples with).
        """
        if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        t = self.num_train_timesteps
        sigma_max, sigma_min = float(self._shifted(1.0)), float(self._shifted(1.0 / t))
        s = np.linspace(sigma_max * t, sigma_min * t, steps) / t
        return np.concatenate([self._shifted(s), [0.0]])

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``(1 - s) x0 + s noise`` with per-sample ``sigma`` of shape (B,)."""
        s = _bcast(torch.as_tensor(sigma, device=x0.device).double(), x0)
        return ((1 - s) * x0.double() + s * noise.double()).to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The velocity ``noise - x0`` the network is trained to predict."""
        return noise - x0
