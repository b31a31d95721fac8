"""Retrieval datasets: the revisitop-format reader and the embedded ``clutter`` benchmark builder."""

from deepagg.data.clutter import build_clutter, ensure_clutter
from deepagg.data.dataset import RetrievalDataset, load_gnd, read_gnd_file
from deepagg.data.revisitop import (
    DATASETS,
    BoundingBoxError,
    DatasetNotFoundError,
    ImageReadError,
    crop_query,
    load_revisitop,
    query_resize_size,
    read_image,
)
from deepagg.data.sources import fetch_debs

__all__ = [
    "DATASETS",
    "BoundingBoxError",
    "DatasetNotFoundError",
    "ImageReadError",
    "RetrievalDataset",
    "build_clutter",
    "crop_query",
    "ensure_clutter",
    "fetch_debs",
    "load_gnd",
    "load_revisitop",
    "query_resize_size",
    "read_gnd_file",
    "read_image",
]
