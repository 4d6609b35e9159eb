"""Servers lift the soft limit on open files to the hard limit (1024 lets a thousand slow clients in)."""

from __future__ import annotations

import subprocess
import sys


def _in_child(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60
    ).stdout.strip()


def test_the_soft_limit_is_raised_to_the_hard_limit() -> None:
    out = _in_child(
        "import resource\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "from enclaveml._web import raise_open_file_limit\n"
        "now = raise_open_file_limit()\n"
        "print(now, resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard, sep=',')\n"
    )
    now, soft, hard = (int(v) for v in out.split(","))
    assert now == soft > 256
    assert soft == (1 << 20 if hard == -1 else hard)


def test_an_ratls_server_config_raises_it() -> None:
    out = _in_child(
        "import resource\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "from fastapi import FastAPI\n"
        "from enclaveml._web import uvicorn_config\n"
        "from enclaveml.attestation import create_ratls_certificate\n"
        "from enclaveml.attestation.simulation import SimulationKey, SimulationProvider\n"
        "provider = SimulationProvider(key=SimulationKey.generate(), entry_point='t')\n"
        "ratls = create_ratls_certificate(provider)\n"
        "with uvicorn_config(FastAPI(), ratls, host='127.0.0.1', port=0):\n"
        "    print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    assert int(out) > 256
