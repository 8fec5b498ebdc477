"""SDPORec: SFT, then S-DPO (DPO with several sampled rejected items per prompt)."""

from causalrec.recbole.models.llm_recommender import LLMRecommender


class SDPORec(LLMRecommender):
    """SFT then S-DPO (``causalrec.training.SDPOTrainer``); the YAML keys below map onto ``SDPOConfig``."""

    alignment = "sdpo"
    method_keys = ("beta", "num_negatives")
