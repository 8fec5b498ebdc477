"""Training layer: TRL stages for generative recommenders (SFT, S-DPO, CausalDPO). Knows TRL, not RecBole.

- ``sft``: ``make_sft_dataset``, ``build_sft_config``, ``run_sft`` (TRL SFTTrainer, completion-only loss).
- ``sdpo_config`` + ``sdpo_trainer``: ``SDPOConfig`` + ``SDPOTrainer`` (multi-negative DPO on TRL's DPOTrainer),
  ``make_preference_dataset``.
- ``causal_dpo_config`` + ``causal_dpo_trainer``: ``CausalDPOConfig`` + ``CausalDPOTrainer`` (backdoor adjustment, environments, invariance).
- ``environments``: pure-torch assignments, risks, backdoor weights and penalties.
- ``records``: ``PreferenceRecord`` -> datasets with ``causalrec.data.prompts``.
- ``trl_compat``: the only place that touches TRL internals.
"""

from causalrec.training.causal_dpo_config import CausalDPOConfig
from causalrec.training.causal_dpo_trainer import CausalDPOTrainer
from causalrec.training.environments import EnvironmentModel
from causalrec.training.records import PreferenceRecord, preference_dataset, sft_dataset
from causalrec.training.sdpo_config import SDPOConfig
from causalrec.training.sdpo_trainer import DataCollatorForMultiPreference, SDPOTrainer, make_preference_dataset
from causalrec.training.sft import InvariantSFTTrainer, build_sft_config, make_sft_dataset, run_sft

__all__ = [
    "CausalDPOConfig",
    "CausalDPOTrainer",
    "DataCollatorForMultiPreference",
    "EnvironmentModel",
    "InvariantSFTTrainer",
    "PreferenceRecord",
    "SDPOConfig",
    "SDPOTrainer",
    "build_sft_config",
    "make_preference_dataset",
    "make_sft_dataset",
    "preference_dataset",
    "run_sft",
    "sft_dataset",
]
