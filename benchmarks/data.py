"""Synthetic inputs for the benchmarks: retail-sim-like item titles, histories and the tiny backbone."""

from __future__ import annotations

from itertools import product

import numpy as np

from causalrec.data.sources.retail_sim import ADJECTIVES, CATEGORIES, MATERIALS, SIZES


def catalog_titles(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct titles built like retail-sim's ("LARGE RED CERAMIC MUG"): size, colour/pattern, material,
    noun of one of its 20 categories. A fixed seeded order, so smaller catalogs are prefixes of larger ones."""
    table = [
        f"{s}{a} {m} {noun}" for cat in CATEGORIES for s, a, m, noun in product(SIZES, ADJECTIVES, MATERIALS, cat.nouns)
    ]
    if n > len(table):
        raise ValueError(f"at most {len(table)} distinct synthetic titles; asked for {n}")
    order = np.random.default_rng(seed).permutation(len(table))[:n]
    return [table[i] for i in order]


def histories(titles: list[str], n_users: int, length: int, seed: int = 0) -> list[list[str]]:
    """Random purchase histories (titles drawn from ``titles``, repeats allowed as in retail)."""
    rng = np.random.default_rng(seed)
    return [[titles[i] for i in rng.integers(0, len(titles), length)] for _ in range(n_users)]


def tiny_backbone(corpus: list[str], seed: int = 0, sharpen: float | None = 4.0, **overrides):
    """causalrec's default backbone (``backbone: tiny``: Llama, hidden 64, 2 layers, 4 heads) built on ``corpus``.

    ``sharpen``: re-draw the weights with standard deviation ``sharpen / sqrt(fan_in)``, so next-token
    distributions are far from uniform (a fresh init is nearly uniform and makes score comparisons too easy);
    it changes no shape and so no timing. None keeps the fresh init.
    """
    import torch

    from causalrec.llm.backbone import BackboneConfig, load_backbone

    model, tok = load_backbone(BackboneConfig(device="cpu", seed=seed, **overrides), corpus)
    if sharpen:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in sorted(model.named_parameters()):
                p.copy_(torch.randn(p.shape, generator=gen) * sharpen / max(p.shape[-1], 1) ** 0.5)
    return model, tok
