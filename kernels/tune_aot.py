"""Pick the flash-attention block sizes from ahead-of-time compiles for sm_89 (no GPU needed).

For each (kernel, BLOCK_D, fp32 or 16-bit, mask) the candidates below are compiled largest tile first; the
first one that has no register spills and fits the 99 KB shared-memory block limit in every dot precision it
can run with is chosen. Without a GPU nothing can be timed, so "largest tile that fits" is the rule: bigger
tiles mean fewer passes over K/V (or Q) per output element. Prints the ``_CONFIGS`` table of
``kernels/flash_attention.py``::

    python -m fastdiff.kernels.tune_aot
"""
from __future__ import annotations

import torch

from fastdiff.kernels import flash_attention as fa
from fastdiff.kernels.report import SM89, compile_config

__all__ = ["CANDIDATES", "tune"]

# (BLOCK_M, BLOCK_N, num_warps, num_stages), preferred first; fp32 tiles take twice the registers, and the
# "ieee" fp32 dot (FMA, no tensor cores) far more, so fp32 starts smaller (a spilling compile is very slow).
CANDIDATES = {
    ("fwd", False): [(128, 64, 4, 2), (128, 64, 8, 2), (128, 32, 4, 2), (128, 32, 8, 2), (64, 64, 4, 2),
                     (64, 32, 4, 2), (64, 32, 4, 1), (32, 32, 4, 1), (32, 16, 4, 1), (16, 16, 4, 1)],
    ("fwd", True): [(64, 32, 4, 2), (64, 32, 8, 2), (32, 32, 4, 1), (32, 16, 4, 1), (16, 16, 4, 1)],
    ("bwd_dkdv", False): [(64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2), (64, 64, 8, 1),
                          (32, 64, 8, 1), (32, 32, 4, 1), (16, 32, 4, 1), (16, 16, 4, 1)],
    ("bwd_dkdv", True): [(32, 64, 8, 1), (32, 32, 4, 1), (16, 32, 4, 1), (16, 16, 4, 1), (16, 16, 8, 1)],
    ("bwd_dq", False): [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (64, 64, 8, 1),
                        (64, 32, 8, 1), (32, 32, 4, 1), (32, 16, 4, 1), (16, 16, 4, 1)],
    ("bwd_dq", True): [(64, 32, 8, 1), (32, 32, 4, 1), (32, 16, 4, 1), (16, 16, 4, 1), (16, 16, 8, 1)],
}


def tune(kinds=("fwd", "bwd_dkdv", "bwd_dq"), block_ds=None, verbose: bool = True) -> dict:
    """(kind, BLOCK_D, fp32, mask) -> the chosen candidate, or None when no candidate fits."""
    table = {}
    for kind in kinds:
        for block_d in block_ds or fa._BLOCK_DS:
            for is_fp32 in (False, True):
                dtype, precs = (torch.float32, ("ieee", "tf32")) if is_fp32 else (torch.bfloat16, ("ieee",))
                for has_mask in (False, True):
                    table[(kind, block_d, is_fp32, has_mask)] = None
                    for cand in CANDIDATES[(kind, is_fp32)]:
                        ok = True
                        for prec in precs:
                            _, r = compile_config(fa.aot_entry(kind, dtype, block_d, has_mask, prec, *cand))
                            if r.spill_bytes or r.smem > SM89.smem_per_block_optin:
                                ok = False
                                break
                        if verbose:
                            print(f"# {kind} D{block_d} fp32={is_fp32} mask={has_mask} {cand}: "
                                  f"{'ok' if ok else 'reject'} (last: regs {r.regs} spill {r.spill_bytes} "
                                  f"smem {r.smem})", flush=True)
                        if ok:
                            table[(kind, block_d, is_fp32, has_mask)] = cand
                            break
    return table


if __name__ == "__main__":
    import sys

    kinds = tuple(sys.argv[1].split(",")) if len(sys.argv) > 1 else ("fwd", "bwd_dkdv", "bwd_dq")
    block_ds = tuple(int(d) for d in sys.argv[2].split(",")) if len(sys.argv) > 2 else None
    t = tune(kinds, block_ds)
    print("_CONFIGS = {")
    for k, v in t.items():
        print(f"    {k!r}: {v!r},")
    print("}")
