"""The computed SD3 memory table (fastdiff.pipelines.memory) against measured peak memory on the CPU.

Weights: the parameter counts of the real configurations equal diffusers' / transformers' models built on the
meta device, and the computed bytes equal the resident memory a real CPU copy takes. Activations: a real
forward in a fresh process, whose peak resident memory above the weights is read from the kernel
(``ru_maxrss``), against the figure counted on meta tensors for the same call. The counted figure runs the
reference ops, so it is an upper bound of the fused CPU kernels (measured <= counted); it must not be loose
either (measured >= half of it).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastdiff.models import clip_text, mmdit, t5, vae
from fastdiff.pipelines.memory import peak_activation_bytes, sd3_memory_table, weight_bytes

try:
    import diffusers
    import transformers
except ImportError:  # the reference implementations are test extras: fastdiff's own tests still run
    diffusers = transformers = None
needs_reference = pytest.mark.skipif(diffusers is None or transformers is None,
                                     reason="needs diffusers and transformers (the reference implementation)")

MiB = 1024 ** 2


@needs_reference
def test_parameter_counts_equal_the_public_models():
    rows = {r.name: r for r in sd3_memory_table(512, 512)}
    cfgs = {"MMDiT": mmdit.SD3_MEDIUM.to_diffusers(), "VAE": vae.SD3.to_diffusers()}
    with torch.device("meta"):
        theirs = {
            "MMDiT": diffusers.SD3Transformer2DModel(**{k: v for k, v in cfgs["MMDiT"].items() if k != "_class_name"}),
            "VAE": diffusers.AutoencoderKL(**{k: v for k, v in cfgs["VAE"].items() if k != "_class_name"}),
            "CLIP-L": transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
                **{k: v for k, v in clip_text.CLIP_L14_PROJ.to_transformers().items()
                   if k not in ("architectures", "model_type", "torch_dtype")})),
            "CLIP-G": transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
                **{k: v for k, v in clip_text.CLIP_BIGG14.to_transformers().items()
                   if k not in ("architectures", "model_type", "torch_dtype")})),
            "T5-XXL": transformers.T5EncoderModel(transformers.T5Config(
                **{k: v for k, v in t5.T5_XXL.to_transformers().items() if k not in ("architectures", "model_type")})),
        }
    for name, m in theirs.items():
        n = sum(p.numel() for p in m.parameters())
        assert rows[name].parameters == n, (name, rows[name].parameters, n)
    # SD3-medium with T5-XXL in fp16: ~15.4 GB of weights alone (15.0-16.0 GB)
    total16 = sum(r.weights["fp16/bf16"] for r in rows.values())
    assert 15.0e9 < total16 < 16.0e9, total16


_PROBE = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from fastdiff.models import mmdit, vae
    from fastdiff.pipelines.memory import weight_bytes

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    def reset_peak():  # Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    what = sys.argv[1]
    # touch the libraries (their code and workspaces count as resident too) before the baseline
    torch.nn.functional.conv2d(torch.randn(1, 4, 8, 8), torch.randn(4, 4, 3, 3)).normal_(0, 1)
    with torch.device("meta"):
        small = vae.AutoencoderKL(vae.TINY)
    small.to_empty(device="cpu")  # the first to_empty from meta loads ~34 MB of torch's own, once
    base = status("VmRSS")
    if what == "vae":
        with torch.device("meta"):
            m = vae.AutoencoderKL(vae.SD3)
        args = (torch.randn(1, 16, 32, 32),)
        fn = m.decode
    else:
        with torch.device("meta"):
            m = mmdit.MMDiT(mmdit.MMDiTConfig(**{**mmdit.SD3_MEDIUM.__dict__, "num_layers": 2}))
        args = (torch.randn(2, 16, 32, 32), torch.tensor([500.0, 500.0]), torch.randn(2, 333, 4096),
                torch.randn(2, 2048))
        fn = m
    base = status("VmRSS")  # the inputs are made; now the weights
    m = m.to_empty(device="cpu").eval()
    with torch.no_grad():
        for p in list(m.parameters()) + list(m.buffers()):
            p.normal_(0, 0.02)
        weights_rss = status("VmRSS") - base
        fn(*args)  # warm-up: oneDNN's packed weights and thread buffers are made once and kept
        before = status("VmRSS")
        reset_peak()
        out = fn(*args)
        peak = status("VmHWM")
    print(json.dumps({"weights_rss": weights_rss, "weights": weight_bytes(m), "activations": peak - before,
                      "out_bytes": out.numel() * out.element_size()}))
""")


def _probe(what: str) -> dict:
    # large blocks straight from mmap and back to the kernel on free, so resident memory follows the tensors
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 20)}
    out = subprocess.run([sys.executable, "-c", _PROBE, what], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _counted(what: str) -> int:
    """The table's method on meta tensors, fp32, for the probe's call."""
    from fastdiff.ops import use_backend
    from fastdiff.pipelines.memory import _flash_attention_memory

    with torch.device("meta"):
        if what == "vae":
            m = vae.AutoencoderKL(vae.SD3).eval()
            fn, args = m.decode, (torch.empty(1, 16, 32, 32),)
        else:
            m = mmdit.MMDiT(mmdit.MMDiTConfig(**{**mmdit.SD3_MEDIUM.__dict__, "num_layers": 2})).eval()
            fn, args = m, (torch.empty(2, 16, 32, 32), torch.empty(2), torch.empty(2, 333, 4096), torch.empty(2, 2048))
    with use_backend("ref"), _flash_attention_memory():
        return peak_activation_bytes(fn, *args)[0]


@pytest.mark.parametrize("what", ["vae", "mmdit"])
def test_counted_memory_matches_measured_peak(what):
    got = _probe(what)
    # weights: the computed bytes are what a CPU copy occupies (page rounding and torch's own buffers aside)
    assert abs(got["weights_rss"] - got["weights"]) <= 0.03 * got["weights"] + 16 * MiB, got
    counted = _counted(what)
    measured = got["activations"]
    assert 0.5 * counted <= measured <= 1.1 * counted + 16 * MiB, \
        f"{what}: measured peak {measured / MiB:.0f} MiB vs counted {counted / MiB:.0f} MiB"
