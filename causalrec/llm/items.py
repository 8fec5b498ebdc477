"""How an item is written for the LLM (``item_repr``), and exact full-catalog scores for item tokens.

* ``title``: the item's title; ranked exactly by the title trie walk (``causalrec.llm.ranking``).
* ``id``: one added token per item (``<item_j>``, j the RecBole internal item id). The history in the prompt is
  item tokens and the answer is one token, so ONE forward of a prompt gives the log-probability of every item:
  full-catalog ranking costs what SASRec's does, and S-DPO can take the whole catalog as negatives.
* ``title+id``: the history shows each item as its title followed by its token; the answer is the token.
* ``semantic``: each item is a few shared code tokens (``causalrec.llm.semantic_ids``), ranked by the trie walk.

The score of an item token is ``log p(<item_j> | prompt)`` under the model's softmax over its whole vocabulary,
the same distribution SFT trains (TRL's cross-entropy over the vocabulary) and DPO reads. TRL appends EOS to
every completion; the EOS after an item token is the same prediction for every item, so it is trained but not
part of the ranking score.

Item tokens are ``AddedToken(lstrip=True, normalized=False)``: matched before the tokenizer's normaliser (the
tiny tokenizer lower-cases) and absorbing the space before them, so ``prompt + " <item_j>"`` tokenises as the
prompt's tokens followed by exactly one token, with word-level and BPE tokenizers alike.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from tqdm.auto import tqdm

from causalrec.errors import BackboneError

_log = logging.getLogger(__name__)

ITEM_REPRS = ("title", "id", "title+id", "semantic")
# Logit of an excluded item (the chosen one among "all" negatives): exp of it underflows to exactly 0 next to any
# real logit in float32 and float64, and 0 * it stays 0 (IRM's closed form), where -inf would give NaN.
MASKED_LOGIT = -1e4


def uses_item_tokens(item_repr: str) -> bool:
    """Whether the answer is one item token (ranked by one forward); else a text ranked by the trie walk."""
    return item_repr in ("id", "title+id")


def item_token(item_id: int) -> str:
    """The added token of RecBole internal item ``item_id``."""
    return f"<item_{int(item_id)}>"


def user_token(user_id: int) -> str:
    """The added token of RecBole internal user ``user_id`` (``user_token: true``: P5's user ids)."""
    return f"<user_{int(user_id)}>"


def add_item_tokens(tokenizer, item_ids: Sequence[int]) -> list[int]:
    """Add one token per item to ``tokenizer`` (in place); returns their ids in the order of ``item_ids``."""
    return _add_tokens(tokenizer, [item_token(j) for j in item_ids], "item")


def add_user_tokens(tokenizer, user_ids: Sequence[int]) -> list[int]:
    """Add one token per user to ``tokenizer`` (in place); returns their ids in the order of ``user_ids``."""
    return _add_tokens(tokenizer, [user_token(u) for u in user_ids], "user")


def add_code_tokens(tokenizer, names: Sequence[str]) -> list[int]:
    """Add the semantic-id code tokens ``names`` (``causalrec.llm.semantic_ids``) to ``tokenizer`` (in place)."""
    return _add_tokens(tokenizer, list(names), "code")


def _add_tokens(tokenizer, names: list[str], kind: str) -> list[int]:
    from tokenizers import AddedToken

    clash = [n for n in names if n in tokenizer.get_vocab()]
    if clash:
        raise BackboneError(f"the tokenizer already has {kind} token(s) {clash[:3]}; pass a tokenizer without them")
    tokenizer.add_tokens([AddedToken(n, lstrip=True, rstrip=False, normalized=False, single_word=False) for n in names])
    ids = tokenizer.convert_tokens_to_ids(names)
    if len(set(ids)) != len(ids) or any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise BackboneError(f"adding {kind} tokens to the tokenizer failed: some did not get their own id")
    return list(ids)


def item_token_ids(tokenizer, item_ids: Sequence[int]) -> list[int]:
    """Ids of the item tokens of ``item_ids`` in ``tokenizer`` (a BackboneError if one is missing)."""
    return _token_ids(tokenizer, [item_token(j) for j in item_ids], "item", "catalog")


def user_token_ids(tokenizer, user_ids: Sequence[int]) -> list[int]:
    """Ids of the user tokens of ``user_ids`` in ``tokenizer`` (a BackboneError if one is missing)."""
    return _token_ids(tokenizer, [user_token(u) for u in user_ids], "user", "data set's customers")


def named_token_ids(tokenizer, names: Sequence[str], kind: str) -> list[int]:
    """Ids of the added tokens ``names`` (e.g. semantic-id codes) in ``tokenizer`` (a BackboneError if one is missing)."""
    return _token_ids(tokenizer, list(names), kind, "model's items")


def _token_ids(tokenizer, names: list[str], kind: str, owner: str) -> list[int]:
    ids = tokenizer.convert_tokens_to_ids(names)
    missing = [n for n, i in zip(names, ids) if i is None or i == tokenizer.unk_token_id]
    if missing:
        raise BackboneError(f"the tokenizer lacks {kind} token(s) {missing[:3]}: it was not built for this {owner}")
    return list(ids)


def resize_for_items(
    model, tokenizer, token_ids: Sequence[int], init_texts: Sequence[str | None] | None = None
) -> None:
    """Give every item token its own embedding rows and initialise them (input and, if untied, output embedding).

    The embeddings grow to ``len(tokenizer)`` when the item tokens need more rows. A checkpoint's embedding may
    already have more rows than its tokenizer has tokens (Qwen2.5: 151,936 rows for 151,665 tokens, padded for
    speed); item tokens then land in those spare rows, which no token ever used and training never shaped. So
    every item row is set here, wherever it is: to the mean of the rows of the tokenizer's own tokens (what
    transformers' ``mean_resizing`` gives added rows, without its small noise), or, with ``init_texts``, to the
    mean of the rows of its text's tokens as a prompt shows the text (after a space: ``title_token_ids`` without
    its EOS, e.g. ``ĠWHITE`` rather than the bare ``WHITE`` of a byte-level BPE tokenizer); a None text (a user
    token) keeps the mean.
    """
    token_ids = [int(t) for t in token_ids]
    if init_texts is not None and len(init_texts) != len(token_ids):
        raise ValueError(f"{len(init_texts)} texts for {len(token_ids)} item tokens")
    n_old = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > n_old:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the new rows are all set below
    tables = [model.get_input_embeddings().weight]
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != tables[0].data_ptr():
        tables.append(out.weight)
    n_new = tables[0].shape[0]
    items = set(token_ids)
    real = torch.zeros(n_new, dtype=torch.bool)  # rows of the tokenizer's own tokens
    own = [i for i in set(tokenizer.get_vocab().values()) if i not in items and 0 <= i < n_old]
    if not own:
        raise BackboneError("the tokenizer has no token of its own with an embedding row besides the item tokens")
    real[own] = True
    targets = torch.tensor(sorted(items | set(range(n_old, n_new))))  # item rows, and any other row the resize added
    pieces: list[list[int]] = [[] for _ in token_ids]
    if init_texts is not None:
        from causalrec.llm.trie import title_token_ids

        texts = [t for t in init_texts if t is not None]
        found = iter(title_token_ids(tokenizer, texts) if texts else [])
        pieces = [[] if t is None else [i for i in next(found)[:-1] if i < n_new and real[i]] for t in init_texts]
    with torch.no_grad():
        for table in tables:
            table[targets.to(table.device)] = _mean_rows(table, real).to(table.dtype)
            for token, ids in zip(token_ids, pieces):
                if ids:  # the text's own pieces, never other item tokens
                    table[token] = table[ids].float().mean(0).to(table.dtype)


def _mean_rows(table: torch.Tensor, rows: torch.Tensor, block: int = 8192) -> torch.Tensor:
    """float32 mean of the rows of ``table`` where ``rows`` (bool) is set, a block at a time (a 150k-row bf16
    embedding is never copied whole in float32)."""
    total = torch.zeros(table.shape[1], dtype=torch.float32, device=table.device)
    for r0 in range(0, table.shape[0], block):
        keep = rows[r0 : r0 + block].to(table.device)
        total += table[r0 : r0 + block][keep].float().sum(0)
    return total / int(rows.sum())


def score_item_tokens(
    model,
    prompt_ids: Sequence[Sequence[int]],
    item_token_ids: Sequence[int],
    *,
    batch_size: int = 64,
    pad_token_id: int = 0,
    show_progress: bool = False,
) -> torch.Tensor:
    """``[len(prompt_ids), len(item_token_ids)]`` float32 ``log p(<item> | prompt)`` for every prompt and item.

    One forward per batch of prompts (left-padded, positions restarting per row), the output layer applied at the
    last position only (``logits_to_keep=1``), log-softmax over the whole vocabulary.
    """
    from causalrec.llm.kv_cache import eval_mode, pad_left  # scoring's eval mode / no-grad, and left padding

    if any(len(p) == 0 for p in prompt_ids):
        raise BackboneError("cannot score an empty prompt: it has no position to predict the item from")
    device = next(model.parameters()).device
    columns = torch.as_tensor(list(item_token_ids), dtype=torch.long, device=device)
    out = []
    with eval_mode(model):
        for b0 in tqdm(
            range(0, len(prompt_ids), batch_size), desc="ranking catalog", unit="batch", disable=not show_progress
        ):
            ids, mask = pad_left(prompt_ids[b0 : b0 + batch_size], pad_token_id, device)
            positions = (mask.cumsum(1) - 1).clamp(min=0)  # restart at 0 on each row's first real token
            logits = model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=1
            ).logits[:, -1]
            out.append(torch.log_softmax(logits.float(), dim=-1).index_select(1, columns))
    if not out:
        return torch.empty(0, len(columns), device=device)
    return torch.cat(out)


def item_logps_at(
    hidden: torch.Tensor, positions: torch.Tensor, output_layer, item_token_ids: torch.Tensor
) -> torch.Tensor:
    """``[B, n_items]`` log-probabilities of the item tokens predicted at ``positions [B]`` of ``hidden [B, T, H]``
    (a decoder's last hidden state) through ``output_layer``, normalised over the whole vocabulary."""
    rows = torch.arange(hidden.size(0), device=hidden.device)
    logits = output_layer(hidden[rows, positions])
    return torch.log_softmax(logits.float(), dim=-1).index_select(1, item_token_ids.to(logits.device))
