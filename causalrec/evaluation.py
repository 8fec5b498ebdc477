"""Test metrics overall and per environment, with RecBole's own evaluator.

``evaluate_with_environments`` runs the trainer's normal ``evaluate`` (so the overall numbers
are exactly RecBole's) while recording which environment each evaluation case belongs to; the
per-environment numbers are RecBole's metric classes applied to that environment's rows of
the same ranking data, so nothing is scored twice.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Sequence

import numpy as np
import torch

ENV_FIELDS = ("season", "region")


def _worst(metric: str, values: list[float]) -> float:
    from recbole.evaluator.register import smaller_metrics

    return max(values) if metric.split("@")[0].lower() in smaller_metrics else min(values)


def _case_environments(eval_data, interaction, field: str) -> np.ndarray:
    """Environment label (a string) of each case in one evaluation batch."""
    dataset = eval_data._dataset
    tokens = np.asarray(dataset.field2id_token[field])
    if field in interaction.columns:  # sequential: one case per row
        return tokens[interaction[field].cpu().numpy()]
    # general: one case per user; each user has one target per split (docs/contracts.md)
    uid_field = dataset.uid_field
    users = dataset.inter_feat[uid_field].numpy()
    labels = dataset.inter_feat[field].numpy()
    lookup = np.zeros(dataset.user_num, dtype=np.int64)
    lookup[users] = labels
    return tokens[lookup[interaction[uid_field].cpu().numpy()]]


@contextlib.contextmanager
def _recording(trainer, eval_data, fields: Sequence[str]):
    record: dict[str, Any] = {f: [] for f in fields}
    collector, evaluator = trainer.eval_collector, trainer.evaluator
    collect, evaluate = collector.eval_batch_collect, evaluator.evaluate

    def eval_batch_collect(scores, interaction, positive_u, positive_i):
        for field in fields:
            record[field].append(_case_environments(eval_data, interaction, field))
        return collect(scores, interaction, positive_u, positive_i)

    def evaluate_and_keep(struct):
        record["struct"] = struct
        return evaluate(struct)

    collector.eval_batch_collect, evaluator.evaluate = eval_batch_collect, evaluate_and_keep
    try:
        yield record
    finally:
        collector.eval_batch_collect, evaluator.evaluate = collect, evaluate


def evaluate_with_environments(
    trainer, eval_data, *, load_best_model: bool = True, show_progress: bool = False,
    fields: Sequence[str] = ENV_FIELDS,
) -> tuple[dict[str, float], dict[str, dict[str, dict[str, float]]]]:
    """Returns ``(overall, per_env)`` where ``per_env[field][label]`` is a metric dict, plus
    ``per_env[field]["<worst>"]``: for each metric, the worst environment's value."""
    fields = [f for f in fields if f in eval_data._dataset.field2id_token]
    with _recording(trainer, eval_data, fields) as record:
        overall = trainer.evaluate(eval_data, load_best_model=load_best_model, show_progress=show_progress)
    struct = record.get("struct")
    per_env: dict[str, dict[str, dict[str, float]]] = {}
    if struct is None or "rec.topk" not in struct:
        return dict(overall), per_env
    topk = struct["rec.topk"]
    for field in fields:
        labels = np.concatenate(record[field]) if record[field] else np.array([])
        if len(labels) != len(topk):
            continue  # a model whose evaluation does not go one case per row; skip rather than misattribute
        results: dict[str, dict[str, float]] = {}
        for label in sorted(set(labels.tolist())):
            part = copy.copy(struct)
            part._data_dict = dict(struct._data_dict)
            part["rec.topk"] = topk[torch.from_numpy(labels == label)]
            results[label] = {**trainer.evaluator.evaluate(part), "cases": int((labels == label).sum())}
        results["<worst>"] = {m: _worst(m, [r[m] for r in results.values()]) for m in overall}
        per_env[field] = results
    return dict(overall), per_env
