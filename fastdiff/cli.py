"""The ``fastdiff`` command: ``info``, ``generate``, ``train``, ``eval``.

Each subcommand lives beside the code it drives and registers itself here through an ``add_*_parser``
function, so this file stays a table of contents.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from fastdiff._argtypes import OneLineParser

__all__ = ["main"]

# subcommand -> (module, the function adding its parser). Modules are imported only when listed, so
# `fastdiff info` does not pay for importing the training code.
_SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("fastdiff.pipelines.cli", "add_generate_parser"),
    "train": ("fastdiff.train.cli", "add_train_parser"),
    "eval": ("fastdiff.eval.cli", "add_eval_parser"),
}


def _info(args: argparse.Namespace) -> int:
    from fastdiff.info import info_text

    print(info_text())
    if args.kernels or args.roofline:
        from fastdiff.kernels.report import main as report

        print()
        return report(["--no-compile"] if not args.kernels else (["--quick"] if args.quick else []))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fastdiff", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="versions, CPU features and which backend runs each op")
    p.add_argument("--kernels", action="store_true",
                   help="also compile the Triton kernels for sm_89 (RTX 4080) and report registers, spills, "
                        "shared memory and occupancy, with the labelled roofline estimates (needs triton)")
    p.add_argument("--quick", action="store_true", help="with --kernels: the bf16 configurations only")
    p.add_argument("--roofline", action="store_true", help="only the RTX 4080 roofline estimates (no compile)")
    p.set_defaults(func=_info)
    for module, adder in _SUBCOMMANDS.values():
        getattr(importlib.import_module(module), adder)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
