"""Peak resident memory of a whole SD1.5 txt2img on the CPU (load, encode, N steps, decode), fastdiff vs diffusers.

Run: ``pytest benchmarks/bench_memory.py --benchmark-only -s``. The weights are full-size random SD1.5 (UNet
859.5M, VAE 83.7M, CLIP-L text 123.1M parameters) written once in fp32: an original single file (what fastdiff
loads) and a diffusers folder (what diffusers loads; fastdiff loads it too). Each case runs in a fresh Python
process, so its peak is its own: it imports the library, loads the pipeline in the case's dtype, and runs a
guided 512x512 DDIM txt2img (batch 1, classifier-free guidance as one batched UNet call per step), reading the
process's peak resident set (``VmHWM`` in ``/proc/self/status``) after the load and at the end. Resident memory
counts everything the process holds (torch's allocator, oneDNN's packed weights, mapped file pages), unlike the
allocator-based peaks of the other benchmarks.

The default run is reduced: 2 sampling steps instead of 20 (memory does not grow with the step count: the same
buffers are reused every step; only the time does) and the two bf16 cases from the single file. ``--full-size``
runs the 20 steps and every case.

Cases: fastdiff bf16 and fp32 from the single file, fastdiff bf16 from the diffusers folder, fastdiff bf16 with
the packed-weight cache of its convolutions and linears switched off (the memory that cache costs), and diffusers
``StableDiffusionPipeline.from_pretrained(folder, torch_dtype=...)`` in fp32 and bf16. On CPUs where torch has no
bf16 convolution kernels (oneDNN without AVX512-BF16 / AMX: ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is
False) torch's own bf16 convolutions run at ~1 GFLOP/s and one diffusers bf16 512x512 txt2img would take hours:
there diffusers bf16 is measured for the load alone (where its peak is reached) and the row says so.
Each row of the summary: case, peak GiB of fastdiff / of the baseline in ``peak MB``, and the time of the whole
run in the time columns (ratio = baseline time / fastdiff time); the lines printed with ``-s`` add the load-only
peak, the resident set after loading and the ratio of the peaks.

By hand, one case with its stages: ``python benchmarks/bench_memory.py fastdiff FILE bf16 2 512 on`` (arguments:
LIB PATH DTYPE STEPS [SIZE] [PACK: on = replace, cache, off] [VAE TILE px] [PACK_AFTER]); it prints, per stage
(load, encode, each of the first denoising steps, decode), the peak and final resident set and what the UNet, the
text encoder and the VAE hold as plain weights and as packed copies. ``python benchmarks/bench_memory.py
write:FOLDER`` writes the random full-size single file. With the default ``pack_after`` (2) the UNet packs during
step 2, so 2 steps reach the peak of 20: later steps reuse the same buffers.

Measured (2-core AMD EPYC Zen 3, AVX2 only: bf16 math runs in fp32, so packed weights are fp32; 2 steps; the
machine was shared, so the times are not comparable), peak resident GiB:

| case | load alone | whole 512x512 txt2img |
|---|---|---|
| fastdiff bf16, single file, reading the whole file first (before streaming) | 6.65 | - |
| fastdiff bf16, diffusers folder, before streaming | 5.31 | - |
| fastdiff bf16, single file / folder, streaming, packed copy beside the plain weight | 2.69 / 2.68 | 7.53 |
| fastdiff bf16, single file, streaming, packing off | 2.69 | 3.88 |
| fastdiff bf16, single file, streaming, packed copy replacing the plain weight | 2.69 | 5.97 |
| fastdiff fp32, single file, streaming (packed copy beside the plain weight) | 4.67 | 8.12 |
| diffusers bf16 / fp32, folder | 6.04 / 0.88 (weights mapped, read at first use) | not run / 5.74 |

The stages of the "replacing" row (GiB; plain / packed bytes of each component at the end of the stage; the last
column is the peak less the weights and the process after its imports, 0.50 GiB: activations, buffers, heap):

| stage | peak | end | UNet | text encoder | VAE | peak - weights - base |
|---|---|---|---|---|---|---|
| load | 2.69 | 2.68 | 1.60 / 0 | 0.23 / 0 | 0.16 / 0 | 0.20 |
| encode (prompt, negative prompt) | 3.13 | 3.13 | 1.60 / 0 | 0.07 / 0.32 | 0.16 / 0 | 0.49 |
| denoise step 1 (plain weights) | 3.68 | 3.44 | 1.60 / 0 | 0.07 / 0.32 | 0.16 / 0 | 1.04 |
| denoise step 2 (packs the UNet) | 5.22 | 5.09 | 0.05 / 3.10 | 0.07 / 0.32 | 0.16 / 0 | 1.02 |
| decode (512x512, one tile) | 5.97 | 5.12 | 0.05 / 3.10 | 0.07 / 0.32 | 0.16 / 0 | 1.78 |

The peak is the VAE decode, with the UNet's packed copies still resident: on this CPU they are fp32, twice the
bf16 weights (3.10 GiB for 1.60). Where bf16 math is native (AVX512-BF16 / AMX) the packed copy is bf16 and
replacing costs no memory.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import FULL_SIZE, add_row

diffusers = pytest.importorskip("diffusers")

STEPS = 20 if FULL_SIZE else 2
SIZE = 512
ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of an astronaut riding a horse on mars"

# The child process: one case, fresh. Prints one JSON line with bytes and seconds.
_CHILD = textwrap.dedent("""
    import json, sys, time
    lib, path, dname, steps, size, pack, tile, pack_after = sys.argv[1:9]
    steps, size, tile, pack_after = int(steps), int(size), int(tile), int(pack_after)
    import torch
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    def reset_peak():  # VmHWM restarts from the current resident set (Linux: clear_refs 5)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dname]
    if lib == "fastdiff":
        import fastdiff
        from fastdiff.ops.conv import Conv2d
        from fastdiff.ops.linear import Linear
        Conv2d.pack_policy = Linear.pack_policy = {"on": "replace"}.get(pack, pack)
        if pack_after:
            Conv2d.pack_after = Linear.pack_after = pack_after
    else:
        import diffusers
    out = {"base": status("VmRSS")}
    t0 = time.perf_counter()
    if lib == "fastdiff":
        pipe = fastdiff.load_pipeline(path, dtype=dtype)
        if tile:
            pipe.enable_vae_tiling(tile)
        run = lambda: pipe.txt2img(PROMPT, steps=steps, sampler="ddim", seed=0, height=size, width=size)
    else:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        if tile:
            pipe.vae.enable_tiling()
        run = lambda: pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                           height=size, width=size, output_type="pt").images
    out.update(load_s=time.perf_counter() - t0, load_peak=status("VmHWM"), after_load=status("VmRSS"))

    # Stages (fastdiff): a forward pre-hook on each component closes the previous stage, recording its peak
    # resident set, the resident set at its end and what each component then holds (plain weights, packed copies).
    stages, state = [], {"stage": "load", "unet_calls": 0, "t": time.perf_counter()}
    if lib == "fastdiff":
        from fastdiff.ops._packed import packed_bytes, plain_bytes
        comps = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "vae": pipe.vae}

        def close(next_stage):
            rec = {"stage": state["stage"], "peak": status("VmHWM"), "end": status("VmRSS"),
                   "s": time.perf_counter() - state["t"]}
            for k, m in comps.items():
                rec[k] = [plain_bytes(m), packed_bytes(m)]
            stages.append(rec)
            state.update(stage=next_stage, t=time.perf_counter())
            reset_peak()

        def enter(name):
            def hook(mod, args):
                if name == "denoise":
                    state["unet_calls"] += 1
                    if state["unet_calls"] <= 3:  # each of the first steps its own stage (packing happens there)
                        return close(f"denoise step {state['unet_calls']}")
                    if state["stage"] != "denoise rest":
                        return close("denoise rest")
                elif state["stage"] != name:
                    close(name)
            return hook
        pipe.text_encoder.register_forward_pre_hook(enter("encode"))
        pipe.unet.register_forward_pre_hook(enter("denoise"))
        pipe.vae.decoder.register_forward_pre_hook(enter("decode"))
        pipe.vae.post_quant_conv.register_forward_pre_hook(enter("decode"))
        close("after load")
    if steps > 0:
        t0 = time.perf_counter()
        with torch.no_grad():
            img = run()
        assert torch.isfinite(img).all()
        if lib == "fastdiff":
            close("end")
        out.update(run_s=time.perf_counter() - t0, peak=max([status("VmHWM")] + [r["peak"] for r in stages]),
                   end=status("VmRSS"), stages=stages)
    print(json.dumps(out))
""").replace("PROMPT", repr(PROMPT))


def run_case(lib: str, path: Path, dname: str, steps: int, size: int = SIZE, pack: str = "on", tile: int = 0,
             pack_after: int = 0) -> dict:
    """One case in a fresh process (cwd: this checkout, so it imports this tree's fastdiff). ``pack``: the
    Conv2d/Linear ``pack_policy`` ("on" = the default "replace", "cache", "off"); ``tile``: VAE tiling (pixels);
    ``pack_after``: their ``pack_after`` (0: the default)."""
    out = subprocess.run([sys.executable, "-c", _CHILD, lib, str(path), dname, str(steps), str(size), pack, str(tile),
                          str(pack_after)],
                         cwd=ROOT, capture_output=True, text=True, timeout=6 * 3600)
    if out.returncode != 0:
        raise RuntimeError(f"{lib} {dname} case failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _torch_has_bf16_conv() -> bool:
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(probe()) if probe is not None else True


def write_sd15_files(folder: Path, diffusers_folder: bool = True) -> tuple[Path, Path]:
    """Full-size random SD1.5 in fp32: an original single file and a diffusers folder (built on the meta device
    and filled tensor by tensor, written, then freed: one copy of the weights at a time in this process)."""
    from fastdiff.io import sd_checkpoint as ck
    from fastdiff.models import clip_text, unet_sd, vae
    from fastdiff.models.clip_tokenizer import CLIPTokenizer

    g = torch.Generator().manual_seed(0)

    def random(cls, cfg):
        with torch.device("meta"):
            m = cls(cfg)
        m = m.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in m.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02 + (1.0 if name.endswith("weight") else 0.0))
                else:  # roughly variance-preserving, so the activations stay finite through 20 steps
                    fan_in = max(1, p[0].numel())
                    p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            for name, b in m.named_buffers():
                if name.endswith("position_ids"):
                    b.copy_(torch.arange(b.shape[-1]).expand_as(b))
        return m.eval()

    comps = ck.SD1Components(random(unet_sd.UNetSD, unet_sd.SD15), random(vae.AutoencoderKL, vae.SD15),
                             random(clip_text.CLIPTextModel, clip_text.SD15), CLIPTokenizer.from_bundled(),
                             dict(ck.SD1_SCHEDULER_CONFIG))
    single = folder / "sd15_fp32.safetensors"
    ck.save_sd1_single_file(comps, single)
    if diffusers_folder:
        ck.save_sd1_diffusers(comps, folder / "sd15_fp32")
    del comps
    return single, folder / "sd15_fp32"


@pytest.fixture(scope="module")
def sd15_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench_memory")
    yield write_sd15_files(folder)
    shutil.rmtree(folder, ignore_errors=True)


def _gib(b: float) -> float:
    return b / 2**30


def _case_ids():
    yield "fastdiff-bf16-file", ("fastdiff", "file", "bf16", "on")
    yield "fastdiff-bf16-file-nopack", ("fastdiff", "file", "bf16", "off")
    if FULL_SIZE:  # the reduced default keeps the suite short: the two bf16 cases from the file
        yield "fastdiff-fp32-file", ("fastdiff", "file", "fp32", "on")
        yield "fastdiff-bf16-folder", ("fastdiff", "folder", "bf16", "on")


CASES = dict(_case_ids())
_RESULTS: dict[str, dict] = {}


def _baseline(sd15_files, dname: str) -> dict:
    """diffusers from the folder in ``dname`` (whole txt2img, or the load alone where torch's bf16 convs crawl)."""
    key = f"diffusers-{dname}"
    if key not in _RESULTS:
        steps = STEPS if (dname == "fp32" or _torch_has_bf16_conv()) else 0
        _RESULTS[key] = run_case("diffusers", sd15_files[1], dname, steps)
    return _RESULTS[key]


@pytest.mark.parametrize("case", list(CASES))
def test_txt2img_peak_memory(benchmark, sd15_files, case):
    lib, src, dname, pack = CASES[case]
    path = sd15_files[0] if src == "file" else sd15_files[1]
    ours = run_case(lib, path, dname, STEPS, pack=pack)
    base = _baseline(sd15_files, dname)
    whole = "run_s" in base
    base_peak = base["peak"] if whole else base["load_peak"]
    what = f"{SIZE}px {STEPS} steps" + ("" if FULL_SIZE else " (reduced: 20 with --full-size)")
    label = {"on": "", "off": ", packed-weight cache off"}[pack]
    print(f"\n{case}: whole txt2img ({what}) peak {_gib(ours['peak']):.2f} GiB, load alone peak "
          f"{_gib(ours['load_peak']):.2f} GiB, resident after load {_gib(ours['after_load']):.2f} GiB, process base "
          f"{_gib(ours['base']):.2f} GiB; load {ours['load_s']:.1f} s, txt2img {ours['run_s']:.1f} s")
    print(f"  diffusers {dname} (folder): " + (
        f"whole txt2img peak {_gib(base['peak']):.2f} GiB, load alone {_gib(base['load_peak']):.2f} GiB; "
        f"txt2img {base['run_s']:.1f} s" if whole else
        f"load alone peak {_gib(base['load_peak']):.2f} GiB (txt2img not run: torch has no bf16 convolution "
        f"kernels on this CPU, one 512x512 bf16 txt2img would take hours)"))
    print(f"  peak ratio fastdiff / diffusers: {ours['peak'] / base_peak:.2f}"
          + ("" if whole else " (fastdiff whole txt2img vs diffusers load alone)"))
    add_row(f"SD1 txt2img peak memory ({src}{label})", f"{what} {dname}",
            ours["load_s"] + ours["run_s"], base["load_s"] + base.get("run_s", float("nan")),
            baseline="diffusers" + ("" if whole else " (load only)"),
            peak_mb=ours["peak"] / 2**20, peak_mb_base=base_peak / 2**20)
    benchmark.extra_info.update(case=case, fastdiff=ours, diffusers=base)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def stage_table(out: dict) -> str:
    """The per-stage lines of a fastdiff case: peak and end resident set, and what each component holds."""
    lines = ["| stage | s | peak GiB | end GiB | UNet plain / packed | text encoder plain / packed | "
             "VAE plain / packed | peak - weights - process base |", "|---|---|---|---|---|---|---|---|"]
    for r in out.get("stages", []):
        w = sum(sum(r[k]) for k in ("unet", "text_encoder", "vae"))
        comp = " | ".join(f"{_gib(r[k][0]):.2f} / {_gib(r[k][1]):.2f}" for k in ("unet", "text_encoder", "vae"))
        lines.append(f"| {r['stage']} | {r['s']:.1f} | {_gib(r['peak']):.2f} | {_gib(r['end']):.2f} | {comp} | "
                     f"{_gib(r['peak'] - w - out['base']):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    # one case by hand: python benchmarks/bench_memory.py LIB PATH DTYPE STEPS [SIZE] [PACK] [TILE] [PACK_AFTER]
    # (LIB "write:FOLDER" writes the random full-size SD1.5 single file into FOLDER and prints its path)
    a = sys.argv[1:]
    if a[0].startswith("write:"):
        print(write_sd15_files(Path(a[0][6:]), diffusers_folder=False)[0])
        sys.exit(0)
    res = run_case(a[0], Path(a[1]), a[2], int(a[3]), int(a[4]) if len(a) > 4 else SIZE,
                   a[5] if len(a) > 5 else "on", int(a[6]) if len(a) > 6 else 0, int(a[7]) if len(a) > 7 else 0)
    print(json.dumps(res))
    print(f"peak {_gib(res.get('peak', res['load_peak'])):.2f} GiB, load peak {_gib(res['load_peak']):.2f} GiB, "
          f"process base {_gib(res['base']):.2f} GiB, load {res['load_s']:.1f} s, txt2img {res.get('run_s', 0):.1f} s")
    print(stage_table(res))
