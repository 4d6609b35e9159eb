"""Federated learning on scikit-learn's digits: label-skewed clients, an attested aggregator, a plot.

Eight participants each hold a label-skewed share of the digits training set (Dirichlet
alpha = 0.5 over labels: some clients see almost no 3s, others mostly 3s) and train a small
plain-PyTorch MLP. The aggregator runs FedAvg in a (simulated) TEE and speaks RA-TLS: every
client verifies the aggregator's measurement *and* the training plan before its first upload.
Accuracy of the global model on the held-out test set is printed after every round and plotted
next to centralized training on the pooled data (which no participant could do) and the best
that any single participant reaches on its own share.

    python examples/federated_digits.py                      # over RA-TLS on 127.0.0.1
    python examples/federated_digits.py --transport inprocess --rounds 20 --output curve.png

Needs torch, scikit-learn and matplotlib. The simulation TEE protects nothing: it is here so the
example runs anywhere; on SGX/TDX/SEV-SNP the same code runs with a hardware evidence provider.
"""

from __future__ import annotations

import argparse
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from enclaveml.attestation import AllOf, MeasurementAllowlist, UnsafeAllowSimulation
from enclaveml.attestation.simulation import SimulationKey, SimulationProvider, SimulationVerifier
from enclaveml.fl.aggregator import Aggregator
from enclaveml.fl.client import (
    AggregatorClient,
    AggregatorConnection,
    InProcessConnection,
    TrainResult,
    participate,
    state_dict_to_weights,
    weights_to_state_dict,
)
from enclaveml.fl.server import serve_aggregator
from enclaveml.fl.strategies import FedAvg

matplotlib.use("Agg")  # no display needed; must precede pyplot
import matplotlib.pyplot as plt

Arrays = list[np.ndarray]


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def fit(net: torch.nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> float:
    """Minibatch SGD with momentum; returns the mean loss of the last epoch."""
    generator = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    net.train()
    total = 0.0
    for _ in range(epochs):
        total = 0.0
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(xt), 32):
            batch = order[start : start + 32]
            optimizer.zero_grad()
            loss = loss_fn(net(xt[batch]), yt[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
    return total / len(xt)


def accuracy(net: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    net.eval()
    with torch.no_grad():
        return float((net(torch.from_numpy(x)).argmax(dim=1).numpy() == y).mean())


def with_weights(weights: Arrays) -> torch.nn.Module:
    net = model()
    net.load_state_dict(weights_to_state_dict(weights, net))
    return net


def label_skewed_shares(y: np.ndarray, clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Each label's examples split over clients in Dirichlet(alpha) proportions (small alpha: more skew)."""
    rng = np.random.default_rng(seed)
    shares: list[list[int]] = [[] for _ in range(clients)]
    for label in np.unique(y):
        indices = rng.permutation(np.flatnonzero(y == label))
        cuts = (np.cumsum(rng.dirichlet([alpha] * clients))[:-1] * len(indices)).astype(int)
        for share, part in zip(shares, np.split(indices, cuts), strict=True):
            share.extend(part.tolist())
    return [np.array(sorted(s), dtype=np.int64) for s in shares]


def local_trainer(x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> Any:
    """The participant's own code: train the global model on local data only."""
    rounds = [0]

    def train(weights: Arrays, config: dict[str, Any]) -> TrainResult:
        rounds[0] += 1
        net = with_weights(weights)
        loss = fit(net, x, y, epochs, seed=seed * 1000 + rounds[0])
        return TrainResult(state_dict_to_weights(net), len(x), {"loss": loss})

    return train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--local-epochs", type=int, default=3)
    parser.add_argument(
        "--alpha", type=float, default=0.5, help="Dirichlet label skew (smaller: more skewed)"
    )
    parser.add_argument("--transport", choices=("https", "inprocess"), default="https")
    parser.add_argument("--output", type=Path, default=Path("federated_digits.png"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # hide the (deliberate) simulation warnings
    torch.set_num_threads(1)  # several clients share few cores; one thread each avoids contention

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    shares = label_skewed_shares(y_train, args.clients, args.alpha, seed=0)
    print(f"{args.clients} clients, examples per client: {[len(s) for s in shares]}")
    counts = [np.bincount(y_train[s], minlength=10) for s in shares]
    print(
        "examples of the rarest / most common label per client:",
        [(int(c.min()), int(c.max())) for c in counts],
    )

    aggregator = Aggregator(
        FedAvg(), state_dict_to_weights(model(0)), rounds=args.rounds, min_clients=args.clients,
        round_timeout_s=120.0, model_id="digits-mlp-64",
    )  # fmt: skip
    credentials = {f"client-{i}": aggregator.enrol(f"client-{i}") for i in range(args.clients)}
    curve: list[float] = []

    def evaluate(message: Any) -> None:
        curve.append(accuracy(with_weights(message.weights), x_test, y_test))
        print(f"round {message.completed_rounds:2d}: test accuracy {curve[-1]:.4f}", flush=True)

    server = None
    if args.transport == "https":
        key = SimulationKey.generate()
        provider = SimulationProvider(
            key=key, entry_point="enclaveml fl aggregator", config=aggregator.plan.to_dict()
        )
        server = serve_aggregator(aggregator, provider)
        # What each participant checks: this code (the measurement of code + plan) and this plan.
        policy = UnsafeAllowSimulation(AllOf(MeasurementAllowlist([provider.measurement])))
        verifier = SimulationVerifier(key.public_key())
        print(f"aggregator on {server.url}, plan {aggregator.plan.digest.hex()[:16]}…")

    def connect(client_id: str) -> AggregatorConnection:
        if server is None:
            return InProcessConnection(aggregator, credentials[client_id])
        return AggregatorClient(
            server.url, credential=credentials[client_id], policy=policy, verifier=verifier,
            expected_plan=aggregator.plan.to_dict(),
        )  # fmt: skip

    def take_part(index: int) -> None:
        connection = connect(f"client-{index}")
        train = local_trainer(x_train[shares[index]], y_train[shares[index]], args.local_epochs, seed=index)
        try:
            participate(connection, train, on_round=evaluate if index == 0 else None)
        finally:
            connection.close()

    started = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        for future in [pool.submit(take_part, i) for i in range(args.clients)]:
            future.result()
    federated_s = time.perf_counter() - started
    if server is not None:
        server.stop()

    central = model(0)
    fit(central, x_train, y_train, epochs=20, seed=1)
    central_accuracy = accuracy(central, x_test, y_test)
    alone = []
    for index, share in enumerate(shares):
        own = model(0)
        fit(own, x_train[share], y_train[share], epochs=20, seed=index)
        alone.append(accuracy(own, x_test, y_test))
    print(f"federated: {curve[-1]:.4f} after {args.rounds} rounds ({federated_s:.1f} s, {args.transport})")
    print(f"centralized on the pooled data (20 epochs): {central_accuracy:.4f}")
    print(f"each client alone on its own share (20 epochs): best {max(alone):.4f}, mean {np.mean(alone):.4f}")

    figure, axes = plt.subplots(figsize=(7, 4.2))
    axes.plot(range(len(curve)), curve, marker="o", label=f"FedAvg, {args.clients} label-skewed clients")
    axes.axhline(central_accuracy, color="gray", linestyle="--", label="centralized (pooled data)")
    axes.axhline(max(alone), color="tab:red", linestyle=":", label="best client training alone")
    axes.set(
        xlabel="round", ylabel="test accuracy", ylim=(0, 1), title="Federated digits (aggregator in a TEE)"
    )
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(args.output, dpi=120)
    print(f"plot saved to {args.output}")


if __name__ == "__main__":
    main()
