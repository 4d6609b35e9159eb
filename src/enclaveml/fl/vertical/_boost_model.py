"""The two halves of a vertical boosted-trees model, and walking the trees.

- :class:`BoostedTrees`, the server's part: the tree structure, with each split named as
  (global feature, bin, default direction), and the leaf values. No threshold is in it.
- :class:`PartyThresholds`, one party's part: the cut points of those of its features that the
  model uses, so that it alone can answer "which of my rows go left at (feature, bin)".

Global feature ``i`` is feature ``i - offset[p]`` of party ``p`` where parties are in the order
of :attr:`BoostedTrees.parties` and ``offset`` is the cumulative sum of
:attr:`BoostedTrees.n_features`.

Both serialize with :func:`~enclaveml.fl.vertical._codec.encode` (canonical CBOR, arrays as RFC 8746
typed arrays), so each part can be sealed for its owner. Server part::

    {"format": "enclaveml-vfl-boosted-trees", "version": 1, "objective": text,
     "base_margin": float, "parties": [text], "n_features": [int], "max_bin": int,
     "best_iteration": int, "params": {text: value}, "evals": float64[],
     "trees": [{"feature": int32[n], "bin": int32[n], "default_left": uint8[n],
                "left": int32[n], "right": int32[n], "value": float32[n], "gain": float32[n]}]}

Party part::

    {"format": "enclaveml-vfl-party-thresholds", "version": 1, "party": text, "max_bin": int,
     "n_features": int, "features": int64[k], "cuts": [float64[..]] (one per used feature)}

In a tree, node 0 is the root; a leaf has ``feature == -1`` and ``left == right == -1``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from enclaveml.errors import ConfigurationError
from enclaveml.fl.vertical._binning import BinEdges
from enclaveml.fl.vertical._codec import decode, encode
from enclaveml.fl.vertical._errors import MessageError

__all__ = ["BoostedTrees", "PartyThresholds", "Tree", "split_table", "walk"]

_TREES_FORMAT = "enclaveml-vfl-boosted-trees"
_PARTY_FORMAT = "enclaveml-vfl-party-thresholds"
_VERSION = 1
_TREE_FIELDS = {
    "feature": np.int32,
    "bin": np.int32,
    "default_left": np.uint8,
    "left": np.int32,
    "right": np.int32,
    "value": np.float32,
    "gain": np.float32,
}


@dataclass(frozen=True)
class Tree:
    """One tree as parallel node arrays (see the module docstring)."""

    feature: np.ndarray
    bin: np.ndarray
    default_left: np.ndarray
    left: np.ndarray
    right: np.ndarray
    value: np.ndarray
    gain: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.feature)
        if n == 0 or any(len(getattr(self, k)) != n for k in _TREE_FIELDS):
            raise ConfigurationError("a tree needs at least one node and equally long node arrays")
        for name, dtype in _TREE_FIELDS.items():
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=dtype))
        internal = self.feature >= 0
        children_ok = (
            (self.left[internal] > np.flatnonzero(internal)).all()
            and (self.right[internal] > np.flatnonzero(internal)).all()
            and (self.left[internal] < n).all()
            and (self.right[internal] < n).all()
            and (self.left[~internal] == -1).all()
            and (self.right[~internal] == -1).all()
        )
        if not children_ok:
            raise ConfigurationError("tree children must come after their parent and leaves have none")

    @property
    def n_nodes(self) -> int:
        return len(self.feature)

    @property
    def depth(self) -> int:
        depth = np.zeros(self.n_nodes, dtype=np.int64)
        for node in np.flatnonzero(self.feature >= 0):  # parents come before children
            depth[self.left[node]] = depth[self.right[node]] = depth[node] + 1
        return int(depth.max())

    def to_payload(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in _TREE_FIELDS}

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Tree:
        arrays = {}
        for name in _TREE_FIELDS:
            value = payload.get(name)
            if not isinstance(value, np.ndarray) or value.ndim != 1:
                raise MessageError(f"tree field {name!r} missing or not a 1-D array")
            arrays[name] = value
        return cls(**arrays)


@dataclass(frozen=True)
class BoostedTrees:
    """The server's part of a model: structure and leaf values, no thresholds."""

    objective: str
    base_margin: float
    parties: tuple[str, ...]
    n_features: tuple[int, ...]
    max_bin: int
    trees: tuple[Tree, ...]
    best_iteration: int
    params: Mapping[str, Any] = field(default_factory=dict)
    evals: tuple[float, ...] = ()
    """The validation metric after each tree trained (also those dropped by early stopping)."""
    model_id: str = ""
    """Random per training run, recorded in every party's part too: prediction refuses a part of
    another run (empty in models from before the binding, which check nothing)."""

    def __post_init__(self) -> None:
        if len(self.parties) != len(self.n_features) or len(set(self.parties)) != len(self.parties):
            raise ConfigurationError("one feature count per party, party names unique")
        total = sum(self.n_features)
        for tree in self.trees:
            if (tree.feature >= total).any():
                raise ConfigurationError("a tree splits on a feature no party has")
        if not -1 <= self.best_iteration < max(len(self.trees), 1):
            raise ConfigurationError("best_iteration must index a tree")

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.n_features, dtype=np.int64)])

    def owner(self, feature: np.ndarray) -> np.ndarray:
        """The party index of each global feature."""
        return np.searchsorted(self.offsets, feature, side="right") - 1

    def used_features(self, party: str) -> np.ndarray:
        """The party's own (local) indices of its features that some split uses."""
        p = self.parties.index(party)
        lo, hi = self.offsets[p], self.offsets[p + 1]
        used = np.unique(np.concatenate([t.feature for t in self.trees] + [np.empty(0, np.int32)]))
        mine: np.ndarray = (used[(used >= lo) & (used < hi)] - lo).astype(np.int64)
        return mine

    def to_bytes(self) -> bytes:
        return encode(
            {
                "format": _TREES_FORMAT,
                "version": _VERSION,
                "objective": self.objective,
                "base_margin": float(self.base_margin),
                "parties": list(self.parties),
                "n_features": list(self.n_features),
                "max_bin": self.max_bin,
                "best_iteration": self.best_iteration,
                "params": dict(self.params),
                "trees": [t.to_payload() for t in self.trees],
                "evals": np.asarray(self.evals, dtype=np.float64),
                "model_id": self.model_id,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> BoostedTrees:
        message = decode(data, max_items=None)  # a stored model, read once unsealed
        if message.get("format") != _TREES_FORMAT or message.get("version") != _VERSION:
            raise MessageError("not a version-1 boosted-trees model")
        try:
            return cls(
                objective=str(message["objective"]),
                base_margin=float(message["base_margin"]),
                parties=tuple(str(p) for p in message["parties"]),
                n_features=tuple(int(n) for n in message["n_features"]),
                max_bin=int(message["max_bin"]),
                trees=tuple(Tree.from_payload(t) for t in message["trees"]),
                best_iteration=int(message["best_iteration"]),
                params=dict(message.get("params", {})),
                evals=tuple(float(v) for v in message.get("evals", ())),
                model_id=str(message.get("model_id", "")),
            )
        except (KeyError, TypeError, ValueError, ConfigurationError) as exc:
            raise MessageError(f"malformed boosted-trees model: {type(exc).__name__}") from None


@dataclass(frozen=True)
class PartyThresholds:
    """A party's part of a model: cut points of the features the model uses (local indices)."""

    party: str
    n_features: int
    features: np.ndarray
    edges: BinEdges
    model_id: str = ""  # the server model's (BoostedTrees.model_id)

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", np.asarray(self.features, dtype=np.int64))
        if len(self.features) != self.edges.n_features:
            raise ConfigurationError("one set of cut points per used feature")
        if len(self.features) and (self.features.min() < 0 or self.features.max() >= self.n_features):
            raise ConfigurationError("used features must be among the party's features")
        if (np.diff(self.features) <= 0).any():
            raise ConfigurationError("used features must be sorted and distinct")

    def to_bytes(self) -> bytes:
        return encode(
            {
                "format": _PARTY_FORMAT,
                "version": _VERSION,
                "party": self.party,
                "max_bin": self.edges.max_bin,
                "n_features": self.n_features,
                "features": self.features,
                "cuts": list(self.edges.cuts),
                "model_id": self.model_id,
            }
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> PartyThresholds:
        message = decode(data, max_items=None)  # a stored model, read once unsealed
        if message.get("format") != _PARTY_FORMAT or message.get("version") != _VERSION:
            raise MessageError("not a version-1 party-thresholds model")
        try:
            cuts = tuple(np.asarray(c, dtype=np.float64) for c in message["cuts"])
            return cls(
                party=str(message["party"]),
                n_features=int(message["n_features"]),
                features=np.asarray(message["features"], dtype=np.int64),
                edges=BinEdges(int(message["max_bin"]), cuts),
                model_id=str(message.get("model_id", "")),
            )
        except (KeyError, TypeError, ValueError, ConfigurationError) as exc:
            raise MessageError(f"malformed party thresholds: {type(exc).__name__}") from None


def split_table(trees: Sequence[Tree]) -> tuple[np.ndarray, list[np.ndarray]]:
    """The distinct (global feature, bin, default_left) triples of ``trees``, and per tree the
    triple index of each node (-1 for leaves)."""
    if not trees:
        return np.empty((0, 3), dtype=np.int64), []
    stacked = np.concatenate(
        [np.stack([t.feature, t.bin, t.default_left.astype(np.int32)], axis=1) for t in trees]
    ).astype(np.int64)
    internal = stacked[:, 0] >= 0
    table, inverse = np.unique(stacked[internal], axis=0, return_inverse=True)
    index = np.full(len(stacked), -1, dtype=np.int64)
    index[internal] = inverse.ravel()
    bounds = np.cumsum([0] + [t.n_nodes for t in trees])
    return table, [index[a:b] for a, b in itertools.pairwise(bounds)]


def walk(tree: Tree, slots: np.ndarray, left_bits: np.ndarray, n_rows: int) -> np.ndarray:
    """The leaf each row reaches: ``left_bits`` (triples x rows, bool) says which rows go left
    at each triple and ``slots`` gives each node's triple (from :func:`split_table`)."""
    node = np.zeros(n_rows, dtype=np.int64)
    rows = np.arange(n_rows)
    active = rows
    while len(active):
        at = node[active]
        splitting = tree.feature[at] >= 0
        active, at = active[splitting], at[splitting]
        if not len(active):
            break
        go_left = left_bits[slots[at], active]
        node[active] = np.where(go_left, tree.left[at], tree.right[at])
    return node
