"""``causalrec headroom``: oracle scorers on ``retail-sim`` bound what deconfounding can gain
(``causalrec.experiments.headroom``)."""

from __future__ import annotations

import json

from causalrec.cli.common import parse_params
from causalrec.data.spec import DataSpec
from causalrec.experiments import headroom
from causalrec.io import write_atomic


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "headroom",
        help="oracle headroom of deconfounding on retail-sim (the simulator's truth)",
        description=headroom.__doc__.split("\n")[0],
    )
    p.add_argument("--split", default="seasonal")
    p.add_argument(
        "--param",
        "-p",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a DataSpec field (data_seed, sim_users, sim_confounding, ...)",
    )
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--out", help="also write the table as JSON here")
    p.set_defaults(func=_cmd)


def _cmd(args) -> int:
    fields = headroom.spec_fields(parse_params(args.param))
    table = headroom.oracle_metrics(DataSpec(dataset="retail-sim", split=args.split, **fields), k=args.k)
    print(table.to_markdown(floatfmt=".4f"))
    if args.out:
        payload = {"spec": {"split": args.split, **fields}, "table": table.reset_index().to_dict("records")}
        write_atomic(args.out, json.dumps(payload, indent=1))
    return 0
