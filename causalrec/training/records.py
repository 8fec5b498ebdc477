"""Purchase records -> the SFT and preference datasets, with the prompt format of ``causalrec.data.prompts``."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Iterable, Mapping, Sequence

from causalrec.data.prompts import PromptFormat, completion_text
from causalrec.errors import DataError
from causalrec.training.sdpo_trainer import make_preference_dataset
from causalrec.training.sft import make_sft_dataset
from datasets import Dataset


@dataclass(frozen=True)
class PreferenceRecord:
    """One training example: what was bought before, what came next, and in which environment.

    Attributes:
        history: titles bought before, oldest first.
        target: the title of the next item (the SFT completion, the DPO chosen item).
        negatives: titles of the rejected items (may be empty for SFT).
        season / region: environment labels of the row.
        user: the customer's token for prompts that show it (``user_token: true``), else None.
        history_environments: the environment label of each history item, for prompts that show them
            (``environment_position: each``), else None.
    """

    history: Sequence[str]
    target: str
    negatives: Sequence[str] = ()
    season: str = "all"
    region: str = "all"
    user: str | None = None
    history_environments: Sequence[str] | None = None

    def prompt(self, fmt: PromptFormat) -> str:
        """The record's prompt; an environment-conditioned format gets the record's own label."""
        return fmt.prompt(
            self.history,
            None if fmt.environment is None else getattr(self, fmt.environment),
            user=self.user,
            history_environments=self.history_environments,
        )


def shuffled_records(
    records: Sequence[PreferenceRecord],
    copies: int,
    seed: int,
    answer_of: Mapping[str, str],
    history_text_of: Mapping[str, str],
    keep_ordered: bool = True,
    environment: str | None = None,
) -> list[PreferenceRecord]:
    """Order augmentation: each record's items (history and target) as one basket in ``copies`` random orders, the
    last item of each order the answer; after the time-ordered records when ``keep_ordered``.

    A model trained on time order alone learns that the next purchase resembles the last ones, which carries the
    season of the last purchases into the next one; in a random order the history says only what the customer
    buys (their taste), as a bag-of-items model (BPR) sees it. The reordered copies keep the record's season and
    region. ``answer_of`` maps a history text to its answer text and ``history_text_of`` back (identical for
    ``item_repr`` title and id; ``title <item_j>`` <-> ``<item_j>`` for title+id). Seeded: the same records and
    seed give the same copies. Records with ``history_environments`` shuffle each item with its own label, and the
    answer's label becomes the record's ``environment`` (``season`` or ``region``).
    """
    if copies < 0:
        raise DataError(f"history_shuffles must be >= 0; got {copies}")
    rng = random.Random(seed)
    out = list(records) if keep_ordered or not copies else []
    for r in records:
        for _ in range(copies):
            if r.history_environments is not None:
                if environment is None:
                    raise DataError("records with history_environments need the environment their labels are of")
                pairs = list(zip(r.history_environments, r.history)) + [
                    (getattr(r, environment), history_text_of[r.target])
                ]
                rng.shuffle(pairs)
                labels, items = zip(*pairs)
                out.append(
                    replace(
                        r,
                        history=tuple(items[:-1]),
                        history_environments=tuple(labels[:-1]),
                        target=answer_of[items[-1]],
                        **{environment: labels[-1]},
                    )
                )
                continue
            basket = list(r.history) + [history_text_of[r.target]]
            rng.shuffle(basket)
            out.append(replace(r, history=tuple(basket[:-1]), target=answer_of[basket[-1]]))
    return out


def sft_dataset(records: Iterable[PreferenceRecord], fmt: PromptFormat | None = None) -> Dataset:
    """``prompt``/``completion`` (+ ``season``/``region``) rows for the SFT stage."""
    fmt = fmt or PromptFormat()
    records = list(records)
    return make_sft_dataset(
        [r.prompt(fmt) for r in records],
        [completion_text(r.target) for r in records],
        season=[r.season for r in records],
        region=[r.region for r in records],
    )


def sft_sequence_dataset(
    records: Iterable[PreferenceRecord],
    fmt: PromptFormat,
    tokenizer,
    item_token_ids: Sequence[int],
    tokens_per_item: int = 1,
) -> Dataset:
    """Tokenised SFT rows whose loss covers every item token of the sequence, not only the answer: each history
    item is a target given the items before it (SASRec's next-item objective) and the answer (+ EOS) given all
    of them. ``input_ids`` / ``completion_mask`` in TRL's pre-tokenised format; the prompt's template words and
    its first item are never targets (nothing of the customer precedes the first item). An item is
    ``tokens_per_item`` of ``item_token_ids`` in a row (semantic ids: its codes)."""
    from causalrec.training.trl_compat import tokenize_text

    items, eos = set(int(t) for t in item_token_ids), tokenizer.eos_token
    rows: dict[str, list] = {"input_ids": [], "completion_mask": []}
    for r in records:
        ids = tokenize_text(tokenizer, r.prompt(fmt) + completion_text(r.target) + eos)
        positions = [k for k, t in enumerate(ids) if t in items]
        if (
            not positions
            or positions[-1] != len(ids) - 2
            or ids[-1] != tokenizer.eos_token_id
            or len(positions) % tokens_per_item
        ):
            raise DataError(
                f"a sequence SFT row is not items of {tokens_per_item} token(s) ending with EOS: "
                f"{r.prompt(fmt)!r} + {r.target!r}"
            )
        mask = [0] * len(ids)
        for k in positions[tokens_per_item:]:
            mask[k] = 1
        mask[-1] = 1
        rows["input_ids"].append(ids)
        rows["completion_mask"].append(mask)
    if not rows["input_ids"]:
        raise DataError("the SFT dataset is empty; the training split has no rows with a history")
    return Dataset.from_dict(rows)


def preference_dataset(records: Iterable[PreferenceRecord], fmt: PromptFormat | None = None) -> Dataset:
    """``prompt``/``chosen``/``rejected`` (+ ``season``/``region``) rows for S-DPO and CausalDPO."""
    fmt = fmt or PromptFormat()
    records = list(records)
    # no negatives on any row: num_negatives="all", the trainer takes the whole catalog
    rejected = (
        [[completion_text(t) for t in r.negatives] for r in records] if any(r.negatives for r in records) else None
    )
    return make_preference_dataset(
        [r.prompt(fmt) for r in records],
        [completion_text(r.target) for r in records],
        rejected,
        season=[r.season for r in records],
        region=[r.region for r in records],
    )
