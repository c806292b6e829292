"""Rows from what the ``datasets`` library reads -- parquet, arrow and CSV files, ``save_to_disk``
folders (a Dataset or a DatasetDict), hub datasets -- and the column mapping that turns a row into
one of our records (``--columns instruction=question,output=answer``).

A row is handed on as ``(row number, {field: value})`` (1-based, ``None`` values dropped so that
optional fields stay optional), the way a JSON file's records are handed on with their line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Union

from ..errors import SettingsError, require
from .types import DataError

TABLE_FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
"""Files read with ``datasets.load_dataset(<format>, data_files=...)``, by suffix."""

RECORD_FIELDS = ("instruction", "input", "output", "answer", "choices", "label", "question", "messages")
"""The fields of our records (see mor.data), the names a column may be mapped onto."""


def parse_columns(value: Union[str, Mapping[str, str], None]) -> dict[str, str]:
    """``{record field: dataset column}`` from ``"field=column,field=column"`` (the flag) or a
    mapping (a ``--config`` file). Raises ValueError naming a field that is not a record field."""
    if not value:
        return {}
    if isinstance(value, str):
        pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
        bad = [("=".join(p)) for p in pairs if len(p) != 2 or not p[0].strip() or not p[1].strip()]
        if bad:
            raise SettingsError(f"--columns {value}: write FIELD=COLUMN pairs separated by commas, e.g. "
                                   f"instruction=question,output=answer (not {bad[0]!r})")
        mapping = {f.strip(): c.strip() for f, c in pairs}
    elif isinstance(value, Mapping):
        mapping = {str(f): str(c) for f, c in value.items()}
    else:
        raise SettingsError(f"--columns {value!r}: give FIELD=COLUMN pairs (a mapping in a --config file)")
    unknown = sorted(set(mapping) - set(RECORD_FIELDS))
    if unknown:
        raise SettingsError(f"--columns: {unknown[0]!r} is not a record field; map columns onto "
                               f"{', '.join(RECORD_FIELDS)} (FIELD=COLUMN)")
    return mapping


def check_columns(columns: Mapping[str, str], present: Iterable[str], where: str) -> None:
    """Refuse a mapping whose column ``where`` does not have, naming the columns it has."""
    present = list(dict.fromkeys(present))
    missing = [column for column in columns.values() if column not in present]
    if missing:
        raise DataError(f"--columns: {where} has no column {missing[0]!r}; its columns are: "
                        f"{', '.join(present) or 'none'}")


def column_hint(err: DataError, names: list[str]) -> DataError:
    """``err`` of a record read from a table, with the table's columns and how to map them."""
    return DataError(f"{err} (the columns are: {', '.join(names)}; map them onto record fields with "
                     "--columns FIELD=COLUMN,..., e.g. instruction=question,output=answer)")


def rename_fields(row: dict, columns: Mapping[str, str]) -> dict:
    """``row`` with each mapped column under its record field's name; an unmapped column that
    bears a mapped field's name is dropped (the mapping says where that field comes from)."""
    if not columns:
        return row
    sources = set(columns.values())
    out = {k: v for k, v in row.items() if k not in columns and k not in sources}
    out.update({field: row[column] for field, column in columns.items() if column in row})
    return out


def _rows(dataset) -> Iterator[tuple[int, dict]]:
    for number, row in enumerate(dataset, 1):
        yield number, {key: value for key, value in row.items() if value is not None}


def table_rows(path: Path) -> tuple[list[str], Iterator[tuple[int, dict]]]:
    """Column names and rows of a parquet / arrow / CSV file."""
    datasets = _datasets()

    try:
        dataset = datasets.load_dataset(TABLE_FORMATS[path.suffix.lower()], data_files=str(path), split="train")
    except Exception as err:  # pyarrow / pandas errors of a damaged file: one line naming it
        raise DataError(f"{path}: cannot be read as {path.suffix[1:]} ({type(err).__name__}: {err}); "
                        f"check that the file is complete and really {path.suffix[1:]}.") from None
    return list(dataset.column_names), _rows(dataset)


def saved_dataset(path: Path) -> Any:
    """The Dataset or DatasetDict a ``save_to_disk`` folder holds."""
    datasets = _datasets()

    return datasets.load_from_disk(str(path))


def hub_dataset(name: str, config: str | None) -> Any:
    """The DatasetDict of a hub dataset (all its splits; needs the network or datasets' cache)."""
    return _datasets().load_dataset(name, config)


def _datasets():
    """The ``datasets`` package (an extra: JSON/JSONL tasks need none of it)."""
    require("datasets", "reading parquet / arrow / CSV tables, save_to_disk folders and hub datasets")
    import datasets

    return datasets


def dataset_rows(dataset) -> tuple[list[str], Iterator[tuple[int, dict]]]:
    """Column names and rows of a ``datasets.Dataset``."""
    return list(dataset.column_names), _rows(dataset)
