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
import time
from pathlib import Path
from urllib.parse import unquote, urlencode

import dcap_qvl
import httpx
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from enclaveml._files import write_atomically
from enclaveml.attestation._collateral import Collateral, _normalise, utc_text
from enclaveml.attestation.evidence import TeeType
from enclaveml.errors import CollateralError, ConfigurationError

__all__ = ["PccsCollateral"]

_log = logging.getLogger(__name__)


class PccsCollateral:
    """Collateral fetched from a PCCS or Intel PCS (v4 API), cached on disk under ``cache_dir``.

    A cached set is reused without asking the server while it is valid at ``now`` and younger
    than ``max_age`` seconds (Intel publishes TCB recoveries before ``nextUpdate``, so we
    re-check daily by default). A fetched set of an older TCB evaluation (lower
    ``tcbEvaluationDataNumber``, or the same one issued earlier) than a cached set still valid
    at ``now`` does not replace it: a PCCS run by the party being verified could otherwise roll
    the verifier back to the evaluation before a TCB recovery. When a fetch fails, a cached set
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
        # Plain dicts: each update is a single atomic store under the GIL.
        self._memory: dict[tuple[TeeType, str, str], tuple[Collateral, float]] = {}

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
        cached, fetched_at = entry if entry is not None and entry[0].valid_at(now) else (None, 0.0)
        wall = time.time()
        if cached is not None and (wall - fetched_at < self._max_age or wall < self._quiet_until.get(key, 0)):
            return cached
        try:
            fresh = self._fetch(*key)
        except CollateralError as exc:
            if cached is None:
                raise
            self._quiet_until[key] = wall + self._retry_after
            _log.warning("using cached DCAP collateral for %s: %s", "/".join(map(str, key)), exc)
            return cached
        if cached is not None and _age(fresh) < _age(cached):
            _log.warning(
                "%s served older DCAP collateral for %s (TCB evaluation %d, issued %s) than the cached "
                "set (%d, issued %s); keeping the cached set",
                self._base, "/".join(map(str, key)), fresh.evaluation_data_number, utc_text(fresh.issued),
                cached.evaluation_data_number, utc_text(cached.issued),
            )  # fmt: skip
            self._memory[key] = (cached, wall)  # asked now: not again before max_age
            return cached
        self._store(key, fresh, wall)
        # A just-published set may start after `now` (clock skew); the cached one still serves.
        return fresh if cached is None or fresh.valid_at(now) else cached

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

    def _load(self, key: tuple[TeeType, str, str]) -> tuple[Collateral, float] | None:
        path = self._cache_file(key)
        try:
            entry = json.loads(path.read_bytes())
            loaded = (Collateral.from_json(entry["collateral"]), float(entry["fetched_at"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, CollateralError) as exc:
            # A damaged cache entry is only a missed optimisation; the next fetch replaces it.
            _log.warning("ignoring unreadable DCAP collateral cache file %s: %s", path, exc)
            return None
        self._memory[key] = loaded
        return loaded

    def _store(self, key: tuple[TeeType, str, str], collateral: Collateral, fetched_at: float) -> None:
        self._memory[key] = (collateral, fetched_at)
        path = self._cache_file(key)
        payload = json.dumps({"fetched_at": fetched_at, "collateral": collateral.to_json()}).encode()
        try:
            self._cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomically(path, payload, mode=0o600)
        except OSError as exc:
            _log.warning("could not cache DCAP collateral in %s: %s", path, exc)


def _age(collateral: Collateral) -> tuple[int, int]:
    """Orders collateral sets by TCB evaluation, then issue time: larger is newer."""
    return collateral.evaluation_data_number, collateral.issued


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
