"""PyTorch helpers: a ``state_dict`` as framework-neutral weights (a list of numpy arrays) and back.

The aggregator never imports torch; these helpers run at the participant. The order of the
arrays is the ``state_dict`` order, which PyTorch fixes by module registration, so every
participant with the same architecture produces the same layout. Buffers (BatchNorm running
statistics, ``num_batches_tracked``) are included, as FedAvg over a full state expects.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from enclaveml.errors import ConfigurationError
from enclaveml.fl.strategy import Weights

if TYPE_CHECKING:
    import torch

__all__ = ["state_dict_to_weights", "weights_to_state_dict"]


def state_dict_to_weights(state: torch.nn.Module | Mapping[str, torch.Tensor]) -> Weights:
    """Copies of a module's (or a ``state_dict``'s) tensors as numpy arrays, in ``state_dict`` order."""
    import torch

    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    return [np.array(t.detach().cpu().numpy(), copy=True) for t in state.values()]


def weights_to_state_dict(
    weights: Weights, template: torch.nn.Module | Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A ``state_dict`` with ``template``'s names, dtypes and devices holding ``weights``.

    Load it with ``module.load_state_dict(...)``. Raises ConfigurationError when the number or
    shapes of the arrays do not match the template (another architecture).
    """
    import torch

    reference = template.state_dict() if isinstance(template, torch.nn.Module) else template
    if len(weights) != len(reference):
        raise ConfigurationError(f"{len(weights)} arrays for a state_dict of {len(reference)} tensors")
    out: dict[str, torch.Tensor] = {}
    for (name, tensor), array in zip(reference.items(), weights, strict=True):
        if tuple(array.shape) != tuple(tensor.shape):
            raise ConfigurationError(
                f"{name}: array of shape {array.shape}, the model expects {tuple(tensor.shape)}"
            )
        out[name] = torch.from_numpy(np.array(array, copy=True)).to(dtype=tensor.dtype, device=tensor.device)
    return out
