"""Data: the record schema, the built-in problem generator, and loaders for hub/JSONL/Parquet sources."""

from atesd_ray.data.loaders import DataReport, LoadResult, holdout, load_data, load_eval_set, load_split
from atesd_ray.data.records import DataError, Record, to_record
from atesd_ray.data.synthetic import generate, train_eval_split, verify_reference

__all__ = [
    "DataError",
    "DataReport",
    "LoadResult",
    "Record",
    "generate",
    "holdout",
    "load_data",
    "load_eval_set",
    "load_split",
    "to_record",
    "train_eval_split",
    "verify_reference",
]
