"""Item titles survive the prepared items.tsv: written by data/store.py, read by the LLM models."""

import pandas as pd

from causalrec.data.store import _write_tsv
from causalrec.recbole.models.llm_recommender import read_titles

TITLES = ['RETRO "TEA FOR ONE"', "PLAIN MUG", 'SET OF 3 "HEART" COOKIE CUTTERS', "TAB\tINSIDE", "'SINGLE' QUOTES"]


def test_titles_with_quotes_and_tabs_round_trip(tmp_path):
    import csv

    items = pd.DataFrame({"item_id": [f"i{k}" for k in range(len(TITLES))], "item_text": TITLES, "category": ""})
    path = tmp_path / "x.items.tsv"
    _write_tsv(items, ("item_id", "item_text", "category"), path, csv.QUOTE_MINIMAL)  # as write_split does
    assert '""' in path.read_text()  # the writer did quote: the test exercises the quoting path
    assert read_titles(str(path)) == {f"i{k}": t for k, t in enumerate(TITLES)}
