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
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

logger = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).resolve().parent / "presets"


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Schema):
    """Architecture of the AtmoRep-style encoder and the shape of its samples.

    A sample is a field `x: [C, T, H, W]` with one channel per (variable, level) pair, in
    the order of `variables` and, within a variable, of its levels.
    """

    variables: list[str] = Field(default_factory=lambda: ["t2m"], min_length=1)
    levels: dict[str, list[int]] | None = Field(
        default=None,
        description="Pressure levels in hPa per multi-level variable. Variables not listed "
        "are single-level fields.",
    )
    token_shape: tuple[int, int, int] = Field(
        default=(2, 8, 8), description="Token size as (time steps, latitude points, longitude points)."
    )
    sample_shape: tuple[int, int, int] = Field(
        default=(12, 32, 48),
        description="Sample size as (time steps, latitude points, longitude points).",
    )
    embed_dim: int = Field(default=128, gt=0)
    depth: int = Field(default=4, gt=0)
    num_heads: int = Field(default=4, gt=0)
    mlp_ratio: float = Field(default=4.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if len(set(self.variables)) != len(self.variables):
            raise ValueError(f"model.variables contains duplicates: {self.variables}")
        for variable, levels in (self.levels or {}).items():
            if variable not in self.variables:
                raise ValueError(
                    f"model.levels names variable {variable!r}, which is not in "
                    f"model.variables {self.variables}: add it there or remove its levels"
                )
            if not levels or len(set(levels)) != len(levels):
                raise ValueError(
                    f"model.levels[{variable!r}] must be a non-empty list of distinct levels, "
                    f"got {levels}"
                )
        if min(self.token_shape) < 1:
            raise ValueError(f"model.token_shape must be positive, got {self.token_shape}")
        for axis, sample, token in zip(
            ("time", "latitude", "longitude"), self.sample_shape, self.token_shape, strict=True
        ):
            if sample < token or sample % token != 0:
                raise ValueError(
                    f"model.sample_shape {self.sample_shape} is not a multiple of "
                    f"model.token_shape {self.token_shape} along {axis}: {sample} % {token} != 0"
                )
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(
                f"model.embed_dim {self.embed_dim} is not divisible by model.num_heads {self.num_heads}"
            )
        return self

    @property
    def channels(self) -> list[tuple[str, int | None]]:
        """Channel (variable, level) pairs in order, with level None for single-level fields."""
        levels = self.levels or {}
        result: list[tuple[str, int | None]] = []
        for variable in self.variables:
            if variable in levels:
                result.extend((variable, level) for level in levels[variable])
            else:
                result.append((variable, None))
        return result

    @property
    def channel_names(self) -> list[str]:
        """Channel labels such as `t2m` or `t_850`, in channel order."""
        return [variable if level is None else f"{variable}_{level}" for variable, level in self.channels]

    @property
    def num_channels(self) -> int:
        return len(self.channels)

    @property
    def grid_tokens(self) -> tuple[int, int, int]:
        """Number of tokens (nT, nH, nW) along time, latitude and longitude in one sample."""
        return tuple(s // t for s, t in zip(self.sample_shape, self.token_shape, strict=True))


class StrategyWeights(_Schema):
    """Relative frequencies of the masking strategies. One strategy is drawn per batch."""

    bert: float = Field(default=0.5, ge=0)
    forecast: float = Field(default=0.25, ge=0)
    interpolation: float = Field(default=0.25, ge=0)
    downscaling: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _check_total(self) -> StrategyWeights:
        if self.bert + self.forecast + self.interpolation + self.downscaling <= 0:
            raise ValueError("masking.weights are all zero: give at least one strategy a positive weight")
        return self


class FillProportions(_Schema):
    """Proportions in which BERT-masked tokens are zeroed, replaced by noise or coarsened."""

    zero: float = Field(default=0.4, ge=0)
    noise: float = Field(default=0.2, ge=0)
    coarsen: float = Field(default=0.4, ge=0)

    @model_validator(mode="after")
    def _check_total(self) -> FillProportions:
        if self.zero + self.noise + self.coarsen <= 0:
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


class RunConfig(_Schema):
    model: ModelConfig = Field(default_factory=ModelConfig)
    masking: MaskingConfig = Field(default_factory=MaskingConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _check_masking_fits_model(self) -> RunConfig:
        n_time_tokens = self.model.grid_tokens[0]
        factor = self.masking.coarsen_factor
        token_t, token_h, token_w = self.model.token_shape
        if token_h % factor or token_w % factor:
            raise ValueError(
                f"masking.coarsen_factor {factor} does not divide the spatial token size "
                f"{(token_h, token_w)} of model.token_shape: choose a factor that divides both"
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


def preset_names() -> list[str]:
    return sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))


def load_preset(name_or_path: str | Path, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """Resolve a run configuration from a preset name or file, then apply dotted overrides.

    `name_or_path` is either a file (YAML or JSON) or the name of a file in
    `models/presets/` without its `.yaml` suffix. Overrides are keys such as
    `"train.max_steps"` or `"masking.weights"`. Raises FileNotFoundError for an unknown
    preset and pydantic's ValidationError, which names the key, for an invalid setting.
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

    config = RunConfig.model_validate(tree)
    logger.debug("resolved config from %s with overrides %s", path, dict(overrides or {}))
    return config
