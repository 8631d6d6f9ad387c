"""Masked autoencoder (MAE) with a vision transformer, for self-supervised pretraining on images.

An image `[B, 3, H, W]` is cut into square patches of `patch_size` pixels. A random
`mask_ratio` share of the patches of each image is hidden. The encoder embeds and
transforms only the visible patches. A lighter decoder receives the encoded visible
patches plus one shared, learned mask token at every hidden position, adds position
embeddings, and predicts the pixels of every patch. The loss is the mean squared error
over the hidden patches only. With `norm_pix_loss`, each target patch is first
standardised by its own mean and variance, so the model predicts structure rather than
brightness.

Patches are numbered row-major over the patch grid (`index = row * grid + column`).
A patch mask is `mask: [B, N]` bool with True for a hidden patch, and every image of a
batch hides the same number of patches.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from models.config import TrainConfig
from models.images import CHANNELS, ImageAugmentConfig, ImageDataset, to_rgb
from models.tokens import detokenise, tokenise

logger = logging.getLogger(__name__)

# Added to the patch variance before the square root when targets are standardised per patch.
NORM_PIX_EPS = 1e-6
# Value (in [0, 1] RGB) that hidden patches are drawn with in the masked-input figure panel.
HIDDEN_PATCH_GREY = 0.5


# --- configuration -----------------------------------------------------------------------------


class MAEConfig(BaseModel):
    """Architecture and masking of the masked autoencoder.

    Images are square, `image_size` pixels a side, and RGB.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: int = Field(default=224, gt=0, description="Side of the square input images in pixels.")
    patch_size: int = Field(default=16, gt=0, description="Side of the square patches in pixels.")
    embed_dim: int = Field(default=192, gt=0)
    depth: int = Field(default=12, gt=0, description="Encoder transformer blocks.")
    num_heads: int = Field(default=3, gt=0)
    decoder_embed_dim: int = Field(default=128, gt=0)
    decoder_depth: int = Field(default=4, gt=0)
    decoder_num_heads: int = Field(default=4, gt=0)
    mlp_ratio: float = Field(default=4.0, gt=0)
    mask_ratio: float = Field(default=0.75, gt=0, lt=1, description="Share of patches hidden from the encoder.")
    norm_pix_loss: bool = Field(
        default=False, description="Standardise each target patch by its own mean and variance before the loss."
    )
    position_embedding: Literal["sincos", "learned"] = Field(
        default="sincos", description="Fixed 2-D sine-cosine or learned position embeddings."
    )

    @model_validator(mode="after")
    def _check_shapes(self) -> MAEConfig:
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"model.image_size {self.image_size} is not a multiple of model.patch_size {self.patch_size}: "
                "choose a patch size that divides the image size"
            )
        for dim_name, heads_name in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
            dim, heads = getattr(self, dim_name), getattr(self, heads_name)
            if dim % heads != 0:
                raise ValueError(f"model.{dim_name} {dim} is not divisible by model.{heads_name} {heads}")
            if self.position_embedding == "sincos" and dim % 4 != 0:
                raise ValueError(
                    f"model.{dim_name} {dim} is not a multiple of 4, which 2-D sine-cosine position "
                    "embeddings need: change it or set model.position_embedding to learned"
                )

        visible = visible_patch_count(self.num_patches, self.mask_ratio)
        if not 1 <= visible < self.num_patches:
            raise ValueError(
                f"model.mask_ratio {self.mask_ratio} leaves {visible} of {self.num_patches} patches visible: "
                "at least one patch must be visible and at least one hidden"
            )
        return self

    @property
    def grid_size(self) -> int:
        """Patches along each side of the image."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def patch_values(self) -> int:
        """Values per patch: patch_size * patch_size * 3."""
        return self.patch_size**2 * CHANNELS


class MAERunConfig(BaseModel):
    """A masked autoencoder run: model, image augmentation and training loop settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: Literal["mae"] = Field(
        default="mae", description="Model family, which `models.config.load_preset` reads to pick this schema."
    )
    model: MAEConfig = Field(default_factory=MAEConfig)
    augment: ImageAugmentConfig = Field(default_factory=ImageAugmentConfig)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(dataset="imagenet-sample"))


# --- patches and masks -------------------------------------------------------------------------


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """Cut images into flattened patches.

    images: [B, C, H, W] -> patches: [B, N, C * p * p] with N = (H / p) * (W / p) in
    row-major patch order. A patch's values are ordered by channel, then row, then column.
    """
    batch, channels, height, width = images.shape
    tokens = tokenise(images[:, :, None], (1, patch_size, patch_size))  # [B, C, 1, nH, nW, p * p]
    tokens = tokens[:, :, 0].permute(0, 2, 3, 1, 4)  # [B, nH, nW, C, p * p]
    return tokens.reshape(batch, (height // patch_size) * (width // patch_size), channels * patch_size**2)


def unpatchify(patches: Tensor, patch_size: int, channels: int = CHANNELS) -> Tensor:
    """Reassemble square images from patches, inverting `patchify`.

    patches: [B, N, C * p * p] with N a square number -> images: [B, C, H, W], H = W = sqrt(N) * p.
    """
    batch, count, values = patches.shape
    grid = math.isqrt(count)
    if grid * grid != count or values != channels * patch_size**2:
        raise ValueError(
            f"patches of shape {list(patches.shape)} do not form a square image of {channels}-channel "
            f"{patch_size} x {patch_size} patches"
        )
    tokens = patches.reshape(batch, grid, grid, channels, patch_size**2).permute(0, 3, 1, 2, 4)
    return detokenise(tokens[:, :, None], (1, patch_size, patch_size))[:, :, 0]


def expand_patch_mask(mask: Tensor, patch_size: int) -> Tensor:
    """Spread a patch mask over pixels: [B, N] -> [B, 1, H, W], same dtype."""
    grid = math.isqrt(mask.shape[1])
    pixels = mask.reshape(mask.shape[0], 1, grid, grid)
    return pixels.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


def visible_patch_count(num_patches: int, mask_ratio: float) -> int:
    """Return round(num_patches * (1 - mask_ratio)), the number of visible patches per image."""
    return int(round(num_patches * (1.0 - mask_ratio)))


def random_patch_mask(batch: int, num_patches: int, mask_ratio: float, generator: torch.Generator) -> Tensor:
    """Hide a random `mask_ratio` share of the patches of each image, independently per image.

    Each image keeps exactly `visible_patch_count(num_patches, mask_ratio)` patches: the
    ones with the smallest of `num_patches` uniform draws from `generator`. Returns
    [B, N] bool on the generator's device, True = hidden.
    """
    visible = visible_patch_count(num_patches, mask_ratio)
    noise = torch.rand(batch, num_patches, generator=generator, device=generator.device)
    ranks = noise.argsort(dim=1).argsort(dim=1)  # rank of each patch's draw within its image
    return ranks >= visible


def patch_targets(images: Tensor, patch_size: int, norm_pix_loss: bool) -> Tensor:
    """Return the reconstruction targets [B, N, C * p * p] of images [B, C, H, W].

    With `norm_pix_loss`, each patch is standardised over its own C * p * p values:
    (x - mean) / sqrt(var + 1e-6), with the population variance (divisor C * p * p).
    """
    patches = patchify(images, patch_size)
    if not norm_pix_loss:
        return patches
    mean = patches.mean(dim=-1, keepdim=True)
    variance = patches.var(dim=-1, unbiased=False, keepdim=True)
    return (patches - mean) / torch.sqrt(variance + NORM_PIX_EPS)


def masked_patch_loss(prediction: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Return the mean squared error over the values of hidden patches only.

    prediction, target: [B, N, V]. mask: [B, N] bool, True = hidden. The squared error
    is averaged over each patch's V values, then over the hidden patches of the batch, in
    float32.
    """
    per_patch = (prediction.float() - target.float()).pow(2).mean(dim=-1)
    weights = mask.to(per_patch.dtype)
    return (per_patch * weights).sum() / weights.sum()


def sincos_position_embedding(grid_size: int, dim: int) -> Tensor:
    """Return fixed 2-D sine-cosine position embeddings [grid_size * grid_size, dim] in row-major order.

    The first half of the channels encodes the patch row and the second half its column.
    Each half contains sin(position * w_k) then cos(position * w_k) for the dim / 4
    frequencies w_k = 10000 ** (-k / (dim / 4)), k = 0 ... dim / 4 - 1.
    """
    if dim % 4 != 0:
        raise ValueError(f"sine-cosine position embeddings need a dimension divisible by 4, got {dim}")
    frequencies = 10000.0 ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    positions = torch.arange(grid_size, dtype=torch.float64)
    rows, columns = torch.meshgrid(positions, positions, indexing="ij")

    def encode(coordinate: Tensor) -> Tensor:
        angles = coordinate.reshape(-1, 1) * frequencies[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(columns)], dim=1).float()


# --- the network -------------------------------------------------------------------------------


class ViTBlock(nn.Module):
    """Pre-norm transformer block on tokens x: [B, L, D], without dropout.

    x + self-attention(LayerNorm(x)), then x + MLP(LayerNorm(x)) with a GELU hidden
    layer of mlp_ratio * D units.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attention_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.projection = nn.Linear(dim, dim)
        self.mlp_norm = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        heads = self.qkv(self.attention_norm(x)).reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
        query, key, value = heads.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, L, D / heads]
        attended = F.scaled_dot_product_attention(query, key, value)
        x = x + self.projection(attended.transpose(1, 2).reshape(batch, length, dim))
        return x + self.mlp(self.mlp_norm(x))


class MaskedAutoencoder(nn.Module):
    """ViT encoder over the visible patches and a lightweight transformer decoder over all patches."""

    def __init__(self, config: MAEConfig) -> None:
        super().__init__()
        self.config = config
        num_patches, dim, decoder_dim = config.num_patches, config.embed_dim, config.decoder_embed_dim

        self.patch_embedding = nn.Linear(config.patch_values, dim)
        self.decoder_embedding = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(decoder_dim))
        if config.position_embedding == "sincos":
            self.register_buffer(
                "position", sincos_position_embedding(config.grid_size, dim), persistent=False
            )
            self.register_buffer(
                "decoder_position", sincos_position_embedding(config.grid_size, decoder_dim), persistent=False
            )
        else:
            self.position = nn.Parameter(torch.zeros(num_patches, dim))
            self.decoder_position = nn.Parameter(torch.zeros(num_patches, decoder_dim))

        self.blocks = nn.ModuleList(
            ViTBlock(dim, config.num_heads, config.mlp_ratio) for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.decoder_blocks = nn.ModuleList(
            ViTBlock(decoder_dim, config.decoder_num_heads, config.mlp_ratio)
            for _ in range(config.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_head = nn.Linear(decoder_dim, config.patch_values)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        if self.config.position_embedding == "learned":
            nn.init.trunc_normal_(self.position, std=0.02)
            nn.init.trunc_normal_(self.decoder_position, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def _check_images(self, images: Tensor) -> None:
        size = self.config.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (CHANNELS, size, size):
            raise ValueError(f"images must have shape [B, {CHANNELS}, {size}, {size}], got {list(images.shape)}")

    def _encode_patches(self, tokens: Tensor) -> Tensor:
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def encode(self, images: Tensor) -> Tensor:
        """Return one feature vector per image for linear probes: [B, 3, H, W] -> [B, embed_dim].

        All patches are visible. The features are the encoder's normalised outputs
        averaged over the patches.
        """
        self._check_images(images)
        tokens = self.patch_embedding(patchify(images, self.config.patch_size)) + self.position
        return self._encode_patches(tokens).mean(dim=1)

    def forward(self, images: Tensor, mask: Tensor) -> Tensor:
        """Predict every patch of images from their visible patches.

        images: [B, 3, H, W] normalised. mask: [B, N] bool, True = hidden, with the same
        number of hidden patches in every image. Returns the predicted patches
        [B, N, 3 * p * p], in the units of `patch_targets` (standardised per patch with
        `norm_pix_loss`).
        """
        self._check_images(images)
        batch, num_patches = images.shape[0], self.config.num_patches
        if mask.dtype != torch.bool or tuple(mask.shape) != (batch, num_patches):
            raise ValueError(f"mask must be bool [{batch}, {num_patches}], got {mask.dtype} {list(mask.shape)}")
        visible_counts = (~mask).sum(dim=1)
        visible = int(visible_counts[0])
        if visible == 0 or bool((visible_counts != visible).any()):
            raise ValueError(
                f"every image must keep the same positive number of visible patches, got {visible_counts.tolist()}"
            )

        # A stable sort of the mask puts the visible patches first, in ascending patch order.
        visible_index = mask.to(torch.uint8).argsort(dim=1, stable=True)[:, :visible]  # [B, V]
        tokens = self.patch_embedding(patchify(images, self.config.patch_size)) + self.position
        visible_tokens = tokens.gather(1, visible_index[..., None].expand(-1, -1, tokens.shape[-1]))
        encoded = self._encode_patches(visible_tokens)  # [B, V, D]

        decoded = self.decoder_embedding(encoded)  # [B, V, D_dec]
        index = visible_index[..., None].expand(-1, -1, decoded.shape[-1])
        canvas = self.mask_token.to(decoded.dtype).expand(batch, num_patches, -1)
        sequence = canvas.scatter(1, index, decoded) + self.decoder_position  # [B, N, D_dec]
        for block in self.decoder_blocks:
            sequence = block(sequence)
        return self.decoder_head(self.decoder_norm(sequence))


# --- reconstructions for figures ---------------------------------------------------------------


@dataclass(frozen=True)
class Reconstructions:
    """Displayable RGB images [B, H, W, 3] in [0, 1] for a reconstruction figure."""

    original: np.ndarray
    masked: np.ndarray
    pasted: np.ndarray
    reconstruction: np.ndarray

    def columns(self) -> dict[str, np.ndarray]:
        """Return the panels keyed by column title, in figure order."""
        return {
            "original": self.original,
            "masked input": self.masked,
            "reconstruction + visible": self.pasted,
            "reconstruction": self.reconstruction,
        }


@torch.no_grad()
def reconstruct(model: MaskedAutoencoder, images: Tensor, mask: Tensor, mean: Tensor, std: Tensor) -> Reconstructions:
    """Reconstruct images [B, 3, H, W] (normalised with the channel `mean` and `std`) from their visible patches.

    With `norm_pix_loss` the model predicts standardised patches, which are mapped back
    with the true patch mean and variance of each image. Those two numbers per patch come
    from the original, not from the model, so such a reconstruction shows structure
    only. `pasted` is the reconstruction with the visible patches replaced by the original.
    """
    was_training = model.training
    model.eval()
    try:
        prediction = model(images, mask).float()
    finally:
        model.train(was_training)

    config = model.config
    if config.norm_pix_loss:
        patches = patchify(images.float(), config.patch_size)
        scale = torch.sqrt(patches.var(dim=-1, unbiased=False, keepdim=True) + NORM_PIX_EPS)
        prediction = prediction * scale + patches.mean(dim=-1, keepdim=True)
    reconstruction = unpatchify(prediction, config.patch_size)

    hidden = expand_patch_mask(mask, config.patch_size)  # [B, 1, H, W]
    pasted = torch.where(hidden, reconstruction, images.float())
    original = to_rgb(images, mean, std)
    masked = np.where(hidden.permute(0, 2, 3, 1).cpu().numpy(), HIDDEN_PATCH_GREY, original)
    return Reconstructions(
        original=original,
        masked=masked,
        pasted=to_rgb(pasted, mean, std),
        reconstruction=to_rgb(reconstruction, mean, std),
    )


# --- training objective ------------------------------------------------------------------------


def catalog_image_store(name: str) -> Path:
    """Return the Zarr store of the image dataset `name`, checking that it comes from the entry's ingest run."""
    from data_catalog.catalog import Catalog, InvalidCatalogEntryError
    from data_catalog.schema import ImageDatasetEntry

    catalog = Catalog()
    entry = catalog.get(name)
    if not isinstance(entry, ImageDatasetEntry):
        raise ValueError(
            f"catalog dataset {name!r} has kind {entry.kind!r}, but the masked autoencoder trains on images: "
            "set train.dataset to a dataset ingested with `atmorep ingest imagenet`"
        )

    path = catalog.resolve_zarr_path(entry)
    if not path.is_dir():
        raise FileNotFoundError(f"Zarr store {path} of dataset {name!r} not found. Re-ingest the dataset.")
    stored_digest = zarr.open_group(path, mode="r").attrs.get("digest")
    if stored_digest != entry.digest:
        raise InvalidCatalogEntryError(
            f"Zarr store {path} has digest {stored_digest!r} but catalog entry {catalog.entry_path(name)} "
            f"has {entry.digest!r}. Re-ingest dataset {name!r}."
        )
    return path


class MAEObjective:
    """Masked patch reconstruction of ImageNet-style images, for the shared training loop.

    A batch is what a DataLoader over `ImageDataset` yields: (images [B, 3, H, W], labels [B]).
    """

    def __init__(self, config: MAERunConfig) -> None:
        self.config = config

    def build_model(self) -> MaskedAutoencoder:
        return MaskedAutoencoder(self.config.model)

    def open_dataset(self, dataset_path: str | Path | None) -> ImageDataset:
        """Open the image Zarr at `dataset_path`, else the catalog entry `train.dataset`, with augmentation."""
        if dataset_path is None:
            dataset_path = catalog_image_store(self.config.train.dataset)
        return ImageDataset(
            dataset_path,
            image_size=self.config.model.image_size,
            augment=self.config.augment,
            seed=self.config.train.seed,
        )

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """Return the masked patch loss of one batch, with no extra metrics."""
        images, _labels = batch  # images: [B, 3, H, W], labels: [B]
        config = self.config.model
        mask = random_patch_mask(images.shape[0], config.num_patches, config.mask_ratio, generator)
        mask = mask.to(images.device)

        prediction = model(images, mask)
        target = patch_targets(images, config.patch_size, config.norm_pix_loss)
        return masked_patch_loss(prediction, target, mask), {}

    def checkpoint_modules(self, model: nn.Module) -> Sequence[nn.Module]:
        return [*model.blocks, *model.decoder_blocks]

    def tokens_per_sample(self) -> int:
        """Return the patches per image that the decoder processes. The encoder processes `1 - mask_ratio` of them."""
        return self.config.model.num_patches
