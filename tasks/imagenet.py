"""Ingest an ImageNet-style image folder into a uint8 Zarr dataset and publish its catalog entry.

Two source layouts are read:

- `imagefolder`: one subfolder per class, as in `train/<wnid>/*.JPEG`. The class index
  is the position of the folder name in the sorted folder names. Images are ordered by
  class, then by sorted subfolder path and sorted file name. Both follow torchvision's
  `ImageFolder`.
- `flat`: images in one folder with a tab-separated label file `labels.tsv` whose header
  is `index  wnid  name  file`. Images are in the order of the label file's rows.

Every image is decoded with Pillow, turned upright by its EXIF orientation, converted to
RGB, resized and centre-cropped (`resize_and_crop` states the policy). Images that Pillow
cannot decode are logged by file name, listed in the result and the catalog entry, and
left out of the dataset.

The Zarr store (format 3) contains:

- `images`: uint8 `[image, y, x, channel]`, RGB, chunked by `chunk_images` images
- `label`: int64 `[image]`, the class index
- `file`: string `[image]`, the source path relative to the source folder
- attributes: the class table, per-channel statistics in 0-255 units, the resize policy,
  the skipped images, provenance, the recipe digest, the content digest and the version

Ingest is resumable. Chunks are written into a work folder named after the recipe digest,
and each finished chunk is recorded in a small JSON file there. A run that finds the work
folder of the same recipe continues after the last recorded chunk, and the result equals
that of an uninterrupted run. Only the complete store is renamed into place, and the
catalog entry is published last.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np
import pydantic
import zarr
from PIL import Image, ImageDraw, ImageOps
from tqdm.auto import tqdm

from data_catalog.catalog import Catalog, content_digest, dataset_digest
from data_catalog.schema import (
    ChannelStatistics,
    ImageClass,
    ImageDatasetEntry,
    ImageProvenance,
    SkippedImage,
    SourceFile,
)
from data_catalog.workspace import atomic_write_text, package_versions, sha256_file

logger = logging.getLogger(__name__)

# Bump when a code change alters the written dataset, so older stores are not reused.
IMAGENET_FORMAT_VERSION = 1

LABELS_FILE = "labels.tsv"
LABEL_COLUMNS = ("index", "wnid", "name", "file")
# The file suffixes torchvision's ImageFolder accepts, compared case-insensitively.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp"})
# Folder names that mark a dataset root holding splits rather than a folder of classes.
SPLIT_NAMES = frozenset({"train", "val", "validation", "test"})

DEFAULT_IMAGE_SIZE = 224
# 224 / 256: the shorter side is resized to 256 pixels before a 224-pixel centre crop.
DEFAULT_CROP_FRACTION = 0.875
DEFAULT_CHUNK_IMAGES = 64
RESAMPLING = Image.Resampling.BICUBIC
# Transparent pixels are composited onto this colour.
ALPHA_BACKGROUND = (255, 255, 255)
CHANNELS = ("R", "G", "B")

# The 1-D arrays are small, so they are chunked more coarsely than the images.
_INDEX_CHUNK_IMAGES = 65536
_HASH_BATCH_FILES = 1024
_RECIPE_FILE = "recipe.json"
_PROGRESS_DIR = "progress"
_WORK_STORE = "images.zarr"
_RECORDED_PACKAGES = ("pillow", "zarr", "numpy")
# Errors Pillow raises for files it cannot open or decode: UnidentifiedImageError and truncated
# data are OSError, and some plugins raise SyntaxError, ValueError or EOFError on broken headers.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

Layout = Literal["imagefolder", "flat"]


class InvalidImageSourceError(ValueError):
    """Error for a source folder or label file that does not fit either layout. The message names the path."""


class NoImagesError(ValueError):
    """Error raised when not one image of the source could be decoded."""


@dataclass(frozen=True)
class SourceImage:
    """One image file of the source, with its class index."""

    path: Path
    relative_path: str
    label: int


@dataclass(frozen=True)
class ImageListing:
    """The images of a source folder in dataset order, with the class table."""

    folder: Path
    layout: Layout
    images: list[SourceImage]
    classes: list[ImageClass]
    labels_file: Path | None


@dataclass(frozen=True)
class ImageIngestResult:
    entry: ImageDatasetEntry
    reused: bool
    zarr_path: Path
    skipped: list[SkippedImage]
    resumed_chunks: int


# --- discovering images ------------------------------------------------------------------


def discover_images(folder: str | Path, layout: Literal["auto", "imagefolder", "flat"] = "auto") -> ImageListing:
    """List the images and classes of `folder`.

    With `layout="auto"` a folder with a `labels.tsv` file is read as flat, and any other
    folder as ImageFolder.
    """
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"image source folder {folder} not found")

    if layout == "auto":
        layout = "flat" if (folder / LABELS_FILE).is_file() else "imagefolder"
    if layout == "flat":
        return list_flat_folder(folder)
    if layout == "imagefolder":
        return list_image_folder(folder)
    raise ValueError(f"layout {layout!r} is invalid: use auto, imagefolder or flat")


def list_image_folder(folder: Path) -> ImageListing:
    """List an ImageFolder layout: class index = position of the folder name in the sorted names.

    Class folders are searched recursively and symlinks are followed. Files directly in
    `folder` and files without an image suffix are ignored. Unlike torchvision, folders
    and files whose names start with "." are ignored too, so class indices can differ
    from torchvision's when hidden folders exist.
    """
    class_folders = sorted(
        entry for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith(".")
    )
    if not class_folders:
        raise InvalidImageSourceError(
            f"image folder {folder} has neither a {LABELS_FILE} file nor class subfolders. "
            f"Give a folder of class folders (such as .../train) or a flat folder with {LABELS_FILE}."
        )
    splits = sorted(entry.name for entry in class_folders if entry.name.lower() in SPLIT_NAMES)
    if splits:
        raise InvalidImageSourceError(
            f"image folder {folder} contains split folders {splits}, not class folders. "
            f"Give one split, for example {folder / splits[0]}."
        )

    stray = [entry.name for entry in folder.iterdir() if entry.is_file() and _is_image_file(entry)]
    if stray:
        logger.warning("%d image files directly in %s are not in a class folder and are ignored", len(stray), folder)

    classes = [ImageClass(index=index, wnid=entry.name) for index, entry in enumerate(class_folders)]
    images: list[SourceImage] = []
    empty: list[str] = []
    for index, class_folder in enumerate(class_folders):
        paths = _walk_images(class_folder)
        if not paths:
            empty.append(class_folder.name)
        images.extend(
            SourceImage(path=path, relative_path=path.relative_to(folder).as_posix(), label=index) for path in paths
        )
    if empty:
        raise InvalidImageSourceError(
            f"class folders {empty[:10]} of {folder} contain no image files ({len(empty)} in all). "
            "Remove them, because they would still take a class index."
        )

    logger.info("found %d images in %d class folders under %s", len(images), len(classes), folder)
    return ImageListing(folder=folder, layout="imagefolder", images=images, classes=classes, labels_file=None)


def list_flat_folder(folder: Path) -> ImageListing:
    """List a flat folder of images whose classes are given by `labels.tsv`, in the file's row order."""
    labels_file = folder / LABELS_FILE
    rows = read_labels(labels_file)

    classes: dict[int, ImageClass] = {}
    index_of_wnid: dict[str, int] = {}
    images: list[SourceImage] = []
    listed: set[str] = set()
    for line, (index, wnid, name, file_name) in rows:
        where = f"{labels_file} line {line}"
        known = classes.setdefault(index, ImageClass(index=index, wnid=wnid, name=name))
        if (known.wnid, known.name) != (wnid, name):
            raise InvalidImageSourceError(
                f"{where} gives class {index} as {wnid} {name!r}, but an earlier row gives {known.wnid} {known.name!r}"
            )
        if index_of_wnid.setdefault(wnid, index) != index:
            raise InvalidImageSourceError(
                f"{where} gives wnid {wnid} index {index}, but an earlier row gives {index_of_wnid[wnid]}"
            )
        if file_name in listed:
            raise InvalidImageSourceError(f"{where} lists file {file_name} a second time")
        listed.add(file_name)

        path = folder / file_name
        if not path.is_file():
            raise FileNotFoundError(f"image {path} listed on {where} not found")
        images.append(SourceImage(path=path, relative_path=file_name, label=index))

    unlisted = [entry.name for entry in folder.iterdir() if _is_image_file(entry) and entry.name not in listed]
    if unlisted:
        logger.warning(
            "%d image files in %s are not listed in %s and are ignored, for example %s",
            len(unlisted), folder, LABELS_FILE, sorted(unlisted)[0],
        )

    ordered_classes = [classes[index] for index in sorted(classes)]
    logger.info("found %d images of %d classes listed in %s", len(images), len(ordered_classes), labels_file)
    return ImageListing(folder=folder, layout="flat", images=images, classes=ordered_classes, labels_file=labels_file)


def read_labels(path: Path) -> list[tuple[int, tuple[int, str, str, str]]]:
    """Read a tab-separated label file with the header `index wnid name file`.

    Returns `(line number, (index, wnid, name, file))` for each row. `file` is a relative
    POSIX path inside the label file's folder.
    """
    if not path.is_file():
        raise FileNotFoundError(f"label file {path} not found")
    with open(path, encoding="utf-8", newline="") as stream:
        reader = csv.reader(stream, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None or tuple(header) != LABEL_COLUMNS:
            raise InvalidImageSourceError(
                f"label file {path} has header {header}, expected the tab-separated columns {list(LABEL_COLUMNS)}"
            )

        rows = []
        for fields in reader:
            where = f"{path} line {reader.line_num}"
            if not fields:
                continue
            if len(fields) != len(LABEL_COLUMNS):
                raise InvalidImageSourceError(f"{where} has {len(fields)} fields, expected {len(LABEL_COLUMNS)}")
            index_text, wnid, name, file_name = fields
            if not re.fullmatch(r"\d+", index_text):
                raise InvalidImageSourceError(f"{where} has class index {index_text!r}, expected an integer >= 0")
            if not wnid:
                raise InvalidImageSourceError(f"{where} has an empty wnid")
            relative = PurePosixPath(file_name)
            if not file_name or relative.is_absolute() or ".." in relative.parts:
                raise InvalidImageSourceError(f"{where} has file {file_name!r}, expected a relative path without '..'")
            rows.append((reader.line_num, (int(index_text), wnid, name, relative.as_posix())))

    if not rows:
        raise InvalidImageSourceError(f"label file {path} lists no images")
    return rows


def _walk_images(folder: Path) -> list[Path]:
    """Return the image files under `folder`, sorted by folder path, then by file name."""
    found: list[tuple[str, list[str]]] = []
    for root, folders, files in os.walk(folder, followlinks=True):
        folders[:] = [name for name in folders if not name.startswith(".")]
        found.append((root, sorted(files)))

    paths = []
    for root, files in sorted(found):
        paths.extend(Path(root) / name for name in files if _is_image_file(Path(root) / name))
    return paths


def _is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


# --- decoding one image --------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Greyscale (L, 1), palette (P), CMYK, YCbCr, LAB and HSV go through Pillow's `convert`.
    Images with alpha (RGBA, LA, PA, P with a transparent colour) are composited onto
    `ALPHA_BACKGROUND`. 16-bit greyscale (I;16*) is scaled to 0-255 rather than clipped.
    32-bit integer (I) and float (F) images have no agreed range and raise ValueError.

    NOTE: embedded ICC profiles are ignored, as torchvision's default loader (a plain
    `convert("RGB")`) ignores them, so CMYK and wide-gamut images are not colour-managed.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.uint32)
        scaled = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    if image.mode in ("I", "F"):
        raise ValueError(f"image mode {image.mode} (32-bit) has no defined 8-bit range")

    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_and_crop(image: Image.Image, size: int, crop_fraction: float = DEFAULT_CROP_FRACTION) -> Image.Image:
    """Resize the shorter side to `round(size / crop_fraction)` pixels, then centre-crop `size` x `size`.

    The aspect ratio is kept, and the longer side is rounded to whole pixels. The filter
    is Pillow's bicubic, which since Pillow 2.7 widens its support by the downscaling
    factor, so it also antialiases. The crop starts at `(width - size) // 2` and `(height - size) // 2`.
    Images smaller than the target are upsampled with the same filter.
    """
    shorter = max(size, round(size / crop_fraction))
    width, height = image.size
    if width <= height:
        new_size = (shorter, max(shorter, round(height * shorter / width)))
    else:
        new_size = (max(shorter, round(width * shorter / height)), shorter)
    resized = image.resize(new_size, resample=RESAMPLING)

    left = (new_size[0] - size) // 2
    top = (new_size[1] - size) // 2
    return resized.crop((left, top, left + size, top + size))


def load_image(path: Path, size: int, crop_fraction: float = DEFAULT_CROP_FRACTION) -> np.ndarray:
    """Decode, orient, convert and resize one image to uint8 RGB `[size, size, 3]`.

    Raises the Pillow error (OSError for truncated or unidentified files) when the file
    cannot be decoded, and ValueError for modes `to_rgb` does not convert.
    """
    with Image.open(path) as image:
        image.load()
        upright = ImageOps.exif_transpose(image)
    rgb = to_rgb(upright)
    return np.asarray(resize_and_crop(rgb, size, crop_fraction), dtype=np.uint8)


def _decode(image: SourceImage, size: int, crop_fraction: float) -> np.ndarray | SkippedImage:
    try:
        return load_image(image.path, size, crop_fraction)
    except _DECODE_ERRORS as error:
        logger.warning("skipped image %s: cannot decode it (%s: %s)", image.path, type(error).__name__, error)
        return SkippedImage(path=image.relative_path, error=f"{type(error).__name__}: {error}")


# --- statistics ----------------------------------------------------------------------------


def pixel_sums(images: np.ndarray) -> tuple[list[int], list[int]]:
    """Return the exact per-channel sums of pixel values and of their squares.

    `images` is uint8 `[..., 3]`. The sums come from per-channel histograms, so they are
    exact integers and do not depend on the order in which chunks are added.
    """
    values = np.arange(256, dtype=np.int64)
    sums, squares = [], []
    for channel in range(images.shape[-1]):
        histogram = np.bincount(images[..., channel].ravel(), minlength=256).astype(np.int64)
        sums.append(int(histogram @ values))
        squares.append(int(histogram @ (values * values)))
    return sums, squares


def channel_statistics(sums: Sequence[int], squares: Sequence[int], pixel_count: int) -> ChannelStatistics:
    """Return the per-channel mean and population standard deviation, in 0-255 units.

    Uses `var = (n * sum(x^2) - sum(x)^2) / n^2`, evaluated in exact integers.
    """
    if pixel_count <= 0:
        raise ValueError(f"pixel_count must be positive, got {pixel_count}")
    mean = tuple(total / pixel_count for total in sums)
    std = tuple(
        math.sqrt(pixel_count * square - total * total) / pixel_count for total, square in zip(sums, squares)
    )
    return ChannelStatistics(mean=mean, std=std)


# --- ingest --------------------------------------------------------------------------------


class _ChunkRecord(pydantic.BaseModel):
    """A finished chunk of the work store: source images `[source_start, source_stop)` minus `skipped`."""

    model_config = pydantic.ConfigDict(extra="forbid")

    chunk: int
    source_start: int
    source_stop: int
    image_count: int
    skipped: list[SkippedImage]
    pixel_sums: list[int]
    pixel_square_sums: list[int]


def ingest_imagenet(
    source: str | Path,
    name: str,
    size: int = DEFAULT_IMAGE_SIZE,
    crop_fraction: float = DEFAULT_CROP_FRACTION,
    layout: Literal["auto", "imagefolder", "flat"] = "auto",
    chunk_images: int = DEFAULT_CHUNK_IMAGES,
    workers: int | None = None,
    catalog: Catalog | None = None,
) -> ImageIngestResult:
    """Decode the images of `source` into `<catalog root>/data/<name>.zarr` and publish the entry.

    `size` is the side of the stored square images in pixels and `crop_fraction` the
    share of the resized shorter side that the centre crop keeps (see `resize_and_crop`).
    `workers` threads decode images (default: the CPU count, at most 8).

    Returns `reused=True` without writing when the catalog has `name` with the same digest
    and a complete store. A failure leaves the work folder for the next run to resume, and
    the previously published dataset of that name stays in place.
    """
    catalog = catalog if catalog is not None else Catalog()
    target = catalog.default_zarr_path(name)
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    if not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")
    if chunk_images < 1:
        raise ValueError(f"chunk_images must be a positive number of images, got {chunk_images}")
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")

    listing = discover_images(source, layout)
    if not listing.images:
        raise NoImagesError(f"image source {listing.folder} contains no image files")

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imagenet") as executor:
        digest_of_files = files_digest(listing, executor)
        parameters = {
            "format_version": IMAGENET_FORMAT_VERSION,
            "layout": listing.layout,
            "size": size,
            "crop_fraction": crop_fraction,
            "resize_shorter_side": max(size, round(size / crop_fraction)),
            "resample": "bicubic",
            "crop": "centre",
            "alpha_background": list(ALPHA_BACKGROUND),
            "chunk_images": chunk_images,
        }
        digest = dataset_digest([digest_of_files], parameters)

        reusable = _find_reusable_entry(catalog, name, digest)
        if reusable is not None:
            logger.info("image dataset %s with digest %s is complete at %s, so it is reused", name, digest[:12], target)
            return ImageIngestResult(
                entry=reusable,
                reused=True,
                zarr_path=catalog.resolve_zarr_path(reusable),
                skipped=list(reusable.skipped),
                resumed_chunks=0,
            )

        work = _prepare_work_folder(target, digest, size, len(listing.images), chunk_images)
        records = _load_chunk_records(work, len(listing.images))
        resumed_chunks = len(records)
        if resumed_chunks:
            logger.info("resuming image dataset %s after %d finished chunks in %s", name, resumed_chunks, work)

        records = _write_chunks(listing, work, records, size, crop_fraction, chunk_images, executor)

    entry = _build_entry(listing, name, target, records, size, chunk_images, parameters, digest_of_files, digest)
    entry = _finish_store(work / _WORK_STORE, listing, entry, catalog)
    _move_into_place(work, target, entry, catalog)
    return ImageIngestResult(
        entry=entry, reused=False, zarr_path=target, skipped=list(entry.skipped), resumed_chunks=resumed_chunks
    )


def files_digest(listing: ImageListing, executor: ThreadPoolExecutor) -> str:
    """Return the sha256 over each image's relative path and the sha256 of its bytes.

    Lines `<relative path>\\t<sha256>\\n` are hashed in dataset order, preceded for a flat
    folder by the same line for the label file. The absolute folder path is not part of it.

    NOTE: the digest must be known before decoding starts, to find a finished or partial
    store, so every image file is read twice: once here and once to decode it.
    """
    digest = hashlib.sha256()
    if listing.labels_file is not None:
        digest.update(f"{listing.labels_file.name}\t{sha256_file(listing.labels_file)}\n".encode())

    with tqdm(total=len(listing.images), desc="hashing images", unit="image", disable=None) as progress:
        # Bounded batches keep the number of pending futures small for folders of millions of files.
        for start in range(0, len(listing.images), _HASH_BATCH_FILES):
            batch = listing.images[start:start + _HASH_BATCH_FILES]
            for image, file_hash in zip(batch, executor.map(sha256_file, [image.path for image in batch])):
                digest.update(f"{image.relative_path}\t{file_hash}\n".encode())
            progress.update(len(batch))
    return digest.hexdigest()


def _prepare_work_folder(target: Path, digest: str, size: int, file_count: int, chunk_images: int) -> Path:
    """Return the work folder of this recipe, creating it and its empty store when missing.

    Work folders of other recipes for the same dataset name are deleted.
    """
    work = target.with_name(f".{target.name}.partial-{digest[:16]}")
    for stale in target.parent.glob(f".{target.name}.partial-*"):
        if stale != work:
            logger.info("deleting work folder %s of an earlier recipe of %s", stale, target.name)
            shutil.rmtree(stale, ignore_errors=True)

    recipe_path = work / _RECIPE_FILE
    if recipe_path.is_file():
        try:
            recipe = json.loads(recipe_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            recipe = {"error": str(error)}
        has_store = (work / _WORK_STORE / "images" / "zarr.json").is_file()
        if recipe.get("digest") == digest and has_store:
            return work
        logger.warning(
            "work folder %s has recipe %s and %s store, but digest %s is expected, so it is rebuilt",
            work, recipe, "a" if has_store else "no", digest,
        )
    shutil.rmtree(work, ignore_errors=True)

    work.mkdir(parents=True)
    group = zarr.open_group(work / _WORK_STORE, mode="w-", zarr_format=3)
    group.create_array(
        "images",
        shape=(file_count, size, size, len(CHANNELS)),
        chunks=(chunk_images, size, size, len(CHANNELS)),
        dtype="uint8",
        fill_value=0,
        dimension_names=("image", "y", "x", "channel"),
    )
    (work / _PROGRESS_DIR).mkdir()
    # The recipe file is written last, so a folder without it is never resumed.
    atomic_write_text(recipe_path, json.dumps({"digest": digest}))
    return work


def _load_chunk_records(work: Path, file_count: int) -> list[_ChunkRecord]:
    """Return the finished chunks recorded in `work`, in order, up to the first gap or invalid record."""
    records: list[_ChunkRecord] = []
    paths = sorted((work / _PROGRESS_DIR).glob("chunk-*.json"))
    for expected, path in enumerate(paths):
        try:
            record = _ChunkRecord.model_validate_json(path.read_text(encoding="utf-8"))
        except (OSError, pydantic.ValidationError) as error:
            logger.warning("progress record %s is invalid (%s), so ingest resumes before it", path, error)
            break
        start = records[-1].source_stop if records else 0
        if record.chunk != expected or record.source_start != start or record.source_stop > file_count:
            logger.warning("progress record %s is out of sequence, so ingest resumes before it", path)
            break
        records.append(record)

    # Records after a gap describe chunks that will be written again.
    for path in paths[len(records):]:
        path.unlink(missing_ok=True)
    return records


def _write_chunks(
    listing: ImageListing,
    work: Path,
    records: list[_ChunkRecord],
    size: int,
    crop_fraction: float,
    chunk_images: int,
    executor: ThreadPoolExecutor,
) -> list[_ChunkRecord]:
    """Decode the images after the last finished chunk and write them chunk by chunk.

    Each chunk except the last contains exactly `chunk_images` decoded images, so every
    write covers whole Zarr chunks. A chunk is recorded only after its write returns.
    """
    images_array = zarr.open_array(work / _WORK_STORE / "images", mode="r+")
    cursor = records[-1].source_stop if records else 0
    total = len(listing.images)
    progress = tqdm(total=total, initial=cursor, desc="decoding images", unit="image", disable=None)

    with progress:
        while cursor < total:
            chunk = len(records)
            start = cursor
            decoded: list[np.ndarray] = []
            skipped: list[SkippedImage] = []
            while len(decoded) < chunk_images and cursor < total:
                requested = listing.images[cursor:cursor + chunk_images - len(decoded)]
                cursor += len(requested)
                for outcome in executor.map(lambda image: _decode(image, size, crop_fraction), requested):
                    if isinstance(outcome, SkippedImage):
                        skipped.append(outcome)
                    else:
                        decoded.append(outcome)
                progress.update(len(requested))

            pixels = np.stack(decoded) if decoded else np.zeros((0, size, size, len(CHANNELS)), np.uint8)
            _write_chunk(images_array, chunk * chunk_images, pixels)
            sums, squares = pixel_sums(pixels)
            record = _ChunkRecord(
                chunk=chunk,
                source_start=start,
                source_stop=cursor,
                image_count=len(decoded),
                skipped=skipped,
                pixel_sums=sums,
                pixel_square_sums=squares,
            )
            atomic_write_text(work / _PROGRESS_DIR / f"chunk-{chunk:08d}.json", record.model_dump_json())
            records.append(record)
    return records


def _write_chunk(images_array: zarr.Array, offset: int, pixels: np.ndarray) -> None:
    """Write decoded images `[n, size, size, 3]` at image index `offset`."""
    if len(pixels):
        images_array[offset:offset + len(pixels)] = pixels


def _build_entry(
    listing: ImageListing,
    name: str,
    target: Path,
    records: list[_ChunkRecord],
    size: int,
    chunk_images: int,
    parameters: dict[str, object],
    digest_of_files: str,
    digest: str,
) -> ImageDatasetEntry:
    image_count = sum(record.image_count for record in records)
    skipped = [item for record in records for item in record.skipped]
    if image_count == 0:
        raise NoImagesError(
            f"none of the {len(listing.images)} images in {listing.folder} could be decoded, "
            f"for example {skipped[0].path} ({skipped[0].error})"
        )

    sums = [sum(values) for values in zip(*(record.pixel_sums for record in records))]
    squares = [sum(values) for values in zip(*(record.pixel_square_sums for record in records))]
    labels_file = None
    if listing.labels_file is not None:
        labels_file = SourceFile(
            path=str(listing.labels_file),
            sha256=sha256_file(listing.labels_file),
            size=listing.labels_file.stat().st_size,
        )

    created = datetime.now(timezone.utc)
    return ImageDatasetEntry(
        name=name,
        zarr_path=str(target),
        image_size=size,
        image_count=image_count,
        chunk_images=chunk_images,
        classes=listing.classes,
        statistics=channel_statistics(sums, squares, image_count * size * size),
        skipped=skipped,
        provenance=ImageProvenance(
            folder=str(listing.folder),
            layout=listing.layout,
            labels_file=labels_file,
            file_count=len(listing.images),
            files_digest=digest_of_files,
            parameters=parameters,
            packages=package_versions(_RECORDED_PACKAGES),
            created=created,
        ),
        digest=digest,
        created=created,
    )


def _finish_store(path: Path, listing: ImageListing, entry: ImageDatasetEntry, catalog: Catalog) -> ImageDatasetEntry:
    """Trim `images` to the decoded count, write `label` and `file`, then the attributes.

    Returns `entry` with the content digest of the finished store and the version that
    `Catalog.next_version` gives it.
    """
    skipped_paths = {item.path for item in entry.skipped}
    stored_images = [image for image in listing.images if image.relative_path not in skipped_paths]
    group = zarr.open_group(path, mode="r+")
    group["images"].resize((entry.image_count, entry.image_size, entry.image_size, len(CHANNELS)))

    index_chunk = min(_INDEX_CHUNK_IMAGES, entry.image_count)
    label = group.create_array(
        "label", shape=(entry.image_count,), chunks=(index_chunk,), dtype="int64",
        dimension_names=("image",), overwrite=True,
    )
    label[:] = np.array([image.label for image in stored_images], dtype=np.int64)
    file = group.create_array(
        "file", shape=(entry.image_count,), chunks=(index_chunk,), dtype=str,
        dimension_names=("image",), overwrite=True,
    )
    file[:] = np.array([image.relative_path for image in stored_images], dtype=object)

    document = entry.model_dump(mode="json")
    group.attrs.update({
        "name": entry.name,
        "kind": entry.kind,
        "description": "uint8 RGB images [image, y, x, channel] with class index `label` and source `file`",
        "classes": document["classes"],
        "statistics": document["statistics"],
        "statistics_units": "8-bit pixel values 0 to 255",
        "skipped": document["skipped"],
        "provenance": document["provenance"],
        "digest": entry.digest,
    })

    digest = content_digest(path, image_content_metadata(entry))
    version = catalog.next_version(entry.name, digest)
    group.attrs.update({"content_digest": digest, "version": version})
    return ImageDatasetEntry.model_validate({**entry.model_dump(), "content_digest": digest, "version": version})


def image_content_metadata(entry: ImageDatasetEntry) -> dict[str, object]:
    """Return what the content digest covers besides the store's arrays: channel statistics and class table.

    Both live only in the entry and the root attributes, and `label` means nothing without the class table.
    """
    document = entry.model_dump(mode="json")
    return {"statistics": document["statistics"], "classes": document["classes"]}


def _find_reusable_entry(catalog: Catalog, name: str, digest: str) -> ImageDatasetEntry | None:
    """Return the published entry when it and its store both carry `digest`, else None."""
    if name not in catalog:
        return None
    try:
        entry = catalog.get(name)
    except ValueError as error:
        logger.warning("catalog entry %s is invalid (%s), so the images are ingested again", name, error)
        return None
    if not isinstance(entry, ImageDatasetEntry) or entry.digest != digest:
        logger.info("dataset %s has digest %s, not %s, so it will be replaced", name, entry.digest[:12], digest[:12])
        return None

    path = catalog.resolve_zarr_path(entry)
    try:
        group = zarr.open_group(path, mode="r")
        complete = (
            group.attrs.get("digest") == digest
            and group["images"].shape[0] == entry.image_count
            and group["label"].shape[0] == entry.image_count
        )
    except (OSError, KeyError, ValueError) as error:
        logger.warning("Zarr store %s of dataset %s cannot be read (%s), so it is ingested again", path, name, error)
        return None
    if not complete:
        logger.warning("Zarr store %s does not match catalog entry %s, so the images are ingested again", path, name)
        return None
    return entry


def _move_into_place(work: Path, target: Path, entry: ImageDatasetEntry, catalog: Catalog) -> None:
    """Swap the finished store into `target`, publish the entry, then delete the work folder.

    The old entry is removed before the old store is replaced, so the catalog never
    points at a store from a different recipe.

    NOTE: no lock guards two concurrent ingests of the same name. Two runs of one recipe
    share a work folder and can overwrite each other's chunks.
    """
    previous: Path | None = None
    if target.exists():
        catalog.remove(entry.name)
        previous = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:12]}")
        os.replace(target, previous)
    os.replace(work / _WORK_STORE, target)
    try:
        catalog.publish(entry)
    except BaseException:
        # The work folder lost its store to the rename, so the next run starts over.
        shutil.rmtree(target, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    logger.info("wrote %d images of dataset %s to %s", entry.image_count, entry.name, target)


# --- preview -------------------------------------------------------------------------------


def save_image_grid(zarr_path: str | Path, path: str | Path, count: int = 16, columns: int = 4) -> Path:
    """Write a PNG grid of the first `count` stored images, each captioned with its class.

    The PNG is written to a temporary file beside `path` and renamed into place.
    """
    group = zarr.open_group(zarr_path, mode="r")
    count = min(count, group["images"].shape[0])
    images = group["images"][:count]
    labels = group["label"][:count]
    names = {item["index"]: item["name"] or item["wnid"] for item in group.attrs["classes"]}

    size = images.shape[1]
    caption = 14
    rows = math.ceil(count / columns)
    canvas = Image.new("RGB", (columns * size, rows * (size + caption)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for position, (pixels, label) in enumerate(zip(images, labels)):
        left = (position % columns) * size
        top = (position // columns) * (size + caption)
        canvas.paste(Image.fromarray(pixels), (left, top))
        draw.text((left + 2, top + size + 1), f"{label} {names.get(int(label), '')}"[:40], fill=(0, 0, 0))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        canvas.save(temporary, format="PNG")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
