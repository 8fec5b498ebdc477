"""The LLM layer: backbone loading, exact full-catalog ranking, grounding of generated text.

Knows no RecBole and no TRL trainer (DESIGN.md, "Layers"). Submodules import transformers,
peft and faiss lazily where they can, so ``import causalrec.llm`` stays light.
"""

from causalrec.llm.backbone import (
    BackboneConfig,
    apply_lora,
    build_tiny_llama,
    build_tokenizer,
    load_backbone,
    lora_config,
    save_backbone,
)
from causalrec.llm.grounding import (
    BackboneEmbedder,
    EmbeddingIndex,
    SentenceEmbedder,
    constrained_beam_search,
    embed_texts_with_backbone,
    ground_texts,
)
from causalrec.llm.ranking import (
    marginalize_environments,
    naive_scores,
    score_candidates,
    score_catalog,
    score_pairs,
)
from causalrec.llm.trie import TitleTrie, title_token_ids

__all__ = [
    "BackboneConfig",
    "BackboneEmbedder",
    "EmbeddingIndex",
    "SentenceEmbedder",
    "TitleTrie",
    "apply_lora",
    "build_tiny_llama",
    "build_tokenizer",
    "constrained_beam_search",
    "embed_texts_with_backbone",
    "ground_texts",
    "load_backbone",
    "lora_config",
    "marginalize_environments",
    "naive_scores",
    "save_backbone",
    "score_candidates",
    "score_catalog",
    "score_pairs",
    "title_token_ids",
]
