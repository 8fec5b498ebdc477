"""``causalrec compare``: counted rows, hand-computed tables, cache hits, scipy significance, failures."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import causalrec
from causalrec.errors import ConfigError, PreflightError, UnknownNameError
from causalrec.experiments import statistics
from causalrec.experiments.compare import CompareConfig, cell_params, plan
from causalrec.experiments.report import SIGNIFICANCE_COLUMNS
from causalrec.experiments.statistics import hierarchical_bootstrap, holm

TINY = {"sim_users": 150, "sim_items": 60, "sim_categories": 8, "sim_inter_per_user": 15.0, "epochs": 2}
GRID = dict(
    splits="iid,seasonal", seeds=2, baseline="Pop", show_progress=False, params={**TINY, "BPR.learning_rate": 0.01}
)
N_METRICS = 10  # Recall, NDCG, Hit, MRR, Precision @ 10, 20: the comparison's one evaluator


def _grid_argv(models: str, out, *extra: str) -> list[str]:
    """``causalrec compare``'s command line for GRID's settings (models, output folder and further flags given)."""
    params = [*(f"{k}={v}" for k, v in TINY.items()), "BPR.learning_rate=0.01"]
    return [
        "compare",
        *("--models", models, "--splits", GRID["splits"], "--seeds", str(GRID["seeds"])),
        *("--baseline", GRID["baseline"], "--out", str(out), "--no-progress", "--no-plots"),
        *extra,
        *sum((["-p", p] for p in params), []),
    ]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    where = tmp_path_factory.mktemp("compare")
    old = os.getcwd()
    os.chdir(where)  # RecBole writes ./log and ./log_tensorboard
    try:
        frame = causalrec.compare(["Pop", "BPR"], "retail-sim", out=where / "out", **GRID)
    finally:
        os.chdir(old)
    return where / "out", frame


def _records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]


def test_results_rows_are_cells_times_environments_times_metrics(grid):
    out, frame = grid
    records = _records(out)
    assert len(records) == 2 * 2 * 2 and all(r["status"] == "ok" for r in records)
    expected = 0
    for rec in records:
        envs = 1 + sum(len(labels) for labels in rec["result"]["test_env_result"].values())  # "all" + labels + <worst>
        assert len(rec["result"]["test_result"]) == N_METRICS
        expected += envs * N_METRICS
    csv = pd.read_csv(out / "results.csv")
    assert len(csv) == expected == len(frame)
    assert list(csv.columns) == ["model", "split", "seed", "environment", "metric", "value"]
    assert set(csv["seed"]) == {2020, 2021} and set(csv["split"]) == {"iid", "seasonal"}
    # overall rows are the cells' test results, and the stored per-case values average to them
    for rec in records:
        rows = csv[
            (csv.model == rec["model"])
            & (csv.split == rec["split"])
            & (csv.seed == rec["seed"])
            & (csv.environment == "all")
        ]
        assert dict(zip(rows.metric, rows.value)) == pytest.approx(rec["result"]["test_result"])
        for metric, values in rec["cases"]["metrics"].items():
            assert np.mean(values) == pytest.approx(rec["result"]["test_result"][metric], abs=6e-5)
        assert len(set(rec["cases"]["user"])) == len(rec["cases"]["user"])  # one case per user


def test_markdown_table_matches_a_hand_computation_from_the_csv(grid):
    out, _ = grid
    csv = pd.read_csv(out / "results.csv")
    report = (out / "report.md").read_text()
    section = report.split("## ndcg@10\n")[1].split("###")[0]
    rows = {
        line.split("|")[1].strip(): line
        for line in section.splitlines()
        if line.startswith("| Pop") or line.startswith("| BPR")
    }
    means = {}
    for model in ("Pop", "BPR"):
        for split in ("iid", "seasonal"):
            values = list(
                csv[
                    (csv.model == model) & (csv.split == split) & (csv.environment == "all") & (csv.metric == "ndcg@10")
                ].value
            )
            assert len(values) == 2
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
            means[model, split] = mean
            assert f"{mean:.4f} ± {std:.4f}" in rows[model]
        drop = (means[model, "seasonal"] - means[model, "iid"]) / means[model, "iid"] * 100
        assert rows[model].rstrip(" |").endswith(f"{drop:+.1f} %")
    for split, column in (("iid", 2), ("seasonal", 3)):
        best = max(("Pop", "BPR"), key=lambda m: means[m, split])
        assert rows[best].split("|")[column].strip().startswith("**")
        other = "BPR" if best == "Pop" else "Pop"
        assert not rows[other].split("|")[column].strip().startswith("**")


def test_significance_matches_scipy_on_the_stored_cases(grid):
    out, _ = grid
    table = pd.read_csv(out / "significance.csv")
    records = {(r["model"], r["split"], r["seed"]): r for r in _records(out)}
    csv = pd.read_csv(out / "results.csv")
    assert set(table["model"]) == {"BPR"} and set(table["baseline"]) == {"Pop"}
    for row in table.itertuples():
        x, y = [], []
        for seed in (2020, 2021):
            mine = dict(
                zip(
                    records["BPR", row.split, seed]["cases"]["user"],
                    records["BPR", row.split, seed]["cases"]["metrics"][row.metric],
                )
            )
            base = dict(
                zip(
                    records["Pop", row.split, seed]["cases"]["user"],
                    records["Pop", row.split, seed]["cases"]["metrics"][row.metric],
                )
            )
            for user in mine.keys() & base.keys():
                x.append(mine[user])
                y.append(base[user])
        assert row.n_pairs == len(x) > 100
        w = stats.wilcoxon(x, y)
        assert row.wilcoxon_p == pytest.approx(w.pvalue, rel=1e-9) and row.wilcoxon_stat == pytest.approx(w.statistic)
        overall = csv[(csv.split == row.split) & (csv.metric == row.metric) & (csv.environment == "all")]
        a = overall[overall.model == "BPR"].sort_values("seed").value.to_numpy()
        b = overall[overall.model == "Pop"].sort_values("seed").value.to_numpy()
        t = stats.ttest_rel(a, b)
        assert row.n_seeds == 2 and row.ttest_p == pytest.approx(t.pvalue, rel=1e-9)
        assert row.diff == pytest.approx((a - b).mean())
        assert (row.diff_ci_low, row.diff_ci_high) == pytest.approx(tuple(t.confidence_interval()), rel=1e-9)
        assert row.rel_change == pytest.approx(a.mean() / b.mean() - 1)
        d = a - b
        assert row.cohens_dz == pytest.approx(d.mean() / d.std(ddof=1))
        # the bootstrap interval resamples the stored per-user values, seeds then users
        pairs = {}
        for seed in (2020, 2021):
            mine = dict(
                zip(
                    records["BPR", row.split, seed]["cases"]["user"],
                    records["BPR", row.split, seed]["cases"]["metrics"][row.metric],
                )
            )
            base = dict(
                zip(
                    records["Pop", row.split, seed]["cases"]["user"],
                    records["Pop", row.split, seed]["cases"]["metrics"][row.metric],
                )
            )
            users = sorted(mine.keys() & base.keys())
            pairs[seed] = ([mine[u] for u in users], [base[u] for u in users])
        boot = hierarchical_bootstrap(pairs, n_boot=2000, seed=0)
        assert (row.rel_ci_low, row.rel_ci_high) == pytest.approx((boot.low, boot.high), rel=1e-9)
        assert row.rel_ci_low <= boot.estimate <= row.rel_ci_high
        assert boot.estimate == pytest.approx(row.rel_change, abs=1e-3)  # per-case values are rounded to 1e-6
    # Holm over the whole table's family (splits x metrics), in the table's order
    assert len(table) == 4 and table.holm_p.to_numpy() == pytest.approx(holm(table.ttest_p.to_numpy()))
    report = (out / "report.md").read_text()
    section = report.split("## Significance against Pop\n")[1]
    assert "| n seeds |" in section
    assert "| Holm p | d_z | secondary: pooled (seed, user) Wilcoxon p (n pairs) |" in section
    assert "Holm-Bonferroni adjusted over the 4 tests of this table" in section
    assert list(table.columns) == SIGNIFICANCE_COLUMNS


def test_case_file_keeps_the_paired_values_and_pools_like_the_report(grid):
    out, _ = grid
    cases = pd.read_csv(out / "cases.csv.gz", dtype={"user": str})
    records = _records(out)
    csv = pd.read_csv(out / "results.csv")
    assert list(cases.columns) == ["model", "split", "seed", "user", "metric", "value"]
    assert set(cases.metric) == {"ndcg@10", "recall@10"}  # the report metrics, not all ten
    assert len(cases) == sum(len(r["cases"]["user"]) for r in records) * 2
    for rec in records:
        mine = cases[(cases.model == rec["model"]) & (cases.split == rec["split"]) & (cases.seed == rec["seed"])]
        for metric in ("ndcg@10", "recall@10"):
            rows = mine[mine.metric == metric]
            stored = dict(zip(rec["cases"]["user"], rec["cases"]["metrics"][metric]))
            assert dict(zip(rows.user, rows.value)) == pytest.approx(stored)
            overall = csv[
                (csv.model == rec["model"])
                & (csv.split == rec["split"])
                & (csv.seed == rec["seed"])
                & (csv.environment == "all")
                & (csv.metric == metric)
            ].value.item()
            assert rows.value.mean() == pytest.approx(overall, abs=6e-5)
    # the file alone reproduces the report's pooled Wilcoxon test
    table = pd.read_csv(out / "significance.csv")
    row = table[(table.split == "seasonal") & (table.metric == "ndcg@10")].iloc[0]
    wide = (
        cases[(cases.split == "seasonal") & (cases.metric == "ndcg@10")]
        .pivot(index=["seed", "user"], columns="model", values="value")
        .dropna()
    )
    assert len(wide) == row.n_pairs
    assert stats.wilcoxon(wide["BPR"], wide["Pop"]).pvalue == pytest.approx(row.wilcoxon_p, rel=1e-9)


def test_rerun_loads_every_cell_and_trains_nothing(grid, monkeypatch, in_tmp):
    out, frame = grid
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}

    def no_training(*args, **kwargs):
        raise AssertionError("a cached cell was trained again")

    monkeypatch.setattr("causalrec.recbole.quick_start.run", no_training)
    again = causalrec.compare(["Pop", "BPR"], "retail-sim", out=out, **GRID)
    assert again.attrs["trained"] == 0 and len(again.attrs["failures"]) == 0
    pd.testing.assert_frame_equal(again, frame)
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")} == mtimes
    # the command line with the same settings finds the same cells
    from causalrec.cli import main

    code = main(_grid_argv("Pop,BPR", out))
    assert code == 0


def test_jobs_train_cells_in_parallel_processes_with_the_same_results(grid, in_tmp, caplog):
    out, frame = grid
    with caplog.at_level("INFO", logger="causalrec.experiments.compare"):
        parallel = causalrec.compare(["Pop", "BPR"], "retail-sim", out=in_tmp / "par", jobs=2, **GRID)
    assert "compare: 8 cells in 2 processes, 1 torch thread(s) each" in caplog.text  # OMP_NUM_THREADS=1 here
    assert parallel.attrs["trained"] == 8
    assert parallel.attrs["failures"].empty, parallel.attrs["failures"].to_dict("records")
    serial = {(r["model"], r["split"], r["seed"]): r["result"]["test_result"] for r in _records(out)}
    assert {(r["model"], r["split"], r["seed"]): r["result"]["test_result"] for r in _records(in_tmp / "par")} == serial
    cols = ["model", "split", "seed", "environment", "metric"]
    assert parallel.sort_values(cols).reset_index(drop=True).equals(frame.sort_values(cols).reset_index(drop=True))


def test_jobs_from_the_command_line(in_tmp, capsys):
    from causalrec.cli import main

    assert main(["compare", "-m", "Pop", "-s", "iid", "--seeds", "1", "-j", "0", "-o", "bad", "--no-progress"]) == 2
    assert "jobs must be an integer >= 1; got 0" in capsys.readouterr().err
    assert not (in_tmp / "bad" / "cells").exists()


def test_report_only_reports_cached_cells_and_trains_nothing(grid, monkeypatch, in_tmp):
    import shutil

    out, frame = grid
    shutil.copytree(out / "cells", in_tmp / "o" / "cells")
    for cell in (in_tmp / "o" / "cells").glob("Pop-seasonal-*.json"):  # the baseline has no seasonal cell
        cell.unlink()

    def no_training(*args, **kwargs):
        raise AssertionError("--report-only trained a cell")

    monkeypatch.setattr("causalrec.recbole.quick_start.run", no_training)
    from causalrec.cli import main

    code = main(_grid_argv("Pop,ItemKNN,BPR", in_tmp / "o", "--report-only"))
    assert code == 0
    again = pd.read_csv(in_tmp / "o" / "results.csv")
    kept = frame[~((frame.model == "Pop") & (frame.split == "seasonal"))].reset_index(drop=True)
    pd.testing.assert_frame_equal(again, kept, check_dtype=False)
    report = (in_tmp / "o" / "report.md").read_text()
    assert "6 of 12 cells finished, 6 not run (3 models x 2 splits x 2 seeds" in report
    assert "| ItemKNN | not run | not run | n/a |" in report and "failed" not in report
    assert re.search(r"^\| Pop \| \*?\*?[0-9.]+ ± [0-9.]+\*?\*? \| not run \| n/a \|$", report, re.M)
    assert sorted((in_tmp / "o" / "cells").glob("ItemKNN*")) == []
    significance = pd.read_csv(in_tmp / "o" / "significance.csv")  # no pairs without the baseline's cells
    assert set(zip(significance.model, significance.split)) == {("BPR", "iid")}


def test_plots_are_written(grid):
    out, frame = grid
    plots = sorted(Path(p).name for p in frame.attrs["files"]["plots"])
    assert plots == sorted(
        [
            "ndcg_at_10_by_split.png",
            "recall_at_10_by_split.png",
            *(f"{m}_{s}_environments.png" for m in ("ndcg_at_10", "recall_at_10") for s in ("iid", "seasonal")),
        ]
    )
    assert all((out / "plots" / p).read_bytes()[:4] == b"\x89PNG" for p in plots)


def test_environment_plots_leave_out_small_groups():
    from causalrec.experiments.report import shown_groups

    cases = {
        ("regional", "region=France"): 42,
        ("regional", "region=Malta"): 3,
        ("regional", "region=Spain"): 20,
        ("seasonal", "region=Malta"): 50,
    }
    assert shown_groups(["France", "Malta", "Spain"], cases, "regional", "region", 20) == (["France", "Spain"], 1)
    assert shown_groups(["Malta"], cases, "regional", "region", 20) == (["Malta"], 0)  # all small: all shown
    assert shown_groups(["France", "Malta"], None, "regional", "region", 20) == (["France", "Malta"], 0)


def _env_results(n_envs: int, seeds, models=("Pop", "BPR")):
    """A long results table of one split with ``n_envs`` regions; BPR beats Pop by 0.01 * region index."""
    rng = np.random.default_rng(0)
    rows = []
    for model in models:
        for seed in seeds:
            rows.append((model, "regional", seed, "all", "ndcg@10", 0.1))
            for i in range(n_envs):
                value = 0.1 + 0.002 * i + (0.01 * i if model == "BPR" else 0.0) + rng.normal(0, 0.002)
                rows.append((model, "regional", seed, f"region=Country number {i:02d}", "ndcg@10", value))
    return pd.DataFrame(rows, columns=["model", "split", "seed", "environment", "metric", "value"])


def _errorbars(ax):
    from matplotlib.container import ErrorbarContainer

    return [c for c in ax.containers if isinstance(c, ErrorbarContainer)]


def _overlap(boxes) -> bool:
    boxes = sorted(boxes, key=lambda b: b.y0)
    return any(a.y1 > b.y0 + 0.5 for a, b in zip(boxes, boxes[1:]))


@pytest.mark.parametrize("seeds", [[2020], [2020, 2021, 2022]])
def test_environment_plot_is_a_sorted_dot_plot_with_error_bars_only_over_seeds(seeds):
    from causalrec.experiments.report import environment_figure

    results = _env_results(30, seeds)
    cases = {("regional", f"region=Country number {i:02d}"): 25 + i for i in range(30)}
    fig = environment_figure(results, "regional", "ndcg@10", ["Pop", "BPR"], cases=cases, min_cases=1, baseline="Pop")
    (ax,) = fig.axes
    fig.draw_without_rendering()
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(labels) == 30 and labels[0].startswith("Country number 00 (n=25)")
    assert labels[-1] == "Country number 29 (n=54)"  # sorted by BPR - Pop, the largest effect on top
    assert not _overlap([t.get_window_extent() for t in ax.get_yticklabels()])
    bars = _errorbars(ax)
    if len(seeds) == 1:
        assert bars == [] and not ax.collections  # no error bars, no zero-length caps
        assert sorted(len(line.get_xdata()) for line in ax.lines) == [30, 30]
        assert "1 seed, no error bars" in ax.get_title()
    else:
        assert len(bars) == 2 and all(c.has_xerr and not c.has_yerr for c in bars)
        assert all(len(c.lines[2][0].get_segments()) == 30 for c in bars)
        assert "mean ± std over seeds" in ax.get_title() and "sorted by effect vs Pop" in ax.get_title()
    assert (
        fig.get_figheight()
        > 2.5 * environment_figure(_env_results(5, seeds), "regional", "ndcg@10", ["Pop", "BPR"]).get_figheight()
    )


def test_split_bars_draw_error_bars_only_over_two_or_more_seeds():
    from matplotlib.figure import Figure

    from causalrec.experiments.report import _bars

    ax = Figure().subplots()
    _bars(
        ax,
        ["iid", "seasonal"],
        {"Pop": ([0.1, 0.2], [np.nan, np.nan], [1, 1]), "BPR": ([0.3, 0.4], [0.01, 0.02], [3, 1])},
    )
    (bars,) = _errorbars(ax)
    assert len(bars.lines[2][0].get_segments()) == 1  # BPR on iid only


def test_significance_without_per_case_values_or_with_one_seed():
    """Cells from before per-case values were kept: the seed-level test, not the bootstrap; one seed: no test."""
    from causalrec.experiments.compare import results_frame
    from causalrec.experiments.report import significance, significance_table

    values = {
        ("Pop", 2020): 0.10,
        ("Pop", 2021): 0.12,
        ("Pop", 2022): 0.11,
        ("BPR", 2020): 0.13,
        ("BPR", 2021): 0.14,
        ("BPR", 2022): 0.15,
    }
    records = [
        {
            "status": "ok",
            "model": m,
            "split": split,
            "seed": seed,
            "result": {"test_result": {"ndcg@10": v}, "test_env_result": {}},
        }
        for (m, seed), v in values.items()
        for split in ("iid", "regional")
        if split == "iid" or seed == 2020
    ]
    table = significance(results_frame(records), records, "Pop", ["ndcg@10"])
    iid, regional = table[table.split == "iid"].iloc[0], table[table.split == "regional"].iloc[0]
    t = stats.ttest_rel([0.13, 0.14, 0.15], [0.10, 0.12, 0.11])
    assert iid.n_seeds == 3 and iid.ttest_p == pytest.approx(t.pvalue) and iid.holm_p == pytest.approx(t.pvalue)
    assert iid.rel_change == pytest.approx(0.14 / 0.11 - 1) and iid.n_pairs == 0
    assert math.isnan(iid.rel_ci_low) and math.isnan(iid.rel_ci_high) and math.isnan(iid.wilcoxon_p)
    assert regional.n_seeds == 1 and regional.rel_change == pytest.approx(0.3)
    assert all(math.isnan(regional[c]) for c in ("ttest_p", "holm_p", "cohens_dz", "diff_ci_low", "rel_ci_low"))
    text = significance_table(table)
    assert "| ndcg@10 | iid | BPR | 3 | +0.0300 [" in text and "| +27.3 % |" in text
    assert "| ndcg@10 | regional | BPR | 1 | +0.0300 | +30.0 % | n/a | n/a | n/a | n/a (0) |" in text


def test_a_failing_cell_is_reported_and_the_grid_goes_on(in_tmp):
    # SASRec with 3 heads over a hidden size of 16 passes every config check and fails building the model
    params = {**TINY, "SASRec.hidden_size": 16, "SASRec.n_heads": 3}
    frame = causalrec.compare(
        ["Pop", "SASRec"],
        "retail-sim",
        splits="seasonal",
        seeds=1,
        params=params,
        out=in_tmp / "out",
        show_progress=False,
        plots=False,
    )
    failures = frame.attrs["failures"]
    assert list(failures[["model", "split", "seed"]].itertuples(index=False, name=None)) == [
        ("SASRec", "seasonal", 2020)
    ]
    assert "not a multiple of the number of attention heads" in failures.error[0]
    assert set(frame.model) == {"Pop"} and len(frame) > 0
    report = (in_tmp / "out" / "report.md").read_text()
    assert "## Failed cells" in report and "| SASRec | seasonal | 2020 | ValueError" in report
    assert "| SASRec | failed |" in report
    # a re-run retries the failed cell only
    again = causalrec.compare(
        ["Pop", "SASRec"],
        "retail-sim",
        splits="seasonal",
        seeds=1,
        params=params,
        out=in_tmp / "out",
        show_progress=False,
        plots=False,
    )
    assert again.attrs["trained"] == 1
    kept = causalrec.compare(
        ["Pop", "SASRec"],
        "retail-sim",
        splits="seasonal",
        seeds=1,
        params=params,
        out=in_tmp / "out",
        show_progress=False,
        plots=False,
        retry_failed=False,
    )
    assert kept.attrs["trained"] == 0 and len(kept.attrs["failures"]) == 1


def test_per_model_sections_and_layering(in_tmp):
    (in_tmp / "cmp.yaml").write_text("epochs: 5\nlearning_rate: 0.002\nSASRec:\n  hidden_size: 8\n  epochs: 7\n")
    config = CompareConfig(
        models=["BPR", "SASRec"],
        splits=["seasonal"],
        seeds=[1, 2],
        out=in_tmp / "o",
        config_files=[in_tmp / "cmp.yaml"],
        params={**TINY, "SASRec.learning_rate": 0.01, "GenRec.sft_args.max_steps": 3},
    )
    params = cell_params(config)
    assert params["BPR"]["epochs"] == 2 and params["BPR"]["learning_rate"] == 0.002  # --param beats files
    assert params["SASRec"]["hidden_size"] == 8 and params["SASRec"]["learning_rate"] == 0.01
    assert params["SASRec"]["epochs"] == 2  # shared params beat a file's model section
    assert params["BPR"]["topk"] == params["SASRec"]["topk"] == [10, 20]  # one evaluator
    assert "sft_args" not in params["BPR"]  # a section for a model outside the comparison is ignored
    cells = plan(config)
    assert [(c.model, c.split, c.seed) for c in cells] == [
        ("BPR", "seasonal", 1),
        ("SASRec", "seasonal", 1),
        ("BPR", "seasonal", 2),
        ("SASRec", "seasonal", 2),
    ]
    assert len({c.key for c in cells}) == 4
    # paths and progress do not change a cell's key; a training setting does
    quiet = plan(
        CompareConfig(
            models=["BPR", "SASRec"],
            splits=["seasonal"],
            seeds=[1, 2],
            out=in_tmp / "elsewhere",
            config_files=[in_tmp / "cmp.yaml"],
            params={**config.params, "show_progress": True, "eval_batch_size": 17},
        )
    )
    assert [c.key for c in quiet] == [c.key for c in cells]
    faster = plan(
        CompareConfig(
            models=["BPR"],
            splits=["seasonal"],
            seeds=[1],
            out=in_tmp / "o",
            config_files=[in_tmp / "cmp.yaml"],
            params={**config.params, "learning_rate": 0.1},
        )
    )
    assert faster[0].key != cells[0].key
    # which validations run is bookkeeping; testing the stage that validates best is another model
    stage_keys = {
        v: plan(
            CompareConfig(
                models=["GenRec"],
                splits=["seasonal"],
                seeds=[1],
                out=in_tmp / "o",
                params={**config.params, "validate_stages": v},
            )
        )[0].key
        for v in ("all", "last", "best")
    }
    assert stage_keys["all"] == stage_keys["last"] != stage_keys["best"]
    # a tuned best.yaml names its split: accepted where the grid runs that one split, and changes no key
    (in_tmp / "best.yaml").write_text((in_tmp / "cmp.yaml").read_text() + "split: seasonal\n")
    tuned = dict(models=["BPR", "SASRec"], seeds=[1, 2], out=in_tmp / "o", params=config.params)
    same = plan(CompareConfig(splits=["seasonal"], config_files=[in_tmp / "best.yaml"], **tuned))
    assert [c.key for c in same] == [c.key for c in cells]
    for splits in (["iid"], ["iid", "seasonal"]):
        with pytest.raises(ConfigError, match=r"config files set \['split'\]"):
            plan(CompareConfig(splits=splits, config_files=[in_tmp / "best.yaml"], **tuned))


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"params": {"SASRec.topk": [5]}}, ConfigError, ["SASRec", "topk", "one evaluator"]),
        ({"params": {"split": "iid"}}, ConfigError, ["split", "--splits"]),
        ({"params": {"epochz": 1}}, UnknownNameError, ["epochz", "epochs"]),
        ({"models": ["Pop", "SASRecc"]}, UnknownNameError, ["SASRecc", "SASRec"]),
        ({"splits": "iid,seasonl"}, UnknownNameError, ["seasonl", "seasonal"]),
        ({"baseline": "GenRec"}, ConfigError, ["GenRec", "not one of the compared models"]),
        ({"seeds": 0}, ConfigError, ["seeds", ">= 1"]),
        ({"seeds": [1, 1]}, ConfigError, ["distinct"]),
        ({"seeds": 2020}, ConfigError, ["2020 seeds", "--seeds 2020,"]),  # a seed given where a count is expected
        ({"jobs": 0}, ConfigError, ["jobs", ">= 1"]),
    ],
)
def test_bad_settings_fail_before_any_training(in_tmp, kwargs, error, words):
    settings = {"models": ["Pop", "SASRec"], "splits": "seasonal", "seeds": 1, "params": dict(TINY), **kwargs}
    with pytest.raises(error) as err:
        causalrec.compare(out=in_tmp / "out", show_progress=False, **settings)
    for word in words:
        assert word in str(err.value)
    assert not (in_tmp / "out" / "cells").exists()


def test_every_bad_setting_of_the_grid_is_listed_at_once(in_tmp):
    settings = {"models": ["Pop", "Foo"], "splits": "bogus", "seeds": 0, "baseline": "GenRec", "jobs": 0}
    with pytest.raises(PreflightError) as err:
        causalrec.compare(dataset="retail-sim", out=in_tmp / "out", show_progress=False, **settings)
    lines = str(err.value).splitlines()
    assert lines[0] == "5 problems found before any work started:" and len(lines) == 6
    for line, words in zip(lines[1:], (["'Foo'"], ["'bogus'"], ["'GenRec'", "compared"], ["jobs"], ["seeds", ">= 1"])):
        assert all(w in line for w in words), line
    assert err.value.exit_code == 2 and not (in_tmp / "out").exists()
    # a list naming an entry twice is one more problem, not the only one reported
    with pytest.raises(PreflightError) as err:
        causalrec.compare(["Foo"], "retail-sim", splits="iid,iid", seeds=[2020, 2020], out=in_tmp / "out")
    assert [line.split(":")[0].split(".")[0] for line in str(err.value).splitlines()[1:]] == [
        "- splits lists an entry twice",
        "- unknown model 'Foo'",
        "- seeds must be distinct integers >= 0; got [2020, 2020]",
    ]


@pytest.mark.slow
def test_an_llm_cell_runs_through_the_same_path(in_tmp):
    params = {
        **TINY,
        "GenRec.sft_args": {"max_steps": 3, "per_device_train_batch_size": 16},
        "GenRec.tiny_hidden_size": 16,
        "GenRec.tiny_layers": 1,
        "GenRec.rank_batch_size": 32,
    }
    frame = causalrec.compare(
        ["Pop", "GenRec"],
        "retail-sim",
        splits="regional",
        seeds=1,
        params=params,
        out=in_tmp / "out",
        baseline="Pop",
        show_progress=False,
        plots=False,
    )
    assert len(frame.attrs["failures"]) == 0, frame.attrs["failures"].error.tolist()
    record = json.loads(next((in_tmp / "out" / "cells").glob("GenRec-*.json")).read_text())
    assert record["status"] == "ok" and record["result"]["stages"][0]["stage"] == "sft"
    assert record["result"]["stages"][0]["global_step"] == 3
    ndcg = record["result"]["test_result"]["ndcg@10"]
    assert np.mean(record["cases"]["metrics"]["ndcg@10"]) == pytest.approx(ndcg, abs=6e-5)
    pop = json.loads(next((in_tmp / "out" / "cells").glob("Pop-*.json")).read_text())
    assert sorted(pop["cases"]["user"]) == sorted(record["cases"]["user"])  # same cases for both families
    sig = frame.attrs["significance"]
    assert list(sig.model) == ["GenRec", "GenRec"] and (sig.n_pairs == len(record["cases"]["user"])).all()


def test_worst_environment_rows_ignore_groups_with_few_cases():
    """A region with three test cases sits at 0 by chance; the worst-environment row skips groups under
    ``min_env_cases`` (hand-built cell: A 3 cases at 0.0, B 50 at 0.2, C 40 at 0.1)."""
    from causalrec.experiments.compare import results_frame

    region = {
        "A": {"ndcg@10": 0.0, "cases": 3},
        "B": {"ndcg@10": 0.2, "cases": 50},
        "C": {"ndcg@10": 0.1, "cases": 40},
        "<worst>": {"ndcg@10": 0.0},
    }
    record = {
        "status": "ok",
        "model": "Pop",
        "split": "regional",
        "seed": 2020,
        "result": {"test_result": {"ndcg@10": 0.15}, "test_env_result": {"region": region}},
    }

    def worst(min_cases):
        frame = results_frame([record], min_cases)
        return list(frame[frame.environment == "region=<worst>"].value)

    assert worst(1) == [0.0]
    assert worst(20) == [0.1]
    assert worst(41) == [0.2]
    assert worst(51) == []  # no group that large: no row rather than a misleading one
    frame = results_frame([record], 20)
    assert sorted(frame.environment) == ["all", "region=<worst>", "region=A", "region=B", "region=C"]
    with pytest.raises(ConfigError, match="min_env_cases"):
        CompareConfig(models=["Pop"], splits=["iid"], seeds=1, min_env_cases=0)


def test_outputs_are_written_with_the_umask_not_mkstemps_0600(tmp_path):
    from causalrec.io import write_atomic

    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.csv", "x\n")
        write_atomic(tmp_path / "b.gz", b"\x1f\x8b")
    finally:
        os.umask(old)
    assert (tmp_path / "a.csv").read_text() == "x\n" and (tmp_path / "b.gz").read_bytes() == b"\x1f\x8b"
    assert {oct((tmp_path / n).stat().st_mode & 0o777) for n in ("a.csv", "b.gz")} == {oct(0o644)}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


# ----------------------------------------------------------------------------------- publishing, pooling
USERS = [f"cust-{17850 + i}" for i in range(40)]  # customer-id-like strings that no metric or label can contain


def _hand_cell(model: str, split: str, seed: int, shift: float, status: str = "ok") -> dict:
    """A cell record as ``run_cell`` writes it, per-case values keyed by customer ids included."""
    from causalrec.io import digest

    key = digest({"model": model, "split": split, "seed": seed, "hand": 1})
    rng = np.random.default_rng(int(key[:8], 16))
    record = {
        "format": 1,
        "key": key,
        "model": model,
        "dataset": "retail-sim",
        "split": split,
        "seed": seed,
        "params": {
            "metrics": ["NDCG", "Recall"],
            "topk": [10],
            "stage_cache_dir": "/home/alice/runs/x/stages",
            "split": split,
            "seed": seed,
        },
        "status": status,
        "seconds": 1.5,
        "finished": "2026-12-05T00:00:00+0000",
    }
    if status != "ok":
        record.update(error="ValueError: boom", traceback="Traceback ... /home/alice/causalrec/x.py")
        return record
    regions = ["north"] * 22 + ["south"] * 18
    ndcg = np.clip(rng.normal(0.2 + shift, 0.1, len(USERS)), 0, 1).round(6)
    recall = (ndcg > 0.15).astype(float)
    metrics = {"ndcg@10": ndcg, "recall@10": recall}
    per_region = {
        r: {m: round(float(v[[g == r for g in regions]].mean()), 4) for m, v in metrics.items()}
        for r in ("north", "south")
    }
    env = {r: {**per_region[r], "cases": regions.count(r)} for r in per_region}
    env["<worst>"] = {m: min(per_region[r][m] for r in per_region) for m in metrics}
    record["result"] = {
        "model": model,
        "dataset": "retail-sim",
        "best_valid_score": 0.3,
        "valid_score_bigger": True,
        "best_valid_result": {"ndcg@10": 0.3, "recall@10": 0.5},
        "test_result": {m: round(float(v.mean()), 4) for m, v in metrics.items()},
        "test_env_result": {"region": env},
        "protocol": "full ranking (hand-built)",
        "stages": [{"stage": "sft", "train_seconds": 12.5, "directory": "/home/alice/runs/x/stages/sft-1"}],
    }
    record["cases"] = {
        "user": USERS,
        "metrics": {m: v.tolist() for m, v in metrics.items()},
        "environments": {"region": regions},
    }
    return record


def _write_cells(folder: Path, records) -> None:
    from causalrec.experiments.publish import cell_file_name

    (folder / "cells").mkdir(parents=True, exist_ok=True)
    for rec in records:
        (folder / "cells" / cell_file_name(rec)).write_text(json.dumps(rec, indent=1))


def _hand_grid(models=("Pop", "BPR"), seeds=(2020, 2021, 2022)):
    return [
        _hand_cell(m, s, seed, 0.05 * (m == "BPR") - 0.03 * (s == "seasonal") + 0.01 * (seed - 2020))
        for s in ("iid", "seasonal")
        for seed in seeds
        for m in models
    ]


def _table(report: str, metric: str) -> str:
    """The report's ``## <metric>`` section (the models x splits table and its worst-environment table)."""
    return report.split(f"## {metric}\n")[1].split("\n## ")[0]


@pytest.fixture
def no_training_or_data(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a report over stored cells planned, prepared data or trained")

    for name in (
        "causalrec.recbole.quick_start.run",
        "causalrec.recbole.quick_start.make_config",
        "causalrec.experiments.compare.plan",
        "causalrec.experiments.compare.run_cell",
    ):
        monkeypatch.setattr(name, forbidden)


def test_published_cells_hold_no_user_ids_and_rebuild_the_same_table(in_tmp, no_training_or_data):
    import shutil

    from causalrec.cli import main

    raw, pub = in_tmp / "run", in_tmp / "docs" / "results" / "x"
    records = _hand_grid() + [_hand_cell("ItemKNN", "iid", 2020, 0.0, status="failed")]
    _write_cells(raw, records)
    # the run's own report (from the raw cells, bootstrap included), published on the way
    code = main(
        [
            "compare",
            "--report-only",
            "--from",
            str(raw),
            "--out",
            str(raw),
            "--publish",
            str(pub),
            "--models",
            "Pop,ItemKNN,BPR",
            "--baseline",
            "Pop",
            "--no-progress",
        ]
    )
    assert code == 1  # the failed cell
    assert (raw / "cases.csv.gz").is_file()  # the run folder keeps its per-case file ...
    assert not (pub / "cases.csv.gz").exists()  # ... the published one never gets it
    names = sorted(p.relative_to(pub).as_posix() for p in pub.rglob("*") if p.is_file())
    assert len([n for n in names if n.startswith("cells/")]) == 13
    assert {
        "compare.json",
        "report.md",
        "results.csv",
        "significance.csv",
        "failures.csv",
        "plots/ndcg_at_10_by_split.png",
    } <= set(names)
    for path in pub.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            leaked = [u for u in USERS if u.encode() in data]
            assert not leaked, f"{path} holds user ids {leaked[:3]}"
            assert b"/home/alice" not in data, path
    cell = json.loads(next((pub / "cells").glob("BPR-seasonal-seed2021-*.json")).read_text())
    original = next(r for r in records if (r["model"], r["split"], r["seed"]) == ("BPR", "seasonal", 2021))
    assert "cases" not in cell and cell["n_cases"] == len(USERS) and cell["published"] == 1
    assert cell["key"] == original["key"] and cell["status"] == "ok" and cell["seconds"] == 1.5
    assert cell["result"]["test_result"] == original["result"]["test_result"]
    assert cell["result"]["test_env_result"] == original["result"]["test_env_result"]
    assert cell["result"]["stages"] == [{"stage": "sft", "train_seconds": 12.5}]
    assert "stage_cache_dir" not in cell["params"] and cell["params"]["topk"] == [10]
    failed = json.loads(next((pub / "cells").glob("ItemKNN-*.json")).read_text())
    assert failed["error"] == "ValueError: boom" and "traceback" not in failed
    manifest = json.loads((pub / "compare.json").read_text())
    assert manifest["models"] == ["Pop", "ItemKNN", "BPR"] and manifest["seeds"] == [2020, 2021, 2022]
    assert manifest["baseline"] == "Pop" and manifest["dataset"] == "retail-sim"

    # the published report: the same metric tables; seed-level tests only, and it says why
    first, published = (raw / "report.md").read_text(), (pub / "report.md").read_text()
    for metric in ("ndcg@10", "recall@10"):
        assert _table(published, metric) == _table(first, metric)
    assert "bootstrap: per-case values not published (12 of 12 finished cells" in published
    assert "per-case values not published" not in first
    assert "| ItemKNN | not run | not run | n/a |" in published
    assert "| ItemKNN | iid | 2020 | ValueError: boom |" in published
    pd.testing.assert_frame_equal(pd.read_csv(pub / "results.csv"), pd.read_csv(raw / "results.csv"))
    full, seed_level = pd.read_csv(raw / "significance.csv"), pd.read_csv(pub / "significance.csv")
    same = [
        "split",
        "metric",
        "model",
        "n_seeds",
        "mean",
        "baseline_mean",
        "diff",
        "diff_ci_low",
        "diff_ci_high",
        "rel_change",
        "ttest_p",
        "holm_p",
        "cohens_dz",
    ]
    pd.testing.assert_frame_equal(seed_level[same], full[same])
    assert full.rel_ci_low.notna().all() and seed_level.rel_ci_low.isna().all() and (seed_level.n_pairs == 0).all()

    # --report-only on the published folder alone (a new machine: no run folder, no data): the same report
    (pub / "report.md").unlink()
    shutil.rmtree(raw)
    assert main(["compare", "--report-only", "--out", str(pub), "--no-progress"]) == 1
    assert (pub / "report.md").read_text() == published
    assert not (pub / "cases.csv.gz").exists()
    # the grid of compare.json: a cell never run reads "not run"
    (next((pub / "cells").glob("BPR-iid-seed2022-*.json"))).unlink()
    assert main(["compare", "--report-only", "--out", str(pub), "--no-progress", "--no-plots"]) == 1
    assert re.search(r"^\| BPR \| \S+ ± \S+ \(2/3 seeds\)", (pub / "report.md").read_text(), re.M)
    assert "11 of 18 cells finished, 6 not run" in (pub / "report.md").read_text()


def test_report_and_published_cells_show_the_repeat_mix_each_cell_chose_on_validation(in_tmp, no_training_or_data):
    from causalrec.cli import main

    raw, pub = in_tmp / "run", in_tmp / "docs" / "results" / "x"
    records = _hand_grid(seeds=(2020, 2021))
    for rec, weight in zip([r for r in records if r["model"] == "BPR" and r["split"] == "seasonal"], (0.3, 0.0)):
        rec["result"]["repeat_mix"] = {"weight": weight, "valid_score_by_weight": {"0.0": 0.1, "0.3": 0.2}}
    _write_cells(raw, records)
    args = ["compare", "--report-only", "--from", str(raw), "--out", str(raw), "--models", "Pop,BPR", "--no-plots"]
    assert main([*args, "--publish", str(pub), "--no-progress"]) == 0
    for folder in (raw, pub):
        section = (folder / "report.md").read_text().split("## Chosen on validation\n")[1]
        assert "| BPR | seasonal | 0.3 (2020), 0 (2021) |" in section
        assert "| Pop |" not in section and "| BPR | iid |" not in section  # cells that chose nothing
    cell = json.loads(next((pub / "cells").glob("BPR-seasonal-seed2020-*.json")).read_text())
    assert cell["result"]["repeat_mix"]["weight"] == 0.3
    main(
        [
            "compare",
            "--report-only",
            "--from",
            str(raw),
            "--out",
            str(in_tmp / "plain"),
            "--models",
            "Pop",
            "--no-plots",
            "--no-progress",
        ]
    )
    assert "Chosen on validation" not in (in_tmp / "plain" / "report.md").read_text()


def test_publish_cases_puts_simulated_users_values_beside_the_cells_and_the_bootstrap_comes_back(
    in_tmp, no_training_or_data
):
    import shutil
    import sys

    from causalrec.cli import main
    from causalrec.experiments.publish import read_cell

    raw, pub = in_tmp / "run", in_tmp / "pub"
    records = _hand_grid() + [_hand_cell("ItemKNN", "iid", 2020, 0.0, status="failed")]
    _write_cells(raw, records)
    args = ["compare", "--report-only", "--from", str(raw), "--models", "Pop,ItemKNN,BPR", "--baseline", "Pop"]
    args += ["--no-progress", "--no-plots"]
    assert main([*args, "--out", str(raw), "--publish", str(pub), "--publish-cases"]) == 1  # the failed cell
    sides = sorted(p.name for p in (pub / "cells").glob("*.cases.csv.gz"))
    assert len(sides) == 12 and not any(n.startswith("ItemKNN") for n in sides)  # finished cells only
    for rec in records[:-1]:
        path = next((pub / "cells").glob(f"{rec['model']}-{rec['split']}-seed{rec['seed']}-*.json"))
        assert "cases" not in json.loads(path.read_text())  # the JSON stays without user ids
        back = read_cell(path)["cases"]
        assert back["user"] == rec["cases"]["user"] and back["environments"] == rec["cases"]["environments"]
        assert back["metrics"] == rec["cases"]["metrics"]  # exactly: floats round-trip through the CSV
    # the published report's bootstrap and pooled test equal the run's, from the published folder alone
    full = pd.read_csv(raw / "significance.csv")
    shutil.rmtree(raw)
    assert main(["compare", "--report-only", "--out", str(pub), "--no-progress", "--no-plots"]) == 1
    published = pd.read_csv(pub / "significance.csv")
    assert full.rel_ci_low.notna().all() and (full.n_pairs > 0).all()
    pd.testing.assert_frame_equal(published, full)
    assert "not published" not in (pub / "report.md").read_text() and not (pub / "cases.csv.gz").exists()
    # scripts/seed_pairs.py pairs published cells through their per-case files
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        import seed_pairs
    finally:
        sys.path.pop(0)
    pair = seed_pairs.compare(str(pub), "BPR", str(pub), "Pop", "seasonal")
    row = published[(published.model == "BPR") & (published.split == "seasonal") & (published.metric == "ndcg@10")]
    assert pair["test"].p == pytest.approx(float(row.ttest_p.iloc[0])) and pair["test"].n_seeds == 3
    assert pair["boot"].low < pair["test"].rel_change < pair["boot"].high and "customers" not in pair
    # with one seed shared there is no seed-level test: the script says how far that run's customers move it
    one = in_tmp / "one-seed"
    (one / "cells").mkdir(parents=True)
    for f in (pub / "cells").glob("*-seasonal-seed2021-*"):
        shutil.copy(f, one / "cells" / f.name)
    single = seed_pairs.compare(str(one), "BPR", str(one), "Pop", "seasonal")
    bpr, pop = (seed_pairs.finished_cells(str(one), m, "seasonal")[2021] for m in ("BPR", "Pop"))
    users = sorted(seed_pairs.per_user(bpr))
    x = np.array([seed_pairs.per_user(bpr)[u] for u in users])
    y = np.array([seed_pairs.per_user(pop)[u] for u in users])
    assert single["test"].n_seeds == 1 and math.isnan(single["boot"].low)
    assert single["customers"] == statistics.customer_bootstrap(x, y)
    assert single["customers"].low < x.mean() / y.mean() - 1 < single["customers"].high
    assert single["wilcoxon_p"] == pytest.approx(stats.wilcoxon(x, y).pvalue)
    # publishing again without --publish-cases removes them; a real dataset refuses them before anything runs
    main(["compare", "--report-only", "--from", str(pub), "--out", str(in_tmp / "r2"), "--publish", str(pub)])
    assert not list((pub / "cells").glob("*.cases.csv.gz"))
    without = seed_pairs.compare(str(pub), "BPR", str(pub), "Pop", "seasonal")  # the seed-level test, no interval
    assert without["test"] == pair["test"] and math.isnan(without["boot"].low) and without["boot"].n_seeds == 0
    with pytest.raises(ConfigError, match="real users"):
        causalrec.compare(["Pop"], "online-retail", out=in_tmp / "x", publish=in_tmp / "p", publish_cases=True)
    with pytest.raises(ConfigError, match="add --publish"):
        causalrec.compare(["Pop"], "retail-sim", out=in_tmp / "x", publish_cases=True)
    assert not (in_tmp / "x").exists() and not (in_tmp / "p").exists()


def test_the_report_lists_the_cells_stopped_by_the_epoch_cap(in_tmp, no_training_or_data):
    records = _hand_grid(models=("Pop", "BPR"))
    capped = next(r for r in records if (r["model"], r["split"], r["seed"]) == ("BPR", "seasonal", 2021))
    capped["result"]["epoch_cap"] = {"epochs": 300, "stopping_step": 30, "evaluations_since_best": 4}
    _write_cells(in_tmp / "run", records)
    causalrec.compare(
        report_only=True, sources=[in_tmp / "run"], out=in_tmp / "report", show_progress=False, plots=False
    )
    section = (in_tmp / "report" / "report.md").read_text().split("## Stopped by the epoch cap\n")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "model" not in line]
    assert rows == ["| BPR | seasonal | 2021 | 300 | 30 | 4 |"]
    _write_cells(in_tmp / "clean", _hand_grid(models=("Pop", "BPR")))
    causalrec.compare(report_only=True, sources=[in_tmp / "clean"], out=in_tmp / "r2", show_progress=False, plots=False)
    assert "epoch cap" not in (in_tmp / "r2" / "report.md").read_text()


def test_report_only_without_a_cell_of_the_asked_grid_names_what_the_folder_holds(in_tmp, no_training_or_data):
    from causalrec.cli import main

    _write_cells(in_tmp / "run", [r for r in _hand_grid(models=("Pop", "BPR")) if r["split"] == "iid"])
    argv = ["compare", "--report-only", "--from", str(in_tmp / "run"), "--out", str(in_tmp / "report"), "--no-progress"]
    with pytest.raises(ConfigError) as err:  # main's caller (the CLI entry point) prints it; the code is 2
        causalrec.compare(
            ["SASRec"],
            "retail-sim",
            splits="iid",
            report_only=True,
            sources=[in_tmp / "run"],
            out=in_tmp / "report",
            show_progress=False,
        )
    assert str(err.value).startswith("none of the 3 cells asked for (SASRec x iid x seeds 2020, 2021, 2022)")
    assert str(err.value).endswith("whose retail-sim cells are of models BPR, Pop; splits iid; seeds 2020, 2021, 2022")
    assert main([*argv, "--models", "SASRec", "--splits", "iid"]) == 2 and not (in_tmp / "report").exists()
    assert main([*argv, "--models", "Pop", "--splits", "iid"]) == 0  # the same folder, a grid it holds


def test_report_only_pools_published_folders(in_tmp, no_training_or_data, caplog):
    import logging

    from causalrec.cli import main

    records = _hand_grid(models=("Pop", "BPR", "SASRec"))
    full = in_tmp / "full"
    _write_cells(full, records)
    assert (
        main(
            [
                "compare",
                "--report-only",
                "--from",
                str(full),
                "--out",
                str(full),
                "--baseline",
                "Pop",
                "--no-progress",
                "--no-plots",
            ]
        )
        == 0
    )
    # two processes, two published folders: Pop and BPR in one, SASRec (and a copy of a Pop cell) in the other
    classical = [r for r in records if r["model"] != "SASRec"]
    llm = [r for r in records if r["model"] == "SASRec"] + [records[0]]
    _write_cells(in_tmp / "run-a", classical)
    _write_cells(in_tmp / "run-b", llm)
    for run, pub, models in (("run-a", "pub-a", "Pop,BPR"), ("run-b", "pub-b", "SASRec,Pop")):
        assert (
            main(
                [
                    "compare",
                    "--report-only",
                    "--from",
                    str(in_tmp / run),
                    "--out",
                    str(in_tmp / run),
                    "--publish",
                    str(in_tmp / pub),
                    "--models",
                    models,
                    "--baseline",
                    "Pop",
                    "--no-progress",
                    "--no-plots",
                ]
            )
            == 0
        )
    with caplog.at_level(logging.INFO, logger="causalrec.experiments.publish"):
        code = main(
            [
                "compare",
                "--report-only",
                "--from",
                str(in_tmp / "pub-a"),
                "--from",
                str(in_tmp / "pub-b"),
                "--out",
                str(in_tmp / "readme"),
                "--no-progress",
                "--no-plots",
            ]
        )
    assert code == 0
    assert any("is a copy of" in r.getMessage() and "pub-a" in r.getMessage() for r in caplog.records)
    pooled = (in_tmp / "readme" / "report.md").read_text()
    first = (full / "report.md").read_text()
    for metric in ("ndcg@10", "recall@10"):
        section = _table(pooled, metric)
        assert section == _table(first, metric)  # the same numbers, models in the folders' order
        assert [
            line.split("|")[1].strip() for line in section.splitlines() if line.startswith("| ") and "model" not in line
        ][:3] == ["Pop", "BPR", "SASRec"]
    assert "18 of 18 cells finished" in pooled and "## Significance against Pop" in pooled
    assert not (in_tmp / "readme" / "cases.csv.gz").exists()  # published cells have no per-case values
    sig = pd.read_csv(in_tmp / "readme" / "significance.csv")
    assert sorted(set(sig.model)) == ["BPR", "SASRec"] and (sig.n_seeds == 3).all()
    pd.testing.assert_frame_equal(pd.read_csv(in_tmp / "readme" / "results.csv"), pd.read_csv(full / "results.csv"))
    # --models selects from the pool
    assert (
        main(
            [
                "compare",
                "--report-only",
                "--from",
                str(in_tmp / "pub-a"),
                "--from",
                str(in_tmp / "pub-b"),
                "--out",
                str(in_tmp / "two"),
                "--models",
                "Pop,SASRec",
                "--no-progress",
                "--no-plots",
            ]
        )
        == 0
    )
    assert set(pd.read_csv(in_tmp / "two" / "results.csv").model) == {"Pop", "SASRec"}


def test_publish_refuses_a_run_cache_and_a_run_into_a_published_folder(in_tmp, no_training_or_data, caplog):
    from causalrec.experiments.publish import report_cells

    records = _hand_grid(seeds=(2020,))
    _write_cells(in_tmp / "run", records)
    with pytest.raises(ConfigError, match="per-user values"):
        report_cells([in_tmp / "run"], in_tmp / "out", publish=in_tmp / "run")  # would drop the run's cases
    report_cells([in_tmp / "run"], in_tmp / "run", publish=in_tmp / "pub", plots=False)
    with pytest.raises(ConfigError, match="published folder"):
        causalrec.compare(["Pop"], "retail-sim", splits="iid", seeds=1, out=in_tmp / "pub", show_progress=False)
    with pytest.raises(ConfigError, match="--report-only"):
        causalrec.compare(["Pop"], "retail-sim", out=in_tmp / "x", sources=[in_tmp / "pub"])
    # a published cell of the same model, split and seed with other settings is replaced, not kept beside it
    newer = _hand_cell("Pop", "iid", 2020, 0.1)
    newer["key"] = "f" * 64
    _write_cells(in_tmp / "run2", [newer])
    report_cells([in_tmp / "run2"], in_tmp / "run2", publish=in_tmp / "pub", plots=False)
    pops = sorted(p.name for p in (in_tmp / "pub" / "cells").glob("Pop-iid-seed2020-*.json"))
    assert pops == [f"Pop-iid-seed2020-{'f' * 16}.json"]
    # its params are the same, so the key changed with causalrec's full config: the warning says so
    assert any("replaces" in r.getMessage() and "the same params" in r.getMessage() for r in caplog.records)
    caplog.clear()
    newer["params"] = {**newer["params"], "learning_rate": 0.5}
    newer["key"] = "e" * 64
    _write_cells(in_tmp / "run2b", [newer])
    report_cells([in_tmp / "run2b"], in_tmp / "run2b", publish=in_tmp / "pub", plots=False)
    assert any("with other settings" in r.getMessage() for r in caplog.records)
    pops = sorted(p.name for p in (in_tmp / "pub" / "cells").glob("Pop-iid-seed2020-*.json"))
    assert pops == [f"Pop-iid-seed2020-{'e' * 16}.json"]
    # ... and a finished published cell is not replaced by a failed copy of itself
    failed = {**newer, "status": "failed", "error": "RuntimeError: out of memory"}
    del failed["result"], failed["cases"]
    _write_cells(in_tmp / "run3", [failed])
    report_cells([in_tmp / "run3"], in_tmp / "run3", publish=in_tmp / "pub", plots=False)
    kept = json.loads((in_tmp / "pub" / "cells" / pops[0]).read_text())
    assert kept["status"] == "ok" and kept["result"]["test_result"] == newer["result"]["test_result"]


def test_publishing_after_a_run_keeps_the_cached_report(grid, in_tmp, monkeypatch):
    """``--publish`` on a real (cached) grid: no user id of the cells in the published folder, same tables."""
    import shutil

    from causalrec.cli import main

    out, _ = grid
    shutil.copytree(out / "cells", in_tmp / "o" / "cells")
    monkeypatch.setattr("causalrec.recbole.quick_start.run", lambda *a, **k: pytest.fail("trained a cached cell"))
    code = main(_grid_argv("Pop,BPR", in_tmp / "o", "--report-only", "--publish", str(in_tmp / "pub")))
    assert code == 0
    users = {str(u) for rec in _records(out) for u in rec["cases"]["user"]}
    assert len(users) > 100
    for path in (in_tmp / "pub").rglob("*"):
        if path.is_file():
            text = path.read_text()
            tokens = set(re.findall(r'"([^"]*)"', text)) | set(re.findall(r"[\w.@<>=-]+", text))
            assert not tokens & users, path
    first, published = (in_tmp / "o" / "report.md").read_text(), (in_tmp / "pub" / "report.md").read_text()
    assert _table(published, "ndcg@10") == _table(first, "ndcg@10")
    assert len(list((in_tmp / "pub" / "cells").glob("*.json"))) == 8
