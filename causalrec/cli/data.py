"""``causalrec data prepare`` (RecBole benchmark files for a split) and ``causalrec data stats``."""

from __future__ import annotations

import json
import logging

from causalrec.cli.common import add_config_options, parse_params

_log = logging.getLogger("causalrec")


def add_parser(subparsers) -> None:
    data = subparsers.add_parser(
        "data",
        help="prepare datasets and print their statistics",
        description="Prepare datasets and print their statistics. The data's randomness "
        "follows data_seed (default 2020), as in `causalrec run`; seed "
        "(RecBole's model seed) does not change the data.",
    )
    data_sub = data.add_subparsers(dest="data_command", required=True)
    for name, func, text in (
        ("prepare", _cmd_prepare, "write RecBole benchmark files for a split"),
        ("stats", _cmd_stats, "print users/items/interactions/regions/months"),
    ):
        p = data_sub.add_parser(name, help=text)
        p.add_argument("--dataset", "-d", required=True, help="retail-sim | online-retail | ml-100k | csv")
        p.add_argument("--source", help="path of the input file (online-retail, csv)")
        if name == "prepare":
            p.add_argument("--split", help="iid | temporal | seasonal | regional | popularity | mixed")
            p.add_argument("--force", action="store_true", help="rebuild even if cached")
        p.add_argument("--user", help="csv: user column")
        p.add_argument("--item", help="csv: item column")
        p.add_argument("--time", help="csv: timestamp column")
        p.add_argument("--region", help="csv: region column")
        p.add_argument("--text", nargs="+", help="csv: item text column(s), joined with spaces")
        add_config_options(p)
        p.set_defaults(func=func)


def _data_spec(args):
    from causalrec.data import DataSpec
    from causalrec.recbole.preflight import read_config_files

    params = {**read_config_files(getattr(args, "config_files", [])), **parse_params(args.param)}
    if params.pop("seed", None) is not None:  # as in `causalrec run`, where DataSpec.seed is data_seed
        _log.info(
            "seed is RecBole's model seed and leaves the data unchanged (as in causalrec run); "
            "the data's seed is data_seed"
        )
    params["dataset"] = args.dataset
    for option in ("source", "split"):
        if getattr(args, option, None) is not None:
            params[option] = getattr(args, option)
    for option in ("user", "item", "time", "region", "text"):
        value = getattr(args, option, None)
        if value is not None:
            params[f"csv_{option}"] = value
    return DataSpec.from_mapping(params, strict=True)


def _cmd_prepare(args) -> int:
    from causalrec.data import prepare

    prepared = prepare(_data_spec(args), force=args.force)
    print(f"prepared {prepared.dataset} at {prepared.directory}")
    print(f"RecBole data_path: {prepared.data_path}")
    evidence = prepared.meta.get("shift_evidence") or prepared.meta.get("shift")
    if evidence:
        print("shift evidence: " + json.dumps(evidence, default=str))
    return 0


def _cmd_stats(args) -> int:
    from causalrec.data import describe, format_stats, load_frame

    print(format_stats(describe(load_frame(_data_spec(args)))))
    return 0
