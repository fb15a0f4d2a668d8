"""The plugin's recommenders, one per file (RecBole style)."""

from recbole_mamba.model.mamba4rec import Mamba4Rec

__all__ = ["Mamba4Rec"]
