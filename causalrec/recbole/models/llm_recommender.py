"""``LLMRecommender``: a RecBole sequential recommender whose scores are an LLM's exact item log-likelihoods.

The model reads item titles from the prepared dataset (``<prepared_dir>/<dataset>.items.tsv``), writes each item
as ``item_repr`` says (``causalrec.llm.items``: its title, one added item token, or both), turns a case's history
into a prompt (``causalrec.data.prompts``) and ranks the whole catalog exactly: one forward per prompt batch for
item tokens (``causalrec.llm.items.score_item_tokens``), the title trie walk for titles
(``causalrec.llm.ranking.score_catalog``). It is not trained by RecBole's loop: ``causalrec.recbole.trainer.LLMTrainer``
runs the TRL stages (SFT, then S-DPO or CausalDPO) on ``self.llm``.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from typing import Any

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType

from causalrec.data.prompts import DEFAULT_ENVIRONMENT_TEMPLATE, DEFAULT_TEMPLATE, ITEM_TOKEN_TEMPLATE, PromptFormat
from causalrec.errors import ConfigError, DataError, UnknownNameError
from causalrec.recbole.repeat_mix import training_weight
from causalrec.recbole.settings import ENVIRONMENT_INFERENCE, ENVIRONMENT_PRIORS, resolve_sft_positions

_log = logging.getLogger(__name__)

PAD_TITLE = "[padding item]"
DEFAULT_TITLE_HISTORY = 10  # history items shown in a prompt of titles (max_history_items: ~)
DEFAULT_SEMANTIC_HISTORY = 20  # ... of semantic ids (TIGER's history length)
SEPARATORS = {"title": "; ", "id": " ", "title+id": "; ", "semantic": "; "}  # between history items in the prompt


def read_titles(path: str) -> dict[str, str]:
    """``item_id -> item_text`` from a prepared ``<ds>.items.tsv`` (TSV with a header)."""
    if not os.path.isfile(path):
        raise DataError(f"item titles file {path!r} is missing; prepare the dataset again (causalrec data prepare)")
    with open(path, encoding="utf-8", newline="") as fh:
        # written with QUOTE_MINIMAL (data/store.py): a title holding a quote or a tab comes back quoted
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_MINIMAL)
        if not reader.fieldnames or not {"item_id", "item_text"} <= set(reader.fieldnames):
            raise DataError(f"{path!r} must have columns item_id and item_text; it has {reader.fieldnames}")
        return {row["item_id"]: row["item_text"] for row in reader}


class LLMRecommender(SequentialRecommender):
    """Base of GenRec, SDPORec and CausalDPO: prompts, backbone, title trie and exact catalog scoring.

    Subclasses only say which alignment stage follows SFT (``alignment``) and which YAML keys configure it
    (``method_keys``).

    Attributes:
        llm: the Hugging Face causal LM (a ``PeftModel`` when ``lora_r > 0``).
        tokenizer: its tokenizer.
        titles: title per RecBole internal item id (id 0 is padding and gets a placeholder).
        item_repr: ``title`` | ``id`` | ``title+id`` (``causalrec.llm.items``).
        item_texts: how each item is written in a history (its title, its token, or both).
        answers: each item's answer text (its title, or its token).
        prompt_format: how a history becomes a prompt.
        item_token_ids: token id of items ``1..n_items-1`` (item tokens; empty for titles).
        trie: the titles' token trie over items ``1..n_items-1`` (trie item j is RecBole item j + 1); None for
            item tokens.
    """

    input_type = InputType.POINTWISE
    ranks_repeats_itself = True  # repeat_mix inside full_sort_predict, over the history its prompt shows
    alignment: str | None = None  # None (SFT only) | "sdpo" | "causal_dpo"
    method_keys: tuple[str, ...] = ()  # YAML keys passed to the alignment config

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        from causalrec.data.frame import warn_if_texts_tie
        from causalrec.llm.backbone import TINY, BackboneConfig, load_backbone
        from causalrec.llm.items import (
            ITEM_REPRS,
            item_token,
            item_token_ids,
            user_token,
            user_token_ids,
            uses_item_tokens,
        )
        from causalrec.llm.trie import TitleTrie, title_token_ids

        self.titles = self._load_titles(config, dataset)
        self.item_repr = config["item_repr"] or ITEM_REPRS[0]
        if self.item_repr not in ITEM_REPRS:
            raise UnknownNameError("item_repr", self.item_repr, ITEM_REPRS)
        item_ids = range(1, len(self.titles))
        tokens = uses_item_tokens(self.item_repr)
        code_tokens: list[str] = []
        if self.item_repr == "id":
            self.item_texts = [PAD_TITLE] + [item_token(j) for j in item_ids]
        elif self.item_repr == "title+id":
            self.item_texts = [PAD_TITLE] + [f"{self.titles[j]} {item_token(j)}" for j in item_ids]
        elif self.item_repr == "semantic":
            from causalrec.llm.semantic_ids import code_texts, code_vocabulary

            self.semantic_codes = self._semantic_codes(config, dataset)
            self.item_texts = [PAD_TITLE] + code_texts(self.semantic_codes)
            code_tokens = code_vocabulary(self.semantic_codes)
            _log.info("semantic ids: %d code tokens added", len(code_tokens))
        else:
            self.item_texts = list(self.titles)
            warn_if_texts_tie(self.titles[1:], f"{config['dataset']} (item_repr: title)")
        # the answer: the item token, else the item as the history writes it (its title, its codes)
        self.answers = [PAD_TITLE] + [item_token(j) for j in item_ids] if tokens else list(self.item_texts)
        # item tokens: after the history, so the history stays a plain item sequence (docs/items.md); without an
        # environment the key means nothing and is ignored, so it does not split the SFT stage cache
        chosen = config["environment_position"] if config["prompt_environment"] else None
        position = chosen or ("last" if self.item_repr == "id" else "first")
        if position == "each" and self.item_repr != "id":
            raise ConfigError(
                f"environment_position: each writes each history item's label before its token: it needs "
                f"item_repr: id; got item_repr: {self.item_repr}"
            )
        self.prompt_format = PromptFormat(
            template=config["prompt_template"] or (ITEM_TOKEN_TEMPLATE if self.item_repr == "id" else DEFAULT_TEMPLATE),
            max_history_items=self._history_length(config),
            separator=SEPARATORS[self.item_repr],
            environment=config["prompt_environment"] or None,
            environment_template=config["environment_template"] or DEFAULT_ENVIRONMENT_TEMPLATE,
            environment_last=position == "last",
            environment_each=position == "each",
        )
        self._init_environments(config, dataset)
        self._init_history_environments(dataset)
        # user_token: each customer's own token first in every prompt (P5's user ids): a per-customer embedding, as
        # BPR and LightGCN learn; RecBole numbers users 1..n_users-1 (0 pads)
        user_ids = range(1, dataset.num(self.USER_ID)) if config["user_token"] else range(0)
        self.user_texts: list[str | None] = [None] + [user_token(u) for u in user_ids] if user_ids else []
        self.sft_positions = resolve_sft_positions(config["sft_positions"], self.item_repr)
        self.rank_batch_size = int(config["rank_batch_size"] or (64 if tokens else 8))
        self.rank_orders = int(config["rank_orders"] or 0)
        self.repeat_mix = training_weight(config["repeat_mix"])  # auto: stages train without it
        self.order_seed = int(config["seed"] or 0)
        from causalrec.llm.presets import backbone_settings

        values: dict[str, Any] = backbone_settings(dict(config.final_config_dict))  # unset keys: the preset's
        values["device"] = str(config["device"])
        self.backbone_config = BackboneConfig.from_dict(values)
        # the tiny tokenizer learns the words it will see: titles only where prompts show them
        corpus = (
            (self.titles[1:] if self.item_repr in ("title", "title+id") else [])
            + [self.prompt_format.template]
            + self._empty_prompts()
            + list(self.history_label_values.values())  # labels seen only in histories (a later season)
        )
        init_texts = self.titles[1:] if self.item_repr == "title+id" and self.backbone_config.backbone != TINY else None
        self.llm, self.tokenizer = load_backbone(
            self.backbone_config,
            corpus=corpus,
            items=list(item_ids) if tokens else (),
            item_init_texts=init_texts,
            users=list(user_ids),
            extra_tokens=code_tokens,
        )
        self._apply_chat_template(config["use_chat_template"])
        self.item_token_ids: list[int] = item_token_ids(self.tokenizer, item_ids) if tokens else []
        # the tokens that write items in a sequence SFT row, and how many write one item
        self.sequence_token_ids = self.tokenizer.convert_tokens_to_ids(code_tokens) or self.item_token_ids
        self.tokens_per_item = self.semantic_codes.shape[1] if code_tokens else 1
        self.user_token_ids: list[int] = user_token_ids(self.tokenizer, user_ids) if user_ids else []
        self.trie = None
        if not tokens:
            self.title_tokens = title_token_ids(self.tokenizer, self.answers[1:], context=self._empty_prompts()[0])
            self.trie = TitleTrie.from_token_ids(self.title_tokens)

    # ------------------------------------------------------------------------------------ data
    @staticmethod
    def _load_titles(config, dataset) -> list[str]:
        prepared_dir = config["prepared_dir"]
        if not prepared_dir:
            raise ConfigError(
                f"{config['model']} needs item titles from a dataset prepared by causalrec (config key prepared_dir "
                f"is unset for {config['dataset']!r}); use retail-sim, online-retail, csv or ml-100k with a split"
            )
        by_token = read_titles(os.path.join(prepared_dir, f"{config['dataset']}.items.tsv"))
        tokens = dataset.field2id_token[config["ITEM_ID_FIELD"]]
        missing = [str(t) for t in tokens[1:] if str(t) not in by_token]
        if missing:
            raise DataError(
                f"{len(missing)} item(s) have no title in {prepared_dir} (e.g. {missing[:3]}); prepare the dataset again"
            )
        return [PAD_TITLE] + [by_token[str(t)] for t in tokens[1:]]

    def _apply_chat_template(self, mode) -> None:
        """Wrap every prompt in the tokenizer's chat template (``use_chat_template``, ``causalrec.llm.chat``)."""
        import dataclasses

        from causalrec.llm.chat import chat_wrapping

        prefix, suffix = chat_wrapping(self.tokenizer, mode)
        if prefix or suffix:
            self.prompt_format = dataclasses.replace(self.prompt_format, prefix=prefix, suffix=suffix)
            _log.info("prompts follow the tokenizer's chat template: %r ... %r", prefix, suffix)

    def _history_length(self, config) -> int:
        """``max_history_items``; unset: RecBole's ``MAX_ITEM_LIST_LENGTH`` for item tokens (cheap, as long as
        SASRec's), 20 items of a few codes each for semantic ids, 10 items for prompts that show titles."""
        value = config["max_history_items"]
        if value is not None:
            return int(value)
        if self.item_repr == "id":
            return int(config["MAX_ITEM_LIST_LENGTH"])
        return DEFAULT_SEMANTIC_HISTORY if self.item_repr == "semantic" else DEFAULT_TITLE_HISTORY

    def _semantic_codes(self, config, dataset):
        """``[n_items - 1, levels (+1)]`` codes of items ``1..n_items-1`` (``causalrec.llm.semantic_ids``), from their
        titles (words or a sentence encoder) or from the training interactions (``dataset`` is the training split, as
        RecBole builds models); seeded by ``seed``, so a checkpoint's model rebuilds the same codes."""
        from causalrec.llm import semantic_ids as sid

        source, seed = config["semantic_source"] or sid.SEMANTIC_SOURCES[0], int(config["seed"] or 0)
        if source not in sid.SEMANTIC_SOURCES:
            raise UnknownNameError("semantic_source", source, sid.SEMANTIC_SOURCES)
        if source == "title":
            emb = sid.title_embeddings(self.titles[1:], seed=seed)
        elif source == "sentence":
            emb = sid.sentence_embeddings(self.titles[1:], config["semantic_encoder"])
        else:  # RecBole's matrix: row 0 and column 0 pad
            emb = sid.interaction_embeddings(dataset.inter_matrix(form="csr"), seed=seed)[1:]
        levels, size = int(config["semantic_levels"] or 3), int(config["semantic_codebook"] or 16)
        codes = sid.residual_kmeans(emb, levels, size, seed=seed)
        _log.info("semantic ids from %s: %d items, %d codes each", source, len(codes), codes.shape[1])
        return codes

    def _init_environments(self, config, dataset) -> None:
        """``environments`` (the label values seen in training), ``env_log_prior`` (``log P(e)``: their shares of
        the training rows, or uniform with ``environment_prior``), ``env_index`` (RecBole token id -> index in
        ``environments``, -1 for labels never seen in training) and ``environment_inference``. ``dataset`` is the
        training split, as RecBole builds models. Without ``prompt_environment``: no environments."""
        field = self.env_field = self.prompt_format.environment
        self.environments, self.env_log_prior, self.env_train_log_prior, self.env_index = [], None, None, None
        self.environment_inference = config["environment_inference"] or ENVIRONMENT_INFERENCE[0]
        prior_kind = config["environment_prior"] or ENVIRONMENT_PRIORS[0]
        for key, value, choices in (
            ("environment_prior", prior_kind, ENVIRONMENT_PRIORS),
            ("environment_inference", self.environment_inference, ENVIRONMENT_INFERENCE),
        ):
            if value not in choices:
                raise UnknownNameError(key, value, choices)
        if field is None:
            return
        if field not in dataset.inter_feat.columns:
            raise DataError(
                f"prompt_environment={field!r} needs a {field!r} column in the interactions; "
                f"{dataset.dataset_name!r} has {sorted(dataset.inter_feat.columns)}"
            )
        vocab = dataset.field2id_token[field]
        counts = torch.bincount(torch.as_tensor(dataset.inter_feat[field]).long(), minlength=len(vocab)).double()
        seen = [i for i in range(1, len(vocab)) if counts[i] > 0]  # id 0 is RecBole's padding token
        if not seen:
            raise DataError(f"the training split has no {field!r} labels; prompt_environment needs them")
        train = counts[seen] / counts[seen].sum()
        prior = train if prior_kind == "train" else torch.full((len(seen),), 1.0 / len(seen), dtype=torch.float64)
        self.environments = [str(vocab[i]) for i in seen]
        self.env_log_prior = prior.log().float()
        self.env_train_log_prior = train.log().float()
        self.env_index = torch.full((len(vocab),), -1, dtype=torch.long)
        self.env_index[seen] = torch.arange(len(seen))
        _log.info(
            "prompt_environment=%s: ranking sums over %s with P(e) = %s (%s)",
            field,
            self.environments,
            [round(p, 3) for p in prior.tolist()],
            self.environment_inference,
        )

    def _init_history_environments(self, dataset) -> None:
        """``environment_position: each``: the sequence field holding each history item's label
        (``history_env_field``, ``season_list`` / ``region_list`` of data prepared with ``history_environments``)
        and ``history_label_values`` (its token -> the label as prompts write it). Empty otherwise."""
        self.history_env_field, self.history_label_values = None, {}
        if not self.prompt_format.environment_each:
            return
        from causalrec.data.store import history_label

        field = self.history_env_field = f"{self.env_field}_list"
        if field not in dataset.inter_feat.columns:
            raise DataError(
                f"environment_position: each needs each history item's {self.env_field} ({field!r}); the data was "
                f"prepared without it (history_environments: true prepares it; causalrec sets it for this position)"
            )
        spelled = {history_label(v): str(v) for v in dataset.field2id_token[self.env_field][1:]}
        self._history_vocab = [str(t) for t in dataset.field2id_token[field]]
        self.history_label_values = {t: spelled.get(t, t.replace("_", " ")) for t in self._history_vocab[1:]}

    def history_environment_texts(self, item_seq, item_seq_len, label_seq) -> list[list[str]]:
        """Each row's history labels as the prompt writes them, aligned with ``history_texts`` (``[B, L]`` RecBole
        ids of ``history_env_field``)."""
        vocab = self.history_label_values
        tokens = self._history_vocab
        seqs, lens, labels = (torch.as_tensor(x).tolist() for x in (item_seq, item_seq_len, label_seq))
        return [
            [vocab[tokens[e]] for i, e in zip(seq[: int(n)], row[: int(n)]) if i]
            for seq, n, row in zip(seqs, lens, labels)
        ]

    def _empty_prompts(self) -> list[str]:
        """The prompt of an empty history, once per training environment (once without environments)."""
        return [self.prompt_format.prompt([], e) for e in self.environments] or [self.prompt_format.prompt([])]

    def history_texts(self, item_seq: torch.Tensor, item_seq_len: torch.Tensor) -> list[list[str]]:
        """Each row's history as the prompt writes it (``item_texts``), oldest first (RecBole left-aligns
        sequences, padding 0 after)."""
        seqs, lens = item_seq.tolist(), item_seq_len.tolist()
        return [[self.item_texts[i] for i in seq[: int(n)] if i] for seq, n in zip(seqs, lens)]

    def user_text(self, user_id: int) -> str | None:
        """The prompt's token of RecBole user ``user_id``; None without ``user_token``."""
        return self.user_texts[int(user_id)] if self.user_texts else None

    def environment_weights(self, interaction, inference: str | None = None, log_prior=None) -> torch.Tensor:
        """``[B, K]`` ``log`` weights of the training environments in each row's ranking: ``log P(e)`` (the
        backdoor sum); with ``environment_inference: observed``, a row whose own label occurs in training puts all
        its weight on it (``p(y | x, e)`` of a known stratum) and only the others use ``P(e)``. ``inference`` and
        ``log_prior`` replace the model's own settings (``environment_inference``, ``env_log_prior``)."""
        k = len(self.environments)
        prior = self.env_log_prior if log_prior is None else log_prior
        weights = prior.expand(len(interaction), k).clone()
        if (inference or self.environment_inference) == "observed" and self.env_field in interaction.columns:
            index = self.env_index.to(interaction[self.env_field].device)[interaction[self.env_field].long()].cpu()
            known = index >= 0
            weights[known] = float("-inf")
            weights[known, index[known]] = 0.0
        return weights

    def _environment_rows(self, interaction) -> tuple[list[tuple[int, int]], torch.Tensor | None]:
        """The (row, environment) prompts a ranking needs and the ``[B, K]`` weights; ``([(r, -1)], None)``
        without environments."""
        if not self.environments:
            return [(r, -1) for r in range(len(interaction))], None
        weights = self.environment_weights(interaction)
        return [tuple(pair) for pair in torch.isfinite(weights).nonzero().tolist()], weights

    def prompts(self, interaction) -> list[str]:
        """One prompt per row; with ``prompt_environment``, one per (row, environment) the ranking sums over
        (all K training environments per row under ``environment_inference: marginal``), row-major."""
        histories = self.history_texts(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        users = interaction[self.USER_ID].tolist() if self.user_texts else [0] * len(histories)
        labels = [None] * len(histories)
        if self.history_env_field:
            labels = self.history_environment_texts(
                interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], interaction[self.history_env_field]
            )
        pairs, _ = self._environment_rows(interaction)
        return [
            self.prompt_format.prompt(
                histories[r],
                self.environments[e] if e >= 0 else None,
                user=self.user_text(users[r]),
                history_environments=labels[r],
            )
            for r, e in pairs
        ]

    def encode_prompts(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of prompts, as TRL tokenises them (special tokens included)."""
        return [list(ids) for ids in self.tokenizer(prompts)["input_ids"]]

    def prompt_ids(self, interaction) -> list[list[int]]:
        """Token ids of each row's prompt built from ``ITEM_SEQ`` / ``ITEM_SEQ_LEN`` (never the target)."""
        return self.encode_prompts(self.prompts(interaction))

    # ------------------------------------------------------------------------------ scoring
    def score_prompts(self, prompt_ids: list[list[int]], show_progress: bool = False) -> torch.Tensor:
        """``[B, n_items]`` log p(item | prompt); column 0 (padding) is ``-inf``."""
        if self.item_token_ids:
            from causalrec.llm.items import score_item_tokens

            scores = score_item_tokens(
                self.llm,
                prompt_ids,
                self.item_token_ids,
                batch_size=self.rank_batch_size,
                pad_token_id=self.tokenizer.pad_token_id,
                show_progress=show_progress,
            )
        else:
            from causalrec.llm.ranking import score_catalog

            scores = score_catalog(
                self.llm, prompt_ids, self.trie, batch_size=self.rank_batch_size, show_progress=show_progress
            )
        pad = torch.full((scores.shape[0], 1), float("-inf"), device=scores.device, dtype=scores.dtype)
        return torch.cat([pad, scores], dim=1)

    def _combine(self, scores: torch.Tensor, interaction) -> torch.Tensor:
        """Scores of ``prompts(interaction)`` (``[P, ...]``) -> one per row (``[B, ...]``): ``log sum_e w_re
        p(y | x_r, e)`` with ``environment_weights``; unchanged without environments."""
        pairs, weights = self._environment_rows(interaction)
        if weights is None:
            return scores
        from causalrec.llm.ranking import marginalize_environments

        rows, envs = torch.tensor(pairs).t()
        dense = scores.new_full((len(interaction), len(self.environments), *scores.shape[1:]), float("-inf"))
        dense[rows, envs] = scores
        return marginalize_environments(dense, weights.to(scores.device))

    def reordered(self, interaction, copy: int):
        """``interaction`` with each row's shown history (the last ``max_history_items`` of it, what its prompt
        writes) in a random order, with each item's own label under ``environment_position: each``. Copy ``copy``
        of ``rank_orders``; seeded by the run's seed, the copy, the row's user and history length, so a case gets
        the same orders whatever batch it is ranked in."""
        import numpy as np
        from recbole.data.interaction import Interaction

        fields = [self.ITEM_SEQ] + ([self.history_env_field] if self.history_env_field else [])
        columns = {f: interaction[f].clone() for f in fields}
        shown = self.prompt_format.max_history_items
        users, lengths = interaction[self.USER_ID].tolist(), interaction[self.ITEM_SEQ_LEN].tolist()
        for row, (user, n) in enumerate(zip(users, lengths)):
            start = max(0, n - shown)  # PromptFormat holds max_history_items >= 1
            order = start + np.random.default_rng([self.order_seed, copy, user, n]).permutation(n - start)
            for f in fields:
                columns[f][row, start:n] = interaction[f][row, torch.as_tensor(order)]
        return Interaction({**interaction.interaction, **columns})

    def _over_orders(self, interaction, score) -> torch.Tensor:
        """``score(interaction)``; with ``rank_orders`` K, the mixture over the time order and K random orders of
        each history, ``log (1 / (K + 1)) sum_o p(y | x_o)``: test-time order averaging, for a model that
        ``history_shuffles`` taught to read a history in any order (docs/items.md)."""
        first = score(interaction)
        if not self.rank_orders:
            return first
        scores = [first] + [score(self.reordered(interaction, c)) for c in range(self.rank_orders)]
        return torch.logsumexp(torch.stack(scores), dim=0) - math.log(len(scores))

    def _with_repeats(self, scores: torch.Tensor, interaction) -> torch.Tensor:
        """With ``repeat_mix`` w: ``log((1 - w) p(y | x) + w c_y / n)``, the model's distribution (renormalised over
        the catalog) mixed with each customer's own purchase shares in the history its prompt shows (item y
        c_y times among those n items): a copy distribution for repeat purchases, as RepeatNet's repeat mode, from
        the same information, the history. Unchanged with w = 0."""
        if not self.repeat_mix:
            return scores
        from causalrec.recbole.repeat_mix import mix, shares_from_sequences

        seq, lengths = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        positions = torch.arange(seq.shape[1], device=seq.device)
        shown = (positions < lengths[:, None]) & (positions >= lengths[:, None] - self.prompt_format.max_history_items)
        shares = shares_from_sequences(seq, shown, scores.shape[1]).to(scores.device, scores.dtype)
        return mix(scores - torch.logsumexp(scores, dim=1, keepdim=True), shares, self.repeat_mix)

    def full_sort_scores(self, interaction) -> torch.Tensor:
        """Every catalog item's score before the ``repeat_mix`` mixture (``repeat_mix: auto`` ranks them once per
        validation and mixes them at each weight)."""
        return self._over_orders(interaction, lambda x: self._combine(self.score_prompts(self.prompt_ids(x)), x))

    def full_sort_predict(self, interaction) -> torch.Tensor:
        return self._with_repeats(self.full_sort_scores(interaction), interaction)

    def predict(self, interaction) -> torch.Tensor:
        if self.repeat_mix:  # the mixture renormalises over the whole catalog
            full = self.full_sort_predict(interaction)
            return full[torch.arange(len(full)), interaction[self.ITEM_ID].to(full.device)]
        return self._over_orders(interaction, self._predict_candidates)

    def _predict_candidates(self, interaction) -> torch.Tensor:
        from causalrec.llm.ranking import score_pairs

        items = interaction[self.ITEM_ID]
        prompts = self.prompt_ids(interaction)
        pairs, _ = self._environment_rows(interaction)
        scores = torch.full((len(prompts),), float("-inf"), device=items.device)
        real = [p for p, (r, _) in enumerate(pairs) if int(items[r]) > 0]  # padding candidates stay -inf
        if real and self.item_token_ids:  # one forward gives every item: read the candidates off it
            rows = torch.tensor([int(items[pairs[p][0]]) for p in real])
            scores[real] = self.score_prompts([prompts[p] for p in real])[torch.arange(len(real)), rows].to(
                scores.device
            )
        elif real:
            found = score_pairs(
                self.llm, [prompts[p] for p in real], [int(items[pairs[p][0]]) - 1 for p in real], self.trie
            )
            scores[real] = found.to(scores.device)
        return self._combine(scores, interaction)

    def forward(self, interaction):
        return self.full_sort_predict(interaction)

    def calculate_loss(self, interaction):
        raise NotImplementedError(
            f"{type(self).__name__} is trained with TRL by causalrec.recbole.trainer.LLMTrainer (fit), not by RecBole's "
            "per-batch loss; use causalrec.run or run_recbole after `import causalrec`"
        )
