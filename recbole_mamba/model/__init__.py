"""The plugin's recommenders, one per file (RecBole style)."""

from recbole_mamba.model.mamba4rec import Mamba4Rec
from recbole_mamba.model.recmamba import RecMamba
from recbole_mamba.model.sasrec_all_positions import SASRecAllPositions

__all__ = ["Mamba4Rec", "RecMamba", "SASRecAllPositions"]
