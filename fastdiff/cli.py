"""The ``fastdiff`` command: ``info``, ``generate``, ``train``, ``eval``.

Each subcommand lives beside the code it drives and registers itself here through an ``add_*_parser``
function, so this file stays a table of contents.
"""
from __future__ import annotations

import argparse
import importlib
import sys

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
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdiff", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="versions, CPU features and which backend runs each op")
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
