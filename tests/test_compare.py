"""Evaluation runs logged to MLflow and Prefect, and `atmorep compare` on two of them.

Two untrained AtmoRep models (seeds 0 and 1) are evaluated on the real UK 2 m temperature
inside one Prefect flow run on a temporary Prefect server. Each gets its own MLflow run
in a sqlite store, logged by `flows.evaluate.evaluate_and_report` as in the
`evaluate/zero-shot` flow.
"""

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from prefect import flow
from prefect.artifacts import Artifact
from prefect.testing.utilities import prefect_test_harness
from test_evaluate import raw_t2m, uk_dataset  # noqa: F401  (fixtures)

from flows.cli import main
from flows.common import stage_run
from flows.evaluate import evaluate_and_report
from flows.params import EvaluateParams
from models.atmorep import AtmoRep
from models.config import RunConfig
from tasks.compare import Evaluation, comparison_table, load_evaluation
from tasks.reporting import open_scores
from tasks.tracking import client

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def evaluation_runs(uk_dataset, tmp_path_factory):  # noqa: F811
    """Run two evaluations in one flow run; return their results and the Prefect artifacts."""
    home = tmp_path_factory.mktemp("compare-home")
    config = RunConfig()

    @flow(name="evaluate", flow_run_name="two-seeds")
    def evaluate_seeds() -> list[dict]:
        results = []
        for seed in SEEDS:
            torch.manual_seed(seed)
            model = AtmoRep(config.model)
            with stage_run("evaluate", EvaluateParams()) as run:
                results.append(
                    evaluate_and_report(
                        run.run_id, model, config, uk_dataset, window_stride=48, batch_size=4,
                        title=f"Seed {seed} evaluation", map_time="2019-03-29T06:00",
                    )
                )
        return results

    with pytest.MonkeyPatch.context() as patch, prefect_test_harness(server_startup_timeout=120):
        patch.setenv("ATMOREP_HOME", str(home))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        results = evaluate_seeds()
        artifacts = {
            key: Artifact.get(key)
            for seed in SEEDS
            for key in (f"seed-{seed}-evaluation-report", f"seed-{seed}-evaluation-scores")
        }
        yield home, results, artifacts


@pytest.fixture
def tracking_home(evaluation_runs, monkeypatch):
    home, _, _ = evaluation_runs
    monkeypatch.setenv("ATMOREP_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


def test_report_published_as_prefect_artifact(evaluation_runs):
    _, _, artifacts = evaluation_runs
    report = artifacts["seed-0-evaluation-report"]

    assert report is not None
    assert report.type == "markdown"
    assert report.data.startswith("# Seed 0 evaluation")
    for heading in ("## forecast", "## interpolation", "## downscaling", "### acc", "### small scale power ratio"):
        assert heading in report.data, heading
    assert "| variable | lead time | model | persistence | climatology |" in report.data
    assert "(plots/skill_forecast_rmse.png)" in report.data
    assert artifacts["seed-1-evaluation-scores"].type == "table"


def test_scores_artifact_round_trip(evaluation_runs, tracking_home, tmp_path):
    _, results, _ = evaluation_runs
    run_id = results[0]["run_id"]

    path = client().download_artifacts(run_id, "scores.nc", str(tmp_path))
    scores = open_scores(path)
    logged = client().get_run(run_id).data.metrics

    assert scores["forecast_acc"].attrs["baselines"] == ["persistence", "climatology"]
    assert float(scores["forecast_rmse"].sel(predictor="model", variable="t2m", lead_time=3)) == pytest.approx(
        logged["forecast/rmse/t2m/lead_3h"], rel=1e-12
    )
    assert float(scores["interpolation_acc"].sel(predictor="cubic", variable="t2m", gap=4)) == pytest.approx(
        logged["interpolation/acc_cubic/t2m/gap_4h"], rel=1e-12
    )
    assert logged == pytest.approx(results[0]["metrics"], rel=1e-12)
    assert scores["downscaling_spectrum"].sizes == {"spectrum_of": 4, "variable": 1, "factor": 2, "wavenumber": 24}


def test_plots_and_report_logged(evaluation_runs, tracking_home):
    _, results, _ = evaluation_runs
    run_id = results[1]["run_id"]

    plots = {item.path for item in client().list_artifacts(run_id, "plots")}
    top_level = {item.path for item in client().list_artifacts(run_id)}

    assert {"scores.nc", "scores.csv", "report.md"} <= top_level
    expected = {
        "plots/skill_forecast_rmse.png", "plots/skill_forecast_acc.png", "plots/skill_interpolation_rmse.png",
        "plots/skill_downscaling_acc.png", "plots/forecast_map_t2m.png", "plots/downscaling_map_t2m.png",
        "plots/spectrum_factor_2.png", "plots/spectrum_factor_4.png",
    }
    assert expected <= plots, expected - plots


def test_compare_prints_runs_side_by_side(evaluation_runs, tracking_home, tmp_path, capsys):
    _, results, _ = evaluation_runs
    run_ids = [result["run_id"] for result in results]

    status = main(["compare", *run_ids, "--output", str(tmp_path)])
    output = capsys.readouterr().out

    assert status == 0
    labels = [f"evaluate {run_id[:8]}" for run_id in run_ids]
    header = next(line for line in output.splitlines() if line.startswith("task"))
    assert header.split() == ["task", "variable", "lead_or_gap", *" ".join(labels).split(), "persistence",
                              "climatology", "linear", "cubic", "bilinear", "bicubic"]
    lead_line = next(line for line in output.splitlines() if line.startswith("forecast") and "lead_2h" in line)
    for result in results:
        assert f"{result['metrics']['forecast/rmse/t2m/lead_2h']:.4g}" in lead_line
    assert f"{results[0]['metrics']['forecast/rmse_persistence/t2m/lead_2h']:.4g}" in lead_line

    table = pd.read_csv(tmp_path / "comparison_rmse.csv")
    row = table[(table.task == "downscaling") & (table.lead_or_gap == "factor_2")].iloc[0]
    assert row[labels[1]] == pytest.approx(results[1]["metrics"]["downscaling/rmse/t2m/factor_2"], rel=1e-9)
    assert row["bicubic"] == pytest.approx(results[0]["metrics"]["downscaling/rmse_bicubic/t2m/factor_2"], rel=1e-9)
    assert len(table) == 6 + 2 + 2
    for task in ("forecast", "interpolation", "downscaling"):
        assert (tmp_path / f"compare_{task}_rmse.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_acc_and_unknown_metric(evaluation_runs, tracking_home):
    _, results, _ = evaluation_runs
    evaluations = [load_evaluation(result["run_id"]) for result in results]

    table = comparison_table(evaluations, "acc")
    assert np.isnan(table["climatology"].iloc[0])  # the ACC of the climatology is undefined
    assert table[evaluations[0].label].between(-1, 1).all()
    with pytest.raises(ValueError, match="no run has scores of metric 'crps'"):
        comparison_table(evaluations, "crps")


def test_compare_rejects_run_without_scores(tracking_home, capsys):
    experiment = client().get_experiment_by_name("atmorep")
    other = client().create_run(experiment.experiment_id, run_name="not-an-evaluation")

    status = main(["compare", other.info.run_id])

    assert status == 1
    assert "has no scores.nc artifact" in capsys.readouterr().err


def test_scores_nc_opens_with_xarray(evaluation_runs, tracking_home, tmp_path):
    _, results, _ = evaluation_runs
    path = client().download_artifacts(results[0]["run_id"], "scores.nc", str(tmp_path))
    with xr.open_dataset(path, engine="h5netcdf") as stored:
        assert stored["units"].values.tolist() == ["K"]
        assert stored.attrs["climatology_kind"] == "hour"


def test_compare_orders_rows_and_flags_baselines(evaluation_runs, tracking_home, caplog):
    _, results, _ = evaluation_runs
    first, second = (load_evaluation(result["run_id"]) for result in results)
    # The first run lacks lead 6 h, and the second run's persistence differs at lead 2 h.
    first = Evaluation(first.run_id, first.label, first.scores.sel(lead_time=[1, 2, 3, 4, 5]))
    changed = second.scores.copy(deep=True)
    changed["forecast_rmse"].loc[{"predictor": "persistence", "lead_time": 2}] += 0.5
    second = Evaluation(second.run_id, second.label, changed)

    with caplog.at_level("WARNING", logger="tasks.compare"):
        table = comparison_table([first, second], "rmse")

    forecast = table[table.task == "forecast"]
    assert forecast.lead_or_gap.tolist() == [f"lead_{lead}h" for lead in range(1, 7)]
    assert np.isnan(forecast[first.label].iloc[5])
    assert forecast["persistence"].iloc[1] == pytest.approx(
        float(first.scores["forecast_rmse"].sel(predictor="persistence", lead_time=2, variable="t2m"))
    )
    assert table.task.tolist()[-1] == "downscaling"
    assert "differ from those of the first run in these rows: forecast t2m lead_2h." in caplog.text
