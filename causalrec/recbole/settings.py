"""``LLMRecommenderConfig``: the owner of the LLM models' own config keys (type, default, choices, range, help).

Keys owned elsewhere are not repeated here: the backbone's by ``causalrec.llm.backbone.BackboneConfig``, the
preference methods' (``beta``, ``num_negatives``, ``n_environments``, ...) by ``SDPOConfig`` / ``CausalDPOConfig``,
``sft_args`` / ``dpo_args`` by TRL's configs, the data's by ``DataSpec``, evaluation and ``MAX_ITEM_LIST_LENGTH`` by
RecBole. ``properties/model/LLMRecommender.yaml`` (and ``SDPORec.yaml`` for the preference-stage keys) repeat these
defaults for RecBole's ``Config``; ``tests/test_config_owners.py`` holds them equal, and the preflight takes each
key's choices and lower bound from here (``choices`` / ``minimum`` in the field metadata).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from causalrec.data.prompts import ENVIRONMENTS, NEGATIVE_STRATEGIES
from causalrec.data.spec import KEY_OMITTED_AT_DEFAULT
from causalrec.errors import ConfigError, UnknownNameError
from causalrec.llm.chat import CHAT_CHOICES
from causalrec.llm.items import ITEM_REPRS
from causalrec.llm.semantic_ids import SEMANTIC_SOURCES

SFT_POSITIONS = ("last", "all")
ENVIRONMENT_PRIORS = ("train", "uniform")
ENVIRONMENT_INFERENCE = ("marginal", "observed")
ENVIRONMENT_POSITIONS = ("first", "last", "each")
VALIDATE_STAGES = ("all", "last", "best")
SEQUENCE_PATIENCE = 5  # sft_patience's value when unset, for sequence SFT (sft_positions: all)


def resolve_sft_positions(value: str | None, item_repr: str) -> str:
    """``sft_positions``: ``all`` (every item of a sequence is a target) needs a history written as the answers are
    (``item_repr: id``, one token per item, whose prompts write the environment after the history, so it conditions
    only the answer; or ``semantic``, each item its codes); unset: ``all`` where it applies, else ``last``."""
    applies = item_repr in ("id", "semantic")
    if value is None:
        return "all" if applies else "last"
    if value not in SFT_POSITIONS:
        raise UnknownNameError("sft_positions", value, SFT_POSITIONS)
    if value == "all" and not applies:
        raise ConfigError(
            f"sft_positions: all needs item_repr: id or semantic (each history item is a target given the "
            f"items before it); got item_repr: {item_repr}"
        )
    return value


def _key(default: Any, help: str, **rules: Any) -> Any:
    return field(default=default, metadata={"help": help, **rules})


# Keys added after published cells were cached: a cell's identity (``compare``) counts them only away from these
# defaults, so the cells computed before them stay valid.
OMITTED_AT_DEFAULT: dict[str, Any] = {
    "history_shuffles": 0,
    "environment_position": None,
    "user_token": False,
    "sft_vrex": 0.0,
    "sft_env_source": "region",
    "rank_orders": 0,
    "repeat_mix": 0.0,
}


def validate_stages_problem(validate_stages: Any, stage_cache: Any) -> ConfigError | None:
    """``validate_stages: best`` reloads the chosen stage from the stage cache: without one it cannot run."""
    if validate_stages == "best" and not stage_cache:
        return ConfigError("validate_stages: best reloads the chosen stage from the stage cache; set stage_cache: true")
    return None


def without_late_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` less the keys added after results were keyed (run settings and data fields) that sit at their
    default: a cell's identity and a classical run's last-epoch key both use it, so adding a key with a default
    that reproduces the old behaviour orphans neither cached cells nor resumable checkpoints."""
    omitted = {**KEY_OMITTED_AT_DEFAULT, **OMITTED_AT_DEFAULT}
    return {k: v for k, v in values.items() if not (k in omitted and _at_default(v, omitted[k]))}


def _at_default(value: Any, default: Any) -> bool:
    return value == default or (isinstance(default, tuple) and list(value or []) == list(default))


@dataclass(frozen=True)
class LLMRecommenderConfig:
    """The config keys of GenRec, SDPORec and CausalDPO that no other config class owns."""

    item_repr: str = _key(
        "id", "How an item is written: title | id (one added token) | title+id | semantic (codes).", choices=ITEM_REPRS
    )
    semantic_source: str = _key(
        "interactions",
        "semantic ids: cluster items by interactions, title (TF-IDF) or sentence (a sentence encoder of the titles).",
        choices=SEMANTIC_SOURCES,
    )
    semantic_encoder: str | None = _key(
        None, "semantic_source sentence: a local encoder directory; None: the embeddings extra's all-MiniLM-L6-v2."
    )
    semantic_levels: int = _key(3, "semantic ids: code levels (before the collision level).", minimum=1)
    semantic_codebook: int = _key(16, "semantic ids: codes per level (k-means clusters).", minimum=2)
    prompt_template: str | None = _key(None, "Prompt text with one {history} field; None: the item_repr's own.")
    max_history_items: int | None = _key(
        None, "Last this-many history items in the prompt; None: MAX_ITEM_LIST_LENGTH for id, 10 otherwise.", minimum=1
    )
    prompt_environment: str | None = _key(
        None, "Write the row's season or region into prompts and rank by the backdoor sum.", choices=ENVIRONMENTS
    )
    environment_prior: str = _key("train", "P(e) of the backdoor ranking.", choices=ENVIRONMENT_PRIORS)
    environment_inference: str = _key(
        "marginal",
        "marginal: the backdoor sum for every case; observed: p(y|x,e) of a seen e.",
        choices=ENVIRONMENT_INFERENCE,
    )
    use_chat_template: str = _key(
        "auto", f"Wrap prompts in the tokenizer's chat template: {' | '.join(CHAT_CHOICES)} (a YAML bool works too)."
    )
    environment_template: str = _key("{name} {value}. ", "Text of the environment in a prompt.")
    environment_position: str | None = _key(
        None,
        "first: before the history; last: after it; each: every history item's own before it (id); None: last for id.",
        choices=ENVIRONMENT_POSITIONS,
    )
    sft_patience: int | None = _key(
        None,
        f"SFT epochs without a better valid_metric before stopping; None: {SEQUENCE_PATIENCE} for sequence SFT.",
        minimum=1,
    )
    sequence_sft_epochs: int = _key(50, "SFT epochs (at most) for sft_positions all.", minimum=1)
    sft_positions: str | None = _key(
        None, "last: one target per row; all: every item (id, semantic); None: all for those.", choices=SFT_POSITIONS
    )
    sft_max_samples: int | None = _key(None, "At most this many training rows for SFT (seeded); None: all.", minimum=1)
    history_shuffles: int = _key(
        0, "SFT also on this many random orders of each row's items (order augmentation); 0: time order.", minimum=0
    )
    user_token: bool = _key(False, "Each customer's own added token first in every prompt (a per-user embedding).")
    sft_vrex: float = _key(
        0.0, "Weight of a V-REx penalty in SFT (variance of the per-environment SFT risks); 0: none.", minimum=0.0
    )
    sft_env_source: str = _key(
        "region", "The row label sft_vrex groups rows by (a sequence window: its answer's).", choices=ENVIRONMENTS
    )
    negative_strategy: str = _key("popularity", "How rejected items are drawn.", choices=NEGATIVE_STRATEGIES)
    dpo_max_samples: int | None = _key(4096, "At most this many rows for the preference stage; None: all.", minimum=1)
    rank_batch_size: int | None = _key(
        None, "Prompts scored together when ranking; None: 8 per title-trie walk, 64 per item-token forward.", minimum=1
    )
    rank_orders: int = _key(
        0,
        "Rank by the mixture over the time order and this many random orders of each history; 0: time order.",
        minimum=0,
    )
    stage_cache: bool = _key(True, "Reuse a finished training stage whose inputs hash the same.")
    stage_cache_dir: str | None = _key(None, "Finished stages and TRL checkpoints; None: <checkpoint_dir>/stages.")
    resume: bool = _key(False, "TRL stages write step checkpoints; an interrupted stage continues from its last one.")
    resume_save_steps: int = _key(100, "With resume, a step checkpoint every this many optimizer steps.", minimum=1)
    validate_stages: str = _key(
        "all",
        "all: validate after every stage; last: after the final stage only; best: after every stage, and keep the "
        "stage that validates best (needs stage_cache).",
        choices=VALIDATE_STAGES,
    )

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in fields(cls)}

    @classmethod
    def rules(cls) -> tuple[dict[str, tuple[str, ...]], dict[str, int]]:
        """``({key: choices}, {key: minimum})`` from the field metadata."""
        choices = {f.name: tuple(f.metadata["choices"]) for f in fields(cls) if "choices" in f.metadata}
        minimum = {f.name: f.metadata["minimum"] for f in fields(cls) if "minimum" in f.metadata}
        return choices, minimum
