"""Purchase records -> the SFT and preference datasets, with the prompt format of ``causalrec.data.prompts``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from datasets import Dataset

from causalrec.data.prompts import PromptFormat, completion_text
from causalrec.training.preference import make_preference_dataset
from causalrec.training.sft import make_sft_dataset


@dataclass(frozen=True)
class PreferenceRecord:
    """One training example: what was bought before, what came next, and in which environment.

    Attributes:
        history: titles bought before, oldest first.
        target: the title of the next item (the SFT completion, the DPO chosen item).
        negatives: titles of the rejected items (may be empty for SFT).
        season / region: environment labels of the row.
    """

    history: Sequence[str]
    target: str
    negatives: Sequence[str] = ()
    season: str = "all"
    region: str = "all"

    def prompt(self, fmt: PromptFormat) -> str:
        """The record's prompt; an environment-conditioned format gets the record's own label."""
        return fmt.prompt(self.history, None if fmt.environment is None else getattr(self, fmt.environment))


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


def preference_dataset(records: Iterable[PreferenceRecord], fmt: PromptFormat | None = None) -> Dataset:
    """``prompt``/``chosen``/``rejected`` (+ ``season``/``region``) rows for S-DPO and CausalDPO."""
    fmt = fmt or PromptFormat()
    records = list(records)
    return make_preference_dataset(
        [r.prompt(fmt) for r in records],
        [completion_text(r.target) for r in records],
        [[completion_text(t) for t in r.negatives] for r in records],
        season=[r.season for r in records],
        region=[r.region for r in records],
    )
