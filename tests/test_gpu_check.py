"""fastdiff.gpu_check: the one-command GPU check, its CPU dry run and its refusal without a GPU.

The dry run executes every measuring step (peaks, ops against their baselines, the sampling loop, the SD1 and SD3
steps against diffusers) on the CPU at tiny sizes: the figures mean nothing, the code paths and the JSON do.
"""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from fastdiff import gpu_check
from fastdiff.ops.registry import PRIORITY

OPS = ["group_norm+silu", "geglu", "layer_norm", "rms_norm", "layer_norm_modulate", "modulate", "gate_residual",
       "sampler_step+cfg", "attention", "conv2d", "linear+gelu", "timestep_embedding"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only dry run, where every device case "
                    "skips; with a CUDA device those cases run (tests/test_gpu_pipelines.py and the op tests)")
def test_without_cuda_it_says_so_and_exits_2(capsys):
    assert gpu_check.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "no CUDA device"


def test_dry_run_measures_every_step_and_writes_the_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    threads = torch.get_num_threads()
    assert gpu_check.main(["--dry-run", "--no-tests", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # the dry run's single thread does not leak
    r = json.loads(out.read_text())
    assert r["dry_run"] and r["device"]["type"] == "cpu" and r["errors"] == {} and r["complete"] is True
    assert r["peaks"]["copy_gbps"] > 0 and r["peaks"]["bf16_matmul_tflops"] > 0
    names = {row["op"].split(" ")[0] for row in r["ops"]}
    assert names == set(OPS), names
    for row in r["ops"]:
        assert "error" not in row, row
        assert row["backend"] in PRIORITY and row["ratio"] > 0 and row["gbps"] > 0 and row["frac_copy_bw"] > 0
    assert all("frac_matmul_peak" in row for row in r["ops"] if row["op"].startswith("attention"))
    loop = r["graph_loop"]
    assert loop["eager_s"] > 0 and "no CUDA graph" in loop["graph"]
    cases = {row["case"].split(" ")[0] for row in r["pipelines"]}
    assert cases == {"SD1", "SD3"}
    for row in r["pipelines"]:
        assert row["fastdiff_it_s"] > 0 and row["weights_mib"] > 0
        if "ratio" in row:  # diffusers present: the same random weights give the same output (bf16 rounding)
            assert row["rel_diff_vs_diffusers"] < 0.05, row
    table = capsys.readouterr().out
    assert "bf16 matmul" in table and "group_norm+silu" in table and f"wrote {out}" in table


def test_budget_skips_what_does_not_fit(tmp_path, capsys, monkeypatch):
    # a pipeline case that needs more time than is left is skipped with a line, never run half-way
    monkeypatch.setattr(gpu_check, "TINY", gpu_check.dataclasses.replace(gpu_check.TINY, pipeline_case_s=1e6))
    out = tmp_path / "r.json"
    assert gpu_check.main(["--dry-run", "--no-tests", "--out", str(out), "--budget-s", "0"]) == 0
    r = json.loads(out.read_text())
    assert r["ops"] == [] and [row["skipped"] for row in r["pipelines"]] == ["time budget", "time budget"]
    assert "skipped, not enough of the time budget left" in capsys.readouterr().out


def test_a_run_stopped_midway_leaves_what_it_measured(tmp_path, monkeypatch):
    # a time limit that kills the check during the graph loop: the JSON already holds the peaks and the ops
    def stopped(dev, sz):
        raise KeyboardInterrupt

    monkeypatch.setattr(gpu_check, "measure_graph_loop", stopped)
    out = tmp_path / "r.json"
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["--dry-run", "--no-tests", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["complete"] is False and r["tests"] == {"skipped": "--no-tests"}
    assert r["peaks"]["copy_gbps"] > 0 and {row["op"].split(" ")[0] for row in r["ops"]} == set(OPS)
    assert "graph_loop" not in r and "pipelines" not in r
    assert not list(tmp_path.glob("*.tmp"))


def test_gpu_check_sh_installs_the_carried_wheels_onto_the_path(tmp_path):
    # benchmarks/gpu_check.sh installs .whl/*.whl (here FASTDIFF_WHEELS) offline into a folder that the check
    # then imports from: a one-module wheel stands in for diffusers, a stand-in python shows what the check sees
    wheels = tmp_path / "whl"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "fdprobe-1.0-py3-none-any.whl", "w") as z:
        z.writestr("fdprobe.py", "VALUE = 'carried'\n")
        z.writestr("fdprobe-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: fdprobe\nVersion: 1.0\n")
        z.writestr("fdprobe-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                   "Tag: py3-none-any\n")
        z.writestr("fdprobe-1.0.dist-info/RECORD", "")
    python = tmp_path / "python"
    python.write_text(f"""#!/bin/sh
if [ "$1 $2" = "-m fastdiff.gpu_check" ]; then shift 2; exec {sys.executable} -c \
  'import sys, fdprobe; print("check sees", fdprobe.VALUE, "args", *sys.argv[1:])' "$@"; fi
exec {sys.executable} "$@"
""")
    python.chmod(0o755)
    site = tmp_path / "site"
    env = dict(os.environ, PYTHON=str(python), FASTDIFF_WHEELS=str(wheels), FASTDIFF_WHEEL_SITE=str(site))
    script = Path(gpu_check.REPO) / "benchmarks" / "gpu_check.sh"
    p = subprocess.run(["bash", str(script), "--dry-run"], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "wheels: installing 1 from" in p.stdout and "fdprobe-1.0-py3-none-any.whl" in p.stdout
    assert p.stdout.strip().endswith("check sees carried args --dry-run"), p.stdout
    assert (site / "fdprobe.py").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only dry run, where every device case "
                    "skips; with a CUDA device those cases run (tests/test_gpu_pipelines.py and the op tests)")
def test_the_tests_step_counts_and_keeps_pytest_output(tmp_path):
    # the dry run's test step: one op file's device cases, each skipped here with the reason the JSON records
    log = tmp_path / "tests.log"
    r = gpu_check.run_tests(True, 300, log)
    assert r["failed"] == 0 and r["passed"] == 0 and r["skipped"] > 0, r
    assert set(r["skip_reasons"]) == {"no CUDA device"}, r["skip_reasons"]
    assert r["log"] == str(log) and "skipped" in log.read_text()


def _fake_gpu_without_kernels(monkeypatch, rc):
    # a CUDA device (sm_90) whose fastdiff._C lacks CUDA kernels, and a pip that exits with `rc`
    from fastdiff import _ext

    monkeypatch.setattr(_ext, "has_cuda_kernels", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (9, 0))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.delenv(gpu_check._BUILT_ENV, raising=False)
    calls = []

    def run(cmd, cwd, env):
        calls.append((cmd, cwd, env))
        return subprocess.CompletedProcess(cmd, rc)

    monkeypatch.setattr(gpu_check.subprocess, "run", run)
    return calls


def test_a_failed_build_is_recorded_and_the_check_goes_on(monkeypatch, capsys):
    calls = _fake_gpu_without_kernels(monkeypatch, rc=1)
    r = gpu_check.ensure_built(torch.device("cuda"), ["--budget-s", "60"])
    (cmd, cwd, env), = calls
    assert cmd[1:] == ["-m", "pip", "install", "-e", ".", "--no-build-isolation", "--no-deps"]
    assert cwd == gpu_check.REPO and env["TORCH_CUDA_ARCH_LIST"] == "9.0" and env["FASTDIFF_BUILD_CUDA"] == "1"
    assert r["failed"] == "pip exit status 1" and r["built"] is False and r["cuda_kernels"] is False
    assert "build: FAILED (pip exit status 1" in capsys.readouterr().out


def test_a_build_restarts_the_check_with_its_time(monkeypatch):
    _fake_gpu_without_kernels(monkeypatch, rc=0)
    restarted = []

    def execve(path, args, env):
        restarted.append((args, env))
        raise SystemExit(0)

    monkeypatch.setattr(gpu_check.os, "execve", execve)
    with pytest.raises(SystemExit):
        gpu_check.ensure_built(torch.device("cuda"), ["--budget-s", "60"])
    (args, env), = restarted
    assert args[1:] == ["-m", "fastdiff.gpu_check", "--budget-s", "60", "--no-build"]
    monkeypatch.setenv(gpu_check._BUILT_ENV, env[gpu_check._BUILT_ENV])  # what the restarted check sees
    assert gpu_check.ensure_built(torch.device("cuda"), [])["built"] is True


def test_junit_counts(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text("""<?xml version="1.0"?><testsuites><testsuite>
<testcase classname="tests.test_geglu" name="a[on_cuda-cuda]"/>
<testcase classname="tests.test_geglu" name="b[on_cuda-cuda]"><failure message="boom"/></testcase>
<testcase classname="tests.test_geglu" name="c[on_cuda-cuda]"><skipped message="no CUDA device"/></testcase>
<testcase classname="tests.test_geglu" name="d[on_cuda-cuda]"><error message="setup"/></testcase>
</testsuite></testsuites>""")
    c = gpu_check._junit_counts(xml)
    assert (c["passed"], c["failed"], c["skipped"]) == (1, 2, 1)
    assert c["failures"] == ["tests.test_geglu::b[on_cuda-cuda]", "tests.test_geglu::d[on_cuda-cuda]"]
    assert c["skip_reasons"] == {"no CUDA device": 1}
