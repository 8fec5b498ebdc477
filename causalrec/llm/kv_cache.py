"""The transformers plumbing under the exact ranking and trie-constrained beam search.

What it is for. The title-trie walk (``causalrec.llm.ranking``) and the beam search that follows the trie
(``causalrec.llm.grounding``) both run the prompt once, keep its keys/values, and then feed many one-token rows
whose past is that prompt KV plus each row's own title prefix. This module holds what they share: the prompt pass
that keeps its KV (``run_prompt``), KV caches assembled from pieces (``rows_cache``, ``walk_layer_class``), left
padding (``pad_left``, ``pad_id``), evaluation mode without autograd (``eval_mode``), the output layer run outside
the model on small blocks (``OutputTap``), and the attention over a prompt KV shared by all rows of a chunk
(``prefix_attention_mode``, ``prefix_state``).

Why it touches transformers internals. A row's past here is not a cache the model built itself: it is joined
from pieces (the prompt KV, broadcast, and the path KV gathered by parent), and the new key/value must land in the
trie level's store for the next level. So the caches are ``DynamicCache`` objects whose layers subclass
``transformers.cache_utils.DynamicLayer`` (``update``, ``get_seq_length``, ``get_mask_sizes``); the shared-prefix
attention is a function registered through ``AttentionInterface`` (its mask through ``sdpa_mask``) and switched on
with ``set_attn_implementation`` for the walk only; the output-layer tap is a forward pre-hook; and the name of the
cache argument is read from ``forward``'s signature (``cache`` in transformers >= 5.2x, ``past_key_values``
before). Keeping these here puts every reliance on transformers' cache and attention internals in one module.
transformers is imported lazily, inside the functions, so ``import causalrec.llm`` stays light.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from causalrec.errors import BackboneError

_log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ model helpers


def base_model(model):
    """The model under a peft wrapper (or the model itself): the one whose config, forward and layers count."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def cache_kwarg(model) -> str:
    """transformers >= 5.2x calls the KV cache argument ``cache``; earlier releases ``past_key_values``."""
    params = inspect.signature(base_model(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


# ---------------------------------------------------------------------------------- cache layers


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


def rows_cache(pieces: list[tuple[list, list]]):
    """A ``DynamicCache`` whose layers hold per-layer ``(key pieces, value pieces)``."""
    from transformers import DynamicCache

    layer_cls = _past_layer_class()
    cache = DynamicCache()
    cache.layers = [layer_cls(k, v) for k, v in pieces]
    return cache


def walk_layer_class():
    """The cache layer class of the trie walk (``causalrec.llm.ranking``); transformers is imported on first use."""
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


# ------------------------------------------------------------------ padding, eval mode, prompt pass


def pad_left(prompts: Sequence[Sequence[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[B, width]`` left-padded with ``pad_token_id`` and their attention mask (1 = real token)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def pad_id(model, pad_token_id: int | None) -> int:
    """Padding id: any id in the vocabulary works, padded positions are masked out or never scored."""
    if pad_token_id is not None:
        return int(pad_token_id)
    base = base_model(model)
    n_vocab = base.get_input_embeddings().weight.shape[0]
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(base.config, name, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None and 0 <= int(value) < n_vocab:
            return int(value)
    return 0


class eval_mode:
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


class OutputTap:
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
        base = base_model(model)
        self.head = base.get_output_embeddings() if enabled and hasattr(base, "get_output_embeddings") else None
        if self.head is not None and any(
            getattr(base.config, k, None) not in (None, 1, 1.0) for k in _LOGIT_TRANSFORM_KEYS
        ):
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
            hidden is not None and self.head is not None and torch.equal(self.head(hidden).float(), logits.float())
        )
        if not self.usable:
            _log.debug("output layer not tapped (logits are not its plain output); projecting whole chunks")
        return self.usable


def run_prompt(model, ids: torch.Tensor, mask: torch.Tensor | None, cache_kw: str, tap: OutputTap | None = None):
    """One pass over the (left-padded) prompts: next-token log-probs ``[B, V]`` and per-layer KV ``[B, h, P, hd]``.

    With ``tap``, also checks that the tap is exact for this model (``OutputTap.verify``).
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    kwargs = {cache_kw: cache}
    if "logits_to_keep" in inspect.signature(base_model(model).forward).parameters:
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


@contextlib.contextmanager
def prefix_state(prompt_kv: list, prompt_mask: torch.Tensor | None, B: int, c: int):
    """Inside, ``_prefix_attention`` (on under ``prefix_attention_mode``) attends the ``c * B`` rows of the next
    forward over ``prompt_kv`` (per layer ``(k, v)`` ``[B, h_kv, P, hd]``), ``prompt_mask`` ``[B, P]`` bool (True =
    real token; None = no padding)."""
    state = _PREFIX_STATE.set(_PrefixState(prompt_kv, prompt_mask, B, c))
    try:
        yield
    finally:
        _PREFIX_STATE.reset(state)


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
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
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
    top = torch.maximum(
        sp.amax(-1, keepdim=True), so.amax(-1, keepdim=True).permute(1, 2, 0, 3, 4)
    )  # [B, h_kv, c, g, 1]
    ep, eo = sp.sub_(top).exp_(), so.sub_(top.permute(2, 0, 1, 3, 4)).exp_()  # fresh tensors: in place is safe
    norm = ep.sum(-1, keepdim=True).permute(2, 0, 1, 3, 4) + eo.sum(-1, keepdim=True)  # [c, B, h_kv, g, 1]
    # normalise the [.., hd] output rather than the [.., P] probabilities: one pass over P saved
    out_p = torch.matmul(ep.view(B, hkv, c * g, P).to(query.dtype), pv).view(B, hkv, c, g, hd).permute(2, 0, 1, 3, 4)
    out = (torch.matmul(eo.to(query.dtype), vo) + out_p) / norm.to(query.dtype)  # [c, B, h_kv, g, hd]
    return out.reshape(c * B, 1, hq, hd), None


def supports_prefix_attention(model) -> bool:
    """Models whose attention goes through transformers' AttentionInterface (almost all in transformers 5)."""
    return bool(getattr(base_model(model), "_can_set_attn_implementation", lambda: False)())


@contextlib.contextmanager
def prefix_attention_mode(model):
    """The model uses ``_prefix_attention`` inside, its own attention implementation again after."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(_PREFIX_ATTN, _prefix_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(_PREFIX_ATTN, sdpa_mask)
    base = base_model(model)
    previous = base.config._attn_implementation
    base.set_attn_implementation(_PREFIX_ATTN)
    try:
        yield
    finally:
        base.set_attn_implementation(previous)
