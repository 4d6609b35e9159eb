"""The key broker: keys released only to attested workloads, HPKE-sealed to a key bound in their evidence.

Client side (what workloads and key owners import) is re-exported here. The server lives in
:mod:`enclaveml.kms.server` (``BrokerConfig``, ``create_app``, ``run_broker``) and encrypted
Parquet in :mod:`enclaveml.kms.parquet`; both are imported by name so that a workload does
not load the web server stack.
"""

from enclaveml.kms.admin import AuditVerification, KeyBrokerAdmin, KeyInfo
from enclaveml.kms.client import KeyBrokerClient

__all__ = ["AuditVerification", "KeyBrokerAdmin", "KeyBrokerClient", "KeyInfo"]
