"""The server's side of vertical boosting: setup, the boosting loop, early stopping, prediction.

See :mod:`enclaveml.fl.vertical.boosting` for the protocol and who sees what.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from enclaveml.errors import ConfigurationError
from enclaveml.fl.vertical._binning import code_dtype, goes_left
from enclaveml.fl.vertical._boost_grower import OBJECTIVES, CodesSource, GrowParams, grow_tree
from enclaveml.fl.vertical._boost_model import BoostedTrees, Tree, split_table, walk
from enclaveml.fl.vertical._boost_params import BoostingParams, unfit_labels
from enclaveml.fl.vertical._boost_sources import PartySource, check_array, unpack_bits
from enclaveml.fl.vertical._channel import PartyChannel, call_all, require
from enclaveml.fl.vertical._codec import Payload
from enclaveml.fl.vertical._errors import ProtocolError
from enclaveml.fl.vertical._kernels import Codes

__all__ = ["predict_boosting", "train_boosting"]

_F32 = np.float32
_MAX_BITS = 1 << 27  # bytes of unpacked left/right bits held at once while predicting


@dataclass
class _Setup:
    n_features: list[int]
    n_bins: np.ndarray  # all features, party order
    n_rows: dict[str, int]
    codes: dict[str, Codes]  # all features, only with histograms="tee"
    labels: dict[str, np.ndarray]


def _setup(
    channels: Sequence[PartyChannel], params: BoostingParams, datasets: list[str], tee: bool
) -> _Setup:
    request = {"max_bin": params.max_bin, "train": datasets[0], "datasets": datasets, "upload_codes": tee}
    answers = call_all(channels, "boost.setup", request)
    dtype = code_dtype(params.max_bin)
    n_features: list[int] = []
    n_bins: list[np.ndarray] = []
    n_rows: dict[str, int] = {}
    codes: dict[str, list[np.ndarray]] = {name: [] for name in datasets}
    for channel, answer in zip(channels, answers, strict=True):
        name = channel.name
        f = require(answer, "n_features", int)
        assert isinstance(f, int)
        if f < 0:
            raise ProtocolError(f"party {name!r} reported a negative number of features")
        bins = check_array(name, "boost.setup", answer, "n_bins", np.int64, (f,))
        if f and (bins.min() < 1 or bins.max() > params.max_bin):
            raise ProtocolError(f"party {name!r} reported bin counts out of range")
        rows = require(answer, "n_rows", dict)
        assert isinstance(rows, dict)
        for dataset in datasets:
            count = rows.get(dataset)
            if not isinstance(count, int) or count < 1 or n_rows.setdefault(dataset, count) != count:
                raise ProtocolError(
                    f"party {name!r} does not have the same rows of {dataset!r} as the others"
                )
            if tee:
                uploaded = require(answer, "codes", dict)
                assert isinstance(uploaded, dict)
                block = check_array(name, "boost.setup", uploaded, dataset, dtype.type, (count, f))
                bad = (block >= bins) & (block != params.max_bin)
                if bad.any():
                    raise ProtocolError(f"party {name!r} uploaded codes out of range")
                codes[dataset].append(block)
        n_features.append(f)
        n_bins.append(bins)
    joined = {k: Codes(np.hstack(v) if v else np.empty((n_rows[k], 0), dtype)) for k, v in codes.items()}
    return _Setup(n_features, np.concatenate(n_bins), n_rows, joined if tee else {}, {})


def _labels(channel: PartyChannel, params: BoostingParams, setup: _Setup, datasets: list[str]) -> None:
    answer = channel.call("boost.labels", {"datasets": datasets})
    labels = require(answer, "labels", dict)
    assert isinstance(labels, dict)
    for dataset in datasets:
        y = check_array(channel.name, "boost.labels", labels, dataset, np.float64, (setup.n_rows[dataset],))
        if unfit_labels(y, params.objective) is not None:
            # Every party and the host's log see this message: not which check failed (that is a
            # fact about the labels). An honest label party has refused such labels itself.
            raise ProtocolError(f"label party {channel.name!r} sent labels the objective cannot train on")
        setup.labels[dataset] = y


def _metric(name: str, objective: str, y: np.ndarray, margin: np.ndarray) -> float:
    """xgboost's evaluation metrics on float32 margins."""
    prediction = OBJECTIVES[objective].transform(margin).astype(np.float64)
    if name == "rmse":
        return float(np.sqrt(np.mean(np.square(prediction - y))))
    if name == "logloss":
        p = np.clip(prediction, 1e-16, 1 - 1e-16)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    positive = y == 1
    n_positive = int(positive.sum())
    if not ((y == 0) | positive).all() or n_positive in (0, len(y)):
        raise ConfigurationError("AUC needs 0/1 labels of both classes in the validation set")
    # Mann-Whitney with mid-ranks: the rank sum is exact in float64, so equal AUCs compare equal
    # (early stopping needs a strict improvement, not float noise).
    rank_sum = float(_mid_ranks(prediction)[positive].sum())
    n_negative = len(y) - n_positive
    return (rank_sum - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative)


def _mid_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of their ranks (half-integers: exact in float64)."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    first = np.r_[True, ordered[1:] != ordered[:-1]]
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(values)]
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = ((starts + ends + 1) / 2)[np.cumsum(first) - 1]
    return ranks


def _local_bits(codes: Codes, table: np.ndarray, max_bin: int) -> np.ndarray:
    bits = np.empty((len(table), codes.n_rows), dtype=np.bool_)
    for i, (feature, bin_index, default_left) in enumerate(table.tolist()):
        bits[i] = goes_left(codes.column(feature), bin_index, bool(default_left), max_bin)
    return bits


def _remote_bits(
    channels: Sequence[PartyChannel],
    offsets: np.ndarray,
    table: np.ndarray,
    dataset: str,
    n_rows: int | None,
    model_id: str | None = None,
) -> tuple[np.ndarray, int]:
    """Left bits of every (global feature, bin, default_left) in ``table``, asked of the owners.

    ``model_id``: a trained model's, which a party holding a saved part checks against its own.
    """
    owner = np.searchsorted(offsets, table[:, 0], side="right") - 1
    payloads: list[Payload] = []
    for p in range(len(channels)):
        local = table[owner == p].copy()
        local[:, 0] -= offsets[p]
        payload: Payload = {"dataset": dataset, "splits": local}
        if model_id is not None:
            payload["model_id"] = model_id
        payloads.append(payload)
    answers = call_all(channels, "boost.predict", payloads)
    for channel, answer in zip(channels, answers, strict=True):
        count = require(answer, "n_rows", int)
        if not isinstance(count, int) or count < 1 or (n_rows is not None and count != n_rows):
            raise ProtocolError(
                f"party {channel.name!r} does not have the same rows of {dataset!r} as the others"
            )
        n_rows = count
    assert n_rows is not None
    bits = np.empty((len(table), n_rows), dtype=np.bool_)
    for p, (channel, answer) in enumerate(zip(channels, answers, strict=True)):
        mine = np.flatnonzero(owner == p)
        shape = (len(mine), (n_rows + 7) // 8)
        packed = check_array(channel.name, "boost.predict", answer, "left", np.uint8, shape)
        bits[mine] = unpack_bits(channel.name, "boost.predict", packed, n_rows)
    return bits, n_rows


def _add_tree(margin: np.ndarray, tree: Tree, slots: np.ndarray, bits: np.ndarray) -> None:
    margin += tree.value[walk(tree, slots, bits, len(margin))]


def train_boosting(
    label_channel: PartyChannel,
    passive_channels: Sequence[PartyChannel],
    params: BoostingParams | None = None,
    *,
    train: str = "train",
    valid: str | None = None,
) -> BoostedTrees:
    """Train jointly (see :mod:`enclaveml.fl.vertical.boosting`); runs in the server.

    Features are numbered label party first, then the passive parties in order. With ``valid``
    (a dataset name every party holds) the metric is computed after each tree, and with
    ``early_stopping_rounds`` training stops once it has not improved for that many trees; the
    model keeps the trees up to the best one (xgboost's ``best_iteration``).

    :raises ProtocolError: a party answered with malformed or inconsistent data.
    :raises PartyFailedError: a party's handler raised.
    """
    params = params or BoostingParams()
    channels = [label_channel, *passive_channels]
    if len({ch.name for ch in channels}) != len(channels):
        raise ConfigurationError("every party takes part once")
    if params.early_stopping_rounds is not None and valid is None:
        raise ConfigurationError("early stopping needs a validation set")
    if valid == train:
        raise ConfigurationError("the validation set must differ from the training set")
    datasets = [train] + ([valid] if valid else [])
    tee = params.histograms == "tee"
    setup = _setup(channels, params, datasets, tee)
    _labels(label_channel, params, setup, datasets)
    objective = OBJECTIVES[params.objective]
    y = setup.labels[train].astype(_F32)
    base_score = params.base_score if params.base_score is not None else float(np.mean(setup.labels[train]))
    if params.objective == "binary:logistic":
        base_score = min(max(base_score, 1e-6), 1 - 1e-6)
    base_margin = objective.base_margin(base_score)
    n = setup.n_rows[train]
    offsets = np.concatenate([[0], np.cumsum(setup.n_features, dtype=np.int64)])
    source = (
        CodesSource(setup.codes[train], params.max_bin)
        if tee
        else PartySource(channels, setup.n_features, params.max_bin, n)
    )
    grow = GrowParams(
        params.max_depth, params.learning_rate, params.reg_lambda, params.gamma,
        params.min_child_weight, params.colsample_bylevel, params.colsample_bynode,
    )  # fmt: skip
    rng = np.random.default_rng(params.seed)
    all_features = np.arange(offsets[-1], dtype=np.int64)
    margin = np.full(n, base_margin, dtype=_F32)
    valid_margin = np.full(setup.n_rows[valid], base_margin, dtype=_F32) if valid else None
    trees: list[Tree] = []
    evals: list[float] = []
    best, since_best = -1, 0
    maximize = params.metric == "auc"
    for _ in range(params.n_estimators):
        grad, hess = objective.gradients(margin, y)
        if params.subsample < 1:
            keep = rng.random(n) < params.subsample
            grad, hess = np.where(keep, grad, _F32(0)), np.where(keep, hess, _F32(0))
        gh = np.empty(n, dtype=np.complex128)
        gh.real, gh.imag = grad, hess
        features = all_features
        if params.colsample_bytree < 1:
            keep_n = max(1, int(params.colsample_bytree * len(all_features)))
            features = np.sort(rng.choice(all_features, size=keep_n, replace=False))
        tree, leaves = grow_tree(source, gh, features, setup.n_bins[features], grow, rng)
        trees.append(tree)
        for node, rows in leaves:
            if rows is None:
                margin += tree.value[node]
            else:
                margin[rows] += tree.value[node]
        if valid is None or valid_margin is None:
            continue
        table, (slots,) = split_table([tree])
        if tee:
            bits = _local_bits(setup.codes[valid], table, params.max_bin)
        else:
            bits, _ = _remote_bits(channels, offsets, table, valid, setup.n_rows[valid])
        _add_tree(valid_margin, tree, slots, bits)
        score = _metric(params.metric, params.objective, setup.labels[valid], valid_margin)
        evals.append(score)
        if best < 0 or (score > evals[best] if maximize else score < evals[best]):
            best, since_best = len(trees) - 1, 0
        else:
            since_best += 1
            if params.early_stopping_rounds is not None and since_best >= params.early_stopping_rounds:
                break
    if params.early_stopping_rounds is not None:
        trees = trees[: best + 1]
    model = BoostedTrees(
        objective=params.objective,
        base_margin=float(base_margin),
        parties=tuple(ch.name for ch in channels),
        n_features=tuple(setup.n_features),
        max_bin=params.max_bin,
        trees=tuple(trees),
        best_iteration=len(trees) - 1,
        params={**params.to_dict(), "base_score": base_score},
        evals=tuple(evals),
        # Random per run: a digest of the model would name two runs alike whenever their server
        # parts agree (a party's columns rescaled, say) while the parties' cut points differ.
        model_id=secrets.token_hex(16),
    )
    finish = [{"features": model.used_features(ch.name), "model_id": model.model_id} for ch in channels]
    call_all(channels, "boost.finish", finish)
    return model


def predict_boosting(
    model: BoostedTrees, channels: Sequence[PartyChannel], dataset: str, *, output_margin: bool = False
) -> np.ndarray:
    """Predictions for ``dataset`` (a name every party holds): P(y = 1) for ``binary:logistic``,
    values for regression, or the raw margins. ``channels`` are the model's parties, in any order.
    """
    by_name = {ch.name: ch for ch in channels}
    if set(by_name) != set(model.parties) or len(by_name) != len(channels):
        raise ConfigurationError("prediction needs exactly the model's parties, once each")
    ordered = [by_name[name] for name in model.parties]
    offsets = model.offsets
    margin: np.ndarray | None = None
    n_rows: int | None = None
    start = 0
    trees = model.trees
    splits = [int((t.feature >= 0).sum()) for t in trees]
    while start < len(trees) or margin is None:
        # Batches of trees whose left/right bits fit in memory, one call per party per batch; the
        # first batch is one tree, until the parties have said how many rows there are.
        stop, nodes = start + 1, sum(splits[start : start + 1])
        while n_rows is not None and stop < len(trees) and (nodes + splits[stop]) * n_rows < _MAX_BITS:
            nodes += splits[stop]
            stop += 1
        batch = trees[start:stop]
        table, slots = split_table(batch)
        bits, n_rows = _remote_bits(ordered, offsets, table, dataset, n_rows, model.model_id)
        if margin is None:
            margin = np.full(n_rows, _F32(model.base_margin), dtype=_F32)
        for tree, tree_slots in zip(batch, slots, strict=True):
            _add_tree(margin, tree, tree_slots, bits)
        start = stop
    if output_margin:
        return margin
    return OBJECTIVES[model.objective].transform(margin)
