"""Sinusoidal timestep embedding vs diffusers' get_timestep_embedding (a launch-bound chain of ~10 small ops)."""
import pytest
import torch

from fastdiff.ops import timestep_embedding
from fastdiff.ops.registry import all_ops

CASES = [(2, 320, True, 0), (2, 256, True, 0), (64, 320, True, 0)]  # SD1 CFG batch, SD3, a training batch


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-dim{c[1]}")
def test_timestep_embedding(compare, case):
    from diffusers.models.embeddings import get_timestep_embedding

    b, dim, flip, shift = case
    t = torch.linspace(0, 999, b)
    backend = all_ops()["timestep_embedding"].select(t, dim, flip, shift)
    compare(f"timestep_embedding [{backend}]", f"B={b} dim={dim} fp32", lambda: timestep_embedding(t, dim, flip, shift),
            lambda: get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift))
