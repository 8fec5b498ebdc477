"""How much can deconfounding gain on ``retail-sim``? Oracle scorers that know the simulator's truth.

``retail-sim`` plants its confounding (``causalrec.data.sources.retail_sim``): a purchase picks category ``c``
with probability proportional to ``taste_u[c] W_c(r, m)`` and then item ``i`` of ``c`` proportional to its
exposure ``w_i(r, m)`` (popularity, season, stock in the region, fashion), or re-buys an earlier item. So the
exact probability of every item at every test case is known, for any exposure model we plug in:

    p(i | u, history) = (1 - rho) taste_u[c_i] w_i / sum_c taste_u[c] W_c  +  rho * share of i in the history

Each *oracle* below knows every user's true taste and differs only in the exposure it assumes. Ranking the
test cases with them bounds what a model that learned taste perfectly could reach:

* ``erm``: exposure averaged over the training data's months (and, for ``regional``, over the training
  regions: a model cannot tell an unseen region's stock) — the best a model fit to the training distribution
  can do;
* ``deconfounded``: exposure with the shifting factor removed (season and fashion for a time split; regional
  stock for ``regional``) — what a perfect causal method would learn;
* ``test_oracle``: the exposure of the test case's own month and region — unreachable, an upper bound.

``deconfounded / erm - 1`` is the headroom a causal method has on the split. The ranking uses the same cases as
RecBole's evaluation of the split (first target per user in the test part, full catalog, repeats allowed).

Run: ``causalrec headroom --split seasonal [--param data_seed=2021] [--out headroom.json]``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd

from causalrec.data.frame import months_of
from causalrec.data.shifts import Split, split_frame
from causalrec.data.sources import load_frame, retail_sim
from causalrec.data.spec import DataSpec
from causalrec.errors import ConfigError

_log = logging.getLogger(__name__)

ORACLES = ("erm", "deconfounded", "test_oracle")
FACTORS = ("season", "stock", "fashion")


@dataclass(frozen=True)
class Exposure:
    """``log w_i(r, m) = pop_i + c (2 season + 2 stock + fashion)`` of the simulator, factor by factor."""

    pop: np.ndarray  # [I]
    season: np.ndarray  # [I, 12]  SEASON_STRENGTH * (+-1 or 0)
    stock: np.ndarray  # [I, R]   STOCK_STRENGTH * (+-1)
    fashion: np.ndarray  # [I, 12]  FASHION_STRENGTH * cos(...)
    confounding: float
    on_sale: np.ndarray  # [I, 12]  0 where sim_season_exclusive takes the item off sale (part of the season factor)

    @classmethod
    def of(cls, sim: retail_sim.SimResult, confounding: float) -> "Exposure":
        months = np.arange(1, 13)
        cat_index = {name: k for k, name in enumerate(sim.categories)}
        cats = np.array([cat_index[c] for c in sim.item_category])
        season = np.zeros((len(sim.categories), 12))
        for k, name in enumerate(sim.categories):
            if sim.category_months[name]:
                season[k] = np.where(np.isin(months, sim.category_months[name]), 1.0, -1.0)
        peak = sim.item_fashion_peak.to_numpy()
        fashion = np.where(peak[:, None] > 0, np.cos(2 * np.pi * (months[None, :] - peak[:, None]) / 12), 0.0)
        return cls(
            sim.item_popularity.to_numpy(),
            retail_sim.SEASON_STRENGTH * season[cats],
            retail_sim.STOCK_STRENGTH * np.where(sim.item_stock.to_numpy(), 1.0, -1.0),
            retail_sim.FASHION_STRENGTH * fashion,
            confounding,
            sim.item_on_sale.to_numpy().astype(float),
        )

    def weights(self, regions: np.ndarray, months: np.ndarray, keep: tuple[str, ...] = FACTORS) -> np.ndarray:
        """``E[w_i]`` over a distribution of (region, month): ``regions [R]`` and ``months [12]`` weights
        (each summing to one); factors not in ``keep`` are left out (exposure as if they did not exist)."""
        log_w = self.pop[:, None, None] + np.zeros((len(self.pop), len(regions), 12))
        c = self.confounding
        if "season" in keep:
            log_w = log_w + c * self.season[:, None, :]
        if "stock" in keep:
            log_w = log_w + c * self.stock[:, :, None]
        if "fashion" in keep:
            log_w = log_w + c * self.fashion[:, None, :]
        w = np.exp(log_w) * (self.on_sale[:, None, :] if "season" in keep else 1.0)
        return np.einsum("irm,r,m->i", w, regions, months)


def _share(values: np.ndarray, n: int) -> np.ndarray:
    counts = np.bincount(values, minlength=n).astype(float)
    return counts / counts.sum()


def _test_cases(split: Split, item_index: dict[str, int]) -> list[tuple[str, int, int, np.ndarray]]:
    """(user, month, target item, history items) per test row; history = the user's rows before it."""
    frame = split.frame
    items = frame["item_id"].map(item_index).to_numpy()
    months = months_of(frame["timestamp"])
    starts = dict(zip(*np.unique(frame["user_id"].to_numpy(), return_index=True)))  # frame is ordered by user
    out = []
    for row in np.flatnonzero(frame["part"].to_numpy() == "test"):
        user = frame["user_id"].iat[row]
        out.append((user, int(months[row]), int(items[row]), items[starts[user] : row]))
    return out


def oracle_metrics(spec: DataSpec, k: int = 10) -> pd.DataFrame:
    """NDCG@k and HR@k of the three oracles on ``spec``'s test cases (``spec.dataset`` must be ``retail-sim``)."""
    if spec.dataset != "retail-sim":
        raise ConfigError(
            f"oracle headroom needs the simulator's truth: dataset must be 'retail-sim', got {spec.dataset!r}"
        )
    if spec.sim_promotion > 0:
        raise ConfigError(
            "oracle headroom models season, stock and fashion exposure, not sim_promotion: set sim_promotion to 0"
        )
    sim = retail_sim.simulate(spec)
    split = split_frame(load_frame(spec), spec)  # cleaned and k-core filtered: the cases RecBole evaluates
    exposure = Exposure.of(sim, float(spec.sim_confounding))
    item_ids = list(sim.item_title.index)
    item_index = {item: i for i, item in enumerate(item_ids)}
    cat_index = {name: j for j, name in enumerate(sim.categories)}
    cats = np.array([cat_index[c] for c in sim.item_category])
    regions = list(sim.regions)
    taste = sim.user_taste
    n_items, n_regions = len(item_ids), len(regions)
    outside = ~np.isin(item_ids, split.frame["item_id"].unique())  # dropped by k-core: not in the catalog

    train_months = _share(months_of(split.train["timestamp"]) - 1, 12)
    train_regions = _share(split.train["region"].map(regions.index).to_numpy(), n_regions)
    own = np.eye(n_regions)
    if spec.split == "regional":
        # a model fit to the training regions cannot know an unseen region's stock; deconfounding drops stock
        shifting, erm = ("stock",), lambda r, m: exposure.weights(train_regions, train_months)
    else:
        shifting, erm = ("season", "fashion"), lambda r, m: exposure.weights(own[r], train_months)
    kept = tuple(f for f in FACTORS if f not in shifting)
    uniform_months = np.full(12, 1 / 12)
    scorers: dict[str, Callable[[int, int], np.ndarray]] = {
        "erm": erm,
        "deconfounded": lambda r, m: exposure.weights(own[r], uniform_months, keep=kept),
        "test_oracle": lambda r, m: exposure.weights(own[r], np.eye(12)[m - 1]),
    }
    rho = float(spec.sim_repeat)
    cache: dict[tuple[str, int, int], np.ndarray] = {}
    rows = []
    for user, month, target, history in _test_cases(split, item_index):
        r = regions.index(sim.user_region[user])
        t = taste.loc[user].to_numpy()
        for name, scorer in scorers.items():
            w = cache.get((name, r, month))
            if w is None:
                w = cache[(name, r, month)] = scorer(r, month)
            p = t[cats] * w / (t @ np.bincount(cats, weights=w, minlength=len(t)))
            if len(history):
                p = (1 - rho) * p + rho * np.bincount(history, minlength=n_items) / len(history)
            p[outside] = -1.0
            rank = int((p > p[target]).sum())  # ties resolved in the target's favour: an upper bound
            rows.append({"oracle": name, "hit": float(rank < k), "ndcg": 1 / np.log2(rank + 2) if rank < k else 0.0})
    table = (
        pd.DataFrame(rows)
        .groupby("oracle", sort=False)
        .agg(**{f"ndcg@{k}": ("ndcg", "mean"), f"hit@{k}": ("hit", "mean"), "cases": ("ndcg", "size")})
    )
    table["vs_erm"] = table[f"ndcg@{k}"] / table.loc["erm", f"ndcg@{k}"] - 1
    return table.reindex(list(ORACLES))


def spec_fields(params: Mapping[str, Any]) -> dict[str, Any]:
    """The ``DataSpec`` fields of ``params`` given as ``causalrec run`` takes them: ``data_seed`` (the data's seed)
    is the spec's ``seed``. The oracle's spec is ``DataSpec(dataset="retail-sim", split=..., **spec_fields(params))``."""
    fields = dict(params)
    if "data_seed" in fields:
        fields["seed"] = fields.pop("data_seed")
    return fields
