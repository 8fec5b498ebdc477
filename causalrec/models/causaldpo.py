"""CausalDPO: SFT, then S-DPO with a backdoor adjustment over environments and an invariance penalty."""

from causalrec.models.llm_recommender import LLMRecommender


class CausalDPO(LLMRecommender):
    """SFT then CausalDPO (``causalrec.training.CausalDPOTrainer``); the YAML keys below map onto ``CausalDPOConfig``."""

    alignment = "causal_dpo"
    method_keys = ("beta", "num_negatives", "n_environments", "env_source", "tau", "invariance", "lambda_inv")
