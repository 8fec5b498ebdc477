"""The ``causalrec`` command: parses arguments and delegates to the public API.

One module per command, each with its ``add_parser(subparsers)`` (options, help) and the ``_cmd(args)`` that calls
the library: ``run`` (also ``keys``), ``data``, ``compare``, ``tune``, ``headroom``, ``check``; ``common`` holds
what they share. The library never imports this package.

A ``CausalRecError`` is printed as one line (no traceback) and exits with its code
(2 for configuration errors).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from causalrec.cli import check, data, headroom, run
from causalrec.errors import CausalRecError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="causalrec", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    run.add_parser(sub)
    data.add_parser(sub)
    run.add_keys_parser(sub)
    for name in ("compare", "tune"):  # a command whose module cannot be imported is left out
        try:
            module = importlib.import_module(f"causalrec.cli.{name}")
        except ImportError:
            continue
        module.add_parser(sub)
    headroom.add_parser(sub)
    check.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        import causalrec  # noqa: F401  (patches and registration)

        return args.func(args)
    except CausalRecError as err:
        print(f"causalrec: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("causalrec: interrupted", file=sys.stderr)
        return 130
    finally:
        if "torch.distributed" in sys.modules:  # under accelerate launch (causalrec run): see close_process_group
            from causalrec.training.distributed_check import close_process_group

            close_process_group()


__all__ = ["build_parser", "main"]
