"""Reading a party's table (CSV or Parquet) into IDs, a feature matrix and labels, for ``enclaveml vfl``.

Parties keep their data in ordinary files; the CLI reads them with pyarrow (``.csv``, ``.parquet``,
``.pq``; ``.npy`` for a plain float matrix) and never writes any of it anywhere. Errors name files
and columns, never values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]
import pyarrow.csv as pa_csv  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]
from numpy.typing import NDArray

from enclaveml.errors import ConfigurationError

__all__ = ["PartyTable", "read_rows", "read_table"]


@dataclass(frozen=True)
class PartyTable:
    """The columns of one party's file, split into IDs, features and labels."""

    ids: list[object] | None
    features: NDArray[np.float64]
    feature_names: list[str]
    labels: NDArray[np.float64] | None

    def take(self, rows: NDArray[np.int64] | None) -> PartyTable:
        """The rows at ``rows`` (aligned by PSI), in that order; all rows for None."""
        if rows is None:
            return self
        if rows.size and (rows.min() < 0 or rows.max() >= self.features.shape[0]):
            raise ConfigurationError(
                "the aligned rows do not fit this data file (another file than PSI read?)"
            )
        ids = [self.ids[i] for i in rows] if self.ids is not None else None
        labels = self.labels[rows] if self.labels is not None else None
        return PartyTable(ids, self.features[rows], self.feature_names, labels)


def _load(path: Path) -> pa.Table:
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pa_csv.read_csv(path)
        if suffix in (".parquet", ".pq"):
            return pq.read_table(path)
        if suffix == ".npy":
            matrix = np.load(path, allow_pickle=False)
            if matrix.ndim != 2:
                raise ConfigurationError(f"{path} must hold a 2-D array")
            return pa.table({f"x{i}": matrix[:, i] for i in range(matrix.shape[1])})
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise ConfigurationError(f"cannot read {path}: {type(exc).__name__}") from None
    raise ConfigurationError(f"{path}: expected a .csv, .parquet or .npy file")


def read_table(
    path: Path,
    *,
    id_column: str | None = None,
    label_column: str | None = None,
    ignore: Sequence[str] = (),
) -> PartyTable:
    """Split ``path`` into IDs (``id_column``), labels (``label_column``) and numeric features (the
    rest, less the ``ignore`` columns)."""
    table = _load(path)
    for column in (id_column, label_column, *ignore):
        if column is not None and column not in table.column_names:
            raise ConfigurationError(f"{path} has no column {column!r}")
    ids = table.column(id_column).to_pylist() if id_column else None
    labels = None
    if label_column:
        labels = _numeric(table.column(label_column), path, label_column)
    names = [c for c in table.column_names if c not in (id_column, label_column, *ignore)]
    columns = [_numeric(table.column(name), path, name) for name in names]
    features = np.column_stack(columns) if columns else np.empty((table.num_rows, 0))
    return PartyTable(ids, features.astype(np.float64, copy=False), names, labels)


def _numeric(column: pa.ChunkedArray, path: Path, name: str) -> NDArray[np.float64]:
    if not (
        pa.types.is_integer(column.type)
        or pa.types.is_floating(column.type)
        or pa.types.is_boolean(column.type)
    ):
        raise ConfigurationError(f"column {name!r} of {path} is not numeric")
    values = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
    return np.asarray(values, dtype=np.float64)


def read_rows(path: Path | None) -> NDArray[np.int64] | None:
    """Aligned rows written by ``enclaveml vfl psi`` (an int64 ``.npy``), or None."""
    if path is None:
        return None
    try:
        rows = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read aligned rows {path}: {type(exc).__name__}") from None
    if rows.ndim != 1 or rows.dtype != np.int64:
        raise ConfigurationError(f"{path} is not a vector of int64 row positions (from `enclaveml vfl psi`)")
    checked: NDArray[np.int64] = rows
    return checked


def column_names(names: Sequence[str]) -> str:
    """A short human list of column names for messages."""
    return ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
