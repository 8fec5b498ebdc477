"""The ``causalrec`` command: parses arguments and delegates to the public API.

A ``CausalRecError`` is printed as one line (no traceback) and exits with its code
(2 for configuration errors).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from causalrec.compat import load_yaml
from causalrec.errors import CausalRecError, ConfigError

_log = logging.getLogger("causalrec")


def parse_params(pairs: Sequence[str] | None) -> dict[str, Any]:
    """``["epochs=3", "topk=[10,20]"]`` -> ``{"epochs": 3, "topk": [10, 20]}`` (values parsed as YAML)."""
    params: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--param expects key=value, got {pair!r}")
        try:
            params[key.strip()] = load_yaml(value) if value.strip() else None
        except yaml.YAMLError:
            params[key.strip()] = value
    return params


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config-files", nargs="+", default=[], metavar="YAML",
                        help="RecBole YAML files, later ones win")
    parser.add_argument("--param", "-p", action="append", default=[], metavar="KEY=VALUE",
                        help="a config key (YAML value); repeatable; wins over the files")


def _cmd_run(args) -> int:
    from causalrec.quick_start import read_config_files, run

    params = {**read_config_files(args.config_files), **parse_params(args.param)}
    result = run(args.model, args.dataset, config_dict=params, saved=not args.no_save, resume=args.resume)
    if result is None:  # not the main process of a multi-process launch: it prints and writes nothing
        return 0
    print(f"protocol: {result['protocol']}")
    print("test: " + "  ".join(f"{k}={v:.4f}" for k, v in result["test_result"].items()))
    for stage in result.get("stages") or ():
        how = "reused" if stage["reused"] else f"trained {stage['train_seconds']:.1f}s"
        score = f"  valid={stage['valid_score']:.4f}" if stage.get("valid_score") is not None else ""
        print(f"stage {stage['stage']} ({how}){score}")
    for field, by_label in (result.get("test_env_result") or {}).items():
        for label, metrics in by_label.items():
            shown = {k: v for k, v in metrics.items() if k != "cases"}
            print(f"test[{field}={label}]: " + "  ".join(f"{k}={v:.4f}" for k, v in shown.items()))
    if args.output:
        _write_json(Path(args.output), result)
    return 0


def _data_spec(args):
    from causalrec.data import DataSpec
    from causalrec.quick_start import read_config_files

    params = {**read_config_files(getattr(args, "config_files", [])), **parse_params(args.param)}
    if params.pop("seed", None) is not None:  # as in `causalrec run`, where DataSpec.seed is data_seed
        _log.info("seed is RecBole's model seed and leaves the data unchanged (as in causalrec run); "
                  "the data's seed is data_seed")
    params["dataset"] = args.dataset
    for option in ("source", "split"):
        if getattr(args, option, None) is not None:
            params[option] = getattr(args, option)
    for option in ("user", "item", "time", "region", "text"):
        value = getattr(args, option, None)
        if value is not None:
            params[f"csv_{option}"] = value
    return DataSpec.from_mapping(params, strict=True)


def _cmd_data_prepare(args) -> int:
    from causalrec.data import prepare

    prepared = prepare(_data_spec(args), force=args.force)
    print(f"prepared {prepared.dataset} at {prepared.directory}")
    print(f"RecBole data_path: {prepared.data_path}")
    evidence = prepared.meta.get("shift_evidence") or prepared.meta.get("shift")
    if evidence:
        print("shift evidence: " + json.dumps(evidence, default=str))
    return 0


def _cmd_data_stats(args) -> int:
    from causalrec.data import describe, format_stats, load_frame

    print(format_stats(describe(load_frame(_data_spec(args)))))
    return 0


def _cmd_keys(args) -> int:
    from causalrec.quick_start import known_config_keys

    print("\n".join(sorted(known_config_keys())))
    return 0


def _write_json(path: Path, payload: Any) -> None:
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="causalrec", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train and evaluate one model (RecBole config driven)")
    run.add_argument("--model", "-m", default="CausalDPO")
    run.add_argument("--dataset", "-d", default="retail-sim")
    _add_config_options(run)
    run.add_argument("--no-save", action="store_true", help="do not save checkpoints (evaluate the last model)")
    run.add_argument("--resume", action="store_true",
                     help="continue an interrupted run (use it on the first run too): LLM models write step "
                          "checkpoints and continue an interrupted training stage from its last one (finished stages "
                          "are reused anyway); RecBole's classical models write a checkpoint after every epoch and "
                          "continue at the next one")
    run.add_argument("--output", "-o", help="also write the result as JSON here")
    run.set_defaults(func=_cmd_run)

    data = sub.add_parser("data", help="prepare datasets and print their statistics",
                          description="Prepare datasets and print their statistics. The data's randomness follows "
                                      "data_seed (default 2020), as in `causalrec run`; seed (RecBole's model seed) "
                                      "does not change the data.")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    for name, func, text in (("prepare", _cmd_data_prepare, "write RecBole benchmark files for a split"),
                             ("stats", _cmd_data_stats, "print users/items/interactions/regions/months")):
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
        _add_config_options(p)
        p.set_defaults(func=func)

    keys = sub.add_parser("keys", help="list every config key causalrec and RecBole accept")
    keys.set_defaults(func=_cmd_keys)

    for name, module in (("compare", "causalrec.experiments.compare"), ("tune", "causalrec.experiments.tune")):
        try:
            mod = __import__(module, fromlist=["add_parser"])
        except ImportError:
            continue
        mod.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import causalrec  # noqa: F401  (patches and registration)

        return args.func(args)
    except CausalRecError as err:
        print(f"causalrec: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("causalrec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
