"""The federated-learning test task: scikit-learn's bundled digits, a small plain-torch MLP, seeded."""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from enclaveml.fl.client import Trainer, TrainResult, state_dict_to_weights, weights_to_state_dict
from enclaveml.fl.strategy import Weights

torch.set_num_threads(1)


@functools.cache
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train/test split (75/25, stratified, fixed seed), features scaled to [0, 1]."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    return x_train, x_test, y_train.astype(np.int64), y_test.astype(np.int64)


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def train(
    model: torch.nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, seed: int, lr: float = 0.05
) -> float:
    """Plain minibatch SGD with momentum; returns the last epoch's mean loss."""
    generator = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    total = 0.0
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=generator)
        total = 0.0
        for start in range(0, len(xt), 32):
            batch = order[start : start + 32]
            optimizer.zero_grad()
            loss = loss_fn(model(xt[batch]), yt[batch])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
    return total / len(xt)


def accuracy(model_or_weights: torch.nn.Module | Weights, x: np.ndarray, y: np.ndarray) -> float:
    model = model_or_weights if isinstance(model_or_weights, torch.nn.Module) else load(model_or_weights)
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    return float((predicted == y).mean())


def load(weights: Weights) -> torch.nn.Module:
    model = mlp()
    model.load_state_dict(weights_to_state_dict(weights, model))
    return model


def initial_weights(seed: int = 0) -> Weights:
    return state_dict_to_weights(mlp(seed))


def dirichlet_split(y: np.ndarray, clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Label-skewed partition: each class spread over clients by Dirichlet(alpha) proportions."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(clients)]
    for label in np.unique(y):
        indices = rng.permutation(np.flatnonzero(y == label))
        shares = rng.dirichlet([alpha] * clients)
        cuts = (np.cumsum(shares)[:-1] * len(indices)).astype(int)
        for part, chunk in zip(parts, np.split(indices, cuts), strict=True):
            part.extend(chunk.tolist())
    return [np.array(sorted(p), dtype=np.int64) for p in parts]


def trainer(x: np.ndarray, y: np.ndarray, *, epochs: int, seed: int) -> Trainer:
    """A participant's training function over its own (x, y)."""
    calls = [0]

    def train_round(weights: Weights, config: dict[str, Any]) -> TrainResult:
        calls[0] += 1
        model = load(weights)
        loss = train(
            model, x, y, epochs=epochs, seed=seed * 1000 + calls[0], lr=float(config.get("lr", 0.05))
        )
        return TrainResult(state_dict_to_weights(model), len(x), {"loss": loss})

    return train_round


def cli_trainer(weights: Weights, config: dict[str, Any]) -> TrainResult:
    """``--trainer tests.fl_digits:cli_trainer``: the share of client ``$ENCLAVEML_TEST_FL_CLIENT`` (of 2)."""
    index = int(os.environ["ENCLAVEML_TEST_FL_CLIENT"])
    x_train, _, y_train, _ = digits()
    share = dirichlet_split(y_train, 2, alpha=1.0, seed=0)[index]
    return trainer(x_train[share], y_train[share], epochs=2, seed=index)(weights, config)
