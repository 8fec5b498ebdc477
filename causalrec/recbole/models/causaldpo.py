"""CausalDPO: SFT, then S-DPO with a backdoor adjustment over environments and an invariance penalty."""

from causalrec.recbole.models.sdporec import SDPORec


class CausalDPO(SDPORec):
    """SFT then CausalDPO (``causalrec.training.CausalDPOTrainer``); its YAML (on top of SDPORec's) maps onto
    ``CausalDPOConfig``."""

    alignment = "causal_dpo"
    method_keys = SDPORec.method_keys + ("n_environments", "env_source", "tau", "invariance", "lambda_inv")
