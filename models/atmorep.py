"""Multi-field AtmoRep-style masked token model with an ensemble tail.

Every field (a variable at a set of levels, see `models.config.FieldConfig`) has its own
network. A field's sample `[B, L, T, H, W]` is cut into tokens of `token_shape` grid
values per level. Each token's embedding is the sum of:

- a linear projection of its values,
- learned embeddings of its level and of its position along time, latitude and longitude
  tokens,
- a linear projection of the time features (year, day of year, hour of day; see
  `models.data.calendar_features`) averaged over the token's time steps,
- a learned mask embedding if the token is masked.

The encoder has `depth` blocks per field. Each block applies self-attention over the
field's tokens, then cross-attention from the field's tokens to the tokens of its
configured neighbours (taken at the input of the same block), then an MLP. The decoder
has `decoder_depth` self-attention blocks per field. The ensemble tail maps every token
to `ensemble_size` predictions of its grid values, one head per member. With
`ModelConfig.residual` these are increments added to the field's input, so a masked token
is predicted as its fill (persistence, interpolation in time, the upsampled coarse field;
see `models.masking`) plus a learned correction.

`AtmoRep.forward` returns the ensemble members per field, `[B, E, L, T, H, W]`; the
prediction is their mean and the uncertainty their spread (`models.losses`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import FieldConfig, ModelConfig
from models.tokens import detokenise, token_mean, tokenise

# Columns of `models.data.calendar_features`.
TIME_FEATURES = 5


class Attention(nn.Module):
    """Multi-head attention from queries x: [B, N, D] to a context [B, M, D] (x itself when None)."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.query = nn.Linear(embed_dim, embed_dim)
        self.key_value = nn.Linear(embed_dim, 2 * embed_dim)
        self.out = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        batch, length, dim = x.shape
        head_dim = dim // self.num_heads
        query = self.query(x).reshape(batch, length, self.num_heads, head_dim).transpose(1, 2)
        key, value = (
            self.key_value(context).reshape(batch, context.shape[1], 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        )
        # query: [B, heads, N, D / heads], key and value: [B, heads, M, D / heads]
        attended = F.scaled_dot_product_attention(
            query, key, value, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(attended.transpose(1, 2).reshape(batch, length, dim))


class Block(nn.Module):
    """Pre-norm block on x: [B, N, D]: self-attention, cross-attention to neighbours if any, MLP."""

    def __init__(self, embed_dim: int, num_heads: int, mlp_ratio: float, dropout: float, cross: bool) -> None:
        super().__init__()
        self.self_norm = nn.LayerNorm(embed_dim)
        self.self_attention = Attention(embed_dim, num_heads, dropout)
        self.cross = cross
        if cross:
            self.cross_norm = nn.LayerNorm(embed_dim)
            self.context_norm = nn.LayerNorm(embed_dim)
            self.cross_attention = Attention(embed_dim, num_heads, dropout)
        self.mlp_norm = nn.LayerNorm(embed_dim)
        hidden = int(embed_dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, embed_dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        x = x + self.self_attention(self.self_norm(x))
        if self.cross:
            if context is None:
                raise ValueError("this block cross-attends to neighbour fields and needs their tokens as context")
            x = x + self.cross_attention(self.cross_norm(x), self.context_norm(context))
        return x + self.mlp(self.mlp_norm(x))


class FieldNetwork(nn.Module):
    """Embedding, encoder blocks, decoder blocks and ensemble tail of one field."""

    def __init__(self, field: FieldConfig, config: ModelConfig) -> None:
        super().__init__()
        self.field = field
        self.token_shape = tuple(field.token_shape)
        self.ensemble_size = config.ensemble_size
        self.residual = config.residual
        n_time, n_lat, n_lon = field.num_tokens
        token_size = self.token_shape[0] * self.token_shape[1] * self.token_shape[2]
        dim = config.embed_dim

        self.token_embedding = nn.Linear(token_size, dim)
        self.level_embedding = nn.Parameter(torch.zeros(field.num_levels, dim))
        self.time_position = nn.Parameter(torch.zeros(n_time, dim))
        self.latitude_position = nn.Parameter(torch.zeros(n_lat, dim))
        self.longitude_position = nn.Parameter(torch.zeros(n_lon, dim))
        self.time_feature_embedding = nn.Linear(TIME_FEATURES, dim)
        self.mask_embedding = nn.Parameter(torch.zeros(dim))
        self.embedding_dropout = nn.Dropout(config.dropout)

        cross = bool(field.neighbours)
        self.encoder = nn.ModuleList(
            Block(dim, config.num_heads, config.mlp_ratio, config.dropout, cross) for _ in range(config.depth)
        )
        self.decoder = nn.ModuleList(
            Block(dim, config.num_heads, config.mlp_ratio, config.dropout, cross=False)
            for _ in range(config.decoder_depth)
        )
        self.norm = nn.LayerNorm(dim)
        # The E heads, stored as one linear layer: output e * token_size ... (e + 1) * token_size is head e.
        self.heads = nn.Linear(dim, config.ensemble_size * token_size)
        self.downscaling_head = DownscalingHead(field, config) if config.downscaling_head else None

    def embed(self, x: Tensor, mask: Tensor, time_features: Tensor) -> Tensor:
        """Embed x: [B, L, T, H, W] with mask [B, L, nT, nH, nW] -> tokens [B, L * nT * nH * nW, D]."""
        embedded = self.token_embedding(tokenise(x, self.token_shape))  # [B, L, nT, nH, nW, D]
        position = (
            self.time_position[:, None, None, :]
            + self.latitude_position[None, :, None, :]
            + self.longitude_position[None, None, :, :]
        )
        level = self.level_embedding[:, None, None, None, :]
        token_time = token_mean(time_features.to(embedded.dtype), self.token_shape[0])  # [B, nT, F]
        time = self.time_feature_embedding(token_time)[:, None, :, None, None, :]
        embedded = embedded + position + level + time
        embedded = torch.where(mask[..., None], embedded + self.mask_embedding, embedded)
        return self.embedding_dropout(embedded.flatten(1, 4))

    def decode(self, tokens: Tensor, batch: int, inputs: Tensor | None = None) -> Tensor:
        """Map encoded tokens [B, N, D] to ensemble members [B, E, L, T, H, W].

        With a downscaling head, its output is added, and with `ModelConfig.residual` the
        input itself is added to every member; both need `inputs` (the field's input
        [B, L, T, H, W]).
        """
        encoded = tokens
        for block in self.decoder:
            tokens = block(tokens)
        values = self.heads(self.norm(tokens))  # [B, N, E * token_size]
        members = members_from_tokens(values, self.field, self.ensemble_size)
        if (self.downscaling_head is not None or self.residual) and inputs is None:
            raise ValueError(
                f"field {self.field.name!r} predicts increments or has a downscaling head, so decode needs its input"
            )
        if self.downscaling_head is not None:
            members = members + self.downscaling_head(encoded, inputs)
        if self.residual:
            members = members + inputs[:, None]
        return members


def members_from_tokens(values: Tensor, field: FieldConfig, ensemble_size: int) -> Tensor:
    """Reshape per-token head outputs [B, N, E * token_size] to ensemble members [B, E, L, T, H, W]."""
    batch = values.shape[0]
    n_levels = field.num_levels
    n_time, n_lat, n_lon = field.num_tokens
    values = values.reshape(batch, n_levels, n_time, n_lat, n_lon, ensemble_size, -1)
    values = values.permute(0, 5, 1, 2, 3, 4, 6).reshape(batch * ensemble_size, n_levels, n_time, n_lat, n_lon, -1)
    members = detokenise(values, tuple(field.token_shape))
    return members.reshape(batch, ensemble_size, *members.shape[1:])


class DownscalingHead(nn.Module):
    """High-resolution head that fine-tuning for downscaling adds to a field's network.

    The input of downscaling is the coarsened field: every token holds the averages of
    `factor x factor` blocks of grid points, repeated over each block (`models.masking`).
    The head averages the input over those blocks again, giving tT * (tH / factor) *
    (tW / factor) coarse values per token, embeds them linearly and adds them to the
    encoder's output tokens. One transformer block, a layer norm and a linear layer then
    predict every member's fine-scale values per token, which are added to the
    pretrained decoder's prediction. The output layer starts at zero, so before
    fine-tuning the model predicts exactly what the pretrained one does.
    """

    def __init__(self, field: FieldConfig, config: ModelConfig) -> None:
        super().__init__()
        self.field = field
        self.factor = config.downscaling_head
        self.ensemble_size = config.ensemble_size
        token_t, token_h, token_w = field.token_shape
        self.coarse_token_shape = (token_t, token_h // self.factor, token_w // self.factor)
        dim = config.embed_dim
        self.coarse_embedding = nn.Linear(token_t * (token_h // self.factor) * (token_w // self.factor), dim)
        self.block = Block(dim, config.num_heads, config.mlp_ratio, config.dropout, cross=False)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, config.ensemble_size * token_t * token_h * token_w)

    def forward(self, tokens: Tensor, inputs: Tensor) -> Tensor:
        """Predict fine-scale values from encoded tokens [B, N, D] and the input [B, L, T, H, W].

        Returns members [B, E, L, T, H, W] to add to the decoder's prediction.
        """
        batch, levels, steps, height, width = inputs.shape
        coarse = F.avg_pool2d(inputs.reshape(batch * levels * steps, 1, height, width), self.factor)
        coarse = coarse.reshape(batch, levels, steps, height // self.factor, width // self.factor)
        embedded = self.coarse_embedding(tokenise(coarse, self.coarse_token_shape)).flatten(1, 4)  # [B, N, D]
        hidden = self.block(tokens + embedded)
        return members_from_tokens(self.out(self.norm(hidden)), self.field, self.ensemble_size)


class AtmoRep(nn.Module):
    """Multi-field masked token model; `forward` documents the input and output shapes."""

    ARCHITECTURE_VERSION = 2

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.architecture_version != self.ARCHITECTURE_VERSION:
            raise ValueError(
                f"model.architecture_version {config.architecture_version} (one transformer over stacked "
                "channels) can no longer be built: pretrain a new model with model.fields"
            )
        self.config = config
        self.fields = nn.ModuleDict({field.name: FieldNetwork(field, config) for field in config.fields})
        self._init_weights()

    def _init_weights(self) -> None:
        for network in self.fields.values():
            for parameter in (
                network.level_embedding,
                network.time_position,
                network.latitude_position,
                network.longitude_position,
                network.mask_embedding,
            ):
                nn.init.trunc_normal_(parameter, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        for network in self.fields.values():
            if network.downscaling_head is not None:
                nn.init.zeros_(network.downscaling_head.out.weight)
            if network.residual:
                # The untrained model predicts its input: every fill's baseline, exactly.
                nn.init.zeros_(network.heads.weight)

    @property
    def blocks(self) -> list[Block]:
        """Every encoder and decoder block of every field."""
        return [block for network in self.fields.values() for block in (*network.encoder, *network.decoder)]

    def _check_inputs(self, inputs: Mapping[str, Tensor], masks: Mapping[str, Tensor], time_features: Tensor) -> int:
        expected_names = self.config.field_names
        if sorted(inputs) != sorted(expected_names) or sorted(masks) != sorted(expected_names):
            raise ValueError(
                f"inputs and masks must contain the fields {expected_names}, got {sorted(inputs)} and {sorted(masks)}"
            )
        batch = next(iter(inputs.values())).shape[0]
        for field in self.config.fields:
            x, mask = inputs[field.name], masks[field.name]
            expected = (batch, field.num_levels, *field.sample_shape)
            if tuple(x.shape) != expected:
                raise ValueError(f"field {field.name!r} must have shape {list(expected)}, got {tuple(x.shape)}")
            expected_mask = (batch, field.num_levels, *field.num_tokens)
            if tuple(mask.shape) != expected_mask or mask.dtype != torch.bool:
                raise ValueError(
                    f"mask of field {field.name!r} must be bool with shape {list(expected_mask)}, "
                    f"got {mask.dtype} {tuple(mask.shape)}"
                )
        expected_time = (batch, self.config.sample_shape[0], TIME_FEATURES)
        if tuple(time_features.shape) != expected_time:
            raise ValueError(
                f"time_features must have shape {list(expected_time)}, got {tuple(time_features.shape)}"
            )
        return batch

    def forward(
        self, inputs: Mapping[str, Tensor], masks: Mapping[str, Tensor], time_features: Tensor
    ) -> dict[str, Tensor]:
        """Predict every field's whole sample from masked inputs.

        inputs: field name -> [B, L, T, H, W] in normalised units, with masked tokens
        already corrupted by `models.masking`.
        masks: field name -> [B, L, nT, nH, nW] bool, True = masked.
        time_features: [B, T, 5], see `models.data.calendar_features`.
        Returns field name -> ensemble members [B, E, L, T, H, W] in normalised units.
        """
        batch = self._check_inputs(inputs, masks, time_features)
        states = {
            name: network.embed(inputs[name], masks[name], time_features) for name, network in self.fields.items()
        }
        for layer in range(self.config.depth):
            # Every field reads its neighbours' tokens as they enter this layer.
            previous = states
            states = {}
            for field in self.config.fields:
                context = None
                if field.neighbours:
                    context = torch.cat([previous[neighbour] for neighbour in field.neighbours], dim=1)
                states[field.name] = self.fields[field.name].encoder[layer](previous[field.name], context)
        return {name: network.decode(states[name], batch, inputs[name]) for name, network in self.fields.items()}
