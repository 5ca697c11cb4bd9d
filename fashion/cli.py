"""The ``fashion`` command: one subcommand per stage of the pipeline.

Each stage's ``cli`` module adds its subcommands with argparse only; the heavy imports (torch, ONNX,
Flask) happen when a subcommand runs, so ``fashion --help`` is instant and a gateway-only install
still has a working command.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from fashion.errors import UserError

# Modules that define `register(subparsers)`; each subparser sets `func(args) -> int`.
STAGES = ("training.cli", "export.cli", "loadtest.cli", "orchestration.cli", "tagging.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fashion",
        description="Tag fashion catalogue photos: synthesise data, train, evaluate, export, serve, "
        "load-test.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in STAGES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError:
            continue  # a stage not in this installation (e.g. a trimmed container)
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except ModuleNotFoundError as e:
        sys.stderr.write(
            f"fashion {args.command}: missing dependency {e.name!r}. Install the project with "
            "`make install` (or `pip install -e '.[all]'`).\n"
        )
        return 2
    except KeyboardInterrupt:
        return 130
    except UserError as e:  # every stage's errors that say what to do; anything else is a bug: traceback
        sys.stderr.write(f"fashion {args.command}: error: {e}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
