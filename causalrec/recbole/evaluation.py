"""Test metrics overall and per environment, with RecBole's own evaluator.

``evaluate_with_environments`` runs the trainer's normal ``evaluate`` (so the overall numbers
are exactly RecBole's) while recording which environment each evaluation case belongs to; the
per-environment numbers are RecBole's metric classes applied to that environment's rows of
the same ranking data, so nothing is scored twice.

For paired significance tests, ``collect_cases`` also hands out each case's own metric values (RecBole's
per-case arrays before averaging) with the case's user; ``record_environments`` adds the per-environment
numbers to every validation a trainer runs inside ``fit`` (per-epoch worst-environment values for Optuna).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Mapping, Sequence

import numpy as np
import torch

ENV_FIELDS = ("season", "region")
CUSTOMERS_PER_EVAL_BATCH = 64

# Lists that ``collect_cases`` hands out, by id (two empty lists compare equal, so not a plain list of them).
_CASE_SINKS: dict[int, list[dict[str, Any]]] = {}


def batch_customers(config, dataset) -> None:
    """A general model's full-catalog evaluation ranks ``eval_batch_size // item_num`` customers per batch
    (RecBole's ``FullSortEvalDataLoader``): at RecBole's default of 4,096 that is one customer a batch on a catalog
    of over 2,048 items (Online Retail's validation: 1,235 batches of one). Unless ``eval_batch_size`` is set, it
    becomes ``CUSTOMERS_PER_EVAL_BATCH`` customers' worth; the metrics are per customer, so only the speed
    changes (a BPR validation with ``repeat_mix: auto`` on Online Retail: 5.1 s -> 0.9 s). Sequential models
    (the LLM models included) count cases, not customers, and are left alone, as is sampled evaluation."""
    from recbole.utils import ModelType

    modes = config["eval_args"]["mode"]
    modes = modes.values() if isinstance(modes, dict) else [modes]
    if (
        config["MODEL_TYPE"] == ModelType.SEQUENTIAL
        or "eval_batch_size" in config.external_config_dict
        or any(m != "full" for m in modes)
    ):
        return
    wide = CUSTOMERS_PER_EVAL_BATCH * dataset.item_num
    if wide > config["eval_batch_size"]:
        config["eval_batch_size"] = wide


def smaller_is_better(metric: str) -> bool:
    """RecBole's rule: whether smaller values of ``metric`` (``ndcg@10``, ``mae``, ...) are better."""
    from recbole.evaluator.register import smaller_metrics

    return metric.split("@")[0].lower() in smaller_metrics


def _worst(metric: str, values: list[float]) -> float:
    return max(values) if smaller_is_better(metric) else min(values)


def worst_environment(
    per_env: Mapping[str, Any], metric: str, fields: Sequence[str], min_cases: int = 1, smaller: bool | None = None
) -> tuple[float, str] | None:
    """``(value, "<field>=<label>")`` of the worst environment of ``fields`` with at least ``min_cases`` cases
    (``per_env`` as ``evaluate_with_environments`` returns it); None when no group is that large. ``smaller``:
    whether smaller values are better (None: RecBole's rule for ``metric``)."""
    if smaller is None:
        smaller = smaller_is_better(metric)
    found = []
    for env_field in fields:
        for label, metrics in (per_env.get(env_field) or {}).items():
            if label != "<worst>" and metric in metrics and metrics.get("cases", 0) >= min_cases:
                found.append((float(metrics[metric]), f"{env_field}={label}"))
    if not found:
        return None
    return (max if smaller else min)(found, key=lambda t: t[0])


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


def _case_users(eval_data, interaction) -> np.ndarray:
    """Raw user id of each case in one evaluation batch (one target per user per split: the case's identity)."""
    dataset = eval_data._dataset
    tokens = np.asarray(dataset.field2id_token[dataset.uid_field])
    return tokens[interaction[dataset.uid_field].cpu().numpy()]


def case_metrics(evaluator, struct) -> dict[str, np.ndarray]:
    """Each top-k metric's value per evaluation case, e.g. ``{"ndcg@10": array([...]), ...}``.

    These are RecBole's own per-case matrices (what ``TopkMetric.topk_result`` averages), so the mean of an
    array is RecBole's metric up to its rounding to ``metric_decimal_place``.
    """
    from recbole.evaluator.base_metric import TopkMetric

    out: dict[str, np.ndarray] = {}
    for metric in evaluator.metric_class.values():
        if not isinstance(metric, TopkMetric):
            continue

        def keep(name, value, _topk=tuple(metric.topk)):
            for k in _topk:
                out[f"{name}@{k}"] = np.asarray(value[:, k - 1], dtype=np.float64)
            return {}

        metric.topk_result = keep  # an instance attribute shadowing the method, removed right after
        try:
            metric.calculate_metric(struct)
        finally:
            del metric.topk_result
    return out


@contextlib.contextmanager
def collect_cases():
    """While active, every ``evaluate_with_environments`` call (``causalrec.run``'s test evaluation) appends
    ``{"user": raw user ids, "metrics": {"ndcg@10": values, ...}, "environments": {"season": labels, ...}}``
    to the yielded list: arrays with one entry per case, in the same order, for paired per-user tests.

    >>> with collect_cases() as cases:            # doctest: +SKIP
    ...     result = causalrec.run("SASRec", "retail-sim")
    >>> cases[0]["metrics"]["ndcg@10"].mean()      # doctest: +SKIP
    """
    sink: list[dict[str, Any]] = []
    _CASE_SINKS[id(sink)] = sink
    try:
        yield sink
    finally:
        _CASE_SINKS.pop(id(sink), None)


@contextlib.contextmanager
def _recording(trainer, eval_data, fields: Sequence[str], users: bool = False):
    record: dict[str, Any] = {f: [] for f in fields}
    record["user"] = []
    collector, evaluator = trainer.eval_collector, trainer.evaluator
    collect, evaluate = collector.eval_batch_collect, evaluator.evaluate

    def eval_batch_collect(scores, interaction, positive_u, positive_i):
        for field in fields:
            record[field].append(_case_environments(eval_data, interaction, field))
        if users:
            record["user"].append(_case_users(eval_data, interaction))
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
    trainer,
    eval_data,
    *,
    load_best_model: bool = True,
    show_progress: bool = False,
    fields: Sequence[str] = ENV_FIELDS,
) -> tuple[dict[str, float], dict[str, dict[str, dict[str, float]]]]:
    """Returns ``(overall, per_env)`` where ``per_env[field][label]`` is a metric dict, plus
    ``per_env[field]["<worst>"]``: for each metric, the worst environment's value."""
    fields = [f for f in fields if f in eval_data._dataset.field2id_token]
    sinks = list(_CASE_SINKS.values())
    case_fields = [f for f in ENV_FIELDS if f in eval_data._dataset.field2id_token] if sinks else []
    record_fields = list(dict.fromkeys([*fields, *case_fields]))
    with _recording(trainer, eval_data, record_fields, users=bool(sinks)) as record:
        overall = trainer.evaluate(eval_data, load_best_model=load_best_model, show_progress=show_progress)
    struct = record.get("struct")
    per_env: dict[str, dict[str, dict[str, float]]] = {}
    if struct is None or "rec.topk" not in struct:
        return dict(overall), per_env
    topk = struct["rec.topk"]
    if sinks:
        users = np.concatenate(record["user"]) if record["user"] else np.array([])
        if len(users) == len(topk):  # one case per row, as for the environments below
            cases = {
                "user": users,
                "metrics": case_metrics(trainer.evaluator, struct),
                "environments": {f: np.concatenate(record[f]) for f in case_fields if record[f]},
            }
            for sink in sinks:
                sink.append(cases)
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


def rerank_full_sort(trainer, adjust) -> None:
    """Rank every full-catalog evaluation of ``trainer`` (validation inside ``fit`` and the test) by
    ``adjust(scores, eval_data, interaction)``: the batch's scores, the data being evaluated, the batch's cases."""
    evaluate, batch_eval = trainer.evaluate, trainer._full_sort_batch_eval
    current: dict[str, Any] = {}

    def evaluate_noting_data(eval_data, *args, **kwargs):
        current["data"] = eval_data
        try:
            return evaluate(eval_data, *args, **kwargs)
        finally:
            current.pop("data", None)

    def batch_eval_adjusted(batched_data):
        interaction, scores, positive_u, positive_i = batch_eval(batched_data)
        return interaction, adjust(scores, current.get("data"), interaction), positive_u, positive_i

    trainer.evaluate, trainer._full_sort_batch_eval = evaluate_noting_data, batch_eval_adjusted


@contextlib.contextmanager
def record_environments(trainer, eval_data, fields: Sequence[str] = ENV_FIELDS):
    """While active, each ``trainer.evaluate(eval_data, ...)`` (RecBole's validation inside ``fit``, once per
    epoch or per LLM training stage) goes through ``evaluate_with_environments``: the overall result ``fit``
    sees is unchanged, and the yielded list gets that evaluation's per-environment dict (same layout as
    ``evaluate_with_environments``' second value). The trainer is restored on exit.
    """
    history: list[dict[str, dict[str, dict[str, float]]]] = []
    original = trainer.evaluate
    had_own = "evaluate" in vars(trainer)

    def evaluate(data, load_best_model=True, model_file=None, show_progress=False):
        if data is not eval_data or model_file is not None:
            return original(data, load_best_model, model_file, show_progress)
        trainer.evaluate = original  # evaluate_with_environments calls trainer.evaluate itself
        try:
            overall, per_env = evaluate_with_environments(
                trainer, data, load_best_model=load_best_model, show_progress=show_progress, fields=fields
            )
        finally:
            trainer.evaluate = evaluate
        history.append(per_env)
        return overall

    trainer.evaluate = evaluate
    try:
        yield history
    finally:
        if had_own:
            trainer.evaluate = original
        else:
            del trainer.evaluate
