"""Training with a loss at every position of a window (``train_mode: all_positions``).

:class:`AllPositionLosses` is mixed into a RecBole sequential recommender whose ``encode(item_seq,
item_seq_len)`` returns the hidden state at every position (B, T, hidden): the model is causal, so
position t has seen only the items up to t and predicts item t + 1. It adds the losses of
:mod:`recbole_mamba.nn.losses` over every real position with a target (``loss_type`` CE, BPR, BCE or
SampledSoftmax), their configuration keys and checks, and the flag that lets the plugin's config
accept ``train_mode: all_positions`` for the model (``supports_all_positions``). In ``prefix`` mode
the model trains as it would without the mixin.
"""

import logging

import torch

from recbole_mamba.config import MODEL_SAMPLED_LOSSES
from recbole_mamba.errors import UserInputError, is_int
from recbole_mamba.nn import losses

LOSS_TYPES = ("CE", "BPR", "BCE", "SampledSoftmax")
# num_negatives when the config leaves it empty: one per position for the pairwise losses, a shared
# pool for the sampled softmax (which needs many to approximate the full one).
DEFAULT_NUM_NEGATIVES = {"BPR": 1, "BCE": 1, "SampledSoftmax": 256}


class AllPositionLosses:
    """Mixin: all-position training for a causal RecBole sequential recommender (see the module docstring).

    Config keys: ``loss_type``, ``train_mode``, ``negative_sampling``, ``num_negatives``,
    ``logq_correction``, ``ce_chunk_size``, ``ce_kernel``. Call :meth:`init_losses` in ``__init__``
    and :meth:`check_loss_config` in the model's config check.
    """

    supports_all_positions = True  # see recbole_mamba.data.preparation

    def init_losses(self, config):
        self.loss_type = config["loss_type"]
        self.train_mode = config["train_mode"]
        self.negative_sampling = config["negative_sampling"]
        self.num_negatives = config["num_negatives"] or DEFAULT_NUM_NEGATIVES.get(self.loss_type)
        self.logq_correction = config["logq_correction"]
        self.ce_chunk_size = config["ce_chunk_size"]
        self.ce_kernel = config["ce_kernel"]
        if self.loss_type == "CE" and self.train_mode == "all_positions":
            logging.getLogger().info(f"CE kernel: {losses.describe_ce_kernel(self.ce_kernel, config['device'])}")

    @staticmethod
    def check_loss_config(config):
        """Reject loss settings the model cannot train with, naming the key and the valid values."""
        loss_type = config["loss_type"]
        if loss_type not in LOSS_TYPES:
            raise UserInputError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}.")
        chunk = config["ce_chunk_size"]
        if not is_int(chunk) or chunk < 1:
            raise UserInputError(f"ce_chunk_size must be an integer >= 1, got {chunk!r}.")
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
        if missing := losses.ce_kernel_missing(config["ce_kernel"], config["device"]):
            raise UserInputError(f"ce_kernel {config['ce_kernel']}: {missing}")
        if config["negative_sampling"] not in losses.NEGATIVE_SAMPLING:
            raise UserInputError(
                f"negative_sampling must be one of {', '.join(losses.NEGATIVE_SAMPLING)}, "
                f"got {config['negative_sampling']!r}."
            )
        negatives = config["num_negatives"]
        if negatives is not None and (not is_int(negatives) or negatives < 1):
            raise UserInputError(f"num_negatives must be empty (the loss's default) or an integer >= 1, got {negatives!r}.")
        if not isinstance(config["logq_correction"], bool):
            raise UserInputError(f"logq_correction must be true or false, got {config['logq_correction']!r}.")

    def all_position_loss(self, interaction):
        """The loss of a batch of windows: targets (B, L), the next item at each position, 0 at
        padding and at the context-only positions of overlapping windows; every real position with
        a target is scored."""
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        hidden = self.encode(item_seq, item_seq_len)
        targets = interaction[self.POS_ITEM_ID][:, : hidden.size(1)]
        positions = torch.arange(hidden.size(1), device=hidden.device)
        is_scored = (positions[None, :] < item_seq_len[:, None]) & (targets > 0)
        if self.loss_type == "CE" and losses.skips_negative_targets(self.ce_kernel, hidden.device):
            # Unscored positions marked, not gathered away: no wait for the GPU in the whole step.
            return self.position_loss(hidden.reshape(-1, hidden.size(-1)), torch.where(is_scored, targets, -1).reshape(-1))
        # One host-device sync (nonzero) for both gathers; index_select's backward needs none.
        scored = is_scored.reshape(-1).nonzero().squeeze(1)
        hidden = hidden.reshape(-1, hidden.size(-1)).index_select(0, scored)
        return self.position_loss(hidden, targets.reshape(-1).index_select(0, scored))

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
