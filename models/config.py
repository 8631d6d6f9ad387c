"""Run configuration: the model, the masking strategies and the training loop.

Every schema forbids unknown keys, so a misspelt setting fails at start-up with its name.
`load_preset` is the one place where a configuration is resolved. The merge order is:

1. the field defaults of the schemas below,
2. the preset file (`models/presets/<name>.yaml`, or a YAML/JSON file given by path),
3. the dotted overrides, for example `{"train.max_steps": 50}`.

The merged dictionary is validated once, after the last override.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

logger = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).resolve().parent / "presets"


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Version of the run configuration schema. Version 1 described one transformer over all
# channels stacked (model.variables, model.levels, model.token_shape, model.sample_shape).
# Version 2 describes one encoder per field (model.fields) and the ensemble tail.
CONFIG_VERSION = 2

class FieldConfig(_Schema):
    """One field: a variable at a set of levels, with its own token size and token count.

    The field's sample is `[L, T, H, W]` with `L = len(levels)` (1 for a single-level
    variable) and `(T, H, W) = token_shape * num_tokens`. All fields of a model cover the
    same time window and are centred on the same grid point.
    """

    name: str = Field(min_length=1, description="ERA5 short name of the variable, such as t2m or u.")
    levels: list[int] | None = Field(
        default=None, description="Pressure levels in hPa, or None for a single-level variable."
    )
    token_shape: tuple[int, int, int] = Field(
        default=(2, 8, 8), description="Token size as (time steps, latitude points, longitude points)."
    )
    num_tokens: tuple[int, int, int] = Field(
        default=(6, 4, 6), description="Tokens per sample along (time, latitude, longitude)."
    )
    neighbours: list[str] = Field(
        default_factory=list,
        description="Fields whose tokens this field cross-attends to in every encoder block.",
    )

    @model_validator(mode="after")
    def _check(self) -> FieldConfig:
        if self.levels is not None and (not self.levels or len(set(self.levels)) != len(self.levels)):
            raise ValueError(
                f"field {self.name!r}: levels must be a non-empty list of distinct levels or null, got {self.levels}"
            )
        if min(self.token_shape) < 1 or min(self.num_tokens) < 1:
            raise ValueError(
                f"field {self.name!r}: token_shape {self.token_shape} and num_tokens {self.num_tokens} "
                "must be positive"
            )
        if self.name in self.neighbours or len(set(self.neighbours)) != len(self.neighbours):
            raise ValueError(
                f"field {self.name!r}: neighbours {self.neighbours} must be distinct and must not name the field itself"
            )
        return self

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """Field sample size (T, H, W) in time steps and grid points."""
        return tuple(t * n for t, n in zip(self.token_shape, self.num_tokens, strict=True))

    @property
    def num_levels(self) -> int:
        return len(self.levels) if self.levels else 1

    @property
    def channels(self) -> list[tuple[str, int | None]]:
        """(variable, level) pairs of the field's levels in order, level None for a single-level field."""
        if self.levels is None:
            return [(self.name, None)]
        return [(self.name, level) for level in self.levels]


def _fields_from_version_1(model: dict[str, Any]) -> dict[str, Any]:
    """Rewrite a version-1 model section (stacked channels) as a version-2 one (fields).

    Every variable becomes a field with its levels and the shared token and sample shapes.
    The old model let every channel attend to every other, so each field lists all other
    fields as neighbours. The old linear decoder corresponds to `decoder_depth: 0`.
    """
    model = dict(model)
    variables = model.pop("variables", ["t2m"])
    levels = model.pop("levels", None) or {}
    token_shape = list(model.pop("token_shape", (2, 8, 8)))
    sample_shape = list(model.pop("sample_shape", (12, 32, 48)))
    if len(token_shape) != 3 or len(sample_shape) != 3:
        raise ValueError(
            f"model.token_shape {token_shape} and model.sample_shape {sample_shape} must each have 3 sizes: "
            "(time steps, latitude points, longitude points)"
        )
    num_tokens = []
    for axis, sample, token in zip(("time", "latitude", "longitude"), sample_shape, token_shape, strict=True):
        if token < 1 or sample % token:
            raise ValueError(
                f"model.sample_shape {sample_shape} is not a multiple of model.token_shape {token_shape} "
                f"along the {axis} axis ({sample} by {token}): make every sample size a multiple of the token size"
            )
        num_tokens.append(sample // token)
    model["fields"] = [
        {
            "name": variable,
            "levels": levels.get(variable),
            "token_shape": token_shape,
            "num_tokens": num_tokens,
            "neighbours": [other for other in variables if other != variable],
        }
        for variable in variables
    ]
    model.setdefault("decoder_depth", 0)
    model["architecture_version"] = 1
    return model


class ModelConfig(_Schema):
    """Architecture of the multi-field AtmoRep-style model (see `models.atmorep`).

    `fields` lists the fields in order. Every field has the same time window: the same
    number of time steps per token and of time tokens. Fields may differ in their spatial
    token size and count, and are then centred on the same grid point.
    """

    fields: list[FieldConfig] = Field(default_factory=lambda: [FieldConfig(name="t2m")], min_length=1)
    embed_dim: int = Field(default=128, gt=0)
    depth: int = Field(default=4, gt=0, description="Encoder blocks per field.")
    decoder_depth: int = Field(default=1, ge=0, description="Self-attention blocks per field after the encoder.")
    num_heads: int = Field(default=4, gt=0)
    mlp_ratio: float = Field(default=4.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    ensemble_size: int = Field(
        default=1, ge=1, description="Ensemble heads per field. The prediction is their mean, the spread their std."
    )
    loss: Literal["mse", "crps", "mse_stats"] = Field(
        default="mse",
        description="Training loss over masked tokens (see models.losses): mse of the ensemble mean, "
        "fair crps over the members, or mse_stats (mse of the mean plus a spread term).",
    )
    architecture_version: Literal[1, 2] = Field(
        default=2,
        description="Network layout. 1 is the former single transformer over stacked channels, "
        "which this code reads from old configs but cannot build.",
    )
    residual: bool = Field(
        default=False,
        description="Predict the increment to the input: each member is the field's input plus the "
        "network's output, so a masked token starts from its fill (see masking.forecast_fill, "
        "masking.interpolation_fill and masking.coarsen_upsampling).",
    )
    downscaling_head: int | None = Field(
        default=None,
        ge=2,
        description="Coarsening factor of the high-resolution downscaling head added by fine-tuning "
        "(see models.atmorep.DownscalingHead), or None for no head.",
    )

    @model_validator(mode="before")
    @classmethod
    def _migrate_version_1(cls, data: Any) -> Any:
        if isinstance(data, dict) and "fields" not in data and {"variables", "token_shape", "sample_shape"} & set(data):
            migrated = _fields_from_version_1(data)
            logger.warning(
                "model config uses the version-1 keys variables/levels/token_shape/sample_shape: "
                "read as model.fields %s with architecture_version 1",
                [field["name"] for field in migrated["fields"]],
            )
            return migrated
        return data

    @model_validator(mode="after")
    def _check_fields(self) -> ModelConfig:
        names = [field.name for field in self.fields]
        if len(set(names)) != len(names):
            raise ValueError(f"model.fields contains duplicate names: {names}")
        for field in self.fields:
            unknown = sorted(set(field.neighbours) - set(names))
            if unknown:
                raise ValueError(
                    f"field {field.name!r} names neighbours {unknown} that are not in model.fields {names}"
                )
        first = self.fields[0]
        for field in self.fields[1:]:
            if field.token_shape[0] != first.token_shape[0] or field.num_tokens[0] != first.num_tokens[0]:
                raise ValueError(
                    f"field {field.name!r} has {field.num_tokens[0]} time tokens of {field.token_shape[0]} steps, "
                    f"but field {first.name!r} has {first.num_tokens[0]} of {first.token_shape[0]}: all fields "
                    "must share the time tokens"
                )
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(
                f"model.embed_dim {self.embed_dim} is not divisible by model.num_heads {self.num_heads}"
            )
        factor = self.downscaling_head
        for field in self.fields if factor else []:
            if field.token_shape[1] % factor or field.token_shape[2] % factor:
                raise ValueError(
                    f"model.downscaling_head {factor} does not divide the spatial token size "
                    f"{tuple(field.token_shape[1:])} of field {field.name!r}: choose a factor that divides both"
                )
        if self.loss != "mse" and self.ensemble_size < 2:
            raise ValueError(
                f"model.loss {self.loss!r} scores an ensemble and needs model.ensemble_size >= 2, "
                f"got {self.ensemble_size}: raise the ensemble size or use loss 'mse'"
            )
        return self

    def field(self, name: str) -> FieldConfig:
        for field in self.fields:
            if field.name == name:
                return field
        raise KeyError(f"field {name!r} not found in model.fields {[field.name for field in self.fields]}")

    @property
    def field_names(self) -> list[str]:
        return [field.name for field in self.fields]

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """Region (T, H, W) that contains every field's sample: the largest extent per axis."""
        shapes = [field.sample_shape for field in self.fields]
        return tuple(max(shape[axis] for shape in shapes) for axis in range(3))

    @property
    def token_steps(self) -> int:
        """Time steps per token, shared by all fields."""
        return self.fields[0].token_shape[0]

    @property
    def time_tokens(self) -> int:
        """Time tokens per sample, shared by all fields."""
        return self.fields[0].num_tokens[0]

    @property
    def channels(self) -> list[tuple[str, int | None]]:
        """(variable, level) pairs of all fields in order, level None for single-level fields."""
        return [channel for field in self.fields for channel in field.channels]

    @property
    def channel_names(self) -> list[str]:
        """Channel labels such as `t2m` or `u_850`, in channel order."""
        return [variable if level is None else f"{variable}_{level}" for variable, level in self.channels]

    @property
    def levels(self) -> dict[str, list[int]]:
        """Levels per multi-level field."""
        return {field.name: list(field.levels) for field in self.fields if field.levels is not None}


class StrategyWeights(_Schema):
    """Relative frequencies of the masking strategies. One strategy is drawn per batch."""

    bert: float = Field(default=0.5, ge=0)
    forecast: float = Field(default=0.25, ge=0)
    interpolation: float = Field(default=0.25, ge=0)
    downscaling: float = Field(default=0.0, ge=0)
    causal: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _check_total(self) -> StrategyWeights:
        if self.bert + self.forecast + self.interpolation + self.downscaling + self.causal <= 0:
            raise ValueError("masking.weights are all zero: give at least one strategy a positive weight")
        return self


class FillProportions(_Schema):
    """Proportions of the fills that BERT-masked tokens draw from (see `models.masking.corrupt`)."""

    zero: float = Field(default=0.4, ge=0)
    noise: float = Field(default=0.2, ge=0)
    coarsen: float = Field(default=0.4, ge=0)
    persistence: float = Field(default=0.0, ge=0)
    linear: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _check_total(self) -> FillProportions:
        if self.zero + self.noise + self.coarsen + self.persistence + self.linear <= 0:
            raise ValueError("masking.bert_fill proportions are all zero: give one a positive value")
        return self


class MaskingConfig(_Schema):
    """Masking strategies used to build training inputs (see `models.masking`)."""

    weights: StrategyWeights = Field(default_factory=StrategyWeights)
    bert_max_rate: float = Field(
        default=0.5, gt=0, le=1, description="Per-sample BERT mask rate is drawn uniformly from (0, max]."
    )
    forecast_tokens: int = Field(default=3, ge=1, description="Number of last time tokens to predict.")
    interpolation_tokens: list[int] = Field(
        default_factory=lambda: [1, 2],
        min_length=1,
        description="Gap lengths in time tokens. One is drawn per batch.",
    )
    bert_fill: FillProportions = Field(default_factory=FillProportions)
    coarsen_factor: int = Field(
        default=4, ge=1, description="Block size in grid points for coarsened tokens and downscaling."
    )
    forecast_fill: Literal["zero", "noise", "persistence"] = Field(
        default="zero",
        description="Content of the masked time tokens of the forecast and causal strategies: zeros, "
        "noise, or the last visible step repeated (persistence).",
    )
    interpolation_fill: Literal["zero", "noise", "persistence", "linear"] = Field(
        default="zero",
        description="Content of the masked time tokens of the interpolation strategy: zeros, noise, "
        "the last visible step, or linear interpolation in time between the visible steps around the gap.",
    )
    coarsen_upsampling: Literal["repeat", "bilinear", "bicubic"] = Field(
        default="repeat",
        description="How coarsened tokens return to the fine grid: each block average repeated over its "
        "block, or bilinear or bicubic interpolation between block centres.",
    )


class TrainConfig(_Schema):
    """Training loop, optimiser and data sampling settings."""

    dataset: str = "era5-t2m-uk-2019-03"
    max_steps: int = Field(default=1000, ge=1)
    batch_size: int = Field(default=16, ge=1, description="Samples per process and step.")
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.05, ge=0)
    warmup_steps: int = Field(default=50, ge=0)
    grad_clip: float | None = Field(
        default=1.0, gt=0, description="Maximum gradient norm, or None for no clipping."
    )
    seed: int = Field(default=0, ge=0)
    log_every: int = Field(default=10, ge=1)
    checkpoint_every: int = Field(default=100, ge=1)
    num_threads: int | None = Field(
        default=None, ge=1, description="torch threads per process, or None for 1."
    )
    time_stride: int = Field(default=1, ge=1, description="Time steps between consecutive window starts.")
    spatial_stride: int = Field(
        default=1, ge=1, description="Random crop offsets are multiples of this many grid points."
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32",
        description="fp32, or autocast to bf16 or fp16 for matrix products. fp16 scales the loss "
        "with a gradient scaler; bf16 needs none.",
    )
    activation_checkpointing: bool = Field(
        default=False, description="Recompute the transformer blocks' activations in backward to save memory."
    )
    compile: bool = Field(default=False, description="Compile the model with torch.compile.")
    num_workers: int = Field(default=0, ge=0, description="DataLoader worker processes per rank (0 loads in the training process).")
    collective_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="Seconds a collective (all-reduce, barrier) may wait for the other ranks before the process group raises.",
    )


class FinetuneConfig(_Schema):
    """How a fine-tuning run relates to its pretrained model (see `models.finetune`).

    `base_model` is the pretrained model's architecture. The run's own `model` may differ
    from it only in the way `task` intends: more time tokens (forecast), a downscaling
    head (downscaling) or fields appended after the pretrained ones (new-field).
    """

    task: Literal["forecast", "downscaling", "new-field"]
    freeze: Literal["all", "encoders", "none"] = Field(
        default="none",
        description="Pretrained parameters kept fixed: all of them, the embeddings and encoder blocks, "
        "or none. Newly initialised parameters always train.",
    )
    base_model: ModelConfig


class RunConfig(_Schema):
    """A whole run: model, masking and training settings, with the schema `version`.

    A configuration without `version` is read as version 1 when its model section uses the
    version-1 keys and as the current version otherwise. Version 1 is migrated (see
    `ModelConfig`), with a logged warning. A version newer than CONFIG_VERSION is rejected.
    """

    version: int = Field(default=CONFIG_VERSION, description="Schema version of this configuration.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    masking: MaskingConfig = Field(default_factory=MaskingConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    finetune: FinetuneConfig | None = Field(
        default=None, description="Set for a fine-tuning run: the task, the frozen parameters and the pretrained model."
    )

    @model_validator(mode="before")
    @classmethod
    def _migrate(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        model = data.get("model") or {}
        version = data.get("version", 1 if "fields" not in model and model else CONFIG_VERSION)
        if isinstance(version, str) and version.strip().isdigit():
            version = int(version)
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError(f"config version {version!r} must be an integer, such as {CONFIG_VERSION}")
        if not 1 <= version <= CONFIG_VERSION:
            raise ValueError(
                f"config version {version!r} is not supported: this code reads versions 1 to {CONFIG_VERSION}; "
                "update the atmorep-pipeline code or write the config for the current version"
            )
        if version == 1 and isinstance(model, dict) and "fields" in model:
            raise ValueError(
                "config version 1 has model.fields, which version 2 introduced: set version: 2, or describe the "
                "model with the version-1 keys variables, levels, token_shape and sample_shape"
            )
        if version < CONFIG_VERSION:
            logger.warning("migrating run config from version %d to %d", version, CONFIG_VERSION)
        return {**data, "version": CONFIG_VERSION}

    @model_validator(mode="after")
    def _check_masking_fits_model(self) -> RunConfig:
        n_time_tokens = self.model.time_tokens
        factor = self.masking.coarsen_factor
        for field in self.model.fields:
            _, token_h, token_w = field.token_shape
            if token_h % factor or token_w % factor:
                raise ValueError(
                    f"masking.coarsen_factor {factor} does not divide the spatial token size "
                    f"{(token_h, token_w)} of field {field.name!r}: choose a factor that divides both"
                )
        if self.masking.forecast_tokens >= n_time_tokens:
            raise ValueError(
                f"masking.forecast_tokens {self.masking.forecast_tokens} leaves no input: a sample "
                f"has only {n_time_tokens} time tokens"
            )
        max_gap = n_time_tokens - 2
        too_long = [gap for gap in self.masking.interpolation_tokens if not 1 <= gap <= max_gap]
        if too_long:
            raise ValueError(
                f"masking.interpolation_tokens {too_long} must be between 1 and {max_gap}, because "
                f"the first and last of {n_time_tokens} time tokens stay visible"
            )
        if n_time_tokens < 2 and self.masking.weights.causal > 0:
            raise ValueError(
                "masking strategy causal needs at least 2 time tokens per sample: raise num_tokens[0] "
                "of the fields or set masking.weights.causal to 0"
            )
        return self


def _set_dotted(tree: dict[str, Any], dotted_key: str, value: Any) -> None:
    """Set `tree["a"]["b"] = value` for the key "a.b", creating missing sections."""
    parts = dotted_key.split(".")
    node = tree
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            prefix = ".".join(parts[: depth + 1])
            raise ValueError(f"override {dotted_key!r} is invalid: {prefix!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _read_mapping(path: Path) -> dict[str, Any]:
    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must contain a mapping, got {type(data).__name__}")
    return data


# Values of a configuration's top-level `family` key, each with its own schema.
MODEL_FAMILIES = ("atmorep", "mae", "mae-classifier")


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))


def load_preset(name_or_path: str | Path, overrides: Mapping[str, Any] | None = None) -> Any:
    """Resolve a run configuration from a preset name or file, then apply dotted overrides.

    `name_or_path` is either a file (YAML or JSON) or the name of a file in
    `models/presets/` without its `.yaml` suffix. Overrides are keys such as
    `"train.max_steps"` or `"masking.weights"`. The top-level `family` key selects the
    schema (see `validate_run_config`). Raises FileNotFoundError for an unknown preset and
    pydantic's ValidationError, which names the key, for an invalid setting.
    """
    path = Path(name_or_path)
    if not path.is_file():
        path = PRESET_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise FileNotFoundError(
                f"preset {str(name_or_path)!r} not found: give a config file path or one of "
                f"{preset_names()}"
            )

    tree = _read_mapping(path)
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)

    config = validate_run_config(tree, source=str(path))
    logger.debug("resolved config from %s with overrides %s", path, dict(overrides or {}))
    return config


def config_family(tree: Mapping[str, Any]) -> str:
    """Return the model family of a configuration mapping: its `family` key, else atmorep."""
    return str(tree.get("family", "atmorep"))


def validate_run_config(tree: Mapping[str, Any], source: str = "config") -> Any:
    """Validate a configuration mapping with the schema of its `family`.

    `family: atmorep` (or no `family` key) gives a `RunConfig`, `family: mae` a
    `models.mae.MAERunConfig` and `family: mae-classifier` a
    `models.mae_classifier.ClassifierRunConfig`. Raises ValueError naming `source` for
    any other family.
    """
    family = config_family(tree)
    if family == "atmorep":
        return RunConfig.model_validate({key: value for key, value in tree.items() if key != "family"})
    # Imported here because both modules import this one.
    if family == "mae":
        from models.mae import MAERunConfig

        return MAERunConfig.model_validate(tree)
    if family == "mae-classifier":
        from models.mae_classifier import ClassifierRunConfig

        return ClassifierRunConfig.model_validate(tree)
    raise ValueError(
        f"{source}: model family {family!r} is not supported: set family to one of {list(MODEL_FAMILIES)}"
    )
