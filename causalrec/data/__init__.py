"""The data layer: sources -> canonical interaction frame -> shift split -> RecBole benchmark files.

>>> from causalrec.data import DataSpec, prepare
>>> prepared = prepare(DataSpec(dataset="retail-sim", split="seasonal"))   # doctest: +SKIP
>>> prepared.data_path, prepared.meta["shift_evidence"]["test"]            # doctest: +SKIP

Pieces, each usable alone: ``load_frame(spec)`` (canonical frame, docs/contracts.md), ``split_frame(frame,
spec)`` (a pure, seeded ``Split``), ``prepare(spec)`` (cached, atomic files), ``describe``/``format_stats``
(what ``causalrec data stats`` prints) and ``simulate(spec)`` (retail-sim with its ground truth).
"""

from causalrec.data.frame import describe, format_stats, season_of
from causalrec.data.shifts import Split, shift_evidence, split_frame
from causalrec.data.sources import load_frame
from causalrec.data.sources.retail_sim import SimResult, simulate
from causalrec.data.spec import SIMULATED_SOURCES, SOURCES, SPLITS, DataSpec
from causalrec.data.store import PreparedDataset, prepare

__all__ = [
    "SIMULATED_SOURCES",
    "SOURCES",
    "SPLITS",
    "DataSpec",
    "PreparedDataset",
    "SimResult",
    "Split",
    "describe",
    "format_stats",
    "load_frame",
    "prepare",
    "season_of",
    "shift_evidence",
    "simulate",
    "split_frame",
]
