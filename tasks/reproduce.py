"""Re-run a training run from what MLflow recorded about it, and compare the results.

A pretraining or fine-tuning run records its full training config (`run_config.json`),
its flow parameters (`params.json`), the git commit it ran from (and whether the
checkout had uncommitted changes), and the content digest of its dataset. Reproducing it
trains the same config again, on the catalog dataset with that digest, with the code of
that commit, into a new folder, and compares the final loss and step count with the
recorded ones. On CPU the training is deterministic, so the loss matches exactly.

The repository's own git state never changes: when the recorded commit is not the
checked-out one, its files are exported with `git archive` into a temporary folder.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tarfile
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from data_catalog import Catalog, atmorep_home
from data_catalog.schema import CatalogEntry
from tasks.registry import download_checkpoint
from tasks.tracking import (
    REPO_ROOT,
    TAG_CHECKPOINT_DIR,
    TAG_DATASET,
    TAG_DATASET_DIGEST,
    TAG_DATASET_VERSION,
    TAG_GIT_COMMIT,
    TAG_GIT_DIRTY,
    TAG_INIT_RUN,
    TAG_STAGE,
    client,
    code_version,
)
from tasks.training import launch_training

logger = logging.getLogger(__name__)

TRAINING_STAGES = ("pretrain", "finetune")


class ReproductionRejected(RuntimeError):
    """The run cannot be reproduced: its code, data or config is not available."""


@dataclass(frozen=True)
class MetricComparison:
    """One recorded metric beside its reproduced value."""

    name: str
    recorded: float | None
    reproduced: float | None

    @property
    def matches(self) -> bool:
        return self.recorded is not None and self.recorded == self.reproduced


@dataclass
class Reproduction:
    """The outcome of `reproduce_run`."""

    run_id: str
    stage: str
    commit: str
    code_source: str
    dataset: str
    dataset_digest: str
    output_dir: Path
    comparisons: list[MetricComparison] = field(default_factory=list)

    @property
    def matches(self) -> bool:
        return all(comparison.matches for comparison in self.comparisons)

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "stage": self.stage,
            "commit": self.commit,
            "code_source": self.code_source,
            "dataset": self.dataset,
            "dataset_digest": self.dataset_digest,
            "output_dir": str(self.output_dir),
            "matches": self.matches,
            "metrics": [
                {"name": item.name, "recorded": item.recorded, "reproduced": item.reproduced, "matches": item.matches}
                for item in self.comparisons
            ],
        }


def reproduce_run(run_id: str, allow_dirty: bool = False, nproc_per_node: int | None = None) -> Reproduction:
    """Train run `run_id` again from its recorded config, data and commit, and compare its final metrics.

    Raises ReproductionRejected when the run is not a training run, its commit is not in
    this repository, it ran with uncommitted changes (unless `allow_dirty`), or no catalog
    dataset has its content digest. `nproc_per_node` defaults to the recorded one; another
    count changes the batches each rank draws, so the loss is not expected to match.
    """
    run = client().get_run(run_id)
    tags = run.data.tags
    stage = tags.get(TAG_STAGE)
    if stage not in TRAINING_STAGES:
        raise ReproductionRejected(
            f"run {run_id} has stage {stage or 'none'}: only {' and '.join(TRAINING_STAGES)} runs can be reproduced"
        )

    commit = check_commit(run_id, tags, allow_dirty)
    entry = find_dataset(run_id, tags)
    config = _download_json(run_id, "run_config.json")
    params = _download_json(run_id, "params.json")
    processes = nproc_per_node or int(params.get("nproc_per_node", 1))

    output_dir = atmorep_home() / "reproductions" / f"{run_id}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}"
    with ExitStack() as stack:
        source_dir, code_source = code_checkout(commit, tags.get(TAG_GIT_DIRTY) == "true", stack)
        init_checkpoint = _init_checkpoint(run_id, tags, config) if stage == "finetune" else None
        logger.info(
            "reproducing %s run %s from commit %s (%s) on %s version %s into %s",
            stage, run_id, commit[:12], code_source, entry.name, entry.version, output_dir,
        )
        done = launch_training(
            config,
            output_dir,
            nproc_per_node=processes,
            init_checkpoint=init_checkpoint,
            dataset_path=Catalog().resolve_zarr_path(entry).resolve(),
            source_dir=source_dir,
        )

    recorded = run.data.metrics
    reproduction = Reproduction(
        run_id=run_id, stage=stage, commit=commit, code_source=code_source, dataset=entry.name,
        dataset_digest=entry.content_digest, output_dir=output_dir,
        comparisons=[
            MetricComparison(f"{stage}/final_loss", recorded.get(f"{stage}/final_loss"), float(done["loss"])),
            MetricComparison(f"{stage}/steps", recorded.get(f"{stage}/steps"), float(done["step"])),
        ],
    )
    reproduction.comparisons += compare_step_losses(tags.get(TAG_CHECKPOINT_DIR), output_dir)
    return reproduction


def check_commit(run_id: str, tags: dict[str, str], allow_dirty: bool) -> str:
    """Return the run's git commit after checking that this repository has it."""
    commit = tags.get(TAG_GIT_COMMIT)
    if not commit:
        raise ReproductionRejected(f"run {run_id} records no git commit (tag {TAG_GIT_COMMIT}), so its code is unknown")
    found = subprocess.run(
        ["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    if found.returncode != 0:
        raise ReproductionRejected(
            f"commit {commit} of run {run_id} is not in the repository {REPO_ROOT}: fetch it "
            "(git fetch --all) or reproduce from a clone that has it"
        )
    if tags.get(TAG_GIT_DIRTY) == "true" and not allow_dirty:
        raise ReproductionRejected(
            f"run {run_id} ran from commit {commit[:12]} with uncommitted changes, which were not recorded, so "
            "its code cannot be restored exactly; pass --allow-dirty to re-run it with the commit's code anyway "
            "(the checked-out code when that commit is checked out)"
        )
    return commit


def find_dataset(run_id: str, tags: dict[str, str]) -> CatalogEntry:
    """Return the catalog entry whose content digest is the one the run trained on."""
    digest = tags.get(TAG_DATASET_DIGEST)
    if not digest:
        raise ReproductionRejected(f"run {run_id} records no dataset digest (tag {TAG_DATASET_DIGEST})")
    catalog = Catalog()
    for name in catalog.names():
        entry = catalog.get(name)
        if entry.content_digest == digest:
            return entry
    raise ReproductionRejected(
        f"no dataset in the catalog {catalog.root} has content digest {digest}, which run {run_id} trained on "
        f"(dataset {tags.get(TAG_DATASET)!r} version {tags.get(TAG_DATASET_VERSION)}); its content has changed "
        "since, for example by an append: ingest the same sources again under another name to restore it"
    )


def code_checkout(commit: str, recorded_dirty: bool, stack: ExitStack) -> tuple[Path | None, str]:
    """Return the folder whose code runs the reproduction (None: this checkout) and a description.

    This checkout is used when it is at the recorded commit and either has no uncommitted
    changes or the run had some too (they were not recorded, so the current ones are the
    closest guess). Otherwise the commit is exported with `git archive`.
    """
    head, dirty = code_version()
    if head == commit and (not dirty or recorded_dirty):
        return None, "this checkout" + (" with its uncommitted changes" if dirty else "")

    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=f"atmorep-{commit[:12]}-")))
    archive = folder / "source.tar"
    subprocess.run(
        ["git", "archive", "--format=tar", f"--output={archive}", commit], cwd=REPO_ROOT, check=True,
        capture_output=True,
    )
    with tarfile.open(archive) as tar:
        tar.extractall(folder / "source", filter="data")
    return folder / "source", f"git archive of {commit[:12]}"


def compare_step_losses(recorded_dir: str | None, output_dir: Path) -> list[MetricComparison]:
    """Compare the per-step losses of the recorded run's `losses.jsonl` with the new one, when it is still on disk.

    Returns one comparison, `losses.jsonl steps equal`, recorded as the number of steps and
    reproduced as the number of steps with exactly the same loss.
    """
    if not recorded_dir or not (Path(recorded_dir) / "losses.jsonl").is_file():
        return []
    recorded = _read_losses(Path(recorded_dir) / "losses.jsonl")
    reproduced = _read_losses(output_dir / "losses.jsonl")
    equal = sum(1 for step, loss in recorded.items() if reproduced.get(step) == loss)
    return [MetricComparison("losses.jsonl steps equal", float(len(recorded)), float(equal))]


def format_reproduction(reproduction: Reproduction) -> str:
    """Render the comparison as a text table with a verdict line."""
    lines = [
        f"run {reproduction.run_id} ({reproduction.stage}), commit {reproduction.commit[:12]} "
        f"from {reproduction.code_source}",
        f"dataset {reproduction.dataset}, content digest {reproduction.dataset_digest[:16]}",
        f"output {reproduction.output_dir}",
        "",
        f"  {'metric':<26} {'recorded':>22} {'reproduced':>22}  match",
    ]
    for item in reproduction.comparisons:
        recorded = "missing" if item.recorded is None else repr(item.recorded)
        reproduced = "missing" if item.reproduced is None else repr(item.reproduced)
        lines.append(f"  {item.name:<26} {recorded:>22} {reproduced:>22}  {'yes' if item.matches else 'NO'}")
    lines += ["", "reproduced exactly" if reproduction.matches else "NOT reproduced: the metrics differ"]
    return "\n".join(lines)


def _read_losses(path: Path) -> dict[int, float]:
    losses = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        losses[record["step"]] = record["loss"]
    return losses


def _download_json(run_id: str, artifact: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client().download_artifacts(run_id, artifact, folder)
        except Exception as error:  # noqa: BLE001 - MLflow raises several types for a missing artifact
            raise ReproductionRejected(f"run {run_id} has no artifact {artifact}: {error}") from error
        return json.loads(Path(path).read_text())


def _init_checkpoint(run_id: str, tags: dict[str, str], config: dict[str, Any]) -> Path:
    """Return the weights a fine-tuning run started from: the checkpoint of its init run."""
    if config.get("family", "atmorep") != "atmorep":
        # A classifier fine-tuning starts from weights built by its flow, which are not logged.
        raise ReproductionRejected(
            f"fine-tuning run {run_id} trains a {config['family']} model, whose initial weights are not "
            "recorded: reproduce its pretraining run instead"
        )
    init_run_id = tags.get(TAG_INIT_RUN)
    if not init_run_id:
        raise ReproductionRejected(f"fine-tuning run {run_id} records no initial run (tag {TAG_INIT_RUN})")
    return download_checkpoint(init_run_id)
