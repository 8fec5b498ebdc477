"""Context re-ranking: give any RecBole model the case's environment at test time, as CausalDPO is given it.

``context_rerank: season`` (or ``region``) adds to every score of a full-catalog ranking

    log P(i | e) - log P(i)

where ``e`` is the evaluation case's own environment label and both popularities are counted on the TRAINING rows
only (add-``alpha`` smoothed over the catalog). For a model whose score is ``log p(i | u)`` up to a constant per
case (the LLM models, SASRec / GRU4Rec with cross-entropy, BPR / LightGCN read as logits) this is the Bayes
update ``log p(i | u, e)`` under "the context changes item frequencies, not tastes"; for Pop (a count) the count's
log is used, so Pop becomes the popularity within ``e``. A label never seen in training adds nothing (the model's
own ranking): the same rule as ``environment_inference: observed`` for CausalDPO.

Comparisons then give every model the same information at test time (DESIGN.md, "Evaluation"): a
context-aware CausalDPO against context-re-ranked baselines, or all without context.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from causalrec.errors import ConfigError, DataError

_log = logging.getLogger(__name__)

CONTEXTS = ("season", "region")
# Models whose full-ranking score is a count or a probability, not a logit: re-ranked in log space.
COUNT_SCORED = ("Pop",)


def context_log_ratio(dataset, field: str, alpha: float = 1.0) -> tuple[torch.Tensor, dict[str, int]]:
    """``[n_labels, n_items]`` ``log P(i | e) - log P(i)`` from ``dataset``'s rows (the training split), and the
    row of each label seen in training. Item 0 (RecBole's padding) and unseen labels get 0."""
    feat = dataset.inter_feat
    if field not in feat.columns:
        raise DataError(
            f"context_rerank: {field} needs a {field!r} column in the interactions; "
            f"{dataset.dataset_name!r} has {sorted(feat.columns)}"
        )
    if alpha <= 0:
        raise ConfigError(f"context_rerank_alpha must be > 0; got {alpha}")
    n_items = dataset.item_num
    vocab = dataset.field2id_token[field]
    labels = feat[field].numpy().astype(np.int64)
    items = feat[dataset.iid_field].numpy().astype(np.int64)
    counts = np.bincount(labels * n_items + items, minlength=len(vocab) * n_items).reshape(len(vocab), n_items)
    counts = counts.astype(np.float64)
    counts[:, 0] = 0.0
    real = n_items - 1
    p_item = (counts.sum(0) + alpha) / (counts.sum() + alpha * real)
    table = np.zeros_like(counts)
    rows = {}
    for e in range(1, len(vocab)):
        total = counts[e].sum()
        if total > 0:
            table[e] = np.log((counts[e] + alpha) / (total + alpha * real)) - np.log(p_item)
            rows[str(vocab[e])] = e
    table[:, 0] = 0.0
    return torch.as_tensor(table, dtype=torch.float32), rows


class ContextRerank:
    """The re-ranking of one run: ``adjust(scores, eval_data, interaction)`` adds each case's table row."""

    def __init__(self, train_dataset, field: str, alpha: float = 1.0, in_log: bool = False):
        if field not in CONTEXTS:
            from causalrec.errors import UnknownNameError

            raise UnknownNameError("context_rerank", field, CONTEXTS)
        self.field, self.in_log = field, in_log
        self.table, self.rows = context_log_ratio(train_dataset, field, alpha)

    def adjust(self, scores: torch.Tensor, eval_data, interaction) -> torch.Tensor:
        """``[B, n_items]`` scores of one evaluation batch of ``eval_data`` -> re-ranked scores."""
        from causalrec.recbole.evaluation import _case_environments

        labels = _case_environments(eval_data, interaction, self.field)
        index = torch.tensor([self.rows.get(str(v), 0) for v in labels], dtype=torch.long, device=scores.device)
        if self.in_log:  # masked items (-inf) stay masked
            scores = torch.where(torch.isneginf(scores), scores, scores.clamp_min(torch.finfo(scores.dtype).tiny).log())
        return scores + self.table.to(scores.device)[index]


def install(trainer, train_dataset, field: str, alpha: float = 1.0) -> ContextRerank:
    """Re-rank every full-catalog evaluation of ``trainer`` (validation and test) by the case's ``field``;
    the ``ContextRerank`` is also ``trainer.context_rerank``."""
    from causalrec.recbole.evaluation import rerank_full_sort

    rerank = ContextRerank(train_dataset, field, alpha, in_log=type(trainer.model).__name__ in COUNT_SCORED)
    rerank_full_sort(trainer, rerank.adjust)
    trainer.context_rerank = rerank
    _log.info(
        "context_rerank=%s: scores + log P(i | %s) - log P(i) (training rows; labels %s)",
        field,
        field,
        sorted(rerank.rows),
    )
    return rerank
