"""Trace a registered model back through its runs to the data it came from.

Each stage run stores the run that produced its input in the tag
`atmorep.upstream_run_id` (fine-tune -> pretrain -> ingest). The ingest run stores the
catalog entry, with the source files and their sha256, as `catalog_entry.json`.
"""

from __future__ import annotations

import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tasks.registry import resolve_model
from tasks.tracking import (
    TAG_DATASET,
    TAG_DATASET_DIGEST,
    TAG_DATASET_VERSION,
    TAG_GIT_COMMIT,
    TAG_GIT_DIRTY,
    TAG_INIT_RUN,
    TAG_PARENT,
    TAG_PREFECT_FLOW_RUN,
    TAG_STAGE,
    TAG_RESUMED,
    TAG_UPSTREAM,
    TAG_VERSION_PREFIX,
    TAG_WEIGHTS_PARENT,
    client,
)

MAX_DEPTH = 20


def run_lineage(run_id: str, depth: int = 0) -> dict[str, Any]:
    """Return one run and, recursively under `upstream`, the run that produced its input."""
    run = client().get_run(run_id)
    tags = run.data.tags
    node: dict[str, Any] = {
        "run_id": run_id,
        "stage": tags.get(TAG_STAGE, "unknown"),
        "status": run.info.status,
        "started": datetime.fromtimestamp(run.info.start_time / 1000, tz=timezone.utc).isoformat(),
        "dataset": tags.get(TAG_DATASET),
        "dataset_digest": tags.get(TAG_DATASET_DIGEST),
        "dataset_version": tags.get(TAG_DATASET_VERSION),
        "git_commit": tags.get(TAG_GIT_COMMIT),
        "git_dirty": tags.get(TAG_GIT_DIRTY),
        "prefect_flow_run_id": tags.get(TAG_PREFECT_FLOW_RUN),
        "pipeline_run_id": tags.get(TAG_PARENT),
        "init_run_id": tags.get(TAG_INIT_RUN),
        "weights_parent_run_id": tags.get(TAG_WEIGHTS_PARENT),
        "resumed": tags.get(TAG_RESUMED) == "true",
        "package_versions": {
            key.removeprefix(TAG_VERSION_PREFIX): value
            for key, value in sorted(tags.items())
            if key.startswith(TAG_VERSION_PREFIX)
        },
        "upstream": None,
    }
    if node["stage"] == "ingest":
        node["sources"] = _ingest_sources(run_id)

    upstream = tags.get(TAG_UPSTREAM)
    if upstream and depth < MAX_DEPTH:
        node["upstream"] = run_lineage(upstream, depth + 1)
    return node


def model_lineage(model_uri: str) -> dict[str, Any]:
    """Return the chain from a model URI (`models:/NAME/VERSION`, a run id...) to its data."""
    resolved = resolve_model(model_uri)
    return {
        "model_uri": model_uri,
        "registered_model": resolved.name,
        "version": resolved.version,
        "run": run_lineage(resolved.run_id),
    }


def _ingest_sources(run_id: str) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client().download_artifacts(run_id, "catalog_entry.json", folder)
        except Exception:  # A run without the artifact simply has no known sources.
            return []
        entry = json.loads(Path(path).read_text())
    return entry.get("provenance", {}).get("sources", [])


def format_lineage(lineage: dict[str, Any]) -> str:
    """Render a lineage as an indented text tree, newest stage first."""
    title = lineage["model_uri"]
    if lineage["registered_model"]:
        title += f"  (registered model {lineage['registered_model']}, version {lineage['version']})"
    lines = [title]

    node = lineage["run"]
    indent = ""
    while node is not None:
        commit = (node["git_commit"] or "unknown")[:12]
        if node["git_dirty"] == "true":
            commit += " (uncommitted changes)"
        lines.append(f"{indent}└── {node['stage']} run {node['run_id']}  [{node['status']}, {node['started']}]")
        detail_indent = indent + "    "
        lines.append(f"{detail_indent}git commit: {commit}")
        if node["dataset"]:
            version = f"  version {node['dataset_version']}" if node["dataset_version"] else ""
            lines.append(f"{detail_indent}dataset: {node['dataset']}{version}  digest {node['dataset_digest']}")
        if node["prefect_flow_run_id"]:
            lines.append(f"{detail_indent}prefect flow run: {node['prefect_flow_run_id']}")
        if node["resumed"]:
            lines.append(f"{detail_indent}resumed from run: {node['weights_parent_run_id']}")
        elif node["weights_parent_run_id"] or node["init_run_id"]:
            lines.append(f"{detail_indent}initialised from run: {node['weights_parent_run_id'] or node['init_run_id']}")
        if node["package_versions"]:
            versions = ", ".join(f"{name} {version}" for name, version in node["package_versions"].items())
            lines.append(f"{detail_indent}packages: {versions}")
        for source in node.get("sources", []):
            lines.append(f"{detail_indent}source: {source.get('path')}  sha256 {source.get('sha256')}")
        node = node["upstream"]
        indent = detail_indent
    return "\n".join(lines)
