"""Fused CFG + sampler update vs the eager sequence it replaces (target: >= 3x eager)."""
import pytest
import torch

from fastdiff.ops import sampler_step
from fastdiff.ops.registry import all_ops

from conftest import nbytes

# SD1 latents at 512px with CFG batch 2 and at 1024px, SD3 latents at 1024px.
SHAPES = [(2, 4, 64, 64), (1, 4, 128, 128), (1, 16, 128, 128)]
G, PX, PM, CLIP, A, B, S = 7.5, 1.25, -0.6, 1.0, 0.8, 0.15, 0.05


def eager(x, model_out, noise):
    """What a sampler written in eager PyTorch does: CFG, x0 from eps, clamp, posterior mean + sigma z."""
    uncond, cond = model_out.chunk(2)
    eps = uncond + G * (cond - uncond)
    x0 = PX * x + PM * eps
    x0 = x0.clamp(-CLIP, CLIP)
    return A * x0 + B * x + S * noise


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sampler_step(compare, shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    model_out = torch.randn((2 * shape[0],) + shape[1:], generator=g).to(dtype)
    noise = torch.randn(shape, generator=g).to(dtype)
    backend = all_ops()["sampler_step"].select(x, model_out, A, B, S, noise, pred=(PX, PM), clip=CLIP,
                                                guidance_scale=G)

    def fast():
        return sampler_step(x, model_out, A, B, S, noise, pred=(PX, PM), clip=CLIP, guidance_scale=G)

    torch.testing.assert_close(fast().float(), eager(x.float(), model_out.float(), noise.float()),
                               rtol=2e-2, atol=2e-2)
    ratio = compare(f"sampler_step [{backend}]", f"{tuple(shape)} {str(dtype)[6:]}", fast,
                    lambda: eager(x, model_out, noise), nbytes(x, model_out, noise, x))
    print(f"sampler_step {shape} {dtype}: {ratio:.2f}x eager")
