"""Metric tracking for training, the only place where `models` touches MLflow.

The training process does not create MLflow runs. The launcher creates the run and passes
its id in `ATMOREP_MLFLOW_RUN_ID`, with the tracking server or store in
`MLFLOW_TRACKING_URI`. Without a run id nothing is tracked. A failed tracking call is
logged as a warning and never stops training.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Protocol

logger = logging.getLogger(__name__)

RUN_ID_VARIABLE = "ATMOREP_MLFLOW_RUN_ID"
# After this many failed calls, only every 100th further failure is logged.
WARNING_LIMIT = 5


class Tracker(Protocol):
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class NullTracker:
    """Tracker that discards every metric."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        return None

    def close(self) -> None:
        return None


class MlflowTracker:
    """Tracker that logs metrics to an existing MLflow run with `MlflowClient.log_metric`."""

    def __init__(self, run_id: str, tracking_uri: str | None = None) -> None:
        # Importing mlflow starts a telemetry thread unless this is set first (mlflow 3.17).
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.failures = 0

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            try:
                self.client.log_metric(self.run_id, key, float(value), step=step)
            except Exception as error:  # noqa: BLE001 - any tracking error must not stop training
                self._warn(f"log_metric {key}={value} at step {step}", error)

    def _warn(self, action: str, error: Exception) -> None:
        self.failures += 1
        if self.failures <= WARNING_LIMIT or self.failures % 100 == 0:
            logger.warning(
                "MLflow tracking failed for run %s (%s, failure %d): %s",
                self.run_id, action, self.failures, error,
            )

    def close(self) -> None:
        if self.failures:
            logger.warning("MLflow tracking for run %s failed %d times", self.run_id, self.failures)


def tracker_from_env() -> Tracker:
    """Return an MlflowTracker for `ATMOREP_MLFLOW_RUN_ID`, or a NullTracker when it is unset.

    A tracker that cannot be created is logged as a warning and replaced by a NullTracker.
    """
    run_id = os.environ.get(RUN_ID_VARIABLE, "").strip()
    if not run_id:
        logger.info("%s is not set: metrics are not tracked", RUN_ID_VARIABLE)
        return NullTracker()
    try:
        tracker = MlflowTracker(run_id, os.environ.get("MLFLOW_TRACKING_URI"))
    except Exception as error:  # noqa: BLE001 - a missing tracker must not stop training
        logger.warning(
            "MLflow tracker for run %s could not be created, metrics are not tracked: %s", run_id, error
        )
        return NullTracker()
    logger.info("tracking metrics in MLflow run %s", run_id)
    return tracker
