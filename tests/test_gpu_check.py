"""fastdiff.gpu_check: the one-command GPU check, its CPU dry run and its refusal without a GPU.

The dry run executes every measuring step (peaks, ops against their baselines, the sampling loop, the SD1 and SD3
steps against diffusers) on the CPU at tiny sizes: the figures mean nothing, the code paths and the JSON do.
"""
import json

import pytest
import torch

from fastdiff import gpu_check
from fastdiff.ops.registry import PRIORITY

OPS = ["group_norm+silu", "geglu", "layer_norm", "rms_norm", "layer_norm_modulate", "modulate", "gate_residual",
       "sampler_step+cfg", "attention", "conv2d", "linear+gelu", "timestep_embedding"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
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
    assert r["dry_run"] and r["device"]["type"] == "cpu" and r["errors"] == {}
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
