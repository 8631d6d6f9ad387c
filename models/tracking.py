"""Metric tracking for training, the only place where `models` touches MLflow.

The training process does not create MLflow runs. The launcher creates the run and passes
its id in `ATMOREP_MLFLOW_RUN_ID`, with the tracking server or store in
`MLFLOW_TRACKING_URI`. Without a run id nothing is tracked.

Training never stops for a tracking error. Metrics that cannot be sent are appended to a
local buffer file (JSON lines, one metric with its step and timestamp each) and sent again
with `log_batch` once the server answers, at the latest when the tracker closes. Each
metric keeps the timestamp of its first attempt, so a batch that reached the server before
the connection broke is sent again with identical values, which MLflow's SQL store
stores once (it drops metrics whose key, value, step and timestamp already exist).
Whatever is still buffered when training ends is sent by the flow with `sync_buffer`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)

RUN_ID_VARIABLE = "ATMOREP_MLFLOW_RUN_ID"
RETRY_VARIABLE = "ATMOREP_TRACKING_RETRY_S"
BUFFER_NAME = "metrics-buffer.jsonl"
# After this many failed calls, only every 100th further failure is logged.
WARNING_LIMIT = 5
# Seconds between attempts to reach the server again after a failure.
DEFAULT_RETRY_S = 30.0
# MLflow accepts at most 1000 metrics per log_batch call (mlflow 3.17).
BATCH_LIMIT = 1000


class Tracker(Protocol):
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class NullTracker:
    """Tracker that discards every metric."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        return None

    def close(self) -> None:
        return None


def read_buffer(path: Path) -> list[dict[str, Any]]:
    """Return the metric records of a buffer file, skipping a last line cut short by a crash."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("skipping unreadable line %d of metrics buffer %s", number, path)
    return records


def send_records(client: Any, run_id: str, records: list[dict[str, Any]]) -> None:
    """Send buffered metric records with `log_batch`, in batches of at most 1000.

    Each record goes to the run named in its `run_id` field, else to `run_id`, so that a
    buffer left in a checkpoint folder by an interrupted run reaches that run.
    """
    from mlflow.entities import Metric

    by_run: dict[str, list[Metric]] = {}
    for record in records:
        metric = Metric(record["key"], record["value"], record["timestamp"], record["step"])
        by_run.setdefault(record.get("run_id", run_id), []).append(metric)
    for target, metrics in by_run.items():
        for start in range(0, len(metrics), BATCH_LIMIT):
            client.log_batch(target, metrics=metrics[start:start + BATCH_LIMIT])


def sync_buffer(client: Any, run_id: str, path: Path) -> int:
    """Send every metric left in the buffer file `path` to its run (default `run_id`), then delete the file.

    Returns the number of metrics sent. A failure raises the client's error and keeps the
    file for a later attempt.
    """
    records = read_buffer(path)
    if records:
        send_records(client, run_id, records)
    path.unlink(missing_ok=True)
    return len(records)


class MlflowTracker:
    """Tracker that logs metrics to an existing MLflow run, buffering them while it is unreachable.

    `buffer_path` is the local file for metrics that could not be sent (default: none, so
    they are kept in memory only). A buffer left by an earlier process for the same file
    is sent first. After a failure the tracker tries the server again every `retry_s`
    seconds, and buffers in between without waiting on the network.
    """

    def __init__(
        self,
        run_id: str,
        tracking_uri: str | None = None,
        buffer_path: Path | None = None,
        retry_s: float = DEFAULT_RETRY_S,
    ) -> None:
        # Importing mlflow starts a telemetry thread unless this is set first (mlflow 3.17).
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        # MLflow's HTTP client retries a refused connection with exponential backoff, up to
        # minutes per call by default. The tracker retries itself, so one short try is enough.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.buffer_path = Path(buffer_path) if buffer_path is not None else None
        self.retry_s = retry_s
        self.failures = 0
        self.pending: list[dict[str, Any]] = read_buffer(self.buffer_path) if self.buffer_path else []
        # The first `persisted` pending metrics are already in the buffer file.
        self.persisted = len(self.pending)
        self.next_attempt = 0.0
        if self.pending:
            logger.info("%d buffered metrics of run %s found in %s", len(self.pending), run_id, self.buffer_path)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        timestamp = int(time.time() * 1000)
        self.pending.extend(
            {"run_id": self.run_id, "key": key, "value": float(value), "step": int(step), "timestamp": timestamp}
            for key, value in metrics.items()
        )
        if time.monotonic() < self.next_attempt or not self._flush(f"log_batch at step {step}"):
            self._persist()

    def _persist(self) -> None:
        """Append the pending metrics that are not in the buffer file yet."""
        if self.buffer_path is None or self.persisted == len(self.pending):
            return
        try:
            self.buffer_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.buffer_path, "a", encoding="utf-8") as buffer:
                buffer.writelines(json.dumps(record) + "\n" for record in self.pending[self.persisted:])
        except OSError as error:
            logger.warning("metrics buffer %s not writable, metrics are kept in memory only: %s", self.buffer_path, error)
            return
        self.persisted = len(self.pending)

    def _flush(self, action: str) -> bool:
        """Send every pending metric and return True; on failure keep them and wait `retry_s` before the next try."""
        if not self.pending:
            return True
        try:
            send_records(self.client, self.run_id, self.pending)
        except Exception as error:  # noqa: BLE001 - any tracking error must not stop training
            self.next_attempt = time.monotonic() + self.retry_s
            self._warn(action, error)
            return False

        if self.failures:
            logger.info("MLflow reachable again: sent %d buffered metrics of run %s", len(self.pending), self.run_id)
        self._clear()
        return True

    def _clear(self) -> None:
        self.pending = []
        self.persisted = 0
        if self.buffer_path is not None:
            self.buffer_path.unlink(missing_ok=True)

    def _warn(self, action: str, error: Exception) -> None:
        self.failures += 1
        if self.failures <= WARNING_LIMIT or self.failures % 100 == 0:
            logger.warning(
                "MLflow tracking failed for run %s (%s, failure %d), %d metrics buffered: %s",
                self.run_id, action, self.failures, len(self.pending), error,
            )

    def close(self) -> None:
        """Try once more to send the buffered metrics; whatever fails stays in the buffer file."""
        if not self.pending:
            return
        try:
            send_records(self.client, self.run_id, self.pending)
        except Exception as error:  # noqa: BLE001 - any tracking error must not stop training
            where = f"in {self.buffer_path}" if self.buffer_path else "in memory and are lost"
            logger.warning(
                "MLflow tracking for run %s failed %d times; %d metrics remain %s: %s",
                self.run_id, self.failures, len(self.pending), where, error,
            )
            return
        logger.info("sent %d buffered metrics of run %s at close", len(self.pending), self.run_id)
        self._clear()


def tracker_from_env(buffer_path: Path | None = None) -> Tracker:
    """Return an MlflowTracker for `ATMOREP_MLFLOW_RUN_ID`, or a NullTracker when it is unset.

    `buffer_path` is where metrics wait while the server is unreachable, and
    `ATMOREP_TRACKING_RETRY_S` sets the seconds between attempts (default 30). A tracker
    that cannot be created is logged as a warning and replaced by a NullTracker.
    """
    run_id = os.environ.get(RUN_ID_VARIABLE, "").strip()
    if not run_id:
        logger.info("%s is not set: metrics are not tracked", RUN_ID_VARIABLE)
        return NullTracker()
    retry_text = os.environ.get(RETRY_VARIABLE, str(DEFAULT_RETRY_S))
    try:
        retry_s = float(retry_text)
    except ValueError:
        logger.warning("%s=%r is not a number of seconds, using %s", RETRY_VARIABLE, retry_text, DEFAULT_RETRY_S)
        retry_s = DEFAULT_RETRY_S
    try:
        tracker = MlflowTracker(run_id, os.environ.get("MLFLOW_TRACKING_URI"), buffer_path, retry_s)
    except Exception as error:  # noqa: BLE001 - a missing tracker must not stop training
        logger.warning(
            "MLflow tracker for run %s could not be created, metrics are not tracked: %s", run_id, error
        )
        return NullTracker()
    logger.info("tracking metrics in MLflow run %s", run_id)
    return tracker
