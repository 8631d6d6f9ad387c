"""Zero-shot evaluation of a pretrained model on forecasting, interpolation and downscaling.

Samples are the windows of `models.data.FieldDataset` without random crops:
``sample_shape[0]`` consecutive hourly steps inside the evaluation period, one window
every ``window_stride`` steps, on the region of ``config.model.sample_shape`` at the
north-west corner of the grid, with every field's crop centred in that region. Each task
masks every field of every sample the way training did (`models.masking`) and scores the
model's prediction of the masked steps, the ensemble mean, against a baseline:

- ``forecast``: the last ``masking.forecast_tokens`` time tokens are masked and zeroed.
  Scored per lead time, in hours after the last visible step, against persistence of
  that step.
- ``interpolation``: for each gap length g in ``masking.interpolation_tokens``, a centred
  run of g time tokens is masked and zeroed. Scored over all hidden steps against linear
  interpolation between the visible steps on either side of the gap.
- ``downscaling``: every token is masked and contains the block average over
  ``masking.coarsen_factor`` x ``masking.coarsen_factor`` grid points, repeated over the
  block. Scored over the whole sample against bicubic upsampling of the same block
  averages.

Every level of every field is scored as its own variable (``t2m``, ``u850``). Scores are
in physical units after denormalising with the dataset's statistics: global ones from
``ds.attrs["statistics"]``, local ones per calendar month and grid point from the
statistics group of its Zarr store (`tasks.normalise.denormalise_window`). They are
cos-latitude weighted over the field's latitudes and pooled over samples and scored
steps before the square root (see `tasks.metrics`). A model with more than one ensemble
member also gets the ``spread`` (square root of the pooled ensemble variance) and the
fair ``crps`` (`models.losses.fair_crps`). For the deterministic baselines the spread is 0
and the CRPS equals the MAE.
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
from models.losses import fair_crps
from models.masking import corrupt, downscaling_mask, forecast_mask, interpolation_mask
from tasks import baselines, metrics
from tasks.normalise import dataset_statistics, denormalise_window

logger = logging.getLogger(__name__)

TASKS = ("forecast", "interpolation", "downscaling")
BASELINES = {"forecast": "persistence", "interpolation": "linear", "downscaling": "bicubic"}
METRICS = ("rmse", "mae", "bias")
# Scores added for a model with more than one ensemble member.
ENSEMBLE_METRICS = ("crps", "spread")
# Score dimension of each task: its coordinate labels are hours, hours and a factor.
SCORE_DIMS = {"forecast": "lead_time", "interpolation": "gap", "downscaling": "factor"}
PREDICTORS = ("model", "baseline")


@dataclass
class EvaluationResult:
    """Scores of one zero-shot evaluation, in four views of the same numbers.

    metrics: flat names such as ``forecast/rmse/t2m/lead_3h`` for the model and
        ``forecast/rmse_persistence/t2m/lead_3h`` for its baseline.
    scores: one data variable per task and metric, named ``<task>_<metric>`` (for example
        ``forecast_rmse``, and ``forecast_crps`` and ``forecast_spread`` for an ensemble),
        with dims ``(predictor, variable, <score dim>)``. ``predictor`` is
        ``["model", "baseline"]`` and the variable's ``baseline`` attribute names the
        baseline. The score dims are ``lead_time`` (hours) for forecast, ``gap`` (hours)
        for interpolation and ``factor`` for downscaling. The ``units`` coordinate gives
        each variable's physical units.
    table: one row per task, metric, variable and lead or gap, with columns ``task``,
        ``metric``, ``variable``, ``lead_or_gap``, ``model``, ``baseline``,
        ``baseline_value`` and ``difference`` (model minus baseline value).
    examples: per task, the first sample's ``truth``, ``prediction`` and ``baseline``
        (and ``spread`` for an ensemble) over its scored steps, in physical units, with
        dims ``(variable, time, latitude, longitude)``. It contains the fields whose crop
        equals the first field's crop. For interpolation it is the longest gap.
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
    """One masking setup: a task and, for interpolation, a gap of ``gap_tokens`` tokens.

    ``label`` is the longest lead in hours for forecast, the gap in hours for
    interpolation and the coarsening factor for downscaling.
    """

    task: str
    label: int
    gap_tokens: int | None = None


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
        name = variable
        if level is not None:
            levels = [int(value) for value in ds[variable]["level"].values]
            level_index = levels.index(int(level))
            name = f"{variable}{level}"
        channels.append(
            _Channel(
                variable=variable,
                level=level,
                name=name,
                mean=float("nan") if local else float(statistics[variable]["mean"][level_index]),
                std=float("nan") if local else float(statistics[variable]["std"][level_index]),
                units=str(ds[variable].attrs.get("units", "")),
                level_index=level_index,
            )
        )
    return channels


def _cases(config: RunConfig, tasks: Sequence[str]) -> list[_Case]:
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
            cases.append(_Case(task, label=config.masking.coarsen_factor))
    return cases


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
    masks: name -> [B, L, nT, nH, nW]). Forecast and interpolation tokens are zeroed,
    downscaling tokens coarsened.
    """
    inputs, masks = {}, {}
    for field in config.model.fields:
        x = fields[field.name]
        batch, levels = x.shape[:2]
        grid = field.num_tokens
        if case.task == "forecast":
            mask = forecast_mask(batch, levels, grid, config.masking.forecast_tokens)
            fill = "zero"
        elif case.task == "interpolation":
            start = _gap_start(grid[0], case.gap_tokens)
            mask = interpolation_mask(batch, levels, grid, start, case.gap_tokens)
            fill = "zero"
        else:
            mask = downscaling_mask(batch, levels, grid)
            fill = "coarsen"
        inputs[field.name] = corrupt(x, mask, field.token_shape, fill, config.masking.coarsen_factor)
        masks[field.name] = mask.to(x.device)
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


def _baseline(case: _Case, truth: np.ndarray, scored: slice, factor: int) -> np.ndarray:
    """Compute the baseline of a case over the scored steps.

    truth: [B, C, T, H, W] in physical units. Returns [B, C, S, H, W] for the S scored steps.
    """
    n_scored = scored.stop - scored.start
    if case.task == "forecast":
        return baselines.persistence(truth[:, :, : scored.start], n_scored)
    if case.task == "interpolation":
        return baselines.linear_interpolation(
            truth[:, :, scored.start - 1], truth[:, :, scored.stop], n_scored
        )
    return baselines.bicubic_upsampling(baselines.block_average(truth, factor), factor)


class _Crop:
    """The evaluated channels and grid: denormalising and labelling sample arrays.

    Holds the crop's latitude and longitude, its cos-latitude weights and each channel's
    normalisation mean and std.
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

    def denormalise(self, values: np.ndarray, times: np.ndarray | None = None) -> np.ndarray:
        """Convert [B, C, T, H, W] normalised values to float64 physical units: x * std + mean.

        Local channels take the statistics of each step's calendar month from `times` [B, T].
        """
        if self.statistics is None:
            return values.astype(np.float64) * self._std + self._mean
        keys = [(channel.variable, channel.level_index) for channel in self.channels]
        return denormalise_window(values, self.statistics, keys, times, self.latitude, self.longitude)

    def as_field(self, values: np.ndarray, lead_time: np.ndarray | None = None) -> xr.DataArray:
        """Wrap [B, C, S, H, W] values as a DataArray; ``lead_time`` labels the S steps."""
        coords = {"variable": self.names, "latitude": self.latitude, "longitude": self.longitude}
        if lead_time is not None:
            coords["step"] = lead_time
        return xr.DataArray(values, dims=("sample", "variable", "step", "latitude", "longitude"), coords=coords)


class _ScoreSums:
    """Running sample-weighted sums of the per-batch scores of one case and field.

    Every sample has the same crop and so the same latitude weights, and inputs and
    predictions contain no NaN (both are checked). The pooled weighted mean over all
    samples is therefore the sample-count-weighted mean of the per-batch weighted means.
    RMSE is pooled as MSE and the spread as the ensemble variance, both rooted at the end.
    """

    def __init__(self, reduce_dims: tuple[str, ...]) -> None:
        self.reduce_dims = reduce_dims
        self.n_samples = 0
        self.sums: dict[tuple[str, str], xr.DataArray] = {}

    def _accumulate(self, predictor: str, metric: str, batch: int, value: xr.DataArray) -> None:
        key = (predictor, metric)
        self.sums[key] = self.sums.get(key, 0) + batch * value

    def add(self, predictor: str, prediction: xr.DataArray, truth: xr.DataArray, weights: xr.DataArray) -> None:
        batch = prediction.sizes["sample"]
        self._accumulate(predictor, "rmse", batch, metrics.mse(prediction, truth, weights, self.reduce_dims))
        self._accumulate(predictor, "mae", batch, metrics.mae(prediction, truth, weights, self.reduce_dims))
        self._accumulate(predictor, "bias", batch, metrics.bias(prediction, truth, weights, self.reduce_dims))

    def add_ensemble(
        self, crps: xr.DataArray, variance: xr.DataArray, baseline_mae: xr.DataArray, weights: xr.DataArray
    ) -> None:
        """Add the model's per-point CRPS and ensemble variance, and the baseline's CRPS (its MAE) and spread 0."""
        batch = crps.sizes["sample"]
        model_crps = _weighted_mean(crps, weights, self.reduce_dims)
        self._accumulate("model", "crps", batch, model_crps)
        self._accumulate("model", "spread", batch, _weighted_mean(variance, weights, self.reduce_dims))
        self._accumulate("baseline", "crps", batch, baseline_mae)
        self._accumulate("baseline", "spread", batch, xr.zeros_like(model_crps))

    def result(self, predictor: str, metric: str) -> xr.DataArray:
        mean = self.sums[(predictor, metric)] / self.n_samples
        return np.sqrt(mean) if metric in ("rmse", "spread") else mean

    def has(self, metric: str) -> bool:
        return ("model", metric) in self.sums


def _weighted_mean(values: xr.DataArray, weights: xr.DataArray, dims: tuple[str, ...]) -> xr.DataArray:
    """Return the latitude-weighted mean of NaN-free values over `dims`, as `tasks.metrics` weighs."""
    return (values * weights).mean(dim=dims) / weights.mean()


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
    sums: _ScoreSums


def _denormalise_members(crop: _Crop, members: np.ndarray, times: np.ndarray | None = None) -> np.ndarray:
    """Denormalise members [B, E, L, T, H, W] one member at a time, as `_Crop.denormalise` takes [B, L, T, H, W]."""
    return np.stack([crop.denormalise(members[:, member], times) for member in range(members.shape[1])], axis=1)


def _run_case(
    model: nn.Module,
    config: RunConfig,
    dataset: FieldDataset,
    crops: dict[str, _Crop],
    case: _Case,
    batch_size: int,
    device: torch.device,
) -> tuple[list[_FieldScores], xr.Dataset]:
    """Run the model over all windows for one case and return its scores per field and first example."""
    scored = _scored_steps(case, config)
    if case.task == "forecast":
        lead_time = np.arange(1, scored.stop - scored.start + 1)
        reduce_dims = ("sample", "latitude", "longitude")
    else:
        lead_time = None
        reduce_dims = ("sample", "step", "latitude", "longitude")
    field_scores = [
        _FieldScores(field, crops[field.name], _ScoreSums(reduce_dims)) for field in config.model.fields
    ]

    example_parts: list[xr.Dataset] = []
    first_batch = True
    n_batches = -(-len(dataset) // batch_size)
    batches = tqdm(_batches(dataset, batch_size), total=n_batches, desc=_title(case), leave=False)
    for batch_index, (fields, time_features) in enumerate(batches):
        fields = {name: x.to(device) for name, x in fields.items()}
        members = _predict(model, case, fields, time_features, config)
        first_window = batch_index * batch_size
        times = np.stack([dataset.window_times(first_window + row) for row in range(len(time_features))])
        for scores in field_scores:
            name, crop, sums = scores.field.name, scores.crop, scores.sums
            physical_members = _denormalise_members(crop, members[name], times)
            predicted = physical_members.mean(axis=1)
            truth = crop.denormalise(fields[name].cpu().numpy(), times)
            if not np.isfinite(truth).all():
                raise ValueError(
                    f"field {name!r} contains NaN or infinite values in the windows of the {case.task} task"
                )
            baseline = _baseline(case, truth, scored, config.masking.coarsen_factor)

            truth_field = crop.as_field(truth[:, :, scored], lead_time)
            sums.add("model", crop.as_field(predicted[:, :, scored], lead_time), truth_field, crop.weights)
            sums.add("baseline", crop.as_field(baseline, lead_time), truth_field, crop.weights)
            spread = None
            if physical_members.shape[1] > 1:
                scored_members = torch.from_numpy(physical_members[:, :, :, scored])
                crps = fair_crps(scored_members, torch.from_numpy(truth[:, :, scored])).numpy()
                variance = physical_members[:, :, :, scored].var(axis=1, ddof=1)
                baseline_mae = metrics.mae(crop.as_field(baseline, lead_time), truth_field, crop.weights, reduce_dims)
                sums.add_ensemble(
                    crop.as_field(crps, lead_time), crop.as_field(variance, lead_time), baseline_mae, crop.weights
                )
                spread = np.sqrt(variance[0])
            sums.n_samples += truth.shape[0]

            if first_batch:
                times = dataset.window_times(0)[scored]
                example_parts.append(
                    _example(case, crop, times, truth[0, :, scored], predicted[0, :, scored], baseline[0], spread)
                )
        first_batch = False

    return field_scores, _merge_examples(example_parts)


def _merge_examples(parts: list[xr.Dataset]) -> xr.Dataset:
    """Stack the fields' examples along `variable`, keeping those on the first field's crop.

    NOTE: a field with another token size or count has another crop and is left out of the
    example maps. Its scores are complete.
    """
    first = parts[0]
    same_grid = [
        part
        for part in parts
        if part.sizes["latitude"] == first.sizes["latitude"] and part.sizes["longitude"] == first.sizes["longitude"]
    ]
    merged = xr.concat(same_grid, dim="variable")
    merged.attrs = first.attrs
    return merged


def _example(
    case: _Case,
    crop: _Crop,
    times: np.ndarray,
    truth: np.ndarray,
    predicted: np.ndarray,
    baseline: np.ndarray,
    spread: np.ndarray | None = None,
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
    return xr.Dataset(
        data_vars,
        coords=coords,
        attrs={
            "task": case.task,
            "baseline": BASELINES[case.task],
            "title": _title(case),
            "label_value": case.label,
        },
    )


def _title(case: _Case) -> str:
    """Describe a case for plot titles, such as ``forecast, lead 1-6 h``."""
    if case.task == "forecast":
        return f"forecast, lead 1-{case.label} h"
    if case.task == "interpolation":
        return f"interpolation, gap {case.label} h"
    return f"downscaling, factor {case.label}"


def _label(task: str, value: int) -> str:
    """Return the lead or gap part of a metric name: ``lead_3h``, ``gap_2h`` or ``factor_4``."""
    if task == "forecast":
        return f"lead_{value}h"
    if task == "interpolation":
        return f"gap_{value}h"
    return f"factor_{value}"


def _case_result(field_scores: list[_FieldScores], predictor: str, metric: str) -> xr.DataArray:
    """Return one case's score with dims (variable, ...) over the channels of all fields."""
    return xr.concat([scores.sums.result(predictor, metric) for scores in field_scores], dim="variable")


def _collect_scores(case_sums: list[tuple[_Case, list[_FieldScores]]], metric_names: Sequence[str]) -> xr.Dataset:
    """Assemble the scores Dataset from the running sums of every case and field."""
    by_task: dict[str, list[tuple[_Case, list[_FieldScores]]]] = {}
    for case, field_scores in case_sums:
        by_task.setdefault(case.task, []).append((case, field_scores))

    data_vars = {}
    for task, entries in by_task.items():
        dim = SCORE_DIMS[task]
        for metric in metric_names:
            per_predictor = []
            for predictor in PREDICTORS:
                per_case = []
                for case, field_scores in entries:
                    values = _case_result(field_scores, predictor, metric)
                    if task == "forecast":
                        values = values.rename(step=dim).transpose("variable", dim)
                    else:
                        values = values.expand_dims({dim: [case.label]}).transpose("variable", dim)
                    per_case.append(values)
                per_predictor.append(xr.concat(per_case, dim=dim))
            data = xr.concat(per_predictor, dim=xr.DataArray(list(PREDICTORS), dims="predictor"))
            data.attrs = {"baseline": BASELINES[task], "metric": metric}
            data_vars[f"{task}_{metric}"] = data

    scores = xr.Dataset(data_vars)
    crops = [scores.crop for scores in case_sums[0][1]]
    names = [name for crop in crops for name in crop.names]
    units = [unit for crop in crops for unit in crop.units]
    scores = scores.assign_coords(variable=names, units=("variable", units))
    for dim, unit in (("lead_time", "h"), ("gap", "h"), ("factor", "1")):
        if dim in scores.coords:
            scores[dim].attrs["units"] = unit
    return scores


def _flatten(scores: xr.Dataset) -> tuple[dict[str, float], pd.DataFrame]:
    """Turn the scores Dataset into flat metric names and a comparison table."""
    flat: dict[str, float] = {}
    rows = []
    for task, dim in SCORE_DIMS.items():
        for metric in (*METRICS, *ENSEMBLE_METRICS):
            key = f"{task}_{metric}"
            if key not in scores:
                continue
            data = scores[key]
            baseline_name = data.attrs["baseline"]
            for variable in data["variable"].values:
                for value in data[dim].values:
                    label = _label(task, int(value))
                    model_score = float(data.sel(predictor="model", variable=variable, **{dim: value}))
                    baseline_score = float(data.sel(predictor="baseline", variable=variable, **{dim: value}))
                    flat[f"{task}/{metric}/{variable}/{label}"] = model_score
                    flat[f"{task}/{metric}_{baseline_name}/{variable}/{label}"] = baseline_score
                    rows.append(
                        {
                            "task": task,
                            "metric": metric,
                            "variable": str(variable),
                            "lead_or_gap": label,
                            "model": model_score,
                            "baseline": baseline_name,
                            "baseline_value": baseline_score,
                            "difference": model_score - baseline_score,
                        }
                    )
    return flat, pd.DataFrame(rows)


def evaluate_zero_shot(
    model: nn.Module,
    config: RunConfig,
    ds: xr.Dataset,
    period: tuple[str, str] | None = None,
    tasks: Sequence[str] = TASKS,
    window_stride: int = 6,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> EvaluationResult:
    """Score a pretrained model on masked forecasting, interpolation and downscaling.

    model: called as ``model(inputs, masks, time_features)`` with, per field name, inputs
        [B, L, T, H, W] normalised and masks [B, L, nT, nH, nW] bool (True = masked), and
        time_features [B, T, 5]. It must return, per field, ensemble members
        [B, E, L, T, H, W] of the whole sample in normalised units (E = 1 for a
        deterministic model). The model is moved to ``device`` and put in eval mode for
        the evaluation, and its train/eval mode is restored afterwards.
    config: the run configuration the model was trained with.
    ds: a normalised dataset with ``statistics`` and ``test_period`` attrs.
    period: inclusive ISO bounds of the evaluation period, ``ds.attrs["test_period"]``
        when None.
    tasks: a subset of ``("forecast", "interpolation", "downscaling")``.
    window_stride: time steps between the starts of consecutive windows.
    batch_size: windows per model call.
    device: where the model and each batch run. NOTE: only "cpu" has been run in tests.

    Raises ValueError when the period contains no complete window, the fields contain
    NaN, or the model returns a wrong shape or non-finite values.
    """
    if period is None:
        if not ds.attrs.get("test_period"):
            raise ValueError("dataset attrs have no 'test_period': pass period=(start, end)")
        period = tuple(ds.attrs["test_period"])
    if window_stride < 1 or batch_size < 1:
        raise ValueError(f"window_stride and batch_size must be at least 1, got {window_stride} and {batch_size}")

    cases = _cases(config, tasks)
    dataset = FieldDataset(ds, config.model, period, time_stride=window_stride, random_crop=False)
    channels = _channels(config, ds)
    crops = {}
    for field in config.model.fields:
        field_channels, channels = channels[: field.num_levels], channels[field.num_levels :]
        latitude, longitude = dataset.field_coordinates(field.name)
        local = any(np.isnan(channel.mean) for channel in field_channels)
        crops[field.name] = _Crop(field_channels, latitude, longitude, dataset_statistics(ds) if local else None)
    logger.info(
        "zero-shot evaluation on %s: %d windows every %d steps, tasks %s",
        period, len(dataset), window_stride, list(tasks),
    )

    device = torch.device(device)
    was_training = model.training
    model.to(device)
    model.eval()
    try:
        case_sums = []
        examples: dict[str, xr.Dataset] = {}
        for case in cases:
            field_scores, example = _run_case(model, config, dataset, crops, case, batch_size, device)
            case_sums.append((case, field_scores))
            # Interpolation keeps the example of its longest gap.
            previous = examples.get(case.task)
            if previous is None or case.label > previous.attrs["label_value"]:
                examples[case.task] = example
    finally:
        model.train(was_training)

    has_ensemble = all(scores.sums.has("crps") for _, field_scores in case_sums for scores in field_scores)
    scores = _collect_scores(case_sums, (*METRICS, *ENSEMBLE_METRICS) if has_ensemble else METRICS)
    scores.attrs = {
        "period": list(period),
        "n_samples": len(dataset),
        "window_stride": window_stride,
        "sample_shape": list(config.model.sample_shape),
    }
    flat, table = _flatten(scores)
    for task in dict.fromkeys(case.task for case in cases):
        rmse = scores[f"{task}_rmse"]
        logger.info(
            "%s RMSE model %s, %s %s",
            task,
            np.round(rmse.sel(predictor="model").values, 3).tolist(),
            BASELINES[task],
            np.round(rmse.sel(predictor="baseline").values, 3).tolist(),
        )
    return EvaluationResult(metrics=flat, scores=scores, table=table, examples=examples)
