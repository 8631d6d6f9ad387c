"""AtmoRep-style masked token model: a transformer encoder over space-time tokens.

Each token (one channel, `token_shape` grid values) is embedded by a linear projection.
Its embedding is the sum of that projection and:

- learned position embeddings along time, latitude and longitude tokens,
- a learned embedding of its channel (variable and level),
- a linear projection of the time features (sin/cos of hour of day and day of year)
  averaged over the token's time steps,
- a learned mask embedding if the token is masked.

All tokens of all channels attend to each other in a pre-norm transformer encoder, and
a linear decoder maps every token back to its grid values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import ModelConfig
from models.tokens import detokenise, token_mean, tokenise

TIME_FEATURES = 4


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then x + mlp(norm(x)).  x: [B, L, D]."""

    def __init__(self, embed_dim: int, num_heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.attention_norm = nn.LayerNorm(embed_dim)
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.attention_out = nn.Linear(embed_dim, embed_dim)
        self.mlp_norm = nn.LayerNorm(embed_dim)
        hidden = int(embed_dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, embed_dim),
            nn.Dropout(dropout),
        )

    def _attention(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, L, D / heads]
        attended = F.scaled_dot_product_attention(
            query, key, value, dropout_p=self.dropout if self.training else 0.0
        )
        return self.attention_out(attended.transpose(1, 2).reshape(batch, length, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self._attention(self.attention_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class AtmoRep(nn.Module):
    """Masked token model over fields `[B, C, T, H, W]` of the shape in `config`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.token_shape = tuple(config.token_shape)
        self.grid_tokens = config.grid_tokens
        n_time, n_lat, n_lon = self.grid_tokens
        token_size = self.token_shape[0] * self.token_shape[1] * self.token_shape[2]
        dim = config.embed_dim

        self.token_embedding = nn.Linear(token_size, dim)
        self.time_position = nn.Parameter(torch.zeros(n_time, dim))
        self.latitude_position = nn.Parameter(torch.zeros(n_lat, dim))
        self.longitude_position = nn.Parameter(torch.zeros(n_lon, dim))
        self.channel_embedding = nn.Parameter(torch.zeros(config.num_channels, dim))
        self.time_feature_embedding = nn.Linear(TIME_FEATURES, dim)
        self.mask_embedding = nn.Parameter(torch.zeros(dim))
        self.embedding_dropout = nn.Dropout(config.dropout)

        self.blocks = nn.ModuleList(
            TransformerBlock(dim, config.num_heads, config.mlp_ratio, config.dropout)
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.decoder = nn.Linear(dim, token_size)
        self._init_weights()

    def _init_weights(self) -> None:
        for parameter in (
            self.time_position,
            self.latitude_position,
            self.longitude_position,
            self.channel_embedding,
            self.mask_embedding,
        ):
            nn.init.trunc_normal_(parameter, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def _check_inputs(self, x: Tensor, mask: Tensor, time_features: Tensor) -> None:
        expected = (self.config.num_channels, *self.config.sample_shape)
        if x.dim() != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, expected))}], got {tuple(x.shape)}")
        expected_mask = (x.shape[0], self.config.num_channels, *self.grid_tokens)
        if tuple(mask.shape) != expected_mask or mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be bool with shape {list(expected_mask)}, got {mask.dtype} {tuple(mask.shape)}"
            )
        expected_time = (x.shape[0], self.config.sample_shape[0], TIME_FEATURES)
        if tuple(time_features.shape) != expected_time:
            raise ValueError(
                f"time_features must have shape {list(expected_time)}, got {tuple(time_features.shape)}"
            )

    def embed(self, x: Tensor, mask: Tensor, time_features: Tensor) -> Tensor:
        """Embed the tokens of x: [B, C, T, H, W] -> [B, C, nT, nH, nW, D]."""
        tokens = tokenise(x, self.token_shape)
        embedded = self.token_embedding(tokens)

        position = (
            self.time_position[:, None, None, :]
            + self.latitude_position[None, :, None, :]
            + self.longitude_position[None, None, :, :]
        )
        channel = self.channel_embedding[:, None, None, None, :]
        token_time = token_mean(time_features.to(embedded.dtype), self.token_shape[0])
        time = self.time_feature_embedding(token_time)[:, None, :, None, None, :]
        embedded = embedded + position + channel + time

        return torch.where(mask[..., None], embedded + self.mask_embedding, embedded)

    def forward(self, x: Tensor, mask: Tensor, time_features: Tensor) -> Tensor:
        """Predict the whole field from a masked input.

        x: [B, C, T, H, W] model input in normalised units, with masked tokens already
        corrupted by `models.masking.corrupt`.
        mask: [B, C, nT, nH, nW] bool, True = masked.
        time_features: [B, T, 4], see `models.data.time_features`.
        Returns [B, C, T, H, W] in normalised units.
        """
        self._check_inputs(x, mask, time_features)
        batch = x.shape[0]

        embedded = self.embed(x, mask, time_features)
        grid_shape = embedded.shape[1:-1]
        sequence = self.embedding_dropout(embedded.reshape(batch, -1, embedded.shape[-1]))
        for block in self.blocks:
            sequence = block(sequence)

        tokens = self.decoder(self.norm(sequence))
        return detokenise(tokens.reshape(batch, *grid_shape, -1), self.token_shape)
