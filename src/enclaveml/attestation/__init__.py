"""Attestation: evidence, verification, appraisal policy and RA-TLS."""
