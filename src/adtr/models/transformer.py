"""DETR-style transformer for feature reconstruction (paper section 3.1, appendix A).

Post-norm encoder and decoder layers. A position embedding is added to the queries
and keys of *every* attention layer (never to the values), as in DETR's
``with_pos_embed``; the decoder's input is a learned auxiliary query embedding
rather than zeros. Attention runs through ``F.scaled_dot_product_attention`` so
fused kernels are used where the platform has them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate query, key and value inputs."""

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """query (B, Lq, D), key and value (B, Lk, D) -> (B, Lq, D)."""
        b, lq, d = query.shape
        nh = self.num_heads
        q = self.q_proj(query).view(b, lq, nh, d // nh).transpose(1, 2)  # (B, nh, Lq, hs)
        k = self.k_proj(key).view(b, -1, nh, d // nh).transpose(1, 2)  # (B, nh, Lk, hs)
        v = self.v_proj(value).view(b, -1, nh, d // nh).transpose(1, 2)  # (B, nh, Lk, hs)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, nh, Lq, hs)
        y = y.transpose(1, 2).reshape(b, lq, d)  # (B, Lq, D)
        return self.out_proj(y)


class FeedForward(nn.Module):
    """Position-wise FFN D -> hidden -> D with ReLU."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden)
        self.linear2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class EncoderLayer(nn.Module):
    """Self-attention then FFN, each with residual and post-LayerNorm."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(dim, num_heads, dropout)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """src (B, L, D), pos (1, L, D) -> (B, L, D)."""
        qk = src + pos
        src = self.norm1(src + self.dropout(self.self_attn(qk, qk, src)))
        return self.norm2(src + self.dropout(self.ffn(src)))


class DecoderLayer(nn.Module):
    """Self-attention, cross-attention to the encoder output, FFN (post-norm)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(dim, num_heads, dropout)
        self.cross_attn = MultiHeadAttention(dim, num_heads, dropout)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tgt (B, L, D), memory (B, L, D), pos (1, L, D) -> (B, L, D)."""
        qk = tgt + pos
        tgt = self.norm1(tgt + self.dropout(self.self_attn(qk, qk, tgt)))
        tgt = self.norm2(tgt + self.dropout(self.cross_attn(tgt + pos, memory + pos, memory)))
        return self.norm3(tgt + self.dropout(self.ffn(tgt)))


class ReconstructionTransformer(nn.Module):
    """Encoder over the feature tokens, decoder fed by the auxiliary query (Eq. 1's f_hat).

    Args:
        dim: token width (paper: 256).
        num_heads: attention heads (8).
        num_encoder_layers: 4. num_decoder_layers: 4.
        ffn_dim: FFN hidden width (1024).
        dropout: dropout in attention and FFN (DETR's 0.1).
    """

    def __init__(self, dim: int = 256, num_heads: int = 8, num_encoder_layers: int = 4,
                 num_decoder_layers: int = 4, ffn_dim: int = 1024, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = nn.ModuleList(
            EncoderLayer(dim, num_heads, ffn_dim, dropout) for _ in range(num_encoder_layers))
        self.decoder = nn.ModuleList(
            DecoderLayer(dim, num_heads, ffn_dim, dropout) for _ in range(num_decoder_layers))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Xavier on every matrix, as DETR does.
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Reconstruct tokens.

        Args:
            tokens: (B, L, D) projected features.
            pos: (1, L, D) position embedding, added to q and k in every attention.
            query: (1, L, D) auxiliary query embedding, the decoder's input.

        Returns:
            (B, L, D) reconstructed tokens.
        """
        memory = tokens
        for layer in self.encoder:
            memory = layer(memory, pos)
        out = query.expand(tokens.shape[0], -1, -1)
        for layer in self.decoder:
            out = layer(out, memory, pos)
        return out
