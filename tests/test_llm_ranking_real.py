"""The real-title part of the ranking benchmark (benchmarks/ranking.py) on a small file in UCI Online Retail's
format: it reads the prepared catalog and test histories, reports the trie's shape, and its scores agree with
brute force. (The full benchmark reads the real file from ../shared/datasets.)"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout root holds benchmarks/

from benchmarks import ranking  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COLOURS = ["RED", "PINK", "BLUE", "WHITE", "IVORY"]
NOUNS = ["HEART T-LIGHT HOLDER", "METAL LANTERN", "ALARM CLOCK BAKELIKE", "RETROSPOT CAKE CASES", "TEA SET"]


def _uci_file(path: Path) -> tuple[Path, set[str]]:
    """30 customers buying 25 products (long multi-word titles) every month of 2011, written like the UCI file."""
    rows, titles = [], {}
    for c in range(30):
        for month in range(1, 13):
            for k in range(2):
                item = (c * 7 + month * 3 + k * 11) % 25
                code = f"2{item:04d}"
                titles[code] = f"{COLOURS[item % 5]} {NOUNS[item // 5]}"
                day = 1 + (c + k) % 27
                rows.append(
                    (
                        f"5{c:02d}{month:02d}{k}",
                        code,
                        titles[code],
                        1 + k,
                        f"2011-{month:02d}-{day:02d} 10:{c:02d}:00",
                        1.25,
                        f"{12000 + c}.0",
                        "United Kingdom" if c % 3 else "France",
                    )
                )
    cols = ["InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate", "UnitPrice", "CustomerID", "Country"]
    pd.DataFrame(rows, columns=cols).to_csv(path, index=False)
    return path, set(titles.values())


def test_real_titles_report_the_trie_shape_and_scores_equal_brute_force(tmp_path):
    source, titles = _uci_file(tmp_path / "online_retail.csv")
    opts = ranking.Options(
        real_source=str(source),
        real_users=3,
        real_batch_sizes=(1, 2),
        real_head_blocks=(4, 0),
        real_rounds=1,
        naive_batch=16,
    )
    real = ranking.run_real(opts)
    assert real["items"] == 25 and real["users"] == 3
    # every title is "<colour> <noun of 2-3 words>": lower-cased words and '-' split off, then EOS
    expected_lengths = [len(t.replace("-", " - ").split()) + 1 for t in titles]
    assert real["tokens_per_title_max"] == max(expected_lengths)
    assert real["tokens_per_title_mean"] == pytest.approx(sum(expected_lengths) / 25)
    assert sum(real["nodes_per_level"]) == real["trie_nodes"] and len(real["nodes_per_level"]) == real["trie_depth"]
    assert real["nodes_per_level"][0] == 5  # five colours start the titles
    assert real["evaluated_per_level"][-1] == 0 and sum(real["evaluated_per_level"]) == real["evaluated_nodes"]
    assert set(real["trie"]) == {"bs=1 head_block=4", "bs=1 head_block=0", "bs=2 head_block=4", "bs=2 head_block=0"}
    assert real["score_std"] > 0.5 and real["max_abs_diff"] < 1e-4
    assert all(v["max_abs_diff_vs_first"] < 1e-4 and v["per_user_s"] > 0 for v in real["trie"].values())
    assert set(real["output_tap_speedup"]) == {"1", "2"}
    lines = ranking.summary({"results": {"catalog": [_row()], "history": [], "real": real}})
    assert any(line.startswith("Online Retail real titles (seasonal catalog: 25 items") for line in lines)
    assert sum("| bs=" in line for line in lines) == 4


def test_real_titles_are_skipped_with_a_note_without_the_file(tmp_path):
    real = ranking.run_real(ranking.Options(real_source=str(tmp_path / "missing.csv.gz")))
    assert "not found" in real["skipped"]
    lines = ranking.summary({"results": {"catalog": [_row()], "history": [], "real": real}})
    assert lines[-1].startswith("Online Retail real titles: skipped (")
    assert ranking.run_real(ranking.Options(real_source=None))["skipped"]


def _row() -> dict:
    """A minimal synthetic-catalog row, enough for ``summary``."""
    trie = {"per_user_s": 0.1, "users_per_s": 10.0, "speedup": 20.0, "cpu_per_user_s": 0.1, "speedup_cpu": 20.0}
    return {
        "items": 10,
        "trie_nodes": 20,
        "evaluated_nodes": 10,
        "trie": {"1": trie},
        "naive": {"users_per_s": 0.5},
        "max_abs_diff": 1e-6,
    }


def test_title_tokens_of_the_real_catalog_come_from_its_file(tmp_path):
    source, titles = _uci_file(tmp_path / "online_retail.csv")
    got, histories = ranking.online_retail_catalog(str(source), "seasonal", 2)
    assert set(got) == titles and len(got) == 25
    assert len(histories) == 2 and all(h and set(h) <= titles for h in histories)
