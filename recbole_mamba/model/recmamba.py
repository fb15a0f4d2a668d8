"""RecMamba: Mamba blocks for lifelong sequential recommendation (histories of thousands of items).

After "Uncovering Selective State Space Model's Capabilities in Lifelong Sequential Recommendation"
(Jiyuan Yang, Yuanzi Li, Jingyu Zhao, Hanbing Wang, Muyang Ma, Jun Ma, Zhaochun Ren, Mengqi Zhang,
Xin Xin, Zhumin Chen, Pengjie Ren; arXiv 2403.16371, 2024), as a RecBole sequential recommender:

item embedding x sqrt(hidden_size) (+ a learned position embedding, ``position_embedding``) ->
dropout -> LayerNorm -> ``num_layers`` x Mamba4Rec's layer [Mamba block -> dropout (-> + residual,
``residual``) -> LayerNorm (-> FFN, ``ffn``)] -> the hidden state at each position.

It trains only with all-position losses (``train_mode: all_positions``; the losses of
:mod:`recbole_mamba.nn.losses`, chosen by ``loss_type`` as for Mamba4Rec) and, by default, on the
flat storage (``sequence_storage: flat``), so MAX_ITEM_LIST_LENGTH can be many thousands; it is
evaluated by RecBole's full ranking. Everything but the embedding and the layer options is
Mamba4Rec's code (losses, scoring, configuration checks).
"""

import math

import torch
from torch import nn

from recbole_mamba.errors import UserInputError
from recbole_mamba.model.mamba4rec import Mamba4Rec
from recbole_mamba.nn.embedding import embedding_lookup


class RecMamba(Mamba4Rec):
    r"""RecMamba, a RecBole sequential recommender for long histories.

    Config keys (defaults in ``yaml/model/RecMamba.yaml``): Mamba4Rec's, and ``position_embedding``
    (learned, MAX_ITEM_LIST_LENGTH positions), ``residual`` and ``ffn`` (Mamba4Rec's layer options).
    """

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.embedding_scale = math.sqrt(self.hidden_size)
        self.position_embedding = None
        if config["position_embedding"]:
            self.position_embedding = nn.Embedding(self.max_seq_length, self.hidden_size)
            self._init_weights(self.position_embedding)

    @staticmethod
    def layer_options(config):
        return {"residual": config["residual"], "ffn": config["ffn"]}

    @staticmethod
    def check_config(config):
        Mamba4Rec.check_config(config)
        for key in ("position_embedding", "residual", "ffn"):
            if not isinstance(config[key], bool):
                raise UserInputError(f"{key} must be true or false, got {config[key]!r}.")
        if config["train_mode"] != "all_positions":
            raise UserInputError(
                f"RecMamba trains with all-position losses only: train_mode must be all_positions, "
                f"got {config['train_mode']!r}."
            )

    def embed(self, item_seq):
        hidden = embedding_lookup(item_seq, self.item_embedding) * self.embedding_scale
        if self.position_embedding is not None:
            # Sequences are right-padded, so position p is the (p+1)-th item of every sequence.
            positions = torch.arange(item_seq.size(1), device=item_seq.device)
            hidden = hidden + self.position_embedding(positions)
        return hidden
