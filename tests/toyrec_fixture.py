"""A trivial plugin model used only by the registration tests (never shipped)."""

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.trainer import Trainer
from recbole.utils import InputType


class ToyRec(SequentialRecommender):
    """Scores items by a learned bias: enough to train, save, reload and evaluate."""

    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.bias = torch.nn.Parameter(torch.zeros(self.n_items))

    def calculate_loss(self, interaction):
        target = interaction[self.POS_ITEM_ID]
        logits = self.bias.unsqueeze(0).expand(len(target), -1)
        return torch.nn.functional.cross_entropy(logits, target)

    def predict(self, interaction):
        return self.bias[interaction[self.ITEM_ID]]

    def full_sort_predict(self, interaction):
        return self.bias.unsqueeze(0).expand(len(interaction[self.ITEM_SEQ]), -1).clone()


class ToyRecTrainer(Trainer):
    """Marks that RecBole picked the plugin trainer."""

    used = False

    def fit(self, *args, **kwargs):
        ToyRecTrainer.used = True
        return super().fit(*args, **kwargs)
