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

from recbole_mamba.errors import UserInputError, is_int
from recbole_mamba.model.all_positions import AllPositionLosses
from recbole_mamba.nn.cuda_graph import GraphedTraining
from recbole_mamba.nn.embedding import embedding_lookup
from recbole_mamba.nn.fused import dropout_add_layer_norm, gelu_dropout
from recbole_mamba.nn.mamba_mixer import MambaMixer, check_scan_kernel, resolve_backend


class Mamba4Rec(AllPositionLosses, SequentialRecommender):
    r"""Mamba4Rec, a RecBole sequential recommender.

    Config keys (defaults in ``yaml/model/Mamba4Rec.yaml``): ``hidden_size``, ``num_layers``,
    ``dropout_prob``, ``loss_type`` (CE, BPR, BCE or SampledSoftmax), ``d_state``, ``d_conv``,
    ``expand``, ``mamba_backend`` (auto, cuda or torch), ``scan_kernel`` (auto, mamba_ssm or triton:
    the cuda backend's selective scan), ``negative_sampling``, ``num_negatives``,
    ``logq_correction``, ``ce_chunk_size``, ``ce_kernel``, ``cuda_graph`` (training steps on a GPU
    replayed as CUDA graphs, :mod:`recbole_mamba.nn.cuda_graph`), ``recompute_scan_inputs`` (the Triton
    scan's inputs recomputed in the backward, :mod:`recbole_mamba.nn.triton_mixer`); and ``train_mode``
    (``yaml/overall.yaml``).
    """

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.check_config(config)
        self.hidden_size = config["hidden_size"]
        self.num_layers = config["num_layers"]
        self.dropout_prob = config["dropout_prob"]
        self.cuda_graph = bool(config["cuda_graph"])
        self.eval_slice_tokens = config["eval_slice_tokens"]  # absent (None): no slices
        self._training_graph = None  # built at the first training step on a GPU, when cuda_graph is on
        self.init_losses(config)
        self.backend, description = resolve_backend(config["mamba_backend"], config["device"])
        logging.getLogger().info(f"Mamba backend: {description}")

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
                recompute_scan_inputs=bool(config["recompute_scan_inputs"]),
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
        positive_ints = ("hidden_size", "num_layers", "d_state", "d_conv", "expand")
        for key in positive_ints:
            value = config[key]
            if not is_int(value) or value < 1:
                raise UserInputError(f"{key} must be an integer >= 1, got {value!r}.")
        tokens = config["eval_slice_tokens"]
        if tokens is not None and (not is_int(tokens) or tokens < 1):
            raise UserInputError(f"eval_slice_tokens must be an integer >= 1, or ~ for no slices, got {tokens!r}.")
        for key in ("cuda_graph", "recompute_scan_inputs"):  # absent (None): off
            if config[key] is not None and not isinstance(config[key], bool):
                raise UserInputError(f"{key} must be true or false, got {config[key]!r}.")
        dropout = config["dropout_prob"]
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise UserInputError(f"dropout_prob must be a number in [0, 1), got {dropout!r}.")
        check_scan_kernel(config["scan_kernel"])
        Mamba4Rec.check_loss_config(config)
        resolve_backend(config["mamba_backend"], config["device"])  # fails early if unusable

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
        # Only the cuda backend is capturable: the torch backend's scan checks its inputs on the host.
        if self.cuda_graph and self.backend == "cuda":
            if self._training_graph is None:
                self._training_graph = GraphedTraining(self, self._encode_columns)
            if self._training_graph.covers(item_seq):
                return self._training_graph(item_seq)
        if not item_seq.is_cuda or not self.training:
            item_seq = item_seq[:, : int(item_seq_len.max())]
        return self._encode_columns(item_seq)

    def _encode_columns(self, item_seq):
        """Hidden states at every column of ``item_seq``."""
        hidden = dropout_add_layer_norm(self.embed(item_seq), None, self.dropout, self.LayerNorm)
        for layer in self.mamba_layers:
            hidden = layer(hidden)
        return hidden

    def embed(self, item_seq):
        """The input of the first layer (before dropout and LayerNorm): the item embeddings."""
        return embedding_lookup(item_seq, self.item_embedding)

    def forward(self, item_seq, item_seq_len):
        """The hidden state at each sequence's last real item (position item_seq_len - 1).

        In evaluation the histories are encoded in slices of at most ``eval_slice_tokens`` positions:
        inference holds one layer's activations at a time, but for every history of the batch, so
        without slices eval_batch_size x the longest history would set the run's peak memory.
        """
        if not self.training and self.eval_slice_tokens:
            rows = max(1, self.eval_slice_tokens // int(item_seq_len.max()))
            if rows < item_seq.size(0):
                return torch.cat([self.forward_unsliced(seqs, lengths)
                                  for seqs, lengths in zip(item_seq.split(rows), item_seq_len.split(rows))])
        return self.forward_unsliced(item_seq, item_seq_len)

    def forward_unsliced(self, item_seq, item_seq_len):
        """:meth:`forward` on the whole batch at once."""
        return self.gather_indexes(self.encode(item_seq, item_seq_len), item_seq_len - 1)

    def calculate_loss(self, interaction):
        if self.train_mode == "all_positions":
            return self.all_position_loss(interaction)
        item_seq, item_seq_len = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        targets = interaction[self.POS_ITEM_ID]
        seq_output = self.forward(item_seq, item_seq_len)
        if self.loss_type == "BPR":  # negatives from RecBole's dataloader, as in RecBole
            pos_score = (seq_output * self.item_embedding(targets)).sum(dim=-1)
            neg_score = (seq_output * self.item_embedding(interaction[self.NEG_ITEM_ID])).sum(dim=-1)
            return self.loss_fct(pos_score, neg_score)
        if self.loss_type == "CE":
            logits = seq_output @ self.item_embedding.weight.t()
            return self.loss_fct(logits, targets)
        return self.position_loss(seq_output, targets)

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
    ``scan_kernel``, ``recompute_scan_inputs``: the cuda backend's selective scan (see MambaMixer).
    """

    def __init__(self, d_model, d_state, d_conv, expand, dropout, residual, backend, scan_kernel="auto",
                 ffn=True, recompute_scan_inputs=False):
        super().__init__()
        self.residual = residual
        self.mamba = MambaMixer(d_model, d_state=d_state, d_conv=d_conv, expand=expand, backend=backend,
                                scan_kernel=scan_kernel, recompute_scan_inputs=recompute_scan_inputs)
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(d_model, eps=1e-12)
        self.ffn = FeedForward(d_model, inner_size=4 * d_model, dropout=dropout) if ffn else nn.Identity()

    def forward(self, input_tensor):
        # The paper drops the residual around a single layer.
        residual = input_tensor if self.residual else None
        return self.ffn(dropout_add_layer_norm(self.mamba(input_tensor), residual, self.dropout, self.LayerNorm))


class FeedForward(nn.Module):
    """Position-wise FFN: Linear -> GELU -> dropout -> Linear -> dropout -> LayerNorm(+ input)."""

    def __init__(self, d_model, inner_size, dropout):
        super().__init__()
        self.w_1 = nn.Linear(d_model, inner_size)
        self.w_2 = nn.Linear(inner_size, d_model)
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(d_model, eps=1e-12)

    def forward(self, input_tensor):
        hidden = gelu_dropout(self.w_1(input_tensor), self.dropout)
        return dropout_add_layer_norm(self.w_2(hidden), input_tensor, self.dropout, self.LayerNorm)

