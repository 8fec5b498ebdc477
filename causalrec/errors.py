"""Every user-facing failure of causalrec, each with what was wrong and what to do.

The CLI prints a ``CausalRecError`` as one line and exits with its ``exit_code``; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

from difflib import get_close_matches
from typing import Iterable


class CausalRecError(Exception):
    """Base class: a problem the user can fix. ``str(err)`` is the whole message."""

    exit_code = 1


class ConfigError(CausalRecError, ValueError):
    """A config key, value, file or command-line option is wrong."""

    exit_code = 2


class UnknownNameError(ConfigError):
    """A name (model, dataset, split, config key, ...) that is not one of the valid choices."""

    def __init__(self, kind: str, name: str, choices: Iterable[str], *, more: str = ""):
        choices = sorted(set(map(str, choices)))
        close = get_close_matches(str(name), choices, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        if len(choices) > 120:  # e.g. config keys: name the closest ones, say where the rest are
            near = get_close_matches(str(name), choices, n=8, cutoff=0.4)
            listed = f"Closest valid choices: {', '.join(near) or '-'} ({len(choices)} in all{more})"
        else:
            listed = f"Valid choices: {', '.join(choices)}"
        super().__init__(f"unknown {kind} {name!r}.{hint} {listed}")
        self.kind, self.name, self.choices = kind, name, choices


class DataError(CausalRecError):
    """Input data is missing, malformed, or a split leaves a required part empty."""

    exit_code = 3


class BackboneError(CausalRecError):
    """A language-model backbone or tokenizer cannot be loaded or used."""

    exit_code = 4


class CheckpointError(CausalRecError):
    """A checkpoint is missing, truncated, or belongs to another model."""

    exit_code = 5


class TrainingError(CausalRecError):
    """Training diverged (NaN/inf loss) or cannot proceed."""

    exit_code = 6


class PreflightError(CausalRecError):
    """Several problems found before any work started, each a ``CausalRecError``; all are reported at once.

    The message is one line per problem; the exit code is that of the first problem in the order config (2),
    data (3), backbone (4), checkpoint (5), so a script can tell which kind of input to fix first."""

    def __init__(self, problems: Iterable[CausalRecError]):
        self.problems = sorted(problems, key=lambda p: p.exit_code)
        if not self.problems:
            raise ValueError("PreflightError needs at least one problem")
        self.exit_code = self.problems[0].exit_code
        lines = "\n".join(f"- {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problems found before any work started:\n{lines}")
