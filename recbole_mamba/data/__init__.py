"""What the plugin adds to RecBole's data pipeline: input checks, and the windows of all-position training."""

from recbole_mamba.data.preparation import TRAIN_MODES, data_preparation

__all__ = ["TRAIN_MODES", "data_preparation"]
