"""Zero-shot evaluation of a pretrained model on forecasting, interpolation and downscaling.

Samples are the windows of `models.data.FieldDataset` without random crops:
``sample_shape[0]`` consecutive hourly steps inside the evaluation period, one window
every ``window_stride`` steps, on the region of ``config.model.sample_shape`` at the
north-west corner of the grid, with every field's crop centred in that region. Each task
masks every field of every sample the way training did (`models.masking`) and scores the
model's prediction of the masked steps, the ensemble mean, against two baselines computed
from the same samples:

- ``forecast``: the last ``masking.forecast_tokens`` time tokens are masked and filled
  with ``masking.forecast_fill``. Scored per lead time, in hours after the last visible
  step, against persistence of that step and against the climatology at the valid time.
- ``interpolation``: for each gap length g in ``masking.interpolation_tokens``, a centred
  run of g time tokens is masked and filled with ``masking.interpolation_fill``. Scored
  over all hidden steps against linear and cubic interpolation in time from the visible
  steps on either side of the gap.
- ``downscaling``: for each factor f in ``downscaling_factors`` (2 and 4 by default),
  every token is masked and contains the block averages over f x f grid points, brought
  back to the grid by ``masking.coarsen_upsampling``. Scored over the whole sample against
  bilinear and bicubic upsampling of the same block averages, and by the power spectrum
  along longitude.

Every level of every field is scored as its own variable (``t2m``, ``u_850``). Scores are
in physical units after denormalising with the dataset's statistics: global ones from
``ds.attrs["statistics"]``, local ones per calendar month and grid point from the
statistics group of its Zarr store (`tasks.normalise.denormalise_window`). They follow
WeatherBench 2 and use `tasks.metrics`: RMSE, MAE and bias weighted by cos(latitude) and
pooled over samples and scored steps (RMSE before the square root), and the uncentred
anomaly correlation (ACC) per sample and step, averaged. The climatology of the ACC and of
the climatology baseline is built once per evaluation from the dataset's training period
(`tasks.metrics.build_climatology`). A model with more than one ensemble member also gets
the fair ``crps``, the ``spread`` (square root of the pooled ensemble variance) and the
``spread_skill_ratio``. For the deterministic baselines the spread is 0, the CRPS equals
the MAE and the spread-skill ratio is not defined (NaN). Downscaling adds the
``small_scale_power_ratio``: the share of the truth's power at wavelengths below 4 grid
spacings that a prediction keeps, from power spectra accumulated over all samples. The
running sums and the metric names are in `tasks.scoring`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import xarray as xr
from torch import nn
from tqdm.auto import tqdm

from models.config import FieldConfig, RunConfig
from models.data import FieldDataset
from models.masking import corrupt, downscaling_mask, forecast_mask, interpolation_mask
from tasks import baselines, metrics
from tasks.normalise import dataset_statistics, denormalise, denormalise_window
from tasks.scoring import BASELINES, SCORE_DIMS, TASKS, ScoreSums, flatten_scores, task_metrics

logger = logging.getLogger(__name__)

DEFAULT_DOWNSCALING_FACTORS = (2, 4)
# Cubic interpolation in time uses this many visible steps on each side of the gap.
CUBIC_CONTEXT_STEPS = 2


@dataclass
class EvaluationResult:
    """Scores of one zero-shot evaluation, in four views of the same numbers.

    metrics: flat names such as ``forecast/rmse/t2m/lead_3h`` for the model and
        ``forecast/rmse_persistence/t2m/lead_3h`` for a baseline. NaN scores are left out.
    scores: one data variable per task and metric, named ``<task>_<metric>`` (for example
        ``forecast_rmse``, ``forecast_acc``, ``downscaling_small_scale_power_ratio``),
        with dims ``(predictor, variable, <score dim>)``. ``predictor`` lists ``model``
        and the baselines of every evaluated task, and a task's variables are NaN for the
        baselines of other tasks. Their ``baselines`` attribute names the task's own. The
        score dims are ``lead_time`` (hours) for forecast, ``gap`` (hours) for
        interpolation and ``factor`` for downscaling. Along ``variable`` the coordinates
        ``units``, ``field`` and ``level`` (NaN for a surface field) describe each
        channel. ``downscaling_spectrum`` contains the power spectra along longitude, dims
        ``(spectrum_of, variable, factor, wavenumber)`` with ``spectrum_of`` the truth,
        the model and the downscaling baselines, in squared units.
    table: one row per task, metric, variable, lead or gap and baseline, with columns
        ``task``, ``metric``, ``variable``, ``lead_or_gap``, ``model``, ``baseline``,
        ``baseline_value`` and ``difference`` (model minus baseline value).
    examples: per task, one sample's ``truth``, ``prediction`` and ``baseline`` (the
        task's first baseline), and ``spread`` for an ensemble, over its scored steps, in
        physical units, with dims ``(variable, time, latitude, longitude)``. The sample is
        the one whose scored steps come closest to ``map_time``, and its attribute
        ``map_time`` is the step to draw. The entry ``<task>`` contains the fields on the
        first field's crop, and fields on another crop are under ``<task>-<variable>``
        with the first variable of that crop. Interpolation keeps its longest gap and
        downscaling its largest factor.
    """

    metrics: dict[str, float]
    scores: xr.Dataset
    table: pd.DataFrame
    examples: dict[str, xr.Dataset] = field(default_factory=dict)


@dataclass(frozen=True)
class _Channel:
    """One model channel: a variable, or one level of a multi-level variable."""

    variable: str
    level: int | None
    name: str
    mean: float
    std: float
    units: str
    # Position of `level` in the dataset's levels, 0 for a variable without levels. mean and
    # std are NaN for a locally normalised variable, whose statistics vary in time and space.
    level_index: int = 0


@dataclass(frozen=True)
class _Case:
    """One masking setup: a task with, for interpolation, a gap of ``gap_tokens`` tokens.

    ``label`` is the longest lead in hours for forecast, the gap in hours for
    interpolation and the coarsening factor for downscaling.
    """

    task: str
    label: int
    gap_tokens: int | None = None
    factor: int | None = None


def channel_name(variable: str, level: int | None) -> str:
    """Name a channel as in metric names: ``t2m``, or ``u_850`` for u at 850 hPa.

    The underscore keeps pressure levels apart from height suffixes: ``u100`` is the
    ERA5 100 m wind and ``u_100`` is u at 100 hPa.
    """
    return variable if level is None else f"{variable}_{level}"


def _channels(config: RunConfig, ds: xr.Dataset) -> list[_Channel]:
    """Resolve the model channels with their normalisation statistics and units."""
    statistics = ds.attrs.get("statistics")
    if not isinstance(statistics, dict):
        raise ValueError(
            "dataset attrs have no 'statistics' mapping: evaluate a dataset written by "
            "tasks.ingest, whose statistics are needed to denormalise"
        )

    channels = []
    for variable, level in config.model.channels:
        if variable not in statistics:
            raise KeyError(
                f"statistics for variable {variable!r} not found in dataset attrs, which "
                f"cover {sorted(statistics)}: re-ingest the dataset with this variable"
            )
        local = statistics[variable].get("scheme", "global") == "local"
        level_index = 0
        if level is not None:
            levels = [int(value) for value in ds[variable]["level"].values]
            level_index = levels.index(int(level))
        channels.append(
            _Channel(
                variable=variable,
                level=level,
                name=channel_name(variable, level),
                mean=float("nan") if local else float(statistics[variable]["mean"][level_index]),
                std=float("nan") if local else float(statistics[variable]["std"][level_index]),
                units=str(ds[variable].attrs.get("units", "")),
                level_index=level_index,
            )
        )
    return channels


def _cases(config: RunConfig, tasks: Sequence[str], downscaling_factors: Sequence[int]) -> list[_Case]:
    """List the masking setups of the requested tasks, with their score labels."""
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise ValueError(f"unknown evaluation tasks {unknown}: use a subset of {list(TASKS)}")

    token_steps = config.model.token_steps
    cases = []
    for task in tasks:
        if task == "forecast":
            cases.append(_Case(task, label=config.masking.forecast_tokens * token_steps))
        elif task == "interpolation":
            for gap_tokens in config.masking.interpolation_tokens:
                cases.append(_Case(task, label=gap_tokens * token_steps, gap_tokens=gap_tokens))
        else:
            for factor in sorted(set(downscaling_factors)):
                _check_factor(config, factor)
                cases.append(_Case(task, label=factor, factor=factor))
    return cases


def _check_factor(config: RunConfig, factor: int) -> None:
    """Raise ValueError unless `factor` divides the spatial token size of every field."""
    if factor < 1:
        raise ValueError(f"downscaling factor must be at least 1, got {factor}")
    for field_config in config.model.fields:
        _, token_height, token_width = field_config.token_shape
        if token_height % factor or token_width % factor:
            raise ValueError(
                f"downscaling factor {factor} does not divide the spatial token size "
                f"{(token_height, token_width)} of field {field_config.name!r}: choose factors that divide it"
            )


def _batches(
    dataset: FieldDataset, batch_size: int
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Yield (fields: name -> [B, L, T, H, W], time_features [B, T, 5]) over the windows in order."""
    for first in range(0, len(dataset), batch_size):
        items = [dataset[index] for index in range(first, min(first + batch_size, len(dataset)))]
        fields = {name: torch.stack([item[0][name] for item in items]) for name in items[0][0]}
        yield fields, torch.stack([features for _, features in items])


def _masked_input(
    case: _Case, fields: dict[str, torch.Tensor], config: RunConfig
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Build the model inputs and token masks of one case, per field.

    fields: name -> [B, L, T, H, W] normalised. Returns (inputs: name -> [B, L, T, H, W],
    masks: name -> [B, L, nT, nH, nW]). Forecast and interpolation tokens get the fills
    that training used (`masking.forecast_fill`, `masking.interpolation_fill`; noise is
    drawn from a fixed seed), downscaling tokens are coarsened by the case's factor.
    """
    masking = config.masking
    generator = torch.Generator().manual_seed(0)
    inputs, masks = {}, {}
    for field_config in config.model.fields:
        x = fields[field_config.name]
        batch, levels = x.shape[:2]
        grid = field_config.num_tokens
        factor = masking.coarsen_factor
        if case.task == "forecast":
            mask = forecast_mask(batch, levels, grid, masking.forecast_tokens)
            fill = masking.forecast_fill
        elif case.task == "interpolation":
            start = _gap_start(grid[0], case.gap_tokens)
            mask = interpolation_mask(batch, levels, grid, start, case.gap_tokens)
            fill = masking.interpolation_fill
        else:
            mask = downscaling_mask(batch, levels, grid)
            fill = "coarsen"
            factor = case.factor
        inputs[field_config.name] = corrupt(
            x, mask, field_config.token_shape, fill, factor, generator, masking.coarsen_upsampling
        )
        masks[field_config.name] = mask.to(x.device)
    return inputs, masks


def _gap_start(n_time_tokens: int, gap_tokens: int) -> int:
    """Return the first time token of a centred gap, rounding towards the start."""
    return (n_time_tokens - gap_tokens) // 2


def _scored_steps(case: _Case, config: RunConfig) -> slice:
    """Return the time steps of a sample that a case scores."""
    steps = config.model.sample_shape[0]
    token_steps = config.model.token_steps
    if case.task == "forecast":
        return slice(steps - config.masking.forecast_tokens * token_steps, steps)
    if case.task == "interpolation":
        start = _gap_start(steps // token_steps, case.gap_tokens) * token_steps
        return slice(start, start + case.gap_tokens * token_steps)
    return slice(0, steps)


def _baselines(
    case: _Case, truth: np.ndarray, scored: slice, climatology: np.ndarray | None
) -> dict[str, np.ndarray | None]:
    """Compute the baselines of a case over the scored steps.

    truth: [B, C, T, H, W] in physical units; climatology: [B, C, S, H, W], the
    climatology at the scored steps' valid times. Returns name -> [B, C, S, H, W] for the
    S scored steps, or None for a baseline the sample cannot give (cubic interpolation
    needs two visible steps on each side of the gap).
    """
    n_scored = scored.stop - scored.start
    if case.task == "forecast":
        return {
            "persistence": baselines.persistence(truth[:, :, : scored.start], n_scored),
            "climatology": climatology,
        }
    if case.task == "interpolation":
        context = min(CUBIC_CONTEXT_STEPS, scored.start, truth.shape[2] - scored.stop)
        cubic = None
        if context >= 2:
            cubic = baselines.cubic_interpolation(
                truth[:, :, scored.start - context : scored.start], truth[:, :, scored.stop : scored.stop + context], n_scored
            )
        return {
            "linear": baselines.linear_interpolation(truth[:, :, scored.start - 1], truth[:, :, scored.stop], n_scored),
            "cubic": cubic,
        }
    coarse = baselines.block_average(truth, case.factor)
    return {
        "bilinear": baselines.bilinear_upsampling(coarse, case.factor),
        "bicubic": baselines.bicubic_upsampling(coarse, case.factor),
    }


class _Crop:
    """The evaluated channels and grid of one field: denormalising and labelling sample arrays.

    Holds the crop's latitude and longitude, its cos-latitude weights, each channel's
    normalisation mean and std, and the crop's climatology in physical units.
    """

    def __init__(
        self, channels: list[_Channel], latitude: np.ndarray, longitude: np.ndarray, statistics: dict | None = None
    ) -> None:
        self.channels = channels
        # Statistics with loaded local arrays (tasks.normalise.dataset_statistics), needed only
        # when a channel is normalised locally.
        self.statistics = statistics
        self.names = [channel.name for channel in channels]
        self.units = [channel.units for channel in channels]
        self.latitude = latitude
        self.longitude = longitude
        self.weights = metrics.latitude_weights(latitude)
        self._mean = np.array([channel.mean for channel in channels])[None, :, None, None, None]
        self._std = np.array([channel.std for channel in channels])[None, :, None, None, None]
        # Dims (hour, variable, latitude, longitude) or (dayofyear, hour, variable, ...), set by
        # `_attach_climatologies`.
        self.climatology: xr.DataArray | None = None

    def denormalise(self, values: np.ndarray, times: np.ndarray | None = None) -> np.ndarray:
        """Convert [B, C, T, H, W] normalised values to float64 physical units: x * std + mean.

        Local channels take the statistics of each step's calendar month from `times` [B, T].
        """
        if self.statistics is None:
            return values.astype(np.float64) * self._std + self._mean
        keys = [(channel.variable, channel.level_index) for channel in self.channels]
        return denormalise_window(values, self.statistics, keys, times, self.latitude, self.longitude)

    def climatology_at(self, times: np.ndarray) -> np.ndarray:
        """Return the climatology [B, C, S, H, W] at valid times [B, S]."""
        valid_time = xr.DataArray(times, dims=("sample", "step"))
        values = metrics.climatology_at(self.climatology, valid_time)
        return values.transpose("sample", "variable", "step", "latitude", "longitude").values

    def as_field(self, values: np.ndarray, lead_time: np.ndarray | None = None) -> xr.DataArray:
        """Wrap [B, C, S, H, W] values as a DataArray; ``lead_time`` labels the S steps."""
        coords = {"variable": self.names, "latitude": self.latitude, "longitude": self.longitude}
        if lead_time is not None:
            coords["step"] = lead_time
        return xr.DataArray(values, dims=("sample", "variable", "step", "latitude", "longitude"), coords=coords)


# --- climatology ----------------------------------------------------------------------------


def _channel_series(ds: xr.Dataset, crop: _Crop, channel: _Channel, train_period: tuple[str, str]) -> xr.DataArray:
    """Return one channel over the training period on the crop, lazily, with dims (time, latitude, longitude).

    Global channels stay normalised, because a mean commutes with ``x * std + mean``; local
    channels are denormalised step by step, because their statistics change with the month.
    """
    selection = ds[[channel.variable]].sel(time=slice(*train_period))
    if crop.statistics is not None and np.isnan(channel.mean):
        selection = denormalise(selection, crop.statistics)
    values = selection[channel.variable].sel(latitude=crop.latitude, longitude=crop.longitude)
    if "level" in values.dims:
        values = values.isel(level=channel.level_index)
    if "member" in values.dims:
        values = values.mean("member")
    return values.drop_vars([name for name in values.coords if name not in ("time", "latitude", "longitude")])


def _crop_climatology(
    ds: xr.Dataset, crop: _Crop, train_period: tuple[str, str], valid_hours: set[int]
) -> xr.DataArray:
    """Build the climatology of a crop's channels in physical units from the training period.

    `tasks.metrics.build_climatology` chooses the hour-of-day or the day-of-year and hour
    climatology. When the training period lacks an hour of day that the evaluation scores,
    as with a training period shorter than one day, every hour gets the training-period mean
    instead, which the attribute ``climatology_kind`` records as ``"mean"``.
    """
    series = xr.concat(
        [_channel_series(ds, crop, channel, train_period) for channel in crop.channels], dim="variable"
    ).assign_coords(variable=crop.names)
    climatology = metrics.build_climatology(series, train_period).compute()
    kind = climatology.attrs["climatology_kind"]
    if "hour" in climatology.dims and not valid_hours <= set(climatology["hour"].values.tolist()):
        climatology = series.mean("time").compute().expand_dims(hour=np.arange(24))
        kind = "mean"

    if crop.statistics is None:
        mean = xr.DataArray(crop._mean[0, :, 0, 0, 0], dims="variable")
        std = xr.DataArray(crop._std[0, :, 0, 0, 0], dims="variable")
        climatology = climatology.astype(np.float64) * std + mean
    elif any(not np.isnan(channel.mean) for channel in crop.channels):
        # A crop with local and global channels: only the global ones are still normalised.
        mean = xr.DataArray([0.0 if np.isnan(c.mean) else c.mean for c in crop.channels], dims="variable")
        std = xr.DataArray([1.0 if np.isnan(c.std) else c.std for c in crop.channels], dims="variable")
        climatology = climatology.astype(np.float64) * std + mean
    time_dims = [dim for dim in ("dayofyear", "hour") if dim in climatology.dims]
    # NOTE: a day-of-year climatology has 366 x 24 fields per channel, about 144 MB for one
    # channel on a 64 x 64 crop in float32, and it stays in memory for the whole evaluation.
    climatology = climatology.transpose(*time_dims, "variable", ...).astype(np.float32)
    climatology.attrs = {"climatology_kind": kind}
    return climatology


def _attach_climatologies(ds: xr.Dataset, crops: dict[str, _Crop], dataset: FieldDataset) -> str:
    """Build each crop's climatology from ``ds.attrs["train_period"]`` and return its kind."""
    train_period = ds.attrs.get("train_period")
    if not train_period or len(train_period) != 2:
        raise ValueError(
            "dataset attrs have no 'train_period' (start, end): the ACC and the climatology baseline need "
            "the training period; evaluate a dataset written by tasks.ingest"
        )
    train_period = (str(train_period[0]), str(train_period[1]))
    hours = {int(hour) for index in range(len(dataset)) for hour in pd.DatetimeIndex(dataset.window_times(index)).hour}
    kinds = set()
    for crop in crops.values():
        crop.climatology = _crop_climatology(ds, crop, train_period, hours)
        kinds.add(crop.climatology.attrs["climatology_kind"])
    if "mean" in kinds:
        logger.warning(
            "the training period %s lacks hours of day that the evaluation scores (%s UTC): the ACC and the "
            "climatology baseline use the training-period mean at every hour",
            train_period, sorted(hours),
        )
    return ",".join(sorted(kinds))


def _predict(
    model: nn.Module,
    case: _Case,
    fields: dict[str, torch.Tensor],
    time_features: torch.Tensor,
    config: RunConfig,
) -> dict[str, np.ndarray]:
    """Mask one batch for a case and return the model's members per field, each [B, E, L, T, H, W]."""
    inputs, masks = _masked_input(case, fields, config)
    with torch.inference_mode():
        members = model(inputs, masks, time_features.to(next(iter(fields.values())).device))

    result = {}
    for name, x in fields.items():
        prediction = members.get(name) if isinstance(members, dict) else None
        if prediction is None or prediction.dim() != 6 or tuple(prediction.shape[:1] + prediction.shape[2:]) != tuple(x.shape):
            shape = None if prediction is None else tuple(prediction.shape)
            raise ValueError(
                f"model returned shape {shape} for field {name!r} of input shape {tuple(x.shape)}: the model "
                "must return, per field, ensemble members [B, E, L, T, H, W]"
            )
        values = prediction.float().cpu().numpy()
        if not np.isfinite(values).all():
            raise ValueError(f"model returned NaN or infinite values for field {name!r} in the {case.task} task")
        result[name] = values
    return result


@dataclass
class _FieldScores:
    """One field's evaluated channels and grid, with the running sums of one case."""

    field: FieldConfig
    crop: _Crop
    sums: ScoreSums


@dataclass
class _ExampleChoice:
    """The sample kept for a field's maps: its distance to the map time and its arrays."""

    distance: float = np.inf
    example: xr.Dataset | None = None


def _denormalise_members(crop: _Crop, members: np.ndarray, times: np.ndarray | None = None) -> np.ndarray:
    """Denormalise members [B, E, L, T, H, W] one member at a time, as `_Crop.denormalise` takes [B, L, T, H, W]."""
    return np.stack([crop.denormalise(members[:, member], times) for member in range(members.shape[1])], axis=1)


def _map_distances(times: np.ndarray, map_time: np.datetime64 | None) -> np.ndarray:
    """Return, per sample, how far its scored steps [B, S] are from `map_time` in hours (0 for None)."""
    if map_time is None:
        return np.zeros(times.shape[0])
    return np.abs((times - map_time) / np.timedelta64(1, "h")).min(axis=1)


def _score_field(
    case: _Case,
    scores: _FieldScores,
    members: np.ndarray,
    normalised_truth: np.ndarray,
    times: np.ndarray,
    scored: slice,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray | None], np.ndarray | None]:
    """Add one batch of one field to its sums and return its truth, prediction, baselines and spread at the scored steps."""
    crop, sums = scores.crop, scores.sums
    lead_time = np.arange(1, scored.stop - scored.start + 1) if case.task == "forecast" else None
    physical_members = _denormalise_members(crop, members, times)[:, :, :, scored]
    predicted = physical_members.mean(axis=1)
    truth = crop.denormalise(normalised_truth, times)
    if not np.isfinite(truth).all():
        raise ValueError(
            f"field {scores.field.name!r} contains NaN or infinite values in the windows of the {case.task} task"
        )
    climatology = crop.climatology_at(times[:, scored])
    predictions = _baselines(case, truth, scored, climatology)
    truth = truth[:, :, scored]

    truth_field = crop.as_field(truth, lead_time)
    climatology_field = crop.as_field(climatology, lead_time)
    sums.add("model", crop.as_field(predicted, lead_time), truth_field, crop.weights, climatology_field)
    for name, values in predictions.items():
        if values is not None:
            sums.add(name, crop.as_field(values, lead_time), truth_field, crop.weights, climatology_field)

    spread = None
    if physical_members.shape[1] > 1:
        member_fields = xr.concat(
            [crop.as_field(physical_members[:, member], lead_time) for member in range(physical_members.shape[1])],
            dim="member",
        )
        sums.add_ensemble(member_fields, truth_field, crop.weights)
        spread = physical_members.std(axis=1, ddof=1)

    if case.task == "downscaling":
        sums.add_spectrum("truth", truth_field)
        sums.add_spectrum("model", crop.as_field(predicted))
        for name, values in predictions.items():
            sums.add_spectrum(name, crop.as_field(values))
    sums.n_samples += truth.shape[0]
    return truth, predicted, predictions, spread


def _run_case(
    model: nn.Module,
    config: RunConfig,
    dataset: FieldDataset,
    crops: dict[str, _Crop],
    case: _Case,
    batch_size: int,
    device: torch.device,
    map_time: np.datetime64 | None,
) -> tuple[list[_FieldScores], list[xr.Dataset]]:
    """Run the model over all windows for one case and return its scores and one example, per field."""
    scored = _scored_steps(case, config)
    reduce_dims = ("sample", "latitude", "longitude") if case.task == "forecast" else ("sample", "step", "latitude", "longitude")
    field_scores = [
        _FieldScores(field_config, crops[field_config.name], ScoreSums(reduce_dims)) for field_config in config.model.fields
    ]
    choices = [_ExampleChoice() for _ in field_scores]

    n_batches = -(-len(dataset) // batch_size)
    batches = tqdm(_batches(dataset, batch_size), total=n_batches, desc=_title(case), leave=False)
    for batch_index, (fields, time_features) in enumerate(batches):
        fields = {name: x.to(device) for name, x in fields.items()}
        members = _predict(model, case, fields, time_features, config)
        first_window = batch_index * batch_size
        times = np.stack([dataset.window_times(first_window + row) for row in range(len(time_features))])
        distances = _map_distances(times[:, scored], map_time)
        best = int(np.argmin(distances))

        for scores, choice in zip(field_scores, choices, strict=True):
            name = scores.field.name
            truth, predicted, predictions, spread = _score_field(
                case, scores, members[name], fields[name].cpu().numpy(), times, scored
            )
            if distances[best] < choice.distance:
                choice.distance = float(distances[best])
                primary = predictions[BASELINES[case.task][0]]
                choice.example = _example(
                    case, scores.crop, times[best, scored], truth[best], predicted[best], primary[best],
                    None if spread is None else spread[best], map_time,
                )

    return field_scores, [choice.example for choice in choices]


def _group_examples(parts: list[xr.Dataset]) -> list[xr.Dataset]:
    """Stack the fields' examples along `variable`, one Dataset per crop shape, in field order."""
    groups: dict[tuple[int, int], list[xr.Dataset]] = {}
    for part in parts:
        groups.setdefault((part.sizes["latitude"], part.sizes["longitude"]), []).append(part)
    merged = []
    for same_grid in groups.values():
        group = xr.concat(same_grid, dim="variable")
        group.attrs = same_grid[0].attrs
        merged.append(group)
    return merged


def _example(
    case: _Case,
    crop: _Crop,
    times: np.ndarray,
    truth: np.ndarray,
    predicted: np.ndarray,
    baseline: np.ndarray,
    spread: np.ndarray | None,
    map_time: np.datetime64 | None,
) -> xr.Dataset:
    """Keep one sample's scored steps, each [C, S, H, W] in physical units, as maps."""
    coords = {
        "variable": crop.names,
        "time": times,
        "latitude": crop.latitude,
        "longitude": crop.longitude,
        "units": ("variable", crop.units),
    }
    if case.task == "forecast":
        coords["lead_time"] = ("time", np.arange(1, len(times) + 1))
    dims = ("variable", "time", "latitude", "longitude")
    data_vars = {
        "truth": (dims, truth.astype(np.float32)),
        "prediction": (dims, predicted.astype(np.float32)),
        "baseline": (dims, baseline.astype(np.float32)),
    }
    if spread is not None:
        data_vars["spread"] = (dims, spread.astype(np.float32))
    map_step = times[-1] if map_time is None else times[int(np.argmin(np.abs(times - map_time)))]
    return xr.Dataset(
        data_vars,
        coords=coords,
        attrs={
            "task": case.task,
            "baseline": BASELINES[case.task][0],
            "title": _title(case),
            "label_value": case.label,
            "map_time": str(np.datetime_as_string(map_step, unit="m")),
        },
    )


def _title(case: _Case) -> str:
    """Describe a case for plot titles, such as ``forecast, lead 1-6 h``."""
    if case.task == "forecast":
        return f"forecast, lead 1-{case.label} h"
    if case.task == "interpolation":
        return f"interpolation, gap {case.label} h"
    return f"downscaling, factor {case.label}"


# --- assembling the results -------------------------------------------------------------------


def _case_values(case: _Case, field_scores: list[_FieldScores], predictor: str, metric: str) -> xr.DataArray:
    """Return one case's score with dims (variable, <score dim>) over the channels of all fields."""
    per_field = []
    for scores in field_scores:
        zeros = scores.sums.result("model", "rmse", None) * 0
        per_field.append(scores.sums.result(predictor, metric, zeros))
    values = xr.concat(per_field, dim="variable")
    dim = SCORE_DIMS[case.task]
    if case.task == "forecast":
        return values.rename(step=dim).transpose("variable", dim)
    return values.expand_dims({dim: [case.label]}).transpose("variable", dim)


def _collect_spectra(entries: list[tuple[_Case, list[_FieldScores]]]) -> xr.DataArray:
    """Stack the downscaling spectra to dims (spectrum_of, variable, factor, wavenumber), NaN-padded."""
    names = ("truth", "model", *BASELINES["downscaling"])
    per_factor = []
    for case, field_scores in entries:
        per_name = [
            xr.concat([scores.sums.spectrum(name) for scores in field_scores], dim="variable", join="outer")
            for name in names
        ]
        per_factor.append(xr.concat(per_name, dim="spectrum_of", join="outer").expand_dims(factor=[case.label]))
    spectra = xr.concat(per_factor, dim="factor", join="outer").assign_coords(spectrum_of=list(names))
    spectra.attrs = {"description": "power spectrum along longitude, mean over samples, steps and latitudes"}
    return spectra.transpose("spectrum_of", "variable", "factor", "wavenumber")


def _collect_scores(case_sums: list[tuple[_Case, list[_FieldScores]]], ensemble: bool) -> xr.Dataset:
    """Assemble the scores Dataset from the running sums of every case and field."""
    by_task: dict[str, list[tuple[_Case, list[_FieldScores]]]] = {}
    for case, field_scores in case_sums:
        by_task.setdefault(case.task, []).append((case, field_scores))
    predictors = ["model"] + [name for task in by_task for name in BASELINES[task]]

    data_vars = {}
    for task, entries in by_task.items():
        dim = SCORE_DIMS[task]
        for metric in task_metrics(task, ensemble):
            per_predictor = []
            for predictor in ("model", *BASELINES[task]):
                per_case = [_case_values(case, field_scores, predictor, metric) for case, field_scores in entries]
                per_predictor.append(xr.concat(per_case, dim=dim))
            data = xr.concat(per_predictor, dim=xr.DataArray(["model", *BASELINES[task]], dims="predictor"))
            data = data.reindex(predictor=predictors)
            data.attrs = {"baselines": list(BASELINES[task]), "metric": metric}
            data_vars[f"{task}_{metric}"] = data
        if task == "downscaling":
            data_vars["downscaling_spectrum"] = _collect_spectra(entries)

    scores = xr.Dataset(data_vars)
    crops = [field_scores.crop for field_scores in case_sums[0][1]]
    channels = [channel for crop in crops for channel in crop.channels]
    scores = scores.assign_coords(
        variable=[channel.name for channel in channels],
        units=("variable", [channel.units for channel in channels]),
        field=("variable", [channel.variable for channel in channels]),
        level=("variable", [np.nan if channel.level is None else float(channel.level) for channel in channels]),
    )
    for dim, unit in (("lead_time", "h"), ("gap", "h"), ("factor", "1")):
        if dim in scores.coords:
            scores[dim].attrs["units"] = unit
    return scores


def _crops(config: RunConfig, ds: xr.Dataset, dataset: FieldDataset) -> dict[str, _Crop]:
    """Build each field's crop with its channels and, for local normalisation, loaded statistics."""
    channels = _channels(config, ds)
    crops = {}
    for field_config in config.model.fields:
        field_channels, channels = channels[: field_config.num_levels], channels[field_config.num_levels :]
        latitude, longitude = dataset.field_coordinates(field_config.name)
        local = any(np.isnan(channel.mean) for channel in field_channels)
        crops[field_config.name] = _Crop(field_channels, latitude, longitude, dataset_statistics(ds) if local else None)
    return crops


def _parse_map_time(map_time: str | None, period: tuple[str, str]) -> np.datetime64 | None:
    """Check that `map_time` lies in the evaluation period and return it as datetime64[ns]."""
    if map_time is None:
        return None
    try:
        chosen = pd.Timestamp(map_time)
    except ValueError as error:
        raise ValueError(f"map_time {map_time!r} is not an ISO 8601 time: {error}") from error
    start, end = (pd.Timestamp(bound) for bound in period)
    if not start <= chosen <= end:
        raise ValueError(f"map_time {map_time} lies outside the evaluation period {period[0]} .. {period[1]}")
    return np.datetime64(chosen.to_datetime64(), "ns")


def check_evaluation_inputs(
    config: RunConfig,
    ds: xr.Dataset,
    period: tuple[str, str] | None = None,
    tasks: Sequence[str] = TASKS,
    downscaling_factors: Sequence[int] = DEFAULT_DOWNSCALING_FACTORS,
    map_time: str | None = None,
    window_stride: int = 6,
) -> tuple[str, str]:
    """Check, without reading the data, that `evaluate_zero_shot` can run with these settings.

    Flows call this before they open an MLflow run or train, so a bad setting fails at
    once. Returns the evaluation period. Raises ValueError for a missing test period, an
    unknown task, a downscaling factor that does not divide the tokens, a map time outside
    the period or a period without one complete window of the model's time steps.
    """
    if period is None:
        if not ds.attrs.get("test_period"):
            raise ValueError("dataset attrs have no 'test_period': pass period=(start, end)")
        period = tuple(ds.attrs["test_period"])
    if window_stride < 1:
        raise ValueError(f"window_stride must be at least 1, got {window_stride}")
    _cases(config, tasks, downscaling_factors)
    _parse_map_time(map_time, period)
    try:
        FieldDataset(ds, config.model, period, time_stride=window_stride, random_crop=False, max_in_memory_bytes=0)
    except ValueError as error:
        raise ValueError(
            f"cannot evaluate on the test period {tuple(period)}: {error}. A model with "
            f"{config.model.sample_shape[0]} steps per window needs a longer test period, or fewer time tokens"
        ) from error
    return period


def evaluate_zero_shot(
    model: nn.Module,
    config: RunConfig,
    ds: xr.Dataset,
    period: tuple[str, str] | None = None,
    tasks: Sequence[str] = TASKS,
    window_stride: int = 6,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    downscaling_factors: Sequence[int] = DEFAULT_DOWNSCALING_FACTORS,
    map_time: str | None = None,
) -> EvaluationResult:
    """Score a pretrained model on masked forecasting, interpolation and downscaling.

    model: called as ``model(inputs, masks, time_features)`` with, per field name, inputs
        [B, L, T, H, W] normalised and masks [B, L, nT, nH, nW] bool (True = masked), and
        time_features [B, T, 5]. It must return, per field, ensemble members
        [B, E, L, T, H, W] of the whole sample in normalised units (E = 1 for a
        deterministic model). The model is moved to ``device`` and put in eval mode for
        the evaluation, and its train/eval mode is restored afterwards.
    config: the run configuration the model was trained with.
    ds: a normalised dataset with ``statistics``, ``train_period`` and ``test_period``
        attrs. The training period gives the climatology.
    period: inclusive ISO bounds of the evaluation period, ``ds.attrs["test_period"]``
        when None.
    tasks: a subset of ``("forecast", "interpolation", "downscaling")``.
    window_stride: time steps between the starts of consecutive windows.
    batch_size: windows per model call.
    device: where the model and each batch run. NOTE: only "cpu" has been run in tests.
    downscaling_factors: coarsening factors of the downscaling task; each must divide the
        spatial token size of every field.
    map_time: ISO time inside the period that the example maps show; by default the last
        scored step of the first window.

    Raises ValueError when the period contains no complete window, the fields contain
    NaN, a factor or the map time does not fit, or the model returns a wrong shape or
    non-finite values.
    """
    if period is None:
        if not ds.attrs.get("test_period"):
            raise ValueError("dataset attrs have no 'test_period': pass period=(start, end)")
        period = tuple(ds.attrs["test_period"])
    if window_stride < 1 or batch_size < 1:
        raise ValueError(f"window_stride and batch_size must be at least 1, got {window_stride} and {batch_size}")

    cases = _cases(config, tasks, downscaling_factors)
    chosen_time = _parse_map_time(map_time, period)
    dataset = FieldDataset(ds, config.model, period, time_stride=window_stride, random_crop=False)
    crops = _crops(config, ds, dataset)
    climatology_kind = _attach_climatologies(ds, crops, dataset)
    logger.info(
        "zero-shot evaluation on %s: %d windows every %d steps, tasks %s, %s climatology",
        period, len(dataset), window_stride, list(tasks), climatology_kind,
    )

    device = torch.device(device)
    was_training = model.training
    model.to(device)
    model.eval()
    try:
        case_sums = []
        examples: dict[str, xr.Dataset] = {}
        for case in cases:
            field_scores, parts = _run_case(model, config, dataset, crops, case, batch_size, device, chosen_time)
            case_sums.append((case, field_scores))
            # Interpolation keeps the example of its longest gap, downscaling of its largest factor.
            previous = examples.get(case.task)
            if previous is None or case.label > previous.attrs["label_value"]:
                groups = _group_examples(parts)
                examples[case.task] = groups[0]
                for group in groups[1:]:
                    examples[f"{case.task}-{group['variable'].values[0]}"] = group
    finally:
        model.train(was_training)

    ensemble = all(scores.sums.has("model", "crps") for _, field_scores in case_sums for scores in field_scores)
    scores = _collect_scores(case_sums, ensemble)
    scores.attrs = {
        "period": list(period),
        "n_samples": len(dataset),
        "window_stride": window_stride,
        "sample_shape": list(config.model.sample_shape),
        "climatology_kind": climatology_kind,
        "train_period": [str(bound) for bound in ds.attrs["train_period"]],
        "ensemble_size": int(config.model.ensemble_size),
    }
    flat, table = flatten_scores(scores)
    for task in dict.fromkeys(case.task for case in cases):
        rmse = scores[f"{task}_rmse"]
        logger.info(
            "%s RMSE %s",
            task,
            {
                str(predictor): np.round(rmse.sel(predictor=predictor).values, 3).tolist()
                for predictor in ("model", *BASELINES[task])
            },
        )
    return EvaluationResult(metrics=flat, scores=scores, table=table, examples=examples)
