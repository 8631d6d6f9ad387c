"""Tests of `tasks.imagenet.ingest_imagenet` and the `ingest/imagenet` flow on the real ImageNet sample."""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

import tasks.imagenet
from data_catalog import Catalog
from data_catalog.schema import ImageDatasetEntry
from flows.cli import build_params, build_parser
from flows.imagenet import resolve_image_source
from flows.params import IngestImagenetParams
from tasks.imagenet import (
    InvalidImageSourceError,
    ingest_imagenet,
    load_image,
    resize_and_crop,
    to_rgb,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
ATMOREP = str(Path(sys.executable).parent / "atmorep")
SAMPLE_NAME = "imagenet-sample"
TENCH = "n01440764_tench.JPEG"
CAN_OPENER = "n02951585_can_opener.JPEG"  # EXIF orientation 6: rotate 90 degrees clockwise to view
AIREDALE = "n02096051_Airedale.JPEG"  # greyscale (mode L)


@pytest.fixture(scope="module")
def sample_folder(data_mirror: Path) -> Path:
    return data_mirror / "images" / "imagenet-sample"


@pytest.fixture(scope="module")
def label_rows(sample_folder: Path) -> list[dict[str, str]]:
    """The rows of the sample's labels.tsv, read with the csv module."""
    with open(sample_folder / "labels.tsv", encoding="utf-8", newline="") as stream:
        return list(csv.DictReader(stream, delimiter="\t"))


@pytest.fixture(scope="module")
def sample_ingest(sample_folder, tmp_path_factory):
    """The whole 1,000-image sample ingested once at the default size into a temporary catalog."""
    catalog = Catalog(tmp_path_factory.mktemp("atmorep-home"))
    result = ingest_imagenet(sample_folder, SAMPLE_NAME, workers=2, catalog=catalog)
    group = zarr.open_group(result.zarr_path, mode="r")
    return catalog, result, group


def make_flat_folder(folder: Path, sample_folder: Path, rows: list[dict[str, str]]) -> Path:
    """Write a flat folder of symlinks to the sample images in `rows`, with its labels.tsv."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["index\twnid\tname\tfile"]
    for row in rows:
        lines.append(f"{row['index']}\t{row['wnid']}\t{row['name']}\t{row['file']}")
        link = folder / row["file"]
        if not link.exists():
            link.symlink_to(sample_folder / row["file"])
    (folder / "labels.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def add_truncated_copy(folder: Path, source: Path, row: dict[str, str], file_name: str) -> dict[str, str]:
    """Write the first half of `source` as `file_name` and return its label row."""
    data = source.read_bytes()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / file_name).write_bytes(data[: len(data) // 2])
    return {**row, "file": file_name}


def reference_image(path: Path, size: int = 224, rotate: Image.Transpose | None = None) -> np.ndarray:
    """Resize the shorter side to round(size / 0.875) with bicubic filtering and centre-crop, in plain Pillow."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        if rotate is not None:
            image = image.transpose(rotate)
    width, height = image.size
    shorter = round(size / 0.875)
    if width <= height:
        new_size = (shorter, round(height * shorter / width))
    else:
        new_size = (round(width * shorter / height), shorter)
    resized = image.resize(new_size, Image.Resampling.BICUBIC)
    left, top = (new_size[0] - size) // 2, (new_size[1] - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size)))


# --- the whole sample ------------------------------------------------------------------------


def test_sample_all_images_stored(sample_ingest):
    _, result, group = sample_ingest

    assert result.entry.image_count == 1000
    assert result.skipped == []
    assert group["images"].shape == (1000, 224, 224, 3)
    assert group["images"].dtype == np.uint8
    assert group["images"].chunks == (64, 224, 224, 3)
    assert group["label"].shape == (1000,)
    assert group["file"].shape == (1000,)


def test_sample_labels_match_label_file(sample_ingest, label_rows):
    _, result, group = sample_ingest

    assert group["label"][:].tolist() == [int(row["index"]) for row in label_rows]
    assert group["file"][:].tolist() == [row["file"] for row in label_rows]
    classes = result.entry.classes
    assert [item.index for item in classes] == list(range(1000))
    assert [item.wnid for item in classes] == [row["wnid"] for row in label_rows]
    assert [item.name for item in classes] == [row["name"] for row in label_rows]
    assert classes[0].wnid == "n01440764"
    assert classes[999].name == "toilet_tissue"


def test_sample_statistics_match_numpy(sample_ingest):
    _, result, group = sample_ingest
    images = group["images"][:]

    for channel in range(3):
        values = images[..., channel]
        assert result.entry.statistics.mean[channel] == pytest.approx(values.mean(dtype=np.float64), rel=1e-12)
        assert result.entry.statistics.std[channel] == pytest.approx(values.std(dtype=np.float64), rel=1e-9)
    assert group.attrs["statistics"] == result.entry.model_dump(mode="json")["statistics"]
    assert group.attrs["statistics_units"] == "8-bit pixel values 0 to 255"


def test_sample_greyscale_becomes_rgb(sample_ingest, sample_folder, label_rows):
    _, _, group = sample_ingest
    greyscale = []
    for position, row in enumerate(label_rows):
        with Image.open(sample_folder / row["file"]) as image:
            if image.mode == "L":
                greyscale.append(position)

    assert len(greyscale) == 23
    for position in greyscale:
        pixels = group["images"][position]
        assert np.array_equal(pixels[..., 0], pixels[..., 1]), label_rows[position]["file"]
        assert np.array_equal(pixels[..., 0], pixels[..., 2]), label_rows[position]["file"]


def test_sample_resize_policy(sample_ingest, sample_folder, label_rows):
    _, _, group = sample_ingest
    files = [row["file"] for row in label_rows]

    stored = group["images"][files.index(TENCH)]

    assert np.array_equal(stored, reference_image(sample_folder / TENCH))


def test_sample_exif_orientation_applied(sample_ingest, sample_folder, label_rows):
    _, _, group = sample_ingest
    files = [row["file"] for row in label_rows]

    stored = group["images"][files.index(CAN_OPENER)]

    # Orientation 6 is undone by rotating 270 degrees counter-clockwise.
    assert np.array_equal(stored, reference_image(sample_folder / CAN_OPENER, rotate=Image.Transpose.ROTATE_270))
    assert not np.array_equal(stored, reference_image(sample_folder / CAN_OPENER))


def test_sample_catalog_entry(sample_ingest, label_rows):
    catalog, result, group = sample_ingest

    entry = catalog.get(SAMPLE_NAME)

    assert isinstance(entry, ImageDatasetEntry)
    assert entry == result.entry
    assert entry.kind == "images"
    assert entry.provenance.layout == "flat"
    assert entry.provenance.file_count == 1000
    assert entry.provenance.labels_file is not None
    assert entry.provenance.packages["pillow"] != "not installed"
    assert group.attrs["digest"] == entry.digest
    assert group.attrs["content_digest"] == entry.content_digest
    assert group.attrs["version"] == entry.version == 1
    dataset = catalog.open_dataset(SAMPLE_NAME)
    assert dict(dataset.sizes) == {"image": 1000, "y": 224, "x": 224, "channel": 3}


def test_sample_second_ingest_reused(sample_ingest, sample_folder):
    catalog, result, _ = sample_ingest

    again = ingest_imagenet(sample_folder, SAMPLE_NAME, workers=1, catalog=catalog)

    assert again.reused is True
    assert again.entry == result.entry


# --- layouts -----------------------------------------------------------------------------------


def test_imagefolder_layout(tmp_path, sample_folder, label_rows):
    chosen = [label_rows[index] for index in (500, 3, 999, 42)]
    train = tmp_path / "imagenet" / "train"
    for row in chosen:
        (train / row["wnid"]).mkdir(parents=True)
        (train / row["wnid"] / row["file"]).symlink_to(sample_folder / row["file"])
    nested = train / chosen[0]["wnid"] / "extra"
    nested.mkdir()
    (nested / "copy.jpeg").symlink_to(sample_folder / TENCH)
    (train / chosen[1]["wnid"] / "notes.txt").write_text("not an image")

    result = ingest_imagenet(train, "folder", size=64, workers=1, catalog=Catalog(tmp_path / "home"))

    group = zarr.open_group(result.zarr_path, mode="r")
    wnids = sorted(row["wnid"] for row in chosen)
    assert [item.wnid for item in result.entry.classes] == wnids
    assert [item.index for item in result.entry.classes] == [0, 1, 2, 3]
    # Files directly in a class folder come before those in its subfolders, as in torchvision.
    expected_files = [f"{row['wnid']}/{row['file']}" for row in sorted(chosen, key=lambda row: row["wnid"])]
    expected_files.insert(wnids.index(chosen[0]["wnid"]) + 1, f"{chosen[0]['wnid']}/extra/copy.jpeg")
    assert group["file"][:].tolist() == expected_files
    assert group["label"][:].tolist() == [wnids.index(name.split("/")[0]) for name in expected_files]
    assert result.entry.provenance.layout == "imagefolder"
    assert group["images"].shape == (5, 64, 64, 3)


def test_imagefolder_split_root_rejected(tmp_path, sample_folder):
    (tmp_path / "train" / "n01440764").mkdir(parents=True)
    (tmp_path / "train" / "n01440764" / TENCH).symlink_to(sample_folder / TENCH)

    with pytest.raises(InvalidImageSourceError, match="split folders") as raised:
        ingest_imagenet(tmp_path, "split", workers=1, catalog=Catalog(tmp_path / "home"))

    assert str(tmp_path / "train") in str(raised.value)


@pytest.mark.parametrize(
    ("labels", "error", "match"),
    [
        ("index\twnid\tfile\n0\tn01440764\ttench.JPEG\n", InvalidImageSourceError, "expected the tab-separated"),
        ("index\twnid\tname\tfile\nx\tn01440764\ttench\ttench.JPEG\n", InvalidImageSourceError, "line 2"),
        ("index\twnid\tname\tfile\n0\tn01440764\ttench\t../tench.JPEG\n", InvalidImageSourceError, "'..'"),
        ("index\twnid\tname\tfile\n0\tn01440764\ttench\tmissing.JPEG\n", FileNotFoundError, "missing.JPEG"),
        (f"index\twnid\tname\tfile\n0\tn01440764\ttench\t{TENCH}\n0\tn01443537\tgoldfish\t{TENCH}\n",
         InvalidImageSourceError, "class 0"),
    ],
)
def test_label_file_errors(tmp_path, sample_folder, labels, error, match):
    (tmp_path / TENCH).symlink_to(sample_folder / TENCH)
    (tmp_path / "labels.tsv").write_text(labels)

    with pytest.raises(error, match=match):
        ingest_imagenet(tmp_path, "bad", workers=1, catalog=Catalog(tmp_path / "home"))


# --- corrupt and unusual images ----------------------------------------------------------------


def test_corrupt_image_skipped_by_name(tmp_path, sample_folder, label_rows, caplog):
    rows = label_rows[:6]
    corrupt = add_truncated_copy(tmp_path / "flat", sample_folder / TENCH, label_rows[0], "n01440764_truncated.JPEG")
    folder = make_flat_folder(tmp_path / "flat", sample_folder, rows[:2] + [corrupt] + rows[2:])
    clean = make_flat_folder(tmp_path / "clean", sample_folder, rows)

    with caplog.at_level(logging.WARNING, logger="tasks.imagenet"):
        result = ingest_imagenet(folder, "corrupt", size=32, chunk_images=4, workers=1,
                                 catalog=Catalog(tmp_path / "home"))
    reference = ingest_imagenet(clean, "clean", size=32, chunk_images=4, workers=1,
                                catalog=Catalog(tmp_path / "home"))

    assert [item.path for item in result.skipped] == ["n01440764_truncated.JPEG"]
    assert "truncated" in result.skipped[0].error
    assert "n01440764_truncated.JPEG" in caplog.text
    assert result.entry.image_count == 6
    assert result.entry.provenance.file_count == 7
    stored = zarr.open_group(result.zarr_path, mode="r")
    expected = zarr.open_group(reference.zarr_path, mode="r")
    assert np.array_equal(stored["images"][:], expected["images"][:])
    assert stored["file"][:].tolist() == [row["file"] for row in rows]
    assert stored.attrs["skipped"] == [{"path": "n01440764_truncated.JPEG", "error": result.skipped[0].error}]


def test_cmyk_jpeg_becomes_rgb(tmp_path, sample_folder, label_rows):
    cmyk_name = "n01440764_cmyk.JPEG"
    with Image.open(sample_folder / TENCH) as image:
        image.convert("CMYK").save(tmp_path / cmyk_name, format="JPEG", quality=95)
    with Image.open(tmp_path / cmyk_name) as image:
        assert image.mode == "CMYK"
    folder = make_flat_folder(tmp_path, sample_folder, [{**label_rows[0], "file": cmyk_name}])

    result = ingest_imagenet(folder, "cmyk", workers=1, catalog=Catalog(tmp_path / "home"))

    stored = zarr.open_group(result.zarr_path, mode="r")["images"][0]
    original = reference_image(sample_folder / TENCH)
    assert stored.shape == (224, 224, 3)
    # JPEG re-encoding changes values a little, a wrong conversion (such as inverted ink) changes them a lot.
    assert np.abs(stored.astype(int) - original.astype(int)).mean() < 3.0


def test_alpha_composited_on_white(sample_folder):
    with Image.open(sample_folder / TENCH) as image:
        rgba = image.convert("RGBA")
    alpha = np.full(rgba.size[::-1], 255, dtype=np.uint8)
    alpha[:, :100] = 0
    rgba.putalpha(Image.fromarray(alpha))

    rgb = np.asarray(to_rgb(rgba))

    assert rgb.shape == (375, 500, 3)
    assert (rgb[:, :100] == 255).all()
    assert np.array_equal(rgb[:, 100:], np.asarray(rgba.convert("RGB"))[:, 100:])


@pytest.mark.parametrize("mode", ["L", "LA", "P", "1"])
def test_modes_convert_to_rgb(sample_folder, mode):
    with Image.open(sample_folder / TENCH) as image:
        converted = image.convert(mode)

    rgb = to_rgb(converted)

    assert rgb.mode == "RGB"
    assert rgb.size == (500, 375)


def test_16_bit_greyscale_scaled_not_clipped(sample_folder):
    with Image.open(sample_folder / AIREDALE) as image:
        grey = np.asarray(image)
    wide = Image.fromarray(grey.astype(np.uint16) * 257)

    rgb = np.asarray(to_rgb(wide))

    assert wide.mode == "I;16"
    assert np.array_equal(rgb[..., 0], grey)


def test_resize_keeps_aspect_and_centre(sample_folder):
    with Image.open(sample_folder / TENCH) as image:
        image.load()

    assert resize_and_crop(image, 224).size == (224, 224)
    assert resize_and_crop(image, 32, crop_fraction=1.0).size == (32, 32)
    assert load_image(sample_folder / AIREDALE, 48).shape == (48, 48, 3)


# --- resuming ---------------------------------------------------------------------------------


def test_resume_after_failure_equals_uninterrupted(tmp_path, sample_folder, label_rows, monkeypatch):
    rows = label_rows[:38]
    corrupt = add_truncated_copy(tmp_path / "flat", sample_folder / TENCH, label_rows[0], "n01440764_truncated.JPEG")
    folder = make_flat_folder(tmp_path / "flat", sample_folder, rows[:10] + [corrupt] + rows[10:])
    options = {"size": 48, "chunk_images": 8, "workers": 2}
    uninterrupted = ingest_imagenet(folder, "subset", catalog=Catalog(tmp_path / "uninterrupted"), **options)

    write_chunk = tasks.imagenet._write_chunk
    calls = []

    def fail_in_third_chunk(images_array, offset, pixels):
        calls.append(offset)
        if len(calls) == 3:
            # A crash half-way through the write leaves a partly written chunk behind.
            write_chunk(images_array, offset, pixels[: len(pixels) // 2])
            raise RuntimeError("injected failure")
        write_chunk(images_array, offset, pixels)

    catalog = Catalog(tmp_path / "interrupted")
    monkeypatch.setattr(tasks.imagenet, "_write_chunk", fail_in_third_chunk)
    with pytest.raises(RuntimeError, match="injected failure"):
        ingest_imagenet(folder, "subset", catalog=catalog, **options)
    assert "subset" not in catalog
    assert not catalog.default_zarr_path("subset").exists()

    def record_offset(images_array, offset, pixels):
        calls.append(offset)
        write_chunk(images_array, offset, pixels)

    calls.clear()
    monkeypatch.setattr(tasks.imagenet, "_write_chunk", record_offset)
    resumed = ingest_imagenet(folder, "subset", catalog=catalog, **options)

    assert resumed.resumed_chunks == 2
    assert calls == [16, 24, 32]
    assert resumed.entry.digest == uninterrupted.entry.digest
    assert resumed.entry.content_digest == uninterrupted.entry.content_digest
    assert resumed.entry.statistics == uninterrupted.entry.statistics
    assert resumed.skipped == uninterrupted.skipped
    assert len(resumed.skipped) == 1
    expected = zarr.open_group(uninterrupted.zarr_path, mode="r")
    actual = zarr.open_group(resumed.zarr_path, mode="r")
    for array in ("images", "label", "file"):
        assert actual[array].shape == expected[array].shape
        assert np.array_equal(actual[array][:], expected[array][:]), array
    assert sorted(path.name for path in catalog.data_dir.iterdir()) == ["subset.zarr"]


def test_new_settings_replace_store(tmp_path, sample_folder, label_rows):
    folder = make_flat_folder(tmp_path / "flat", sample_folder, label_rows[:4])
    catalog = Catalog(tmp_path / "home")
    first = ingest_imagenet(folder, "subset", size=32, workers=1, catalog=catalog)

    second = ingest_imagenet(folder, "subset", size=48, workers=1, catalog=catalog)

    assert second.reused is False
    assert second.entry.digest != first.entry.digest
    assert second.entry.content_digest != first.entry.content_digest
    assert (first.entry.version, second.entry.version) == (1, 2)
    assert catalog.get("subset").image_size == 48
    assert zarr.open_group(second.zarr_path, mode="r")["images"].shape == (4, 48, 48, 3)
    assert sorted(path.name for path in catalog.data_dir.iterdir()) == ["subset.zarr"]


# --- flow and command line ---------------------------------------------------------------------


def test_sample_source_needs_mirror(monkeypatch, data_mirror):
    monkeypatch.delenv("ATMOREP_DATA_MIRROR", raising=False)
    with pytest.raises(RuntimeError, match="ATMOREP_DATA_MIRROR"):
        resolve_image_source("sample:imagenet-sample")

    monkeypatch.setenv("ATMOREP_DATA_MIRROR", str(data_mirror))
    assert resolve_image_source("sample:imagenet-sample") == data_mirror / "images" / "imagenet-sample"
    with pytest.raises(LookupError, match="imagenet-sample"):
        resolve_image_source("sample:imagenet-full")


def test_cli_options_become_params():
    arguments = build_parser().parse_args(["ingest", "imagenet", "/data/train", "--name", "in1k", "--size", "64"])
    params = build_params(arguments.model, arguments)

    assert isinstance(params, IngestImagenetParams)
    assert params.source == "/data/train"
    assert params.name == "in1k"
    assert params.size == 64
    assert params.layout == "auto"


@pytest.mark.slow
def test_cli_ingests_and_tracks(tmp_path, sample_folder, label_rows):
    import mlflow
    from mlflow import MlflowClient

    folder = make_flat_folder(tmp_path / "flat", sample_folder, label_rows[:12])
    home = tmp_path / "home"
    env = {**os.environ, "ATMOREP_HOME": str(home), "PREFECT_HOME": str(home / "prefect")}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)

    completed = subprocess.run(
        [ATMOREP, "ingest", "imagenet", str(folder), "--name", "cli-set", "--size", "32", "--workers", "1"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )

    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    entry = Catalog(home).get("cli-set")
    assert entry.image_count == 12
    assert '"class_count": 12' in completed.stdout
    uri = f"sqlite:///{home / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("atmorep").experiment_id])[0]
    assert run.data.metrics["images"] == 12
    assert run.data.metrics["skipped"] == 0
    assert run.data.tags["atmorep.dataset_digest"] == entry.content_digest
    assert run.data.tags["atmorep.dataset_version"] == "1"
    assert run.inputs.dataset_inputs[0].dataset.name == "cli-set"
    assert run.inputs.dataset_inputs[0].dataset.digest == entry.content_digest[:36]
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"catalog_entry.json", "plots"} <= artifacts
    assert [item.path for item in client.list_artifacts(run.info.run_id, "plots")] == ["plots/images.png"]
