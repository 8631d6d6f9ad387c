"""Images of an ingested image Zarr store as normalised training samples.

The store is the one `tasks.imagenet` writes: `images` uint8 `[image, y, x, channel]`
(RGB, 0 to 255), `label` int64 `[image]`, and the per-channel `statistics` attribute with
the mean and standard deviation of the stored pixels in the same 0-255 units. A sample is
an image resized to the model's size and normalised channel by channel to zero mean and
unit variance with those statistics.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zarr
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

CHANNELS = 3
# Stores whose `images` array is at most this large are read into memory once.
DEFAULT_MAX_IN_MEMORY_BYTES = 2 * 1024**3


class ImageAugmentConfig(BaseModel):
    """Random crop and flip applied to each training image before it is resized."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    random_crop: bool = Field(
        default=True, description="Crop a random square of the stored image instead of taking all of it."
    )
    min_crop_scale: float = Field(
        default=0.2, gt=0, le=1, description="Smallest crop area as a fraction of the stored image area."
    )
    horizontal_flip: bool = Field(default=True, description="Mirror half of the images left to right.")


# --- normalisation ---------------------------------------------------------------------------


def normalise(pixels: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Map pixel values in 0-255 units to standard scores: (pixels - mean) / std per channel.

    pixels: [..., 3, H, W] float. mean, std: [3] in 0-255 units. Returns the same shape.
    """
    return (pixels - mean[:, None, None]) / std[:, None, None]


def denormalise(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Map standard scores back to pixel values in 0-255 units, inverting `normalise`.

    images: [..., 3, H, W]. mean, std: [3] in 0-255 units. Values are not clipped.
    """
    return images * std[:, None, None].to(images) + mean[:, None, None].to(images)


def to_rgb(images: Tensor, mean: Tensor, std: Tensor) -> np.ndarray:
    """Turn normalised images [B, 3, H, W] into displayable RGB floats [B, H, W, 3] clipped to [0, 1]."""
    pixels = denormalise(images.detach().float().cpu(), mean, std) / 255.0
    return pixels.clamp(0.0, 1.0).permute(0, 2, 3, 1).numpy()


# --- the dataset -------------------------------------------------------------------------------


class ImageDataset(Dataset):
    """Normalised, resized images of an image Zarr store, with their class index.

    Each item is `(image [3, image_size, image_size] float32, label int64 scalar)`. With
    augmentation, a square crop whose area is a fraction drawn uniformly from
    [min_crop_scale, 1] of the stored image is cut at a random position and mirrored with
    probability 1/2, then resized. Without it the whole stored image is resized. The
    random numbers come from a generator seeded by (seed, epoch, index), so an item is the
    same in any worker process and after a resume. Resizing is bilinear with antialiasing.

    Stores of at most `max_in_memory_bytes` are read into memory once. Larger ones are
    read image by image.
    """

    def __init__(
        self,
        zarr_path: str | Path,
        image_size: int | None = None,
        augment: ImageAugmentConfig | None = None,
        seed: int = 0,
        max_in_memory_bytes: int = DEFAULT_MAX_IN_MEMORY_BYTES,
    ) -> None:
        self.zarr_path = Path(zarr_path)
        self.augment = augment
        self.seed = seed
        self.epoch = 0

        group = self._open_group(self.zarr_path)
        images = group["images"]
        self.stored_size = int(images.shape[1])
        self.image_size = int(image_size) if image_size is not None else self.stored_size
        if self.image_size < 1:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        if self.image_size > self.stored_size:
            logger.warning(
                "images of %s are stored at %d pixels and are upsampled to %d",
                self.zarr_path, self.stored_size, self.image_size,
            )

        self.labels = np.asarray(group["label"][:], dtype=np.int64)
        statistics = self._read_statistics(group, self.zarr_path)
        self.mean = torch.tensor(statistics[0], dtype=torch.float32)
        self.std = torch.tensor(statistics[1], dtype=torch.float32)

        if images.nbytes <= max_in_memory_bytes:
            self.pixels: np.ndarray | zarr.Array = images[:]
        else:
            logger.info("images of %s take %.1f GiB: reading them one by one", self.zarr_path, images.nbytes / 1024**3)
            self.pixels = images
        logger.info(
            "image dataset: %d images of %d pixels from %s, resized to %d, augmentation %s",
            len(self.labels), self.stored_size, self.zarr_path, self.image_size,
            augment.model_dump() if augment is not None else "off",
        )

    @staticmethod
    def _open_group(path: Path) -> zarr.Group:
        if not path.is_dir():
            raise FileNotFoundError(f"image Zarr store {path} not found: ingest it with `atmorep ingest imagenet`")
        group = zarr.open_group(path, mode="r")
        missing = [name for name in ("images", "label") if name not in group]
        if missing:
            raise ValueError(
                f"Zarr store {path} has no {missing} arrays, so it is not an image dataset: "
                "give a store written by `atmorep ingest imagenet`"
            )

        images, labels = group["images"], group["label"]
        shape = tuple(images.shape)
        if len(shape) != 4 or shape[1] != shape[2] or shape[3] != CHANNELS or images.dtype != np.uint8:
            raise ValueError(
                f"images of {path} are {images.dtype} {list(shape)}, expected uint8 [image, size, size, 3]"
            )
        if shape[0] == 0:
            raise ValueError(f"Zarr store {path} contains no images")
        if tuple(labels.shape) != (shape[0],):
            raise ValueError(f"label of {path} has shape {list(labels.shape)}, expected [{shape[0]}]")
        return group

    @staticmethod
    def _read_statistics(group: zarr.Group, path: Path) -> tuple[list[float], list[float]]:
        """Return the per-channel (mean, std) in 0-255 units from the store's `statistics` attribute."""
        statistics = group.attrs.get("statistics")
        try:
            mean = [float(value) for value in statistics["mean"]]
            std = [float(value) for value in statistics["std"]]
        except (TypeError, KeyError, ValueError) as error:
            raise ValueError(
                f"Zarr store {path} has statistics {statistics!r}, expected {{'mean': [R, G, B], 'std': [R, G, B]}}: "
                "re-ingest the images"
            ) from error
        if len(mean) != CHANNELS or len(std) != CHANNELS or min(std) <= 0:
            raise ValueError(
                f"Zarr store {path} has channel means {mean} and standard deviations {std}: "
                f"expected {CHANNELS} of each with positive standard deviations"
            )
        return mean, std

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random crops and flips `__getitem__` returns."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def crop_box(self, index: int) -> tuple[int, int, int, bool]:
        """Return the (top, left, side, flip) of the crop of item `index` in stored pixels."""
        if self.augment is None:
            return 0, 0, self.stored_size, False

        rng = np.random.default_rng([self.seed, self.epoch, index])
        side = self.stored_size
        if self.augment.random_crop:
            area_fraction = rng.uniform(self.augment.min_crop_scale, 1.0)
            side = max(1, min(self.stored_size, round(self.stored_size * float(np.sqrt(area_fraction)))))
        top = int(rng.integers(self.stored_size - side + 1))
        left = int(rng.integers(self.stored_size - side + 1))
        flip = bool(self.augment.horizontal_flip and rng.random() < 0.5)
        return top, left, side, flip

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        top, left, side, flip = self.crop_box(index)
        crop = np.asarray(self.pixels[index, top : top + side, left : left + side])

        image = torch.from_numpy(np.array(crop, dtype=np.float32)).permute(2, 0, 1)  # [3, side, side], 0-255
        if flip:
            image = image.flip(-1)
        if side != self.image_size:
            image = F.interpolate(
                image[None], size=(self.image_size, self.image_size), mode="bilinear",
                align_corners=False, antialias=True,
            )[0]
        return normalise(image, self.mean, self.std).contiguous(), torch.tensor(self.labels[index])
