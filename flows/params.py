"""Flow parameters, one pydantic model per flow.

Prefect renders these models as validated forms in its UI, the CLI builds its options
from them, and every stage logs its model to MLflow as `params.json`. The defaults run
the demo: the UK hourly 2 m temperature of March 2019.
"""

from __future__ import annotations

from typing import Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEMO_SAMPLE = "era5-2mt-2019-03-uk"
DEMO_DATASET = "era5-t2m-uk-2019-03"
DEMO_TRAIN_PERIOD = ("2019-03-01T00:00", "2019-03-24T23:00")
DEMO_TEST_PERIOD = ("2019-03-25T00:00", "2019-03-31T23:00")
DEFAULT_MODEL_URI = "models:/atmorep/latest"
IMAGENET_SAMPLE = "imagenet-sample"


def check_periods(train_period: tuple[str, str], test_period: tuple[str, str] | None) -> None:
    """Raise ValueError unless both periods parse, are ordered, and training ends before testing.

    `test_period` None (a dataset that is not evaluated) checks the train period only.
    """
    parsed = {}
    periods = [("train_period", train_period)] + ([("test_period", test_period)] if test_period is not None else [])
    for label, period in periods:
        try:
            start, end = (pd.Timestamp(value) for value in period)
        except ValueError as error:
            raise ValueError(f"{label} {period} is not a pair of ISO 8601 times: {error}") from error
        if start > end:
            raise ValueError(f"{label} {period} starts after it ends")
        parsed[label] = (start, end)
    if test_period is not None and parsed["train_period"][1] >= parsed["test_period"][0]:
        raise ValueError(
            f"train_period {train_period} must end before test_period {test_period} starts, "
            "so that the test period stays unseen by statistics and training"
        )


class FlowParams(BaseModel):
    """Fields shared by every stage: where it is tracked and how it links to others."""

    model_config = ConfigDict(extra="forbid")

    experiment: str = Field("atmorep", description="MLflow experiment that receives the run")
    parent_run_id: str | None = Field(
        None, description="MLflow run to nest this stage's run under (set by the pipeline)"
    )
    upstream_run_id: str | None = Field(
        None,
        description="MLflow run of the stage that produced this stage's input "
        "(found from the dataset or model when not given)",
    )


class IngestEra5Params(FlowParams):
    """Parameters of `ingest/era5`."""

    sources: list[str] = Field(
        [f"sample:{DEMO_SAMPLE}"],
        min_length=1,
        description="GRIB or NetCDF files or globs, sample:NAME for a catalog sample, cds:REQUEST.yaml or "
        "cds:{json} for a CDS API request (fields of tasks.sources.CdsRequest), or "
        "zarr:URL?variables=t2m,u&levels=500,850&area=N,W,S,E&time=START,END or zarr:{json} for a selection "
        "of a Zarr store laid out like ARCO-ERA5 or WeatherBench 2. CDS dates and the Zarr time default to "
        "the start of train_period through the end of test_period (of train_period without a test period).",
    )
    name: str = Field(DEMO_DATASET, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="dataset name in the catalog")
    variables: list[str] | None = Field(
        None,
        description="variables to keep, by name (default: every ERA5 parameter; other variables are skipped "
        "with a warning unless named here)",
    )
    train_period: tuple[str, str] = Field(
        DEMO_TRAIN_PERIOD, description="first and last time step of the training period (ISO 8601)"
    )
    test_period: tuple[str, str] | None = Field(
        DEMO_TEST_PERIOD,
        description="first and last time step of the test period (ISO 8601); None, or 'none none' on the "
        "command line, for a dataset that is not evaluated, such as a single time step",
    )
    time_chunk: int = Field(24, ge=1, description="time steps per Zarr chunk")
    area: tuple[float, float, float, float] | None = Field(
        None,
        description="crop to north, west, south, east in degrees; west > east crosses the 180° meridian "
        "(default: the whole grid)",
        json_schema_extra={"metavar": ["N", "W", "S", "E"]},
    )
    longitude_convention: Literal["-180..180", "0..360"] = Field(
        "-180..180", description="longitude range of the stored grid, in degrees"
    )
    coarsen_factor: int = Field(
        1, ge=1, description="average blocks of N x N grid points with cell-area weights (1 keeps the grid)"
    )
    normalisation: dict[str, Literal["global", "local"]] = Field(
        default_factory=dict,
        description="normalisation scheme per variable as VARIABLE=SCHEME: global (mean and std per level) or "
        "local (per calendar month, level and grid point); unlisted variables use global",
        json_schema_extra={"metavar": "VARIABLE=SCHEME"},
    )
    on_time_gaps: Literal["error", "keep"] = Field(
        "error", description="missing or irregular time steps: error, or keep them with their true times"
    )
    grib_decoder: Literal["auto", "eccodes", "cfgrib"] = Field(
        "auto",
        description="how GRIB sources are decoded: eccodes reads the messages directly and decodes and writes "
        "on a dask cluster; cfgrib decodes through xarray in this process; auto uses eccodes when the GRIB "
        "sources hold at least 32 MiB of values as float32 (before cropping) and cfgrib below that. NetCDF "
        "and Zarr sources, and GRIB files that the eccodes path does not support, always use the cfgrib path",
    )
    scheduler_address: str | None = Field(
        None,
        description="address of a dask.distributed scheduler (tcp://HOST:PORT) that decodes and writes GRIB "
        "regions when the eccodes decoder is used (see grib_decoder); default: a local dask cluster on "
        "127.0.0.1, one worker process per core, started per ingest. Unused with the cfgrib decoder",
    )
    append: bool = Field(
        False,
        description="append the sources' time steps after the last time of the published dataset `name`, "
        "normalised with its stored statistics; the dataset's own periods and grid options apply, and the "
        "period and grid options given here are ignored",
    )

    @field_validator("test_period", mode="before")
    @classmethod
    def _parse_no_test_period(cls, value: object) -> object:
        """Read the command-line form `--test-period none none` as None."""
        if isinstance(value, (list, tuple)) and [str(item).lower() for item in value] == ["none", "none"]:
            return None
        return value

    @field_validator("normalisation", mode="before")
    @classmethod
    def _parse_normalisation(cls, value: object) -> object:
        """Accept VARIABLE=SCHEME strings, as the CLI passes them, besides a mapping."""
        if isinstance(value, (list, tuple)):
            pairs = {}
            for item in value:
                variable, separator, scheme = str(item).partition("=")
                if not separator or not variable:
                    raise ValueError(f"normalisation item {item!r} is not VARIABLE=SCHEME, for example t2m=local")
                pairs[variable] = scheme
            return pairs
        return value

    @model_validator(mode="after")
    def _check_periods(self) -> "IngestEra5Params":
        check_periods(self.train_period, self.test_period)
        return self


class IngestImagenetParams(FlowParams):
    """Parameters of `ingest/imagenet`."""

    source: str = Field(
        f"sample:{IMAGENET_SAMPLE}",
        description="image folder (class folders such as .../train, or a flat folder with labels.tsv), "
        f"or sample:{IMAGENET_SAMPLE} for the copy under ATMOREP_DATA_MIRROR",
    )
    name: str = Field(
        IMAGENET_SAMPLE, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="dataset name in the catalog"
    )
    size: int = Field(224, ge=1, description="height and width of the stored square images in pixels")
    crop_fraction: float = Field(
        0.875, gt=0, le=1,
        description="centre crop as a fraction of the resized shorter side: the shorter side is resized "
        "to size / crop_fraction pixels (256 for 224), then a size x size centre crop is kept",
    )
    layout: Literal["auto", "imagefolder", "flat"] = Field(
        "auto", description="source layout: auto reads a folder with labels.tsv as flat and others as class folders"
    )
    chunk_images: int = Field(64, ge=1, description="images per Zarr chunk, also the unit of resuming")
    workers: int | None = Field(None, ge=1, description="image decoding threads (default: CPU count, at most 8)")


class TrainingParams(FlowParams):
    """Settings shared by pretraining and fine-tuning."""

    max_steps: int | None = Field(None, ge=1, description="optimiser steps (default: the preset's)")
    batch_size: int | None = Field(None, ge=1, description="samples per step on each rank (default: the preset's)")
    learning_rate: float | None = Field(None, gt=0, description="peak learning rate (default: the preset's)")
    seed: int | None = Field(None, ge=0, description="random seed (default: the preset's)")
    nproc_per_node: int = Field(
        2, ge=1, description="torchrun processes on this node: CPU cores with gloo, or GPUs with nccl"
    )
    nnodes: str = Field(
        "1",
        pattern=r"^[1-9][0-9]*(:[1-9][0-9]*)?$",
        description="nodes in the job, N or MIN:MAX for an elastic job; more than 1 needs rdzv_endpoint",
    )
    node_rank: int | None = Field(
        None, ge=0, description="this node's rank, needed with rdzv_backend static (c10d assigns ranks)"
    )
    rdzv_backend: Literal["c10d", "static"] = Field(
        "c10d", description="torchrun rendezvous backend for a multi-node job"
    )
    rdzv_endpoint: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9.\-]+:[0-9]{1,5}$",
        description="HOST:PORT of the rendezvous on the first node, the same on every node "
        "(default: a standalone single-node job)",
    )
    rdzv_id: str = Field(
        "atmorep",
        pattern=r"^[A-Za-z0-9._-]+$",
        description="job id, the same on every node of one job and different from other jobs sharing the endpoint",
    )
    max_restarts: int = Field(
        0,
        ge=0,
        description="times torchrun restarts all workers after one fails; they resume from the last checkpoint",
    )

    @model_validator(mode="after")
    def _check_rendezvous(self) -> "TrainingParams":
        max_nodes = int(self.nnodes.split(":")[-1])
        min_nodes = int(self.nnodes.split(":")[0])
        if min_nodes > max_nodes:
            raise ValueError(f"nnodes {self.nnodes!r} has MIN above MAX: write MIN:MAX with MIN <= MAX")
        if max_nodes > 1 and self.rdzv_endpoint is None:
            raise ValueError(
                f"nnodes {self.nnodes!r} spans several nodes, so rdzv_endpoint is required: give the HOST:PORT "
                "of the first node, the same on every node"
            )
        if self.rdzv_backend == "static":
            if ":" in self.nnodes:
                raise ValueError(f"rdzv_backend static needs a fixed node count, got nnodes {self.nnodes!r}")
            if self.node_rank is None and max_nodes > 1:
                raise ValueError("rdzv_backend static needs node_rank: give each node its rank, 0 to nnodes - 1")
        if self.node_rank is not None and self.node_rank >= max_nodes:
            raise ValueError(f"node_rank {self.node_rank} must be below nnodes {self.nnodes!r}")
        return self


class PretrainParams(TrainingParams):
    """Parameters of `pretrain/atmorep`."""

    dataset: str | None = Field(
        None, description="catalog name of the normalised dataset (default: the preset's train.dataset)"
    )
    preset: str = Field("demo", description="model and training preset: a name in models/presets or a YAML path")
    register_as: str = Field("atmorep", description="registered model name in MLflow")


class PretrainMaeParams(TrainingParams):
    """Parameters of `pretrain/mae`."""

    dataset: str = Field(IMAGENET_SAMPLE, description="catalog name of an image dataset (atmorep ingest imagenet)")
    preset: str = Field(
        "mae-demo", description="masked autoencoder preset (family: mae): a name in models/presets or a YAML path"
    )
    register_as: str = Field("mae", description="registered model name in MLflow")
    reconstruction_images: int = Field(
        8, ge=1, description="images in the reconstruction figure logged at the end (plots/reconstructions.png)"
    )


class FinetuneMaeParams(TrainingParams):
    """Parameters of `finetune/mae`."""

    model_uri: str = Field("models:/mae/latest", description="pretrained masked autoencoder to start from")
    mode: Literal["linear-probe", "full"] = Field(
        "linear-probe", description="linear-probe trains a linear head on the frozen encoder, full trains both"
    )
    dataset: str | None = Field(
        None, description="catalog image dataset with labels (default: the one the model was pretrained on)"
    )
    holdout_images: int = Field(
        100, ge=1, description="images held out for testing, drawn once with split_seed and never trained on"
    )
    split_seed: int = Field(0, ge=0, description="seed of the draw of held-out images")
    register_as: str | None = Field(
        None, description="registered model name (default: mae-linear-probe or mae-finetuned)"
    )

    @property
    def registered_name(self) -> str:
        return self.register_as or ("mae-linear-probe" if self.mode == "linear-probe" else "mae-finetuned")


class EvaluateParams(FlowParams):
    """Parameters of `evaluate/zero-shot`."""

    model_uri: str = Field(DEFAULT_MODEL_URI, description="models:/NAME/VERSION, models:/NAME@ALIAS or a run id")
    dataset: str | None = Field(None, description="catalog dataset (default: the one the model was trained on)")
    window_stride: int = Field(6, ge=1, description="time steps between evaluation windows")
    batch_size: int = Field(8, ge=1, description="windows per forward pass")
    downscaling_factors: list[int] = Field(
        [2, 4],
        min_length=1,
        description="coarsening factors of the downscaling task, in grid points; each must divide the "
        "spatial token size of every field",
    )
    map_time: str | None = Field(
        None,
        description="ISO 8601 time in the test period that the maps of truth, prediction, error and spread show "
        "(default: the last scored step of the first window)",
    )

    @field_validator("downscaling_factors")
    @classmethod
    def _check_factors(cls, value: list[int]) -> list[int]:
        if any(factor < 1 for factor in value):
            raise ValueError(f"downscaling factors must be at least 1, got {value}")
        return value

    @field_validator("map_time")
    @classmethod
    def _check_map_time(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                pd.Timestamp(value)
            except ValueError as error:
                raise ValueError(f"map_time {value!r} is not an ISO 8601 time: {error}") from error
        return value


class FinetuneParams(TrainingParams):
    """Parameters of `finetune/atmorep`."""

    model_uri: str = Field(DEFAULT_MODEL_URI, description="pretrained model to start from")
    task: Literal["forecast", "downscaling", "new-field"] = Field(
        "forecast",
        description="forecast: predict further ahead than pretraining, with extra_time_tokens more time tokens; "
        "downscaling: add a high-resolution head that predicts the fine field from the coarsened one; "
        "new-field: add the variable new_field to the model, coupled to the pretrained fields by cross-attention",
    )
    freeze: Literal["all", "encoders", "none"] = Field(
        "none",
        description="pretrained parameters kept fixed: all (only new parameters train), encoders (embeddings "
        "and encoder blocks), or none",
    )
    extra_time_tokens: int = Field(
        1, ge=0,
        description="forecast: time tokens added to each sample and to the forecast; the lead grows by this "
        "many tokens of the pretrained token length in time steps",
    )
    downscaling_factor: int | None = Field(
        None, ge=2,
        description="downscaling: coarsening factor in grid points of the input (default: the pretrained "
        "masking.coarsen_factor); it must divide every field's spatial token size",
    )
    new_field: str | None = Field(
        None, description="new-field: ERA5 short name of the variable to add, such as q; it must be in the dataset"
    )
    new_field_levels: list[int] | None = Field(
        None, description="new-field: pressure levels of the new variable in hPa (default: a single-level variable)"
    )
    register_as: str | None = Field(
        None,
        description="registered model name (default: atmorep-forecast, atmorep-downscaling, or atmorep-FIELD "
        "for new-field)",
    )
    window_stride: int = Field(6, ge=1, description="time steps between evaluation windows")

    @model_validator(mode="after")
    def _check_task_settings(self) -> "FinetuneParams":
        if self.task == "new-field" and not self.new_field:
            raise ValueError("task new-field needs new_field, the variable to add, for example --new-field q")
        if self.task != "new-field" and (self.new_field or self.new_field_levels):
            raise ValueError(f"new_field and new_field_levels apply to task new-field only, not {self.task!r}")
        if self.task == "forecast" and self.freeze == "all" and self.extra_time_tokens == 0:
            raise ValueError(
                "task forecast with extra_time_tokens 0 adds no parameter, so freeze all leaves nothing to train: "
                "raise extra_time_tokens or choose freeze encoders or none"
            )
        return self

    @property
    def registered_name(self) -> str:
        if self.register_as:
            return self.register_as
        return f"atmorep-{self.new_field}" if self.task == "new-field" else f"atmorep-{self.task}"


class PipelineParams(BaseModel):
    """Parameters of `pipeline/end-to-end`: ingest, pretrain, evaluate, fine-tune."""

    model_config = ConfigDict(extra="forbid")

    experiment: str = Field("atmorep", description="MLflow experiment that receives every run")
    sources: list[str] = IngestEra5Params.model_fields["sources"]
    name: str = IngestEra5Params.model_fields["name"]
    variables: list[str] | None = IngestEra5Params.model_fields["variables"]
    train_period: tuple[str, str] = IngestEra5Params.model_fields["train_period"]
    test_period: tuple[str, str] = Field(
        DEMO_TEST_PERIOD, description="first and last time step of the test period (ISO 8601)"
    )
    preset: str = PretrainParams.model_fields["preset"]
    pretrain_steps: int | None = Field(None, ge=1, description="pretraining steps (default: the preset's)")
    finetune_task: Literal["forecast", "downscaling"] = FinetuneParams.model_fields["task"]
    finetune_steps: int | None = Field(None, ge=1, description="fine-tuning steps (default: the preset's)")
    batch_size: int | None = TrainingParams.model_fields["batch_size"]
    nproc_per_node: int = TrainingParams.model_fields["nproc_per_node"]
    nnodes: str = TrainingParams.model_fields["nnodes"]
    node_rank: int | None = TrainingParams.model_fields["node_rank"]
    rdzv_backend: Literal["c10d", "static"] = TrainingParams.model_fields["rdzv_backend"]
    rdzv_endpoint: str | None = TrainingParams.model_fields["rdzv_endpoint"]
    rdzv_id: str = TrainingParams.model_fields["rdzv_id"]
    max_restarts: int = TrainingParams.model_fields["max_restarts"]

    @property
    def rendezvous(self) -> dict:
        """Return the torchrun settings that pretraining and fine-tuning share."""
        return self.model_dump(include=set(RENDEZVOUS_FIELDS))

    @model_validator(mode="after")
    def _check_periods(self) -> "PipelineParams":
        check_periods(self.train_period, self.test_period)
        # Reject an invalid rendezvous now rather than after ingestion.
        TrainingParams.model_validate(self.rendezvous)
        return self


RENDEZVOUS_FIELDS = ("nproc_per_node", "nnodes", "node_rank", "rdzv_backend", "rdzv_endpoint", "rdzv_id", "max_restarts")
