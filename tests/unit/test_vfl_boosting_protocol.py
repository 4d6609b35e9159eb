"""Vertical boosting as a protocol: who receives what, both placements agree, bad answers are refused.

Assertions are on the bytes that crossed (``InProcessChannel.transcript``), decoded.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from enclaveml.errors import ConfigurationError
from enclaveml.fl.vertical._channel import InProcessChannel
from enclaveml.fl.vertical._codec import Payload, decode
from enclaveml.fl.vertical._errors import MessageError, PartyFailedError, ProtocolError
from enclaveml.fl.vertical.boosting import (
    BoostedTrees,
    BoostingParams,
    BoostingParty,
    PartyThresholds,
    predict_boosting,
    train_boosting,
)
from tests import vfl_data as vd

SAMPLED = dict(subsample=0.8, colsample_bytree=0.9, colsample_bylevel=0.9, colsample_bynode=0.9, seed=3)


def arrays(value: object) -> Iterator[np.ndarray]:
    if isinstance(value, np.ndarray):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from arrays(v)
    elif isinstance(value, list):
        for v in value:
            yield from arrays(v)


def ok(response: bytes) -> Payload:
    message = decode(response)
    assert "ok" in message
    return message["ok"]  # type: ignore[no-any-return]


def missing_data() -> vd.VerticalData:
    data = vd.breast_cancer(3, valid=True)
    rng = np.random.default_rng(5)
    for x in data.x.values():
        x[rng.random(x.shape) < 0.05] = np.nan
    return data


def train(data: vd.VerticalData, params: BoostingParams, channels: list[InProcessChannel] | None = None):  # type: ignore[no-untyped-def]
    channels = channels or data.channels()
    valid = "valid" if "valid" in data.x else None
    return train_boosting(channels[0], channels[1:], params, valid=valid), channels


@pytest.mark.parametrize("extra", [{}, SAMPLED], ids=["plain", "sampled"])
def test_both_placements_grow_identical_trees(extra: dict[str, float]) -> None:
    data = missing_data()
    tee, tee_channels = train(data, BoostingParams(n_estimators=25, histograms="tee", **extra))  # type: ignore[arg-type]
    party, party_channels = train(data, BoostingParams(n_estimators=25, histograms="party", **extra))  # type: ignore[arg-type]
    assert len(tee.trees) == len(party.trees) == 25
    for a, b in zip(tee.trees, party.trees, strict=True):
        for name, value in a.to_payload().items():
            assert np.array_equal(value, b.to_payload()[name]), name
    assert tee.evals == party.evals
    assert tee.base_margin == party.base_margin
    np.testing.assert_array_equal(
        predict_boosting(tee, tee_channels, "test"), predict_boosting(party, party_channels, "test")
    )


@pytest.mark.parametrize("placement", ["tee", "party"])
def test_server_never_receives_a_feature_value_or_a_cut_point(placement: str) -> None:
    data = missing_data()
    model, channels = train(data, BoostingParams(n_estimators=10, histograms=placement))
    predict_boosting(model, channels, "test")
    for i, channel in enumerate(channels):
        raw = {k: v[:, data.columns[i]] for k, v in data.x.items()}
        values = np.unique(np.concatenate([v[~np.isnan(v)] for v in raw.values()]))
        values = values[(values != 0) & (values != 1)]
        for exchange in channel.transcript:
            for array in arrays(ok(exchange.response)):
                if exchange.method == "boost.labels":
                    assert i == 0
                    assert array.dtype == np.float64
                    assert set(np.unique(array)) <= {0.0, 1.0}
                    continue
                if array.dtype.kind == "f":  # only histograms of gradient sums are floats
                    assert exchange.method == "boost.histograms"
                    assert placement == "party"
                    assert not np.isin(array, values).any()
                else:
                    assert array.dtype.kind in "ui"
                for x in raw.values():
                    for column in x.T:
                        assert not (
                            array.size == column.size and np.allclose(array.ravel(), column, equal_nan=True)
                        )


def test_tee_placement_sends_passive_parties_nothing_derived_from_labels_while_training() -> None:
    data = missing_data()
    model, channels = train(data, BoostingParams(n_estimators=10, early_stopping_rounds=3))
    for channel in channels[1:]:
        methods = [e.method for e in channel.transcript]
        assert methods == ["boost.setup", "boost.finish"]
        setup = decode(channel.transcript[0].request)
        assert set(setup) == {"max_bin", "train", "datasets", "upload_codes"}
        finish = decode(channel.transcript[1].request)
        # At the end, the features the model uses and the run's random id (nothing of the labels).
        assert set(finish) == {"features", "model_id"}
        assert finish["features"].dtype == np.int64
        assert finish["model_id"] == model.model_id
        assert re.fullmatch(r"[0-9a-f]{32}", model.model_id)
    label_methods = [e.method for e in channels[0].transcript]
    assert label_methods == ["boost.setup", "boost.labels", "boost.finish"]
    predict_boosting(model, channels, "test")
    for channel in channels:
        for exchange in channel.transcript:
            assert not any(a.dtype.kind == "f" for a in arrays(decode(exchange.request)))


def test_party_placement_leaks_labels_to_passive_parties_as_documented() -> None:
    """The reason "tee" is the default: in "party", the sign of a gradient is the label."""
    data = vd.breast_cancer(2)
    _, channels = train(data, BoostingParams(n_estimators=3, histograms="party"))
    first = next(e for e in channels[1].transcript if e.method == "boost.gradients")
    request = decode(first.request)
    assert "labels" not in request
    np.testing.assert_array_equal(request["grad"] < 0, data.y["train"] == 1)


def test_model_parts_round_trip_and_a_party_predicts_from_its_part_alone() -> None:
    data = missing_data()
    model, channels = train(data, BoostingParams(n_estimators=15, max_depth=3))
    expected = predict_boosting(model, channels, "test")
    server = BoostedTrees.from_bytes(model.to_bytes())
    assert server.to_bytes() == model.to_bytes()
    parts = [PartyThresholds.from_bytes(ch.endpoint.thresholds.to_bytes()) for ch in channels]  # type: ignore[attr-defined]
    for part, cols in zip(parts, data.columns, strict=True):
        assert part.n_features == len(cols)
        assert len(part.features) <= len(cols)
        assert set(part.features.tolist()) == set(model.used_features(part.party).tolist())
    fresh = [
        InProcessChannel(BoostingParty(p.party, {"test": data.x["test"][:, cols]}, thresholds=p))
        for p, cols in zip(parts, data.columns, strict=True)
    ]
    np.testing.assert_array_equal(predict_boosting(server, fresh[::-1], "test"), expected)
    margin = predict_boosting(server, fresh, "test", output_margin=True)
    np.testing.assert_allclose(1 / (1 + np.exp(-margin.astype(np.float64))), expected, rtol=1e-6)


@pytest.mark.parametrize(
    "data",
    [b"not cbor", b"\xa1aa\x01"],
    ids=["garbage", "wrong-format"],
)
def test_malformed_model_bytes_are_refused(data: bytes) -> None:
    with pytest.raises(MessageError):
        BoostedTrees.from_bytes(data)
    with pytest.raises(MessageError):
        PartyThresholds.from_bytes(data)


Tamper = Callable[[Payload], Payload]


def tampered(party: BoostingParty, method: str, change: Tamper) -> InProcessChannel:
    original = party._handlers[method]
    party.register(method, lambda payload: change(original(payload)))
    return InProcessChannel(party)


def _scale_one_bin(answer: Payload) -> Payload:
    hist = answer["hist"].copy()
    hist[0, 0, 0, 1] += 1.0
    return {"hist": hist}


def _flip_a_bit(answer: Payload) -> Payload:
    left = answer["left"].copy()
    left[0] ^= 0x80
    return {"left": left}


def _bad_codes(answer: Payload) -> Payload:
    codes = {k: v.copy() for k, v in answer["codes"].items()}
    codes["train"][0, 0] = answer["n_bins"][0]  # one past the feature's last bin, not "missing"
    return {**answer, "codes": codes}


CASES: list[tuple[str, str, str, Tamper]] = [
    ("tee", "boost.setup", "codes out of range", _bad_codes),
    ("tee", "boost.setup", "codes of the wrong dtype",
     lambda a: {**a, "codes": {k: v.astype(np.int32) for k, v in a["codes"].items()}}),
    ("tee", "boost.setup", "too many bins", lambda a: {**a, "n_bins": a["n_bins"] + 1000}),
    ("tee", "boost.setup", "fewer rows",
     lambda a: {**a, "n_rows": {k: v - 1 for k, v in a["n_rows"].items()}}),
    ("party", "boost.histograms", "wrong shape", lambda a: {"hist": a["hist"][:, :-1]}),
    ("party", "boost.histograms", "NaN", lambda a: {"hist": np.full_like(a["hist"], np.nan)}),
    ("party", "boost.histograms", "sums that do not add up", _scale_one_bin),
    ("party", "boost.partition", "a partition against the histograms", _flip_a_bit),
    ("party", "boost.partition", "too few bits", lambda a: {"left": a["left"][:-1]}),
    ("tee", "boost.predict", "wrong shape", lambda a: {**a, "left": a["left"][:, :-1]}),
    ("tee", "boost.predict", "other rows", lambda a: {**a, "n_rows": a["n_rows"] + 8}),
]  # fmt: skip


@pytest.mark.parametrize(("placement", "method", "what", "change"), CASES, ids=[c[2] for c in CASES])
def test_malformed_answers_raise_protocol_error(
    placement: str, method: str, what: str, change: Tamper
) -> None:
    data = vd.breast_cancer(2)
    params = BoostingParams(n_estimators=3, histograms=placement)
    parties = data.parties()
    channels = [InProcessChannel(parties[0]), tampered(parties[1], method, change)]
    if method == "boost.predict":
        model, _ = train(data, params, channels)
        with pytest.raises(ProtocolError, match="party1"):
            predict_boosting(model, channels, "test")
    else:
        with pytest.raises(ProtocolError, match="party1"):
            train(data, params, channels)
    # Nothing was changed on the honest side: it trains as if nothing happened.
    honest = [InProcessChannel(parties[0]), InProcessChannel(data.parties()[1])]
    again, _ = train(data, params, honest)
    fresh, _ = train(data, params)
    assert (
        dataclasses.replace(again, model_id="").to_bytes()
        == dataclasses.replace(fresh, model_id="").to_bytes()
    )


@pytest.mark.parametrize(
    "labels", [np.full(398, np.nan), np.full(398, 2.0), np.zeros(397)], ids=["nan", "not-0/1", "short"]
)
def test_bad_labels_are_refused(labels: np.ndarray) -> None:
    data = vd.breast_cancer(2)
    parties = data.parties()
    channels = [
        tampered(parties[0], "boost.labels", lambda a: {"labels": {"train": labels}}),
        InProcessChannel(parties[1]),
    ]
    with pytest.raises(ProtocolError, match="party0"):
        train(data, BoostingParams(n_estimators=2), channels)


def test_party_refuses_malformed_requests() -> None:
    data = vd.breast_cancer(2)
    party = data.parties()[1]
    with pytest.raises(ProtocolError):
        party.handle("boost.histograms", {"tree": 0, "counts": np.array([1])})  # before setup
    party.handle(
        "boost.setup", {"max_bin": 256, "train": "train", "datasets": ["train"], "upload_codes": False}
    )
    n = len(data.x["train"])
    grad = np.zeros(n, dtype=np.float32)
    good = {"tree": 0, "grad": grad, "hess": grad + 1, "features": np.arange(3)}
    for bad in (
        {**good, "grad": grad.astype(np.float64)},
        {**good, "hess": grad - 1},
        {**good, "grad": grad + np.nan},
        {**good, "features": np.array([5, 2])},
        {**good, "features": np.array([99])},
    ):
        with pytest.raises(ProtocolError):
            party.handle("boost.gradients", bad)
    party.handle("boost.gradients", good)
    for bad in (
        {"tree": 1, "counts": np.array([n])},
        {"tree": 0, "counts": np.array([2]), "rows": np.array([0, n], dtype=np.int32)},
        {"tree": 0, "counts": np.array([3]), "rows": np.array([0, 1], dtype=np.int32)},
        {"tree": 0, "counts": np.array([n - 1])},
    ):
        with pytest.raises(ProtocolError):
            party.handle("boost.histograms", bad)
    split = {"tree": 0, "counts": np.array([2]), "rows": np.array([0, 1], dtype=np.int32)}
    for splits in ([[0, 300, 0]], [[0, 3, 2]], [[7, 3, 0]], [[0, -2, 0]], [[0, 1]]):
        with pytest.raises(ProtocolError):
            party.handle("boost.partition", {**split, "splits": np.array(splits)})
    with pytest.raises(MessageError):
        party.handle("boost.predict", {"dataset": "nope", "splits": np.zeros((0, 3), dtype=np.int64)})
    with pytest.raises(MessageError):
        party.handle("boost.labels", {"datasets": ["train"]})  # a passive party has none


def test_party_failure_reaches_the_server_without_its_text() -> None:
    data = vd.breast_cancer(2)
    channels = data.channels()
    channels[1].endpoint._data["train"] = channels[1].endpoint._data["train"][:10]  # type: ignore[attr-defined]
    with pytest.raises(ProtocolError, match="party1"):
        train(data, BoostingParams(n_estimators=2), channels)
    with pytest.raises(PartyFailedError):
        train(
            data, BoostingParams(n_estimators=2), [channels[0], InProcessChannel(BoostingParty("party1", {}))]
        )


@pytest.mark.parametrize(
    "bad",
    [
        {"objective": "multi:softmax"}, {"n_estimators": 0}, {"max_depth": 0}, {"max_bin": 1},
        {"learning_rate": -1.0}, {"subsample": 0.0}, {"colsample_bytree": 1.5}, {"histograms": "gpu"},
        {"base_score": 1.0}, {"early_stopping_rounds": 0}, {"eval_metric": "error"},
        {"objective": "reg:squarederror", "eval_metric": "auc"},
    ],
)  # fmt: skip
def test_bad_parameters_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        BoostingParams(**bad)  # type: ignore[arg-type]


def test_parameters_round_trip_and_unknown_ones_are_refused() -> None:
    params = BoostingParams(n_estimators=7, subsample=0.5, histograms="party")
    assert BoostingParams.from_dict(params.to_dict()) == params
    with pytest.raises(ConfigurationError):
        BoostingParams.from_dict({"nrounds": 3})
    data = vd.breast_cancer(2)
    channels = data.channels()
    with pytest.raises(ConfigurationError):
        train_boosting(channels[0], channels[1:], BoostingParams(early_stopping_rounds=2))
    with pytest.raises(ConfigurationError):
        train_boosting(channels[0], [channels[0]], BoostingParams())


def test_a_label_party_without_features() -> None:
    """The party with the labels need not hold a feature (a bank that only knows who defaulted)."""
    data = vd.breast_cancer(2)
    label = BoostingParty("bank", {k: v[:, :0] for k, v in data.x.items()}, labels=data.y)
    columns = [InProcessChannel(p) for p in data.parties()]
    for placement in ("tee", "party"):
        channels = [InProcessChannel(label), *columns]
        model = train_boosting(
            channels[0], channels[1:], BoostingParams(n_estimators=10, histograms=placement)
        )
        assert model.n_features == (0, 15, 15)
        assert vd.auc(data.y["test"], predict_boosting(model, channels, "test")) > 0.95


def test_prediction_in_batches_of_trees(monkeypatch: pytest.MonkeyPatch) -> None:
    from enclaveml.fl.vertical import _boost_train

    data = vd.breast_cancer(2)
    model, channels = train(data, BoostingParams(n_estimators=12))
    whole = predict_boosting(model, channels, "test")
    monkeypatch.setattr(_boost_train, "_MAX_BITS", 3000)  # a few trees per batch
    before = len(channels[1].transcript)
    np.testing.assert_array_equal(predict_boosting(model, channels, "test"), whole)
    assert len(channels[1].transcript) - before > 3


def test_a_party_predicts_only_with_its_part_of_this_model_and_the_columns_it_was_trained_on() -> None:
    data = missing_data()
    model, channels = train(data, BoostingParams(n_estimators=8, max_depth=3))
    other, other_channels = train(data, BoostingParams(n_estimators=8, max_depth=2))  # another run
    assert model.model_id != other.model_id
    parts = [ch.endpoint.thresholds for ch in channels]  # type: ignore[attr-defined]
    stale = [ch.endpoint.thresholds for ch in other_channels]  # type: ignore[attr-defined]
    assert {p.model_id for p in parts} == {model.model_id}

    def party(part: PartyThresholds, cols: object, name: str | None = None) -> InProcessChannel:
        return InProcessChannel(
            BoostingParty(name or part.party, {"test": data.x["test"][:, cols]}, thresholds=part)
        )

    # A part left over from another training run: refused, not silently wrong.
    mixed = [
        party(parts[0], data.columns[0]),
        *(party(p, c) for p, c in zip(stale[1:], data.columns[1:], strict=True)),
    ]
    with pytest.raises(PartyFailedError, match="ProtocolError"):
        predict_boosting(model, mixed, "test")
    # Another party's part, or a table with another number of columns than the part was trained on.
    with pytest.raises(ConfigurationError, match="party"):
        party(parts[1], data.columns[1], name=parts[0].party)
    widened = np.concatenate([data.x["test"][:, data.columns[0]], np.zeros((len(data.x["test"]), 1))], axis=1)
    with pytest.raises(ConfigurationError, match="columns"):
        BoostingParty(parts[0].party, {"test": widened}, thresholds=parts[0])
    good = [party(p, c) for p, c in zip(parts, data.columns, strict=True)]
    np.testing.assert_array_equal(
        predict_boosting(model, good, "test"), predict_boosting(model, channels, "test")
    )


@pytest.mark.parametrize("huge", [1e39, 1e19])
def test_regression_labels_float32_cannot_hold_are_refused_before_training(huge: float) -> None:
    # 1e39 is finite as float64 but inf in float32, where training runs: the model came out inf/NaN;
    # 1e19 over a few hundred rows overflowed the split gains (sums of gradients, squared): wrong splits.
    data = vd.breast_cancer(2)
    parties = data.parties()
    labels = {k: np.where(np.arange(len(v)) == 0, huge, v.astype(np.float64)) for k, v in data.y.items()}
    parties[0]._labels = {k: labels[k] for k in parties[0]._labels}  # the label party's own data
    channels = [InProcessChannel(p) for p in parties]
    with pytest.raises(ProtocolError, match="labels the objective cannot train on") as refused:
        train_boosting(
            channels[0], channels[1:], BoostingParams(n_estimators=2, objective="reg:squarederror")
        )
    assert "float32" not in str(refused.value)  # every party sees this message: no fact about the labels
    # An honest label party refuses them itself, before connecting, given the plan's objective.
    with pytest.raises(ConfigurationError, match="too large for float32"):
        BoostingParty("p0", {k: data.x[k] for k in labels}, labels=labels, objective="reg:squarederror")


def test_a_label_party_refuses_labels_its_objective_cannot_train_on_before_connecting() -> None:
    # It used to connect and let the server fail the job with "labels outside [0, 1]", a fact about
    # its labels, sent to every passive party and logged on the host.
    x = np.zeros((4, 2))
    with pytest.raises(ConfigurationError, match=r"outside \[0, 1\]"):
        BoostingParty("bank", {"train": x}, labels={"train": [0, 1, 3.0, 0]}, objective="binary:logistic")
    BoostingParty("bank", {"train": x}, labels={"train": [0, 1, 3.0, 0]}, objective="reg:squarederror")
    BoostingParty("bank", {"train": x}, labels={"train": [0, 1, 0.5, 0]}, objective="binary:logistic")
    # The job helpers pass the plan's objective (binary:logistic by default).
    from enclaveml.fl.vertical import jobs
    from enclaveml.fl.vertical.plan import VerticalPlan

    plan = VerticalPlan(task="train", parties=("bank", "insurer"), algorithm="boosting")
    with pytest.raises(ConfigurationError, match=r"outside \[0, 1\]"):
        jobs.party_for_training(plan, "bank", x, np.array([0, 1, 3.0, 0]))
