"""Image classification on a pretrained masked autoencoder's encoder: linear probe or full fine-tuning.

The classifier averages the encoder's outputs over all patches of an image (no patch is
hidden, see `MaskedAutoencoder.encode`) and maps them to class logits with one linear
layer. In `linear-probe` mode the encoder is frozen and only that layer trains. In `full`
mode the encoder trains too. The decoder is never used and stays frozen.

Train and test images are split by `holdout_split`: a fixed, seeded draw of
`head.holdout_images` images is held out for testing and never trained on. The classifier
trains through the shared loop (`models.train`) with `ClassifierObjective`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from models.config import TrainConfig
from models.images import ImageAugmentConfig, ImageDataset
from models.mae import MAEConfig, MaskedAutoencoder, catalog_image_store

logger = logging.getLogger(__name__)

TOP_K = (1, 5)


class ClassifierHeadConfig(BaseModel):
    """Classes, training mode and train/test split of the classifier."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_classes: int = Field(gt=1, description="Number of classes, the width of the linear head.")
    mode: Literal["linear-probe", "full"] = Field(
        default="linear-probe", description="linear-probe trains the head only, full trains encoder and head."
    )
    holdout_images: int = Field(default=100, ge=1, description="Images held out for testing, drawn with split_seed.")
    split_seed: int = Field(default=0, ge=0, description="Seed of the draw of held-out images.")


class ClassifierRunConfig(BaseModel):
    """A classification run on a pretrained masked autoencoder's encoder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    family: Literal["mae-classifier"] = Field(
        default="mae-classifier",
        description="Model family, which `models.config.load_preset` reads to pick this schema.",
    )
    model: MAEConfig = Field(description="Settings of the pretrained masked autoencoder.")
    head: ClassifierHeadConfig
    augment: ImageAugmentConfig | None = Field(
        default=None, description="Random crop and flip of training images, or None for whole images."
    )
    train: TrainConfig


def holdout_split(count: int, holdout: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split image indices 0..count-1 into (train, test), both sorted.

    The test indices are the first `holdout` of a permutation drawn by
    `numpy.random.default_rng(seed)`, so the split depends only on (count, holdout, seed).
    """
    if not 1 <= holdout < count:
        raise ValueError(
            f"head.holdout_images {holdout} must be at least 1 and below the dataset's {count} images"
        )
    permutation = np.random.default_rng(seed).permutation(count)
    return np.sort(permutation[holdout:]), np.sort(permutation[:holdout])


class ImageSubset(Dataset):
    """The items of an `ImageDataset` at `indices`, keeping its per-epoch augmentation."""

    def __init__(self, dataset: ImageDataset, indices: Sequence[int]) -> None:
        self.dataset = dataset
        self.indices = [int(index) for index in indices]

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.dataset[self.indices[index]]


class MAEClassifier(nn.Module):
    """Masked autoencoder encoder plus a linear head: images [B, 3, H, W] -> logits [B, num_classes]."""

    def __init__(self, config: ClassifierRunConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = MaskedAutoencoder(config.model)
        self.head = nn.Linear(config.model.embed_dim, config.head.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

        encoder_modules = [self.backbone.patch_embedding, self.backbone.blocks, self.backbone.norm]
        encoder_parameters = {id(p) for module in encoder_modules for p in module.parameters()}
        if config.model.position_embedding == "learned":
            encoder_parameters.add(id(self.backbone.position))
        for parameter in self.backbone.parameters():
            parameter.requires_grad = self.trains_backbone and id(parameter) in encoder_parameters

    @property
    def trains_backbone(self) -> bool:
        return self.config.head.mode == "full"

    def forward(self, images: Tensor) -> Tensor:
        # The frozen encoder of a linear probe runs without building a graph.
        with torch.set_grad_enabled(self.trains_backbone and torch.is_grad_enabled()):
            features = self.backbone.encode(images)
        return self.head(features)


def classifier_from_pretrained(pretrained: MaskedAutoencoder, config: ClassifierRunConfig) -> MAEClassifier:
    """Build a classifier whose encoder (and unused decoder) carry the weights of `pretrained`."""
    if pretrained.config.model_dump() != config.model.model_dump():
        raise ValueError(
            f"classifier model settings {config.model.model_dump()} differ from the pretrained model's "
            f"{pretrained.config.model_dump()}: build the classifier config from the pretrained config"
        )
    classifier = MAEClassifier(config)
    classifier.backbone.load_state_dict(pretrained.state_dict())
    return classifier


class ClassifierObjective:
    """Cross-entropy classification of the training split, for the shared training loop.

    A batch is what a DataLoader over `ImageDataset` yields: (images [B, 3, H, W], labels [B]).
    """

    def __init__(self, config: ClassifierRunConfig) -> None:
        self.config = config

    def build_model(self) -> MAEClassifier:
        return MAEClassifier(self.config)

    def open_full_dataset(self, dataset_path: str | Path | None, augment: bool) -> ImageDataset:
        """Open every image of the store, with the configured augmentation when `augment` is True."""
        if dataset_path is None:
            dataset_path = catalog_image_store(self.config.train.dataset)
        dataset = ImageDataset(
            dataset_path,
            image_size=self.config.model.image_size,
            augment=self.config.augment if augment else None,
            seed=self.config.train.seed,
        )
        largest = int(dataset.labels.max())
        if largest >= self.config.head.num_classes:
            raise ValueError(
                f"images of {dataset_path} have class index {largest}, but head.num_classes is "
                f"{self.config.head.num_classes}: set it to at least {largest + 1}"
            )
        return dataset

    def split(self, dataset: ImageDataset) -> tuple[np.ndarray, np.ndarray]:
        """Return the (train, test) image indices of `dataset`."""
        return holdout_split(len(dataset), self.config.head.holdout_images, self.config.head.split_seed)

    def open_dataset(self, dataset_path: str | Path | None) -> ImageSubset:
        """Open the training split, with augmentation."""
        dataset = self.open_full_dataset(dataset_path, augment=True)
        train_indices, _ = self.split(dataset)
        return ImageSubset(dataset, train_indices)

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """Return the cross-entropy of one batch and its top-1 accuracy as metric `top1`."""
        images, labels = batch
        logits = model(images).float()
        with torch.no_grad():
            top1 = float((logits.argmax(dim=1) == labels).float().mean())
        return F.cross_entropy(logits, labels), {"top1": top1}

    def checkpoint_modules(self, model: nn.Module) -> Sequence[nn.Module]:
        return list(model.backbone.blocks) if model.trains_backbone else []

    def tokens_per_sample(self) -> int:
        return self.config.model.num_patches


@torch.no_grad()
def evaluate_classifier(
    model: MAEClassifier, dataset: Dataset, indices: Sequence[int], batch_size: int = 64
) -> dict[str, float]:
    """Return top-1 and top-5 accuracy (fractions) and the image count over `dataset[indices]`.

    Also returns `chance_top1` and `chance_top5`, the expected accuracy of uniform guessing
    over `head.num_classes` classes.
    """
    model.eval()
    subset = torch.utils.data.Subset(dataset, [int(index) for index in indices])
    correct = dict.fromkeys(TOP_K, 0)
    for images, labels in DataLoader(subset, batch_size=batch_size):
        ranked = model(images).topk(max(TOP_K), dim=1).indices  # [B, 5]
        for k in TOP_K:
            correct[k] += int((ranked[:, :k] == labels[:, None]).any(dim=1).sum())
    count = len(subset)
    classes = model.config.head.num_classes
    result = {f"top{k}": correct[k] / count for k in TOP_K}
    result.update({f"chance_top{k}": min(1.0, k / classes) for k in TOP_K})
    result["images"] = float(count)
    return result
