"""Test configuration shared by the whole suite.

Telemetry is switched off and gloo is pinned to the loopback interface before any test
module imports mlflow, prefect or torch.distributed.
"""

import os

os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
# Prefect's temporary API server can take longer than its 20 s default to start on a busy machine.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def _data_mirror() -> Path:
    configured = os.environ.get("ATMOREP_DATA_MIRROR")
    return Path(configured) if configured else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_mirror() -> Path:
    """The folder of real ERA5 and ImageNet files (ATMOREP_DATA_MIRROR, else ../shared/data)."""
    mirror = _data_mirror()
    if not (mirror / "era5").is_dir():
        pytest.fail(
            f"real test data not found at {mirror}: set ATMOREP_DATA_MIRROR to the folder "
            "that holds era5/ and images/"
        )
    return mirror


@pytest.fixture(scope="session")
def uk_t2m_grib(data_mirror: Path) -> Path:
    """ERA5 hourly 2 m temperature over the UK, March 2019 (GRIB1, 744 x 33 x 49)."""
    return data_mirror / "era5" / "era5-2mt-2019-03-uk.grib"


def reset_mlflow_uris(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clear MLflow's tracking and registry URIs for one test, and restore them after it.

    `tasks.tracking.client()` stores the URIs in MLflow's module globals and in
    MLFLOW_TRACKING_URI and MLFLOW_REGISTRY_URI, where later tests would find them.
    """
    import mlflow

    for variable in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(variable, "unset")
        monkeypatch.delenv(variable)
    monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
    monkeypatch.setattr(mlflow.tracking._model_registry.utils, "_registry_uri", None)
