"""Vertical logistic regression in-process: parity with central scikit-learn, what crosses, bad answers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from enclaveml.errors import ConfigurationError
from enclaveml.fl.vertical._channel import InProcessChannel, PartyEndpoint
from enclaveml.fl.vertical._codec import Payload, decode
from enclaveml.fl.vertical._errors import MessageError, PartyFailedError, ProtocolError
from enclaveml.fl.vertical.logreg import LogRegParams, LogRegParty, LogRegShare, predict_logreg, train_logreg


def split(x: np.ndarray, y: np.ndarray, parties: int, seed: int = 0) -> tuple[list[LogRegParty], Any]:
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    columns = np.array_split(np.arange(x.shape[1]), parties)
    endpoints = [
        LogRegParty(
            f"p{i}", x_train[:, c], labels=y_train if i == 0 else None, datasets={"test": x_test[:, c]}
        )
        for i, c in enumerate(columns)
    ]
    return endpoints, (x_train, x_test, y_train, y_test)


def central_accuracy(data: Any, C: float) -> float:
    x_train, x_test, y_train, y_test = data
    scaler = StandardScaler().fit(x_train)
    model = LogisticRegression(C=C, max_iter=10_000).fit(scaler.transform(x_train), y_train)
    return float(model.score(scaler.transform(x_test), y_test))


@pytest.mark.parametrize(
    ("dataset", "parties"),
    [("cancer", 3), ("synthetic", 3), ("synthetic", 2)],
)
def test_accuracy_within_one_point_of_central_logistic_regression(dataset: str, parties: int) -> None:
    if dataset == "cancer":
        x, y = load_breast_cancer(return_X_y=True)
    else:
        x, y = make_classification(n_samples=4000, n_features=24, n_informative=12, random_state=3)
    endpoints, data = split(x, y, parties)
    channels = [InProcessChannel(p, record=False) for p in endpoints]
    result = train_logreg(channels[0], channels[1:], LogRegParams(C=1.0, max_iter=500))
    probabilities = predict_logreg(channels[0], channels[1:], "test")
    accuracy = float(((probabilities > 0.5) == data[3]).mean())
    assert accuracy >= central_accuracy(data, 1.0) - 0.01
    assert result.losses[-1] < result.losses[0]


def test_converges_to_the_central_optimum() -> None:
    x, y = load_breast_cancer(return_X_y=True)
    endpoints, data = split(x, y, 3)
    channels = [InProcessChannel(p, record=False) for p in endpoints]
    result = train_logreg(channels[0], channels[1:], LogRegParams(C=0.5, max_iter=20_000, tol=1e-7))
    assert result.converged
    x_train, _, y_train, _ = data
    scaler = StandardScaler().fit(x_train)
    reference = LogisticRegression(C=0.5, max_iter=10_000, tol=1e-10).fit(scaler.transform(x_train), y_train)
    weights = np.concatenate([p.share.weights for p in endpoints])
    np.testing.assert_allclose(weights, reference.coef_[0], atol=2e-3)
    assert endpoints[0].share.intercept == pytest.approx(reference.intercept_[0], abs=2e-3)
    assert all(p.share.intercept is None for p in endpoints[1:])


def test_mini_batches_also_reach_central_accuracy() -> None:
    x, y = make_classification(n_samples=3000, n_features=12, random_state=5)
    endpoints, data = split(x, y, 3)
    channels = [InProcessChannel(p, record=False) for p in endpoints]
    train_logreg(channels[0], channels[1:], LogRegParams(max_iter=600, batch_size=256, seed=1))
    accuracy = float(((predict_logreg(channels[0], channels[1:], "test") > 0.5) == data[3]).mean())
    assert accuracy >= central_accuracy(data, 1.0) - 0.01


def test_what_crosses_the_wire() -> None:
    x, y = load_breast_cancer(return_X_y=True)
    endpoints, data = split(x, y, 3)
    channels = [InProcessChannel(p) for p in endpoints]
    train_logreg(channels[0], channels[1:], LogRegParams(max_iter=20))
    x_train, _, y_train, _ = data
    label_answers = 0
    for channel in channels:
        for exchange in channel.transcript:
            sent = decode(exchange.response)["ok"]
            # The server gets counts, step sizes and partial logits; the labels come from party 0 only.
            assert set(sent) <= {"rows", "features", "labels", "step_sq", "z"}
            if "labels" in sent:
                assert channel is channels[0]
                assert exchange.method == "logreg.setup"
                label_answers += 1
            for value in sent.values():
                if isinstance(value, np.ndarray) and value.dtype == np.float64:
                    assert not any(np.allclose(value, column) for column in x_train.T)
    assert label_answers == 1
    for channel in channels[1:]:
        for exchange in channel.transcript:
            received = decode(exchange.request)
            assert "labels" not in received
            assert not any(
                isinstance(v, np.ndarray) and v.shape == y_train.shape and np.array_equal(v, y_train)
                for v in received.values()
            )


def test_share_round_trips_and_predicts_alone() -> None:
    x, y = load_breast_cancer(return_X_y=True)
    endpoints, data = split(x, y, 2)
    channels = [InProcessChannel(p, record=False) for p in endpoints]
    train_logreg(channels[0], channels[1:], LogRegParams(max_iter=100))
    expected = predict_logreg(channels[0], channels[1:], "test")
    columns = np.array_split(np.arange(x.shape[1]), 2)
    restored = [
        LogRegParty.from_share(p.name, LogRegShare.from_bytes(p.share.to_bytes()), {"new": data[1][:, c]})
        for p, c in zip(endpoints, columns, strict=True)
    ]
    again = [InProcessChannel(p, record=False) for p in restored]
    np.testing.assert_array_equal(predict_logreg(again[0], again[1:], "new"), expected)
    with pytest.raises(MessageError):
        LogRegShare.from_bytes(b"\xa1av\x09")


class Liar(PartyEndpoint):
    """A party that answers setup honestly (through a real party) and then lies."""

    def __init__(self, inner: LogRegParty, lie: dict[str, Any]) -> None:
        super().__init__(inner.name)
        self.register("logreg.setup", lambda p: inner.handle("logreg.setup", p))
        self.register("logreg.step", lambda p: {**inner.handle("logreg.step", p), **lie})


@pytest.mark.parametrize(
    "lie",
    [
        {"z": np.full(5, 1.0)},  # wrong length
        {"z": np.array([np.nan] * 1)},
        {"step_sq": -1.0},
        {"step_sq": "big"},
    ],
)
def test_malformed_answers_stop_training_with_a_protocol_error(lie: dict[str, Any]) -> None:
    x, y = make_classification(n_samples=300, n_features=6, random_state=1)
    endpoints, data = split(x, y, 3)
    if "z" in lie and lie["z"].size == 1:
        lie = {"z": np.full(len(data[2]), np.nan)}
    channels = [
        InProcessChannel(endpoints[0]),
        InProcessChannel(Liar(endpoints[1], lie)),
        InProcessChannel(endpoints[2]),
    ]
    with pytest.raises((ProtocolError, MessageError)):
        train_logreg(channels[0], channels[1:], LogRegParams(max_iter=5))


def test_party_refuses_nonsense_from_the_server() -> None:
    party = LogRegParty("p", np.ones((4, 2)))
    channel = InProcessChannel(party)
    with pytest.raises(PartyFailedError, match="ProtocolError"):
        channel.call("logreg.step", {"t": 0, "lr": 0.1, "want_z": True})  # before setup
    channel.call("logreg.setup", {"rows": 4, "l2": 0.0, "label_party": False})
    bad: list[Payload] = [
        {"t": 3, "lr": 0.1, "want_z": True},  # out of turn
        {"t": 0, "lr": -1.0, "want_z": True},
        {"t": 0, "lr": 0.1, "want_z": True, "z_rows": np.array([7], dtype=np.int64)},
        {"t": 0, "lr": 0.1, "want_z": False, "r": np.ones(3)},
    ]
    for payload in bad:
        with pytest.raises(PartyFailedError):
            channel.call("logreg.step", payload)
    with pytest.raises(PartyFailedError, match="ProtocolError"):
        channel.call("logreg.setup", {"rows": 5, "l2": 0.0, "label_party": False})
    with pytest.raises(ConfigurationError, match="0/1"):
        LogRegParty("q", np.ones((3, 1)), labels=[0, 1, 2])


def test_a_party_claiming_absurdly_many_columns_stops_training_instead_of_ending_it_converged() -> None:
    # The reported count sets everyone's step size: 2**200 made it ~1e-61, and training reported
    # "converged" after one iteration with weights of ~0.
    x, y = make_classification(n_samples=300, n_features=6, random_state=1)
    endpoints, _ = split(x, y, 3)

    class Overclaimer(PartyEndpoint):
        def __init__(self, inner: LogRegParty) -> None:
            super().__init__(inner.name)
            self.register("logreg.setup", lambda p: {**inner.handle("logreg.setup", p), "features": 2**200})
            self.register("logreg.step", lambda p: inner.handle("logreg.step", p))

    channels = [
        InProcessChannel(endpoints[0]),
        InProcessChannel(Overclaimer(endpoints[1])),
        InProcessChannel(endpoints[2]),
    ]
    with pytest.raises(ProtocolError, match="column count"):
        train_logreg(channels[0], channels[1:], LogRegParams(max_iter=5))


def test_prediction_refuses_shares_of_different_training_runs() -> None:
    x, y = load_breast_cancer(return_X_y=True)
    columns = np.array_split(np.arange(x.shape[1]), 2)
    runs = []
    for max_iter in (50, 100):  # two trainings on the same data: shares of each sum to their own model
        endpoints, data = split(x, y, 2)
        channels = [InProcessChannel(p, record=False) for p in endpoints]
        train_logreg(channels[0], channels[1:], LogRegParams(max_iter=max_iter))
        runs.append([LogRegShare.from_bytes(p.share.to_bytes()) for p in endpoints])
    assert runs[0][0].model_id
    assert runs[0][0].model_id == runs[0][1].model_id != runs[1][0].model_id

    def parties(shares: list[LogRegShare]) -> list[InProcessChannel]:
        return [
            InProcessChannel(LogRegParty.from_share(f"p{i}", s, {"new": data[1][:, c]}), record=False)
            for i, (s, c) in enumerate(zip(shares, columns, strict=True))
        ]

    good = parties(runs[1])
    assert predict_logreg(good[0], good[1:], "new").shape == (len(data[1]),)
    mixed = parties([runs[1][0], runs[0][1]])  # the passive party kept the share of the earlier run
    with pytest.raises(ProtocolError, match="different training runs"):
        predict_logreg(mixed[0], mixed[1:], "new")
