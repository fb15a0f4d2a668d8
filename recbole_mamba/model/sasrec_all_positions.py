"""SASRecAllPositions: RecBole's SASRec, unchanged, that also trains with ``train_mode: all_positions``.

For like-for-like comparisons with the plugin's models: the same transformer, parameters, config
keys and prefix-mode training as RecBole's ``SASRec`` (Kang & McAuley, ICDM 2018), plus the
all-position losses of :class:`~recbole_mamba.model.all_positions.AllPositionLosses` (CE in chunks,
BPR, BCE, SampledSoftmax). SASRec's attention is causal, so the hidden state at position t predicts
item t + 1 from the items up to t, as in the SASRec paper's own training.
"""

import contextlib

from recbole.model.sequential_recommender.sasrec import SASRec

from recbole_mamba.config import MODEL_SAMPLED_LOSSES
from recbole_mamba.errors import UserInputError
from recbole_mamba.model.all_positions import AllPositionLosses


class SASRecAllPositions(AllPositionLosses, SASRec):
    r"""RecBole's SASRec with all-position training.

    Config keys (defaults in ``yaml/model/SASRecAllPositions.yaml``): RecBole's SASRec keys
    (``n_layers``, ``n_heads``, ``hidden_size``, ``inner_size``, ``hidden_dropout_prob``,
    ``attn_dropout_prob``, ``hidden_act``, ``layer_norm_eps``, ``initializer_range``), ``loss_type``
    and the all-position keys of Mamba4Rec (``train_mode``, ``negative_sampling``,
    ``num_negatives``, ``logq_correction``, ``ce_chunk_size``, ``ce_kernel``).
    """

    def __init__(self, config, dataset):
        self.check_config(config)
        # RecBole's SASRec accepts only CE and BPR; the model-sampled losses exist in all_positions
        # mode only, where SASRec's own loss function is never called.
        with _loss_type_seen_by_recbole(config):
            super().__init__(config, dataset)
        self.init_losses(config)
        self._every_position = False

    @staticmethod
    def check_config(config):
        AllPositionLosses.check_loss_config(config)
        if config["loss_type"] in MODEL_SAMPLED_LOSSES and config["train_mode"] != "all_positions":
            raise UserInputError(
                f"loss_type {config['loss_type']} needs train_mode all_positions for SASRecAllPositions "
                "(in prefix mode it is RecBole's SASRec, which trains with CE or BPR)."
            )

    def encode(self, item_seq, item_seq_len):
        """Hidden states (B, L, hidden_size) at every position: RecBole's ``forward`` without its last gather."""
        self._every_position = True
        try:
            return self.forward(item_seq, item_seq_len)
        finally:
            self._every_position = False

    def gather_indexes(self, output, gather_index):
        # RecBole's forward ends with gather_indexes(output, item_seq_len - 1); encode() keeps all.
        if self._every_position:
            return output
        return super().gather_indexes(output, gather_index)

    def calculate_loss(self, interaction):
        if self.train_mode == "all_positions":
            return self.all_position_loss(interaction)
        return super().calculate_loss(interaction)


@contextlib.contextmanager
def _loss_type_seen_by_recbole(config):
    loss_type = config["loss_type"]
    if loss_type in MODEL_SAMPLED_LOSSES:
        config["loss_type"] = "CE"
    try:
        yield
    finally:
        config["loss_type"] = loss_type
