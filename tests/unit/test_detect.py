"""TEE detection and provider selection by name; simulation only ever by explicit request."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from enclaveml.attestation.evidence import EvidenceProvider, TeeType
from enclaveml.attestation.providers import (
    PROVIDER_NAMES,
    GramineProvider,
    TsmProvider,
    detect,
    provider_by_name,
)
from enclaveml.errors import ConfigurationError, TEENotAvailableError


@pytest.fixture
def gramine_root(tmp_path: Path) -> Path:
    return tmp_path / "dev" / "attestation"


@pytest.fixture
def tsm_root(tmp_path: Path) -> Path:
    return tmp_path / "sys" / "kernel" / "config" / "tsm" / "report"


def test_gramine_is_preferred_when_both_interfaces_exist(gramine_root: Path, tsm_root: Path) -> None:
    gramine_root.mkdir(parents=True)
    tsm_root.mkdir(parents=True)

    provider = detect(gramine_root=gramine_root, tsm_root=tsm_root)

    assert isinstance(provider, GramineProvider)
    assert provider.root == gramine_root
    assert provider.tee is TeeType.SGX


def test_tsm_is_chosen_when_only_configfs_exists(gramine_root: Path, tsm_root: Path) -> None:
    tsm_root.mkdir(parents=True)

    provider = detect(gramine_root=gramine_root, tsm_root=tsm_root)

    assert isinstance(provider, TsmProvider)
    assert provider.root == tsm_root


def test_no_tee_raises_and_never_falls_back_to_simulation(gramine_root: Path, tsm_root: Path) -> None:
    with pytest.raises(TEENotAvailableError) as info:
        detect(gramine_root=gramine_root, tsm_root=tsm_root)

    message = str(info.value)
    assert str(gramine_root) in message
    assert str(tsm_root) in message
    assert "never selected automatically" in message
    assert "--tee simulation" in message
    assert "provider_by_name('simulation')" in message


def test_a_file_at_a_root_path_does_not_count_as_an_interface(gramine_root: Path, tsm_root: Path) -> None:
    gramine_root.parent.mkdir(parents=True)
    gramine_root.write_text("")

    with pytest.raises(TEENotAvailableError):
        detect(gramine_root=gramine_root, tsm_root=tsm_root)


def test_auto_by_name_is_detect(gramine_root: Path, tsm_root: Path) -> None:
    tsm_root.mkdir(parents=True)
    assert isinstance(provider_by_name("auto", gramine_root=gramine_root, tsm_root=tsm_root), TsmProvider)

    with pytest.raises(TEENotAvailableError):
        provider_by_name("auto", gramine_root=gramine_root, tsm_root=tsm_root / "absent")


def test_gramine_and_tsm_by_name(gramine_root: Path, tsm_root: Path) -> None:
    gramine_root.mkdir(parents=True)
    tsm_root.mkdir(parents=True)

    gramine = provider_by_name("gramine", root=gramine_root)
    tsm = provider_by_name(" TSM ", root=tsm_root, max_attempts=5, privlevel=0)

    assert isinstance(gramine, GramineProvider)
    assert isinstance(tsm, TsmProvider)
    assert isinstance(gramine, EvidenceProvider)
    # No isinstance check on ``tsm`` here: on Python 3.11 it would evaluate the ``tee``
    # property, which probes the (here empty, non-kernel) configfs tree; see test_tsm_provider.


@pytest.mark.parametrize("name", ["tdx", "sev-snp", "TDX"])
def test_tee_specific_aliases_build_a_tsm_provider(tsm_root: Path, name: str) -> None:
    tsm_root.mkdir(parents=True)
    assert isinstance(provider_by_name(name, root=tsm_root), TsmProvider)


def test_tee_specific_alias_refuses_a_conflicting_expected_tee(tsm_root: Path) -> None:
    tsm_root.mkdir(parents=True)
    with pytest.raises(ConfigurationError, match="expected_tee"):
        provider_by_name("tdx", root=tsm_root, expected_tee=TeeType.SEV_SNP)


def test_hardware_providers_by_name_fail_without_their_interface(tmp_path: Path) -> None:
    with pytest.raises(TEENotAvailableError):
        provider_by_name("gramine", root=tmp_path / "absent")
    with pytest.raises(TEENotAvailableError):
        provider_by_name("tsm", root=tmp_path / "absent")


def test_unknown_name_lists_the_valid_names() -> None:
    with pytest.raises(ConfigurationError, match="unknown evidence provider 'sgx-epid'") as info:
        provider_by_name("sgx-epid")
    for name in PROVIDER_NAMES:
        assert name in str(info.value)


def test_unknown_option_is_a_configuration_error(gramine_root: Path) -> None:
    gramine_root.mkdir(parents=True)
    with pytest.raises(ConfigurationError, match="accepted options: root"):
        provider_by_name("gramine", root=gramine_root, max_attempts=2)


def test_private_options_are_refused(tsm_root: Path) -> None:
    tsm_root.mkdir(parents=True)
    with pytest.raises(ConfigurationError, match="private"):
        provider_by_name("tsm", root=tsm_root, _tree=None)


def test_simulation_only_by_name(tmp_path: Path) -> None:
    simulation = pytest.importorskip("enclaveml.attestation.simulation")

    provider = provider_by_name("simulation", key_path=tmp_path / "sim.key")

    assert isinstance(provider, simulation.SimulationProvider)
    assert provider.tee is TeeType.SIMULATION


def test_importing_providers_does_not_load_the_simulation_backend() -> None:
    # A fresh interpreter: other tests in this process may already have imported it.
    code = (
        "import sys, enclaveml.attestation.providers; "
        "sys.exit('enclaveml.attestation.simulation' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr or "simulation backend was imported eagerly"
