"""The oracle headroom of retail-sim (causalrec.experiments.headroom) against the simulator's definitions."""

import json

import numpy as np
import pytest

from causalrec.cli import main
from causalrec.data.sources import retail_sim
from causalrec.data.spec import DataSpec
from causalrec.errors import ConfigError
from causalrec.experiments.headroom import Exposure, oracle_metrics, spec_fields

SMALL = {"sim_users": 150, "sim_items": 60}


def test_exposure_weights_match_the_simulators_formula():
    spec = DataSpec(dataset="retail-sim", split="seasonal", seed=7, **SMALL)
    sim = retail_sim.simulate(spec)
    exposure = Exposure.of(sim, 0.8)
    items = list(sim.item_title.index)
    for i in (0, 17, 42):
        item = items[i]
        r, m = 2, 11  # region index, month
        months = sim.category_months[sim.item_category[item]]
        season = 0.0 if not months else (1.0 if m in months else -1.0)
        stock = 1.0 if sim.item_stock.loc[item].iloc[r] else -1.0
        peak = sim.item_fashion_peak[item]
        fashion = np.cos(2 * np.pi * (m - peak) / 12) if peak else 0.0
        expected = np.exp(sim.item_popularity[item] + 0.8 * (2 * season + 2 * stock + fashion))
        got = exposure.weights(np.eye(len(sim.regions))[r], np.eye(12)[m - 1])[i]
        assert got == pytest.approx(expected, rel=1e-12)
        without_season = exposure.weights(np.eye(len(sim.regions))[r], np.eye(12)[m - 1], keep=("stock", "fashion"))[i]
        assert without_season == pytest.approx(expected / np.exp(0.8 * 2 * season), rel=1e-12)


def test_off_sale_items_have_no_exposure_unless_the_season_factor_is_left_out():
    spec = DataSpec(dataset="retail-sim", split="seasonal", seed=7, sim_season_exclusive=True, **SMALL)
    sim = retail_sim.simulate(spec)
    exposure = Exposure.of(sim, 0.8)
    halloween = np.flatnonzero(sim.item_category.to_numpy() == "halloween")
    assert len(halloween) and sim.category_months["halloween"] == (10,)
    region = np.eye(len(sim.regions))[0]
    assert (exposure.weights(region, np.eye(12)[6])[halloween] == 0).all()  # July: off sale
    assert (exposure.weights(region, np.eye(12)[9])[halloween] > 0).all()  # October: its peak
    assert (exposure.weights(region, np.eye(12)[6], keep=("stock", "fashion"))[halloween] > 0).all()


@pytest.mark.parametrize("split", ["seasonal", "regional"])
def test_without_confounding_every_oracle_ranks_alike(split):
    # sim_confounding 0: exposure is exp(popularity) everywhere, so the three oracles are the same scorer
    table = oracle_metrics(DataSpec(dataset="retail-sim", split=split, seed=3, sim_confounding=0.0, **SMALL))
    assert table["ndcg@10"].nunique() == 1 and table["vs_erm"].abs().max() == 0.0
    assert (table["cases"] > 0).all()


def test_with_confounding_the_test_month_oracle_is_best_and_cases_match_the_split():
    spec = DataSpec(dataset="retail-sim", split="seasonal", seed=3, sim_confounding=1.0, **SMALL)
    table = oracle_metrics(spec)
    from causalrec.data.shifts import split_frame
    from causalrec.data.sources import load_frame

    assert int(table.loc["erm", "cases"]) == len(split_frame(load_frame(spec), spec).test)
    assert table.loc["test_oracle", "ndcg@10"] > table.loc["erm", "ndcg@10"]


def test_other_datasets_are_refused_and_the_cli_prints_a_table(capsys, tmp_path):
    with pytest.raises(ConfigError, match="retail-sim"):
        oracle_metrics(DataSpec(dataset="csv", split="seasonal", source="x.csv"))
    with pytest.raises(ConfigError, match="not sim_promotion"):  # exposure the oracles do not model
        oracle_metrics(DataSpec(dataset="retail-sim", split="seasonal", sim_promotion=0.5))
    out = tmp_path / "h.json"
    assert (
        main(
            [
                "headroom",
                "--split",
                "seasonal",
                "-p",
                "sim_users=150",
                "-p",
                "sim_items=60",
                "-p",
                "data_seed=3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "deconfounded" in capsys.readouterr().out and out.exists()
    assert json.loads(out.read_text())["spec"] == {"split": "seasonal", "sim_users": 150, "sim_items": 60, "seed": 3}
    assert spec_fields({"data_seed": 3, "sim_users": 150}) == {"sim_users": 150, "seed": 3}
