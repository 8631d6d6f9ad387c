"""Multi-field model: ensemble losses, the field dataset on the real pressure-level set,
training through the real training path and zero-shot evaluation with the ensemble spread."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import xarray as xr
from mlflow import MlflowClient

from models.config import load_preset
from models.data import FieldDataset, calendar_features
from models.losses import ensemble_loss, ensemble_mean_and_spread, fair_crps, masked_token_mean
from models.objective import AtmoRepObjective
from tasks.evaluate import evaluate_zero_shot

REPO_ROOT = Path(__file__).resolve().parents[1]
ATMOREP = str(Path(sys.executable).with_name("atmorep"))
PL_NAME = "era5-pl-2020-01-01"
PL_TRAIN = ("2020-01-01T00:00", "2020-01-01T17:00")
PL_TEST = ("2020-01-01T18:00", "2020-01-01T23:00")


# Ensemble losses, against values computed by hand


def test_fair_crps_hand_value():
    members = torch.tensor([[0.0, 2.0]]).reshape(1, 2, 1)
    target = torch.tensor([[1.0]])

    # 1/2 (|0 - 1| + |2 - 1|) - 1 / (2 * 2 * 1) * (|0 - 2| + |2 - 0|) = 1 - 1 = 0
    assert float(fair_crps(members, target)) == pytest.approx(0.0)
    # 1/2 (3 + 1) - 4 / 4 = 1
    assert float(fair_crps(members, torch.tensor([[3.0]]))) == pytest.approx(1.0)


def test_fair_crps_three_members():
    members = torch.tensor([0.0, 1.0, 3.0]).reshape(1, 3)
    target = torch.tensor([2.0])

    # skill 1/3 (2 + 1 + 1) = 4/3; pairs (ordered) sum 2 (1 + 3 + 2) = 12; 12 / (2 * 3 * 2) = 1
    assert float(fair_crps(members, target)) == pytest.approx(4 / 3 - 1)


def test_fair_crps_rejects_one_member():
    with pytest.raises(ValueError, match="at least 2"):
        fair_crps(torch.zeros(1, 1, 3), torch.zeros(1, 3))


def test_mean_and_spread():
    members = torch.tensor([1.0, 3.0, 5.0]).reshape(1, 3, 1)

    mean, spread = ensemble_mean_and_spread(members)

    assert float(mean) == pytest.approx(3.0)
    assert float(spread) == pytest.approx(2.0)  # sqrt((4 + 0 + 4) / 2)
    assert float(ensemble_mean_and_spread(members[:, :1])[1]) == 0.0


def one_token_case():
    """Two tokens of shape (1, 1, 2), the first masked; members [1, 2, 1, 1, 1, 4]."""
    members = torch.zeros(1, 2, 1, 1, 1, 4)
    members[0, 0, 0, 0, 0] = torch.tensor([1.0, 3.0, 9.0, 9.0])
    members[0, 1, 0, 0, 0] = torch.tensor([3.0, 3.0, -9.0, 9.0])
    target = torch.zeros(1, 1, 1, 1, 4)
    target[0, 0, 0, 0] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    mask = torch.tensor([True, False]).reshape(1, 1, 1, 1, 2)
    return members, target, mask, (1, 1, 2)


def test_ensemble_losses_hand_values():
    members, target, mask, token_shape = one_token_case()

    # Masked token points: members (1, 3) with target 0 and (3, 3) with target 1.
    # mse: means 2 and 3, errors 2 and 2, squared 4 and 4 -> 4
    assert float(ensemble_loss("mse", members, target, mask, token_shape)) == pytest.approx(4.0)
    # crps: point 1: 1/2 (1 + 3) - 1/4 (2 + 2) = 1; point 2: 1/2 (2 + 2) - 0 = 2 -> 1.5
    assert float(ensemble_loss("crps", members, target, mask, token_shape)) == pytest.approx(1.5)
    # mse_stats: point 1: variance 2, error^2 4 -> 4 + (2 - 4)^2 = 8; point 2: 4 + (0 - 4)^2 = 20 -> 14
    assert float(ensemble_loss("mse_stats", members, target, mask, token_shape)) == pytest.approx(14.0)


def test_mse_stats_spread_term_trains_only_spread():
    members, target, mask, token_shape = one_token_case()
    members.requires_grad_(True)

    ensemble_loss("mse_stats", members, target, mask, token_shape).backward()

    # At point 2 both members are 3: the spread term's gradient d(s^2)/dx is zero there, so
    # only the MSE of the mean acts: d/dx_e [(m - y)^2 / 2 points] = (m - y) / E = 1 per member.
    assert members.grad[0, :, 0, 0, 0, 1].tolist() == pytest.approx([1.0, 1.0])
    # Unmasked points get no gradient.
    assert bool((members.grad[..., 2:] == 0).all())


def test_ensemble_loss_rejects_bad_input():
    members, target, mask, token_shape = one_token_case()

    with pytest.raises(ValueError, match="unknown loss"):
        ensemble_loss("nll", members, target, mask, token_shape)
    with pytest.raises(ValueError, match=r"\[B, E, L, T, H, W\]"):
        ensemble_loss("mse", members[:, 0], target, mask, token_shape)
    with pytest.raises(ValueError, match="no token"):
        masked_token_mean(target, torch.zeros_like(mask), token_shape)


# Time features


def test_calendar_features_year_column():
    times = np.array(["2000-01-01T00:00", "2020-01-01T12:00"], dtype="datetime64[ns]")

    features = calendar_features(times)

    assert features.shape == (2, 5)
    assert features[0, 4] == pytest.approx(0.0)
    assert features[1, 4] == pytest.approx((20 + 0.5 / 365.25) / 100, abs=1e-6)
    np.testing.assert_allclose(features[1, :2], [0.0, -1.0], atol=1e-6)


# The real pressure-level set


@pytest.fixture(scope="module")
def pl_home(data_mirror, tmp_path_factory):
    """The real pressure-level NetCDF set ingested once, with ATMOREP_HOME pointing at it."""
    from tasks.ingest import ingest_era5

    home = tmp_path_factory.mktemp("pl-home")
    files = sorted((data_mirror / "era5" / PL_NAME).glob("*.nc"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ATMOREP_HOME", str(home))
        ingest_era5(files, PL_NAME, PL_TRAIN, PL_TEST)
    return home


@pytest.fixture
def pl_dataset(pl_home, monkeypatch) -> xr.Dataset:
    from data_catalog import Catalog

    monkeypatch.setenv("ATMOREP_HOME", str(pl_home))
    return Catalog().open_dataset(PL_NAME)


def test_field_dataset_centred_crops(pl_dataset):
    config = load_preset("pl-multifield").model

    dataset = FieldDataset(pl_dataset, config, PL_TRAIN, random_crop=False)
    fields, features = dataset[2]

    assert len(dataset) == 13  # 18 training hours, windows of 6
    assert fields["u"].shape == (3, 6, 32, 32)
    assert fields["q"].shape == (2, 6, 32, 32)
    assert fields["d2m"].shape == (1, 6, 24, 24)
    assert features.shape == (6, 5)
    expected_u = pl_dataset["u"].sel(level=[300, 500, 850]).isel(time=slice(2, 8), latitude=slice(0, 32), longitude=slice(0, 32))
    np.testing.assert_array_equal(fields["u"].numpy(), expected_u.transpose("level", ...).values)
    # d2m is centred in the 32 x 32 region: offset (32 - 24) // 2 = 4.
    expected_d2m = pl_dataset["d2m"].isel(time=slice(2, 8), latitude=slice(4, 28), longitude=slice(4, 28))
    np.testing.assert_array_equal(fields["d2m"].numpy()[0], expected_d2m.values)
    latitude, _ = dataset.field_coordinates("d2m")
    np.testing.assert_array_equal(latitude, pl_dataset["latitude"].values[4:28])


def test_objective_loss_and_metrics(pl_dataset, monkeypatch):
    config = load_preset("pl-multifield", {"train.batch_size": 2})
    objective = AtmoRepObjective(config)
    torch.manual_seed(0)
    model = objective.build_model()
    dataset = objective.open_dataset(None)
    batch = torch.utils.data.default_collate([dataset[0], dataset[5]])

    loss, metrics = objective.loss(model, batch, torch.Generator().manual_seed(0))
    loss.backward()

    assert loss.ndim == 0
    assert bool(torch.isfinite(loss))
    assert set(metrics) >= {"mse", "loss/u", "mse/d2m", "spread/q"}
    assert metrics["loss/u"] != metrics["loss/v"]
    assert objective.tokens_per_sample() == 3 * 48 + 3 * 48 + 2 * 48 + 48 + 108


def test_multifield_train_and_evaluate_with_spread(pl_dataset, pl_home, tmp_path):
    from models.checkpoint import load_model
    from models.train import DistributedContext, run_training

    overrides = {"train.max_steps": 6, "train.log_every": 3, "train.checkpoint_every": 6, "train.warmup_steps": 2}
    config = load_preset("pl-multifield", overrides)
    context = DistributedContext(rank=0, world_size=1, device=torch.device("cpu"), distributed=False)

    state = run_training(config, tmp_path / "run", context=context)
    model, loaded = load_model(tmp_path / "run" / "checkpoint.pt")
    result = evaluate_zero_shot(model, loaded, pl_dataset, batch_size=2)

    assert state.step == 6
    assert np.isfinite(state.loss)
    assert loaded.model.field_names == ["u", "v", "q", "tcw", "d2m"]
    variables = result.scores["variable"].values.tolist()
    assert variables == ["u_300", "u_500", "u_850", "v_300", "v_500", "v_850", "q_500", "q_850", "tcw", "d2m"]
    assert result.scores["units"].sel(variable="u_850").item() == "m s**-1"
    for task in ("forecast", "interpolation", "downscaling"):
        spread = result.scores[f"{task}_spread"]
        crps = result.scores[f"{task}_crps"]
        assert bool((spread.sel(predictor="model") > 0).all()), task
        baseline = {"forecast": "persistence", "interpolation": "linear", "downscaling": "bicubic"}[task]
        assert bool((spread.sel(predictor=baseline) == 0).all()), task
        assert bool((crps.sel(predictor="model") > 0).all()), task
        baseline_mae = result.scores[f"{task}_mae"].sel(predictor=baseline)
        np.testing.assert_allclose(crps.sel(predictor=baseline), baseline_mae)
        # The fair CRPS of an ensemble is at most the MAE of its mean.
        assert bool((crps.sel(predictor="model") <= result.scores[f"{task}_mae"].sel(predictor="model") + 1e-6).all())
    assert "forecast/crps/d2m/lead_2h" in result.metrics
    assert "forecast/spread/u_850/lead_1h" in result.metrics
    assert "forecast/acc/u_850/lead_1h" in result.metrics
    assert "forecast/spread_skill_ratio/q_850/lead_2h" in result.metrics
    assert "spread" in result.examples["forecast"]


@pytest.mark.slow
def test_pretrain_flow_multifield_logs_to_mlflow(data_mirror, tmp_path):
    home = tmp_path / "home"
    env = {
        **os.environ,
        "ATMOREP_HOME": str(home),
        "PREFECT_HOME": str(home / "prefect"),
        "ATMOREP_DATA_MIRROR": str(data_mirror),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    files = [str(path) for path in sorted((data_mirror / "era5" / PL_NAME).glob("*.nc"))]

    def atmorep(*arguments):
        completed = subprocess.run(
            [ATMOREP, *arguments], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
        )
        assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
        return completed

    atmorep("ingest", "era5", *files, "--name", PL_NAME, "--train-period", *PL_TRAIN, "--test-period", *PL_TEST)
    atmorep(
        "pretrain", "atmorep", "--dataset", PL_NAME, "--preset", "pl-multifield",
        "--max-steps", "4", "--batch-size", "2", "--nproc-per-node", "2",
    )
    atmorep("evaluate", "zero-shot", "--model-uri", "models:/atmorep/latest")

    uri = f"sqlite:///{home / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("atmorep").experiment_id])
    by_stage = {run.data.tags["atmorep.stage"]: run for run in runs}
    pretrain = by_stage["pretrain"]
    assert [metric.step for metric in client.get_metric_history(pretrain.info.run_id, "train/loss")][-1] == 4
    logged_fields = json.loads(json.dumps(pretrain.data.params))
    assert any(key.startswith("run_config.model.fields") for key in logged_fields)
    evaluation = by_stage["evaluate"].data.metrics
    assert "forecast/crps/q_850/lead_2h" in evaluation
    assert "forecast/acc/q_850/lead_2h" in evaluation
    assert "forecast/spread_skill_ratio/u_300/lead_1h" in evaluation
    assert "downscaling/spread/d2m/factor_4" in evaluation
