"""The pretrain flow's dataset choice and its field check, which run before torchrun starts."""

import pytest

from data_catalog import Catalog
from data_catalog.catalog import DatasetNotFoundError
from data_catalog.schema import DatasetEntry, VariableInfo
from flows.params import PretrainParams
from flows.pretrain import check_dataset_fields, resolve_pretrain_config
from models.config import load_preset


def make_entry(name: str, variables: dict[str, bool], levels: list[float] | None = None) -> DatasetEntry:
    """Build a catalog entry with only the fields the check reads (variables, levels, name)."""
    infos = {variable: VariableInfo(units="1", has_levels=has_levels) for variable, has_levels in variables.items()}
    return DatasetEntry.model_construct(name=name, variables=infos, levels=levels)


class RecordingCatalog:
    """Catalog stand-in that returns fixed entries and records the names requested."""

    def __init__(self, entries: dict[str, DatasetEntry]) -> None:
        self.entries = entries
        self.requested: list[str] = []

    def get(self, name: str) -> DatasetEntry:
        self.requested.append(name)
        return self.entries[name]


PL_ENTRY = make_entry(
    "era5-pl-2020-01-01",
    {"u": True, "v": True, "q": True, "tcw": False, "d2m": False},
    levels=[300.0, 500.0, 850.0],
)
UK_ENTRY = make_entry("era5-t2m-uk-2019-03", {"t2m": False})


def test_dataset_defaults_to_preset():
    catalog = RecordingCatalog({PL_ENTRY.name: PL_ENTRY, UK_ENTRY.name: UK_ENTRY})

    config, entry = resolve_pretrain_config(PretrainParams(preset="pl-multifield", max_steps=2), catalog)

    assert catalog.requested == ["era5-pl-2020-01-01"]
    assert entry.name == "era5-pl-2020-01-01"
    assert config.train.dataset == "era5-pl-2020-01-01"
    assert config.train.max_steps == 2


def test_explicit_dataset_overrides_preset():
    catalog = RecordingCatalog({UK_ENTRY.name: UK_ENTRY})

    config, entry = resolve_pretrain_config(PretrainParams(preset="demo", dataset="era5-t2m-uk-2019-03"), catalog)

    assert catalog.requested == ["era5-t2m-uk-2019-03"]
    assert config.train.dataset == "era5-t2m-uk-2019-03"


def test_dataset_without_field_variable():
    catalog = RecordingCatalog({UK_ENTRY.name: UK_ENTRY})
    params = PretrainParams(preset="pl-multifield", dataset="era5-t2m-uk-2019-03")

    with pytest.raises(ValueError, match="'u' not found in dataset 'era5-t2m-uk-2019-03' \\(preset 'pl-multifield'\\)"):
        resolve_pretrain_config(params, catalog)


def test_dataset_without_field_level():
    config = load_preset("pl-multifield")
    entry = make_entry(PL_ENTRY.name, {"u": True, "v": True, "q": True, "tcw": False, "d2m": False}, [500.0, 850.0])

    with pytest.raises(ValueError, match="levels \\[300\\] of field 'u' not found in dataset"):
        check_dataset_fields(config, entry, "pl-multifield")


def test_single_level_field_with_levels():
    config = load_preset("pl-multifield")
    entry = make_entry(PL_ENTRY.name, {"u": False, "v": True, "q": True, "tcw": False, "d2m": False}, [300.0])

    with pytest.raises(ValueError, match="'u' has no level dimension"):
        check_dataset_fields(config, entry, "pl-multifield")


def test_matching_dataset_passes():
    check_dataset_fields(load_preset("pl-multifield"), PL_ENTRY, "pl-multifield")


def test_dataset_missing_from_catalog(tmp_path):
    params = PretrainParams(preset="pl-multifield")

    with pytest.raises(DatasetNotFoundError, match="era5-pl-2020-01-01.*preset 'pl-multifield'"):
        resolve_pretrain_config(params, Catalog(tmp_path))
