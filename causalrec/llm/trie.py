"""The title trie: the catalog's tokenised titles in a prefix tree, and how titles are tokenised.

``title_token_ids`` gives each title's tokens exactly as SFT and DPO train on them (the title after the prompt,
ending with EOS); ``TitleTrie.from_token_ids`` puts them in a prefix tree stored as flat per-level arrays. The
exact full-catalog ranking walks it level by level (``causalrec.llm.ranking``), trie-constrained beam search
follows its edges (``causalrec.llm.grounding``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from causalrec.data.prompts import PromptFormat, completion_text
from causalrec.errors import BackboneError, DataError

_log = logging.getLogger(__name__)


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
        for _d, (tokens, parent_row, nodes) in enumerate(levels):
            exp = [i for i, n in enumerate(nodes) if children[n]]
            counts = [len(children[nodes[i]]) for i in exp]
            ptr = torch.zeros(len(exp) + 1, dtype=torch.long)
            if counts:
                ptr[1:] = torch.tensor(counts).cumsum(0)
            built.append(
                TrieLevel(torch.tensor(tokens), torch.tensor(parent_row), torch.tensor(exp, dtype=torch.long), ptr)
            )
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
            _log.warning(
                "title %r merges with the end of the prompt when tokenised; its tokens start where they differ", title
            )
        seq = list(ids[k:])
        if not seq or seq[-1] != tokenizer.eos_token_id:
            seq.append(tokenizer.eos_token_id)
        out.append(seq)
    unk = getattr(tokenizer, "unk_token_id", None)
    n_unk = sum(unk in seq for seq in out) if unk is not None else 0
    if n_unk:
        _log.warning(
            "%d of %d titles contain tokens unknown to the tokenizer; they may tie with other titles", n_unk, len(out)
        )
    return out
