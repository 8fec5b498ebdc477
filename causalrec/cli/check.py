"""``causalrec check``: do the TRL stages train the same model under ``accelerate launch`` as in one process?

``causalrec.training.distributed_check`` does the work; ``python -m causalrec.training.distributed_check`` (what
``accelerate launch -m`` starts in docs/scale.md) takes the same options.
"""

from __future__ import annotations

import argparse
import logging
import os

from causalrec.training import distributed_check


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "check",
        help="check that the TRL stages train the same model under accelerate launch as in one process",
        description=distributed_check.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    distributed_check.add_arguments(p)
    p.set_defaults(func=_cmd)


def _cmd(args) -> int:
    if int(os.environ.get("RANK", "0")) != 0 and not args.verbose:  # as the module's main: one process reports
        logging.getLogger().setLevel(logging.WARNING)
    return distributed_check.check(
        distributed_check.config_from_args(args),
        args.out,
        compare_with=args.compare,
        expect_processes=args.expect_processes,
        rtol=args.rtol,
        atol=args.atol,
    )
