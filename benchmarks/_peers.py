"""Encoders the length sweep compares, all at the same width and depth.

- ``mamba_encoder``: Mamba4Rec's layers (the plugin's own modules).
- ``sasrec_encoder``: RecBole's SASRec encoder with the attention mask SASRec builds per batch.
- ``FlashTransformer``: a causal post-LayerNorm transformer of the same size whose attention is
  ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``, which dispatches to
  flash / memory-efficient kernels: the strongest attention peer a user would pick.

Each takes and returns (batch, length, hidden) and is causal.
"""

import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.model.layers import TransformerEncoder
from torch import nn

from recbole_mamba.model.mamba4rec import MambaLayer


def mamba_encoder(hidden, layers, backend, dropout, d_state=32, d_conv=4, expand=2):
    return nn.Sequential(*(
        MambaLayer(hidden, d_state, d_conv, expand, dropout, residual=layers > 1, backend=backend)
        for _ in range(layers)
    ))


class SASRecEncoder(nn.Module):
    """RecBole's TransformerEncoder, fed the float mask SASRec.get_attention_mask builds."""

    def __init__(self, hidden, layers, heads, inner, dropout):
        super().__init__()
        self.encoder = TransformerEncoder(n_layers=layers, n_heads=heads, hidden_size=hidden,
                                          inner_size=inner, hidden_dropout_prob=dropout,
                                          attn_dropout_prob=dropout, hidden_act="gelu", layer_norm_eps=1e-12)

    def forward(self, hidden):
        # SASRec builds its mask from the item ids; a full window has no padding.
        item_seq = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        mask = SequentialRecommender.get_attention_mask(None, item_seq)
        return self.encoder(hidden, mask, output_all_encoded_layers=False)[-1]


class FlashBlock(nn.Module):
    def __init__(self, hidden, heads, inner, dropout):
        super().__init__()
        self.heads, self.dropout_p = heads, dropout
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, inner), nn.GELU(), nn.Linear(inner, hidden))
        self.norm1, self.norm2 = nn.LayerNorm(hidden, eps=1e-12), nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        b, length, d = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                              dropout_p=self.dropout_p if self.training else 0.0)
        x = self.norm1(x + self.dropout(self.proj(attn.transpose(1, 2).reshape(b, length, d))))
        return self.norm2(x + self.dropout(self.ffn(x)))


class FlashTransformer(nn.Sequential):
    def __init__(self, hidden, layers, heads, inner, dropout):
        super().__init__(*(FlashBlock(hidden, heads, inner, dropout) for _ in range(layers)))
