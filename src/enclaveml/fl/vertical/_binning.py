"""A party's quantile bins: its thresholds, which never leave it.

Each party cuts each of its features into at most ``max_bin`` bins, computed on its own training
rows only, and from then on speaks of a value only by its bin *code*:

- ``cuts[f]`` is a sorted array of thresholds ``c_0 < c_1 < ... < c_{k-1}`` (values that occur in
  the training column, like xgboost's ``hist`` cut points); ``code(x) = #{i : c_i <= x}``, so a
  feature has ``n_bins = k + 1`` codes ``0 .. k`` and every code occurs in the training rows.
  A column with at most ``max_bin`` distinct values gets one bin per value.
- a missing value (NaN) gets the code ``max_bin``, the same for every feature;
- codes are ``uint8`` while ``max_bin <= 255``, ``uint16`` beyond.

A split "at bin ``b``" sends a row left when its code is ``<= b`` (``x < c_b``); a missing value
goes where the split's ``default_left`` says. ``b = -1`` sends only missing values left,
``b = n_bins - 1`` every present value. The model records (party, feature, bin), so only the party
can turn a split into a threshold on its raw values.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from enclaveml.errors import ConfigurationError

__all__ = ["BinEdges", "code_dtype", "goes_left", "validate_features"]

MAX_MAX_BIN = 65534


def code_dtype(max_bin: int) -> np.dtype[np.unsignedinteger]:
    """The dtype of codes for ``max_bin`` bins plus the missing code ``max_bin``."""
    return np.dtype(np.uint8) if max_bin <= 255 else np.dtype(np.uint16)


def validate_features(x: object, what: str = "features") -> np.ndarray:
    """``x`` as a 2-D float64 array of finite values or NaN; :class:`ConfigurationError` otherwise."""
    try:
        array = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{what} must be a 2-D array of numbers") from None
    if array.ndim != 2:
        raise ConfigurationError(f"{what} must be a 2-D array (rows x features), got {array.ndim}-D")
    if np.isinf(array).any():
        raise ConfigurationError(f"{what} must be finite or NaN (missing); infinite values found")
    return array


@dataclass(frozen=True)
class BinEdges:
    """The cut points of one party's features; ``transform`` turns values into codes."""

    max_bin: int
    cuts: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.max_bin, int) or not 2 <= self.max_bin <= MAX_MAX_BIN:
            raise ConfigurationError(f"max_bin must be an integer in [2, {MAX_MAX_BIN}]")
        for cut in self.cuts:
            if cut.ndim != 1 or len(cut) >= self.max_bin or not np.isfinite(cut).all():
                raise ConfigurationError("bin edges must be finite 1-D arrays of fewer than max_bin cuts")
            if len(cut) > 1 and not (np.diff(cut) > 0).all():
                raise ConfigurationError("bin edges must be strictly increasing")

    @classmethod
    def fit(cls, x: np.ndarray, max_bin: int) -> BinEdges:
        """Quantile cuts of each column of ``x`` (rows x features, NaN = missing)."""
        x = validate_features(x)
        cuts = []
        for column in x.T:
            present = np.sort(column[~np.isnan(column)])
            cuts.append(_column_cuts(present, max_bin))
        return cls(max_bin, tuple(cuts))

    @property
    def n_features(self) -> int:
        return len(self.cuts)

    @property
    def n_bins(self) -> np.ndarray:
        """Codes per feature (without the missing code), as int64."""
        return np.array([len(c) + 1 for c in self.cuts], dtype=np.int64)

    @property
    def missing_code(self) -> int:
        return self.max_bin

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Codes of ``x`` (rows x features) as a C-order array of :func:`code_dtype`."""
        x = validate_features(x)
        if x.shape[1] != self.n_features:
            raise ConfigurationError(f"expected {self.n_features} features, got {x.shape[1]}")
        codes = np.empty(x.shape, dtype=code_dtype(self.max_bin))
        for f, cut in enumerate(self.cuts):
            column = x[:, f]
            codes[:, f] = np.searchsorted(cut, column, side="right")
            codes[np.isnan(column), f] = self.max_bin
        return codes

    def subset(self, features: Iterable[int]) -> BinEdges:
        """The edges of ``features`` only (in that order)."""
        return BinEdges(self.max_bin, tuple(self.cuts[int(f)] for f in features))


def _column_cuts(present: np.ndarray, max_bin: int) -> np.ndarray:
    """Cut points of one sorted column of present values: at most ``max_bin - 1`` of them."""
    if len(present) == 0:
        return np.empty(0, dtype=np.float64)
    distinct = present[np.r_[True, present[1:] != present[:-1]]]  # sorted already: no np.unique
    if len(distinct) <= max_bin:
        return distinct[1:]
    # Equal-count bins: candidate cuts at the i/max_bin quantiles, each a value of the column.
    positions = (np.arange(1, max_bin, dtype=np.int64) * len(present)) // max_bin
    candidates = np.unique(present[positions])
    cuts: np.ndarray = candidates[candidates > present[0]]
    return cuts


def goes_left(codes: np.ndarray, bin_index: int, default_left: bool, missing_code: int) -> np.ndarray:
    """Which rows of one feature's ``codes`` a split at ``bin_index`` sends left (bool array)."""
    # The missing code is above every bin a split can name, so ``<=`` never sends it left.
    left = codes <= bin_index if bin_index >= 0 else np.zeros(codes.shape, dtype=np.bool_)
    if default_left:
        left |= codes == missing_code
    return left
