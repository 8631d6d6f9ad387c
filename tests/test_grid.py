"""Tests of `tasks.grid` (longitude convention, crops, coarsening) and of grid checks, on real ERA5 files."""

from __future__ import annotations

from pathlib import Path

import eccodes
import numpy as np
import pytest
import xarray as xr

from data_catalog import Catalog
from tasks import grid
from tasks.ingest import InvalidSourceError, canonicalise, ingest_era5, open_sources


@pytest.fixture(scope="module")
def members_t(data_mirror):
    """Member 0 of t on the 3° global grid (longitude 0 to 357), canonical, loaded."""
    dataset = open_sources([data_mirror / "era5" / "era5-levels-members.grib"])
    return dataset[["t"]].isel(member=0).load()


@pytest.fixture(scope="module")
def monthly_t2m(data_mirror):
    """The monthly mean t2m on the 0.25° global grid (721 x 1440, longitude 0 to 359.75), canonical, loaded."""
    return open_sources([data_mirror / "era5" / "era5_t2m_monthly_2022-10_0p25.grib"]).load()


def value_at(dataset: xr.Dataset, variable: str, latitude: float, longitude: float) -> np.ndarray:
    """Return the values of `variable` at one grid point, found by its coordinates modulo 360."""
    lon = dataset["longitude"].values
    column = int(np.flatnonzero(np.isclose((lon - longitude) % 360.0, 0.0) | np.isclose((lon - longitude) % 360.0, 360.0))[0])
    row = int(np.flatnonzero(np.isclose(dataset["latitude"].values, latitude))[0])
    return dataset[variable].isel(latitude=row, longitude=column).values


# --- longitude convention -----------------------------------------------------------------


def test_convention_rolls_global_grid(members_t):
    converted = grid.apply_longitude_convention(members_t, "-180..180")
    longitude = converted["longitude"].values

    assert longitude[0] == -180.0
    assert longitude[-1] == 177.0
    assert np.all(np.diff(longitude) == 3.0)
    for lon in (-180.0, -3.0, 0.0, 90.0, 177.0):
        np.testing.assert_array_equal(value_at(converted, "t", 45.0, lon), value_at(members_t, "t", 45.0, lon))


def test_convention_round_trip(members_t):
    converted = grid.apply_longitude_convention(members_t, "-180..180")
    back = grid.apply_longitude_convention(converted, "0..360")

    xr.testing.assert_identical(back, members_t)


def test_convention_netcdf_global(data_mirror):
    source = open_sources([data_mirror / "era5" / "era5-global-2deg-2019-01-05.nc"])[["t"]].load()

    converted = grid.apply_longitude_convention(source, "0..360")

    assert source["longitude"].values[0] == -180.0
    assert converted["longitude"].values[0] == 0.0
    assert converted["longitude"].values[-1] == 358.0
    np.testing.assert_array_equal(
        value_at(converted, "t", 50.0, 350.0), value_at(source, "t", 50.0, -10.0)
    )


def test_convention_regional_seam_rejected(uk_t2m_grib):
    uk = open_sources([uk_t2m_grib])

    with pytest.raises(grid.InvalidGridError, match="'-180..180'") as raised:
        grid.apply_longitude_convention(uk, "0..360", where=str(uk_t2m_grib))

    assert str(uk_t2m_grib) in str(raised.value)
    assert "cross 0°" in str(raised.value)


def test_convention_unknown_rejected(members_t):
    with pytest.raises(grid.InvalidGridError, match="unknown"):
        grid.apply_longitude_convention(members_t, "east")


# --- crops --------------------------------------------------------------------------------


def test_crop_across_dateline(members_t):
    area = (60.0, 170.0, 42.0, -170.0)

    cropped = grid.apply_longitude_convention(grid.crop_area(members_t, area), "0..360")

    assert cropped["latitude"].values.tolist() == [60.0, 57.0, 54.0, 51.0, 48.0, 45.0, 42.0]
    assert cropped["longitude"].values.tolist() == [171.0, 174.0, 177.0, 180.0, 183.0, 186.0, 189.0]
    for lon in (171.0, 180.0, 189.0):
        np.testing.assert_array_equal(value_at(cropped, "t", 51.0, lon), value_at(members_t, "t", 51.0, lon))


def test_crop_across_dateline_needs_0_360(members_t):
    cropped = grid.crop_area(members_t, (60.0, 170.0, 42.0, -170.0))

    with pytest.raises(grid.InvalidGridError, match="cross 180°.*'0..360'"):
        grid.apply_longitude_convention(cropped, "-180..180")


def test_crop_across_meridian(members_t):
    cropped = grid.apply_longitude_convention(grid.crop_area(members_t, (60.0, -12.0, 51.0, 3.0)), "-180..180")

    assert cropped["longitude"].values.tolist() == [-12.0, -9.0, -6.0, -3.0, 0.0, 3.0]
    assert cropped["latitude"].values.tolist() == [60.0, 57.0, 54.0, 51.0]
    np.testing.assert_array_equal(value_at(cropped, "t", 54.0, -6.0), value_at(members_t, "t", 54.0, 354.0))


def test_crop_whole_longitude_circle(members_t):
    cropped = grid.crop_area(members_t, (30.0, 0.0, -30.0, 360.0))

    assert cropped.sizes["longitude"] == 120
    assert cropped.sizes["latitude"] == 21


@pytest.mark.parametrize(
    ("area", "match"),
    [
        ((40.0, 0.0, 50.0, 10.0), "south"),
        ((95.0, 0.0, 50.0, 10.0), "south"),
        ((60.0, 0.0, 50.0), "four numbers"),
        ((60.0, 0.0, 50.0, 400.0), "east = 400"),
        ((1.0, 1.0, 0.5, 2.0), "contains no grid point"),
    ],
)
def test_crop_invalid_area(members_t, area, match):
    with pytest.raises(grid.InvalidGridError, match=match):
        grid.crop_area(members_t, area)


# --- coarsening ---------------------------------------------------------------------------


def test_cell_area_weights_follow_cosine():
    latitude = np.arange(90.0, -90.25, -0.25)

    weights = grid.cell_area_weights(latitude)

    interior = weights[1:-1] / np.cos(np.deg2rad(latitude[1:-1]))
    np.testing.assert_allclose(interior, interior[0], rtol=1e-9)
    assert weights[0] == pytest.approx(1.0 - np.sin(np.deg2rad(89.875)), rel=1e-12)
    assert weights.sum() == pytest.approx(2.0, rel=1e-12)


def test_coarsen_conserves_global_mean(monthly_t2m):
    fine = grid.crop_area(monthly_t2m, (90.0, 0.0, -89.75, 359.75))
    assert fine.sizes == {"time": 1, "latitude": 720, "longitude": 1440}

    coarse = grid.coarsen(fine, 4)

    assert coarse.sizes == {"time": 1, "latitude": 180, "longitude": 360}
    assert coarse["latitude"].values[0] == pytest.approx(89.625)
    assert coarse["longitude"].values[0] == pytest.approx(0.375)
    fine_weights = grid.cell_area_weights(fine["latitude"].values)[:, None]
    coarse_weights = grid.cell_area_weights(coarse["latitude"].values)[:, None]
    fine_values = fine["t2m"].values[0].astype(np.float64)
    coarse_values = coarse["t2m"].values[0].astype(np.float64)
    fine_mean = (fine_values * fine_weights).sum() / (fine_weights.sum() * 1440)
    coarse_mean = (coarse_values * coarse_weights).sum() / (coarse_weights.sum() * 360)
    assert coarse_mean == pytest.approx(fine_mean, rel=1e-6)


def test_coarsen_block_by_hand(uk_t2m_grib):
    uk = open_sources([uk_t2m_grib]).isel(time=slice(0, 2)).load()

    coarse = grid.coarsen(uk, 2)

    block = uk["t2m"].values[1, 2:4, 4:6].astype(np.float64)
    weights = np.cos(np.deg2rad(uk["latitude"].values[2:4]))[:, None]
    expected = (block * weights).sum() / (weights.sum() * 2)
    assert coarse.sizes == {"time": 2, "latitude": 16, "longitude": 24}
    assert float(coarse["t2m"].values[1, 1, 2]) == pytest.approx(expected, rel=1e-6)
    assert coarse["latitude"].values[1] == pytest.approx(57.375)
    assert coarse["t2m"].dtype == np.float32


def test_coarsen_ignores_missing_values(data_mirror):
    source = open_sources([data_mirror / "era5" / "unusual" / "fields_with_missing_values.grib"]).load()
    values = source["t2m"].values[0]

    coarse = grid.coarsen(source, 3)["t2m"].values[0]

    blocks = values[:90, :180].reshape(30, 3, 60, 3)
    all_missing = np.isnan(blocks).all(axis=(1, 3))
    some_missing = np.isnan(blocks).any(axis=(1, 3)) & ~all_missing
    assert all_missing.any()
    assert some_missing.any()
    np.testing.assert_array_equal(np.isnan(coarse), all_missing)
    row, column = np.argwhere(some_missing)[0]
    block = blocks[row, :, column, :].astype(np.float64)
    weights = np.broadcast_to(grid.cell_area_weights(source["latitude"].values)[3 * row : 3 * row + 3, None], block.shape)
    valid = ~np.isnan(block)
    expected = (block[valid] * weights[valid]).sum() / weights[valid].sum()
    assert float(coarse[row, column]) == pytest.approx(expected, rel=1e-6)


def test_coarsen_factor_checks(members_t):
    with pytest.raises(grid.InvalidGridError, match="positive integer"):
        grid.coarsen(members_t, 0)
    with pytest.raises(grid.InvalidGridError, match="larger than the grid"):
        grid.coarsen(members_t, 200)
    assert grid.coarsen(members_t, 1) is members_t


# --- ingest with grid options -------------------------------------------------------------


def test_ingest_crop_and_coarsen(uk_t2m_grib, tmp_path):
    catalog = Catalog(tmp_path)

    result = ingest_era5(
        [uk_t2m_grib],
        "uk-coarse",
        ("2019-03-01T00:00", "2019-03-24T23:00"),
        ("2019-03-25T00:00", "2019-03-31T23:00"),
        catalog=catalog,
        area=(57.0, -8.0, 51.0, 1.0),
        coarsen_factor=4,
    )
    store = catalog.open_dataset("uk-coarse")

    assert store["t2m"].shape == (744, 6, 9)
    assert result.entry.grid.shape == (6, 9)
    assert result.entry.grid.latitude_first == pytest.approx(56.625)
    assert result.entry.grid.latitude_step == pytest.approx(-1.0)
    assert result.entry.grid.longitude_first == pytest.approx(-7.625)
    assert result.entry.provenance.parameters["area"] == [57.0, -8.0, 51.0, 1.0]
    assert result.entry.provenance.parameters["coarsen_factor"] == 4


def test_ingest_convention_0_360(data_mirror, tmp_path):
    catalog = Catalog(tmp_path)
    path = data_mirror / "era5" / "era5-global-2deg-2019-01-05.nc"

    result = ingest_era5(
        [path],
        "global-0-360",
        ("2019-01-05T01:00", "2019-01-05T07:00"),
        ("2019-01-05T08:00", "2019-01-05T10:00"),
        variables=["t"],
        catalog=catalog,
        longitude_convention="0..360",
    )

    assert result.entry.grid.longitude_first == 0.0
    assert result.entry.grid.longitude_last == 358.0
    assert result.entry.grid.latitude_first == 90.0


def test_ingest_invalid_grid_options_rejected(uk_t2m_grib, tmp_path):
    periods = (("2019-03-01T00:00", "2019-03-24T23:00"), ("2019-03-25T00:00", "2019-03-31T23:00"))
    catalog = Catalog(tmp_path)

    with pytest.raises(ValueError, match="longitude_convention 'east'"):
        ingest_era5([uk_t2m_grib], "bad", *periods, catalog=catalog, longitude_convention="east")
    with pytest.raises(ValueError, match="coarsen_factor"):
        ingest_era5([uk_t2m_grib], "bad", *periods, catalog=catalog, coarsen_factor=0)
    with pytest.raises(grid.InvalidGridError, match="contains no grid point"):
        ingest_era5([uk_t2m_grib], "bad", *periods, catalog=catalog, area=(30.0, 100.0, 20.0, 110.0))
    assert not (tmp_path / "data").exists() or list((tmp_path / "data").iterdir()) == []


# --- grids the model cannot use -----------------------------------------------------------


def write_sample_grib(
    sample: str, target: Path, keys: dict[str, float] | None = None, values: np.ndarray | None = None
) -> Path:
    """Write one ecCodes sample message, optionally with a new grid definition and values, to `target`."""
    handle = eccodes.codes_grib_new_from_samples(sample)
    try:
        for key, value in (keys or {}).items():
            eccodes.codes_set(handle, key, value)
        if values is not None:
            eccodes.codes_set_values(handle, values)
        target.write_bytes(eccodes.codes_get_message(handle))
    finally:
        eccodes.codes_release(handle)
    return target


def lambert_grib(target: Path) -> Path:
    """A 49 x 33 Lambert conformal grid at 25 km with values 270 to 280, built from the GRIB2 sample."""
    return write_sample_grib(
        "GRIB2",
        target,
        {
            "gridDefinitionTemplateNumber": 30,
            "Nx": 49,
            "Ny": 33,
            "latitudeOfFirstGridPointInDegrees": 45.0,
            "longitudeOfFirstGridPointInDegrees": 350.0,
            "LaDInDegrees": 50.0,
            "LoVInDegrees": 0.0,
            "Latin1InDegrees": 50.0,
            "Latin2InDegrees": 50.0,
            "DxInMetres": 25000,
            "DyInMetres": 25000,
        },
        values=np.linspace(270.0, 280.0, 49 * 33),
    )


# The data mirror contains no ERA5 file on these grids, so the files come from ecCodes samples.
@pytest.mark.parametrize(
    ("make", "grid_type"),
    [
        (lambda target: write_sample_grib("reduced_gg_pl_32_grib2", target), "reduced_gg"),
        (lambda target: write_sample_grib("sh_ml_grib2", target), "sh"),
        (lambert_grib, "lambert"),
    ],
)
def test_unusable_grid_named(tmp_path, make, grid_type):
    path = make(tmp_path / f"{grid_type}.grib")

    with pytest.raises(InvalidSourceError, match=f"grid type '{grid_type}' \\(GRIB_gridType\\)") as raised:
        ingest_era5([path], "unusable", ("2000-01-01", "2000-01-01"), None, catalog=Catalog(tmp_path / "home"))

    assert str(path) in str(raised.value)
    assert not (tmp_path / "home" / "data").exists()


def test_unusable_grid_of_opened_dataset(tmp_path):
    path = lambert_grib(tmp_path / "lambert.grib")
    opened = xr.open_dataset(path, engine="cfgrib", backend_kwargs={"indexpath": ""})

    with pytest.raises(InvalidSourceError, match=r"grid type\(s\) \['lambert'\]") as raised:
        canonicalise(opened, path)

    assert str(path) in str(raised.value)


def test_curvilinear_netcdf_rejected(tmp_path):
    path = lambert_grib(tmp_path / "lambert.grib")
    opened = xr.open_dataset(path, engine="cfgrib", backend_kwargs={"indexpath": ""})
    for variable in opened.data_vars.values():
        variable.attrs.pop("GRIB_gridType")

    with pytest.raises(InvalidSourceError, match="2-D latitude coordinate with dims \\('y', 'x'\\)"):
        canonicalise(opened, path)
