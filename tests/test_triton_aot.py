"""Every Triton kernel configuration dispatch can launch compiles ahead of time for sm_89 (RTX 4080), with no
register spills and within the shared memory one block may use; plus the occupancy calculator on hand-computed
cases. No GPU is needed: ``triton.compile(..., target=GPUTarget("cuda", 89, 32))`` and the bundled ptxas.
"""
import pytest

triton = pytest.importorskip("triton")

from fastdiff.kernels import report  # noqa: E402
from fastdiff.kernels.report import SM89, occupancy  # noqa: E402

CONFIGS = report.all_configs()


def test_every_kernel_family_has_configs():
    names = {c["name"] for c in CONFIGS}
    assert {"attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq"} <= names, names


@pytest.mark.parametrize("cfg", CONFIGS, ids=[f"{c['name']}[{c['key']} w{c['num_warps']}]" for c in CONFIGS])
def test_compiles_for_sm89_without_spills(cfg):
    compiled, r = report.compile_config(cfg)
    assert ".target sm_89" in compiled.asm["ptx"]
    assert r.spill_bytes == 0, f"{r.name} {r.config}: {r.regs} registers and {r.spill_bytes} bytes of spills"
    assert r.regs <= SM89.max_regs_per_thread
    assert r.smem <= SM89.smem_per_block_optin, f"{r.name} {r.config}: {r.smem} B shared > 99 KB block limit"
    assert occupancy(r.regs, r.smem, r.num_warps)["blocks_per_sm"] >= 1


# Hand-computed with the sm_89 rules: registers per warp rounded up to 256, 16384 registers per SM
# sub-partition (4 of them), 48 warps and 24 blocks per SM, shared memory + 1 KB per block in 128 B units
# out of 100 KB.
@pytest.mark.parametrize("regs,smem,warps,blocks,occ,limiter", [
    # 255 regs -> 8192 per warp -> 2 warps per sub-partition -> 8 warps -> 2 blocks of 4: 8/48
    (255, 24576, 4, 2, 8 / 48, "registers"),
    # 168 regs -> 5376 per warp -> 3 per sub-partition -> 12 warps -> 3 blocks: 12/48
    (168, 8192, 4, 3, 12 / 48, "registers"),
    # 32 regs: registers allow 64 warps, warps allow 48/8 = 6 blocks of 8 warps: full occupancy
    (32, 0, 8, 6, 1.0, "warps"),
    # 48 KB shared: (49152 + 1024) per block -> 102400 // 50176 = 2 blocks of 4 warps
    (64, 49152, 4, 2, 8 / 48, "shared memory"),
    # one-warp blocks are capped by the 24 blocks per SM: 24/48
    (16, 0, 1, 24, 0.5, "blocks"),
    # above the 99 KB per-block limit: cannot launch
    (64, 101377, 4, 0, 0.0, "shared memory"),
    # 40 regs -> 1280 per warp -> 12 per sub-partition -> 48 warps: 6 blocks of 8 = full
    (40, 1024, 8, 6, 1.0, "warps"),
])
def test_occupancy_hand_computed(regs, smem, warps, blocks, occ, limiter):
    o = occupancy(regs, smem, warps)
    assert o["blocks_per_sm"] == blocks
    assert o["occupancy"] == pytest.approx(occ)
    assert o["limits"][limiter] == blocks


def test_roofline_estimate():
    # 4096^2 x 40 attention, 16 heads, bf16: 4*16*4096^2*40 FLOP = 42.9 GFLOP -> 440 us at 97.5 TFLOP/s;
    # 2*16*(2*4096*40)*2 bytes = 21 MB -> 29 us at 716.8 GB/s: compute-bound.
    r = report.roofline(4 * 16 * 4096 * 4096 * 40, 2 * 16 * 2 * 4096 * 40 * 2)
    assert r["bound"] == "compute"
    assert r["time_us"] == pytest.approx(4 * 16 * 4096 * 4096 * 40 / 97.5e12 * 1e6)
    r = report.roofline(10 * 2 ** 20, 6 * 2 ** 20)
    assert r["bound"] == "memory" and r["time_us"] == pytest.approx(6 * 2 ** 20 / 716.8e9 * 1e6)


def test_report_cli_prints_labelled_roofline(capsys):
    assert report.main(["--no-compile"]) == 0
    out = capsys.readouterr().out
    assert "Roofline estimate (not a measurement)" in out
    assert "attention fwd" in out and "group_norm+silu fwd" in out and "sampler_step+cfg" in out
