"""Semantic ids (``item_repr: semantic``): a few code tokens per item from residual k-means over item embeddings.

TIGER (Rajput et al., 2023) and MiniOneRec write each item as a short tuple of codes: level 0 clusters the
items' embeddings, level 1 clusters what level 0's centroids leave over (the residuals), and so on; items that end
with the same tuple get one more code that tells them apart (0, 1, ... in catalog order). Items with similar texts
share their first codes, so what the model learns about one carries to its neighbours, and a catalog of n items
needs only ``levels x codebook_size`` (+ the collision level) added tokens instead of n.

Three embeddings are built in (``semantic_source``): ``interactions``, the items' columns of the training user-item
matrix (binary, degree-normalised as LightGCN's propagation is) reduced by a truncated SVD: items bought by the same
customers share codes; ``title``, the titles' TF-IDF vectors reduced the same way; and ``sentence``, the titles
through a pretrained sentence encoder (a local directory, or the ``embeddings`` extra's all-MiniLM-L6-v2), as TIGER
embeds item texts. The first two are offline, from scikit-learn, with no model weights; any ``[n_items, dim]`` array
can be coded instead (``residual_kmeans``). Everything is seeded (the encoder is deterministic): the same titles and
settings give the same codes, which a checkpoint needs, as its model rebuilds them at load.

The codes are written as added tokens ``<c{level}_{code}>`` separated by spaces, and ranked exactly through the
title trie (``causalrec.llm.trie``), as titles are: ``log p(codes + EOS | prompt)`` for every item.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from causalrec.errors import ConfigError

_log = logging.getLogger(__name__)

# what the codes cluster: who bought the items (the default), the titles' words, or their meaning
SEMANTIC_SOURCES = ("interactions", "title", "sentence")
# above this share of items told apart only by the collision level, the codes carry little: warn (Online Retail's
# 3,179 items at 3 levels of 16 codes: 84 % from interactions; retail-sim's 387: 20-47 %)
COLLISION_WARN_SHARE = 0.5


def code_token(level: int, code: int) -> str:
    """The added token of code ``code`` at level ``level``."""
    return f"<c{int(level)}_{int(code)}>"


def title_embeddings(titles: Sequence[str], dim: int = 64, seed: int = 0) -> np.ndarray:
    """``[len(titles), <= dim]`` float64 embeddings: word TF-IDF (lower-cased, sublinear tf), truncated SVD, rows
    L2-normalised. Fewer columns than ``dim`` when the titles span fewer directions."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    if len(titles) < 2:
        raise ConfigError(f"semantic ids need at least 2 items; got {len(titles)}")
    tfidf = TfidfVectorizer(lowercase=True, sublinear_tf=True, token_pattern=r"(?u)\b\w+\b").fit_transform(titles)
    k = min(int(dim), tfidf.shape[0] - 1, tfidf.shape[1] - 1)
    if k < 1:  # one distinct word: nothing to reduce
        x = tfidf.toarray()
    else:
        x = TruncatedSVD(n_components=k, algorithm="randomized", random_state=seed).fit_transform(tfidf)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def sentence_embeddings(titles: Sequence[str], encoder_dir=None) -> np.ndarray:
    """``[len(titles), hidden]`` float64 embeddings of the titles by a sentence encoder (mean pooling, L2-normalised;
    ``causalrec.llm.grounding.SentenceEmbedder``): ``encoder_dir`` a local encoder directory, or None for the
    ``embeddings`` extra's all-MiniLM-L6-v2. Nothing is downloaded."""
    from causalrec.llm.grounding import SentenceEmbedder

    if len(titles) < 2:
        raise ConfigError(f"semantic ids need at least 2 items; got {len(titles)}")
    return SentenceEmbedder(encoder_dir)(list(titles)).astype(np.float64)


def interaction_embeddings(matrix, dim: int = 64, seed: int = 0) -> np.ndarray:
    """``[n_items, <= dim]`` float64 embeddings of the columns of a users x items interaction ``matrix`` (scipy
    sparse): binarised, scaled by ``1 / sqrt(deg(u) deg(i))``, truncated SVD of the items' side (``V S``), rows
    L2-normalised. An item without interactions gets a zero row."""
    import scipy.sparse as sp
    from sklearn.decomposition import TruncatedSVD

    m = sp.csr_matrix(matrix, dtype=np.float64, copy=True)
    m.data[:] = 1.0
    deg_u = np.asarray(m.sum(axis=1)).ravel()
    deg_i = np.asarray(m.sum(axis=0)).ravel()
    scale = lambda d: sp.diags(1.0 / np.sqrt(np.maximum(d, 1.0)))  # noqa: E731
    items = (scale(deg_u) @ m @ scale(deg_i)).T.tocsr()
    k = min(int(dim), items.shape[0] - 1, items.shape[1] - 1)
    if k < 1:
        raise ConfigError(f"semantic_source: interactions needs at least 2 users and 2 items; got {m.shape}")
    x = TruncatedSVD(n_components=k, algorithm="randomized", random_state=seed).fit_transform(items)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def residual_kmeans(embeddings: np.ndarray, levels: int, codebook_size: int, seed: int = 0) -> np.ndarray:
    """``[n, levels (+1)]`` int64 codes of each row: k-means of level l on what levels < l left over.

    A last column is added only when two rows share all ``levels`` codes: their rank among the rows with that
    tuple, in row order, so every row's code tuple is unique. A level has at most as many clusters as there are
    distinct residual rows.
    """
    from sklearn.cluster import KMeans

    if levels < 1 or codebook_size < 2:
        raise ConfigError(
            f"semantic ids need semantic_levels >= 1 and semantic_codebook >= 2; got {levels}, {codebook_size}"
        )
    residual = np.asarray(embeddings, dtype=np.float64).copy()
    codes = np.zeros((len(residual), levels), dtype=np.int64)
    for level in range(levels):
        distinct = len(np.unique(residual.round(12), axis=0))
        k = min(codebook_size, distinct)
        if k < 2:  # every residual is the same point: one code
            break
        km = KMeans(n_clusters=k, n_init=4, random_state=seed + level).fit(residual)
        codes[:, level] = km.labels_
        residual -= km.cluster_centers_[km.labels_]
    _, first, inverse = np.unique(codes, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    if len(first) == len(codes):
        return codes
    rank = np.zeros(len(codes), dtype=np.int64)
    seen: dict[int, int] = {}
    for row, group in enumerate(inverse.tolist()):
        rank[row] = seen.get(group, 0)
        seen[group] = rank[row] + 1
    shared = int((np.bincount(inverse)[inverse] > 1).sum())
    message = (
        "semantic ids: %d of %d items share their %d codes with another; a collision level (up to %d) tells them apart"
    )
    args = (shared, len(codes), levels, int(rank.max()) + 1)
    if shared > COLLISION_WARN_SHARE * len(codes):  # the collision code is arbitrary: such items share nothing learned
        _log.warning(message + " (a larger semantic_codebook or more semantic_levels separates them)", *args)
    else:
        _log.info(message, *args)
    return np.concatenate([codes, rank[:, None]], axis=1)


def code_texts(codes: np.ndarray) -> list[str]:
    """Each row's codes as its text: the code tokens separated by spaces."""
    return [" ".join(code_token(level, c) for level, c in enumerate(row)) for row in np.asarray(codes).tolist()]


def code_vocabulary(codes: np.ndarray) -> list[str]:
    """Every code token that ``codes`` use, level by level, code by code."""
    codes = np.asarray(codes)
    return [code_token(level, c) for level in range(codes.shape[1]) for c in sorted(set(codes[:, level].tolist()))]
