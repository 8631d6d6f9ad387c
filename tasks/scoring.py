"""Pooled scores of the zero-shot evaluation (`tasks.evaluate`): names, running sums, flat metric names.

`ScoreSums` accumulates the scores of one masking case and field batch by batch, so the
memory needed does not grow with the number of samples, and `flatten_scores` turns the
assembled scores Dataset into MLflow metric names and a model-against-baseline table.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from tasks import metrics

TASKS = ("forecast", "interpolation", "downscaling")
# Baselines of each task, the first being the one the summary tables set beside the model.
BASELINES = {
    "forecast": ("persistence", "climatology"),
    "interpolation": ("linear", "cubic"),
    "downscaling": ("bilinear", "bicubic"),
}
METRICS = ("rmse", "mae", "bias", "acc")
# Scores added for a model with more than one ensemble member.
ENSEMBLE_METRICS = ("crps", "spread", "spread_skill_ratio")
# Scores added for downscaling, from the power spectra along longitude.
SPECTRAL_METRICS = ("small_scale_power_ratio",)
# Scores without units. The others are in the units of their variable.
UNITLESS_METRICS = ("acc", "spread_skill_ratio", "small_scale_power_ratio")
# Score dimension of each task: its coordinate labels are hours, hours and a factor.
SCORE_DIMS = {"forecast": "lead_time", "interpolation": "gap", "downscaling": "factor"}


# --- accumulating scores ----------------------------------------------------------------------


class ScoreSums:
    """Running sums of the scores of one case and field, per predictor and metric.

    Every sample has the same crop and so the same latitude weights, and inputs and
    predictions contain no NaN (both are checked). The pooled weighted mean over all
    samples is therefore the sample-count-weighted mean of the per-batch weighted means.
    RMSE is pooled as MSE and the spread as the ensemble variance, both rooted at the end.
    The ACC is a sum of per-sample, per-step values with their count. Power spectra are
    sums of per-batch mean spectra, weighted by the batch size.
    """

    def __init__(self, reduce_dims: tuple[str, ...]) -> None:
        self.reduce_dims = reduce_dims
        self.n_samples = 0
        self.n_members = 1
        self.sums: dict[tuple[str, str], xr.DataArray] = {}
        self.acc_counts: dict[str, xr.DataArray] = {}

    def _accumulate(self, predictor: str, metric: str, batch: int, value: xr.DataArray) -> None:
        key = (predictor, metric)
        self.sums[key] = self.sums.get(key, 0) + batch * value

    def add(
        self,
        predictor: str,
        prediction: xr.DataArray,
        truth: xr.DataArray,
        weights: xr.DataArray,
        climatology: xr.DataArray,
    ) -> None:
        """Add the deterministic scores and the ACC of one predictor's batch."""
        batch = prediction.sizes["sample"]
        self._accumulate(predictor, "rmse", batch, metrics.mse(prediction, truth, weights, self.reduce_dims))
        self._accumulate(predictor, "mae", batch, metrics.mae(prediction, truth, weights, self.reduce_dims))
        self._accumulate(predictor, "bias", batch, metrics.bias(prediction, truth, weights, self.reduce_dims))

        # One ACC per sample and step, as WeatherBench 2 scores each initial time and lead.
        per_field = metrics.acc(prediction, truth, climatology, weights, dims=("latitude", "longitude"))
        sample_dims = [dim for dim in ("sample", "step") if dim in self.reduce_dims]
        self.sums[(predictor, "acc")] = self.sums.get((predictor, "acc"), 0) + per_field.sum(sample_dims, skipna=True)
        self.acc_counts[predictor] = self.acc_counts.get(predictor, 0) + per_field.notnull().sum(sample_dims)

    def add_ensemble(self, members: xr.DataArray, truth: xr.DataArray, weights: xr.DataArray) -> None:
        """Add the model's fair CRPS and ensemble variance from members with a ``member`` dim."""
        batch = members.sizes["sample"]
        self.n_members = members.sizes["member"]
        crps = metrics.crps_ensemble(members, truth, "member", weights=weights, dims=self.reduce_dims)
        variance = metrics.ensemble_spread(members, "member", weights, self.reduce_dims) ** 2
        self._accumulate("model", "crps", batch, crps)
        self._accumulate("model", "spread", batch, variance)

    def add_spectrum(self, name: str, values: xr.DataArray) -> None:
        """Add the mean power spectrum along longitude of one batch, per variable."""
        batch = values.sizes["sample"]
        spectrum = metrics.power_spectrum(values, "longitude", dims=("sample", "step", "latitude"))
        # Crops of different widths have different wavelengths; the wavenumber stays comparable.
        spectrum = spectrum.drop_vars("wavelength", errors="ignore")
        self._accumulate(name, "spectrum", batch, spectrum)

    def has(self, predictor: str, metric: str) -> bool:
        return (predictor, metric) in self.sums

    def spectrum(self, name: str) -> xr.DataArray | None:
        if not self.has(name, "spectrum"):
            return None
        return self.sums[(name, "spectrum")] / self.n_samples

    def result(self, predictor: str, metric: str, template: xr.DataArray) -> xr.DataArray:
        """Return one pooled score, or NaN shaped like `template` (zeros of the score's shape) where it is undefined."""
        if metric == "acc" and predictor in self.acc_counts:
            counts = self.acc_counts[predictor]
            return self.sums[(predictor, "acc")] / counts.where(counts > 0)
        if metric in ("crps", "spread") and predictor != "model" and self.has("model", metric):
            # A deterministic baseline has spread 0, and its CRPS is its MAE.
            return template * 0 if metric == "spread" else self.result(predictor, "mae", template)
        if metric == "spread_skill_ratio":
            if predictor != "model" or not self.has("model", "spread"):
                return template * np.nan
            spread = self.result("model", "spread", template)
            skill = self.result("model", "rmse", template)
            return np.sqrt((self.n_members + 1) / self.n_members) * spread / skill
        if metric == "small_scale_power_ratio":
            predicted, truth = self.spectrum(predictor), self.spectrum("truth")
            if predicted is None or truth is None:
                return template * np.nan
            small_scales = truth["wavenumber"] > truth.sizes["wavenumber"] / 2
            return predicted.where(small_scales).sum("wavenumber") / truth.where(small_scales).sum("wavenumber")
        if not self.has(predictor, metric):
            return template * np.nan
        mean = self.sums[(predictor, metric)] / self.n_samples
        return np.sqrt(mean) if metric in ("rmse", "spread") else mean


def score_label(task: str, value: int) -> str:
    """Return the lead or gap part of a metric name: ``lead_3h``, ``gap_2h`` or ``factor_4``."""
    if task == "forecast":
        return f"lead_{value}h"
    if task == "interpolation":
        return f"gap_{value}h"
    return f"factor_{value}"


def task_metrics(task: str, ensemble: bool) -> tuple[str, ...]:
    """Return the metrics scored for a task, with the ensemble ones when `ensemble` is True."""
    names = METRICS + (ENSEMBLE_METRICS if ensemble else ())
    return names + (SPECTRAL_METRICS if task == "downscaling" else ())


def flatten_scores(scores: xr.Dataset) -> tuple[dict[str, float], pd.DataFrame]:
    """Turn a scores Dataset into flat metric names and a model-against-baseline table.

    The metric names follow ``<task>/<metric>/<variable>/<label>`` for the model and
    ``<task>/<metric>_<baseline>/<variable>/<label>`` for each baseline. NaN scores get no
    name. The table has one row per baseline, NaN where a score is not defined.
    """
    flat: dict[str, float] = {}
    rows = []
    for task, dim in SCORE_DIMS.items():
        for metric in (*METRICS, *ENSEMBLE_METRICS, *SPECTRAL_METRICS):
            key = f"{task}_{metric}"
            if key not in scores:
                continue
            data = scores[key]
            baseline_names = [str(name) for name in np.atleast_1d(data.attrs["baselines"])]
            for variable in data["variable"].values:
                for value in data[dim].values:
                    label = score_label(task, int(value))
                    point = data.sel(variable=variable, **{dim: value})
                    model_score = float(point.sel(predictor="model"))
                    if np.isfinite(model_score):
                        flat[f"{task}/{metric}/{variable}/{label}"] = model_score
                    for baseline in baseline_names:
                        baseline_score = float(point.sel(predictor=baseline))
                        if np.isfinite(baseline_score):
                            flat[f"{task}/{metric}_{baseline}/{variable}/{label}"] = baseline_score
                        rows.append(
                            {
                                "task": task,
                                "metric": metric,
                                "variable": str(variable),
                                "lead_or_gap": label,
                                "model": model_score,
                                "baseline": baseline,
                                "baseline_value": baseline_score,
                                "difference": model_score - baseline_score,
                            }
                        )
    return flat, pd.DataFrame(rows)
