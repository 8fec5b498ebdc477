"""Repeat purchases: rank by the model's distribution mixed with the customer's own purchase shares (``repeat_mix``).

``repeat_mix: w`` ranks every full-catalog evaluation (validation and test) by

    log((1 - w) p(i | case) + w c_i / n)

where ``p`` is the model's score turned into a distribution over the catalog (a softmax; for Pop, whose score is
a count, the count's share) and ``c_i`` counts item ``i`` among the ``n`` purchases of the customer's history: a
copy distribution for repeat purchases, RepeatNet's "repeat mode" as a fixed mixture. Every model gets it from the
same information, its history: the LLM models from the items their prompt shows
(``LLMRecommender._with_repeats``), RecBole's sequential models from ``ITEM_SEQ`` (the purchases before the case
they read), its general models (BPR, LightGCN, Pop, ...) from the customer's training rows, plus the validation
rows when the test is ranked (the history a sequential model reads there too).

``repeat_mix: auto`` chooses the weight on validation, per model, data set, split and seed: every validation ranks
the split at each weight of ``AUTO_WEIGHTS`` and counts the best (the smallest weight of a tie). A RecBole model's
epoch loop thus early-stops on each epoch's best weight (epoch and weight chosen together: the best epoch moves
with the weight, LightGCN's by hundreds); the LLM models' training stages early-stop without the mixture (a few SFT
epochs; their stages are the cached ones of a run without it), and their best model is then validated at every
weight. The test is ranked once, at the weight the best model validated best with.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from causalrec.errors import ConfigError

_log = logging.getLogger(__name__)

COUNT_SCORED = ("Pop",)  # a count, not a logit: its share is its distribution
AUTO = "auto"
AUTO_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SWEEP_CACHE_BYTES = 2 * 1024**3  # the most raw scores a sweep keeps in memory; batches past it are ranked again


def training_weight(value) -> float:
    """The weight a run starts with: ``auto`` starts without the mixture (and its validations choose one)."""
    return 0.0 if value == AUTO else float(value or 0.0)


def mix(log_p: torch.Tensor, shares: torch.Tensor, weight: float) -> torch.Tensor:
    """``log((1 - w) p + w shares)`` from ``log_p`` (``[B, n_items]``, a log distribution over the catalog) and
    ``shares`` (``[B, n_items]``, each row summing to 1, or 0 for a customer without history)."""
    if not 0 < weight < 1:
        raise ConfigError(f"repeat_mix must be >= 0 and < 1; got {weight}")
    return torch.logaddexp(log_p + math.log1p(-weight), shares.log() + math.log(weight))


def shares_from_sequences(seq: torch.Tensor, mask: torch.Tensor, n_items: int) -> torch.Tensor:
    """``[B, n_items]`` purchase shares of the items ``seq[b, j]`` where ``mask[b, j]`` (item 0, padding, never
    counts)."""
    counts = torch.zeros((seq.shape[0], n_items), dtype=torch.float32, device=seq.device)
    counts.scatter_add_(1, torch.where(mask, seq, 0), mask.to(torch.float32))
    counts[:, 0] = 0
    return counts / counts.sum(dim=1, keepdim=True).clamp_min(1)


def _share_matrix(datasets, n_users: int, n_items: int):
    """Users x items purchase shares of ``datasets``' rows, sparse (a catalog-sized dense table per user would not
    fit a large data set)."""
    from scipy.sparse import coo_matrix

    users = np.concatenate([d.inter_feat[d.uid_field].numpy() for d in datasets])
    items = np.concatenate([d.inter_feat[d.iid_field].numpy() for d in datasets])
    keep = items > 0  # padding is no item
    counts = coo_matrix(
        (np.ones(int(keep.sum()), dtype=np.float32), (users[keep], items[keep])), shape=(n_users, n_items)
    ).tocsr()  # duplicates are summed: a repeat purchase counts twice
    totals = np.maximum(np.asarray(counts.sum(axis=1), dtype=np.float32).ravel(), np.float32(1))
    counts.data /= np.repeat(totals, np.diff(counts.indptr))  # float32 division, as shares_from_sequences
    return counts


def dense_rows(table, users: np.ndarray) -> np.ndarray:
    """``table[users].toarray()`` for a CSR ``table`` with sorted, unique columns per row, read straight off its
    arrays: scipy's fancy row indexing costs ~150 us a call, paid once per evaluation batch and weight (a third
    of a BPR auto validation on Online Retail when its batches held one customer each)."""
    starts, ends = table.indptr[users], table.indptr[users + 1]
    lengths = ends - starts
    out = np.zeros((len(users), table.shape[1]), dtype=table.dtype)
    total = int(lengths.sum())
    if total:
        stored = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(total)
        out[np.repeat(np.arange(len(users)), lengths), table.indices[stored]] = table.data[stored]
    return out


class RepeatMix:
    """The mixture of one classical run: ``adjust(scores, interaction, testing)`` for one evaluation batch."""

    def __init__(self, model, weight: float, train_dataset, valid_dataset, in_log: bool = False):
        self.model, self.weight, self.in_log = model, weight, in_log
        self.sequential = hasattr(model, "ITEM_SEQ")
        if not self.sequential:  # a customer's rows before the validation case, and before the test case
            n_users, n_items = train_dataset.user_num, train_dataset.item_num
            self.valid_shares = _share_matrix([train_dataset], n_users, n_items)
            self.test_shares = _share_matrix([train_dataset, valid_dataset], n_users, n_items)

    def adjust(self, scores: torch.Tensor, interaction, testing: bool) -> torch.Tensor:
        if not self.weight:  # repeat_mix: auto, at its first candidate (and while it trains)
            return scores
        if self.sequential:
            seq, lengths = interaction[self.model.ITEM_SEQ], interaction[self.model.ITEM_SEQ_LEN]
            mask = torch.arange(seq.shape[1], device=seq.device) < lengths[:, None]
            shares = shares_from_sequences(seq, mask, scores.shape[1]).to(scores.device)
        else:
            table = self.test_shares if testing else self.valid_shares
            rows = dense_rows(table, interaction[self.model.USER_ID].cpu().numpy())
            shares = torch.from_numpy(rows).to(scores.device)
        scores = scores.float().clone()
        if self.in_log:  # a count: its share of the catalog's counts
            scores = torch.where(torch.isneginf(scores), scores, scores.clamp_min(torch.finfo(scores.dtype).tiny).log())
        scores[:, 0] = float("-inf")  # padding is no item
        return mix(torch.log_softmax(scores, dim=1), shares, self.weight)


def install(trainer, train_dataset, valid_dataset, test_data, weight: float) -> RepeatMix:
    """Rank every full-catalog evaluation of ``trainer`` (a RecBole model's; validation and the test, which is
    ``test_data``) by the mixture; also ``trainer.repeat_mix``."""
    from causalrec.recbole.evaluation import rerank_full_sort

    repeats = RepeatMix(
        trainer.model, weight, train_dataset, valid_dataset, in_log=type(trainer.model).__name__ in COUNT_SCORED
    )
    rerank_full_sort(trainer, lambda scores, data, interaction: repeats.adjust(scores, interaction, data is test_data))
    trainer.repeat_mix = repeats
    _log.info("repeat_mix=%s: log((1 - w) p(i) + w (the item's share of the customer's history))", weight)
    return repeats


def _set_weight(trainer, weight: float) -> None:
    if getattr(trainer.model, "ranks_repeats_itself", False):  # the LLM models mix inside full_sort_predict
        trainer.model.repeat_mix = weight
    else:
        trainer.repeat_mix.weight = weight


class _RawScores:
    """While a sweep validates at each weight, the model's full-catalog scores before the mixture are computed
    once: at the first weight each batch's scores are kept (in batch order, up to ``SWEEP_CACHE_BYTES``), and
    the other weights read them back instead of running the model again; only the mixture depends on the
    weight. Installed on ``model`` (its ``full_sort_scores`` where it mixes itself, else ``full_sort_predict``)
    while active."""

    def __init__(self, model):
        self.model = model
        self.name = "full_sort_scores" if getattr(model, "ranks_repeats_itself", False) else "full_sort_predict"
        self.compute = getattr(model, self.name)
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # (the batch's users, its scores) in batch order
        self.position, self.bytes, self.keeping = 0, 0, True

    def __enter__(self):
        setattr(self.model, self.name, self)
        return self

    def __exit__(self, *exc):
        delattr(self.model, self.name)  # back to the class's method
        self.kept.clear()

    def next_weight(self) -> None:
        """The next evaluation goes through the same batches again: read them back, keep no more."""
        self.position, self.keeping = 0, False

    def __call__(self, interaction) -> torch.Tensor:
        position, self.position = self.position, self.position + 1
        users = interaction[self.model.USER_ID].detach().cpu()
        if position < len(self.kept) and torch.equal(self.kept[position][0], users):
            scores = self.kept[position][1]
            return scores.to(interaction[self.model.USER_ID].device).clone()  # RecBole masks in place
        scores = self.compute(interaction)
        size = scores.numel() * scores.element_size()
        if self.keeping and position == len(self.kept) and self.bytes + size <= SWEEP_CACHE_BYTES:
            self.kept.append((users, scores.detach().cpu().clone()))
            self.bytes += size
        return scores


def choose_weight_per_validation(trainer, test_data) -> None:
    """``repeat_mix: auto``: from now on every evaluation of ``trainer`` other than the test (``test_data``) ranks
    the data at each weight of ``AUTO_WEIGHTS`` and returns the result of the weight that ranks it best (the
    smallest of a tie), leaving ``trainer`` at that weight and ``trainer.repeat_mix_sweep`` at ``(weight, {weight:
    score})``. Installed before training, RecBole's epoch loop then early-stops on the best weight of each epoch
    (epoch and weight chosen together); the test is ranked at the weight of the last validation."""
    from recbole.utils import calculate_valid_score

    evaluate = trainer.evaluate

    def evaluate_at_best_weight(eval_data, load_best_model=True, model_file=None, show_progress=False):
        if eval_data is test_data:
            return evaluate(eval_data, load_best_model, model_file, show_progress)
        scores, results, best = {}, {}, None
        with _RawScores(trainer.model) as raw:
            for index, weight in enumerate(AUTO_WEIGHTS):
                _set_weight(trainer, weight)
                first = index == 0  # a checkpoint is loaded once, before the first weight's forward
                result = evaluate(eval_data, load_best_model and first, model_file if first else None, show_progress)
                raw.next_weight()
                scores[weight], results[weight] = float(calculate_valid_score(result, trainer.valid_metric)), result
                if best is None or (
                    scores[weight] > scores[best] if trainer.valid_metric_bigger else scores[weight] < scores[best]
                ):
                    best = weight
        _set_weight(trainer, best)
        trainer.repeat_mix_sweep = (best, scores)
        _log.debug("repeat_mix=auto: %s by weight %s; chosen %s", trainer.valid_metric, scores, best)
        return results[best]

    trainer.evaluate = evaluate_at_best_weight
