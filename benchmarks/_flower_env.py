"""A separate, cached venv with Flower for the FL aggregation benchmark: ``benchmarks/.venv-flwr``.

Why separate: ``flwr`` pins fastapi, uvicorn, typer and rich to versions that conflict with
ours, so it never goes into ``.venv``. The venv is created once (about a minute) with
``flwr==FLWR_VERSION`` and *our* numpy version, so both sides generate identical data from the
same seed; a marker file records what was installed and a mismatch rebuilds it.

If pip's resolver cannot satisfy Flower's own pins from the configured index (flwr 1.42.0
requires ``certifi>=2026.10.19``, newer than some mirrors carry), the fallback installs Flower's
declared requirements with only that certifi bound dropped (certifi is the CA bundle; nothing
measured here opens a connection), then the flwr wheel with ``--no-deps``. The result says which
path was taken.
"""

from __future__ import annotations

import email.parser
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

FLWR_VERSION = "1.42.0"
VENV = Path(__file__).resolve().parent / ".venv-flwr"
_MARKER = VENV / ".enclaveml-benchmark.json"


def python() -> Path:
    return VENV / "bin" / "python"


def ensure() -> dict[str, str]:
    """Create or reuse the Flower venv; return what is installed in it."""
    wanted = {"flwr": FLWR_VERSION, "numpy": np.__version__}
    if _MARKER.exists():
        recorded: dict[str, str] = json.loads(_MARKER.read_text())
        if {k: recorded.get(k) for k in wanted} == wanted and python().exists():
            return recorded
    if VENV.exists():
        shutil.rmtree(VENV)
    print(f"creating {VENV} with flwr=={FLWR_VERSION} (once; about a minute)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(python()), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    pins = [f"flwr=={FLWR_VERSION}", f"numpy=={np.__version__}"]
    if subprocess.run([*pip, *pins], check=False).returncode == 0:
        how = "pip resolver"
    else:
        how = _install_relaxing_certifi(pip)
    recorded = {**wanted, "install": how}
    _MARKER.write_text(json.dumps(recorded) + "\n")
    return recorded


def _install_relaxing_certifi(pip: list[str]) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        download = [str(python()), "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp]
        subprocess.run([*download, f"flwr=={FLWR_VERSION}"], check=True)
        wheel = next(Path(tmp).glob("flwr-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
            metadata = email.parser.Parser().parsestr(archive.read(name).decode())
        requirements = [r for r in metadata.get_all("Requires-Dist") or [] if "extra ==" not in r]
        relaxed = ["certifi" if r.replace(" ", "").startswith("certifi") else r for r in requirements]
        relaxed = [r for r in relaxed if not r.replace(" ", "").startswith("numpy")]
        subprocess.run([*pip, f"numpy=={np.__version__}", *relaxed], check=True)
        subprocess.run([*pip, "--no-deps", str(wheel)], check=True)
    return "fallback: Flower's requirements without the certifi lower bound, flwr --no-deps"


if __name__ == "__main__":
    print(json.dumps(ensure()))
