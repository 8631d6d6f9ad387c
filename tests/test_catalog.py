"""Tests of the catalog schema, the YAML catalog, digests and the working folder."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pydantic
import pytest
import xarray as xr

from data_catalog import Catalog, atmorep_home
from data_catalog.catalog import DatasetNotFoundError, InvalidCatalogEntryError, content_digest, dataset_digest
from data_catalog.schema import DatasetEntry, SampleEntry
from data_catalog.workspace import atomic_write_text, sha256_file

DIGEST = "ab" * 32
CONTENT_DIGEST = "9f" * 32


def make_entry(name: str = "demo", digest: str = DIGEST, **changes) -> DatasetEntry:
    fields = {
        "name": name,
        "zarr_path": f"data/{name}.zarr",
        "variables": {"t2m": {"units": "K", "long_name": "2 metre temperature", "has_levels": False}},
        "levels": None,
        "grid": {
            "latitude_first": 58.0,
            "latitude_last": 50.0,
            "latitude_step": -0.25,
            "longitude_first": -10.0,
            "longitude_last": 2.0,
            "longitude_step": 0.25,
            "shape": (33, 49),
        },
        "time_start": "2019-03-01T00:00:00",
        "time_end": "2019-03-31T23:00:00",
        "time_step": timedelta(hours=1),
        "time_count": 744,
        "time_chunk": 24,
        "train_period": ("2019-03-01T00:00:00", "2019-03-24T23:00:00"),
        "test_period": ("2019-03-25T00:00:00", "2019-03-31T23:00:00"),
        "statistics": {"t2m": {"mean": [280.5], "std": [2.25]}},
        "provenance": {
            "sources": [{"path": "/data/era5.grib", "sha256": "cd" * 32, "size": 2499840}],
            "parameters": {"time_chunk": 24},
            "packages": {"xarray": "2026.9.0"},
            "created": datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
        },
        "digest": digest,
        "content_digest": CONTENT_DIGEST,
        "version": 1,
        "created": datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
    }
    fields.update(changes)
    return DatasetEntry.model_validate(fields)


def write_store(path: Path, digest: str) -> None:
    dataset = xr.Dataset(
        {"t2m": (("time", "latitude", "longitude"), np.zeros((2, 3, 4), dtype=np.float32))},
        coords={"time": np.array(["2019-03-01T00", "2019-03-01T01"], dtype="datetime64[ns]")},
        attrs={"digest": digest},
    )
    dataset.to_zarr(path, zarr_format=3, consolidated=False)


def test_publish_get_round_trip(tmp_path):
    catalog = Catalog(tmp_path)
    entry = make_entry()

    path = catalog.publish(entry)

    assert path == tmp_path / "catalog" / "demo.yaml"
    assert catalog.get("demo") == entry
    assert catalog.names() == ["demo"]
    assert "demo" in catalog
    assert list(path.parent.iterdir()) == [path]


def test_entry_yaml_uses_iso_periods(tmp_path):
    catalog = Catalog(tmp_path)
    text = catalog.publish(make_entry()).read_text()

    assert "train_period: ['2019-03-01T00:00:00', '2019-03-24T23:00:00']" in text
    assert "time_step: PT1H" in text


def test_publish_replaces_entry(tmp_path):
    catalog = Catalog(tmp_path)
    catalog.publish(make_entry())

    catalog.publish(make_entry(digest="ef" * 32))

    assert catalog.get("demo").digest == "ef" * 32
    assert catalog.names() == ["demo"]


def test_get_missing_lists_known_names(tmp_path):
    catalog = Catalog(tmp_path)
    catalog.publish(make_entry("first"))
    catalog.publish(make_entry("second"))

    with pytest.raises(DatasetNotFoundError) as raised:
        catalog.get("third")

    assert isinstance(raised.value, KeyError)
    message = str(raised.value)
    assert "'third'" in message
    assert "first, second" in message


def test_get_invalid_entry_names_file(tmp_path):
    catalog = Catalog(tmp_path)
    path = catalog.publish(make_entry())
    path.write_text(path.read_text() + "unexpected_key: 1\n")

    with pytest.raises(InvalidCatalogEntryError, match="unexpected_key") as raised:
        catalog.get("demo")

    assert str(path) in str(raised.value)


def test_remove_entry(tmp_path):
    catalog = Catalog(tmp_path)
    catalog.publish(make_entry())

    assert catalog.remove("demo") is True
    assert catalog.remove("demo") is False
    assert catalog.names() == []


def test_invalid_dataset_name_rejected(tmp_path):
    catalog = Catalog(tmp_path)

    with pytest.raises(ValueError, match="invalid dataset name"):
        catalog.entry_path("../escape")


def test_open_dataset_checks_digest(tmp_path):
    catalog = Catalog(tmp_path)
    entry = make_entry()
    catalog.publish(entry)
    write_store(tmp_path / entry.zarr_path, digest=entry.digest)

    dataset = catalog.open_dataset("demo")

    assert dataset["t2m"].chunks is not None
    assert dataset.attrs["digest"] == entry.digest


def test_open_dataset_stale_store_rejected(tmp_path):
    catalog = Catalog(tmp_path)
    entry = make_entry()
    catalog.publish(entry)
    write_store(tmp_path / entry.zarr_path, digest="00" * 32)

    with pytest.raises(InvalidCatalogEntryError, match="Re-ingest"):
        catalog.open_dataset("demo")


def test_open_dataset_missing_store(tmp_path):
    catalog = Catalog(tmp_path)
    catalog.publish(make_entry())

    with pytest.raises(FileNotFoundError, match="demo.zarr"):
        catalog.open_dataset("demo")


def test_entry_rejects_reversed_period():
    with pytest.raises(pydantic.ValidationError, match="after its end"):
        make_entry(train_period=("2019-03-24T23:00:00", "2019-03-01T00:00:00"))


def test_entry_converts_aware_period_to_naive_utc():
    entry = make_entry(test_period=("2019-03-25T01:00:00+01:00", "2019-03-31T23:00:00Z"))

    assert entry.test_period == (datetime(2019, 3, 25, 0, 0), datetime(2019, 3, 31, 23, 0))


def test_entry_requires_statistics_per_variable():
    with pytest.raises(pydantic.ValidationError, match="no statistics"):
        make_entry(statistics={})


def test_entry_rejects_unequal_statistics():
    with pytest.raises(pydantic.ValidationError, match="equal length"):
        make_entry(statistics={"t2m": {"mean": [1.0, 2.0], "std": [1.0]}})


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("sha256", "not-a-digest", "sha256"),
        ("mirror_path", "/absolute/file.grib", "relative path"),
        ("mirror_path", "era5/../../etc/passwd", "relative path"),
        ("url", "ftp://example.org/file.grib", "http"),
    ],
)
def test_sample_entry_validation(field, value, match):
    fields = {
        "name": "sample",
        "url": "https://example.org/file.grib",
        "sha256": "ab" * 32,
        "mirror_path": "era5/file.grib",
        "description": "a file",
        "licence": "CC-BY-4.0",
        "attribution": "someone",
    }
    fields[field] = value

    with pytest.raises(pydantic.ValidationError, match=match):
        SampleEntry.model_validate(fields)


def test_digest_ignores_source_order():
    parameters = {"time_chunk": 24, "variables": None}

    first = dataset_digest(["a" * 64, "b" * 64], parameters)
    second = dataset_digest(["b" * 64, "a" * 64], parameters)

    assert first == second
    assert len(first) == 64


def test_digest_depends_on_parameters_and_sources():
    base = dataset_digest(["a" * 64], {"time_chunk": 24})

    assert dataset_digest(["a" * 64], {"time_chunk": 12}) != base
    assert dataset_digest(["c" * 64], {"time_chunk": 24}) != base


def test_atmorep_home_from_env(tmp_path, monkeypatch):
    home = tmp_path / "nested" / "home"
    monkeypatch.setenv("ATMOREP_HOME", str(home))

    assert atmorep_home() == home.resolve()
    assert home.is_dir()


def test_atmorep_home_default_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("ATMOREP_HOME", raising=False)
    monkeypatch.chdir(tmp_path)

    assert atmorep_home() == (tmp_path / "runs").resolve()
    assert Catalog().root == (tmp_path / "runs").resolve()


def test_atomic_write_leaves_no_temporary(tmp_path):
    target = tmp_path / "entry.yaml"
    atomic_write_text(target, "first\n")
    atomic_write_text(target, "second\n")

    assert target.read_text() == "second\n"
    assert [path.name for path in tmp_path.iterdir()] == ["entry.yaml"]


def test_sha256_file_known_value(tmp_path):
    path = tmp_path / "abc.txt"
    path.write_bytes(b"abc")

    assert sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_content_digest_covers_chunks_not_root_attrs(tmp_path):
    first, second = tmp_path / "first.zarr", tmp_path / "second.zarr"
    write_store(first, digest="00" * 32)
    write_store(second, digest="11" * 32)
    metadata = {"statistics": {"t2m": {"mean": [280.5], "std": [2.25]}}}

    assert content_digest(first, metadata) == content_digest(second, metadata)

    with xr.open_zarr(second, consolidated=False) as opened:
        changed = opened.load()
    changed["t2m"][0, 0, 0] = 1.0
    changed.to_zarr(second, mode="w", zarr_format=3, consolidated=False)
    assert content_digest(first, metadata) != content_digest(second, metadata)


def test_content_digest_covers_metadata(tmp_path):
    store = tmp_path / "store.zarr"
    write_store(store, digest=DIGEST)

    base = content_digest(store, {"train_period": ["2019-03-01T00:00:00", "2019-03-24T23:00:00"]})
    moved = content_digest(store, {"train_period": ["2019-03-01T00:00:00", "2019-03-23T23:00:00"]})

    assert moved != base
    assert content_digest(store, {"train_period": ["2019-03-01T00:00:00", "2019-03-24T23:00:00"]}) == base


def test_content_digest_missing_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.zarr"):
        content_digest(tmp_path / "missing.zarr", {})


@pytest.mark.parametrize(
    ("published", "new_digest", "expected"),
    [
        (None, "9f" * 32, 1),
        (("9f" * 32, 3), "9f" * 32, 3),
        (("9f" * 32, 3), "01" * 32, 4),
    ],
)
def test_next_version(tmp_path, published, new_digest, expected):
    catalog = Catalog(tmp_path)
    if published is not None:
        digest, version = published
        catalog.publish(make_entry(content_digest=digest, version=version))

    assert catalog.next_version("demo", new_digest) == expected


def test_publish_rejects_entry_without_content_digest(tmp_path):
    with pytest.raises(ValueError, match="content_digest"):
        Catalog(tmp_path).publish(make_entry(content_digest=None))


def test_get_rejects_entry_without_content_digest(tmp_path):
    catalog = Catalog(tmp_path)
    path = catalog.publish(make_entry())
    text = path.read_text(encoding="utf-8").replace(f"content_digest: {CONTENT_DIGEST}\n", "")
    path.write_text(text, encoding="utf-8")

    with pytest.raises(InvalidCatalogEntryError, match="no content_digest"):
        catalog.get("demo")
