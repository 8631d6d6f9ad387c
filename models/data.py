"""Space-time windows of a normalised dataset as training samples.

The dataset follows the normalised Zarr layout: one float32 variable per ERA5 short name
with dims (time, [member,] [level,] latitude, longitude), values already normalised to
zero mean and unit variance. Ensemble members are independent samples of the same windows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import xarray as xr
from torch.utils.data import Dataset

if TYPE_CHECKING:
    from models.config import ModelConfig

logger = logging.getLogger(__name__)

HOUR = np.timedelta64(1, "h")
DAYS_PER_YEAR = 365.25
# Periods whose selected arrays are at most this large are read into memory once.
DEFAULT_MAX_IN_MEMORY_BYTES = 2 * 1024**3


def time_features(times: np.ndarray) -> np.ndarray:
    """Encode timestamps as sin/cos of hour of day and of day of year.

    times: [T] datetime64 -> [T, 4] float32 with columns sin(hour), cos(hour), sin(day),
    cos(day), where hour of day has period 24 h and day of year period 365.25 days.
    """
    index = np.asarray(times, dtype="datetime64[ns]")
    days = index.astype("datetime64[D]")
    hour_of_day = (index - days) / HOUR
    day_of_year = (days - days.astype("datetime64[Y]")).astype(np.float64) + hour_of_day / 24.0

    hour_angle = 2 * np.pi * hour_of_day / 24.0
    day_angle = 2 * np.pi * day_of_year / DAYS_PER_YEAR
    features = np.stack([np.sin(hour_angle), np.cos(hour_angle), np.sin(day_angle), np.cos(day_angle)], axis=-1)
    return features.astype(np.float32)


# Reference year of the year feature: the feature is (fractional year - YEAR_ORIGIN) / YEAR_SCALE.
YEAR_ORIGIN = 2000.0
YEAR_SCALE = 100.0


def calendar_features(times: np.ndarray) -> np.ndarray:
    """Encode timestamps as year, day of year and hour of day, the model's time features.

    times: [T] datetime64 -> [T, 5] float32: the four columns of `time_features` followed
    by the fractional year as (year + day_of_year / 365.25 - 2000) / 100, which is 0 at
    the start of 2000 and grows by 0.01 per year.
    """
    index = np.asarray(times, dtype="datetime64[ns]")
    years = index.astype("datetime64[Y]")
    fraction = (index - years) / np.timedelta64(1, "D") / DAYS_PER_YEAR
    year = (years.astype(np.int64) + 1970 + fraction - YEAR_ORIGIN) / YEAR_SCALE
    return np.concatenate([time_features(index), year[:, None].astype(np.float32)], axis=-1)


def select_channels(
    ds: xr.Dataset, variables: Sequence[str], levels: Mapping[str, Sequence[int]] | None = None
) -> xr.DataArray:
    """Stack the requested variables and levels into one array with dims (channel, [member,] time, latitude, longitude).

    Raises KeyError for a missing variable and ValueError for a level missing from the
    dataset or a multi-level variable without configured levels.
    """
    levels = levels or {}
    channels = []
    for variable in variables:
        if variable not in ds.data_vars:
            raise KeyError(f"variable {variable!r} not found in the dataset, which has {sorted(ds.data_vars)}")
        array = ds[variable]
        if "level" in array.dims:
            if variable not in levels:
                raise ValueError(
                    f"variable {variable!r} has levels {array['level'].values.tolist()}: list the "
                    f"levels to use in model.levels[{variable!r}]"
                )
            missing = sorted(set(levels[variable]) - set(array["level"].values.tolist()))
            if missing:
                raise ValueError(
                    f"levels {missing} of variable {variable!r} not found in the dataset, which "
                    f"has levels {array['level'].values.tolist()}"
                )
            for level in levels[variable]:
                channels.append(array.sel(level=level).drop_vars("level"))
        else:
            if variable in levels:
                raise ValueError(
                    f"variable {variable!r} has no level dimension, but model.levels lists levels for it: "
                    "remove them"
                )
            channels.append(array)

    stacked = xr.concat(channels, dim="channel", coords="minimal", compat="override", join="exact")
    return stacked.transpose("channel", ..., "time", "latitude", "longitude")


def check_fields_fit_grid(config: ModelConfig, n_lat: int, n_lon: int) -> None:
    """Raise ValueError naming the first field whose crop (token_shape x num_tokens) exceeds the grid."""
    for field in config.fields:
        _, height, width = field.sample_shape
        if height > n_lat or width > n_lon:
            raise ValueError(
                f"grid {n_lat} x {n_lon} is smaller than the sample crop {height} x {width} of field "
                f"{field.name!r} (token_shape {list(field.token_shape)} times num_tokens {list(field.num_tokens)}): "
                f"reduce model.fields[{field.name}].num_tokens or token_shape"
            )


class WindowDataset(Dataset):
    """Samples of `sample_shape = (T, H, W)`: T consecutive hourly steps on an H x W crop.

    Window starts are every `time_stride` steps inside `period` (inclusive ISO bounds). A
    window is kept only if its time steps are exactly one hour apart, so windows that
    straddle a gap in the time coordinate are skipped. With `random_crop`, each sample's
    crop offset is a multiple of `spatial_stride` drawn from a generator seeded by (seed,
    epoch, index). Without it, every crop starts at the north-west corner of the grid.

    With a `member` dimension, every (member, window) pair is one sample: index
    `member * n_windows + window`.

    Each item is `(x [C, T, H, W] float32, time_features [T, 4] float32)`.
    """

    def __init__(
        self,
        ds: xr.Dataset,
        variables: Sequence[str],
        period: tuple[str, str] | Sequence[str],
        sample_shape: tuple[int, int, int],
        time_stride: int = 1,
        levels: Mapping[str, Sequence[int]] | None = None,
        random_crop: bool = True,
        spatial_stride: int = 1,
        seed: int = 0,
        max_in_memory_bytes: int = DEFAULT_MAX_IN_MEMORY_BYTES,
    ) -> None:
        if len(period) != 2:
            raise ValueError(f"period must be (start, end), got {period!r}")
        self.sample_shape = tuple(sample_shape)
        self.random_crop = random_crop
        self.spatial_stride = spatial_stride
        self.seed = seed
        self.epoch = 0

        selected = select_channels(ds.sel(time=slice(period[0], period[1])), variables, levels)
        if "member" not in selected.dims:
            selected = selected.expand_dims("member", axis=1)
        # selected: [C, M, T, H, W]
        steps, height, width = self.sample_shape
        self.n_members = selected.sizes["member"]
        n_time, n_lat, n_lon = selected.shape[2:]
        if n_lat < height or n_lon < width:
            raise ValueError(
                f"grid {n_lat} x {n_lon} is smaller than the sample crop {height} x {width}: "
                "use a sample shape that fits the grid"
            )

        self.times = selected["time"].values.astype("datetime64[ns]")
        self.starts = self._window_starts(self.times, steps, time_stride)
        if len(self.starts) == 0:
            raise ValueError(
                f"no window of {steps} consecutive hourly steps in period {tuple(period)} "
                f"({n_time} steps selected): check the period and model.sample_shape"
            )

        self.latitude = selected["latitude"].values
        self.longitude = selected["longitude"].values
        if selected.nbytes <= max_in_memory_bytes:
            self.values: np.ndarray | xr.DataArray = np.ascontiguousarray(selected.values, dtype=np.float32)
            if not np.isfinite(self.values).all():
                raise ValueError(
                    f"variables {list(variables)} contain NaN or infinite values in period "
                    f"{tuple(period)}: the model needs complete fields"
                )
        else:
            logger.info("period selection is %.1f GiB: reading windows lazily", selected.nbytes / 1024**3)
            self.values = selected
        logger.info(
            "window dataset: %d windows of %s from %d steps, %d member(s), %d channels, grid %d x %d",
            len(self.starts), self.sample_shape, n_time, self.n_members, selected.shape[0], n_lat, n_lon,
        )

    @staticmethod
    def _window_starts(times: np.ndarray, steps: int, stride: int) -> np.ndarray:
        if len(times) < steps:
            return np.zeros(0, dtype=np.int64)
        hourly = np.diff(times) == HOUR
        # Window [start, start + steps) is regular iff its steps - 1 differences are all hourly.
        irregular_before = np.concatenate([[0], np.cumsum(~hourly)])
        candidates = np.arange(0, len(times) - steps + 1, stride)
        regular = irregular_before[candidates + steps - 1] - irregular_before[candidates] == 0
        skipped = int((~regular).sum())
        if skipped:
            logger.warning("skipped %d windows that straddle a gap in the hourly time coordinate", skipped)
        return candidates[regular]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random crop offsets `__getitem__` returns."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_members * len(self.starts)

    def crop_offset(self, index: int) -> tuple[int, int]:
        """Return the (latitude, longitude) grid offset of the crop of sample `index`."""
        if not self.random_crop:
            return 0, 0
        _, height, width = self.sample_shape
        lat_choices = (len(self.latitude) - height) // self.spatial_stride + 1
        lon_choices = (len(self.longitude) - width) // self.spatial_stride + 1
        # Seeding from (seed, epoch, index) gives the same crop in any worker or after a resume.
        rng = np.random.default_rng([self.seed, self.epoch, index])
        lat = int(rng.integers(lat_choices)) * self.spatial_stride
        lon = int(rng.integers(lon_choices)) * self.spatial_stride
        return lat, lon

    def window_times(self, index: int) -> np.ndarray:
        """Return the [T] datetime64 timestamps of sample `index`."""
        start = int(self.starts[index % len(self.starts)])
        return self.times[start : start + self.sample_shape[0]]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        steps, height, width = self.sample_shape
        member, window_index = divmod(index, len(self.starts))
        start = int(self.starts[window_index])
        lat, lon = self.crop_offset(index)

        window = self.values[:, member, start : start + steps, lat : lat + height, lon : lon + width]
        if isinstance(window, xr.DataArray):
            window = window.values
        x = torch.from_numpy(np.array(window, dtype=np.float32))
        features = torch.from_numpy(time_features(self.window_times(index)))
        return x, features


class FieldDataset(Dataset):
    """Multi-field samples: every configured field over one time window and one centred crop.

    A sample covers the region `config.sample_shape = (T, H, W)`, the largest field extent
    along each axis, read as a `WindowDataset` window (same windows, crops, members and
    seeding). Each field is cut from the region centred: its crop starts
    `(H - H_f) // 2` latitude and `(W - W_f) // 2` longitude points into the region.

    Each item is `(fields, time_features)` with fields: name -> [L, T, H_f, W_f] float32
    (levels in configured order, L = 1 for a single-level field) and time_features
    [T, 5] float32 (`calendar_features`).
    """

    def __init__(
        self,
        ds: xr.Dataset,
        config: ModelConfig,
        period: tuple[str, str] | Sequence[str],
        time_stride: int = 1,
        random_crop: bool = True,
        spatial_stride: int = 1,
        seed: int = 0,
        max_in_memory_bytes: int = DEFAULT_MAX_IN_MEMORY_BYTES,
    ) -> None:
        self.config = config
        check_fields_fit_grid(config, ds.sizes["latitude"], ds.sizes["longitude"])
        self.windows = WindowDataset(
            ds,
            variables=config.field_names,
            period=period,
            sample_shape=config.sample_shape,
            time_stride=time_stride,
            levels=config.levels,
            random_crop=random_crop,
            spatial_stride=spatial_stride,
            seed=seed,
            max_in_memory_bytes=max_in_memory_bytes,
        )
        _, height, width = config.sample_shape
        # Per field: (first channel, last channel + 1, latitude offset, longitude offset) in the region.
        self.layout: dict[str, tuple[int, int, int, int]] = {}
        channel = 0
        for field in config.fields:
            _, field_height, field_width = field.sample_shape
            self.layout[field.name] = (
                channel,
                channel + field.num_levels,
                (height - field_height) // 2,
                (width - field_width) // 2,
            )
            channel += field.num_levels

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random crop offsets `__getitem__` returns."""
        self.windows.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.windows)

    def window_times(self, index: int) -> np.ndarray:
        """Return the [T] datetime64 timestamps of sample `index`."""
        return self.windows.window_times(index)

    def field_coordinates(self, name: str, index: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Return the latitude [H_f] and longitude [W_f] of field `name` in sample `index`."""
        field = self.config.field(name)
        _, _, lat_offset, lon_offset = self.layout[name]
        lat, lon = self.windows.crop_offset(index)
        _, height, width = field.sample_shape
        latitude = self.windows.latitude[lat + lat_offset : lat + lat_offset + height]
        longitude = self.windows.longitude[lon + lon_offset : lon + lon_offset + width]
        return latitude, longitude

    def __getitem__(self, index: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        region, _ = self.windows[index]  # [C, T, H, W] over all fields' channels
        fields = {}
        for field in self.config.fields:
            first, last, lat_offset, lon_offset = self.layout[field.name]
            _, height, width = field.sample_shape
            fields[field.name] = region[first:last, :, lat_offset : lat_offset + height, lon_offset : lon_offset + width]
        features = torch.from_numpy(calendar_features(self.window_times(index)))
        return fields, features
