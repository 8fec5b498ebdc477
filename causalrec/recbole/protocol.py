"""One evaluation protocol for every model, and RecBole settings for causalrec's prepared data.

RecBole masks a user's already-bought items at full-ranking time for *general* models and
not for *sequential* ones. In retail, repeat purchases are legitimate targets, so causalrec
sets the rule explicitly and identically for all models (``mask_history``, default False).

Prepared datasets (``causalrec.data.prepare``) come as two families of benchmark files
(docs/contracts.md): per-interaction files for general models and history->target rows for
sequential and LLM models, with the same evaluation cases (one target per user per split).
"""

from __future__ import annotations

import logging
import os
from typing import Any, MutableMapping

import torch

_log = logging.getLogger(__name__)

# Datasets causalrec builds itself; ml-100k is built by causalrec only when a split is asked for.
PREPARED_DATASETS = ("retail-sim", "online-retail", "csv")


def needs_preparation(config: MutableMapping[str, Any]) -> bool:
    dataset = config.get("dataset")
    return dataset in PREPARED_DATASETS or (dataset == "ml-100k" and config.get("split") is not None)


def benchmark_config(model_type, max_history: int, history_environments: bool = False) -> dict[str, Any]:
    """RecBole keys that load a prepared dataset for a model of ``model_type`` (with ``history_environments``, the
    sequence files' ``season_list`` / ``region_list`` too)."""
    from recbole.utils import ModelType

    if model_type == ModelType.SEQUENTIAL:
        lists = ["season_list", "region_list"] if history_environments else []
        return {
            "benchmark_filename": ["seq_train", "seq_valid", "seq_test"],
            "load_col": {
                "inter": ["user_id", "item_id_list", "item_id", "timestamp", "season", "region", *lists],
                "item": ["item_id"],
            },
            "alias_of_item_id": ["item_id_list"],
            "MAX_ITEM_LIST_LENGTH": max_history,
        }
    return {
        "benchmark_filename": ["train", "valid", "test"],
        "load_col": {"inter": ["user_id", "item_id", "timestamp", "season", "region"], "item": ["item_id"]},
    }


def configure_dataset(config: MutableMapping[str, Any]) -> None:
    """Prepare a causalrec dataset (cached) and point the RecBole config at its files.

    Called on RecBole's merged config dict, after its own defaults were set.
    """
    if not needs_preparation(config):
        return
    from causalrec.data import DataSpec, prepare

    if config.get("environment_position") == "each" and config.get("prompt_environment"):
        config["history_environments"] = True  # every history item's own label goes into the prompt
    spec = DataSpec.from_mapping(config, strict=False)
    prepared = prepare(spec, show_progress=bool(config.get("show_progress", True)))
    config["data_path"] = os.path.join(prepared.data_path, prepared.dataset)
    config.update(benchmark_config(config["MODEL_TYPE"], spec.max_history, spec.history_environments))
    config["prepared_dir"] = str(prepared.directory)
    _log.info("dataset %s (split %s) prepared at %s", prepared.dataset, spec.split, prepared.directory)


def apply_history_protocol(loader, config) -> None:
    """Make full-ranking evaluation mask (or not) each case's history items, for any model type.

    General models: RecBole masks every item the user interacted with in earlier splits;
    with ``mask_history: False`` that mask is emptied. Sequential models: RecBole masks
    nothing; with ``mask_history: True`` the items of the input sequence are masked (except
    the target itself, as RecBole does for general models).
    """
    from recbole.data.dataloader import FullSortEvalDataLoader

    if not isinstance(loader, FullSortEvalDataLoader) or getattr(loader, "_causalrec_protocol", False):
        return
    mask = bool(config["mask_history"])
    if not loader.is_sequential:
        if not mask:
            empty = torch.zeros(0, dtype=torch.int64)
            loader.uid2history_item[:] = [empty] * len(loader.uid2history_item)
    elif mask:
        seq_field = config["ITEM_ID_FIELD"] + config["LIST_SUFFIX"]
        item_field = config["ITEM_ID_FIELD"]
        collate = loader.collate_fn

        def collate_with_history(index):
            interaction, _, positive_u, positive_i = collate(index)
            seq = interaction[seq_field]
            keep = (seq != 0) & (seq != interaction[item_field].unsqueeze(1))
            rows, cols = keep.nonzero(as_tuple=True)
            return interaction, (rows, seq[rows, cols]), positive_u, positive_i

        loader.collate_fn = collate_with_history
    loader._causalrec_protocol = True


def describe_protocol(config) -> str:
    """One line stating the protocol, printed with every result."""
    masked = "masked" if config["mask_history"] else "not masked (repeat purchases count)"
    return f"full ranking over all {config['dataset']} items; history items {masked}; metrics {', '.join(config['metrics'])} @ {config['topk']}"
