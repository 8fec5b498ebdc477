"""Exact full-catalog ranking: log p(title + EOS | prompt) for every item, over a trie of titles.

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
  cache, normalised by ``log_softmax`` (one fused pass) instead of ``logsumexp`` (``_OutputTap``);
* rows are node-major, so the cache writes each chunk's ancestors + own KV straight into the
  level's store (one copy instead of three) and the next level gathers with ``index_select``;
Not done: feeding a chain of single-child nodes (9 in 10 of the fed nodes there) as one
multi-token step would save no arithmetic, since every node still needs its full next-token
distribution to normalise its child's probability; batching users (``batch_size``) barely
changes CPU time.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm.auto import tqdm

from causalrec.data.prompts import PromptFormat, completion_text
from causalrec.errors import BackboneError, DataError

_log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- trie


@dataclass(frozen=True)
class TrieLevel:
    """The nodes at one depth, ordered by parent then token.

    Attributes:
        token: ``[N]`` token id of each node.
        parent_row: ``[N]`` row of the node's parent in the previous level's ``expanded``
            (0 at depth 0: the parent is the prompt).
        expanded: ``[M]`` nodes of this level that have children (they are fed to the model).
        child_ptr: ``[M + 1]`` children of expanded row r are next-level nodes
            ``child_ptr[r]:child_ptr[r + 1]`` (contiguous because nodes are ordered by parent).
    """

    token: torch.Tensor
    parent_row: torch.Tensor
    expanded: torch.Tensor
    child_ptr: torch.Tensor


class TitleTrie:
    """A prefix tree over the token ids of item titles, stored as flat per-level arrays.

    Item i ends at node ``item_node[i]`` (a global id: level offset + index in level). Several
    items may end at the same node (duplicate titles: equal scores); an item may end at an
    inner node (its title is a prefix of another's and has no EOS), its score is still exact.
    """

    def __init__(self, levels: list[TrieLevel], item_node: torch.Tensor, item_tokens: list[tuple[int, ...]]):
        self.levels = levels
        self.item_node = item_node
        self.item_tokens = item_tokens
        sizes = [len(lv.token) for lv in levels]
        self.level_offset = [sum(sizes[:d]) for d in range(len(sizes))]
        self.n_nodes = sum(sizes)

    @classmethod
    def from_token_ids(cls, token_ids: Sequence[Sequence[int]]) -> "TitleTrie":
        """Build from each item's token ids (title tokens + EOS, see ``title_token_ids``)."""
        if len(token_ids) == 0:
            raise DataError("the catalog is empty: there are no items to rank")
        children: list[dict[int, int]] = [{}]
        ends: list[int] = []
        for i, seq in enumerate(token_ids):
            if len(seq) == 0:
                raise DataError(f"item {i} has no tokens; every item needs a title (its tokens end with EOS)")
            node = 0
            for t in seq:
                t = int(t)
                nxt = children[node].get(t)
                if nxt is None:
                    nxt = len(children)
                    children[node][t] = nxt
                    children.append({})
                node = nxt
            ends.append(node)
        # breadth-first, children of each parent sorted by token: a parent's children are contiguous
        levels, where = [], {}
        frontier = [0]
        depth = 0
        while True:
            tokens, parent_row, nodes = [], [], []
            expanded_parents = [n for n in frontier if children[n]]
            for row, parent in enumerate(expanded_parents):
                for t in sorted(children[parent]):
                    tokens.append(t)
                    parent_row.append(row)
                    nodes.append(children[parent][t])
            if not nodes:
                break
            for idx, n in enumerate(nodes):
                where[n] = (depth, idx)
            levels.append((tokens, parent_row, nodes))
            frontier = nodes
            depth += 1
        built, offset, offsets = [], 0, []
        for d, (tokens, parent_row, nodes) in enumerate(levels):
            exp = [i for i, n in enumerate(nodes) if children[n]]
            counts = [len(children[nodes[i]]) for i in exp]
            ptr = torch.zeros(len(exp) + 1, dtype=torch.long)
            if counts:
                ptr[1:] = torch.tensor(counts).cumsum(0)
            built.append(TrieLevel(torch.tensor(tokens), torch.tensor(parent_row), torch.tensor(exp, dtype=torch.long), ptr))
            offsets.append(offset)
            offset += len(nodes)
        item_node = torch.tensor([offsets[where[n][0]] + where[n][1] for n in ends], dtype=torch.long)
        return cls(built, item_node, [tuple(int(t) for t in s) for s in token_ids])

    def __len__(self) -> int:
        return len(self.item_node)

    @property
    def depth(self) -> int:
        return len(self.levels)

    def subtrie(self, items: Sequence[int]) -> "TitleTrie":
        """The trie of some items (in the given order): item j of the result is ``items[j]``."""
        return TitleTrie.from_token_ids([self.item_tokens[int(i)] for i in items])


def title_token_ids(tokenizer, titles: Sequence[str], context: str | None = None) -> list[list[int]]:
    """Token ids of ``completion_text(title)`` + EOS for each title, as TRL tokenises them.

    TRL tokenises ``prompt + completion + eos_token`` and takes the completion's tokens after
    the prompt's. Doing the same after ``context`` (default: the default prompt with an empty
    history) gives the tokens the model is trained on, also for tokenizers (SentencePiece,
    BPE) whose first word depends on what precedes it.
    """
    if tokenizer.eos_token is None:
        raise BackboneError("the tokenizer has no eos_token; titles must end with one")
    context = PromptFormat().prompt([]) if context is None else context
    base = tokenizer(context)["input_ids"]
    full = tokenizer([context + completion_text(t) + tokenizer.eos_token for t in titles])["input_ids"]
    out = []
    for title, ids in zip(titles, full):
        k = 0
        while k < min(len(base), len(ids)) and base[k] == ids[k]:
            k += 1
        if k < len(base):
            _log.warning("title %r merges with the end of the prompt when tokenised; its tokens start where they differ", title)
        seq = list(ids[k:])
        if not seq or seq[-1] != tokenizer.eos_token_id:
            seq.append(tokenizer.eos_token_id)
        out.append(seq)
    unk = getattr(tokenizer, "unk_token_id", None)
    n_unk = sum(unk in seq for seq in out) if unk is not None else 0
    if n_unk:
        _log.warning("%d of %d titles contain tokens unknown to the tokenizer; they may tie with other titles", n_unk, len(out))
    return out


# ------------------------------------------------------------------------------ model helpers


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _cache_kwarg(model) -> str:
    """transformers >= 5.2x calls the KV cache argument ``cache``; earlier releases ``past_key_values``."""
    params = inspect.signature(_base_model(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _past_layer_class():
    from transformers.cache_utils import DynamicLayer

    class _PastLayer(DynamicLayer):
        """One layer's past for ``B * c`` one-token rows, assembled from pieces ``[B, c, h, len, hd]``.

        To the model it is a ``DynamicLayer``. ``update`` joins the pieces (which may be
        broadcast views, e.g. the prompt's KV) and the new token's key/value with a single
        concatenation, and keeps the new key/value: they join the past of the row's children.
        """

        def __init__(self, past_k: list, past_v: list):
            super().__init__()
            self.past_k, self.past_v = past_k, past_v
            self.past_len = sum(t.shape[3] for t in past_k)
            self.device = past_k[0].device
            self.is_initialized = True
            self.new_kv = None

        def update(self, key_states, value_states, *args, **kwargs):
            B, c, h, _, hd = self.past_k[0].shape
            self.new_kv = (key_states.view(B, c, h, 1, hd), value_states.view(B, c, h, 1, hd))
            shape = (B * c, h, self.past_len + 1, hd)
            self.keys = torch.cat([*self.past_k, self.new_kv[0]], dim=3).view(shape)
            self.values = torch.cat([*self.past_v, self.new_kv[1]], dim=3).view(shape)
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.past_len

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.past_len + query_length, 0

    return _PastLayer


def _rows_cache(pieces: list[tuple[list, list]]):
    """A ``DynamicCache`` whose layers hold per-layer ``(key pieces, value pieces)``."""
    from transformers import DynamicCache

    layer_cls = _past_layer_class()
    cache = DynamicCache()
    cache.layers = [layer_cls(k, v) for k, v in pieces]
    return cache


def _pad_left(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _pad_id(model, pad_token_id: int | None) -> int:
    """Padding id: any id in the vocabulary works, padded positions are masked out or never scored."""
    if pad_token_id is not None:
        return int(pad_token_id)
    base = _base_model(model)
    n_vocab = base.get_input_embeddings().weight.shape[0]
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(base.config, name, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None and 0 <= int(value) < n_vocab:
            return int(value)
    return 0


class _eval_mode:
    """Evaluation mode and no autograd inside, the model's previous mode restored after."""

    def __init__(self, model):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()
        self.grad = torch.no_grad()  # not inference_mode: callers (RecBole) edit the scores in place
        self.grad.__enter__()

    def __exit__(self, *exc):
        self.grad.__exit__(*exc)
        self.model.train(self.was_training)


# Config keys of models whose logits are not the output layer's output (soft-capping, scaling): never tapped.
_LOGIT_TRANSFORM_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logits_scale")


class _OutputTap:
    """Runs the model's output layer outside the model, on blocks of ``block`` rows.

    Why: in its own forward the model projects every row of a chunk onto the whole vocabulary at
    once, a ``[rows, V]`` tensor far larger than the CPU cache (2,048 rows x 2k words = 16 MB) that
    the normaliser then reads again. Projecting a few hundred rows at a time and normalising them
    while they are in cache makes that part about twice as fast (the projection is most of the
    walk's arithmetic: ``V x hidden`` per node against ``~12 hidden^2`` per layer).

    How: a forward pre-hook on the output layer keeps its input (the final hidden states) and, in
    ``cut`` mode, hands the layer one row instead, so the model's own logits cost nothing; the walk
    then calls the same layer (LoRA, quantisation and all) on slices of the kept input. It is used
    only if, on the prompt pass, the model's logits equal the layer's output on the kept input
    exactly (``verify``); models that transform logits after the layer (soft-capping, scaling,
    a bias added outside it) take the plain path, as do models without an output layer.
    """

    def __init__(self, model, enabled: bool = True):
        base = _base_model(model)
        self.head = base.get_output_embeddings() if enabled and hasattr(base, "get_output_embeddings") else None
        if self.head is not None and any(getattr(base.config, k, None) not in (None, 1, 1.0) for k in _LOGIT_TRANSFORM_KEYS):
            self.head = None
        self.mode = "off"  # off: pass through | keep: keep the input | cut: keep it, compute one row
        self.hidden: torch.Tensor | None = None
        self.usable = False
        self._handle = None

    def _pre_hook(self, module, args):
        if self.mode == "off" or not args or not torch.is_tensor(args[0]):
            return None
        self.hidden = args[0]
        return (args[0][:1], *args[1:]) if self.mode == "cut" else None

    def __enter__(self):
        if self.head is not None:
            self._handle = self.head.register_forward_pre_hook(self._pre_hook)
        return self

    def __exit__(self, *exc):
        if self._handle is not None:
            self._handle.remove()
        self.mode, self.hidden = "off", None

    def call(self, model, mode: str, **inputs):
        """``model(**inputs)`` with the tap in ``mode``; the kept hidden states are in ``self.hidden``."""
        self.mode, self.hidden = mode, None
        try:
            return model(**inputs)
        finally:
            self.mode = "off"

    def verify(self, logits: torch.Tensor) -> bool:
        """The tap is exact for this model: the model's ``logits`` equal the layer on the kept input."""
        hidden = self.hidden
        self.usable = bool(
            hidden is not None
            and self.head is not None
            and torch.equal(self.head(hidden).float(), logits.float())
        )
        if not self.usable:
            _log.debug("output layer not tapped (logits are not its plain output); projecting whole chunks")
        return self.usable


def _run_prompt(model, ids: torch.Tensor, mask: torch.Tensor | None, cache_kw: str, tap: _OutputTap | None = None):
    """One pass over the (left-padded) prompts: next-token log-probs ``[B, V]`` and per-layer KV ``[B, h, P, hd]``.

    With ``tap``, also checks that the tap is exact for this model (``_OutputTap.verify``).
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    kwargs = {cache_kw: cache}
    if "logits_to_keep" in inspect.signature(_base_model(model).forward).parameters:
        kwargs["logits_to_keep"] = 1  # only the last position's logits are needed
    if mask is None:
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    else:  # left padding: real tokens count from 0
        positions = (mask.cumsum(1) - 1).clamp(min=0)
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
    if tap is None:
        out = model(**inputs)
    else:
        out = tap.call(model, "keep", **inputs)
        tap.verify(out.logits)
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    return torch.log_softmax(out.logits[:, -1].float(), dim=-1), kv


# ------------------------------------------------------------------ shared-prefix attention

_PREFIX_ATTN = "causalrec_prefix"
_PREFIX_STATE: contextvars.ContextVar = contextvars.ContextVar("causalrec_prefix_state", default=None)


@dataclass
class _PrefixState:
    prompt_kv: list  # per layer (k, v) [B, h_kv, P, hd]
    prompt_mask: torch.Tensor | None  # [B, P] bool, True = real token; None = no padding
    B: int
    c: int


def _prefix_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of ``c * B`` one-token rows (node-major: row ``n * B + b`` is node n of user b) over the
    shared prompt KV plus each row's own past.

    ``key``/``value`` hold only each node's ancestors and itself (``[c*B, h_kv, d+1, hd]``);
    the prompt's KV (``[B, h_kv, P, hd]``) is shared, never copied per row: its scores are one
    matrix product per user and KV head for all rows of the chunk. The two parts share one
    softmax (flash-attention style), so this is the attention over ``prompt + ancestors +
    self``, exactly.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    st = _PREFIX_STATE.get()
    if st is None:  # any other forward while the mode is on: plain sdpa
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    for name in ("sliding_window", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise BackboneError(f"shared-prefix ranking does not support attention with {name}; use method='rows'")
    B, c = st.B, st.c
    pk, pv = st.prompt_kv[module.layer_idx]
    _, hq, _, hd = query.shape
    hkv, P = pk.shape[1], pk.shape[2]
    g = hq // hkv  # query heads per KV head (grouped-query attention)
    scale = scaling if scaling is not None else hd**-0.5
    # The big tensors over the P prompt positions are laid out like the prompt KV, [B, h_kv, c, g, P], made
    # contiguous by their matmul and updated in place; only the small per-row tensors (query, output, maxima,
    # norms) are permuted, never the [.., P] ones (permuting those made a 4k-item walk ~7 % slower in CPU time).
    q = query.view(c, B, hkv, g, hd) * scale
    sp = torch.matmul(q.permute(1, 2, 0, 3, 4).reshape(B, hkv, c * g, hd), pk.transpose(-1, -2)).float()
    sp = sp.view(B, hkv, c, g, P)
    ko, vo = key.view(c, B, hkv, -1, hd), value.view(c, B, hkv, -1, hd)
    so = torch.matmul(q, ko.transpose(-1, -2)).float()  # [c, B, h_kv, g, d + 1]
    softcap = kwargs.get("softcap")
    if softcap:
        sp, so = torch.tanh(sp / softcap) * softcap, torch.tanh(so / softcap) * softcap
    if st.prompt_mask is not None:
        sp.masked_fill_(~st.prompt_mask[:, None, None, None, :], float("-inf"))
    top = torch.maximum(sp.amax(-1, keepdim=True), so.amax(-1, keepdim=True).permute(1, 2, 0, 3, 4))  # [B, h_kv, c, g, 1]
    ep, eo = sp.sub_(top).exp_(), so.sub_(top.permute(2, 0, 1, 3, 4)).exp_()  # fresh tensors: in place is safe
    norm = ep.sum(-1, keepdim=True).permute(2, 0, 1, 3, 4) + eo.sum(-1, keepdim=True)  # [c, B, h_kv, g, 1]
    # normalise the [.., hd] output rather than the [.., P] probabilities: one pass over P saved
    out_p = torch.matmul(ep.view(B, hkv, c * g, P).to(query.dtype), pv).view(B, hkv, c, g, hd).permute(2, 0, 1, 3, 4)
    out = (torch.matmul(eo.to(query.dtype), vo) + out_p) / norm.to(query.dtype)  # [c, B, h_kv, g, hd]
    return out.reshape(c * B, 1, hq, hd), None


def _supports_prefix_attention(model) -> bool:
    """Models whose attention goes through transformers' AttentionInterface (almost all in transformers 5)."""
    return bool(getattr(_base_model(model), "_can_set_attn_implementation", lambda: False)())


@contextlib.contextmanager
def _prefix_attention_mode(model):
    """The model uses ``_prefix_attention`` inside, its own attention implementation again after."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(_PREFIX_ATTN, _prefix_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(_PREFIX_ATTN, sdpa_mask)
    base = _base_model(model)
    previous = base.config._attn_implementation
    base.set_attn_implementation(_PREFIX_ATTN)
    try:
        yield
    finally:
        base.set_attn_implementation(previous)


# ------------------------------------------------------------------------------------ the walk


def _walk_layer_class():
    from transformers.cache_utils import DynamicLayer

    class _WalkLayer(DynamicLayer):
        """One layer's past for ``c * B`` one-token rows (node-major), written straight into the level's store.

        ``path_k``/``path_v`` (``[c, B, h, d, hd]``) are the rows' ancestors; ``store_k``/``store_v`` (``[c, B, h,
        d+1, hd]``, a contiguous slice of the level's store) receive ancestors + the new token, which is both the
        key/value the rows attend to and the past of their children: one copy. With ``prompt_k``/``prompt_v``
        (``[B, h, P, hd]``, the ``rows`` method) the keys are prompt + path + new token for every row instead.
        """

        def __init__(self, path_k, path_v, store_k, store_v, prompt_k=None, prompt_v=None):
            super().__init__()
            self.path_k, self.path_v, self.store_k, self.store_v = path_k, path_v, store_k, store_v
            self.prompt_k, self.prompt_v = prompt_k, prompt_v
            self.past_len = path_k.shape[3] + (0 if prompt_k is None else prompt_k.shape[2])
            self.device = path_k.device
            self.is_initialized = True

        def _join(self, path, store, prompt, new):
            c, B, h, d, hd = path.shape
            new = new.view(c, B, h, 1, hd)
            if prompt is None:
                torch.cat([path, new], dim=3, out=store)
                return store.view(c * B, h, d + 1, hd)
            full = torch.cat([prompt.unsqueeze(0).expand(c, *prompt.shape), path, new], dim=3)
            store.copy_(full[:, :, :, -(d + 1) :])
            return full.view(c * B, h, -1, hd)

        def update(self, key_states, value_states, *args, **kwargs):
            self.keys = self._join(self.path_k, self.store_k, self.prompt_k, key_states)
            self.values = self._join(self.path_v, self.store_v, self.prompt_v, value_states)
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.past_len

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            return self.past_len + query_length, 0

    return _WalkLayer


class _NodeWalker:
    """Feeds trie nodes as one-token rows (one per node and user, node-major) and keeps each node's path KV.

    Rows are node-major (row ``n * B + b``) so that a chunk's rows are a contiguous slice of the level's KV store
    ``[M, B, h, d+1, hd]``: the cache writes ancestors + own KV there directly, and the next level gathers whole
    ``[B, h, d+1, hd]`` blocks by parent.

    ``shared_prefix``: the rows' past is only their path; ``_prefix_attention`` adds the
    prompt, shared by all rows. Otherwise the past is prompt + path, the prompt's KV copied
    into every row: plain ``Cache`` + 2-D mask, which any attention implementation runs.
    """

    def __init__(self, prompt_kv, mask: torch.Tensor, padded: bool, trie: TitleTrie, shared_prefix: bool):
        self.prompt_kv, self.mask, self.padded, self.shared_prefix = prompt_kv, mask, padded, shared_prefix
        self.plen = mask.sum(1)  # real prompt lengths: the position of each user's depth-0 token
        self.path = [(k[:, :, :0].unsqueeze(0), v[:, :, :0].unsqueeze(0)) for k, v in prompt_kv]  # [1, B, h, 0, hd]
        self.path_rows = torch.zeros(len(trie.levels[0].expanded), dtype=torch.long, device=mask.device)
        self.store = None
        self.layer_cls = _walk_layer_class()

    def forward(
        self, model, cache_kw: str, d: int, tokens: torch.Tensor, m0: int, m1: int, M: int, tap: _OutputTap
    ) -> torch.Tensor:
        """Logits ``[c, B, V]`` after the level-d expanded nodes ``m0:m1`` (their tokens), or the final hidden
        states ``[c, B, H]`` when ``tap.usable`` (the caller projects them with ``tap.head``)."""
        from transformers import DynamicCache

        (B, P), c = self.mask.shape, m1 - m0
        rows = self.path_rows[m0:m1]
        # [c, B, h, d, hd]; index_select gathers these blocks ~5x faster than ak[rows]
        path = [(ak.index_select(0, rows), av.index_select(0, rows)) for ak, av in self.path]
        if self.store is None:  # the level's KV: ancestors + own, the past of the next level
            self.store = [(k.new_empty(M, *k.shape[1:3], d + 1, k.shape[4]), v.new_empty(M, *v.shape[1:3], d + 1, v.shape[4]))
                          for k, v in path]
        prompts = [(None, None)] * len(path) if self.shared_prefix else self.prompt_kv
        cache = DynamicCache()
        cache.layers = [self.layer_cls(k, v, sk[m0:m1], sv[m0:m1], pk, pv)
                        for (k, v), (sk, sv), (pk, pv) in zip(path, self.store, prompts)]
        inputs = dict(
            input_ids=tokens[m0:m1].repeat_interleave(B).unsqueeze(1),
            position_ids=(self.plen + d).repeat(c).unsqueeze(1),
            use_cache=True,
            **{cache_kw: cache},
        )
        if self.shared_prefix:
            state = _PREFIX_STATE.set(_PrefixState(self.prompt_kv, self.mask.bool() if self.padded else None, B, c))
            try:
                out = self._call(model, tap, **inputs)
            finally:
                _PREFIX_STATE.reset(state)
        else:
            att = None
            if self.padded:
                att = torch.cat([self.mask.unsqueeze(0).expand(c, B, P), self.mask.new_ones(c, B, d + 1)], dim=2)
                att = att.reshape(c * B, P + d + 1)
            out = self._call(model, tap, **inputs, attention_mask=att)
        return out.view(c, B, -1)

    @staticmethod
    def _call(model, tap: _OutputTap, **inputs) -> torch.Tensor:
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
    pad_id: int,
    cache_kw: str,
    method: str = "auto",
    head_block: int = 256,
) -> torch.Tensor:
    """Cumulative log-probability of every trie node for a batch of prompts: ``[B, n_nodes]``."""
    if method not in METHODS:
        raise ValueError(f"unknown ranking method {method!r}; valid: {', '.join(METHODS)}")
    if method == "auto":
        method = "prefix" if _supports_prefix_attention(model) else "rows"
    if method == "prefix" and not _supports_prefix_attention(model):
        name = type(_base_model(model)).__name__
        raise BackboneError(f"{name} cannot switch its attention implementation; use method='rows'")
    if any(len(p) == 0 for p in prompts):
        raise DataError("a prompt has no tokens; the model needs at least one token (e.g. BOS) to condition on")
    device = next(model.parameters()).device
    ids, mask = _pad_left(prompts, pad_id, device)
    padded = bool((mask == 0).any())
    B = len(prompts)
    cum = torch.empty(B, trie.n_nodes, device=device)
    with contextlib.ExitStack() as stack:
        tap = stack.enter_context(_OutputTap(model, enabled=head_block > 0))
        root_lp, prompt_kv = _run_prompt(model, ids, mask if padded else None, cache_kw, tap)
        walker = _NodeWalker(prompt_kv, mask, padded, trie, shared_prefix=method == "prefix")
        if method == "prefix":
            stack.enter_context(_prefix_attention_mode(model))
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
            model (see ``_OutputTap``); 0 lets the model project whole chunks itself (the slower way, for
            comparison; models whose logits are not their output layer's plain output always do).
        pad_token_id: id for padding (masked, so any id works; default from the model config).
        show_progress: a tqdm bar over users.
        method: ``prefix`` (shared-prompt attention, fast; models using transformers'
            AttentionInterface), ``rows`` (prompt KV copied per row; any attention), or
            ``auto`` (``prefix`` where possible).
    Returns:
        ``[len(prompt_ids), len(trie)]`` float32 tensor on the model's device.
    """
    cache_kw, pad = _cache_kwarg(model), _pad_id(model, pad_token_id)
    results = []
    bar = tqdm(total=len(prompt_ids), desc="ranking catalog", unit="user", disable=not show_progress)
    with _eval_mode(model), bar:
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
        raise ValueError(f"scores must be [B, K, ...] with K = {k} environments matching weights "
                         f"{tuple(log_prior.shape)}; got {tuple(scores.shape)}")
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
    cache_kw, pad = _cache_kwarg(model), _pad_id(model, pad_token_id)
    device = next(model.parameters()).device
    out = torch.empty(len(items), device=device)
    with _eval_mode(model):
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
    pad = _pad_id(model, None)
    out = torch.empty(len(prompt_ids), len(seqs), device=device)
    with _eval_mode(model):
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
