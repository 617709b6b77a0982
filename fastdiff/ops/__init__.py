"""Fused ops of fastdiff, each with a pure-PyTorch ``*_ref`` beside it, chosen by one registry.

``use_backend(name)`` (or ``FASTDIFF_BACKEND=name``) forces a backend; ``all_ops()`` lists the ops.
"""
from fastdiff.ops import _backends  # noqa: F401  (registers the backend checks)
from fastdiff.ops.registry import BackendUnavailable, all_ops, current_backend, use_backend
from fastdiff.ops.sampler_step import sampler_step, sampler_step_ref
from fastdiff.ops.geglu import geglu, geglu_ref
from fastdiff.ops.group_norm import GroupNorm, group_norm, group_norm_ref
from fastdiff.ops.layer_norm import LayerNorm, layer_norm, layer_norm_ref
from fastdiff.ops.rms_norm import RMSNorm, rms_norm, rms_norm_ref
from fastdiff.ops.modulate import (gate_residual, gate_residual_ref, layer_norm_modulate, layer_norm_modulate_ref,
                                    modulate, modulate_ref)
from fastdiff.ops.timestep_embedding import timestep_embedding, timestep_embedding_ref
from fastdiff.ops.attention import attention, attention_ref
from fastdiff.ops.conv import Conv2d, conv2d, conv2d_ref
from fastdiff.ops.linear import Linear, linear, linear_ref
from fastdiff.ops._packed import restore_plain_weights

__all__ = [
    "BackendUnavailable",
    "all_ops",
    "current_backend",
    "use_backend",
    "sampler_step",
    "sampler_step_ref",
    "geglu",
    "geglu_ref",
    "GroupNorm",
    "group_norm",
    "group_norm_ref",
    "LayerNorm",
    "layer_norm",
    "layer_norm_ref",
    "RMSNorm",
    "rms_norm",
    "rms_norm_ref",
    "modulate",
    "modulate_ref",
    "layer_norm_modulate",
    "layer_norm_modulate_ref",
    "gate_residual",
    "gate_residual_ref",
    "timestep_embedding",
    "timestep_embedding_ref",
    "attention",
    "attention_ref",
    "Conv2d",
    "conv2d",
    "conv2d_ref",
    "Linear",
    "linear",
    "linear_ref",
    "restore_plain_weights",
]

from fastdiff.ops import _triton  # noqa: E402,F401  (triton backends of the ops above; keep last)
