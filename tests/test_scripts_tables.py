"""scripts/dial_table.py, arm_table.py and glance_table.py: the docs' tables from compare cells, checked on hand-made cells."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import arm_table  # noqa: E402
import case_breakdown  # noqa: E402
import dial_table  # noqa: E402
import glance_table  # noqa: E402
import interim_eval  # noqa: E402
import promotion_reliance as pr  # noqa: E402


def _cell(folder: Path, model: str, seed: int, ndcg: float, valid: float = 0.0, recovery=None, **params) -> None:
    record = {
        "key": f"{model}-{seed}-{ndcg}",
        "model": model,
        "split": "seasonal",
        "seed": seed,
        "status": "ok",
        "params": {"num_threads": 1, "split": "seasonal", "seed": seed, **params},
        "result": {
            "test_result": {"ndcg@10": ndcg},
            "best_valid_result": {"ndcg@10": valid},
            "stages": [{"stage": "sft"}, {"stage": "x", "environment_recovery": recovery}],
        },
    }
    (folder / "cells").mkdir(parents=True, exist_ok=True)
    (folder / "cells" / f"{model}-seasonal-seed{seed}-{abs(hash((model, seed, ndcg))):x}.json").write_text(
        json.dumps(record)
    )


def test_dial_table_averages_the_model_seeds_and_keeps_only_complete_columns(tmp_path):
    shop = dict(sim_confounding=1.0, data_seed=2021)
    _cell(tmp_path, "CausalDPO", 2020, 0.10, **shop)
    _cell(tmp_path, "CausalDPO", 2021, 0.12, **shop)
    _cell(tmp_path, "SDPORec", 2020, 0.08, **shop)  # seed 2021 missing: left out with two model seeds
    _cell(tmp_path, "SDPORec", 2021, 0.09, **shop, beta=2.0)  # not the defaults: not a dial cell
    _cell(tmp_path, "GenRec", 2020, 0.09, prompt_environment="season", environment_inference="observed", **shop)
    _cell(tmp_path, "GenRec", 2021, 0.11, prompt_environment="season", environment_inference="observed", **shop)
    one = dial_table.collect([str(tmp_path)])
    assert one == {(1.0, 2021): {"CausalDPO": 0.10, "SDPORec": 0.08, "GenRec + season": 0.09}}
    both = dial_table.collect([str(tmp_path)], (2020, 2021))
    assert both == {(1.0, 2021): {"CausalDPO": pytest.approx(0.11), "GenRec + season": pytest.approx(0.10)}}
    assert dial_table.changes(both, "CausalDPO", "GenRec + season") == [(1.0, pytest.approx(0.11 / 0.10 - 1))]
    assert "too few for a trend" in dial_table.trends(both)


def test_dial_table_compares_the_backdoor_ranking_with_sdporec_and_fits_the_trend(tmp_path):
    # CausalDPO marginal (no context) against SDPORec at three shops: +0 %, +10 %, +20 % over levels 0, 0.5, 1
    for level, gain in ((0.0, 0.0), (0.5, 0.1), (1.0, 0.2)):
        shop, folder = dict(sim_confounding=level, data_seed=2021), tmp_path / f"dial-{level}"
        _cell(folder, "SDPORec", 2020, 0.10, **shop)
        _cell(folder, "CausalDPO", 2020, 0.10 * (1 + gain), environment_inference="marginal", **shop)
        _cell(folder, "LightGCN", 2020, 0.15, resume=True, **shop)  # resume is bookkeeping
        _cell(folder, "LightGCN", 2020, 0.16, resume=True, stopping_step=300, **shop)  # a column of its own
    _cell(tmp_path / "grid", "LightGCN", 2020, 0.14, epochs=3000, sim_confounding=0.8)  # now LightGCN's default
    _cell(tmp_path / "grid", "BPR", 2020, 0.13, epochs=3000, sim_confounding=0.8)  # not BPR's: not a dial cell
    table = dial_table.collect([str(tmp_path)])
    assert table[(0.5, 2021)] == {
        "SDPORec": 0.10,
        "CausalDPO marginal": pytest.approx(0.11),
        "LightGCN": 0.15,
        "LightGCN, patience 300": 0.16,
    }
    assert "CausalDPO" not in table[(0.5, 2021)]  # the marginal cell is not the default's column
    _cell(tmp_path / "grid", "SASRec", 2020, 0.11, resume=True, sim_confounding=0.8)
    assert dial_table.collect([str(tmp_path)])[(0.8, 2020)] == {"LightGCN": 0.14, "SASRec": 0.11}
    trend = dial_table.trends(table).splitlines()[0]
    assert trend.startswith("CausalDPO marginal vs SDPORec: slope +20.0 points") and "3 of 3" not in trend
    assert "2 of 3 changes positive" in trend  # +0 % is not positive
    row = [line for line in dial_table.markdown(table).splitlines() if line.startswith("| 1.0 |")][0]
    assert "| 0.1200 | 0.1500 | 0.1600 |" in row and row.endswith("| +20.0 % |  |  |")
    _cell(tmp_path / "other-shop", "SDPORec", 2020, 0.12, sim_confounding=1.0, data_seed=2022)
    row = [line for line in dial_table.markdown(dial_table.collect([str(tmp_path)])).splitlines() if "| 1.0 |" in line]
    assert row[0].startswith("| 1.0 | 2021, 2022 | not run | 0.1100 ± 0.0141 | 0.1200 (data seed 2021) |")


def test_arm_table_row_is_mean_and_sample_std_over_seeds_with_the_recovery_means(tmp_path):
    recovery = [
        {"nmi/region": 0.2, "ari/region": 0.1, "probe/region": 0.6, "chance/region": 0.3},
        {"nmi/region": 0.4, "ari/region": 0.3, "probe/region": 0.8, "chance/region": 0.3},
    ]
    for seed, (test, valid, found) in enumerate(zip((0.10, 0.14), (0.2, 0.3), recovery), start=2020):
        _cell(tmp_path, "CausalDPO", seed, test, valid, recovery=found)
    row = arm_table.row("latent", str(tmp_path), "CausalDPO", "seasonal", "region")
    std = statistics.stdev([0.10, 0.14])
    assert row == (
        f"| latent | 2 | 0.2500 ± {statistics.stdev([0.2, 0.3]):.4f} | 0.1200 ± {std:.4f} | "
        "0.300 / 0.200 / 0.700 / 0.300 |"
    )
    assert arm_table.row("none", str(tmp_path), "SDPORec", "seasonal", "region") == "| none | 0 | – | – | – |"


def test_promotion_reliance_counts_the_cases_own_regions_line(in_tmp):
    """scripts/promotion_reliance.py on a small promoted shop's real validation loader: a scorer that ranks the case's
    region's promoted line first fills the top-1 with it, one that ranks it last never shows it, and the share of
    targets on the line equals a count over the prepared validation file."""
    import pandas as pd
    import torch

    from causalrec.recbole.quick_start import build

    shop = {"sim_users": 150, "sim_items": 200, "sim_promotion": 1.0, "show_progress": False, "split": "seasonal"}
    config, _, (_, valid, _) = build("GRU4Rec", "retail-sim", config_dict=shop, saved=False)  # a sequential loader
    promoted = pr.promoted_items(config)
    assert len(promoted) == 4 and all(promoted.values())
    dataset = valid._dataset
    items = dataset.id2token("item_id", list(range(1, dataset.item_num)))

    def scorer(sign):
        def score(interaction):
            regions = dataset.id2token("region", interaction["region"].numpy())
            on_line = [[0.0] + [float(item in promoted[r]) for item in items] for r in regions]
            return sign * torch.tensor(on_line) + torch.rand(len(regions), dataset.item_num) * 1e-3

        return score

    follow, avoid = pr.shares(scorer(1.0), valid, promoted, k=1), pr.shares(scorer(-1.0), valid, promoted, k=10)
    assert follow["top"] == 1.0 and avoid["top"] == 0.0
    rows = pd.read_csv(Path(config["data_path"]) / "retail-sim.seq_valid.inter", sep="\t")
    expected = sum(t in promoted[r] for t, r in zip(rows["item_id:token"], rows["region:token"])) / len(rows)
    assert follow["cases"] == len(rows) and follow["truth"] == pytest.approx(expected)
    assert 0 < expected < 1


def test_case_breakdown_groups_each_case_by_its_target(tmp_path, monkeypatch):
    """Cells whose per-case value is 1 for a repeat purchase and 0 otherwise (seed 2021: 0.5 and 0): the repeat
    table reads their seed means back, counted against the prepared data independently of the script."""
    import pandas as pd

    from causalrec.data import DataSpec, prepare

    monkeypatch.setenv("CAUSALREC_CACHE", str(tmp_path / "cache"))
    prepared = prepare(DataSpec(dataset="retail-sim", split="seasonal"))
    read = lambda suffix: pd.read_csv(prepared.file(suffix), sep="\t")  # noqa: E731
    seen = pd.concat([read("train.inter"), read("valid.inter")])
    bought = set(zip(seen["user_id:token"], seen["item_id:token"]))
    test = read("test.inter")
    users = test["user_id:token"].tolist()
    repeat = [(u, i) in bought for u, i in zip(users, test["item_id:token"])]
    (tmp_path / "run" / "cells").mkdir(parents=True)
    for seed, hit in ((2020, 1.0), (2021, 0.5)):
        cell = {"key": str(seed), "model": "M", "split": "seasonal", "seed": seed, "status": "ok"}
        cell["cases"] = {"user": users, "metrics": {"ndcg@10": [hit * r for r in repeat]}, "environments": {}}
        (tmp_path / "run" / "cells" / f"M-seasonal-seed{seed}-x.json").write_text(json.dumps(cell))
    tables, overall = case_breakdown.breakdown("seasonal", [f"m={tmp_path / 'run'}:M"])
    table = tables["repeat"]
    assert table.loc[True, "m (2 seeds)"] == pytest.approx(0.75) and table.loc[False, "m (2 seeds)"] == 0.0
    assert table.loc[True, "cases"] == sum(repeat) and table["cases"].sum() == len(users)
    assert overall["m (2 seeds)"] == pytest.approx(0.75 * sum(repeat) / len(users))
    assert tables["month"]["cases"].sum() == len(users) and set(tables["popularity"].index) == {"tail", "mid", "head"}


def test_dial_table_with_a_setting_keeps_only_the_cells_run_with_it(tmp_path):
    shop = dict(sim_confounding=1.0, data_seed=2021)
    _cell(tmp_path, "SDPORec", 2020, 0.10, **shop)
    _cell(tmp_path, "SDPORec", 2020, 0.14, repeat_mix="auto", **shop)
    _cell(tmp_path, "CausalDPO", 2020, 0.15, repeat_mix="auto", environment_inference="marginal", **shop)
    assert dial_table.collect([str(tmp_path)]) == {(1.0, 2021): {"SDPORec": 0.10}}
    copy = dial_table.collect([str(tmp_path)], required={"repeat_mix": "auto"})
    assert copy == {(1.0, 2021): {"SDPORec": 0.14, "CausalDPO marginal": 0.15}}


def test_glance_table_picks_each_side_on_validation_and_reads_the_test_after(tmp_path):
    # classical: BPR validates best (0.30 > 0.20) though LightGCN tests best; LLM: GenRec validates best
    for seed, (bpr, lgcn, gen, sdpo) in zip(
        (2020, 2021, 2022), ((0.10, 0.14, 0.12, 0.13), (0.12, 0.15, 0.11, 0.12), (0.11, 0.16, 0.13, 0.14))
    ):
        _cell(tmp_path / "classical", "BPR", seed, bpr, valid=0.30)
        _cell(tmp_path / "classical", "LightGCN", seed, lgcn, valid=0.20)
        _cell(tmp_path / "llm", "GenRec", seed, gen, valid=0.25)
        _cell(tmp_path / "llm", "SDPORec", seed, sdpo, valid=0.24)
    arms = [
        *glance_table._arms(
            "sim", "history", "classical", [(m, str(tmp_path / "classical"), m) for m in ("BPR", "LightGCN")]
        ),
        *glance_table._arms("sim", "history", "LLM", [(m, str(tmp_path / "llm"), m) for m in ("GenRec", "SDPORec")]),
        *glance_table._arms("sim", "history", "LLM", [("GenRec, wide", str(tmp_path / "none"), "GenRec")]),  # no cells
    ]
    lines = glance_table.glance(arms, {("sim", "history"): str(tmp_path / "llm")}, show_all=True)
    row = [line for line in lines if line.startswith("| sim seasonal | history | BPR")][0].split(" | ")
    assert row[2] == "BPR: 0.1100 ± 0.0100 (3 seeds)" and row[3] == "0.1200 ± 0.0100 (3 seeds)"
    assert row[4] == "GenRec: 0.1200 ± 0.0100 (3 seeds)"
    p = stats.ttest_rel([0.12, 0.11, 0.13], [0.10, 0.12, 0.11]).pvalue
    assert row[5] == f"+9.1 % (t p = {p:.2g}, 3 seeds)"
    assert row[6] == "classical: LightGCN: 0.1500 ± 0.0100 (3 seeds); LLM: SDPORec: 0.1300 ± 0.0100 (3 seeds)"
    assert row[7] == "Pop, ItemKNN, GRU4Rec, SASRec |"  # the grid's classical models without cells
    listed = [line for line in lines if line.startswith("| sim seasonal | history | LLM |")]
    assert [line.split(" | ")[3] for line in listed] == ["GenRec", "SDPORec"]  # by validation; no cells: no line
    assert (
        glance_table.comparison(
            glance_table.Scores("a", "GenRec", {1: 0.0}, {1: 0.3}), glance_table.Scores("b", "BPR", {1: 0.0}, {1: 0.1})
        )
        == "3.0x"
    )


def test_glance_table_lets_a_row_given_less_compete_in_the_class_given_more(tmp_path):
    # "+ copy": BPR + copy validates 0.20; GRU4Rec without the copy 0.30 competes there too (weight 0 is a choice)
    _cell(tmp_path / "gru", "GRU4Rec", 2020, 0.22, valid=0.30)
    _cell(tmp_path / "bpr", "BPR", 2020, 0.10, valid=0.20)
    _cell(tmp_path / "bpr-copy", "BPR", 2020, 0.07, valid=0.20)  # ties its no-copy row: the class's own row wins
    _cell(tmp_path / "gen", "GenRec", 2020, 0.20, valid=0.25)
    _cell(tmp_path / "gen-copy", "GenRec", 2020, 0.19, valid=0.22)
    arms = [
        *glance_table._arms(
            "sim",
            "history",
            "classical",
            [("GRU4Rec", str(tmp_path / "gru"), "GRU4Rec"), ("BPR", str(tmp_path / "bpr"), "BPR")],
        ),
        *glance_table._arms("sim", "history", "LLM", [("GenRec", str(tmp_path / "gen"), "GenRec")]),
        *glance_table._arms("sim", "+ copy", "classical", [("BPR", str(tmp_path / "bpr-copy"), "BPR")]),
        *glance_table._arms("sim", "+ copy", "LLM", [("GenRec", str(tmp_path / "gen-copy"), "GenRec")]),
    ]
    lines = glance_table.glance(arms, {("sim", "history"): str(tmp_path / "gen"), ("sim", "+ copy"): "none"})
    copy = [line.split(" | ") for line in lines if line.startswith("| sim seasonal | + copy")][0]
    assert copy[2] == "GRU4Rec, no copy: 0.2200 (seed 2020)" and copy[4] == "GenRec, no copy: 0.2000 (seed 2020)"
    assert copy[5] == "-9.1 %" and copy[7] == "Pop, ItemKNN, LightGCN, GRU4Rec, SASRec |"  # GRU4Rec + copy not run
    tie = glance_table.candidates(arms, "sim", "+ copy", "classical", "seasonal")
    assert [r.label for r in tie] == ["BPR", "GRU4Rec, no copy", "BPR, no copy"]
    assert max(tie[::2], key=lambda r: r.mean("valid")).label == "BPR"  # first of a tie: the class's own
    # a class with no row of its own on one side has no line: the history rows alone do not make one
    assert not glance_table.candidates(arms[:3], "sim", "+ copy", "LLM", "seasonal")


def test_glance_table_refuses_a_folder_with_two_configurations_of_one_seed(tmp_path):
    _cell(tmp_path, "BPR", 2020, 0.10, valid=0.2)
    _cell(tmp_path, "BPR", 2020, 0.12, valid=0.3, learning_rate=0.01)  # which one would be "BPR"?
    with pytest.raises(SystemExit, match="2 cells of BPR on seasonal for 1 finished seeds"):
        glance_table.scores("BPR", str(tmp_path), "BPR", "seasonal")


def test_glance_table_pools_one_label_published_in_several_folders_and_refuses_two_values_of_one_seed(tmp_path):
    _cell(tmp_path / "first", "GRU4Rec", 2020, 0.15, valid=0.30)  # seed 2020 converged first, published alone
    for seed, test in ((2020, 0.15), (2021, 0.13), (2022, 0.14)):  # then all three seeds, 2020's cell copied
        _cell(tmp_path / "seeds", "GRU4Rec", seed, test, valid=0.30 if seed == 2020 else 0.20)
    _cell(tmp_path / "bpr", "BPR", 2020, 0.10, valid=0.25)
    arms = glance_table._arms(
        "sim",
        "history",
        "classical",
        [("GRU4Rec", str(tmp_path / f), "GRU4Rec") for f in ("first", "seeds")]
        + [("BPR", str(tmp_path / "bpr"), "BPR")],
    )
    rows = glance_table.own_rows(arms, "sim", "history", "classical", "seasonal")
    assert [(r.label, sorted(r.test)) for r in rows] == [("GRU4Rec", [2020, 2021, 2022]), ("BPR", [2020])]
    # one row of three seeds, not a one-seed row whose validation (0.30) outbids the three seeds' mean (0.233)
    assert rows[0].value() == "0.1400 ± 0.0100 (3 seeds)" and max(rows, key=lambda r: r.mean("valid")).label == "BPR"
    _cell(tmp_path / "other", "GRU4Rec", 2021, 0.16, valid=0.20, learning_rate=0.01)
    arms += glance_table._arms("sim", "history", "classical", [("GRU4Rec", str(tmp_path / "other"), "GRU4Rec")])
    with pytest.raises(SystemExit, match="GRU4Rec \\(GRU4Rec\\): seed 2021 has two different cells"):
        glance_table.own_rows(arms, "sim", "history", "classical", "seasonal")


def test_interim_eval_of_a_finished_runs_best_model_gives_that_runs_own_metrics(in_tmp, capsys):
    import causalrec

    settings = {"sim_users": 150, "sim_items": 60, "epochs": 4, "show_progress": False, "num_threads": 1}
    result = causalrec.run("BPR", "retail-sim", config_dict={**settings, "checkpoint_dir": str(in_tmp / "ck")})
    argv = ["--model", "BPR", "--dataset", "retail-sim", "--checkpoints", str(in_tmp / "ck")]
    assert interim_eval.main([*argv, "-p", "sim_users=150", "-p", "sim_items=60"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["test"] == result["test_result"] and found["valid"] == result["best_valid_result"]
    assert found["progress"] is None  # not a resumable run: no last-epoch checkpoint
    assert sorted(p.name for p in (in_tmp / "ck").iterdir() if p.suffix == ".pth") == [Path(found["file"]).name]
    with pytest.raises(SystemExit, match="no best-model file"):
        interim_eval.best_model_file(str(in_tmp))


def test_glance_table_write_replaces_only_the_table():
    header = glance_table.glance([], {})[:2]  # no arms: header and separator only
    text = "\n".join(["intro", "", *header, "| old | row |", "| older | row |", "", "prose after", "| other | table |"])
    new = glance_table.replace_table(text, [*header, "| new | row |"])
    assert new == "\n".join(["intro", "", *header, "| new | row |", "", "prose after", "| other | table |"])
    with pytest.raises(ValueError, match="found 0"):
        glance_table.replace_table("no table here", header)
    with pytest.raises(ValueError, match="found 2"):
        glance_table.replace_table("\n".join([*header, "", *header]), header)
