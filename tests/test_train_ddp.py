"""Data-parallel training: 2 gloo processes against 1 process with the same global batch.

The oracle is the single-process trainer itself (whose exact resume tests/test_train.py checks). Two processes
are started from the test with ``torch.multiprocessing`` and join the group from the environment variables
``torchrun`` would set, so they take the same path as ``torchrun --nproc-per-node 2 -m fastdiff train``.

Tolerance. One process computes each weight gradient as one fp32 sum over the global micro-batch (inside the
convolution/linear backward kernels); two processes sum each half, then the all-reduce adds the halves. The
two results differ only by fp32 rounding in the order of additions: a few ulps of the sum of the magnitudes of
the terms. The losses of a step are means of the same per-sample terms, so they agree to ~1e-6 relative; the
weights move by AdamW steps of at most ``lr`` per step, whose normalised update m / sqrt(v) passes a relative
gradient error through unchanged (it cannot amplify it beyond ``lr`` per step), so after 4 steps the weights
agree to a small fraction of ``4 lr`` -- except where a gradient is itself rounding noise (an attention key
bias: softmax cancels it, so its exact gradient is zero; or a component whose terms cancel): there AdamW's
normalised step is +-lr in either run whatever the noise's size. Hence two bounds on the weights (lr 1e-3, 4
steps): every element within AdamW's largest move, 2 lr a step, and all but 0.1% of the elements within 1e-6
(measured: 2 of 9,216 elements of one conv weight at 2.5e-6, the rest within 1e-6); the losses within rtol 1e-5.
A real difference (a wrong shard, a missing all-reduce, a different noise draw) changes the loss in its first or
second digit (checked below by a run with another seed). Within the 2-process run, the ranks' weights, EMA and
optimizer states are compared bit for bit.
"""
import os
import shutil
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

from fastdiff.io.datasets import load_sklearn_digits
from fastdiff.io.run_checkpoint import load_checkpoint
from fastdiff.train import TrainConfig, Trainer
from fastdiff.train.distributed import shard_slice

CFG = dict(model="tiny", dataset="digits", image_size=16, batch_size=8, grad_accum=2, precision="fp32",
           lr=1e-3, warmup_steps=0, log_every=1, sample_every=4, sample_steps=2, samples_per_class=1,
           ckpt_every_steps=2, threads=1, max_steps=4)
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Recording:
    """The dataset, recording the index batches a process loads."""

    def __init__(self, data):
        self._data, self.seen = data, []

    def __getattr__(self, name):
        return getattr(self._data, name)

    def __len__(self):
        return len(self._data)

    def batch(self, idx):
        self.seen.append(idx.clone())
        return self._data.batch(idx)


def _writes_under(root: str, log: list):
    """An audit hook appending every write-like file event under ``root`` (open for writing, mkdir, rename/
    replace, remove) to ``log``: safetensors writes a temporary file from native code, then os.replace's it."""
    root = os.path.realpath(root)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def under(p):
        try:
            p = os.path.realpath(os.fsdecode(p))
        except TypeError:
            return False
        return p == root or p.startswith(root + os.sep)

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                mode is None and isinstance(flags, int) and flags & write_flags)
            if writing and under(path):
                log.append((event, os.fsdecode(path)))
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree") and args and under(args[0]):
            log.append((event, os.fsdecode(args[0])))
        elif event == "os.rename":  # os.replace(src, dst) too
            log.extend((event, os.fsdecode(a)) for a in args[:2] if under(a))

    sys.addaudithook(hook)


def _worker(rank, world, port, run_dir, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from fastdiff.train.distributed import teardown

    torch.set_num_threads(1)
    writes: list = []
    _writes_under(run_dir, writes)
    data = _Recording(load_sklearn_digits(size=16))
    tr = Trainer(TrainConfig(run_dir=run_dir, **CFG), dataset=data, progress=False)
    assert tr.dist.world_size == world and tr.dist.rank == rank and tr.dist.backend == "gloo"
    losses = tr.run(max_steps=2)
    if rank == 0:  # the step-2 checkpoint, for the test to resume with one process
        shutil.copytree(run_dir, os.path.join(out_dir, "at2"))
    tr.dist.barrier()
    losses += tr.run()
    opt = tr.optimizer.state_dict()["state"]
    torch.save({"losses": losses, "indices": data.seen, "writes": writes,
                "model": tr.model.state_dict(), "ema": tr.ema.state_dict(),
                "opt": {f"{i}.{k}": v for i, st in opt.items() for k, v in st.items()}},
               os.path.join(out_dir, f"rank{rank}.pt"))
    teardown()


@pytest.fixture(scope="module")
def digits():
    return load_sklearn_digits(size=16)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    run_dir, out_dir = root / "run", root / "out"
    out_dir.mkdir()
    mp.start_processes(_worker, args=(2, _free_port(), str(run_dir), str(out_dir)), nprocs=2, join=True,
                       start_method="spawn")
    return run_dir, out_dir, [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _single(run_dir, digits, resume=False, **kw):
    return Trainer(TrainConfig(run_dir=str(run_dir), **{**CFG, **kw}), dataset=digits, resume=resume,
                   progress=False)


def _assert_weights_close(a: dict, b: dict):
    """Every weight within AdamW's largest possible move (2 lr a step: the two runs' steps may point opposite
    ways where a gradient is rounding noise, e.g. an attention key bias, whose exact gradient is zero because
    softmax cancels it), and all but 0.1% of them within WEIGHT_ATOL (module docstring)."""
    assert a.keys() == b.keys()
    bound = 2 * CFG["lr"] * CFG["max_steps"]
    far = total = 0
    for k in a:
        d = (a[k].double() - b[k].double()).abs()
        assert d.max() <= bound, (k, float(d.max()))
        far += int((d > WEIGHT_ATOL).sum())
        total += d.numel()
    assert far <= 1e-3 * total, (far, total)


def test_two_processes_match_one(two_process_run, digits, tmp_path):
    run_dir, _, (r0, r1) = two_process_run
    one = _single(tmp_path / "one", digits)
    losses = one.run()
    # the ranks report the same (all-reduced) losses and hold the same weights, EMA and optimizer, bit for bit
    assert r0["losses"] == r1["losses"]
    for part in ("model", "ema", "opt"):
        assert r0[part].keys() == r1[part].keys()
        assert all(torch.equal(r0[part][k], r1[part][k]) for k in r0[part]), part
    # ... equal to the 1-process run up to fp32 reduction order (module docstring)
    torch.testing.assert_close(torch.tensor(r0["losses"], dtype=torch.float64),
                               torch.tensor(losses, dtype=torch.float64), rtol=LOSS_RTOL, atol=0)
    _assert_weights_close(r0["model"], one.model.state_dict())
    _assert_weights_close(r0["ema"], one.ema.state_dict())
    # the checkpoint rank 0 wrote holds the same weights as the 1-process run's
    m2, e2, _, st2 = load_checkpoint(run_dir)
    m1, e1, _, st1 = load_checkpoint(tmp_path / "one")
    assert st2["step"] == st1["step"] == 4
    _assert_weights_close(m2, m1)
    # not vacuous: another seed (other data order and noise) is far outside the tolerance
    other = _single(tmp_path / "other", digits, seed=1, max_steps=2).run()
    assert max(abs(a - b) / b for a, b in zip(other, losses[:2])) > 100 * LOSS_RTOL


def test_shards_are_disjoint_and_cover_the_global_batch(two_process_run, digits, tmp_path):
    _, _, (r0, r1) = two_process_run
    one = _single(tmp_path / "one", digits)
    steps, accum = CFG["max_steps"], CFG["grad_accum"]
    assert len(r0["indices"]) == len(r1["indices"]) == steps * accum
    for k, (a, b) in enumerate(zip(r0["indices"], r1["indices"])):
        full = one._batch_indices(*divmod(k, accum))
        assert len(a) == len(b) == CFG["batch_size"] // 2
        assert not set(a.tolist()) & set(b.tolist())
        assert torch.equal(torch.cat([a, b]), full)  # rank 0 the first half, rank 1 the second


def test_only_rank_0_writes(two_process_run):
    run_dir, _, (r0, r1) = two_process_run
    assert r1["writes"] == []
    written = {os.path.basename(p) for _, p in r0["writes"]}
    assert {"config.json", "latest.json", "train.log", "samples-latest.png"} <= written
    assert any(n.startswith("ckpt-0000004") for n in os.listdir(run_dir))


def test_resume_two_process_run_with_one_process(two_process_run, digits):
    _, out_dir, (r0, _) = two_process_run
    tr = _single(out_dir / "at2", digits, resume=True)
    assert tr.step == 2
    rest = tr.run()
    torch.testing.assert_close(torch.tensor(rest, dtype=torch.float64),
                               torch.tensor(r0["losses"][2:], dtype=torch.float64), rtol=LOSS_RTOL, atol=0)
    _assert_weights_close(tr.model.state_dict(), r0["model"])
    _assert_weights_close(tr.ema.state_dict(), r0["ema"])


def test_shard_slice_and_uneven_batch_error():
    parts = [shard_slice(12, r, 3) for r in range(3)]
    assert [(s.start, s.stop) for s in parts] == [(0, 4), (4, 8), (8, 12)]
    with pytest.raises(ValueError, match="batch_size 10 .* divisible by the number of processes 4"):
        shard_slice(10, 0, 4)
