"""ERA5 sources besides local files: CDS API requests and remote Zarr stores.

Both kinds open as xarray datasets with ERA5 short names, and each dataset carries a
provenance record in `attrs[SOURCE_RECORD_ATTR]` (path, sha256, size) that
`tasks.ingest.ingest_era5` stores as its source. A record never contains credentials.

Source strings, as the flow parameter `sources` and the CLI take them:

- `cds:REQUEST.yaml` or `cds:{...}`: a `CdsRequest` in a YAML or JSON file, or as inline
  JSON. It is sent as one CDS API request per calendar month, and each download is
  cached under the hash of its request, so the same request is downloaded once.
- `zarr:URL?variables=t2m,u&levels=500,850&area=58,-10,50,2&time=START,END` or
  `zarr:{...}`: a `RemoteZarrSource` as query parameters or as inline JSON. URL is an
  fsspec URL (`https://`, `gs://`, `s3://`) or a local path, of a store laid out like
  ARCO-ERA5 or WeatherBench 2. Only the chunks inside the selection are read.

Areas are `[north, west, south, east]` in degrees, as in CDS requests.
"""

from tasks.sources.cds import (
    CDS_PREFIX,
    CdsCredentials,
    CdsCredentialsError,
    CdsDownload,
    CdsRequest,
    CdsRetrievalError,
    load_cds_credentials,
    open_cds,
    parse_cds_source,
    retrieve_cds,
    retrieve_cds_downloads,
)
from tasks.sources.common import CDS_VARIABLE_NAMES, ERA5_SHORT_NAMES, attach_source_record, content_sha256
from tasks.sources.remote_zarr import (
    ZARR_PREFIX,
    RemoteZarrSource,
    open_remote_zarr,
    open_zarr_source,
    parse_zarr_source,
)

__all__ = [
    "CDS_PREFIX",
    "CDS_VARIABLE_NAMES",
    "ERA5_SHORT_NAMES",
    "ZARR_PREFIX",
    "CdsCredentials",
    "CdsCredentialsError",
    "CdsDownload",
    "CdsRequest",
    "CdsRetrievalError",
    "RemoteZarrSource",
    "attach_source_record",
    "content_sha256",
    "load_cds_credentials",
    "open_cds",
    "open_remote_zarr",
    "open_zarr_source",
    "parse_cds_source",
    "parse_zarr_source",
    "retrieve_cds",
    "retrieve_cds_downloads",
]
