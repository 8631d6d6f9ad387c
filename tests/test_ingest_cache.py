"""Prefect caching of the ingest flow on the real UK 2 m temperature sample.

The flow runs in this process against a temporary Prefect server, with its results in a
temporary folder. A second run with the same inputs and source must take the ingest
task's result from the cache (state "Cached") and leave the catalog entry as it was. A
changed input or source file, or a dataset removed from the catalog, must run the task.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import eccodes
import pytest
from conftest import reset_mlflow_uris
from era5_direct import write_grib_where
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
from prefect.testing.utilities import prefect_test_harness

from data_catalog import Catalog
from data_catalog.workspace import sha256_file
from flows.caching import SOURCE_DIGESTS_FILE, SourceDigests, image_folder_digest
from flows.imagenet import ingest as ingest_images
from flows.ingest import ingest
from flows.params import IngestEra5Params, IngestImagenetParams
from tasks.imagenet import discover_images, files_digest
from test_imagenet import label_rows, make_flat_folder, sample_folder  # noqa: F401 - fixtures

pytestmark = pytest.mark.slow

SAMPLE = "sample:era5-2mt-2019-03-uk"
NAME = "era5-t2m-uk-2019-03"
TASK = "ingest-era5"


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A temporary Prefect server for the module, with task results in a temporary folder."""
    results = tmp_path_factory.mktemp("prefect-results")
    with prefect_test_harness(server_startup_timeout=120), temporary_settings({PREFECT_LOCAL_STORAGE_PATH: results}):
        yield results


@pytest.fixture
def home(tmp_path, monkeypatch, data_mirror, prefect_server):
    """Return a new ATMOREP_HOME, and restore MLflow's tracking and registry URIs after the test."""
    reset_mlflow_uris(monkeypatch)
    monkeypatch.setenv("ATMOREP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ATMOREP_DATA_MIRROR", str(data_mirror))
    return tmp_path / "home"


def task_states(flow_run_id, task_name: str = TASK, timeout_s: float = 30.0) -> list[str]:
    """Return the state names of a flow run's runs of `task_name`, oldest first, once all are final."""
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            runs = sorted((run for run in runs if run.name.startswith(f"{task_name}-")), key=lambda run: run.created)
            if runs and all(run.state is not None and run.state.is_final() for run in runs):
                return [run.state.name for run in runs]
            # Task run states reach the server in the background, shortly after the flow ends.
            if time.monotonic() > deadline:
                return [run.state.name if run.state else "no state" for run in runs]
            time.sleep(0.5)


def run_ingest(**overrides) -> tuple[dict, list[str]]:
    """Run the ingest flow and return its result and the states of its ingest task runs."""
    params = IngestEra5Params(**{"sources": [SAMPLE], "name": NAME, **overrides})
    state = ingest(params, return_state=True)
    return state.result(), task_states(state.state_details.flow_run_id)


def entry_file(home: Path) -> Path:
    return Catalog(home).entry_path(NAME)


def test_rerun_cached_until_input_changes(home, tmp_path):
    first, states = run_ingest()
    assert states == ["Completed"]
    published = entry_file(home).read_bytes()
    published_mtime = entry_file(home).stat().st_mtime_ns

    second, states = run_ingest()
    assert states == ["Cached"]
    assert entry_file(home).read_bytes() == published
    assert entry_file(home).stat().st_mtime_ns == published_mtime
    assert second["content_digest"] == first["content_digest"]
    assert second["version"] == first["version"]
    assert second["run_id"] != first["run_id"]

    # Another variable selection is another recipe, with the same content.
    selected, states = run_ingest(variables=["t2m"])
    assert states == ["Completed"]
    assert selected["digest"] != first["digest"]
    assert selected["content_digest"] == first["content_digest"]

    # The cached result of the first inputs names a recipe that the catalog no longer
    # publishes, so the flow drops it and runs the task again.
    again, states = run_ingest()
    assert states == ["Cached", "Completed"]
    assert again["digest"] == first["digest"]
    assert Catalog(home).get(NAME).digest == first["digest"]


def test_removed_dataset_not_cached(home):
    run_ingest()
    assert run_ingest()[1] == ["Cached"]

    assert Catalog(home).remove(NAME)
    result, states = run_ingest()
    assert states == ["Completed"]
    assert NAME in Catalog(home)
    assert Catalog(home).get(NAME).content_digest == result["content_digest"]


def test_changed_source_file_not_cached(home, tmp_path, uk_t2m_grib):
    source = tmp_path / "uk.grib"
    shutil.copyfile(uk_t2m_grib, source)
    first, states = run_ingest(sources=[str(source)])
    assert states == ["Completed"]
    assert run_ingest(sources=[str(source)])[1] == ["Cached"]

    # The same bytes under another path have the same sha256, so the result is reused.
    copy = tmp_path / "copy.grib"
    shutil.copyfile(source, copy)
    assert run_ingest(sources=[str(copy)])[1] == ["Cached"]

    def warm_by_one_kelvin(handle) -> None:
        eccodes.codes_set_values(handle, eccodes.codes_get_values(handle) + 1.0)

    write_grib_where(uk_t2m_grib, source, keep=lambda handle: True, change=warm_by_one_kelvin)
    changed, states = run_ingest(sources=[str(source)])
    assert states == ["Completed"]
    assert changed["content_digest"] != first["content_digest"]
    recorded = SourceDigests(Catalog(home)).records[str(source.resolve())]
    assert recorded["sha256"] == sha256_file(source)


def test_image_rerun_cached_until_size_changes(home, tmp_path, sample_folder, label_rows):  # noqa: F811
    folder = make_flat_folder(tmp_path / "flat", sample_folder, label_rows[:12])

    def run_image_ingest(size: int) -> tuple[dict, list[str]]:
        params = IngestImagenetParams(source=str(folder), name="images", size=size, workers=1)
        state = ingest_images(params, return_state=True)
        return state.result(), task_states(state.state_details.flow_run_id, "ingest-imagenet")

    first, states = run_image_ingest(32)
    assert states == ["Completed"]
    published = Catalog(home).entry_path("images").read_bytes()

    second, states = run_image_ingest(32)
    assert states == ["Cached"]
    assert second["content_digest"] == first["content_digest"]
    assert Catalog(home).entry_path("images").read_bytes() == published

    resized, states = run_image_ingest(16)
    assert states == ["Completed"]
    assert resized["content_digest"] != first["content_digest"]


def test_image_folder_digest_recorded(sample_folder, tmp_path):  # noqa: F811
    folder = sample_folder
    catalog = Catalog(tmp_path / "home")
    listing = discover_images(folder, "auto")
    with ThreadPoolExecutor(max_workers=2) as executor:
        expected = files_digest(listing, executor)

    assert image_folder_digest(folder, "auto", catalog) == expected
    assert (catalog.root / SOURCE_DIGESTS_FILE).is_file()
    # A second key takes the recorded digest without hashing the images, so it returns a replaced record.
    digests = SourceDigests(catalog)
    key, record = next(iter(digests.records.items()))
    digests.records[key] = {**record, "sha256": "0" * 64}
    digests.changed = True
    digests.save()
    assert image_folder_digest(folder, "auto", catalog) == "0" * 64
