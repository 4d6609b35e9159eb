"""Aggregation strategies behind :class:`enclaveml.fl.strategy.Strategy`, one module per algorithm.

==================  ===========================================================================
FedAvg              example-weighted mean
FedProx             FedAvg + ``proximal_mu`` sent to clients; :func:`proximal_term` for their loss
FedAdam, FedYogi    adaptive server optimizers on the pseudo-gradient (checkpointable state)
CoordinateMedian    per-parameter median (robust)
TrimmedMean         per-parameter mean without the ``beta`` extremes (robust)
Krum                (multi-)Krum: mean of the updates closest to their neighbours (robust)
NormClipping        clip each update's change to ``max_norm``, then any inner strategy
CentralDP           clip, average, Gaussian noise; (ε, δ) from opacus' RDP accountant
==================  ===========================================================================

Whatever the strategy, integer and bool arrays (counters such as ``num_batches_tracked``, masks)
are the coordinate-wise median over the accepted updates, computed exactly in their dtype: no norm
rule bounds them, so a mean would let one client set them (CentralDP keeps them at the global
value: they are not released).

:class:`UpdateMatrix` stores a round's updates as rows of one matrix: the aggregator copies each
upload into a row as it arrives and hands the strategy the accepted rows, which FedAvg and its
kin aggregate with one BLAS call per dtype region (any ``Sequence[ClientUpdate]`` still works).
:func:`strategy_from_plan` rebuilds a strategy from its
:meth:`~enclaveml.fl.strategy.Strategy.plan` (``STRATEGIES`` maps names to classes).
"""

from __future__ import annotations

from enclaveml.fl.strategies._registry import STRATEGIES, strategy_from_plan
from enclaveml.fl.strategies._update_matrix import UpdateMatrix
from enclaveml.fl.strategies.central_dp import CentralDP
from enclaveml.fl.strategies.clipping import NormClipping
from enclaveml.fl.strategies.fedadam import FedAdam
from enclaveml.fl.strategies.fedavg import FedAvg
from enclaveml.fl.strategies.fedprox import FedProx, proximal_term
from enclaveml.fl.strategies.fedyogi import FedYogi
from enclaveml.fl.strategies.krum import Krum
from enclaveml.fl.strategies.median import CoordinateMedian
from enclaveml.fl.strategies.trimmed_mean import TrimmedMean

__all__ = [
    "STRATEGIES",
    "CentralDP",
    "CoordinateMedian",
    "FedAdam",
    "FedAvg",
    "FedProx",
    "FedYogi",
    "Krum",
    "NormClipping",
    "TrimmedMean",
    "UpdateMatrix",
    "proximal_term",
    "strategy_from_plan",
]
