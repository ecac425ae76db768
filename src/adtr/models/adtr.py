"""The ADTR model: features -> projection -> transformer -> reconstruction (section 3.1).

The backbone is kept outside :class:`ADTR` so that training can run on cached
features (the backbone is frozen, so its output for an image never changes).
:class:`ADTRDetector` glues both together for inference and export.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from adtr.config import CROSS_INITS, POS_INITS, RECONSTRUCTORS
from adtr.errors import AdtrError
from adtr.models.backbone import FrozenBackbone
from adtr.models.transformer import (ConvReconstructor, ReconstructionTransformer, matching_conv_blocks,
                                     fourier_position_embedding, neighbourhood_mask,
                                     sincos_position_embedding)


class ADTROutput(NamedTuple):
    """Model outputs, the same in train and eval mode.

    features: (B, C, h, w) target f. reconstruction: (B, C, h, w) f_hat.
    anomaly_map: (B, 1, h, w) s(u) = ||f(u) - f_hat(u)||_2 (Eq. 2-3), on the feature grid.
    """

    features: torch.Tensor
    reconstruction: torch.Tensor
    anomaly_map: torch.Tensor


class ADTR(nn.Module):
    """Reconstruct a (B, C, h, w) feature map from normal data only.

    Args:
        in_channels: C, channels of the concatenated backbone stages.
        grid_size: h = w, side of the feature grid; fixes the number of tokens.
        dim, num_heads, num_encoder_layers, num_decoder_layers, ffn_dim, dropout:
            transformer sizes (paper: 256, 8, 4, 4, 1024).
        error_space: ``features`` measures the error in the backbone's own units, as
            Eq. 1-3 do; ``standardized`` divides each channel's error by its training
            standard deviation, so every channel weighs the same.
        reconstructor: one of :data:`RECONSTRUCTORS`, the network between the input
            and output projections. ``transformer`` is the paper's model;
            the others are its Table-4 ablations, kept to measure why it works:
            ``no-attention`` replaces every attention by concatenation + projection
            (no token mixing); ``no-query`` drops ``query_embed`` and feeds the
            decoder the encoder output; ``cnn`` replaces the transformer (and both
            embeddings) by :class:`ConvReconstructor` ResNet blocks of about the same
            parameter count, stored as ``self.cnn``. The default keeps the state-dict
            keys of earlier checkpoints.
        neighbour_mask: 0 (paper) or an odd size k: every attention hides each token's
            k x k neighbourhood, so a cell is reconstructed from context only (UniAD).
        jitter: 0 (paper) or UniAD's feature-jitter scale: in training, Gaussian noise
            with per-token standard deviation ``jitter * ||token|| / D`` is added to the
            projected tokens, so the network learns to denoise rather than to copy.
        pos_init: the learned position embedding's initial value: ``uniform`` on [0, 1]
            (DETR's), ``sincos`` (a 2-D sine-cosine code), ``normal`` (N(0, 1), as the
            query embedding) or ``fourier`` (random Fourier features of the cell's row and
            column). Uniform codes share a mean of 0.5 in every channel, so any two
            positions start with cosine similarity about 0.75, and sine codes of nearby
            positions are nearly as alike; normal codes start nearly orthogonal, and Fourier
            codes too, except that neighbouring cells start alike (cosine 0.61).
        cross_init: ``independent`` (DETR's: Xavier for every projection) or ``aligned``:
            each decoder cross-attention's key projection starts as a copy of its query
            projection, so a query first attends to the memory tokens whose position code
            is most like its own, its own cell (both are trained freely afterwards);
            ``aligned-last`` does so in the last decoder layer only, the one that training
            with independent projections turns to the own cell first.
        cells_per_token: p, the side of the square of grid cells one token stands for
            (1 in the paper). With p > 1 the input projection embeds each p x p block of
            cells as one token and the output projection predicts the block back, as a
            ViT patch embedding does: a finer grid (stride 8) keeps a 16 x 16 token grid
            and the cost of attention, and the map keeps the finer grid's resolution.

    The buffers ``feature_mean`` and ``feature_std`` (per channel, set from the
    training features by :meth:`set_feature_stats`) standardise the transformer's
    input and de-standardise its output. With ``error_space='features'`` this is a
    reparametrisation that leaves the model's function class and the loss unchanged,
    but the projections no longer have to learn feature scales of 5-30 from unit-scale
    LayerNorm outputs, which is what made the paper's schedule so slow.
    """

    def __init__(self, in_channels: int, grid_size: int, dim: int = 256, num_heads: int = 8,
                 num_encoder_layers: int = 4, num_decoder_layers: int = 4, ffn_dim: int = 1024,
                 dropout: float = 0.1, error_space: str = "features", reconstructor: str = "transformer",
                 neighbour_mask: int = 0, jitter: float = 0.0, pos_init: str = "uniform",
                 cells_per_token: int = 1, cross_init: str = "independent") -> None:
        super().__init__()
        if error_space not in ("features", "standardized"):
            raise ValueError(f"error_space must be 'features' or 'standardized', not {error_space!r}")
        if reconstructor not in RECONSTRUCTORS:
            raise ValueError(f"reconstructor must be one of {', '.join(RECONSTRUCTORS)}, not {reconstructor!r}")
        if pos_init not in POS_INITS:
            raise ValueError(f"pos_init must be one of {', '.join(POS_INITS)}, not {pos_init!r}")
        if cross_init not in CROSS_INITS:
            raise ValueError(f"cross_init must be one of {', '.join(CROSS_INITS)}, not {cross_init!r}")
        if jitter < 0:
            raise ValueError(f"jitter must be >= 0, not {jitter}")
        if neighbour_mask and reconstructor in ("cnn", "no-attention"):
            raise ValueError(f"neighbour_mask needs attention; the {reconstructor!r} reconstructor has none")
        if cells_per_token < 1 or grid_size % cells_per_token:
            raise ValueError(f"cells_per_token must be >= 1 and divide the {grid_size}x{grid_size} feature grid, "
                             f"not {cells_per_token}")
        self.grid_size = grid_size
        self.cells_per_token = cells_per_token
        token_grid = grid_size // cells_per_token
        self.jitter = jitter
        self.error_space = error_space
        self.reconstructor = reconstructor
        self.register_buffer("feature_mean", torch.zeros(1, in_channels, 1, 1))
        self.register_buffer("feature_std", torch.ones(1, in_channels, 1, 1))
        p = cells_per_token
        self.input_proj = nn.Conv2d(in_channels, dim, kernel_size=p, stride=p)  # p x p cells -> one token
        self.output_proj = nn.Conv2d(dim, in_channels * p * p, kernel_size=1)  # one token -> p x p cells
        if reconstructor == "cnn":
            self.cnn = ConvReconstructor(
                dim, matching_conv_blocks(dim, ffn_dim, num_encoder_layers, num_decoder_layers))
        else:
            num_tokens = token_grid * token_grid
            self.pos_embed = nn.Parameter(torch.empty(1, num_tokens, dim))
            computed_codes = {"sincos": sincos_position_embedding, "fourier": fourier_position_embedding}
            if pos_init in computed_codes:
                with torch.no_grad():
                    self.pos_embed.copy_(computed_codes[pos_init](token_grid, dim))
            elif pos_init == "normal":
                nn.init.normal_(self.pos_embed)  # as the query embedding: nearly orthogonal codes
            else:
                nn.init.uniform_(self.pos_embed)  # DETR's nn.Embedding-style tables, init as in its learned PE
            if reconstructor != "no-query":
                self.query_embed = nn.Parameter(torch.empty(1, num_tokens, dim))
                nn.init.normal_(self.query_embed)
            # Not a buffer: derived from the config, so checkpoints keep their keys.
            self.attn_mask = neighbourhood_mask(token_grid, neighbour_mask) if neighbour_mask else None
            self.transformer = ReconstructionTransformer(
                dim, num_heads, num_encoder_layers, num_decoder_layers, ffn_dim, dropout,
                attention=reconstructor != "no-attention")
            if cross_init in ("aligned", "aligned-last"):
                self.transformer.align_cross_attention(last_only=cross_init == "aligned-last")

    @torch.no_grad()
    def set_feature_stats(self, features: torch.Tensor) -> None:
        """Per-channel mean and std of training features (N, C, h, w), computed in chunks."""
        n, total, total_sq = 0, 0.0, 0.0
        for i in range(0, len(features), 64):
            x = features[i:i + 64].double()
            total = total + x.sum(dim=(0, 2, 3))
            total_sq = total_sq + x.pow(2).sum(dim=(0, 2, 3))
            n += x.shape[0] * x.shape[2] * x.shape[3]
        mean = total / n
        std = (total_sq / n - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-3)
        self.feature_mean.copy_(mean.view(1, -1, 1, 1))
        self.feature_std.copy_(std.view(1, -1, 1, 1))

    def forward(self, features: torch.Tensor) -> ADTROutput:
        """features (B, C, h, w) -> :class:`ADTROutput`."""
        b, c, h, w = features.shape
        if (h, w) != (self.grid_size, self.grid_size):
            raise AdtrError(
                f"feature grid {h}x{w} does not match the model's {self.grid_size}x{self.grid_size}: "
                f"use the image size the model was trained with")
        x = self.input_proj((features - self.feature_mean) / self.feature_std)  # (B, D, h/p, w/p)
        if self.training and self.jitter > 0:
            scale = torch.linalg.vector_norm(x, dim=1, keepdim=True) / x.shape[1]  # (B, 1, h/p, w/p)
            x = x + torch.randn_like(x) * scale * self.jitter
        if self.reconstructor == "cnn":
            out = self.cnn(x)  # (B, D, h/p, w/p)
        else:
            tokens = x.flatten(2).transpose(1, 2)  # (B, h*w/p^2, D)
            query = None if self.reconstructor == "no-query" else self.query_embed
            mask = None if self.attn_mask is None else self.attn_mask.to(tokens.device)
            out = self.transformer(tokens, self.pos_embed, query, mask)  # (B, h*w/p^2, D)
            out = out.transpose(1, 2).reshape(b, -1, *x.shape[-2:])  # (B, D, h/p, w/p)
        out = self.output_proj(out)  # (B, C*p*p, h/p, w/p)
        if self.cells_per_token > 1:
            out = F.pixel_shuffle(out, self.cells_per_token)  # (B, C, h, w)
        recon = out * self.feature_std + self.feature_mean  # (B, C, h, w)
        diff = (features - recon).float()
        if self.error_space == "standardized":
            diff = diff / self.feature_std
        amap = torch.linalg.vector_norm(diff, dim=1, keepdim=True)  # (B, 1, h, w)
        return ADTROutput(features, recon, amap)


def reconstruction_loss(output: ADTROutput) -> torch.Tensor:
    """L_norm (Eq. 1): ||f - f_hat||^2 per grid cell (the squared anomaly map), averaged."""
    return output.anomaly_map.pow(2).mean()


class ADTRDetector(nn.Module):
    """Backbone + ADTR: images (B, 3, H, W) in [0, 1] -> :class:`ADTROutput`."""

    def __init__(self, backbone: FrozenBackbone, model: ADTR) -> None:
        super().__init__()
        self.backbone = backbone
        self.model = model

    def forward(self, images: torch.Tensor) -> ADTROutput:
        return self.model(self.backbone(images))
