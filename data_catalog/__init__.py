"""Catalog of sample files and normalised datasets, and the working folder they live in.

This package imports no Prefect, MLflow or torch.
"""

from data_catalog.catalog import Catalog
from data_catalog.samples import fetch_sample
from data_catalog.workspace import atmorep_home

__all__ = ["Catalog", "atmorep_home", "fetch_sample"]
