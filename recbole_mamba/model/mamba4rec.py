"""Mamba4Rec: Towards Efficient Sequential Recommendation with Selective State Space Models.

Chengkai Liu, Jianghao Lin, Jianling Wang, Hanzhou Liu, James Caverlee. arXiv 2403.03900 (2024).

Item embedding -> dropout -> LayerNorm -> ``num_layers`` x [Mamba block -> dropout
(-> + residual when num_layers > 1) -> LayerNorm -> position-wise FFN] -> the hidden state at the
last real item -> dot product with every item embedding. Module names follow the authors' code, so
their checkpoints' state dicts load here.

Training (``train_mode``): ``prefix`` scores the last position of each of RecBole's prefix rows;
``all_positions`` scores every real position of each window at once (the model is causal, so
position t sees only the items up to t), except the context-only positions of overlapping windows
(``window_stride``), which have no target. Losses: see :mod:`recbole_mamba.nn.losses`.
"""

import logging

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.model.loss import BPRLoss
from torch import nn

from recbole_mamba.config import MODEL_SAMPLED_LOSSES
from recbole_mamba.errors import UserInputError
from recbole_mamba.nn import losses
from recbole_mamba.nn.mamba_mixer import MambaMixer, check_scan_kernel, resolve_backend

LOSS_TYPES = ("CE", "BPR", "BCE", "SampledSoftmax")
# num_negatives when the config leaves it empty: one per position for the pairwise losses, a shared
# pool for the sampled softmax (which needs many to approximate the full one).
DEFAULT_NUM_NEGATIVES = {"BPR": 1, "BCE": 1, "SampledSoftmax": 256}


class Mamba4Rec(SequentialRecommender):
    r"""Mamba4Rec, a RecBole sequential recommender.

    Config keys (defaults in ``yaml/model/Mamba4Rec.yaml``): ``hidden_size``, ``num_layers``,
    ``dropout_prob``, ``loss_type`` (CE, BPR, BCE or SampledSoftmax), ``d_state``, ``d_conv``,
    ``expand``, ``mamba_backend`` (auto, cuda or torch), ``scan_kernel`` (auto, mamba_ssm or triton:
    the cuda backend's selective scan), ``negative_sampling``, ``num_negatives``,
    ``logq_correction``, ``ce_chunk_size``, ``ce_kernel``; and ``train_mode`` (``yaml/overall.yaml``).
    """

    supports_all_positions = True  # see recbole_mamba.data.preparation

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.check_config(config)
        self.hidden_size = config["hidden_size"]
        self.num_layers = config["num_layers"]
        self.dropout_prob = config["dropout_prob"]
        self.loss_type = config["loss_type"]
        self.train_mode = config["train_mode"]
        self.negative_sampling = config["negative_sampling"]
        self.num_negatives = config["num_negatives"] or DEFAULT_NUM_NEGATIVES.get(self.loss_type)
        self.logq_correction = config["logq_correction"]
        self.ce_chunk_size = config["ce_chunk_size"]
        self.ce_kernel = config["ce_kernel"]
        self.backend, description = resolve_backend(config["mamba_backend"], config["device"])
        logging.getLogger().info(f"Mamba backend: {description}")
        if self.loss_type == "CE" and self.train_mode == "all_positions":
            logging.getLogger().info(f"CE kernel: {losses.describe_ce_kernel(self.ce_kernel, config['device'])}")

        self.item_embedding = nn.Embedding(self.n_items, self.hidden_size, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(self.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(self.dropout_prob)
        self.mamba_layers = nn.ModuleList(
            MambaLayer(
                d_model=self.hidden_size,
                d_state=config["d_state"],
                d_conv=config["d_conv"],
                expand=config["expand"],
                dropout=self.dropout_prob,
                backend=self.backend,
                scan_kernel=config["scan_kernel"],
                **self.layer_options(config),
            )
            for _ in range(self.num_layers)
        )
        self.loss_fct = BPRLoss() if self.loss_type == "BPR" else nn.CrossEntropyLoss()
        # As published: normal(0, 0.02) on every Linear and Embedding, the Mamba block's included
        # (this overrides mamba-ssm's own dt_proj initialisation).
        self.apply(self._init_weights)

    @staticmethod
    def layer_options(config):
        """MambaLayer's residual / FFN choices: as published, a residual only around several layers."""
        return {"residual": config["num_layers"] > 1, "ffn": True}

    @staticmethod
    def check_config(config):
        """Reject hyperparameters the model cannot be built with, naming the key and valid range."""
        positive_ints = ("hidden_size", "num_layers", "d_state", "d_conv", "expand", "ce_chunk_size")
        for key in positive_ints:
            value = config[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserInputError(f"{key} must be an integer >= 1, got {value!r}.")
        dropout = config["dropout_prob"]
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise UserInputError(f"dropout_prob must be a number in [0, 1), got {dropout!r}.")
        check_scan_kernel(config["scan_kernel"])
        Mamba4Rec._check_loss_config(config)
        resolve_backend(config["mamba_backend"], config["device"])  # fails early if unusable

    @staticmethod
    def _check_loss_config(config):
        loss_type = config["loss_type"]
        if loss_type not in LOSS_TYPES:
            raise UserInputError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}.")
        recbole_negatives = config["train_neg_sample_args"].get("distribution") != "none"
        if loss_type == "BPR" and config["train_mode"] == "prefix" and not recbole_negatives:
            raise UserInputError(
                "loss_type BPR with train_mode prefix needs negative samples: set train_neg_sample_args, "
                "e.g. --train_neg_sample_args=\"{'distribution': 'uniform', 'sample_num': 1}\"."
            )
        if loss_type in MODEL_SAMPLED_LOSSES and recbole_negatives:
            raise UserInputError(
                f"loss_type {loss_type} draws its negatives inside the model (negative_sampling, "
                "num_negatives): remove train_neg_sample_args."
            )
        if config["ce_kernel"] not in losses.CE_KERNELS:
            raise UserInputError(f"ce_kernel must be one of {', '.join(losses.CE_KERNELS)}, got {config['ce_kernel']!r}.")
        if config["ce_kernel"] == "liger" and losses.liger_cross_entropy_missing(config["device"]):
            raise UserInputError(f"ce_kernel liger: {losses.liger_cross_entropy_missing(config['device'])}")
        if config["negative_sampling"] not in losses.NEGATIVE_SAMPLING:
            raise UserInputError(
                f"negative_sampling must be one of {', '.join(losses.NEGATIVE_SAMPLING)}, "
                f"got {config['negative_sampling']!r}."
            )
        negatives = config["num_negatives"]
        if negatives is not None and (not isinstance(negatives, int) or isinstance(negatives, bool) or negatives < 1):
            raise UserInputError(f"num_negatives must be empty (the loss's default) or an integer >= 1, got {negatives!r}.")
        if not isinstance(config["logq_correction"], bool):
            raise UserInputError(f"logq_correction must be true or false, got {config['logq_correction']!r}.")

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    def encode(self, item_seq, item_seq_len):
        """Hidden states (B, T, hidden_size) at every position (T = the batch's longest sequence on a
        CPU, and in evaluation)."""
        # RecBole pads on the right and the model is causal, so the columns after the batch's
        # longest sequence cannot change any output: skip them (short-history data such as the
        # Amazon sets is mostly padding at length 50, and most ml-1m users at length 8,192).
        # Not when training on a GPU: reading the maximum there waits for all queued work (a
        # host-device sync); in evaluation that wait is small against the columns saved.
        if not item_seq.is_cuda or not self.training:
            item_seq = item_seq[:, : int(item_seq_len.max())]
        hidden = self.LayerNorm(self.dropout(self.embed(item_seq)))
        for layer in self.mamba_layers:
            hidden = layer(hidden)
        return hidden

    def embed(self, item_seq):
        """The input of the first layer (before dropout and LayerNorm): the item embeddings."""
        return self.item_embedding(item_seq)

    def forward(self, item_seq, item_seq_len):
        """The hidden state at each sequence's last real item (position item_seq_len - 1)."""
        return self.gather_indexes(self.encode(item_seq, item_seq_len), item_seq_len - 1)

    def calculate_loss(self, interaction):
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        targets = interaction[self.POS_ITEM_ID]
        if self.train_mode == "all_positions":
            # A window: targets (B, L), the next item at each position, 0 at padding and at the
            # context-only positions of overlapping windows; score the real positions with a target.
            hidden = self.encode(item_seq, item_seq_len)
            targets = targets[:, : hidden.size(1)]
            positions = torch.arange(hidden.size(1), device=hidden.device)
            is_scored = (positions[None, :] < item_seq_len[:, None]) & (targets > 0)
            # One host-device sync (nonzero) for both gathers; index_select's backward needs none.
            scored = is_scored.reshape(-1).nonzero().squeeze(1)
            hidden = hidden.reshape(-1, hidden.size(-1)).index_select(0, scored)
            return self.position_loss(hidden, targets.reshape(-1).index_select(0, scored))

        seq_output = self.forward(item_seq, item_seq_len)
        if self.loss_type == "BPR":  # negatives from RecBole's dataloader, as in RecBole
            pos_score = (seq_output * self.item_embedding(targets)).sum(dim=-1)
            neg_score = (seq_output * self.item_embedding(interaction[self.NEG_ITEM_ID])).sum(dim=-1)
            return self.loss_fct(pos_score, neg_score)
        if self.loss_type == "CE":
            logits = seq_output @ self.item_embedding.weight.t()
            return self.loss_fct(logits, targets)
        return self.position_loss(seq_output, targets)

    def position_loss(self, hidden, targets):
        """The loss of (N, hidden_size) positions whose next items are ``targets`` (N,)."""
        if self.loss_type == "CE":
            return losses.chunked_cross_entropy(hidden, self.item_embedding.weight, targets, self.ce_chunk_size,
                                                self.ce_kernel)
        pos_scores = (hidden * self.item_embedding(targets)).sum(dim=-1)
        if self.loss_type == "SampledSoftmax":
            negatives = self.draw_negatives(targets, (self.num_negatives,))
            neg_scores = hidden @ self.item_embedding(negatives).t()
            log_q = {}
            if self.logq_correction and self.negative_sampling == "in_batch":
                log_q["log_q_pos"] = losses.in_batch_log_q(targets, targets, self.n_items)
                log_q["log_q_neg"] = losses.in_batch_log_q(targets, negatives, self.n_items)
            # (uniform negatives: every item's log q is the same, which cancels in the softmax)
            return losses.sampled_softmax_loss(pos_scores, neg_scores, targets, negatives, **log_q)
        negatives = self.draw_negatives(targets, (targets.numel(), self.num_negatives))
        neg_scores = torch.einsum("nd,nkd->nk", hidden, self.item_embedding(negatives))
        not_target = negatives != targets[:, None]
        if self.loss_type == "BPR":
            return losses.bpr_loss(pos_scores, neg_scores, not_target)
        return losses.bce_loss(pos_scores, neg_scores, not_target)

    def draw_negatives(self, targets, shape):
        """Negative item ids of ``shape`` for the positions whose targets are ``targets``."""
        return losses.sample_negatives(targets, shape, self.n_items, self.negative_sampling)

    def predict(self, interaction):
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return (seq_output * self.item_embedding(interaction[self.ITEM_ID])).sum(dim=-1)

    def full_sort_predict(self, interaction):
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return seq_output @ self.item_embedding.weight.t()


class MambaLayer(nn.Module):
    """Mamba block -> dropout (-> + input) -> LayerNorm (-> feed-forward).

    ``residual``: add the layer's input back (Mamba4Rec does only when it has several layers);
    ``ffn``: end with the position-wise feed-forward network (Mamba4Rec always does);
    ``scan_kernel``: the cuda backend's selective scan (see MambaMixer).
    """

    def __init__(self, d_model, d_state, d_conv, expand, dropout, residual, backend, scan_kernel="auto",
                 ffn=True):
        super().__init__()
        self.residual = residual
        self.mamba = MambaMixer(d_model, d_state=d_state, d_conv=d_conv, expand=expand, backend=backend,
                                scan_kernel=scan_kernel)
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(d_model, eps=1e-12)
        self.ffn = FeedForward(d_model, inner_size=4 * d_model, dropout=dropout) if ffn else nn.Identity()

    def forward(self, input_tensor):
        hidden = self.dropout(self.mamba(input_tensor))
        if self.residual:  # the paper drops the residual around a single layer
            hidden = hidden + input_tensor
        return self.ffn(self.LayerNorm(hidden))


class FeedForward(nn.Module):
    """Position-wise FFN: Linear -> GELU -> dropout -> Linear -> dropout -> LayerNorm(+ input)."""

    def __init__(self, d_model, inner_size, dropout):
        super().__init__()
        self.w_1 = nn.Linear(d_model, inner_size)
        self.w_2 = nn.Linear(inner_size, d_model)
        self.activation = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(d_model, eps=1e-12)

    def forward(self, input_tensor):
        hidden = self.dropout(self.activation(self.w_1(input_tensor)))
        hidden = self.dropout(self.w_2(hidden))
        return self.LayerNorm(hidden + input_tensor)

