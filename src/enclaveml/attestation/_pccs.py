"""Collateral fetched from a PCCS or Intel PCS (v4 API) with httpx, cached on disk.

dcap-qvl's own fetcher is deliberately not used (when it fails it can crash the
interpreter at exit). Intel signs the exact bytes of the inner ``tcbInfo`` /
``enclaveIdentity`` JSON objects, so they are cut out of the response verbatim, never
re-serialised.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import unquote, urlencode

import dcap_qvl
import httpx
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from enclaveml._files import write_atomically
from enclaveml.attestation._collateral import Collateral, _normalise
from enclaveml.attestation.evidence import TeeType
from enclaveml.errors import CollateralError, ConfigurationError

__all__ = ["PccsCollateral"]

_log = logging.getLogger(__name__)


class PccsCollateral:
    """Collateral fetched from a PCCS or Intel PCS (v4 API), cached on disk under ``cache_dir``.

    A cached set that has verified a quote (:meth:`confirm`) is reused without asking the server
    while it is valid at ``now`` and younger than ``max_age`` seconds (Intel publishes TCB
    recoveries before ``nextUpdate``, so we re-check daily by default); one that has not is
    fetched again, since its signatures are only checked when it verifies a quote. The highest
    TCB evaluation (``tcbEvaluationDataNumber``) that has verified a quote of a platform is kept
    as its floor, also after that set expires: a set of an older evaluation is never used again
    (the verified cached set is kept if still valid, otherwise CollateralError), so a PCCS run by
    the party being verified cannot roll the verifier back to the evaluation before a TCB
    recovery, and a forged set claiming a high evaluation raises no floor. When a fetch fails, a cached set
    still valid at ``now`` is used, a warning logged, and the server left alone for
    ``retry_after`` seconds so that verifications do not each wait on a dead server; otherwise
    CollateralError names the URL and the failure.
    """

    def __init__(
        self,
        base_url: str,
        *,
        cache_dir: str | os.PathLike[str],
        client: httpx.Client | None = None,
        api_key: str | None = None,
        root_ca_crl_url: str | None = None,
        max_age: float = 24 * 3600.0,
        retry_after: float = 300.0,
        timeout: float = 30.0,
    ) -> None:
        if not base_url.startswith(("https://", "http://")):
            raise ConfigurationError(f"PCCS URL must start with https:// or http://, got {base_url!r}")
        self._base = base_url.rstrip("/")
        self._root_crl_url = root_ca_crl_url or f"{self._base}/sgx/certification/v4/rootcacrl"
        self._cache_dir = Path(cache_dir)
        self._owns_client = client is None
        self._client = client if client is not None else httpx.Client(timeout=timeout)
        self._headers = {"Ocp-Apim-Subscription-Key": api_key} if api_key else {}
        self._max_age = max_age
        self._retry_after = retry_after
        self._quiet_until: dict[tuple[TeeType, str, str], float] = {}
        # Plain dicts: each update is a single atomic store under the GIL; confirm() also reads
        # the entry it replaces, so it holds the lock.
        self._memory: dict[tuple[TeeType, str, str], _Entry] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the HTTP client if this object created it."""
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> PccsCollateral:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def get(self, *, tee: TeeType, fmspc: str, ca: str, now: int) -> Collateral:
        key = _normalise(tee, fmspc, ca)
        entry = self._memory.get(key) or self._load(key)
        cached = entry if entry is not None and entry.collateral.valid_at(now) else None
        wall = time.time()
        # Only a set that has verified a quote is reused without asking: one that has not may be
        # a forgery (signatures are checked by dcap-qvl, at verification), so it is fetched again.
        fresh_enough = cached is not None and (
            wall - cached.fetched_at < self._max_age or wall < self._quiet_until.get(key, 0)
        )
        if cached is not None and cached.verified and fresh_enough:
            return cached.collateral
        try:
            fresh = self._fetch(*key)
        except CollateralError as exc:
            if cached is None:
                raise
            self._quiet_until[key] = wall + self._retry_after
            _log.warning("using cached DCAP collateral for %s: %s", "/".join(map(str, key)), exc)
            return cached.collateral
        floor = entry.floor if entry is not None else 0
        if fresh.evaluation_data_number < floor:
            if cached is not None and cached.verified and cached.collateral.evaluation_data_number >= floor:
                _log.warning(
                    "%s served DCAP collateral of TCB evaluation %d for %s, older than the verified "
                    "cached set (%d); keeping the cached set",
                    self._base, fresh.evaluation_data_number, "/".join(map(str, key)),
                    cached.collateral.evaluation_data_number,
                )  # fmt: skip
                self._memory[key] = replace(cached, fetched_at=wall)  # asked now: not again before max_age
                return cached.collateral
            raise CollateralError(
                f"{self._base} served DCAP collateral of TCB evaluation {fresh.evaluation_data_number} for "
                f"{'/'.join(map(str, key))}, but collateral of evaluation {floor} has already verified "
                "quotes of this platform: refusing to go back to an older TCB evaluation (rollback)"
            )
        self._store(key, _Entry(fresh, wall, verified=False, floor=floor))
        # A just-published set may start after `now` (clock skew); the cached one still serves.
        if cached is not None and not fresh.valid_at(now):
            return cached.collateral
        return fresh

    def confirm(self, collateral: Collateral) -> None:
        """Record that ``collateral`` verified a quote: its signatures are Intel's.

        From then on it is reused without refetching (until ``max_age``) and its TCB evaluation
        is this platform's floor: sets of an older evaluation are refused, also after it expires.
        Called by :class:`~enclaveml.attestation._dcap.DcapVerifier` after each verification.
        """
        key = (collateral.tee, collateral.fmspc, collateral.ca)
        with self._lock:
            entry = self._memory.get(key) or self._load(key)
            if entry is None:
                return
            floor = max(entry.floor, collateral.evaluation_data_number)
            verified = entry.verified or entry.collateral is collateral
            if (floor, verified) != (entry.floor, entry.verified):
                self._store(key, replace(entry, verified=verified, floor=floor))

    # -- HTTP -----------------------------------------------------------------------------

    def _fetch(self, tee: TeeType, fmspc: str, ca: str) -> Collateral:
        api = f"{self._base}/{tee.value}/certification/v4"
        tcb_url = f"{api}/tcb"
        tcb = self._request(tcb_url, {"fmspc": fmspc})
        tcb_info, tcb_sig = _signed_json(tcb, "tcbInfo", tcb_url)
        qe_url = f"{api}/qe/identity"
        qe = self._request(qe_url, None)
        qe_identity, qe_sig = _signed_json(qe, "enclaveIdentity", qe_url)
        crl_url = f"{self._base}/sgx/certification/v4/pckcrl"
        pck = self._request(crl_url, {"ca": ca, "encoding": "der"})
        root = self._request(self._root_crl_url, None)
        try:
            qvl = dcap_qvl.QuoteCollateralV3(
                _issuer_chain(pck, crl_url, "SGX-PCK-CRL-Issuer-Chain"),
                _crl_der(root.content, self._root_crl_url),
                _crl_der(pck.content, crl_url),
                _issuer_chain(tcb, tcb_url, "TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain"),
                tcb_info,
                tcb_sig,
                _issuer_chain(qe, qe_url, "SGX-Enclave-Identity-Issuer-Chain"),
                qe_identity,
                qe_sig,
            )
            collateral = Collateral(qvl)
        except (ValueError, TypeError, CollateralError) as exc:
            raise CollateralError(f"collateral from {self._base} is unusable: {exc}") from exc
        if (collateral.tee, collateral.fmspc, collateral.ca) != (tee, fmspc, ca):
            raise CollateralError(
                f"{self._base} returned collateral for {collateral.tee.value}/{collateral.fmspc}/"
                f"{collateral.ca}, not the requested {tee.value}/{fmspc}/{ca}"
            )
        return collateral

    def _request(self, url: str, params: dict[str, str] | None) -> httpx.Response:
        shown = f"{url}?{urlencode(params)}" if params else url
        try:
            response = self._client.get(url, params=params, headers=self._headers)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:  # InvalidURL is no HTTPError
            raise CollateralError(f"could not fetch DCAP collateral from {shown}: {exc}") from exc
        if response.status_code != 200:
            # Intel PCS explains refusals in its Error-Code / Error-Message headers.
            detail = " ".join(filter(None, map(response.headers.get, ("Error-Code", "Error-Message"))))
            raise CollateralError(
                f"{shown} answered HTTP {response.status_code}{f' ({detail})' if detail else ''}; "
                "check the PCCS URL and that it has collateral for this platform"
            )
        return response

    # -- disk cache: one JSON file per (tee, FMSPC, CA): {"fetched_at": unix, "collateral": text}

    def _cache_file(self, key: tuple[TeeType, str, str]) -> Path:
        return self._cache_dir / f"{key[0].value}-{key[1]}-{key[2]}.json"

    def _load(self, key: tuple[TeeType, str, str]) -> _Entry | None:
        path = self._cache_file(key)
        try:
            raw = json.loads(path.read_bytes())
            entry = _Entry(
                Collateral.from_json(raw["collateral"]),
                float(raw["fetched_at"]),
                verified=raw.get("verified") is True,
                floor=int(raw.get("floor", 0)),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, CollateralError) as exc:
            # A damaged cache entry is only a missed optimisation; the next fetch replaces it.
            _log.warning("ignoring unreadable DCAP collateral cache file %s: %s", path, exc)
            return None
        self._memory[key] = entry
        return entry

    def _store(self, key: tuple[TeeType, str, str], entry: _Entry) -> None:
        self._memory[key] = entry
        path = self._cache_file(key)
        payload = {
            "fetched_at": entry.fetched_at,
            "collateral": entry.collateral.to_json(),
            "verified": entry.verified,
            "floor": entry.floor,
        }
        try:
            self._cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomically(path, json.dumps(payload).encode(), mode=0o600)
        except OSError as exc:
            _log.warning("could not cache DCAP collateral in %s: %s", path, exc)


@dataclass(frozen=True, slots=True)
class _Entry:
    """A cached set: when it was fetched, whether it has verified a quote (its signatures are
    then Intel's), and the platform's floor: the highest TCB evaluation that has verified one."""

    collateral: Collateral
    fetched_at: float
    verified: bool = False
    floor: int = 0


def _signed_json(response: httpx.Response, key: str, url: str) -> tuple[str, bytes]:
    """Return the verbatim text of ``body[key]`` and ``body["signature"]`` as bytes.

    Intel signs the exact bytes of the inner object, so it is cut out of the body text
    rather than re-serialised (``json.dumps`` would change them).
    """
    text = response.text
    try:
        body = json.loads(text)
        signature = bytes.fromhex(body["signature"])
        key_at = re.search(rf'"{key}"\s*:\s*', text)
        if key_at is None or not isinstance(body[key], dict):
            raise ValueError(f"no '{key}' object")
        inner, end = json.JSONDecoder().raw_decode(text, key_at.end())
        if inner != body[key]:
            raise ValueError(f"'{key}' appears more than once")
    except (ValueError, KeyError, TypeError) as exc:
        raise CollateralError(f"{url} did not return a signed '{key}' JSON document: {exc}") from exc
    return text[key_at.end() : end], signature


def _issuer_chain(response: httpx.Response, url: str, *names: str) -> str:
    for name in names:
        value = response.headers.get(name)
        if value:
            pem = unquote(value)
            if "-----BEGIN CERTIFICATE-----" in pem:
                return pem
            raise CollateralError(f"{url}: header {name} is not a URL-encoded PEM certificate chain")
    raise CollateralError(f"{url}: response lacks the issuer chain header {names[0]}")


def _crl_der(body: bytes, url: str) -> bytes:
    """Accept a CRL as DER, PEM or hex text (PCCS versions differ) and return DER."""
    data = body
    try:
        # Only text forms may be stripped: whitespace byte values are legal inside DER.
        if not data.startswith(b"\x30"):
            text = data.strip()
            if text.startswith(b"-----BEGIN"):
                return x509.load_pem_x509_crl(text).public_bytes(Encoding.DER)
            data = bytes.fromhex(text.decode("ascii"))
        x509.load_der_x509_crl(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CollateralError(f"{url} did not return a CRL (DER, PEM or hex): {exc}") from exc
    return data
