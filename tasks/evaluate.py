"""Zero-shot evaluation of a pretrained model on forecasting, interpolation and downscaling.

Samples are the windows of `models.data.WindowDataset` without random crops:
``sample_shape[0]`` consecutive hourly steps inside the evaluation period, one window
every ``window_stride`` steps, on the ``sample_shape[1:]`` grid points at the north-west
corner of the grid (crop offset 0). Each task masks every sample the way training did
(`models.masking`) and scores the model's prediction of the masked steps against a
baseline:

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

Scores are in physical units after denormalising with ``ds.attrs["statistics"]``. They
are cos-latitude weighted over the crop's latitudes and pooled over samples and scored
steps before the square root (see `tasks.metrics`).
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

from models.config import RunConfig
from models.data import WindowDataset
from models.masking import corrupt, downscaling_mask, forecast_mask, interpolation_mask
from tasks import baselines, metrics

logger = logging.getLogger(__name__)

TASKS = ("forecast", "interpolation", "downscaling")
BASELINES = {"forecast": "persistence", "interpolation": "linear", "downscaling": "bicubic"}
METRICS = ("rmse", "mae", "bias")
# Score dimension of each task: its coordinate labels are hours, hours and a factor.
SCORE_DIMS = {"forecast": "lead_time", "interpolation": "gap", "downscaling": "factor"}
PREDICTORS = ("model", "baseline")


@dataclass
class EvaluationResult:
    """Scores of one zero-shot evaluation, in four views of the same numbers.

    metrics: flat names such as ``forecast/rmse/t2m/lead_3h`` for the model and
        ``forecast/rmse_persistence/t2m/lead_3h`` for its baseline.
    scores: one data variable per task and metric, named ``<task>_<metric>`` (for example
        ``forecast_rmse``), with dims ``(predictor, variable, <score dim>)``. ``predictor`` is
        ``["model", "baseline"]`` and the variable's ``baseline`` attribute names the
        baseline. The score dims are ``lead_time`` (hours) for forecast, ``gap`` (hours)
        for interpolation and ``factor`` for downscaling. The ``units`` coordinate gives
        each variable's physical units.
    table: one row per task, metric, variable and lead or gap, with columns ``task``,
        ``metric``, ``variable``, ``lead_or_gap``, ``model``, ``baseline``,
        ``baseline_value`` and ``difference`` (model minus baseline value).
    examples: per task, the first sample's ``truth``, ``prediction`` and ``baseline``
        over its scored steps, in physical units, with dims
        ``(variable, time, latitude, longitude)``. For interpolation it is the longest gap.
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
        if statistics[variable].get("scheme", "global") != "global":
            # TODO: denormalise locally normalised channels per calendar month and grid point.
            raise ValueError(
                f"variable {variable!r} is normalised with the {statistics[variable]['scheme']!r} scheme, but "
                f"zero-shot evaluation supports only global statistics: re-ingest with "
                f"normalisation={{{variable!r}: 'global'}}"
            )
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
                mean=float(statistics[variable]["mean"][level_index]),
                std=float(statistics[variable]["std"][level_index]),
                units=str(ds[variable].attrs.get("units", "")),
            )
        )
    return channels


def _cases(config: RunConfig, tasks: Sequence[str]) -> list[_Case]:
    """List the masking setups of the requested tasks, with their score labels."""
    unknown = [task for task in tasks if task not in TASKS]
    if unknown:
        raise ValueError(f"unknown evaluation tasks {unknown}: use a subset of {list(TASKS)}")

    token_steps = config.model.token_shape[0]
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


def _batches(dataset: WindowDataset, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x [B, C, T, H, W], time_features [B, T, 4]) over the windows in order."""
    for first in range(0, len(dataset), batch_size):
        items = [dataset[index] for index in range(first, min(first + batch_size, len(dataset)))]
        yield torch.stack([x for x, _ in items]), torch.stack([features for _, features in items])


def _masked_input(case: _Case, x: torch.Tensor, config: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Build the model input and token mask of one case.

    x: [B, C, T, H, W] normalised. Returns (inputs [B, C, T, H, W], mask [B, C, nT, nH, nW]).
    Forecast and interpolation tokens are zeroed, downscaling tokens coarsened.
    """
    batch, channels = x.shape[:2]
    grid = config.model.grid_tokens
    token_shape = config.model.token_shape

    if case.task == "forecast":
        mask = forecast_mask(batch, channels, grid, config.masking.forecast_tokens)
        fill = "zero"
    elif case.task == "interpolation":
        start = _gap_start(grid[0], case.gap_tokens)
        mask = interpolation_mask(batch, channels, grid, start, case.gap_tokens)
        fill = "zero"
    else:
        mask = downscaling_mask(batch, channels, grid)
        fill = "coarsen"

    inputs = corrupt(x, mask, token_shape, fill, config.masking.coarsen_factor)
    return inputs, mask.to(x.device)


def _gap_start(n_time_tokens: int, gap_tokens: int) -> int:
    """Return the first time token of a centred gap, rounding towards the start."""
    return (n_time_tokens - gap_tokens) // 2


def _scored_steps(case: _Case, config: RunConfig) -> slice:
    """Return the time steps of a sample that a case scores."""
    steps = config.model.sample_shape[0]
    token_steps = config.model.token_shape[0]
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

    def __init__(self, channels: list[_Channel], latitude: np.ndarray, longitude: np.ndarray) -> None:
        self.channels = channels
        self.names = [channel.name for channel in channels]
        self.units = [channel.units for channel in channels]
        self.latitude = latitude
        self.longitude = longitude
        self.weights = metrics.latitude_weights(latitude)
        self._mean = np.array([channel.mean for channel in channels])[None, :, None, None, None]
        self._std = np.array([channel.std for channel in channels])[None, :, None, None, None]

    def denormalise(self, values: np.ndarray) -> np.ndarray:
        """Convert [B, C, T, H, W] normalised values to float64 physical units: x * std + mean."""
        return values.astype(np.float64) * self._std + self._mean

    def as_field(self, values: np.ndarray, lead_time: np.ndarray | None = None) -> xr.DataArray:
        """Wrap [B, C, S, H, W] values as a DataArray; ``lead_time`` labels the S steps."""
        coords = {"variable": self.names, "latitude": self.latitude, "longitude": self.longitude}
        if lead_time is not None:
            coords["step"] = lead_time
        return xr.DataArray(values, dims=("sample", "variable", "step", "latitude", "longitude"), coords=coords)


class _ScoreSums:
    """Running sample-weighted sums of the per-batch scores of one case.

    Every sample has the same crop and so the same latitude weights, and inputs and
    predictions contain no NaN (both are checked). The pooled weighted mean over all
    samples is therefore the sample-count-weighted mean of the per-batch weighted means.
    RMSE is pooled as MSE and rooted at the end.
    """

    def __init__(self, reduce_dims: tuple[str, ...]) -> None:
        self.reduce_dims = reduce_dims
        self.n_samples = 0
        self.sums: dict[tuple[str, str], xr.DataArray] = {}

    def add(self, predictor: str, prediction: xr.DataArray, truth: xr.DataArray, weights: xr.DataArray) -> None:
        batch = prediction.sizes["sample"]
        batch_means = {
            "rmse": metrics.mse(prediction, truth, weights, self.reduce_dims),
            "mae": metrics.mae(prediction, truth, weights, self.reduce_dims),
            "bias": metrics.bias(prediction, truth, weights, self.reduce_dims),
        }
        for metric, value in batch_means.items():
            key = (predictor, metric)
            self.sums[key] = self.sums.get(key, 0) + batch * value

    def result(self, predictor: str, metric: str) -> xr.DataArray:
        mean = self.sums[(predictor, metric)] / self.n_samples
        return np.sqrt(mean) if metric == "rmse" else mean


def _predict(
    model: nn.Module, case: _Case, x: torch.Tensor, time_features: torch.Tensor, config: RunConfig
) -> np.ndarray:
    """Mask one batch for a case and return the model's prediction [B, C, T, H, W] as numpy."""
    inputs, mask = _masked_input(case, x, config)
    with torch.inference_mode():
        prediction = model(inputs, mask, time_features.to(x.device))

    if tuple(prediction.shape) != tuple(x.shape):
        raise ValueError(
            f"model returned shape {tuple(prediction.shape)} for input shape {tuple(x.shape)}: "
            "the model must predict the whole field [B, C, T, H, W]"
        )
    values = prediction.float().cpu().numpy()
    if not np.isfinite(values).all():
        raise ValueError(f"model returned NaN or infinite values in the {case.task} task")
    return values


def _run_case(
    model: nn.Module,
    config: RunConfig,
    dataset: WindowDataset,
    crop: _Crop,
    case: _Case,
    batch_size: int,
    device: torch.device,
) -> tuple[_ScoreSums, xr.Dataset]:
    """Run the model over all windows for one case and return its scores and first example."""
    scored = _scored_steps(case, config)
    if case.task == "forecast":
        lead_time = np.arange(1, scored.stop - scored.start + 1)
        sums = _ScoreSums(reduce_dims=("sample", "latitude", "longitude"))
    else:
        lead_time = None
        sums = _ScoreSums(reduce_dims=("sample", "step", "latitude", "longitude"))

    example = None
    n_batches = -(-len(dataset) // batch_size)
    batches = tqdm(_batches(dataset, batch_size), total=n_batches, desc=_title(case), leave=False)
    for x, time_features in batches:
        x = x.to(device)
        predicted = crop.denormalise(_predict(model, case, x, time_features, config))
        truth = crop.denormalise(x.cpu().numpy())
        if not np.isfinite(truth).all():
            raise ValueError(f"fields contain NaN or infinite values in the windows of the {case.task} task")
        baseline = _baseline(case, truth, scored, config.masking.coarsen_factor)

        truth_field = crop.as_field(truth[:, :, scored], lead_time)
        sums.add("model", crop.as_field(predicted[:, :, scored], lead_time), truth_field, crop.weights)
        sums.add("baseline", crop.as_field(baseline, lead_time), truth_field, crop.weights)
        sums.n_samples += x.shape[0]

        if example is None:
            times = dataset.window_times(0)[scored]
            example = _example(case, crop, times, truth[0, :, scored], predicted[0, :, scored], baseline[0])

    return sums, example


def _example(
    case: _Case, crop: _Crop, times: np.ndarray, truth: np.ndarray, predicted: np.ndarray, baseline: np.ndarray
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
    return xr.Dataset(
        {
            "truth": (dims, truth.astype(np.float32)),
            "prediction": (dims, predicted.astype(np.float32)),
            "baseline": (dims, baseline.astype(np.float32)),
        },
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


def _collect_scores(case_sums: list[tuple[_Case, _ScoreSums]], crop: _Crop) -> xr.Dataset:
    """Assemble the scores Dataset from the running sums of every case."""
    by_task: dict[str, list[tuple[_Case, _ScoreSums]]] = {}
    for case, sums in case_sums:
        by_task.setdefault(case.task, []).append((case, sums))

    data_vars = {}
    for task, entries in by_task.items():
        dim = SCORE_DIMS[task]
        for metric in METRICS:
            per_predictor = []
            for predictor in PREDICTORS:
                per_case = []
                for case, sums in entries:
                    values = sums.result(predictor, metric)
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
    scores = scores.assign_coords(variable=crop.names, units=("variable", crop.units))
    for dim, units in (("lead_time", "h"), ("gap", "h"), ("factor", "1")):
        if dim in scores.coords:
            scores[dim].attrs["units"] = units
    return scores


def _flatten(scores: xr.Dataset) -> tuple[dict[str, float], pd.DataFrame]:
    """Turn the scores Dataset into flat metric names and a comparison table."""
    flat: dict[str, float] = {}
    rows = []
    for task, dim in SCORE_DIMS.items():
        for metric in METRICS:
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

    model: called as ``model(x, mask, time_features)`` with x [B, C, T, H, W] normalised,
        mask [B, C, nT, nH, nW] bool (True = masked) and time_features [B, T, 4]. It must
        return the whole field [B, C, T, H, W] in normalised units. The model is moved to
        ``device`` and put in eval mode for the evaluation, and its train/eval mode is
        restored afterwards.
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
    dataset = WindowDataset(
        ds,
        config.model.variables,
        period,
        config.model.sample_shape,
        time_stride=window_stride,
        levels=config.model.levels,
        random_crop=False,
    )
    _, height, width = config.model.sample_shape
    crop = _Crop(_channels(config, ds), dataset.latitude[:height], dataset.longitude[:width])
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
            sums, example = _run_case(model, config, dataset, crop, case, batch_size, device)
            case_sums.append((case, sums))
            # Interpolation keeps the example of its longest gap.
            previous = examples.get(case.task)
            if previous is None or case.label > previous.attrs["label_value"]:
                examples[case.task] = example
    finally:
        model.train(was_training)

    scores = _collect_scores(case_sums, crop)
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
