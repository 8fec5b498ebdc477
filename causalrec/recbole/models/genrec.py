"""GenRec: a generative recommender fine-tuned with SFT only (next item title given the purchase history)."""

from causalrec.recbole.models.llm_recommender import LLMRecommender


class GenRec(LLMRecommender):
    """SFT on prompt -> next title; ranks the catalog by exact title log-likelihood."""

    alignment = None
