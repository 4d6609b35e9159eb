"""A process of the multi-process vertical-FL test: the server or a party (``python -m tests.vfl_process``).

Every process builds the same synthetic data from the same seed and keeps only its own part:
a party its columns (the label party also the labels), the server nothing. After the job each
process writes what it *received* to ``--out`` (CBOR: a list of [method, bytes]), which only a
test does; the test then decodes those bytes and asserts on them.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
from sklearn.datasets import make_classification

from enclaveml.attestation import AllOf, MeasurementAllowlist, UnsafeAllowSimulation
from enclaveml.attestation.simulation import SimulationKey, SimulationProvider, SimulationVerifier
from enclaveml.fl.vertical import jobs
from enclaveml.fl.vertical._session import VerticalSession, token_sha256
from enclaveml.fl.vertical.party import ServerConnection
from enclaveml.fl.vertical.plan import VerticalPlan
from enclaveml.fl.vertical.server import serve_vertical

ENTRY_POINT = "enclaveml vfl server"
ROWS, FEATURES, SEED = 3000, 12, 11


def dataset() -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """The joint data (which no single process keeps whole) and each party's column indices."""
    x, y = make_classification(
        n_samples=ROWS, n_features=FEATURES, n_informative=8, random_state=SEED, flip_y=0.02
    )
    return x, y, np.array_split(np.arange(FEATURES), 3)


def server(args: argparse.Namespace) -> int:
    plan = VerticalPlan.from_dict(json.loads(Path(args.plan).read_text()))
    tokens = json.loads(Path(args.tokens).read_text())
    key = SimulationKey.load_or_create(Path(args.sim_key))
    provider = SimulationProvider(key=key, entry_point=ENTRY_POINT, config=plan.to_dict())
    session = VerticalSession(
        plan, {p: token_sha256(t) for p, t in tokens.items()}, jobs.server_job(plan), connect_timeout_s=60,
        record=True,
    )  # fmt: skip
    running = serve_vertical(session, provider, port=args.port)
    print(f"ready {running.url}", flush=True)
    session.wait(300)
    running.stop(timeout=5)
    received = [[name, e.method, e.response] for name, ch in session.channels.items() for e in ch.transcript]
    Path(args.out).write_bytes(cbor2.dumps({"state": session.state, "received": received}))
    return 0 if session.state == "succeeded" else 2


def party(args: argparse.Namespace) -> int:
    plan = VerticalPlan.from_dict(json.loads(Path(args.plan).read_text()))
    x, y, columns = dataset()
    index = plan.parties.index(args.name)
    labels = y if index == 0 else None
    endpoint, part = jobs.party_for_training(plan, args.name, x[:, columns[index]], labels)
    key = SimulationKey.load_or_create(Path(args.sim_key))
    measurement = SimulationProvider(key=key, entry_point=ENTRY_POINT, config=plan.to_dict()).measurement
    with ServerConnection(
        args.url,
        credential=args.token,
        policy=UnsafeAllowSimulation(AllOf(MeasurementAllowlist([measurement]))),
        verifier=SimulationVerifier(key.public_key()),
        expected_plan=plan,
        wait_for_server_s=60,
    ) as connection:
        outcome = connection.serve(endpoint, record=True)
    received = [[e.method, e.request] for e in outcome.transcript]
    Path(args.out).write_bytes(cbor2.dumps({"state": outcome.state, "received": received, "part": part()}))
    return 0 if outcome.succeeded else 2


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server")
    s.add_argument("--plan", required=True)
    s.add_argument("--tokens", required=True)
    s.add_argument("--port", type=int, required=True)
    p = sub.add_parser("party")
    p.add_argument("--plan", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--url", required=True)
    for each in (s, p):
        each.add_argument("--sim-key", required=True)
        each.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    return server(args) if args.role == "server" else party(args)


def new_tokens(parties: list[str]) -> dict[str, Any]:
    return {p: secrets.token_urlsafe(16) for p in parties}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
