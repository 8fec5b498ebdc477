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
# Item tokens: the answer follows the last history item directly, so predicting it is the same task as predicting
# each history item from the items before it (the sequence objective of SFT, ``sft_positions: all``).
ITEM_TOKEN_TEMPLATE = "A customer bought, in order: {history}"
DEFAULT_ENVIRONMENT_TEMPLATE = "{name} {value}. "
ENVIRONMENTS = ("season", "region")
NEGATIVE_STRATEGIES = ("uniform", "popularity", "season_popularity", "region_popularity", "hard")
# strategy -> the environment label whose own popularity it draws from
ENVIRONMENT_NEGATIVES = {"season_popularity": "season", "region_popularity": "region"}


@dataclass(frozen=True)
class PromptFormat:
    """How a history becomes a prompt.

    Attributes:
        template: text with one ``{history}`` field.
        max_history_items: only the last this-many history titles are shown.
        separator: between titles in the history.
        environment: ``None``, or the environment label (``season`` | ``region``) written before the template
            with ``environment_template``, so that a model learns ``p(item | history, environment)``.
        environment_template: the environment's text, with ``{name}`` and ``{value}`` fields.
        environment_last: write the environment after the history, right before the answer, instead of before
            the template (item tokens: the history is then a plain item sequence whose every position can be a
            training target, and the environment conditions only the answer it belongs to).
        environment_each: write every history item's own label before it and the answer's label last
            (``environment_position: each``; item tokens): every item is then predicted right after its own
            environment, the position the answer is ranked from.
        prefix / suffix: text around the whole prompt; a tokenizer's chat template rendered around a user
            message (``causalrec.llm.chat``), so the answer follows the assistant's turn marker.
    """

    template: str = DEFAULT_TEMPLATE
    max_history_items: int = 10
    separator: str = "; "
    environment: str | None = None
    environment_template: str = DEFAULT_ENVIRONMENT_TEMPLATE
    environment_last: bool = False
    environment_each: bool = False
    prefix: str = ""
    suffix: str = ""

    def __post_init__(self):
        if "{history}" not in self.template:
            raise ConfigError(f"prompt_template must contain '{{history}}'; got {self.template!r}")
        if self.max_history_items < 1:
            raise ConfigError(f"max_history_items must be >= 1; got {self.max_history_items}")
        if self.environment is not None and self.environment not in ENVIRONMENTS:
            raise ConfigError(
                f"prompt_environment must be one of {', '.join(ENVIRONMENTS)} or null; got {self.environment!r}"
            )
        if self.environment is not None and "{value}" not in self.environment_template:
            raise ConfigError(f"environment_template must contain '{{value}}'; got {self.environment_template!r}")

    def prompt(
        self,
        history: Sequence[str],
        environment: str | None = None,
        user: str | None = None,
        history_environments: Sequence[str] | None = None,
    ) -> str:
        """The prompt for a history; ``environment`` is the label value, required when ``self.environment`` is set;
        ``user`` (the customer's own token, ``user_token: true``) goes first, so every position sees it;
        ``history_environments`` (``environment_each``) the label of each history item."""
        shown = list(history)[-self.max_history_items :]
        if self.environment is not None and environment is None:
            raise ConfigError(f"this prompt format writes the {self.environment} into every prompt; none was given")
        if self.environment is not None and self.environment_each:
            labels = list(history_environments if history_environments is not None else [])
            if len(labels) != len(history):
                raise ConfigError(
                    f"environment_position: each needs the {self.environment} of every history item; got "
                    f"{len(labels)} label(s) for {len(history)} item(s)"
                )
            shown = [f"{e} {h}" for e, h in zip(labels[len(labels) - len(shown) :], shown)] + [environment]
        text = self.template.format(history=self.separator.join(shown))
        if self.environment is not None and not self.environment_each:
            label = self.environment_template.format(name=self.environment, value=environment)
            text = f"{text} {label.strip()}" if self.environment_last else label + text
        if user is not None:
            text = f"{user} {text}"
        return self.prefix + text + self.suffix


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
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """Draw ``num_negatives`` distinct items per row, never the row's target.

    Items are integer ids in ``[first_item, n_items)`` (RecBole reserves id 0 for padding).

    Args:
        targets: ``[N]`` positive item id per row.
        strategy: ``uniform``; ``popularity`` (proportional to ``popularity[item] + 1``); ``season_popularity`` /
            ``region_popularity`` (proportional to ``popularity[groups[row], item] + 1``: the popularity in the
            row's own environment, so chosen and rejected items are contrasted within one environment, as
            ``p(y | x, e)`` in the backdoor adjustment asks); ``hard`` (the highest-scoring non-target items under
            ``scorer(rows) -> [len(rows), n_items]``).
        popularity: ``[n_items]`` counts, or ``[G, n_items]`` counts per environment for the environment strategies.
        groups: ``[N]`` environment index in ``[0, G)`` of each row (environment strategies only).
    Returns:
        ``[N, num_negatives]`` int64 array.
    """
    if strategy not in NEGATIVE_STRATEGIES:
        raise ConfigError(f"unknown negative_strategy {strategy!r}; valid: {', '.join(NEGATIVE_STRATEGIES)}")
    n_candidates = n_items - first_item
    if num_negatives < 1 or num_negatives > n_candidates - 1:
        raise ConfigError(
            f"num_negatives must be in [1, {n_candidates - 1}] for a catalog of {n_candidates} items; got {num_negatives}"
        )
    rng = rng if rng is not None else np.random.default_rng(0)
    targets = np.asarray(targets, dtype=np.int64)
    if strategy == "hard":
        if scorer is None:
            raise ConfigError("negative_strategy 'hard' needs a scoring model (the SFT stage)")
        scores = np.asarray(scorer(np.arange(len(targets))), dtype=np.float64).copy()
        scores[:, :first_item] = -np.inf
        scores[np.arange(len(targets)), targets] = -np.inf
        return np.argsort(-scores, axis=1, kind="stable")[:, :num_negatives].astype(np.int64)
    if strategy in ENVIRONMENT_NEGATIVES:
        table = None if popularity is None else np.asarray(popularity, dtype=np.float64)
        if table is None or table.ndim != 2 or groups is None or len(groups) != len(targets):
            raise ConfigError(
                f"negative_strategy {strategy!r} needs popularity counts per environment "
                f"([environments, items]) and one environment index per row"
            )
        weights = table[:, first_item:n_items] + 1.0
        row_weights = lambda row: weights[groups[row]]  # noqa: E731
    else:
        if strategy == "popularity":
            if popularity is None:
                raise ConfigError("negative_strategy 'popularity' needs item popularity counts")
            flat = np.asarray(popularity, dtype=np.float64)[first_item:n_items] + 1.0
        else:
            flat = np.ones(n_candidates)
        row_weights = lambda row: flat  # noqa: E731
    out = np.empty((len(targets), num_negatives), dtype=np.int64)
    for row, target in enumerate(targets):
        w = row_weights(row).copy()
        w[target - first_item] = 0.0
        out[row] = rng.choice(n_candidates, size=num_negatives, replace=False, p=w / w.sum()) + first_item
    return out
