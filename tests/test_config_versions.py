"""Run config versions: the version key and the version-1 model migration."""

import pytest
from pydantic import ValidationError

from models.config import CONFIG_VERSION, RunConfig

VERSION_1_MODEL = {"variables": ["t2m"], "token_shape": [2, 8, 8], "sample_shape": [12, 32, 48]}


def test_version_1_migrates_token_counts():
    config = RunConfig.model_validate({"version": 1, "model": VERSION_1_MODEL})

    field = config.model.fields[0]
    assert config.version == CONFIG_VERSION
    assert field.num_tokens == (6, 4, 6)
    assert config.model.architecture_version == 1


@pytest.mark.parametrize(
    ("sample_shape", "axis"),
    [([12, 30, 48], "latitude"), ([11, 32, 48], "time"), ([12, 32, 44], "longitude")],
)
def test_version_1_rejects_uneven_sample(sample_shape, axis):
    model = VERSION_1_MODEL | {"sample_shape": sample_shape}

    with pytest.raises(ValidationError, match=f"not a multiple of model.token_shape .* along the {axis} axis"):
        RunConfig.model_validate({"version": 1, "model": model})


def test_version_given_as_string():
    config = RunConfig.model_validate({"version": "2", "model": {"fields": [{"name": "t2m"}]}})

    assert config.version == 2


@pytest.mark.parametrize("version", ["two", 2.5, True, None])
def test_version_not_an_integer(version):
    with pytest.raises(ValidationError, match="must be an integer"):
        RunConfig.model_validate({"version": version})


@pytest.mark.parametrize("version", [0, 3, "3"])
def test_version_out_of_range(version):
    with pytest.raises(ValidationError, match="is not supported"):
        RunConfig.model_validate({"version": version})


def test_version_1_with_fields_rejected():
    with pytest.raises(ValidationError, match="config version 1 has model.fields"):
        RunConfig.model_validate({"version": 1, "model": {"fields": [{"name": "t2m"}]}})
