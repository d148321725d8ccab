"""Documents from record files: JSONL, Parquet and Hugging Face `datasets` folders.

Each record's text column (default ``text``) is one document. Files are read as a
stream: JSONL line by line, Parquet and Arrow in record batches, so a file is never
held whole in memory (the documents' texts are, until they are tokenized). A bad
record raises one `DataError` line that names the file and the record (line or row).
Parquet needs `pyarrow`, a `datasets` folder the `datasets` package (`pip install
skyfed[data]`).
"""

from __future__ import annotations

import json
import lzma
from pathlib import Path
from typing import Iterator

from skyfed.errors import DataError

BATCH_ROWS = 4096
DATASETS_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def _text(value: object, where: str, column: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: expected a string in {column!r}, got {type(value).__name__}")
    return value


def jsonl_texts(path: Path, column: str = "text") -> Iterator[str]:
    """Non-empty texts of a JSONL file (or .jsonl.xz), read line by line."""
    opener = lzma.open if path.suffix == ".xz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{i}: invalid JSON: {exc.msg}") from None
                if not isinstance(record, dict) or column not in record:
                    raise DataError(f"{path}:{i}: expected an object with a string {column!r} field")
                text = _text(record[column], f"{path}:{i}", column)
                if text.strip():
                    yield text
    except (OSError, UnicodeDecodeError, lzma.LZMAError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"reading this data needs the {module.split('.')[0]!r} package: pip install 'skyfed[data]'") from None


def parquet_texts(path: Path, column: str = "text") -> Iterator[str]:
    """Non-empty texts of one column of a Parquet file, read one record batch at a time."""
    pq = _need("pyarrow.parquet")
    try:
        f = pq.ParquetFile(str(path))
    except Exception as exc:
        raise DataError(f"cannot read {path} as Parquet: {exc}") from None
    names = f.schema_arrow.names
    if column not in names:
        raise DataError(f"{path}: no column {column!r} (columns: {', '.join(names)}); set data.text_column")
    row = 0
    for batch in f.iter_batches(batch_size=BATCH_ROWS, columns=[column]):
        for value in batch.column(0).to_pylist():
            text = _text(value, f"{path}: row {row}", column)
            row += 1
            if text.strip():
                yield text


def is_datasets_dir(path: Path) -> bool:
    """A folder written by `datasets.Dataset.save_to_disk` (or a DatasetDict's)."""
    return path.is_dir() and any((path / m).is_file() for m in DATASETS_MARKERS)


def load_datasets_dir(path: Path):
    """`datasets.load_from_disk(path)`: a Dataset or a DatasetDict."""
    datasets = _need("datasets")
    datasets.disable_progress_bars()
    try:
        return datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"cannot load the datasets folder {path}: {exc}") from None


def dataset_texts(ds, where: str, column: str = "text") -> Iterator[str]:
    """Non-empty texts of one column of a `datasets.Dataset`, a batch at a time."""
    if column not in ds.column_names:
        raise DataError(f"{where}: no column {column!r} (columns: {', '.join(ds.column_names)}); set data.text_column")
    row = 0
    for batch in ds.select_columns([column]).iter(batch_size=BATCH_ROWS):
        for value in batch[column]:
            text = _text(value, f"{where}: row {row}", column)
            row += 1
            if text.strip():
                yield text


VALID_SPLITS = ("validation", "valid", "val", "test")


def datasets_splits(path: Path, column: str = "text") -> tuple[list[str], list[str] | None]:
    """(train texts, validation texts or None): a DatasetDict's ``train`` split and its
    ``validation`` (or ``valid``, ``val``, ``test``) split; a single Dataset is all train."""
    ds = load_datasets_dir(path)
    if not hasattr(ds, "column_names") or isinstance(ds.column_names, dict):  # a DatasetDict
        splits = list(ds.keys())
        train_name = "train" if "train" in ds else splits[0]
        valid_name = next((s for s in VALID_SPLITS if s in ds and s != train_name), None)
        train = list(dataset_texts(ds[train_name], f"{path} [{train_name}]", column))
        valid = list(dataset_texts(ds[valid_name], f"{path} [{valid_name}]", column)) if valid_name else None
        return train, valid
    return list(dataset_texts(ds, str(path), column)), None
