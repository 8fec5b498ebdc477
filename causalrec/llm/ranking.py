"""Exact full-catalog ranking: log p(title + EOS | prompt) for every item, over a trie of titles.

The trie and title tokenisation are in ``causalrec.llm.trie``; the KV caches, the prompt pass, the output-layer
tap and the shared-prefix attention this walk runs on (transformers internals) in ``causalrec.llm.kv_cache``.

Why a trie walk. Scoring each of N items naively runs the prompt and the title through the
model N times. But all items share the prompt, and many titles share their first tokens
("red scarf", "red scarf wool", "red mug"). Put the tokenised titles (each ending with EOS,
exactly the tokens SFT and DPO train on) in a trie: the log-likelihood of an item is the sum,
along its path, of the log-probability of each edge's token given the prompt and the path
above it. So it is enough to

1. run the prompt once and keep its keys/values (the KV cache);
2. walk the trie level by level: at depth d, every node that has children is fed as one
   token, all of them in one batch (chunked), with the prompt's KV plus the KV of its own
   ancestors (depths 0..d-1, kept from the previous levels) as its past and position
   ``prompt_len + d``. Its output distribution gives the log-probability of each of its
   children's tokens.

Each trie node is evaluated exactly once per user (leaves — the EOS tokens — never), so the
cost is (number of internal nodes) one-token steps instead of (items x (prompt + title))
tokens. Every node attends to exactly the keys it would see in ``prompt + title``; only the
order of the work changes, so scores equal brute force up to float rounding.

Two ways to give a node its past (``method``):

* ``prefix`` (default where possible): the cache holds only the node's path; a custom
  attention function, plugged in through transformers' ``AttentionInterface`` for the walk,
  attends to the prompt KV shared by all rows of a chunk (one matrix product, no copy).
* ``rows``: the cache holds prompt + path for every row (the prompt KV copied per node);
  standard ``Cache`` + ``position_ids`` + 2-D ``attention_mask``, so any Hugging Face
  causal LM with full attention runs it. About 2x slower on the tiny CPU model, much more
  memory for long prompts.

Users can be batched (prompts left-padded and masked) and each level is cut into chunks of at
most ``node_chunk`` (user, node) rows to bound memory.

Where the time goes (tiny default Llama, Online Retail's 3,179 real titles: 13,015 trie nodes of
which 9,860 are fed per user, 2k-word vocabulary, prompts of ~50-70 tokens; CPU, one thread):
about a third is the output layer (``V x hidden`` per fed node) and its normaliser over ``V``, a
quarter the attention over the prompt, the rest the MLPs, projections and path-KV copies. Two
things took about a quarter off the CPU time per user, neither changing a score:

* the output layer runs outside the model on blocks of ``head_block`` rows that stay in the CPU
  cache, normalised by ``log_softmax`` (one fused pass) instead of ``logsumexp`` (``kv_cache.OutputTap``);
* rows are node-major, so the cache writes each chunk's ancestors + own KV straight into the
  level's store (one copy instead of three) and the next level gathers with ``index_select``;
Not done: feeding a chain of single-child nodes (9 in 10 of the fed nodes there) as one
multi-token step would save no arithmetic, since every node still needs its full next-token
distribution to normalise its child's probability; batching users (``batch_size``) barely
changes CPU time.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from tqdm.auto import tqdm

from causalrec.errors import BackboneError, DataError
from causalrec.llm.kv_cache import (
    OutputTap,
    base_model,
    cache_kwarg,
    eval_mode,
    pad_id,
    pad_left,
    prefix_attention_mode,
    prefix_state,
    run_prompt,
    supports_prefix_attention,
    walk_layer_class,
)
from causalrec.llm.trie import TitleTrie, TrieLevel

# ------------------------------------------------------------------------------------ the walk


class _NodeWalker:
    """Feeds trie nodes as one-token rows (one per node and user, node-major) and keeps each node's path KV.

    Rows are node-major (row ``n * B + b``) so that a chunk's rows are a contiguous slice of the level's KV store
    ``[M, B, h, d+1, hd]``: the cache writes ancestors + own KV there directly, and the next level gathers whole
    ``[B, h, d+1, hd]`` blocks by parent.

    ``shared_prefix``: the rows' past is only their path; the shared-prefix attention adds the
    prompt, shared by all rows. Otherwise the past is prompt + path, the prompt's KV copied
    into every row: plain ``Cache`` + 2-D mask, which any attention implementation runs.
    """

    def __init__(self, prompt_kv, mask: torch.Tensor, padded: bool, trie: TitleTrie, shared_prefix: bool):
        self.prompt_kv, self.mask, self.padded, self.shared_prefix = prompt_kv, mask, padded, shared_prefix
        self.plen = mask.sum(1)  # real prompt lengths: the position of each user's depth-0 token
        self.path = [(k[:, :, :0].unsqueeze(0), v[:, :, :0].unsqueeze(0)) for k, v in prompt_kv]  # [1, B, h, 0, hd]
        self.path_rows = torch.zeros(len(trie.levels[0].expanded), dtype=torch.long, device=mask.device)
        self.store = None
        self.layer_cls = walk_layer_class()

    def forward(
        self, model, cache_kw: str, d: int, tokens: torch.Tensor, m0: int, m1: int, M: int, tap: OutputTap
    ) -> torch.Tensor:
        """Logits ``[c, B, V]`` after the level-d expanded nodes ``m0:m1`` (their tokens), or the final hidden
        states ``[c, B, H]`` when ``tap.usable`` (the caller projects them with ``tap.head``)."""
        from transformers import DynamicCache

        (B, P), c = self.mask.shape, m1 - m0
        rows = self.path_rows[m0:m1]
        # [c, B, h, d, hd]; index_select gathers these blocks ~5x faster than ak[rows]
        path = [(ak.index_select(0, rows), av.index_select(0, rows)) for ak, av in self.path]
        if self.store is None:  # the level's KV: ancestors + own, the past of the next level
            self.store = [
                (k.new_empty(M, *k.shape[1:3], d + 1, k.shape[4]), v.new_empty(M, *v.shape[1:3], d + 1, v.shape[4]))
                for k, v in path
            ]
        prompts = [(None, None)] * len(path) if self.shared_prefix else self.prompt_kv
        cache = DynamicCache()
        cache.layers = [
            self.layer_cls(k, v, sk[m0:m1], sv[m0:m1], pk, pv)
            for (k, v), (sk, sv), (pk, pv) in zip(path, self.store, prompts)
        ]
        inputs = dict(
            input_ids=tokens[m0:m1].repeat_interleave(B).unsqueeze(1),
            position_ids=(self.plen + d).repeat(c).unsqueeze(1),
            use_cache=True,
            **{cache_kw: cache},
        )
        if self.shared_prefix:
            with prefix_state(self.prompt_kv, self.mask.bool() if self.padded else None, B, c):
                out = self._call(model, tap, **inputs)
        else:
            att = None
            if self.padded:
                att = torch.cat([self.mask.unsqueeze(0).expand(c, B, P), self.mask.new_ones(c, B, d + 1)], dim=2)
                att = att.reshape(c * B, P + d + 1)
            out = self._call(model, tap, **inputs, attention_mask=att)
        return out.view(c, B, -1)

    @staticmethod
    def _call(model, tap: OutputTap, **inputs) -> torch.Tensor:
        if tap.usable:
            tap.call(model, "cut", **inputs)
            return tap.hidden[:, -1]
        return model(**inputs).logits[:, -1]

    def next_level(self, level: TrieLevel) -> None:
        """Move to ``level``: its expanded nodes take their parent's path."""
        self.path, self.store = self.store, None
        self.path_rows = level.parent_row.to(self.mask.device)[level.expanded.to(self.mask.device)]


METHODS = ("auto", "prefix", "rows")


def _walk(
    model,
    prompts: Sequence[Sequence[int]],
    trie: TitleTrie,
    node_chunk: int,
    pad: int,
    cache_kw: str,
    method: str = "auto",
    head_block: int = 256,
) -> torch.Tensor:
    """Cumulative log-probability of every trie node for a batch of prompts: ``[B, n_nodes]``."""
    if method not in METHODS:
        raise ValueError(f"unknown ranking method {method!r}; valid: {', '.join(METHODS)}")
    if method == "auto":
        method = "prefix" if supports_prefix_attention(model) else "rows"
    if method == "prefix" and not supports_prefix_attention(model):
        name = type(base_model(model)).__name__
        raise BackboneError(f"{name} cannot switch its attention implementation; use method='rows'")
    if any(len(p) == 0 for p in prompts):
        raise DataError("a prompt has no tokens; the model needs at least one token (e.g. BOS) to condition on")
    device = next(model.parameters()).device
    ids, mask = pad_left(prompts, pad, device)
    padded = bool((mask == 0).any())
    B = len(prompts)
    cum = torch.empty(B, trie.n_nodes, device=device)
    with contextlib.ExitStack() as stack:
        tap = stack.enter_context(OutputTap(model, enabled=head_block > 0))
        root_lp, prompt_kv = run_prompt(model, ids, mask if padded else None, cache_kw, tap)
        walker = _NodeWalker(prompt_kv, mask, padded, trie, shared_prefix=method == "prefix")
        if method == "prefix":
            stack.enter_context(prefix_attention_mode(model))
        cum_d = root_lp[:, trie.levels[0].token.to(device)]  # depth 0: the parent is the prompt
        for d, level in enumerate(trie.levels):
            cum[:, trie.level_offset[d] : trie.level_offset[d] + len(level.token)] = cum_d
            if d + 1 == trie.depth or len(level.expanded) == 0:
                break
            nxt = trie.levels[d + 1]
            exp = level.expanded.to(device)
            tokens = level.token.to(device)[exp]
            edge = torch.empty(B, len(nxt.token), device=device)  # log p(child token | prompt, path to parent)
            step = max(1, node_chunk // B)
            for m0 in range(0, len(exp), step):
                m1 = min(len(exp), m0 + step)
                out = walker.forward(model, cache_kw, d, tokens, m0, m1, len(exp), tap)
                head = tap.head if tap.usable else None
                _edges(out, head, level.child_ptr, nxt, m0, m1, edge, head_block or out.shape[0] * out.shape[1])
                del out
            walker.next_level(nxt)
            cum_d = cum_d[:, exp][:, nxt.parent_row.to(device)] + edge
    return cum


def _edges(out, head, child_ptr, nxt: TrieLevel, m0: int, m1: int, edge: torch.Tensor, head_block: int) -> None:
    """``edge[:, children] = log p(child token | parent)`` for the parents ``m0:m1`` of a chunk.

    ``out`` is ``[c, B, V]`` logits, or ``[c, B, H]`` hidden states that ``head`` projects. Either way rows are
    normalised ``head_block`` (node, user) rows at a time, so each block's ``[rows, V]`` stays in cache between
    the projection, the normaliser and the gather (``log_softmax`` is also one fused pass, unlike ``logsumexp``).
    """
    c, B = out.shape[:2]
    step = max(1, head_block // B)
    for n0 in range(0, c, step):
        n1 = min(c, n0 + step)
        block = out[n0:n1]
        logits = head(block) if head is not None else block
        lp = torch.log_softmax(logits.float(), dim=-1)  # [n, B, V]
        c0, c1 = int(child_ptr[m0 + n0]), int(child_ptr[m0 + n1])
        local = nxt.parent_row[c0:c1].to(out.device) - (m0 + n0)
        edge[:, c0:c1] = lp[local, :, nxt.token[c0:c1].to(out.device)].t()  # [children, B] -> [B, children]


def score_catalog(
    model,
    prompt_ids: Sequence[Sequence[int]],
    trie: TitleTrie,
    *,
    batch_size: int = 1,
    node_chunk: int = 2048,
    head_block: int = 256,
    pad_token_id: int | None = None,
    show_progress: bool = False,
    method: str = "auto",
) -> torch.Tensor:
    """Exact ``log p(item tokens | prompt)`` of every catalog item for every prompt.

    Args:
        model: a Hugging Face causal LM (or a peft model around one).
        prompt_ids: one token-id list per user (with BOS if the tokenizer adds one).
        trie: the catalog's titles, ``TitleTrie.from_token_ids(title_token_ids(tok, titles))``.
        batch_size: users per walk (prompts left-padded together).
        node_chunk: at most this many (user, node) rows per forward pass (bounds memory).
        head_block: (user, node) rows projected onto the vocabulary and normalised at a time, outside the
            model (see ``causalrec.llm.kv_cache.OutputTap``); 0 lets the model project whole chunks itself (the
            slower way, for comparison; models whose logits are not their output layer's plain output always do).
        pad_token_id: id for padding (masked, so any id works; default from the model config).
        show_progress: a tqdm bar over users.
        method: ``prefix`` (shared-prompt attention, fast; models using transformers'
            AttentionInterface), ``rows`` (prompt KV copied per row; any attention), or
            ``auto`` (``prefix`` where possible).
    Returns:
        ``[len(prompt_ids), len(trie)]`` float32 tensor on the model's device.
    """
    cache_kw, pad = cache_kwarg(model), pad_id(model, pad_token_id)
    results = []
    bar = tqdm(total=len(prompt_ids), desc="ranking catalog", unit="user", disable=not show_progress)
    with eval_mode(model), bar:
        for b0 in range(0, len(prompt_ids), batch_size):
            batch = prompt_ids[b0 : b0 + batch_size]
            cum = _walk(model, batch, trie, node_chunk, pad, cache_kw, method, head_block)
            results.append(cum[:, trie.item_node.to(cum.device)])
            bar.update(len(batch))
    if not results:
        return torch.empty(0, len(trie))
    return torch.cat(results)


def marginalize_environments(scores: torch.Tensor, log_prior: torch.Tensor) -> torch.Tensor:
    """The backdoor adjustment over environments: ``log Σ_e P(e) p(item | prompt, e)``.

    Args:
        scores: ``[B, K, ...]`` log-likelihoods of the same items under the K environment-conditioned prompts
            of each of B cases (``-inf`` where a prompt was not scored because its weight is 0).
        log_prior: ``[K]`` ``log P(e)``, the environments' training-set frequencies, or ``[B, K]`` weights per
            case (``-inf`` for a weight of 0).
    Returns:
        ``[B, ...]`` log-likelihoods under ``p(item | do(history))``.
    """
    k = log_prior.size(-1)
    if scores.dim() < 2 or scores.size(1) != k or (log_prior.dim() == 2 and log_prior.size(0) != scores.size(0)):
        raise ValueError(
            f"scores must be [B, K, ...] with K = {k} environments matching weights "
            f"{tuple(log_prior.shape)}; got {tuple(scores.shape)}"
        )
    weights = log_prior.to(scores).expand(scores.size(0), k)
    weighted = scores + weights.reshape(scores.size(0), k, *(1,) * (scores.dim() - 2))
    return torch.logsumexp(weighted, dim=1)


def score_pairs(
    model,
    prompt_ids: Sequence[Sequence[int]],
    items: Sequence[int],
    trie: TitleTrie,
    *,
    node_chunk: int = 2048,
    head_block: int = 256,
    pad_token_id: int | None = None,
    show_progress: bool = False,
    method: str = "auto",
) -> torch.Tensor:
    """``log p(item_r | prompt_r)`` for rows r of (prompt, item) pairs (RecBole's ``predict``).

    Rows with the same prompt share one walk over the trie of just their items, so a user's
    100 sampled candidates cost one prompt pass and the candidates' trie nodes.
    """
    if len(prompt_ids) != len(items):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(items)} items")
    groups: dict[tuple[int, ...], list[int]] = {}
    for r, p in enumerate(prompt_ids):
        groups.setdefault(tuple(int(t) for t in p), []).append(r)
    cache_kw, pad = cache_kwarg(model), pad_id(model, pad_token_id)
    device = next(model.parameters()).device
    out = torch.empty(len(items), device=device)
    with eval_mode(model):
        for prompt, rows in tqdm(groups.items(), desc="scoring candidates", unit="prompt", disable=not show_progress):
            wanted = sorted({int(items[r]) for r in rows})
            sub = trie.subtrie(wanted)
            cum = _walk(model, [list(prompt)], sub, node_chunk, pad, cache_kw, method, head_block)[0]
            score = dict(zip(wanted, cum[sub.item_node.to(device)].tolist()))
            out[rows] = torch.tensor([score[int(items[r])] for r in rows], device=device)
    return out


def score_candidates(model, prompt_ids: Sequence[Sequence[int]], trie: TitleTrie, candidates, **kwargs) -> torch.Tensor:
    """Scores of given candidate items per prompt: ``candidates`` is ``[B, K]`` item ids -> ``[B, K]``.

    The numbers are those of ``score_catalog`` restricted to the candidates.
    """
    cand = torch.as_tensor(candidates, dtype=torch.long)
    if cand.ndim != 2 or cand.shape[0] != len(prompt_ids):
        raise ValueError(f"candidates must be [n_prompts={len(prompt_ids)}, K]; got shape {tuple(cand.shape)}")
    K = cand.shape[1]
    rows_prompts = [p for p in prompt_ids for _ in range(K)]
    return score_pairs(model, rows_prompts, cand.reshape(-1).tolist(), trie, **kwargs).view(len(prompt_ids), K)


def naive_scores(
    model,
    prompt_ids: Sequence[Sequence[int]],
    item_token_ids: Sequence[Sequence[int]] | TitleTrie,
    *,
    batch_size: int = 64,
    show_progress: bool = False,
) -> torch.Tensor:
    """Brute-force reference: one forward pass of ``prompt + item tokens`` per (user, item).

    Items are batched (right-padded, so padding never precedes a scored token). Used by the
    tests and the benchmarks; ``score_catalog`` must give the same numbers, much faster.
    """
    seqs = item_token_ids.item_tokens if isinstance(item_token_ids, TitleTrie) else [list(s) for s in item_token_ids]
    device = next(model.parameters()).device
    pad = pad_id(model, None)
    out = torch.empty(len(prompt_ids), len(seqs), device=device)
    with eval_mode(model):
        for u, prompt in enumerate(tqdm(prompt_ids, desc="naive scoring", unit="user", disable=not show_progress)):
            P = len(prompt)
            for i0 in range(0, len(seqs), batch_size):
                chunk = seqs[i0 : i0 + batch_size]
                L = max(len(s) for s in chunk)
                ids = torch.full((len(chunk), P + L), pad, dtype=torch.long)
                att = torch.zeros_like(ids)
                target_mask = torch.zeros(len(chunk), L, dtype=torch.bool)
                for j, s in enumerate(chunk):
                    ids[j, : P + len(s)] = torch.tensor(list(prompt) + list(s))
                    att[j, : P + len(s)] = 1
                    target_mask[j, : len(s)] = True
                ids, att, target_mask = ids.to(device), att.to(device), target_mask.to(device)
                logits = model(input_ids=ids, attention_mask=att).logits[:, P - 1 : P + L - 1].float()
                lp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, P:].unsqueeze(-1)).squeeze(-1)
                out[u, i0 : i0 + len(chunk)] = (lp * target_mask).sum(1)
    return out
