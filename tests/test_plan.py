"""Memory plan (fastdiff train --plan) and gradient checkpointing.

Oracles: the saved tensors found by walking the autograd graph node by node (``grad_fn._saved_*``: independent
of the saved_tensors_hooks the plan uses), the CPU allocator's peak during a forward pass (the profiler's
allocation events: independent of the dispatch mode the plan follows storages with), the real optimizer state
of torch's AdamW and fastdiff's AdamW8bit after a step, the published parameter count of the CIFAR-10 DDPM, the
plain (non-checkpointed) pass, and the peak resident memory of a real training step on the CPU for every model
kind.
"""
import dataclasses
import json
import os
import subprocess
import textwrap
import sys

import pytest
import torch

from fastdiff.models.unet2d import CIFAR10_DDPM, TINY, UNet2D
from fastdiff.train import TrainConfig, plan
from fastdiff.train.optim import AdamW8bit
from fastdiff.train.plan import GiB, measure_activations, optimizer_state_bytes, reserve_bytes, training_forward

torch.set_num_threads(1)


def _inputs(cfg, b):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g),
            torch.randint(0, 1000, (b,), generator=g), torch.randint(0, cfg.num_class_embeds, (b,), generator=g))


def _is_python_scalar(v):
    """Whether ``v`` is a Python number autograd saved as a 0-dim tensor (``0.5 * x`` keeps 0.5 for the backward
    of mul): such a "wrapped number" is float64/int64/complex128 and ranks below a 0-dim tensor of a narrower
    dtype of its category in type promotion, which a real 0-dim tensor does not."""
    low = {torch.float64: torch.float16, torch.int64: torch.int8, torch.complex128: torch.complex64}.get(v.dtype)
    return v.dim() == 0 and low is not None and torch.result_type(torch.zeros((), dtype=low), v) == low


def _graph_saved_bytes(model, b, bf16, forward=None):
    """Bytes of the unique non-parameter storages held by the autograd graph of one forward pass, found by
    visiting every node's ``_saved_*`` attributes (and ``saved_tensors`` of custom functions).

    Python scalar operands saved by a node are left out: they are host-side 0-dim tensors even when the pass runs
    on a GPU, so they take no device memory (8 bytes each on the host)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = forward(b) if forward is not None else model(*_inputs(model.config, b))
    seen, stack, found = set(), [out.grad_fn], {}

    def add(v):
        if isinstance(v, torch.Tensor) and not _is_python_scalar(v):
            st = v.untyped_storage()
            if st.data_ptr() not in params:
                found[st.data_ptr()] = st.nbytes()

    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if name.startswith("_saved_"):
                v = getattr(node, name)
                for x in v if isinstance(v, (tuple, list)) else (v,):
                    add(x)
        for v in getattr(node, "saved_tensors", ()) or ():
            add(v)
        stack.extend(f for f, _ in node.next_functions)
    return sum(found.values())


def test_graph_walk_tells_python_scalars_from_tensors():
    x = torch.randn(3, requires_grad=True)
    assert _is_python_scalar((0.5 * x).grad_fn._saved_other)
    assert _is_python_scalar((x * 3).grad_fn._saved_other)
    assert not _is_python_scalar((x * torch.tensor(0.5, dtype=torch.float64)).grad_fn._saved_other)
    assert not _is_python_scalar((x * torch.tensor(3)).grad_fn._saved_other)
    assert not _is_python_scalar(x.exp().grad_fn._saved_result)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activations_linear_in_batch_and_match_graph_walk(precision):
    torch.manual_seed(0)
    model = UNet2D(TINY).train()
    act = measure_activations(TINY, precision, batches=(2, 4), model=model)
    bf16 = precision == "bf16"
    walk = {b: _graph_saved_bytes(model, b, bf16) for b in (2, 4, 6)}
    # linear in the batch: the step 2 -> 4 equals the step 4 -> 6, and both equal 2 x the plan's per-sample bytes
    assert walk[4] - walk[2] == walk[6] - walk[4] == 2 * act.per_sample
    assert act.at(2) == walk[2] and act.at(4) == walk[4]
    assert act.per_sample > 0


def _allocator_forward_peak(model, b):
    """The most bytes the CPU allocator holds at once during one training forward pass, from the profiler's
    allocation and free events (independent of the dispatch mode the plan follows storages with)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = training_forward(model, b)
    del out
    now = peak = 0
    for _, n in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                       if e.name() == "[memory]"):
        now += n
        peak = max(peak, now)
    return peak


def test_forward_working_set_matches_the_allocator_peak():
    torch.manual_seed(0)
    model = UNet2D(TINY).train()
    act = measure_activations(TINY, "fp32", batches=(2, 4), model=model)
    # a UNet's forward peaks at its last up block, where not-saved temporaries sit next to the saved tensors
    assert act.transient_per_sample > 0
    for b in (2, 4, 8):  # 8: the linear fit extrapolated
        assert act.peak(b) == _allocator_forward_peak(model, b), b


def test_bf16_halves_the_per_sample_activations(use_settings):
    # native bf16 kernels, as on the GPU the plan targets: on CPUs without fast bf16 dot products fastdiff runs
    # attention in fp32 (and saves fp32 q/k/v), which is right for CPU speed but not what a GPU run saves
    use_settings(cpu_bf16_math="native")
    fp32 = measure_activations(TINY, "fp32")
    bf16 = measure_activations(TINY, "bf16")
    # activations are 2-byte under autocast; the few fp32 leftovers (norm statistics, softmax logsumexp, the
    # time-embedding MLP input) keep the ratio a little above one half
    assert 0.45 * fp32.per_sample < bf16.per_sample < 0.6 * fp32.per_sample
    # the fixed part under autocast holds the bf16 copies of the weights (2 bytes a parameter at most)
    n = UNet2D(TINY).num_parameters()
    assert fp32.fixed < 1024 and bf16.fixed <= 2 * n


def test_checkpointed_plan_is_smaller():
    plain = measure_activations(TINY, "bf16")
    ck = measure_activations(TINY, "bf16", grad_checkpointing=True)
    assert 0 < ck.per_sample < plain.per_sample
    p = plan(TrainConfig(model="tiny", image_size=16), channels=1, num_classes=10)
    assert p.max_batch(grad_checkpointing=True) > p.max_batch()


def test_optimizer_state_matches_real_optimizers():
    torch.manual_seed(0)
    model = UNet2D(TINY)
    params = list(model.parameters())
    # closed forms on hand-made shapes: AdamW 8 bytes a value; AdamW8bit 2 bytes + two fp32 absmax per block of
    # 256 (4096 values or more), 8 bytes a value below (its code books are constants outside the state)
    assert optimizer_state_bytes([(5000,), (100,)], "adamw") == 8 * 5100
    assert optimizer_state_bytes([(5000,), (100,)], "adamw8bit") == (2 * 5000 + 8 * 20) + 8 * 100
    with pytest.raises(ValueError, match="adamw or adamw8bit"):
        optimizer_state_bytes(params, "sgd")
    for name, opt in (("adamw", torch.optim.AdamW(params, lr=1e-3)),
                      ("adamw8bit", AdamW8bit(params, lr=1e-3))):
        model.zero_grad()
        model(*_inputs(TINY, 2)).square().mean().backward()
        opt.step()
        storages = {}
        for st in opt.state.values():
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v.ndim > 0:  # scalar step counters live on the host
                    storages[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
        assert sum(storages.values()) == optimizer_state_bytes(params, name), name


def test_parameter_arithmetic_and_batch_fit():
    p = plan(TrainConfig(model="cifar10_ddpm", precision="fp32", optimizer="adamw"), channels=3, num_classes=10,
             probe_batches=(1, 2))
    # Ho et al.'s CIFAR-10 model (google/ddpm-cifar10-32): 35,746,307 parameters; the trainer adds a class
    # embedding of 10 classes + the null class, 4 x 128 wide
    assert UNet2D(CIFAR10_DDPM).num_parameters() == 35_746_307
    assert p.num_parameters == 35_746_307 + 11 * 4 * 128
    n = p.num_parameters
    assert (p.weights, p.gradients, p.ema, p.optimizer_state, p.optimizer_workspace) == (4 * n, 4 * n, 4 * n,
                                                                                         8 * n, 4 * n)
    assert p.reserve == reserve_bytes(16 * GiB) == GiB + int(1.6 * GiB)
    usable = p.gpu_memory - p.reserve
    for ck in (False, True):
        b = p.max_batch(grad_checkpointing=ck)
        assert b > 0 and p.total(b, grad_checkpointing=ck) <= usable < p.total(b + 1, grad_checkpointing=ck)
    small = plan(TrainConfig(model="cifar10_ddpm", precision="fp32"), channels=3, num_classes=10,
                 probe_batches=(1, 2), gpu_memory_gb=4)
    assert small.max_batch() < p.max_batch()


@pytest.mark.parametrize("bf16", [False, True])
def test_grad_checkpointing_gives_the_same_loss_and_grads(bf16):
    torch.manual_seed(0)
    model = UNet2D(TINY).train()
    x, t, y = _inputs(TINY, 3)
    results = []
    for ck in (False, True):
        model.set_grad_checkpointing(ck)
        assert model.grad_checkpointing == ck
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(x, t, y).float().square().mean()
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fastdiff.train.cli", "train", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_cli_plan_runs_no_step(tmp_path):
    run = tmp_path / "run"
    res = _cli("--plan", "--run-dir", str(run), "--model", "tiny", "--dataset", "digits", "--image-size", "16",
               "--threads", "1", "--gpu-memory", "8")
    assert res.returncode == 0, res.stderr
    assert "largest batch that fits" in res.stdout and "GPU 8.0 GiB" in res.stdout
    assert "with grad checkpointing" in res.stdout
    assert not run.exists()  # no config, no checkpoint, no folder


def test_cli_plan_bad_config_is_a_clear_error(tmp_path):
    for args, msg in ((["--model", "unet9000"], "argument --model: invalid choice: 'unet9000'"),
                      (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
                      (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got 0"),
                      (["--gpu-memory", "0", "--dataset", "digits", "--image-size", "16", "--model", "tiny"],
                       "argument --gpu-memory: must be a number in (0, inf), got 0"),
                      (["--dataset", str(tmp_path / "missing")], "unknown dataset")):
        res = _cli("--plan", "--run-dir", str(tmp_path / "r"), *args)
        assert res.returncode == 2 and msg in res.stderr and "Traceback" not in res.stderr, (args, res.stderr)
    assert not (tmp_path / "r").exists()


# --- every model kind ------------------------------------------------------------------------------------------

_NAMES = tuple(str(i) for i in range(10))


def _kind_cfg(kind, tmp_path):
    """(TrainConfig, image channels) of a small run of each model kind the trainer trains."""
    if kind == "autoencoder":
        return TrainConfig(kind="autoencoder", model="tiny", image_size=16, precision="fp32")
    if kind == "text":
        return TrainConfig(conditioning="text", model="tiny", text_encoder="tiny", image_size=16, precision="fp32")
    from fastdiff.models import vae
    from fastdiff.train.latents import save_autoencoder

    folder = tmp_path / "ae"
    if not folder.exists():
        torch.manual_seed(0)
        save_autoencoder(vae.AutoencoderKL(dataclasses.replace(vae.TINY, in_channels=1, out_channels=1,
                                                               sample_size=16)), folder)
    cond = "text" if kind == "latent-text" else "class"
    return TrainConfig(autoencoder=str(folder), conditioning=cond, model="tiny", text_encoder="tiny", image_size=16,
                       precision="fp32")


@pytest.mark.parametrize("kind", ["autoencoder", "text", "latent-text", "latent-class"])
def test_every_kind_plan_matches_graph_walk(kind, tmp_path):
    from fastdiff.train.captions import CaptionTable
    from fastdiff.train.plan import architecture

    cfg = _kind_cfg(kind, tmp_path)
    p = plan(cfg, channels=1, num_classes=10, class_names=_NAMES)
    assert p.kind == {"autoencoder": "autoencoder", "text": "text-unet", "latent-text": "latent text-unet",
                      "latent-class": "latent unet2d"}[kind]
    latent = kind.startswith("latent")
    model = architecture(cfg, 4 if latent else 1, 8 if latent else 16, 10, _NAMES).train()
    captions = CaptionTable(_NAMES) if "text" in kind else None
    n = sum(q.numel() for q in model.parameters())
    assert p.num_parameters == n and p.weights == p.ema == p.gradients == 4 * n
    if latent:  # the tiny autoencoder (f2, 4 latent channels) kept in fp32 on the device
        from fastdiff.train.latents import load_autoencoder

        assert p.frozen_weights == 4 * sum(q.numel() for q in load_autoencoder(cfg.autoencoder).parameters()) > 0
    else:
        assert p.frozen_weights == 0
    walk = {b: _graph_saved_bytes(model, b, False, lambda b: training_forward(model, b, captions=captions))
            for b in (2, 4)}
    assert p.activations.at(2) == walk[2] and p.activations.at(4) == walk[4] and p.activations.per_sample > 0
    assert (p.activations_checkpointed is not None) == (kind == "latent-class")
    assert p.max_batch() > 0 and p.total(p.max_batch()) <= p.gpu_memory - p.reserve
    assert "largest batch that fits" in p.format()


_PEAK = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from fastdiff.train import TrainConfig, plan
    from fastdiff.train.captions import CaptionTable
    from fastdiff.train.optim import AdamW8bit
    from fastdiff.train.plan import architecture, training_forward

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    def reset_peak():  # Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    names = tuple(str(i) for i in range(10))
    out = {}
    for kind, cfg, batch in json.loads(sys.argv[1]):
        cfg = TrainConfig(**cfg)
        p = plan(cfg, channels=1, num_classes=10, class_names=names)
        latent = bool(cfg.autoencoder)
        model = architecture(cfg, 4 if latent else 1, 8 if latent else 16, 10, names).train()
        captions = CaptionTable(names) if cfg.conditioning == "text" and cfg.kind == "diffusion" else None
        opt = (AdamW8bit if cfg.optimizer == "adamw8bit" else torch.optim.AdamW)(model.parameters(), lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            training_forward(model, batch, captions=captions).float().square().mean().backward()
            opt.step()

        step()   # optimizer state allocated, libraries warm
        step()
        opt.zero_grad(set_to_none=True)
        base = status("VmRSS")
        reset_peak()
        step()
        measured = status("VmHWM") - base
        # what the step adds to resident weights + optimizer state: gradients, the step's workspace,
        # activations and the batch tensors
        predicted = p.gradients + p.optimizer_workspace + p.total(batch) - p.fixed
        out[kind] = [measured, predicted]
        del model, opt
    print(json.dumps(out))
""")


def test_every_kind_plan_bounds_the_measured_cpu_peak(tmp_path):
    cases = []
    for kind, batch, opt in (("unet2d", 48, "adamw"), ("autoencoder", 32, "adamw8bit"), ("text", 32, "adamw"),
                             ("latent-text", 64, "adamw8bit")):
        cfg = (TrainConfig(model="tiny", image_size=16, precision="fp32") if kind == "unet2d"
               else _kind_cfg(kind, tmp_path))
        d = {k: v for k, v in cfg.to_dict().items() if k in ("kind", "model", "conditioning", "text_encoder",
                                                             "autoencoder", "image_size", "precision")}
        cases.append((kind, {**d, "optimizer": opt}, batch))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    res = subprocess.run([sys.executable, "-c", _PEAK, json.dumps(cases)], capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    for kind, (measured, predicted) in json.loads(res.stdout.splitlines()[-1]).items():
        # the plan is an upper bound (no credit for activations freed during backward), and not a loose one
        assert 0.5 * predicted <= measured <= predicted, (kind, measured / 2 ** 20, predicted / 2 ** 20)
