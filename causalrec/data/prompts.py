"""Purchase histories as prompt text, and preference examples for DPO-style training.

A prompt lists the titles a customer bought, oldest first; the completion is the next
item's title after one space. The same ``completion_text`` is used for SFT targets,
DPO chosen/rejected texts and full-catalog ranking, so a title is tokenised the same way
everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from causalrec.errors import ConfigError

DEFAULT_TEMPLATE = "A customer bought, in order: {history}. Next the customer buys:"
NEGATIVE_STRATEGIES = ("uniform", "popularity", "hard")


@dataclass(frozen=True)
class PromptFormat:
    """How a history becomes a prompt.

    Attributes:
        template: text with one ``{history}`` field.
        max_history_items: only the last this-many history titles are shown.
        separator: between titles in the history.
    """

    template: str = DEFAULT_TEMPLATE
    max_history_items: int = 10
    separator: str = "; "

    def __post_init__(self):
        if "{history}" not in self.template:
            raise ConfigError(f"prompt_template must contain '{{history}}'; got {self.template!r}")
        if self.max_history_items < 1:
            raise ConfigError(f"max_history_items must be >= 1; got {self.max_history_items}")

    def prompt(self, history_titles: Sequence[str]) -> str:
        shown = list(history_titles)[-self.max_history_items :]
        return self.template.format(history=self.separator.join(shown))


def completion_text(title: str) -> str:
    """The completion for an item: its title after one space (the EOS token is added by the tokenizer side)."""
    return " " + title


def sample_negatives(
    targets: np.ndarray,
    n_items: int,
    num_negatives: int,
    strategy: str = "uniform",
    rng: np.random.Generator | None = None,
    popularity: np.ndarray | None = None,
    scorer: Callable[[np.ndarray], np.ndarray] | None = None,
    first_item: int = 1,
) -> np.ndarray:
    """Draw ``num_negatives`` distinct items per row, never the row's target.

    Items are integer ids in ``[first_item, n_items)`` (RecBole reserves id 0 for padding).

    Args:
        targets: ``[N]`` positive item id per row.
        strategy: ``uniform``; ``popularity`` (proportional to ``popularity[item]``); ``hard``
            (the highest-scoring non-target items under ``scorer(rows) -> [len(rows), n_items]``).
    Returns:
        ``[N, num_negatives]`` int64 array.
    """
    if strategy not in NEGATIVE_STRATEGIES:
        raise ConfigError(f"unknown negative_strategy {strategy!r}; valid: {', '.join(NEGATIVE_STRATEGIES)}")
    n_candidates = n_items - first_item
    if num_negatives < 1 or num_negatives > n_candidates - 1:
        raise ConfigError(f"num_negatives must be in [1, {n_candidates - 1}] for a catalog of {n_candidates} items; got {num_negatives}")
    rng = rng if rng is not None else np.random.default_rng(0)
    targets = np.asarray(targets, dtype=np.int64)
    if strategy == "hard":
        if scorer is None:
            raise ConfigError("negative_strategy 'hard' needs a scoring model (the SFT stage)")
        scores = np.asarray(scorer(np.arange(len(targets))), dtype=np.float64).copy()
        scores[:, :first_item] = -np.inf
        scores[np.arange(len(targets)), targets] = -np.inf
        return np.argsort(-scores, axis=1, kind="stable")[:, :num_negatives].astype(np.int64)
    if strategy == "popularity":
        if popularity is None:
            raise ConfigError("negative_strategy 'popularity' needs item popularity counts")
        weights = np.asarray(popularity, dtype=np.float64)[first_item:n_items] + 1.0
    else:
        weights = np.ones(n_candidates)
    out = np.empty((len(targets), num_negatives), dtype=np.int64)
    for row, target in enumerate(targets):
        w = weights.copy()
        w[target - first_item] = 0.0
        out[row] = rng.choice(n_candidates, size=num_negatives, replace=False, p=w / w.sum()) + first_item
    return out
