"""The `atmorep` command line: options built from the flows' parameter models."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import build_params, build_parser, format_scores, format_summary
from flows.params import IngestEra5Params, PipelineParams, PretrainParams, check_periods

ATMOREP = str(Path(sys.executable).parent / "atmorep")


def test_ingest_options_become_params():
    arguments = build_parser().parse_args(
        ["ingest", "era5", "a.grib", "b.nc", "--name", "my-set",
         "--train-period", "2020-01-01T00:00", "2020-01-20T23:00",
         "--test-period", "2020-01-21T00:00", "2020-01-31T23:00"]
    )
    params = build_params(arguments.model, arguments)

    assert isinstance(params, IngestEra5Params)
    assert params.sources == ["a.grib", "b.nc"]
    assert params.name == "my-set"
    assert params.train_period == ("2020-01-01T00:00", "2020-01-20T23:00")
    assert params.time_chunk == 24


def test_pretrain_defaults_from_model():
    arguments = build_parser().parse_args(["pretrain", "atmorep", "--max-steps", "7", "--nproc-per-node", "1"])
    params = build_params(arguments.model, arguments)

    assert isinstance(params, PretrainParams)
    assert params.max_steps == 7
    assert params.nproc_per_node == 1
    assert params.dataset is None
    assert params.batch_size is None


def test_pipeline_rejects_invalid_choice():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pipeline", "--finetune-task", "nowcast"])


def test_periods_must_not_overlap():
    with pytest.raises(ValueError, match="must end before test_period"):
        check_periods(("2019-03-01T00:00", "2019-03-26T00:00"), ("2019-03-25T00:00", "2019-03-31T23:00"))


def test_periods_must_parse():
    with pytest.raises(ValueError, match="not a pair of ISO 8601 times"):
        check_periods(("yesterday", "2019-03-26T00:00"), ("2019-03-25T00:00", "2019-03-31T23:00"))


def test_pipeline_params_reject_unknown_key():
    with pytest.raises(ValueError, match="pretrain_step"):
        PipelineParams(pretrain_step=5)


def test_help_documents_flow_options():
    completed = subprocess.run([ATMOREP, "pretrain", "atmorep", "--help"], capture_output=True, text=True, timeout=60)

    assert completed.returncode == 0
    assert "--max-steps" in completed.stdout
    assert "torchrun processes" in completed.stdout


def test_invalid_period_exits_with_message():
    completed = subprocess.run(
        [ATMOREP, "ingest", "era5", "x.grib", "--train-period", "2019-03-10T00:00", "2019-03-01T00:00"],
        capture_output=True, text=True, timeout=60,
    )

    assert completed.returncode == 2
    assert "starts after it ends" in completed.stderr


def test_summary_lists_stages_and_baselines():
    row = {"task": "forecast", "variable": "t2m", "lead_or_gap": "lead_1h", "model": 0.7,
           "baseline": "persistence", "baseline_value": 0.5}
    summary = {
        "stages": [{"stage": "ingest", "run_id": "a" * 32, "output": "data.zarr"}],
        "zero_shot": [row],
        "finetuned": [row],
    }
    text = format_summary(summary)

    assert "a" * 32 in text
    assert "persistence 0.5" in text
    assert "make ui" in text


def test_summary_keeps_small_rmse_digits():
    row = {"task": "forecast", "variable": "q", "lead_or_gap": "lead_1h", "model": 0.0003127,
           "baseline": "persistence", "baseline_value": 0.0004581}

    text = "\n".join(format_scores("Zero-shot", [row]))

    assert "0.0003127" in text
    assert "persistence 0.0004581" in text


def test_catalog_list_and_show(tmp_path, uk_t2m_grib, monkeypatch):
    from tasks.ingest import ingest_era5

    monkeypatch.setenv("ATMOREP_HOME", str(tmp_path))
    env = dict(os.environ)
    entry = ingest_era5(
        [uk_t2m_grib], name="uk-t2m",
        train_period=("2019-03-01T00:00", "2019-03-24T23:00"),
        test_period=("2019-03-25T00:00", "2019-03-31T23:00"),
    ).entry

    listed = subprocess.run([ATMOREP, "catalog", "list"], env=env, capture_output=True, text=True, timeout=60)
    shown = subprocess.run([ATMOREP, "catalog", "show", "uk-t2m"], env=env, capture_output=True, text=True, timeout=60)
    missing = subprocess.run([ATMOREP, "catalog", "show", "nope"], env=env, capture_output=True, text=True, timeout=60)

    header, row = listed.stdout.splitlines()
    assert header.split()[:3] == ["name", "kind", "version"]
    assert "content digest" in header
    assert row.split() == [
        "uk-t2m", "era5", "1", "2019-03-01T00:00:00", "2019-03-31T23:00:00", entry.content_digest[:16],
    ]
    assert "# dataset uk-t2m version 1\n" in shown.stdout
    assert f"content_digest: {entry.content_digest}\n" in shown.stdout
    assert f"digest: {entry.digest}\n" in shown.stdout
    assert f"# recipe digest (sources and parameters): {entry.digest}\n" in shown.stdout
    assert "version: 1\n" in shown.stdout
    assert "train_period:" in shown.stdout
    assert "test_period:" in shown.stdout
    assert "sha256: e5e82609" in shown.stdout
    assert missing.returncode == 1
    assert "uk-t2m" in missing.stderr


def test_mapping_option_before_sources():
    arguments = build_parser().parse_args(
        ["ingest", "era5", "--normalisation", "t2m=local", "--normalisation", "u=global", "f.grib"]
    )
    params = build_params(arguments.model, arguments)

    assert params.normalisation == {"t2m": "local", "u": "global"}
    assert params.sources == ["f.grib"]
