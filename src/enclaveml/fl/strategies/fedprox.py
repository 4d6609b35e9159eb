"""FedProx (Li et al., 2020): FedAvg on the server, plus a proximal term in every client's loss.

The server side is FedAvg; what changes is the client objective
``loss(w) + mu/2 · ||w - w_global||²``, which keeps heterogeneous clients from drifting far from
the global model during local training. The server announces ``mu`` through
:meth:`FedProx.configure_train` (so it is part of the attested plan, not a client-side choice);
clients add :func:`proximal_term` to their loss.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, overload

import numpy as np

from enclaveml.fl.strategies._common import check_number
from enclaveml.fl.strategies.fedavg import FedAvg
from enclaveml.fl.strategy import Weights

if TYPE_CHECKING:
    import torch

__all__ = ["FedProx", "proximal_term"]


class FedProx(FedAvg):
    """FedAvg aggregation; ``configure_train`` hands every client ``{"proximal_mu": mu}``."""

    name: ClassVar[str] = "fedprox"

    def __init__(self, proximal_mu: float) -> None:
        self.proximal_mu = check_number("FedProx proximal_mu", proximal_mu, low=0.0)

    def configure_train(self, server_round: int, global_weights: Weights) -> dict[str, Any]:
        """``{"proximal_mu": mu}``: the weight of the proximal term in each client's loss."""
        return {"proximal_mu": self.proximal_mu}

    def plan(self) -> dict[str, Any]:
        """Name and ``proximal_mu``."""
        return {"name": self.name, "proximal_mu": self.proximal_mu}


@overload
def proximal_term(local: Sequence[np.ndarray], global_weights: Sequence[np.ndarray], mu: float) -> float: ...


@overload
def proximal_term(
    local: Iterable[torch.Tensor], global_weights: Sequence[torch.Tensor | np.ndarray], mu: float
) -> torch.Tensor: ...


def proximal_term(local: Iterable[Any], global_weights: Sequence[Any], mu: float) -> float | torch.Tensor:
    """``mu/2 · Σ ||local_k - global_k||²``, to add to the client's loss.

    With numpy arrays it returns a float. With torch tensors (``model.parameters()``) it returns
    a scalar tensor that autograd differentiates (gradient ``mu · (w - w_global)``); the global
    weights may be tensors or numpy arrays and never receive gradients. Convert numpy globals to
    tensors once per round (``torch.as_tensor``) rather than on every step.

    ``local`` and ``global_weights`` must list the same parameters in the same order: with
    torch, pass ``model.parameters()`` and the matching global tensors (not a ``state_dict``
    with buffers, whose statistics are not trained by gradient).
    """
    locals_ = list(local)
    if len(locals_) != len(global_weights):
        raise ValueError(f"{len(locals_)} local arrays but {len(global_weights)} global ones")
    if locals_ and not isinstance(locals_[0], np.ndarray):
        return _torch_proximal_term(locals_, global_weights, mu)
    total = 0.0
    for w, g in zip(locals_, global_weights, strict=True):
        d = np.asarray(w, dtype=np.float64) - np.asarray(g, dtype=np.float64)
        total += float(np.dot(d.ravel(), d.ravel()))
    return 0.5 * mu * total


def _torch_proximal_term(
    local: list[torch.Tensor], global_weights: Sequence[torch.Tensor | np.ndarray], mu: float
) -> torch.Tensor:
    import torch

    terms = []
    for w, g in zip(local, global_weights, strict=True):
        reference = torch.as_tensor(g, dtype=w.dtype, device=w.device).detach()
        terms.append(torch.sum(torch.square(w - reference)))
    if not terms:
        return torch.zeros(())
    return 0.5 * mu * torch.stack(terms).sum()
