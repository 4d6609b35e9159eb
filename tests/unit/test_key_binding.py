"""Fresh key bindings (the per-request form of RA-TLS evidence): key, nonce and evidence checks."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from enclaveml.attestation import default_policy
from enclaveml.attestation.ratls import bind_public_key, spki_der, verify_key_binding
from enclaveml.errors import BindingError, PolicyRejectedError, VerificationError


@pytest.fixture
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def test_binding_round_trip_with_nonce(key, sim_provider, sim_verifier, sim_policy) -> None:
    binding = bind_public_key(sim_provider, key.public_key(), nonce=b"n" * 32)
    claims, nonce = verify_key_binding(
        binding.evidence,
        public_key_spki=spki_der(key.public_key()),
        verifier=sim_verifier,
        policy=sim_policy,
        nonce=b"n" * 32,
    )
    assert nonce == b"n" * 32
    assert claims.measurement == sim_provider.measurement


@pytest.mark.parametrize("hash_alg", ["sha-256", "sha-384", "sha-512"])
def test_every_interoperable_hash_algorithm(hash_alg, key, sim_provider, sim_verifier, sim_policy) -> None:
    binding = bind_public_key(sim_provider, key.public_key(), hash_alg=hash_alg)
    verify_key_binding(
        binding.evidence, public_key_spki=spki_der(key.public_key()), verifier=sim_verifier, policy=sim_policy
    )


def test_other_nonce_other_key_tampering_and_policy(key, sim_provider, sim_verifier, sim_policy) -> None:
    binding = bind_public_key(sim_provider, key.public_key(), nonce=b"a" * 16)
    spki = spki_der(key.public_key())
    with pytest.raises(BindingError, match="nonce"):
        verify_key_binding(
            binding.evidence, public_key_spki=spki, verifier=sim_verifier, policy=sim_policy, nonce=b"b" * 16
        )
    other = spki_der(ec.generate_private_key(ec.SECP256R1()).public_key())
    with pytest.raises(BindingError, match="different public key"):
        verify_key_binding(binding.evidence, public_key_spki=other, verifier=sim_verifier, policy=sim_policy)
    tampered = bytearray(binding.evidence)
    tampered[-40] ^= 1
    with pytest.raises((VerificationError, BindingError)):
        verify_key_binding(bytes(tampered), public_key_spki=spki, verifier=sim_verifier, policy=sim_policy)
    with pytest.raises(PolicyRejectedError):
        verify_key_binding(
            binding.evidence, public_key_spki=spki, verifier=sim_verifier, policy=default_policy()
        )
