"""The math of the reverse process: noise schedules and samplers (pure functions, one signature).

    x0 = SAMPLERS["ddim"](Denoiser(net, "eps"), torch.randn(shape, generator=g), linear_schedule(),
                          steps=50, cond=labels, uncond=null_labels, guidance=3.0)

See :mod:`fastdiff.samplers.sampling` for the signature and :mod:`fastdiff.samplers.model` for the model-call
convention (``net(x, t, cond) -> output``, classifier-free guidance in one batched forward).
"""
from fastdiff.samplers import model as _model
from fastdiff.samplers import sampling as _sampling
from fastdiff.samplers import schedules as _schedules
from fastdiff.samplers.model import Denoiser, as_denoiser, cat_cond, guided_forward
from fastdiff.samplers.sampling import (
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_flow_euler,
)
from fastdiff.samplers.schedules import (
    PREDICTIONS,
    SPACINGS,
    FlowSchedule,
    NoiseSchedule,
    cosine_schedule,
    eps_coefs,
    karras_sigmas,
    linear_schedule,
    make_schedule,
    normalize_prediction,
    prediction_target,
    rescale_zero_terminal_snr,
    scaled_linear_schedule,
    spaced_timesteps,
    to_eps,
    to_x0,
    x0_coefs,
)

# Name -> sampler, used by the CLI (--sampler) and the pipelines. All share one signature.
SAMPLERS = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "flow_euler": sample_flow_euler,
}


def get_sampler(name: str):
    """The sampler registered under ``name``; the error lists the choices."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None


__all__ = ["SAMPLERS", "get_sampler", *_model.__all__, *_sampling.__all__, *_schedules.__all__]
