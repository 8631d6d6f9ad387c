"""The `atmorep` command: one subcommand per flow, plus `lineage`, `reproduce`, `catalog` and `compare`.

Each flow subcommand builds its options from the flow's pydantic parameter model and
runs the same flow function that the Prefect deployment runs. Without `PREFECT_API_URL`
Prefect starts a temporary local server for the run; with it, the run is recorded by
that server.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

# Telemetry must be off before mlflow or prefect is imported.
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
# Prefect 3 waits 20 s by default for the temporary API server that a run without
# PREFECT_API_URL starts, which a loaded machine can exceed.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# Artifact downloads are small here; their progress bars would clutter the output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
if os.environ.get("PREFECT_HOME"):
    # Prefect does not create missing parents of its home folder.
    os.makedirs(os.environ["PREFECT_HOME"], exist_ok=True)

from flows.params import (  # noqa: E402
    EvaluateParams,
    FinetuneMaeParams,
    FinetuneParams,
    IngestEra5Params,
    IngestImagenetParams,
    PipelineParams,
    PretrainMaeParams,
    PretrainParams,
)

logger = logging.getLogger("atmorep")

# Errors caused by the input or the environment: reported as a one-line message, not a
# traceback. Run with --log-level DEBUG to see the traceback too.
USER_ERRORS = (FileNotFoundError, LookupError, ValueError, RuntimeError)


def _option_kwargs(annotation: Any) -> dict[str, Any]:
    """Return argparse keyword arguments for a pydantic field type."""
    origin = typing.get_origin(annotation)
    arguments = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        non_null = [argument for argument in arguments if argument is not type(None)]
        return _option_kwargs(non_null[0])
    if origin is typing.Literal:
        return {"choices": list(arguments)}
    if origin is list:
        return {"nargs": "+", "type": arguments[0]}
    if origin is dict:
        # One NAME=VALUE per use of the option, so that positional arguments may follow it.
        # The parameter model parses the list of strings into the mapping.
        return {"action": "append", "type": str, "metavar": "NAME=VALUE"}
    if origin is tuple:
        metavar = ("START", "END") if len(arguments) == 2 else None
        return {"nargs": len(arguments), "type": arguments[0], "metavar": metavar}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    return {"type": annotation}


def add_model_options(parser: argparse.ArgumentParser, model: type[BaseModel], positional: Sequence[str] = ()) -> None:
    """Add one option per field of `model`; fields in `positional` become positional arguments."""
    for name, field in model.model_fields.items():
        kwargs = _option_kwargs(field.annotation)
        default = field.get_default(call_default_factory=True)
        help_text = field.description or ""
        # A field may name its values for the help text: json_schema_extra={"metavar": ...}.
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if "metavar" in extra:
            kwargs["metavar"] = tuple(extra["metavar"]) if isinstance(extra["metavar"], list) else extra["metavar"]
        if name in positional:
            # List fields already take "+" values from _option_kwargs, other fields take one value.
            parser.add_argument(name, help=help_text, **{k: v for k, v in kwargs.items() if k != "metavar"})
            continue
        if isinstance(default, tuple):
            help_text += f" (default: {' '.join(map(str, default))})"
        elif default is not None and default != [] and default != {}:
            help_text += f" (default: {default})"
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, help=help_text, **kwargs)


def build_params(model: type[BaseModel], arguments: argparse.Namespace) -> BaseModel:
    """Validate the options the user gave against the flow's parameter model."""
    given = {name: getattr(arguments, name) for name in model.model_fields if getattr(arguments, name, None) is not None}
    return model(**given)


def format_validation_error(error: ValidationError) -> str:
    """Render pydantic errors as one line per invalid option, without input dumps."""
    lines = []
    for detail in error.errors():
        option = "--" + "-".join(str(part) for part in detail["loc"]).replace("_", "-") if detail["loc"] else "options"
        lines.append(f"{option}: {detail['msg'].removeprefix('Value error, ')}")
    return "; ".join(lines)


def _run_ingest(params: IngestEra5Params) -> dict:
    from flows.ingest import ingest

    return ingest(params)


def _run_ingest_imagenet(params: IngestImagenetParams) -> dict:
    from flows.imagenet import ingest

    return ingest(params)


def _run_pretrain(params: PretrainParams) -> dict:
    from flows.pretrain import pretrain

    return pretrain(params)


def _run_pretrain_mae(params: PretrainMaeParams) -> dict:
    from flows.mae import pretrain

    return pretrain(params)


def _run_finetune_mae(params: FinetuneMaeParams) -> dict:
    from flows.mae import finetune

    return finetune(params)


def _run_evaluate(params: EvaluateParams) -> dict:
    from flows.evaluate import evaluate

    return evaluate(params)


def _run_finetune(params: FinetuneParams) -> dict:
    from flows.finetune import finetune

    return finetune(params)


def _run_pipeline(params: PipelineParams) -> dict:
    from flows.pipeline import pipeline

    return pipeline(params)


# (command, subcommand or None, parameter model, runner, positional fields, help)
FLOW_COMMANDS: list[tuple[str, str | None, type[BaseModel], Callable, tuple[str, ...], str]] = [
    ("ingest", "era5", IngestEra5Params, _run_ingest, ("sources",),
     "ingest ERA5 GRIB or NetCDF files into a normalised Zarr dataset (flow ingest/era5)"),
    ("ingest", "imagenet", IngestImagenetParams, _run_ingest_imagenet, ("source",),
     "ingest an ImageNet-style image folder into a uint8 Zarr dataset (flow ingest/imagenet)"),
    ("pretrain", "atmorep", PretrainParams, _run_pretrain, (),
     "pretrain an AtmoRep-style model with torchrun (flow pretrain/atmorep)"),
    ("pretrain", "mae", PretrainMaeParams, _run_pretrain_mae, (),
     "pretrain a masked autoencoder on an image dataset with torchrun (flow pretrain/mae)"),
    ("evaluate", "zero-shot", EvaluateParams, _run_evaluate, (),
     "score a model zero-shot against baselines (flow evaluate/zero-shot)"),
    ("finetune", "atmorep", FinetuneParams, _run_finetune, (),
     "fine-tune a pretrained model for one task and evaluate it (flow finetune/atmorep)"),
    ("finetune", "mae", FinetuneMaeParams, _run_finetune_mae, (),
     "train a linear probe or fine-tune a masked autoencoder for image classification (flow finetune/mae)"),
    ("pipeline", None, PipelineParams, _run_pipeline, (),
     "run ingest, pretrain, zero-shot evaluation and fine-tuning (flow pipeline/end-to-end)"),
]

# Help of commands whose subcommands run different flows.
COMMAND_HELP = {
    "ingest": "ingest ERA5 files or an image folder into a Zarr dataset in the catalog",
    "pretrain": "pretrain an AtmoRep-style model on ERA5 or a masked autoencoder on images",
    "finetune": "fine-tune an AtmoRep-style model or train a classifier on a masked autoencoder",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atmorep",
        description="Self-supervised pretraining of AtmoRep-style models on ERA5. MLflow store: "
        "MLFLOW_TRACKING_URI, else sqlite under $ATMOREP_HOME (default ./runs).",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    commands = parser.add_subparsers(dest="command", required=True)

    subcommand_groups: dict[str, argparse._SubParsersAction] = {}
    for command, subcommand, model, runner, positional, help_text in FLOW_COMMANDS:
        if subcommand is None:
            command_parser = commands.add_parser(command, help=help_text, description=help_text)
        else:
            if command not in subcommand_groups:
                group_help = COMMAND_HELP.get(command, help_text)
                group_parser = commands.add_parser(command, help=group_help, description=group_help)
                subcommand_groups[command] = group_parser.add_subparsers(dest="subcommand", required=True)
            command_parser = subcommand_groups[command].add_parser(subcommand, help=help_text, description=help_text)
        add_model_options(command_parser, model, positional)
        command_parser.set_defaults(model=model, runner=runner)

    lineage = commands.add_parser(
        "lineage", help="print the chain from a model to its runs and data",
        description="Print the chain from a registered model back to its runs and source files.",
    )
    lineage.add_argument("model_uri", help="models:/NAME/VERSION, models:/NAME/latest, models:/NAME@ALIAS or a run id")
    lineage.add_argument("--format", choices=["text", "json"], default="text", help="output format (default: text)")
    lineage.set_defaults(runner=None)

    reproduce = commands.add_parser(
        "reproduce", help="train a run again from its recorded config, data and commit, and compare its metrics",
        description="Train a pretraining or fine-tuning run again from its recorded config, on the catalog "
        "dataset with its recorded content digest, with the code of its recorded git commit, and compare the "
        "final loss and step count. Exits with 0 when they match exactly, 3 when they differ, 1 when the run "
        "cannot be reproduced.",
    )
    reproduce.add_argument("run_id", help="MLflow run id of a pretrain or finetune stage")
    reproduce.add_argument(
        "--allow-dirty", action="store_true",
        help="reproduce a run that ran with uncommitted changes, with the code of its commit",
    )
    reproduce.add_argument(
        "--nproc-per-node", type=int, default=None,
        help="training processes (default: the recorded count; another count changes the losses)",
    )
    reproduce.add_argument("--format", choices=["text", "json"], default="text", help="output format (default: text)")
    reproduce.set_defaults(runner=None)

    catalog = commands.add_parser("catalog", help="list or show the datasets in the catalog")
    catalog_commands = catalog.add_subparsers(dest="subcommand", required=True)
    catalog_commands.add_parser(
        "list", help="list every dataset: name, kind, version, time range and content digest"
    )
    show = catalog_commands.add_parser(
        "show", help="print one dataset's catalog entry as YAML, with its version and digests"
    )
    show.add_argument("name", help="dataset name")
    catalog.set_defaults(runner=None)

    compare = commands.add_parser(
        "compare", help="print and plot several evaluation runs side by side",
        description="Set the scores of several evaluation runs (zero-shot, fine-tuned, other configs) side by "
        "side: a table on stdout, and a CSV file and skill plots in the output folder.",
    )
    compare.add_argument("run_ids", nargs="+", metavar="RUN_ID", help="MLflow run ids of evaluate or finetune stages")
    compare.add_argument(
        "--metric", default="rmse",
        help="score to compare: rmse, mae, bias, acc, crps, spread, spread_skill_ratio or small_scale_power_ratio "
        "(default: rmse)",
    )
    compare.add_argument(
        "--output", default=None,
        help="folder for the CSV file and plots (default: $ATMOREP_HOME/comparisons/<short run ids>)",
    )
    compare.set_defaults(runner=None)
    return parser


def run_catalog_command(arguments: argparse.Namespace) -> str:
    """Return the output of `atmorep catalog list` or `atmorep catalog show NAME`.

    `list` prints one line per dataset: name, kind, version, first and last time, and the
    first 16 hex digits of the content digest. `show` prints the whole entry as YAML after
    comment lines with the version and both full digests.
    """
    import yaml

    from data_catalog import Catalog

    catalog = Catalog()
    if arguments.subcommand == "show":
        entry = catalog.get(arguments.name)
        header = (
            f"# dataset {entry.name} version {entry.version}\n"
            f"# content digest (data and statistics): {entry.content_digest}\n"
            f"# recipe digest (sources and parameters): {entry.digest}\n"
        )
        return header + yaml.safe_dump(entry.model_dump(mode="json"), sort_keys=False)

    lines = [f"{'name':<32} {'kind':<7} {'version':>7} {'first time':<20} {'last time':<20} content digest"]
    for name in catalog.names():
        record = catalog.get(name).model_dump(mode="json")
        lines.append(
            f"{name:<32} {record.get('kind', 'era5'):<7} {record['version']:>7} "
            f"{str(record.get('time_start', '-')):<20} {str(record.get('time_end', '-')):<20} "
            f"{record['content_digest'][:16]}"
        )
    if len(lines) == 1:
        lines.append(f"(no datasets in {catalog.root}; run `atmorep ingest era5` first)")
    return "\n".join(lines)


def format_scores(title: str, rows: list[dict]) -> list[str]:
    """Render score rows as aligned text lines: the model beside its baseline.

    Scores show 4 significant digits, because RMSEs range from about 1 (K) to 1e-4 (kg/kg).
    """
    lines = ["", title, f"  {'task':<14} {'variable':<9} {'lead/gap':<10} {'model':>8}  baseline"]
    for row in rows:
        lines.append(
            f"  {row['task']:<14} {row['variable']:<9} {row['lead_or_gap']:<10} "
            f"{row['model']:>8.4g}  {row['baseline']} {row['baseline_value']:.4g}"
        )
    return lines


SCORES_FOOTER = [
    "",
    "RMSE in physical units (K for t2m), cosine-latitude weighted, on the test period.",
    "Open the UIs with `make ui`: Prefect at http://127.0.0.1:4200, MLflow at http://127.0.0.1:5000",
]


def format_summary(summary: dict) -> str:
    """Render the pipeline summary: the stage runs, then model against baseline scores."""
    lines = ["", "Stages", f"  {'stage':<10} {'MLflow run':<34} output"]
    for stage in summary["stages"]:
        lines.append(f"  {stage['stage']:<10} {stage['run_id']:<34} {stage['output']}")
    lines += format_scores("Zero-shot scores", summary["zero_shot"])
    lines += format_scores("Fine-tuned scores", summary["finetuned"])
    return "\n".join(lines + SCORES_FOOTER)


def format_result(result: dict) -> str:
    """Render a stage's result: its score table when it has one, else its fields as JSON."""
    if "rows" not in result:
        return json.dumps(result, indent=2, default=str)
    header = {key: value for key, value in result.items() if key not in ("rows", "metrics")}
    lines = [json.dumps(header, indent=2, default=str)]
    lines += format_scores("Scores", result["rows"])
    return "\n".join(lines + SCORES_FOOTER)


def run_reproduce_command(arguments: argparse.Namespace) -> int:
    """Run `atmorep reproduce` and return its exit status: 0 matched, 3 differed, 1 rejected."""
    from tasks.reproduce import format_reproduction, reproduce_run

    try:
        reproduction = reproduce_run(arguments.run_id, arguments.allow_dirty, arguments.nproc_per_node)
    except USER_ERRORS as error:
        sys.stderr.write(f"atmorep reproduce: error: {error}\n")
        return 1
    if arguments.format == "json":
        output = json.dumps(reproduction.as_dict(), indent=2)
    else:
        output = format_reproduction(reproduction)
    sys.stdout.write(output + "\n")
    return 0 if reproduction.matches else 3


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """Turn SIGTERM into SystemExit, so training is stopped and the temporary Prefect server shut down."""
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = build_parser()
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=arguments.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    if arguments.command == "lineage":
        from tasks.lineage import format_lineage, model_lineage

        try:
            lineage = model_lineage(arguments.model_uri)
        except USER_ERRORS as error:
            sys.stderr.write(f"atmorep lineage: error: {error}\n")
            return 1
        output = json.dumps(lineage, indent=2) if arguments.format == "json" else format_lineage(lineage)
        sys.stdout.write(output + "\n")
        return 0

    if arguments.command == "reproduce":
        return run_reproduce_command(arguments)

    if arguments.command == "compare":
        from tasks.compare import compare_runs

        try:
            text, paths = compare_runs(arguments.run_ids, arguments.metric, arguments.output)
        except USER_ERRORS as error:
            sys.stderr.write(f"atmorep compare: error: {error}\n")
            return 1
        sys.stdout.write(text + "\n\nWritten: " + ", ".join(str(path) for path in paths) + "\n")
        return 0

    if arguments.command == "catalog":
        try:
            sys.stdout.write(run_catalog_command(arguments) + "\n")
        except USER_ERRORS as error:
            sys.stderr.write(f"atmorep catalog: error: {error}\n")
            return 1
        return 0

    try:
        params = build_params(arguments.model, arguments)
    except ValidationError as error:
        parser.error(format_validation_error(error))

    try:
        result = arguments.runner(params)
    except USER_ERRORS as error:
        # The flow run has failed and logged its traceback; the user needs the message.
        logger.debug("flow failed", exc_info=True)
        sys.stderr.write(f"atmorep {arguments.command}: error: {error}\n")
        return 1

    if arguments.command == "pipeline":
        sys.stdout.write(format_summary(result) + "\n")
    else:
        sys.stdout.write(format_result(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
