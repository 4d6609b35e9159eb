"""Parquet modular encryption with master keys in the real broker (HTTPS on 127.0.0.1, simulation TEE)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from enclaveml.attestation.simulation import SimulationKey, SimulationProvider, SimulationVerifier
from enclaveml.attestation.verifier import EvidenceVerifier
from enclaveml.errors import ConfigurationError, DecryptionError, KeyReleaseDeniedError
from enclaveml.kms import parquet as kp
from enclaveml.kms._rootkey import RootKey
from tests.integration.test_kms_release import CANARY, RunningBroker, allow_only, running_broker

COLUMN_KEYS = {"pii": ["name", "notes"]}


@pytest.fixture
def broker(
    tmp_path: Path, sim_verifier: SimulationVerifier, sim_provider: SimulationProvider
) -> Iterator[RunningBroker]:
    with running_broker(
        tmp_path / "db" / "kbs.db",
        RootKey.generate(),
        EvidenceVerifier(simulation=sim_verifier),
        tmp_path / "tls",
    ) as running:
        with running.admin() as admin:
            admin.create_key("footer", allow_only(sim_provider))
            admin.create_key("pii", allow_only(sim_provider))
        yield running


@pytest.fixture
def table() -> pa.Table:
    return pa.table(
        {
            "name": ["alice", "bob", "carol"],
            "age": [31, 42, 27],
            "notes": [CANARY.decode(), "n/a", "vip"],
        }
    )


def _write(broker: RunningBroker, table: pa.Table, path: Path) -> None:
    with broker.admin() as admin:
        pq.write_table(
            table, path, encryption_properties=kp.encryption_properties(admin, "footer", COLUMN_KEYS)
        )


def test_write_and_read_back_with_footer_and_column_keys(
    tmp_path: Path, broker: RunningBroker, sim_provider: SimulationProvider, table: pa.Table
) -> None:
    path = tmp_path / "people.parquet"
    _write(broker, table, path)
    raw = path.read_bytes()
    assert CANARY not in raw
    assert b"alice" not in raw
    with pytest.raises(OSError, match="encrypted"):
        pq.read_table(path)  # no keys, no footer
    with broker.client(sim_provider) as reader:
        assert pq.read_table(path, decryption_properties=kp.decryption_properties(reader)).equals(table)
        # The broker was asked once per master key, not once per column or page.
        assert reader.cached_versions == [("footer", 1), ("pii", 1)]


def test_dataset_write_and_scan(
    tmp_path: Path, broker: RunningBroker, sim_provider: SimulationProvider, table: pa.Table
) -> None:
    out = tmp_path / "dataset"
    with broker.admin() as admin:
        ds.write_dataset(
            table,
            out,
            format="parquet",
            file_options=kp.dataset_write_options(admin, "footer", COLUMN_KEYS),
            max_rows_per_file=2,
            max_rows_per_group=2,
        )
    assert len(list(out.glob("*.parquet"))) == 2
    with broker.client(sim_provider) as reader:
        scanned = ds.dataset(out, format=kp.dataset_format(reader)).to_table()
    assert scanned.sort_by("age").equals(table.sort_by("age"))


def test_reader_whose_policy_fails_gets_no_rows(
    tmp_path: Path, broker: RunningBroker, sim_key: SimulationKey, table: pa.Table
) -> None:
    path = tmp_path / "people.parquet"
    _write(broker, table, path)
    stranger = SimulationProvider(key=sim_key, entry_point="tests", config={"purpose": "exfiltration"})
    rows: list[object] = []
    with broker.client(stranger) as reader:
        with pytest.raises(KeyReleaseDeniedError) as denied:
            rows.append(pq.read_table(path, decryption_properties=kp.decryption_properties(reader)))
        assert denied.value.rule == "measurement"
        with pytest.raises(KeyReleaseDeniedError):
            rows.append(ds.dataset(path, format=kp.dataset_format(reader)).to_table())
    assert rows == []
    assert CANARY.decode() not in str(denied.value)


def test_wrapped_key_string_is_bound_to_its_master_key() -> None:
    class Echo:
        def wrap_data_key(self, key_id: str, data_key: bytes, aad: bytes) -> tuple[int, bytes]:
            return 3, b"\x01" * 40

        def unwrap_data_key(self, key_id: str, version: int, wrapped: bytes, aad: bytes) -> bytes:
            assert (key_id, version, wrapped) == ("team:footer", 3, b"\x01" * 40)
            return b"k" * 16

    kms = kp.BrokerKmsClient(wrapper=Echo(), unwrapper=Echo())
    text = kms.wrap_key(b"k" * 16, "team:footer")
    assert text.startswith("kbs1:3:team:footer:")
    assert kms.unwrap_key(text, "team:footer") == b"k" * 16
    for bad, master in (
        (text, "other"),
        ("kbs0:1:x:AAAA", "x"),
        ("kbs1:x:y:AAAA", "y"),
        ("kbs1:1:y:!!", "y"),
    ):
        with pytest.raises(DecryptionError):
            kms.unwrap_key(bad, master)
    with pytest.raises(ConfigurationError):
        kp.BrokerKmsClient(unwrapper=Echo()).wrap_key(b"k" * 16, "footer")


def test_the_whole_file_helpers_leave_no_column_in_the_clear_unasked(
    tmp_path: Path, broker: RunningBroker, sim_provider: SimulationProvider, table: pa.Table
) -> None:
    path = tmp_path / "people.parquet"
    with broker.admin() as admin:
        # "age" is under no column key: pyarrow would write it in plaintext (and the property
        # helpers still do, as the test above shows).
        with pytest.raises(ConfigurationError, match=r"\['age'\].*plaintext"):
            kp.write_table(table, path, admin, "footer", COLUMN_KEYS)
        assert not path.exists()
        kp.write_table(table, path, admin, "footer", {"pii": ["name", "notes", "age"]}, compression="none")
        raw = path.read_bytes()
        kp.write_table(
            table,
            tmp_path / "clear-age.parquet",
            admin,
            "footer",
            COLUMN_KEYS,
            plaintext_columns=["age"],
            compression="none",
        )
        kp.write_dataset(table, tmp_path / "dataset", admin, "footer")  # uniform: every column encrypted
    ages = b"".join(age.to_bytes(8, "little") for age in (31, 42, 27))
    assert ages in (tmp_path / "clear-age.parquet").read_bytes()  # asked for: in the clear
    assert b"alice" not in raw
    assert ages not in raw
    with broker.client(sim_provider) as reader:
        assert kp.read_table(path, reader).equals(table)
        assert kp.open_dataset(tmp_path / "dataset", reader).to_table().equals(table)


def test_the_readers_refuse_an_unencrypted_file_put_in_place_of_or_beside_encrypted_ones(
    tmp_path: Path, broker: RunningBroker, sim_provider: SimulationProvider, table: pa.Table
) -> None:
    forged = pa.table({"name": ["mallory"], "age": [99], "notes": ["injected"]})
    path = tmp_path / "people.parquet"
    pq.write_table(forged, path)  # the host's own, unencrypted, where an encrypted file was expected
    dataset_dir = tmp_path / "dataset"
    with broker.admin() as admin:
        kp.write_dataset(table, dataset_dir, admin, "footer", COLUMN_KEYS, plaintext_columns=["age"])
    pq.write_table(forged, dataset_dir / "zz-injected.parquet")
    with broker.client(sim_provider) as reader:
        # What the property helpers alone would do: read the forged rows without asking for a key.
        assert pq.read_table(path, decryption_properties=kp.decryption_properties(reader)).equals(forged)
        with pytest.raises(DecryptionError, match="not encrypted"):
            kp.read_table(path, reader)
        (tmp_path / "empty.parquet").write_bytes(b"")
        with pytest.raises(DecryptionError):
            kp.read_table(tmp_path / "empty.parquet", reader)
        assert reader.cached_versions == []  # no key was released for any of it
        with pytest.raises(DecryptionError, match=r"zz-injected\.parquet.*not encrypted"):
            kp.open_dataset(dataset_dir, reader)


def test_nested_columns_are_checked_leaf_by_leaf_and_a_filesystem_is_honoured(
    tmp_path: Path, broker: RunningBroker, sim_provider: SimulationProvider
) -> None:
    nested = pa.table(
        {
            "id": [1, 2],
            "person": [{"name": "alice", "ssn": "123-45-6789"}, {"name": "bob", "ssn": "987-65-4321"}],
            "geo.lat": [1.5, 2.5],
        }
    )
    path = tmp_path / "nested.parquet"
    with broker.admin() as admin:
        with pytest.raises(ConfigurationError, match=r"person\.ssn"):  # one field of the group keyed
            kp.write_table(nested, path, admin, "footer", {"pii": ["id", "person.name", "geo.lat"]})
        kp.write_table(
            nested, path, admin, "footer", {"pii": ["id", "person", "geo.lat"]}, compression="none"
        )
    assert b"123-45-6789" not in path.read_bytes()  # a listed group is encrypted whole
    with broker.client(sim_provider) as reader:
        local = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
        assert kp.read_table("nested.parquet", reader, filesystem=local).equals(nested)
