"""deploy/gramine's manifest template keeps the properties the enclave's security rests on.

Gramine itself is not on the test machines, so this renders the template with Jinja (what
``gramine-manifest`` does, with stand-ins for its ``gramine`` and ``python`` helpers), parses the
TOML and checks what a careless edit could break: a production enclave with DCAP attestation, a
command line and environment the host cannot change, temporary files in enclave memory, every
piece of code a trusted (measured) file, and only the sealed directory readable unmeasured.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jinja2
import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "gramine"
VARIABLES = {
    "entrypoint": "/usr/bin/python3.11",
    "arch_libdir": "/lib/x86_64-linux-gnu",
    "log_level": "error",
    "venv": "/opt/enclaveml/venv",
    "site_packages": "/opt/enclaveml/venv/lib/python3.11/site-packages",
    "config_dir": "/srv/enclaveml-config",
    "sealed_dir": "/srv/sealed",
    "enclave_size": "8G",
    "max_threads": "64",
    "threads": "4",
    "edmm": "0",
}


def _render(**overrides: str) -> dict[str, Any]:
    gramine = SimpleNamespace(libos="/usr/lib/x86_64-linux-gnu/gramine/libsysdb.so", runtimedir=lambda: "/rt")
    python = SimpleNamespace(stdlib="/usr/lib/python3.11", distlib="/usr/lib/python3/dist-packages")
    environment = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    template = environment.from_string((DEPLOY / "enclaveml.manifest.template").read_text())
    return tomllib.loads(template.render(gramine=gramine, python=python, **{**VARIABLES, **overrides}))


def test_a_production_enclave_with_dcap_attestation() -> None:
    manifest = _render()
    assert manifest["sgx"]["debug"] is False
    assert manifest["sgx"]["remote_attestation"] == "dcap"  # what GramineProvider needs
    assert manifest["loader"]["log_level"] == "error"  # other levels may log secrets
    assert manifest["sgx"]["edmm_enable"] is False
    assert _render(edmm="1")["sgx"]["edmm_enable"] is True


def test_the_host_controls_neither_the_command_line_nor_the_environment() -> None:
    loader = _render()["loader"]
    assert not any(key.startswith("insecure__") for key in loader)
    assert loader["argv_src_file"] == "file:enclaveml.args"
    assert "file:enclaveml.args" in _render()["sgx"]["trusted_files"]
    assert all(isinstance(value, str) for value in loader["env"].values())  # no passthrough


def test_code_and_configuration_are_measured_and_only_sealed_files_are_not() -> None:
    manifest = _render()
    trusted = set(manifest["sgx"]["trusted_files"])
    for path in (
        "/usr/bin/python3.11",
        "/usr/lib/python3.11/",
        "/opt/enclaveml/venv/",
        "/srv/enclaveml-config/",
    ):
        assert f"file:{path}" in trusted
    assert manifest["sgx"]["allowed_files"] == ["file:/srv/sealed/"]
    mounts = {m["path"]: m for m in manifest["fs"]["mounts"]}
    assert mounts["/tmp"]["type"] == "tmpfs"  # ORT's and quantisation's temporary files
    assert mounts["/sealed"]["uri"] == "file:/srv/sealed"
    assert manifest["loader"]["env"]["PYTHONPATH"] == VARIABLES["site_packages"]


def test_every_variable_is_defined() -> None:
    with pytest.raises(jinja2.UndefinedError):
        _render(**{"sealed_dir": jinja2.StrictUndefined()})  # type: ignore[dict-item]
    names = set(re.findall(r"-D(\w+)=", (DEPLOY / "Makefile").read_text()))
    used = set(re.findall(r"{{\s*(\w+)\s*}}", (DEPLOY / "enclaveml.manifest.template").read_text()))
    assert used - {"gramine", "python"} <= names  # the Makefile passes each one


def test_the_default_command_line_is_a_real_tee_serve() -> None:
    makefile = (DEPLOY / "Makefile").read_text()
    default = re.search(r"^ARGS \?= (.*?)(?<!\\)\n", makefile, re.S | re.M)
    assert default is not None
    words = shlex.split(default.group(1).replace("\\\n", " "))
    assert words[:3] == ["serve", "--tee", "gramine"]
    assert "simulation" not in words
