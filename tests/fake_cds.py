"""A fake CDS API on 127.0.0.1 that speaks the protocol of cdsapi 0.7 with ecmwf-datastores-client 0.5.

Routes, under `<url>` = `http://127.0.0.1:<port>/api`, as the client calls them:

| method and path | reply |
| --- | --- |
| GET `<url>/catalogue/v1/messages` | `{"messages": []}` (no key needed) |
| GET `<url>/retrieve/v1/processes/<dataset>` | the process, or 404 for an unknown dataset |
| POST `<url>/retrieve/v1/processes/<dataset>/execution` | 201 and the job, with a `monitor` link |
| GET `<url>/retrieve/v1/jobs/<id>` | status `running` for `polls_until_done` polls, then `successful` or `failed` |
| GET `<url>/retrieve/v1/jobs/<id>/results` | the asset (`href`, `file:size`, `type`), 400 if failed, 404 if running |
| DELETE `<url>/retrieve/v1/jobs/<id>` | the job, marked `dismissed` |
| HEAD or GET `/downloads/<id>/<file>` | the result file (no key needed, like the CDS object store) |

Every route under `<url>/retrieve` requires the header `PRIVATE-TOKEN: <key>` and returns
401 otherwise. `files_for_request(dataset, inputs)` chooses the files of a job: one file is
served as it is, several as a zip archive. Raising `FakeJobFailure` from it makes the job
fail with that message.
"""

from __future__ import annotations

import io
import json
import threading
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

REQUIRED_INPUTS = ("product_type", "variable", "year", "month", "day", "time", "data_format")
KNOWN_DATASETS = ("reanalysis-era5-single-levels", "reanalysis-era5-pressure-levels")


class FakeJobFailure(Exception):
    """Raised by `files_for_request` to make the job fail with this message."""


@dataclass
class FakeJob:
    job_id: str
    dataset: str
    inputs: dict
    polls: int = 0
    status: str = "accepted"
    content: bytes = b""
    file_name: str = ""
    content_type: str = ""
    failure: str | None = None
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())


class FakeCds:
    """The fake CDS API server, used as a context manager. `url` is the API URL for `.cdsapirc`."""

    def __init__(
        self,
        key: str,
        files_for_request: Callable[[str, dict], list[Path]],
        polls_until_done: int = 1,
    ) -> None:
        self.key = key
        self.files_for_request = files_for_request
        self.polls_until_done = polls_until_done
        self.jobs: dict[str, FakeJob] = {}
        self.rejected_requests = 0
        self.request_log: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-cds", daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def url(self) -> str:
        return f"{self.base_url}/api"

    @property
    def submissions(self) -> list[FakeJob]:
        with self._lock:
            return list(self.jobs.values())

    def __enter__(self) -> FakeCds:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # --- job handling, called from the request handler ---------------------------------

    def submit(self, dataset: str, inputs: dict) -> FakeJob:
        job = FakeJob(job_id=str(uuid.uuid4()), dataset=dataset, inputs=inputs)
        try:
            files = self.files_for_request(dataset, inputs)
        except FakeJobFailure as error:
            job.failure = str(error)
        else:
            job.content, job.file_name, job.content_type = _package(files, job.job_id, inputs["data_format"])
        with self._lock:
            self.jobs[job.job_id] = job
        return job

    def poll(self, job: FakeJob) -> None:
        with self._lock:
            job.polls += 1
            if job.status in ("accepted", "running"):
                if job.polls <= self.polls_until_done:
                    job.status = "running"
                else:
                    job.status = "failed" if job.failure else "successful"

    def job_document(self, job: FakeJob) -> dict:
        job_url = f"{self.url}/retrieve/v1/jobs/{job.job_id}"
        links = [{"href": job_url, "rel": "self", "type": "application/json"}]
        if job.status in ("successful", "failed"):
            links.append({"href": f"{job_url}/results", "rel": "results"})
        return {
            "processID": job.dataset,
            "type": "process",
            "jobID": job.job_id,
            "status": job.status,
            "created": job.created,
            "updated": datetime.now(timezone.utc).isoformat(),
            "metadata": {
                "log": [[job.created, "INFO: fake CDS job accepted"]],
                "request": {"ids": job.inputs},
            },
            "links": links,
        }

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        cds = self

        class Handler(_FakeCdsHandler):
            server_state = cds

        return Handler


class _FakeCdsHandler(BaseHTTPRequestHandler):
    server_state: FakeCds
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (name fixed by the base class)
        self.server_state.request_log.append((self.command, self.path))

    # --- routing --------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 (name fixed by the base class)
        self._route("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._route("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._route("DELETE")

    def _route(self, method: str) -> None:
        cds = self.server_state
        parts = urlsplit(self.path).path.strip("/").split("/")
        body = self._read_body()

        if parts[:1] == ["downloads"] and len(parts) == 3 and method in ("GET", "HEAD"):
            return self._send_download(parts[1], parts[2], head=method == "HEAD")
        if parts == ["api", "catalogue", "v1", "messages"] and method == "GET":
            return self._send_json(HTTPStatus.OK, {"messages": []})
        if parts[:3] != ["api", "retrieve", "v1"]:
            return self._send_error(HTTPStatus.NOT_FOUND, "Not found", f"no route for {self.path}")
        if self.headers.get("PRIVATE-TOKEN") != cds.key:
            with cds._lock:
                cds.rejected_requests += 1
            return self._send_error(HTTPStatus.UNAUTHORIZED, "Authentication failed", "invalid or missing API key")

        route = parts[3:]
        if route[:1] == ["processes"] and len(route) == 2 and method == "GET":
            return self._send_process(route[1])
        if route[:1] == ["processes"] and len(route) == 3 and route[2] == "execution" and method == "POST":
            return self._submit(route[1], body)
        if route[:1] == ["jobs"] and len(route) >= 2:
            job = cds.jobs.get(route[1])
            if job is None:
                return self._send_error(HTTPStatus.NOT_FOUND, "Job not found", f"no job {route[1]}")
            if len(route) == 2 and method == "GET":
                cds.poll(job)
                return self._send_json(HTTPStatus.OK, cds.job_document(job))
            if len(route) == 2 and method == "DELETE":
                job.status = "dismissed"
                return self._send_json(HTTPStatus.OK, cds.job_document(job))
            if len(route) == 3 and route[2] == "results" and method == "GET":
                return self._send_results(job)
        return self._send_error(HTTPStatus.NOT_FOUND, "Not found", f"no route for {method} {self.path}")

    # --- replies --------------------------------------------------------------------------

    def _send_process(self, dataset: str) -> None:
        if dataset not in KNOWN_DATASETS:
            return self._send_error(HTTPStatus.NOT_FOUND, "Process not found", f"no dataset {dataset}")
        execution = f"{self.server_state.url}/retrieve/v1/processes/{dataset}/execution"
        self._send_json(HTTPStatus.OK, {"id": dataset, "links": [{"href": execution, "rel": "execute"}]})

    def _submit(self, dataset: str, body: bytes) -> None:
        if dataset not in KNOWN_DATASETS:
            return self._send_error(HTTPStatus.NOT_FOUND, "Process not found", f"no dataset {dataset}")
        try:
            inputs = json.loads(body)["inputs"]
        except (ValueError, KeyError, TypeError):
            return self._send_error(HTTPStatus.BAD_REQUEST, "Invalid request", "body must be {'inputs': {...}}")
        missing = [name for name in REQUIRED_INPUTS if name not in inputs]
        if missing:
            return self._send_error(HTTPStatus.BAD_REQUEST, "Invalid request", f"missing inputs {missing}")

        job = self.server_state.submit(dataset, inputs)
        document = self.server_state.job_document(job)
        document["links"] = [{"href": document["links"][0]["href"], "rel": "monitor", "type": "application/json"}]
        self._send_json(HTTPStatus.CREATED, document)

    def _send_results(self, job: FakeJob) -> None:
        if job.status == "failed":
            return self._send_error(HTTPStatus.BAD_REQUEST, "The job has failed", job.failure or "")
        if job.status != "successful":
            return self._send_error(HTTPStatus.NOT_FOUND, "Results not ready", f"job {job.job_id} is {job.status}")
        href = f"{self.server_state.base_url}/downloads/{job.job_id}/{job.file_name}"
        asset = {"href": href, "file:size": len(job.content), "type": job.content_type}
        self._send_json(HTTPStatus.OK, {"asset": {"value": asset}})

    def _send_download(self, job_id: str, file_name: str, head: bool) -> None:
        job = self.server_state.jobs.get(job_id)
        if job is None or job.file_name != file_name or job.status != "successful":
            return self._send_error(HTTPStatus.NOT_FOUND, "Not found", f"no file {file_name}")
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", job.content_type)
        self.send_header("Content-Length", str(len(job.content)))
        self.end_headers()
        if not head:
            self.wfile.write(job.content)

    def _send_error(self, status: HTTPStatus, title: str, detail: str) -> None:
        self._send_json(status, {"type": "about:blank", "title": title, "status": int(status), "detail": detail})

    def _send_json(self, status: HTTPStatus, document: dict) -> None:
        content = json.dumps(document).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(content)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""


def _package(files: list[Path], job_id: str, data_format: str) -> tuple[bytes, str, str]:
    """Return the bytes, file name and MIME type of a job's result: one file, or a zip of several."""
    if len(files) == 1:
        suffix = ".grib" if data_format == "grib" else ".nc"
        content_type = "application/x-grib" if data_format == "grib" else "application/netcdf"
        return files[0].read_bytes(), f"{job_id}{suffix}", content_type
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as bundle:
        for path in files:
            bundle.write(path, arcname=path.name)
    return buffer.getvalue(), f"{job_id}.zip", "application/zip"
