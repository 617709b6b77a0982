"""Streaming checkpoint loading: an fp32 safetensors file loads into a bf16 model one tensor at a time.

Two properties, no timing:

* memory: loading a full-size SD1.5 VAE (83.7M parameters, 335 MB in fp32) into bf16 in a fresh process raises
  the peak resident set (VmHWM, reset just before the load through ``/proc/self/clear_refs``) by about the bf16
  weights (167 MB), far from the fp32 file plus the bf16 copy (502 MB) that reading the whole file first costs;
* values: every loaded tensor equals the file's tensor converted by torch (``.to(torch.bfloat16)``), through the
  lazy path of each loader (SD1 single file, diffusers folder, standalone VAE) and the SD3 key transforms
  (fused qkv split, swapped adaLN halves) applied when a tensor is read.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastdiff.io import checkpoint as io_ck
from fastdiff.io import sd_checkpoint as ck
from fastdiff.models import clip_text, unet_sd, vae
from fastdiff.pipelines.sd1 import load_sd1

TINY = ck.SD1Configs(unet_sd.TINY, vae.TINY, clip_text.TINY)
ROOT = Path(__file__).resolve().parents[1]


def _random_fill(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _full_size_vae_file(path: Path) -> int:
    """A diffusers-layout SD1.5 VAE file of random fp32 weights; returns the number of parameters."""
    m = vae.AutoencoderKL(vae.SD15)
    _random_fill(m)
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    save_file(sd, str(path))
    return sum(v.numel() for v in sd.values())


_CHILD = textwrap.dedent("""
    import json, sys, torch
    from fastdiff.io.sd_checkpoint import load_vae

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set: the peak below is the load's own
    m = load_vae(sys.argv[1], dtype=torch.bfloat16)
    bytes_bf16 = sum(p.numel() * p.element_size() for p in m.state_dict().values())
    print(json.dumps({"before": before, "peak": status("VmHWM"), "bf16": bytes_bf16}))
""")


def _can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _can_reset_peak(), reason="needs Linux /proc/self/clear_refs to reset the peak resident set")
def test_fp32_file_to_bf16_never_holds_the_fp32_set(tmp_path):
    path = tmp_path / "vae_fp32.safetensors"
    n = _full_size_vae_file(path)
    fp32 = 4 * n
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    rise = r["peak"] - r["before"]
    assert r["bf16"] == 2 * n
    # The model's bf16 weights must be resident (the load really happened) ...
    assert rise >= 0.9 * r["bf16"], f"peak rose by {rise / 2**20:.0f} MiB, less than the bf16 weights"
    # ... and the rise must stay far below the fp32 set plus the bf16 copy (what reading the file whole costs):
    # at most the bf16 weights plus half the fp32 file (bounce buffer and allocator slack are a few MiB).
    limit = r["bf16"] + fp32 // 2
    assert rise < limit, (f"loading raised the peak resident set by {rise / 2**20:.0f} MiB for {r['bf16'] / 2**20:.0f} "
                          f"MiB of bf16 weights from a {fp32 / 2**20:.0f} MiB fp32 file: the fp32 set was resident")


def _assert_converted(model: torch.nn.Module, expected: dict[str, torch.Tensor]):
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert got[k].dtype == torch.bfloat16, k
        assert torch.equal(got[k], v.to(torch.bfloat16)), k


def test_single_file_bf16_equals_torch_conversion(tmp_path):
    """SD1 single file (fp32) -> bf16 through the lazy path == the fp32 load converted by torch, every tensor."""
    comps = ck.SD1Components(_random_fill(unet_sd.UNetSD(unet_sd.TINY)), _random_fill(vae.AutoencoderKL(vae.TINY), 1),
                             _random_fill(clip_text.CLIPTextModel(clip_text.TINY), 2), None, {})
    path = tmp_path / "tiny.safetensors"
    ck.save_sd1_single_file(comps, path)
    assert all(v.dtype == torch.float32 for v in load_file(str(path)).values())
    lazy = io_ck.open_state_dict(path)
    assert all(isinstance(v, io_ck.LazyTensor) for v in lazy.values())
    ours = ck.load_sd1_single_file(path, dtype=torch.bfloat16, configs=TINY)
    _assert_converted(ours.unet, comps.unet.state_dict())
    _assert_converted(ours.vae, comps.vae.state_dict())  # includes the LDM 1x1-conv attention -> matrix slice
    _assert_converted(ours.text_encoder, comps.text_encoder.state_dict())
    # the same through a diffusers folder written from it
    load_sd1(path, dtype=torch.float32, configs=TINY).save_pretrained(tmp_path / "folder")
    folder = ck.load_sd1_diffusers(tmp_path / "folder", dtype=torch.bfloat16)
    _assert_converted(folder.unet, comps.unet.state_dict())
    _assert_converted(folder.text_encoder, comps.text_encoder.state_dict())


def test_lazy_transforms_read_only_when_taken(tmp_path):
    """A recorded transform (the SD3 qkv split and adaLN swap) runs on read, gives the eager result, and a slice
    of a stored tensor does not keep the whole stored tensor alive."""
    from fastdiff.io.sd3_checkpoint import mmdit_from_original

    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(3 * 8, 8, generator=g)
    ada = torch.randn(4 * 8, 8, generator=g)
    sd = {"joint_blocks.0.x_block.attn.qkv.weight": qkv, "joint_blocks.0.context_block.adaLN_modulation.1.weight": ada,
          "final_layer.adaLN_modulation.1.weight": ada.clone()}
    save_file(sd, str(tmp_path / "m.safetensors"))
    lazy = mmdit_from_original(io_ck.open_state_dict(tmp_path / "m.safetensors"))
    eager = mmdit_from_original(load_file(str(tmp_path / "m.safetensors")))
    assert lazy.keys() == eager.keys()
    for k in eager:
        assert isinstance(lazy[k], io_ck.LazyTensor) and lazy[k].shape == eager[k].shape, k
        t = io_ck.materialize(lazy[k], torch.bfloat16)
        assert torch.equal(t, eager[k].to(torch.bfloat16)), k
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), k


def test_chunked_conversion_of_a_tensor_larger_than_the_buffer(tmp_path, monkeypatch):
    """A tensor read through several bounce-buffer chunks (odd sizes, a tail) equals torch's conversion."""
    monkeypatch.setattr(io_ck, "_CHUNK", 4 * 1000 + 4)  # 1001 fp32 elements a chunk
    t = torch.randn(7, 1003, generator=torch.Generator().manual_seed(3)) * 1e3
    save_file({"w": t, "i": torch.arange(5)}, str(tmp_path / "t.safetensors"))
    lazy = io_ck.open_state_dict(tmp_path / "t.safetensors")
    assert torch.equal(lazy["w"].load(torch.bfloat16), t.to(torch.bfloat16))
    assert torch.equal(lazy["w"].load(), t)
    assert torch.equal(lazy["i"].load(torch.bfloat16), torch.arange(5))  # integers are never cast


def test_corrupt_header_ranges_are_named(tmp_path):
    """A header whose byte ranges do not fit its shapes or the file is refused before any tensor is read."""
    save_file({"w": torch.zeros(4, 4)}, str(tmp_path / "ok.safetensors"))
    raw = (tmp_path / "ok.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["w"]["shape"] = [4, 5]  # 80 bytes claimed, 64 stored
    body = json.dumps(header).encode()
    (tmp_path / "bad.safetensors").write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n:])
    with pytest.raises(io_ck.CheckpointError, match="truncated or corrupt.*'w'"):
        io_ck.open_state_dict(tmp_path / "bad.safetensors")
