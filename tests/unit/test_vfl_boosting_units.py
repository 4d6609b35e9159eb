"""The parts of vertical boosting on their own: a party's bins, histograms, and the split search
against a literal transcription of xgboost's ``EnumerateSplit`` / ``SplitEntry::NeedReplace``."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from enclaveml.errors import ConfigurationError
from enclaveml.fl.vertical import _kernels
from enclaveml.fl.vertical._binning import BinEdges, code_dtype, goes_left
from enclaveml.fl.vertical._histogram import build_histograms, find_splits
from enclaveml.fl.vertical._kernels import Codes
from enclaveml.fl.vertical.boosting import BoostingParams, predict_boosting, train_boosting
from tests import vfl_data as vd

F32 = np.float32
KERNELS = [
    "numpy",
    pytest.param("numba", marks=pytest.mark.skipif(not _kernels.available(), reason="no numba")),
]


@pytest.fixture(params=KERNELS)
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with each implementation of the hot loops (see _kernels)."""
    monkeypatch.setenv("ENCLAVEML_VFL_KERNELS", request.param)
    assert _kernels.compiled() == (request.param == "numba")
    return str(request.param)


def test_few_distinct_values_get_one_bin_each() -> None:
    x = np.array([[3.0], [1.0], [2.0], [2.0], [np.nan]])
    edges = BinEdges.fit(x, 256)
    np.testing.assert_array_equal(edges.cuts[0], [2.0, 3.0])
    np.testing.assert_array_equal(edges.transform(x)[:, 0], [2, 0, 1, 1, 256])
    np.testing.assert_array_equal(edges.transform(np.array([[-5.0], [2.5], [9.0]]))[:, 0], [0, 1, 2])


def test_quantile_bins_are_balanced_values_of_the_column() -> None:
    rng = np.random.default_rng(0)
    x = rng.lognormal(size=(10_000, 2))
    x[:, 1] = np.round(x[:, 1], 1)  # many ties
    edges = BinEdges.fit(x, 16)
    codes = edges.transform(x)
    for f in range(2):
        assert edges.n_bins[f] <= 16
        assert np.isin(edges.cuts[f], x[:, f]).all()
        counts = np.bincount(codes[:, f], minlength=edges.n_bins[f])
        assert (counts > 0).all()  # every code occurs in the training rows
    assert np.bincount(codes[:, 0]).max() <= 2 * 10_000 / 16


def test_code_dtype_and_input_checks() -> None:
    assert code_dtype(255) == np.uint8
    assert code_dtype(256) == np.uint16
    assert BinEdges.fit(np.zeros((3, 1)), 255).transform(np.zeros((3, 1))).dtype == np.uint8
    with pytest.raises(ConfigurationError):
        BinEdges.fit(np.array([[1.0], [np.inf]]), 8)
    with pytest.raises(ConfigurationError):
        BinEdges.fit(np.zeros(3), 8)
    with pytest.raises(ConfigurationError):
        BinEdges(8, (np.array([2.0, 1.0]),))
    with pytest.raises(ConfigurationError):
        BinEdges.fit(np.zeros((3, 2)), 8).transform(np.zeros((3, 1)))


def test_goes_left() -> None:
    codes = np.array([0, 1, 2, 8], dtype=np.uint8)  # 8 = missing for max_bin 8
    np.testing.assert_array_equal(goes_left(codes, 1, False, 8), [True, True, False, False])
    np.testing.assert_array_equal(goes_left(codes, 1, True, 8), [True, True, False, True])
    np.testing.assert_array_equal(goes_left(codes, -1, True, 8), [False, False, False, True])
    np.testing.assert_array_equal(goes_left(codes, 2, False, 8), [True, True, True, False])


def test_histograms_sum_per_node_feature_and_bin(kernels: str) -> None:
    rng = np.random.default_rng(1)
    codes_t = rng.integers(0, 5, size=(3, 200)).astype(np.uint8)
    codes_t[1, ::7] = 4  # the missing code (max_bin 4)
    gh = rng.standard_normal(200) + 1j * rng.random(200)
    rows = np.concatenate([np.arange(0, 60), np.arange(100, 200)])
    codes = Codes(codes_t.T)
    hist = build_histograms(codes, np.array([0, 1]), gh, rows, np.array([60, 100]), 5)
    assert hist.shape == (2, 2, 5)
    for k, node in enumerate((rows[:60], rows[60:])):
        for j, f in enumerate((0, 1)):
            for b in range(5):
                assert hist[k, j, b] == pytest.approx(gh[node][codes_t[f, node] == b].sum())
    whole = build_histograms(codes, np.array([2]), gh, None, np.array([200]), 5)
    np.testing.assert_allclose(whole.sum(axis=2), gh.sum())


def reference_split(hist: np.ndarray, parent: complex, n_bins: np.ndarray, lam: float, mcw: float):  # type: ignore[no-untyped-def]
    """xgboost's enumeration, one candidate at a time, float32 gains, its replacement rule."""

    def gain(s: complex) -> F32:
        return F32(s.real**2 / (s.imag + lam)) if s.imag > 0 else F32(0)

    root = gain(parent)
    best = {"loss": F32(0), "f": 0}

    def offer(entry: dict, loss: F32, f: int, **kw: object) -> None:  # type: ignore[type-arg]
        if np.isinf(loss):
            return
        if (entry["f"] <= f and loss > entry["loss"]) or (entry["f"] > f and not entry["loss"] > loss):
            entry.update(loss=loss, f=f, **kw)

    for f in range(hist.shape[0]):
        local = {"loss": F32(0), "f": 0}
        left = 0j
        for i in range(n_bins[f]):
            left += hist[f, i]
            right = parent - left
            if left.imag >= mcw and right.imag >= mcw:
                offer(local, F32(gain(left) + gain(right)) - root, f, bin=i, dl=False)
        if hist[f, -1] != 0:
            right = 0j
            for i in range(n_bins[f] - 1, -1, -1):
                right += hist[f, i]
                left = parent - right
                if left.imag >= mcw and right.imag >= mcw:
                    offer(local, F32(gain(left) + gain(right)) - root, f, bin=i - 1, dl=True)
        if "bin" in local:
            offer(best, local["loss"], local["f"], bin=local["bin"], dl=local["dl"])
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("lam", "mcw"), [(1.0, 1.0), (0.0, 0.0), (3.0, 0.5)])
def test_split_search_matches_xgboosts_enumeration(kernels: str, seed: int, lam: float, mcw: float) -> None:
    rng = np.random.default_rng(seed)
    n_features, max_bin = 5, 9
    # Small integer gradients and hessians: many exact ties, as with real codes in small nodes.
    g = rng.integers(-3, 4, size=(4, n_features, max_bin + 1)).astype(np.float64)
    h = rng.integers(0, 3, size=(4, n_features, max_bin + 1)).astype(np.float64)
    hist = g + 1j * h
    n_bins = rng.integers(1, max_bin + 1, size=n_features)
    for f, nb in enumerate(n_bins):
        hist[:, f, nb:max_bin] = 0
    hist[:, 3] = hist[:, 1]  # an exact tie between two features: the lower index wins
    hist[:, 3, :max_bin] = np.where(np.arange(max_bin) < n_bins[3], hist[:, 3, :max_bin], 0)
    hist[rng.random(4) < 0.5, :, max_bin] = 0  # some nodes without missing values
    parent = hist.sum(axis=2)[:, 0]
    for f in range(1, n_features):  # every feature covers the same rows: same node total
        hist[:, f, max_bin] += parent - hist[:, f].sum(axis=1)
    ours = find_splits(hist, parent, n_bins, None, lam, mcw)
    found = []
    for k in range(4):
        expected = reference_split(hist[k], parent[k], n_bins, lam, mcw)
        if "bin" not in expected:
            assert not ours.loss[k] > 0
            continue
        found.append(expected)
        assert ours.loss[k] == expected["loss"]
        assert (ours.feature[k], ours.bin[k], ours.default_left[k]) == (
            expected["f"], expected["bin"], expected["dl"],
        )  # fmt: skip


def test_degenerate_columns_train_and_predict(kernels: str) -> None:
    data = vd.breast_cancer(2)
    for x in data.x.values():
        x[:, 0] = 7.0  # constant
        x[:, 1] = np.nan  # always missing
    channels = data.channels()
    model = train_boosting(channels[0], channels[1:], BoostingParams(n_estimators=5))
    used = np.concatenate([t.feature for t in model.trees])
    assert not np.isin([0, 1], used).any()
    assert np.isfinite(predict_boosting(model, channels, "test")).all()


def test_reference_comparison_is_not_vacuous() -> None:
    """The random histograms above do exercise backward splits, bin -1 and cross-feature ties."""
    kinds = set()
    for seed in range(6):
        rng = np.random.default_rng(seed)
        hist = rng.integers(-3, 4, size=(4, 5, 10)) + 1j * rng.integers(0, 3, size=(4, 5, 10))
        parent = hist.sum(axis=2)[:, 0]
        for f in range(1, 5):
            hist[:, f, 9] += parent - hist[:, f].sum(axis=1)
        found = find_splits(hist, parent, np.full(5, 9), None, 0.0, 0.0)
        kinds |= {("backward", bool(d)) for d in found.default_left[found.loss > 0]}
        kinds |= {("bin-1",) for b in found.bin[found.loss > 0] if b == -1}
    assert {("backward", True), ("backward", False)} <= kinds


def test_both_kernels_give_identical_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    if not _kernels.available():
        pytest.skip("no numba")
    rng = np.random.default_rng(7)
    codes = Codes(rng.integers(0, 17, size=(3000, 6)).astype(np.uint8))  # 16 = missing
    gh = (rng.standard_normal(3000) + 1j * rng.random(3000)).astype(np.complex128)
    rows = rng.permutation(3000)[:2000]
    counts = np.array([700, 0, 1300])
    features = np.array([0, 2, 3, 5])
    results = {}
    for name in ("numpy", "numba"):
        monkeypatch.setenv("ENCLAVEML_VFL_KERNELS", name)
        hist = build_histograms(codes, features, gh, rows, counts, 17)
        parent = hist[:, 0].sum(axis=1)
        found = find_splits(hist, parent, np.full(4, 16), None, 1.0, 0.5)
        results[name] = (hist, found)
    np.testing.assert_array_equal(results["numpy"][0], results["numba"][0])
    a, b = results["numpy"][1], results["numba"][1]
    valid = a.loss > 0
    np.testing.assert_array_equal(valid, b.loss > 0)
    for field in ("loss", "feature", "bin", "default_left", "left", "right"):
        np.testing.assert_array_equal(getattr(a, field)[valid], getattr(b, field)[valid])
    data = vd.breast_cancer(2)
    for x in data.x.values():
        x[rng.random(x.shape) < 0.05] = np.nan
    models = []
    for name in ("numpy", "numba"):
        monkeypatch.setenv("ENCLAVEML_VFL_KERNELS", name)
        channels = data.channels()
        models.append(train_boosting(channels[0], channels[1:], BoostingParams(n_estimators=20)))
    numpy_model, numba_model = (dataclasses.replace(m, model_id="").to_bytes() for m in models)
    assert numpy_model == numba_model  # the same model, up to each run's random id


def test_threads_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Jobs big enough for the helper threads give the same bits as one thread."""
    if not _kernels.available():
        pytest.skip("no numba")
    monkeypatch.setenv("ENCLAVEML_VFL_KERNELS", "numba")
    rng = np.random.default_rng(3)
    codes = Codes(rng.integers(0, 257, size=(20_000, 16)).astype(np.uint16))
    gh = rng.standard_normal(20_000) + 1j * rng.random(20_000)
    rows, counts = rng.permutation(20_000), np.full(64, 20_000 // 64)
    rows = rows[: counts.sum()]
    results = []
    for threads in ("1", "2"):
        monkeypatch.setenv("ENCLAVEML_VFL_THREADS", threads)
        hist = build_histograms(codes, np.arange(16), gh, rows, counts, 257)  # 64 nodes: a threaded scan
        results.append((hist, find_splits(hist, hist[:, 0].sum(axis=1), np.full(16, 256), None, 1.0, 1.0)))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    for field in ("loss", "feature", "bin", "default_left", "left", "right"):
        np.testing.assert_array_equal(getattr(results[0][1], field), getattr(results[1][1], field))
