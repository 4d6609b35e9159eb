"""The aggregator process of the kill -9 test.

Usage: ``python -m tests.fl_aggregator_process PORT DIR REGISTRY SIMKEY``.

Runs :func:`digits_aggregator` (FedAvg, 5 clients, 10 rounds) on the simulation TEE over RA-TLS on
127.0.0.1:PORT, sealing checkpoints into DIR under ``$ENCLAVEML_TEST_FL_KEY`` (hex; a real
aggregator gets its key from the key broker), resuming from the last one. Prints ``ready`` and
serves until killed. The ready line is ``ready <resumed_from> <measurement hex>``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

from enclaveml.attestation.simulation import SimulationKey, SimulationProvider
from enclaveml.crypto import KeyHandle
from enclaveml.fl._checkpoint import CheckpointStore
from enclaveml.fl.aggregator import Aggregator
from enclaveml.fl.server import serve_aggregator
from enclaveml.fl.strategies import FedAvg
from tests.fl_digits import initial_weights

ENTRY_POINT = "enclaveml fl aggregator"


def digits_aggregator(checkpoints: CheckpointStore | None = None) -> Aggregator:
    return Aggregator(
        FedAvg(),
        initial_weights(0),
        rounds=10,
        min_clients=5,
        round_timeout_s=60.0,
        model_id="digits-mlp",
        checkpoints=checkpoints,
    )


def main(port: int, directory: Path, registry: Path, sim_key: Path) -> None:
    key = KeyHandle("fl-checkpoint", 1, bytes.fromhex(os.environ["ENCLAVEML_TEST_FL_KEY"]))
    aggregator = digits_aggregator(CheckpointStore(directory, key))
    for client_id, digest in json.loads(registry.read_text())["clients"].items():
        aggregator.enrol_hashed(client_id, bytes.fromhex(digest))
    provider = SimulationProvider(
        key=SimulationKey.load_or_create(sim_key), entry_point=ENTRY_POINT, config=aggregator.plan.to_dict()
    )
    serve_aggregator(aggregator, provider, port=port)
    print(f"ready {aggregator.resumed_from or 0} {provider.measurement.hex()}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
