"""DETR-style transformer for feature reconstruction (paper section 3.1, appendix A).

Post-norm encoder and decoder layers. A position embedding is added to the queries
and keys of *every* attention layer (never to the values), as in DETR's
``with_pos_embed``; the decoder's input is a learned auxiliary query embedding
rather than zeros. Attention runs through ``F.scaled_dot_product_attention`` so
fused kernels are used where the platform has them and are faster (see :func:`attention`).

The paper's Table-4 ablations live here too: :class:`ConcatProjection` (attention
replaced by concatenation + projection), ``query=None`` (no auxiliary query) and
:class:`ConvReconstructor` (a CNN of similar size instead of the transformer).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              dropout_p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs)) v for (B, nh, L, hs) tensors; ``mask`` True = may attend.

    The fused kernel of ``F.scaled_dot_product_attention`` everywhere except bf16 training
    on the CPU: there its backward pass took twice as long as plain matmul, softmax, matmul
    (23 vs 11 ms for 8 x 8 heads x 256 tokens on this project's 2-core machine), almost
    half of a training step.
    """
    if not (q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.requires_grad):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, nh, Lq, Lk)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    weights = F.dropout(torch.softmax(logits, dim=-1), dropout_p)
    return weights.to(v.dtype) @ v


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

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """query (B, Lq, D), key and value (B, Lk, D) -> (B, Lq, D); ``mask`` (Lq, Lk) bool, True = may attend."""
        b, lq, d = query.shape
        nh = self.num_heads
        q = self.q_proj(query).view(b, lq, nh, d // nh).transpose(1, 2)  # (B, nh, Lq, hs)
        k = self.k_proj(key).view(b, -1, nh, d // nh).transpose(1, 2)  # (B, nh, Lk, hs)
        v = self.v_proj(value).view(b, -1, nh, d // nh).transpose(1, 2)  # (B, nh, Lk, hs)
        p = self.dropout if self.training else 0.0
        y = attention(q, k, v, mask, p)  # (B, nh, Lq, hs)
        y = y.transpose(1, 2).reshape(b, lq, d)  # (B, Lq, D)
        return self.out_proj(y)


class ConcatProjection(nn.Module):
    """Drop-in for :class:`MultiHeadAttention` that mixes no tokens (Table 4, "w/o attention").

    Each output position sees only its own query and value, ``Linear(cat([q, v]))``,
    so removing attention removes all communication between tokens while keeping the
    position embedding (carried by the query) and a comparable layer shape.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(2 * dim, dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """query (B, Lq, D), key and value (B, Lk, D) with Lq == Lk -> (B, Lq, D); key and mask are unused."""
        if query.shape[1] != value.shape[1]:
            raise ValueError(
                f"ConcatProjection pairs positions one to one: query has {query.shape[1]} tokens, "
                f"value has {value.shape[1]}")
        return self.proj(torch.cat([query, value], dim=-1))  # (B, L, 2D) -> (B, L, D)


def make_attention(dim: int, num_heads: int, dropout: float, attention: bool) -> nn.Module:
    """Multi-head attention, or its token-local ablation when ``attention`` is False."""
    return MultiHeadAttention(dim, num_heads, dropout) if attention else ConcatProjection(dim)


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
    """Self-attention then FFN, each with residual and post-LayerNorm.

    ``attention=False`` swaps the attention for a :class:`ConcatProjection`.
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, *,
                 attention: bool = True) -> None:
        super().__init__()
        self.self_attn = make_attention(dim, num_heads, dropout, attention)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """src (B, L, D), pos (1, L, D), mask (L, L) or None -> (B, L, D)."""
        qk = src + pos
        src = self.norm1(src + self.dropout(self.self_attn(qk, qk, src, mask)))
        return self.norm2(src + self.dropout(self.ffn(src)))


class DecoderLayer(nn.Module):
    """Self-attention, cross-attention to the encoder output, FFN (post-norm).

    ``attention=False`` swaps both attentions for :class:`ConcatProjection`.
    """

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float, *,
                 attention: bool = True) -> None:
        super().__init__()
        self.self_attn = make_attention(dim, num_heads, dropout, attention)
        self.cross_attn = make_attention(dim, num_heads, dropout, attention)
        self.ffn = FeedForward(dim, ffn_dim, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """tgt (B, L, D), memory (B, L, D), pos (1, L, D), mask (L, L) or None -> (B, L, D)."""
        qk = tgt + pos
        tgt = self.norm1(tgt + self.dropout(self.self_attn(qk, qk, tgt, mask)))
        tgt = self.norm2(tgt + self.dropout(self.cross_attn(tgt + pos, memory + pos, memory, mask)))
        return self.norm3(tgt + self.dropout(self.ffn(tgt)))


class ReconstructionTransformer(nn.Module):
    """Encoder over the feature tokens, decoder fed by the auxiliary query (Eq. 1's f_hat).

    Args:
        dim: token width (paper: 256).
        num_heads: attention heads (8).
        num_encoder_layers: 4. num_decoder_layers: 4.
        ffn_dim: FFN hidden width (1024).
        dropout: dropout in attention and FFN (DETR's 0.1).
        attention: False replaces every attention by a :class:`ConcatProjection`
            (Table 4's "w/o attention": no token ever sees another).
    """

    def __init__(self, dim: int = 256, num_heads: int = 8, num_encoder_layers: int = 4,
                 num_decoder_layers: int = 4, ffn_dim: int = 1024, dropout: float = 0.1, *,
                 attention: bool = True) -> None:
        super().__init__()
        self.attention = attention
        self.encoder = nn.ModuleList(
            EncoderLayer(dim, num_heads, ffn_dim, dropout, attention=attention)
            for _ in range(num_encoder_layers))
        self.decoder = nn.ModuleList(
            DecoderLayer(dim, num_heads, ffn_dim, dropout, attention=attention)
            for _ in range(num_decoder_layers))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Xavier on every matrix, as DETR does.
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    @torch.no_grad()
    def align_cross_attention(self, last_only: bool = False) -> None:
        """Start every decoder cross-attention (or only the last one) with its key projection
        equal to its query projection: the logits' position term is then (W p_i) . (W p_j),
        largest for j = i when the position codes are nearly orthogonal, so the decoder reads
        its own cell from the first step instead of learning where to look from near-uniform
        attention (the long plateaus of DETR-style training)."""
        for layer in self.decoder[-1:] if last_only else self.decoder:
            if isinstance(layer.cross_attn, MultiHeadAttention):
                layer.cross_attn.k_proj.weight.copy_(layer.cross_attn.q_proj.weight)
                layer.cross_attn.k_proj.bias.copy_(layer.cross_attn.q_proj.bias)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, query: torch.Tensor | None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruct tokens.

        Args:
            tokens: (B, L, D) projected features.
            pos: (1, L, D) position embedding, added to q and k in every attention.
            query: (1, L, D) auxiliary query embedding, the decoder's input; ``None``
                feeds the decoder the encoder output instead (Table 4, "w/o query"),
                which lets it copy its input and so weakens the "identical shortcut" guard.
            mask: optional (L, L) bool, True where a token may attend to another, used by
                every attention (see :func:`neighbourhood_mask`).

        Returns:
            (B, L, D) reconstructed tokens.
        """
        memory = tokens
        for layer in self.encoder:
            memory = layer(memory, pos, mask)
        out = memory if query is None else query.expand(tokens.shape[0], -1, -1)
        for layer in self.decoder:
            out = layer(out, memory, pos, mask)
        return out


def token_cells(grid_size: int, dtype: torch.dtype = torch.long) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column, each (L,), of every token of a ``grid_size`` x ``grid_size`` grid in
    the row-major order of the flattened feature map."""
    coords = torch.arange(grid_size, dtype=dtype)
    return coords.repeat_interleave(grid_size), coords.repeat(grid_size)


def neighbourhood_mask(grid_size: int, size: int) -> torch.Tensor:
    """(L, L) bool attention mask for an ``grid_size`` x ``grid_size`` token grid that hides
    each token's ``size`` x ``size`` neighbourhood (itself included); True = may attend.

    UniAD's "neighbour-masked attention" (You et al., NeurIPS 2022): a token cannot read
    its own position or its neighbours, so it must be reconstructed from context and
    cannot simply be copied (the "identical shortcut"). ``size`` must be odd and smaller
    than the grid, so every token still sees something.
    """
    if size % 2 == 0 or size < 1 or size >= grid_size:
        raise ValueError(f"neighbourhood size must be odd and between 1 and {grid_size - 1}, not {size}")
    rows, cols = token_cells(grid_size)  # (L,) each
    r = size // 2
    near = ((rows[:, None] - rows[None, :]).abs() <= r) & ((cols[:, None] - cols[None, :]).abs() <= r)
    return ~near


def group_count(channels: int, max_groups: int = 32) -> int:
    """Largest divisor of ``channels`` not above ``max_groups`` (GroupNorm needs a divisor)."""
    return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-GN-ReLU-conv3x3-GN, plus identity skip, then ReLU.

    GroupNorm instead of BatchNorm so the block behaves the same at any batch size
    and in train and eval mode, like the transformer's LayerNorm.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(group_count(dim), dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(group_count(dim), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, D, h, w) -> (B, D, h, w)."""
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return F.relu(x + y)


class ConvReconstructor(nn.Module):
    """A stack of ResNet basic blocks in place of the transformer (Table 4, "CNN").

    Only local 3x3 mixing and no auxiliary query: the paper's baseline showing that
    a CNN of similar size reconstructs anomalies too well. Use
    :func:`matching_conv_blocks` for the number of blocks that matches a transformer.
    """

    def __init__(self, dim: int, num_blocks: int) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, not {num_blocks}")
        self.blocks = nn.Sequential(*(BasicBlock(dim) for _ in range(num_blocks)))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, D, h, w) -> (B, D, h, w)."""
        return self.blocks(x)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def matching_conv_blocks(dim: int, ffn_dim: int, num_encoder_layers: int, num_decoder_layers: int) -> int:
    """Number of :class:`ConvReconstructor` blocks whose size is closest to the transformer's.

    Both are built on the meta device (no memory, no init cost) and counted. At the
    paper's sizes (256, 1024, 4 + 4) this gives 6 blocks, 7.08M vs 7.37M parameters.
    """
    with torch.device("meta"):
        target = count_parameters(ReconstructionTransformer(
            dim, 1, num_encoder_layers, num_decoder_layers, ffn_dim, 0.0))
        per_block = count_parameters(BasicBlock(dim))
    return max(1, round(target / per_block))


def sincos_position_embedding(grid_size: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(1, grid_size**2, dim) 2-D sine-cosine position code (half the channels for rows,
    half for columns), as in DETR's ``PositionEmbeddingSine`` and MAE's fixed embedding.

    Used only to *initialise* the learned embedding (``pos_init='sincos'``): tokens then
    start out knowing where they are, instead of learning it from uniform noise.
    """
    if dim % 4:
        raise ValueError(f"sincos position embedding needs dim divisible by 4, not {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    rows, cols = token_cells(grid_size, torch.float64)
    rows, cols = rows[:, None] * omega, cols[:, None] * omega  # (L, dim/4) each
    emb = torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=1)  # (L, dim)
    return emb.float()[None]


def fourier_position_embedding(grid_size: int, dim: int, length_scale: float = 1.0,
                               generator: torch.Generator | None = None) -> torch.Tensor:
    """(1, grid_size**2, dim) random Fourier features of the cell coordinates:
    ``sqrt(2) cos(w . (row, col) + b)`` with ``w ~ N(0, I / length_scale**2)``, ``b ~ U(0, 2 pi)``.

    Like N(0, 1) codes, every channel has unit variance and distant cells start nearly
    orthogonal; unlike them, the expected cosine similarity of two cells is the Gaussian
    kernel ``exp(-d**2 / (2 length_scale**2))`` of their distance d in cells (0.61 for
    neighbours at the default scale), so attention that learns to read one cell starts out
    reading its neighbours too (Rahimi and Recht, 2007). Used only as an initial value.
    """
    w = torch.randn(dim, 2, generator=generator, dtype=torch.float64) / length_scale
    b = torch.rand(dim, generator=generator, dtype=torch.float64) * 2 * math.pi
    cells = torch.stack(token_cells(grid_size, torch.float64), dim=1)  # (L, 2)
    return (math.sqrt(2.0) * torch.cos(cells @ w.T + b)).float()[None]
