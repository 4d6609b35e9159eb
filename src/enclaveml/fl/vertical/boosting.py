"""Vertical gradient-boosted trees: xgboost's ``hist`` algorithm over columns that stay with their owners.

The rows are aligned already (PSI). Each party bins each of its features into quantile bins computed
on its own training rows (at most ``max_bin``, default 256) and keeps the cut points: the model
records a split as (party, feature, bin) and only the party can turn it into a threshold. The
algorithm is xgboost's ``tree_method="hist"``, depthwise: the same gradients (float32), histograms
(float64 sums), gain and leaf weight, ``min_child_weight``/``gamma`` checks, tie-breaking, default
direction for missing values and intercept (``base_score`` = the mean label when not given, as
xgboost 3 estimates it); so on the same bins it grows the same trees (see the parity tests).

**Two placements of the histograms, one algorithm** (``histograms=``):

``"tee"`` (default): each party uploads its bin codes (never a raw value, never a cut point) once,
and the label party its labels; the server builds every histogram inside the TEE. Passive
parties receive nothing derived from the labels while the model is trained. The TEE learns each
value's quantile bin (its rank to within 1/``max_bin``), which is what it needs to find splits.

``"party"``: the server sends every party the gradients and hessians of each tree, and per level
the rows of the nodes it needs; each party answers its histograms, and the owner of a chosen split
answers which rows go left. The codes never leave the parties, but **a passive party receives
every row's gradient, and for ``binary:logistic`` the sign of ``g = p - y`` is the label**: this
placement protects the labels from nobody but outsiders. Every party also learns, level by level,
which rows share a node, so the outcome (not the threshold) of the other parties' splits. It is
there for parties that will not upload even bin codes; it is not the default for those reasons.

Who receives what, per call (the server calls, the party answers; payloads of
:mod:`enclaveml.fl.vertical._codec`; ``n`` rows, ``F`` features of the party, ``S = max_bin + 1``)::

    boost.setup       server -> party: {max_bin, train, datasets, upload_codes}
                      party -> server: {n_features, n_bins: int64[F], n_rows: {name: n},
                                        codes: {name: uint8|uint16[n, F]} (tee only)}
    boost.labels      server -> label party: {datasets};  label party -> server: {labels: {name: float64[n]}}
    boost.gradients   server -> party (party only): {tree, grad: float32[n], hess: float32[n],
                                                     features: int64[k] (this tree's columns)}
    boost.histograms  server -> party (party only): {tree, counts: int64[K], rows: int32[m] (absent: all)}
                      party -> server: {hist: float64[K, k, S, 2]} (grad, hess sums; slot S-1: missing)
    boost.partition   server -> split owner (party only): {tree, rows, counts, splits: int64[K, 3]}
                      party -> server: {left: packed bits[m]}
    boost.predict     server -> party: {dataset, splits: int64[k, 3] (feature, bin, default_left),
                                        ? model_id (a trained model's: the party's saved part must match)}
                      party -> server: {left: packed bits[k, n], n_rows}
    boost.finish      server -> party: {features: int64[] (its features the model uses),
                                        model_id (random per training run)}

In the ``"tee"`` placement a passive party receives ``boost.setup`` during training and
``boost.finish`` at the end, and ``boost.predict`` to score (training with a validation set needs
none: the server holds the validation codes). What is derived from the labels and reaches a passive
party is only the model itself: which of its features and bins the trees split on (``finish``,
``predict``). The server receives codes, histograms, bin counts and left/right bits: never a
feature value or a cut point; it keeps the tree structure and the leaf values (:class:`BoostedTrees`),
each party its cut points (:class:`PartyThresholds`), each sealed for its owner by the caller.

**Speed.** Histogram building, the split scan and the row partition are compiled loops when numba
is installed (the ``fast`` extra; histograms on ``ENCLAVEML_VFL_THREADS`` threads, default every
core), numpy otherwise (``ENCLAVEML_VFL_KERNELS=numpy`` forces it); both give bit-identical trees.
Only the smaller child of each split gets a histogram, the other is the parent's minus it.

Training: gradients of ``binary:logistic`` (labels in [0, 1]) or ``reg:squarederror``; ``base_score``
(a probability for the logistic loss, clipped to [1e-6, 1 - 1e-6] when estimated) or the mean
label; row sampling draws each row with probability ``subsample`` per tree and zeroes the gradients
of the others (as xgboost's CPU ``hist``); column sampling by tree, level and node keeps
``max(1, int(fraction * n))`` columns. With a validation set the metric (``logloss``, ``auc`` or
``rmse``) is recorded after every tree; early stopping keeps the trees up to the best one (a strict
improvement resets the count, as xgboost's callback).

Every answer is checked on the server (shapes, dtypes, ranges, finiteness, and that histograms and
partitions add up to the sums the labels give) and a bad one raises :class:`ProtocolError`.
"""

from __future__ import annotations

from enclaveml.fl.vertical._boost_model import BoostedTrees, PartyThresholds, Tree
from enclaveml.fl.vertical._boost_params import BoostingParams
from enclaveml.fl.vertical._boost_party import BoostingParty
from enclaveml.fl.vertical._boost_train import predict_boosting, train_boosting

__all__ = [
    "BoostedTrees",
    "BoostingParams",
    "BoostingParty",
    "PartyThresholds",
    "Tree",
    "predict_boosting",
    "train_boosting",
]
