"""Collateral parsing and the collateral sources (local files, PCCS/PCS over real local HTTP)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given, settings
from hypothesis import strategies as st

from enclaveml.attestation._collateral import Collateral, CollateralSource, LocalCollateral
from enclaveml.attestation._dcap import DcapVerifier
from enclaveml.attestation._pccs import PccsCollateral, _signed_json
from enclaveml.attestation.evidence import Evidence, TeeType
from enclaveml.errors import CollateralError, CollateralExpiredError, ConfigurationError, VerificationError
from tests.vectors._dcap_helpers import (
    AUTOMATA,
    DCAP_CASES,
    EXPECTED,
    FakePcs,
    Route,
    case_dir,
    collateral_path,
    now_for,
    quote_bytes,
    unix,
)

AUTOMATA_KEY: dict[str, Any] = {"tee": TeeType.TDX, "fmspc": "00806F050000", "ca": "platform"}
SGX = "sgx/phala_sgx_v3"


def _raw(name: str) -> dict[str, Any]:
    return dict(json.loads(collateral_path(name).read_text()))


def _edit(name: str, item: str, **changes: str) -> str:
    """The case's collateral JSON with ``item`` fields changed (signature now wrong: parse tests only)."""
    raw = _raw(name)
    inner = json.loads(raw[item])
    inner.update(changes)
    raw[item] = json.dumps(inner)
    return json.dumps(raw)


# -- Collateral ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", DCAP_CASES)
def test_collateral_identity_and_window_match_expected(name: str) -> None:
    case = EXPECTED[name]
    collateral = Collateral.from_json(collateral_path(name).read_bytes())
    assert collateral.tee.value == case["quote_type"].lower()
    assert (collateral.fmspc, collateral.ca) == (case["fmspc"], case["pck_ca"])
    validity = case["collateral_validity"]
    periods = {p.item: (p.not_before, p.not_after) for p in collateral.periods}
    for item in ("tcb_info", "qe_identity"):
        assert periods[item] == (unix(validity[item][0]), unix(validity[item][1]))
    for item in ("pck_crl", "root_ca_crl"):
        assert periods[item] == (None, unix(validity[item][1]) - 1)
    start, end = case["valid_window_unix"]
    assert collateral.valid_at(start)
    assert collateral.valid_at(end)
    assert not collateral.valid_at(start - 1)
    assert collateral.expiry in (end, end + 1)  # the README's window end is conservative by <= 1 s


def test_expired_message_names_item_and_window() -> None:
    collateral = Collateral.from_json(collateral_path(SGX).read_text())
    with pytest.raises(CollateralExpiredError) as info:
        collateral.check_valid_at(unix("2025-08-01T00:00:00Z"))
    assert str(info.value).startswith(
        "collateral not valid at 2025-08-01T00:00:00Z: "
        "tcb_info valid 2025-06-19T10:56:11Z..2025-07-19T10:56:11Z"
    )
    with pytest.raises(CollateralExpiredError, match="pck_crl valid until 2025-07-19T10:23:17Z"):
        Collateral.from_json(_edit(SGX, "qe_identity", nextUpdate="2030-01-01T00:00:00Z")).check_valid_at(
            unix("2025-07-19T10:23:18Z")
        )


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("not json", "malformed DCAP collateral JSON"),
        (json.dumps({"tcb_info": "{}"}), "malformed DCAP collateral JSON"),
        (_edit(SGX, "tcb_info", issueDate="yesterday"), "tcb_info is malformed"),
        (_edit(SGX, "tcb_info", nextUpdate="2025-07-19T10:56:11"), "without a time zone"),
        (_edit(SGX, "tcb_info", fmspc="00A06711"), "invalid fmspc"),
        (_edit(SGX, "tcb_info", id="TDX"), "mixes TCB info 'TDX' with QE identity 'QE'"),
        (json.dumps({**_raw(SGX), "pck_crl": _raw(SGX)["root_ca_crl"]}), "not from an Intel PCK CA"),
        (json.dumps({**_raw(SGX), "root_ca_crl": "3000"}), "root_ca_crl is not a DER CRL"),
    ],
)
def test_malformed_collateral_is_a_clear_error(text: str, match: str) -> None:
    with pytest.raises(CollateralError, match=match):
        Collateral.from_json(text)


# -- LocalCollateral -------------------------------------------------------------------------


def test_local_directory_is_indexed_by_tee_fmspc_and_ca() -> None:
    source = LocalCollateral(case_dir(AUTOMATA))
    assert isinstance(source, CollateralSource)
    got = source.get(**AUTOMATA_KEY, now=now_for(AUTOMATA))
    assert got.to_json() == Collateral.from_json(collateral_path(AUTOMATA).read_text()).to_json()
    # FMSPC in the near case's tcb_info is lower case; lookups are case-insensitive.
    assert source.get(tee=TeeType.TDX, fmspc="20a06f000000", ca="platform", now=0).fmspc == "20A06F000000"
    with pytest.raises(
        CollateralError, match=r"no DCAP collateral for tdx FMSPC 00806F050000 \(PCK processor"
    ):
        source.get(tee=TeeType.TDX, fmspc="00806F050000", ca="processor", now=0)
    with pytest.raises(CollateralError, match="it has: tdx/00806F050000/platform, tdx/20A06F000000/platform"):
        source.get(tee=TeeType.SGX, fmspc="00806F050000", ca="platform", now=0)


def test_local_directory_with_a_bad_file_names_it(tmp_path: Path) -> None:
    shutil.copy(collateral_path(SGX), tmp_path / "good.json")
    (tmp_path / "broken.json").write_text('{"tcb_info": 1}')
    with pytest.raises(CollateralError, match=r"broken\.json"):
        LocalCollateral(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CollateralError, match="no collateral files"):
        LocalCollateral(tmp_path / "empty")
    with pytest.raises(CollateralError, match="does not exist"):
        LocalCollateral(tmp_path / "missing.json")


def test_local_picks_the_latest_tcb_evaluation_before_the_latest_issue(tmp_path: Path) -> None:
    shutil.copy(collateral_path(SGX), tmp_path / "current.json")
    raw = json.loads(_edit(SGX, "tcb_info", issueDate="2025-06-19T10:00:00Z", tcbEvaluationDataNumber=18))
    raw["qe_identity"] = json.dumps({**json.loads(raw["qe_identity"]), "tcbEvaluationDataNumber": 18})
    (tmp_path / "recovered.json").write_text(json.dumps(raw))  # issued earlier, but a later evaluation
    picked = LocalCollateral(tmp_path).get(
        tee=TeeType.SGX, fmspc="00A067110000", ca="processor", now=unix("2025-06-25T00:00:00Z")
    )
    assert picked.evaluation_data_number == 18


def test_local_picks_the_newest_collateral_valid_at_now(tmp_path: Path) -> None:
    shutil.copy(collateral_path(SGX), tmp_path / "current.json")
    older = _edit(SGX, "tcb_info", issueDate="2025-06-01T00:00:00Z", nextUpdate="2025-07-01T00:00:00Z")
    (tmp_path / "older.json").write_text(older)
    source = LocalCollateral(tmp_path)

    def issued(now: str) -> int | None:
        return (
            source.get(tee=TeeType.SGX, fmspc="00A067110000", ca="processor", now=unix(now))
            .periods[0]
            .not_before
        )

    assert issued("2025-06-25T00:00:00Z") == unix("2025-06-19T10:56:11Z")  # both valid: newest
    assert issued("2025-06-19T10:30:00Z") == unix("2025-06-01T00:00:00Z")  # only the older one
    assert issued("2025-08-01T00:00:00Z") == unix("2025-06-19T10:56:11Z")  # none: the one ending last


@pytest.mark.parametrize("fmspc", ["../../etc/pw", "00806F05000", "00806F05000G"])
def test_sources_refuse_odd_fmspc(fmspc: str, tmp_path: Path) -> None:
    with pytest.raises(CollateralError, match="invalid FMSPC"):
        LocalCollateral(case_dir(AUTOMATA)).get(tee=TeeType.TDX, fmspc=fmspc, ca="platform", now=0)
    with (
        PccsCollateral("http://127.0.0.1:9", cache_dir=tmp_path) as pccs,
        pytest.raises(CollateralError, match="invalid FMSPC"),
    ):
        pccs.get(tee=TeeType.TDX, fmspc=fmspc, ca="platform", now=0)
    assert not list(tmp_path.iterdir())


# -- verbatim extraction of signed PCS JSON --------------------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(
    inner=st.dictionaries(st.text(max_size=6), _json_values, max_size=5),
    spacing=st.lists(st.sampled_from(["", " ", "\n", "\t  "]), min_size=6, max_size=6),
    indent=st.sampled_from([None, 1, 4]),
)
def test_signed_json_returns_the_exact_inner_text(
    inner: dict[str, Any], spacing: list[str], indent: int | None
) -> None:
    inner_text = json.dumps(inner, indent=indent, ensure_ascii=False)
    a, b, c, d, e, f = spacing
    body = f'{a}{{{b}"tcbInfo"{c}:{d}{inner_text}{e},"signature":"00ff"{f}}}'
    text, signature = _signed_json(httpx.Response(200, text=body), "tcbInfo", "http://pcs/tcb")
    assert text == inner_text
    assert signature == b"\x00\xff"


def test_signed_json_matches_the_committed_collateral() -> None:
    body = (Path(case_dir(AUTOMATA)) / "automata_tdx_v4.pcs" / "tcb_info.pcs.json").read_bytes()
    text, _ = _signed_json(httpx.Response(200, content=body), "tcbInfo", "http://pcs/tcb")
    assert text == _raw(AUTOMATA)["tcb_info"]
    with pytest.raises(CollateralError, match="did not return a signed 'enclaveIdentity'"):
        _signed_json(httpx.Response(200, content=body), "enclaveIdentity", "http://pcs/qe")


# -- PccsCollateral against a real local HTTP server -----------------------------------------


@pytest.fixture
def pcs() -> Iterator[FakePcs]:
    server = FakePcs()
    yield server
    server.stop()


def _verify_automata(source: CollateralSource, now: int | None = None) -> Any:
    verifier = DcapVerifier(source)
    return verifier.verify(Evidence(TeeType.TDX, quote_bytes(AUTOMATA)), now=now or now_for(AUTOMATA))


def test_pccs_quote_verifies_then_works_from_disk_cache(pcs: FakePcs, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with PccsCollateral(pcs.url, cache_dir=cache) as source:
        claims = _verify_automata(source)
        assert claims.tcb_status == "OutOfDate"
        assert claims.advisory_ids == ("INTEL-SA-00960", "INTEL-SA-00982", "INTEL-SA-00986")
        assert sorted(pcs.paths) == [
            "/sgx/certification/v4/pckcrl?ca=platform&encoding=der",
            "/sgx/certification/v4/rootcacrl",
            "/tdx/certification/v4/qe/identity",
            "/tdx/certification/v4/tcb?fmspc=00806F050000",
        ]
        _verify_automata(source)
        assert len(pcs.requests) == 4  # served from memory the second time
    (entry,) = cache.iterdir()
    assert entry.name == "tdx-00806F050000-platform.json"
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    # The cached tcb_info is byte-for-byte what Intel signed.
    assert json.loads(json.loads(entry.read_text())["collateral"])["tcb_info"] == _raw(AUTOMATA)["tcb_info"]

    pcs.stop()
    with PccsCollateral(pcs.url, cache_dir=cache) as offline:
        assert _verify_automata(offline).tcb_status == "OutOfDate"
    assert len(pcs.requests) == 4


def test_pccs_falls_back_to_valid_cache_when_refresh_fails(
    pcs: FakePcs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with PccsCollateral(pcs.url, cache_dir=tmp_path) as source:
        source.get(**AUTOMATA_KEY, now=now_for(AUTOMATA))
    pcs.stop()
    with caplog.at_level(logging.WARNING), PccsCollateral(pcs.url, cache_dir=tmp_path, max_age=0) as source:
        assert _verify_automata(source).tcb_status == "OutOfDate"
    assert "using cached DCAP collateral" in caplog.text
    # A cached copy that is not valid at `now` is no fallback.
    with PccsCollateral(pcs.url, cache_dir=tmp_path, max_age=0) as source, pytest.raises(CollateralError):
        source.get(**AUTOMATA_KEY, now=now_for(AUTOMATA) + 90 * 86400)


def test_pccs_leaves_a_failing_server_alone_for_a_while(pcs: FakePcs, tmp_path: Path) -> None:
    with PccsCollateral(pcs.url, cache_dir=tmp_path, max_age=0) as source:
        source.get(**AUTOMATA_KEY, now=now_for(AUTOMATA))
        pcs.routes["/tdx/certification/v4/tcb"].status = 503
        for _ in range(3):
            assert _verify_automata(source).tcb_status == "OutOfDate"
        assert len(pcs.requests) == 4 + 1  # one failed refresh, then the cached copy is used quietly
    with PccsCollateral(pcs.url, cache_dir=tmp_path, max_age=0, retry_after=0) as source:
        source.get(**AUTOMATA_KEY, now=now_for(AUTOMATA))
        source.get(**AUTOMATA_KEY, now=now_for(AUTOMATA))
        assert len(pcs.requests) == 5 + 2


def test_pccs_refetches_when_cache_is_not_valid_at_now(pcs: FakePcs, tmp_path: Path) -> None:
    with PccsCollateral(pcs.url, cache_dir=tmp_path) as source:
        source.get(**AUTOMATA_KEY, now=now_for(AUTOMATA))
        later = now_for(AUTOMATA) + 90 * 86400
        with pytest.raises(CollateralExpiredError, match="collateral not valid at"):
            _verify_automata(source, now=later)
    assert len(pcs.requests) == 8


def _evaluation(route: Route, number: int) -> Route:
    """The route's signed JSON claiming another TCB evaluation (signature now wrong: a negative case)."""
    old = b'"tcbEvaluationDataNumber":17'
    assert route.body.count(old) == 1
    body = route.body.replace(old, b'"tcbEvaluationDataNumber":%d' % number)
    return Route(body, route.headers, query=route.query)


TCB_ROUTE = "/tdx/certification/v4/tcb"


def _dates(route: Route, issued: str, next_update: str) -> Route:
    """The route's TCB info with other dates (signature now wrong: a negative case)."""
    body = re.sub(rb'"issueDate":"[^"]*"', b'"issueDate":"%s"' % issued.encode(), route.body)
    body = re.sub(rb'"nextUpdate":"[^"]*"', b'"nextUpdate":"%s"' % next_update.encode(), body)
    return Route(body, route.headers, query=route.query)


def test_pccs_does_not_roll_back_to_an_older_tcb_evaluation(
    pcs: FakePcs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A PCCS run by the party being verified serves the set from before a TCB recovery again."""
    now = now_for(AUTOMATA)
    cache_file = tmp_path / "tdx-00806F050000-platform.json"
    with PccsCollateral(pcs.url, cache_dir=tmp_path, max_age=0) as source:
        assert _verify_automata(source).tcb_evaluation_data_number == 17  # verified: the floor is 17
        assert json.loads(cache_file.read_text())["floor"] == 17
        cached = cache_file.read_bytes()
        pcs.routes[TCB_ROUTE] = _evaluation(pcs.routes[TCB_ROUTE], 16)
        with caplog.at_level(logging.WARNING):
            assert source.get(**AUTOMATA_KEY, now=now).evaluation_data_number == 17
        assert "older than the verified cached set" in caplog.text
        assert cache_file.read_bytes() == cached
        assert _verify_automata(source).tcb_evaluation_data_number == 17  # the real set still verifies
    # Once the verified set has expired, an older evaluation is still refused (the floor stays).
    later = now + 40 * 86400
    pcs.routes[TCB_ROUTE] = _dates(pcs.routes[TCB_ROUTE], "2025-11-20T00:00:00Z", "2026-01-20T00:00:00Z")
    with (
        PccsCollateral(pcs.url, cache_dir=tmp_path, max_age=0) as restarted,
        pytest.raises(CollateralError, match="refusing to go back to an older TCB evaluation"),
    ):
        restarted.get(**AUTOMATA_KEY, now=later)
    assert cache_file.read_bytes() == cached


def test_pccs_a_forged_set_raises_no_floor_and_is_fetched_again(pcs: FakePcs, tmp_path: Path) -> None:
    """Signatures are checked at verification: a set that verified nothing is not trusted yet."""
    genuine = pcs.routes[TCB_ROUTE]
    pcs.routes[TCB_ROUTE] = _evaluation(genuine, 9999)
    with PccsCollateral(pcs.url, cache_dir=tmp_path) as source:
        with pytest.raises(VerificationError):
            _verify_automata(source)  # dcap-qvl refuses the forged TCB info
        pcs.routes[TCB_ROUTE] = genuine  # the PCCS is honest again (or the operator switched it)
        assert _verify_automata(source).tcb_evaluation_data_number == 17
    entry = json.loads((tmp_path / "tdx-00806F050000-platform.json").read_text())
    assert (entry["verified"], entry["floor"]) == (True, 17)
    with PccsCollateral(pcs.url, cache_dir=tmp_path) as restarted:  # the verified set, from disk
        requests = len(pcs.requests)
        assert _verify_automata(restarted).tcb_evaluation_data_number == 17
        assert len(pcs.requests) == requests


def test_pccs_unreachable_without_cache_names_the_url(tmp_path: Path) -> None:
    server = FakePcs()
    server.stop()
    expected = rf"could not fetch DCAP collateral from {server.url}/tdx"
    source = PccsCollateral(server.url, cache_dir=tmp_path)
    with pytest.raises(CollateralError, match=expected) as info:
        source.get(**AUTOMATA_KEY, now=now_for(AUTOMATA))
    source.close()
    assert isinstance(info.value.__cause__, httpx.HTTPError)


def _no_chain(route: Route) -> Route:
    return Route(route.body, {}, route.status, route.query)


def _status(status: int) -> Any:
    return lambda route: Route(b"oops", status=status, query=route.query)


def _body(body: bytes) -> Any:
    return lambda route: Route(body, route.headers, query=route.query)


_TCB, _QE = "/tdx/certification/v4/tcb", "/tdx/certification/v4/qe/identity"
_PCK_CRL, _ROOT_CRL = "/sgx/certification/v4/pckcrl", "/sgx/certification/v4/rootcacrl"


@pytest.mark.parametrize(
    ("path", "change", "match"),
    [
        (_TCB, _status(404), r"tcb\?fmspc=00806F050000 answered HTTP 404"),
        (_PCK_CRL, _status(500), r"pckcrl\?ca=platform&encoding=der answered HTTP 500"),
        (_TCB, _body(b"<html>busy</html>"), "did not return a signed 'tcbInfo'"),
        (_QE, _body(b'{"enclaveIdentity":{}}'), "qe/identity did not return a signed 'enclaveIdentity'"),
        (_ROOT_CRL, _body(b"garbage!"), "rootcacrl did not return a CRL"),
        (_PCK_CRL, _body(b"\x30\x03\x02\x01\x00"), "pckcrl did not return a CRL"),
        (_TCB, _no_chain, "lacks the issuer chain header TCB-Info-Issuer-Chain"),
        (_PCK_CRL, _no_chain, "lacks the issuer chain header SGX-PCK-CRL-Issuer-Chain"),
    ],
)
def test_pccs_bad_answers_are_clear_errors(
    pcs: FakePcs, tmp_path: Path, path: str, change: Any, match: str
) -> None:
    pcs.routes[path] = change(pcs.routes[path])
    with PccsCollateral(pcs.url, cache_dir=tmp_path) as source, pytest.raises(CollateralError, match=match):
        source.get(**AUTOMATA_KEY, now=now_for(AUTOMATA))
    assert not list(tmp_path.glob("*.json"))


def test_pccs_accepts_pcs_variants(pcs: FakePcs, tmp_path: Path) -> None:
    # Older header name, pretty-printed body (the inner object's bytes unchanged), PEM and hex
    # CRLs, a separately hosted root CA CRL, a caller-supplied client and an API key.
    tcb = pcs.routes["/tdx/certification/v4/tcb"]
    inner = _raw(AUTOMATA)["tcb_info"]
    signature = json.loads(tcb.body)["signature"]
    body = f'{{\n  "tcbInfo" : {inner},\n  "signature": "{signature}"\n}}\n'.encode()
    tcb.body, tcb.headers = body, {"SGX-TCB-Info-Issuer-Chain": tcb.headers["TCB-Info-Issuer-Chain"]}
    crl = pcs.routes["/sgx/certification/v4/pckcrl"]
    crl.body = x509.load_der_x509_crl(crl.body).public_bytes(Encoding.PEM)
    root = pcs.routes.pop("/sgx/certification/v4/rootcacrl")
    pcs.routes["/IntelSGXRootCA.crl"] = Route(root.body.hex().encode() + b"\n")
    with httpx.Client(timeout=5) as client:
        source = PccsCollateral(
            pcs.url + "/",
            cache_dir=tmp_path,
            client=client,
            api_key="k3y",
            root_ca_crl_url=pcs.url + "/IntelSGXRootCA.crl",
        )
        assert _verify_automata(source).tcb_status == "OutOfDate"
        source.close()
        assert not client.is_closed  # not ours to close
    assert all(headers.get("Ocp-Apim-Subscription-Key") == "k3y" for _, headers in pcs.requests)


def test_pccs_rejects_collateral_for_another_platform(pcs: FakePcs, tmp_path: Path) -> None:
    other = _raw("tdx/phala_tdx_v4")
    tcb = pcs.routes["/tdx/certification/v4/tcb"]
    tcb.body = f'{{"tcbInfo":{other["tcb_info"]},"signature":"{other["tcb_info_signature"]}"}}'.encode()
    expected = "returned collateral for tdx/B0C06F000000/platform"
    with (
        PccsCollateral(pcs.url, cache_dir=tmp_path) as source,
        pytest.raises(CollateralError, match=expected),
    ):
        source.get(**AUTOMATA_KEY, now=now_for(AUTOMATA))


def test_pccs_ignores_a_damaged_cache_file(pcs: FakePcs, tmp_path: Path) -> None:
    (tmp_path / "tdx-00806F050000-platform.json").write_text("{ half a file")
    with PccsCollateral(pcs.url, cache_dir=tmp_path) as source:
        assert _verify_automata(source).tcb_status == "OutOfDate"
    assert len(pcs.requests) == 4
    assert json.loads((tmp_path / "tdx-00806F050000-platform.json").read_text())["collateral"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_pccs_url_must_be_http(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="must start with https://"):
        PccsCollateral("pccs.example:8081", cache_dir=tmp_path)
    with PccsCollateral("http://[::1", cache_dir=tmp_path) as source, pytest.raises(CollateralError) as info:
        source.get(**AUTOMATA_KEY, now=now_for(AUTOMATA))
    assert isinstance(info.value.__cause__, httpx.InvalidURL)
