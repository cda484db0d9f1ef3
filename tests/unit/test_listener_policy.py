"""The listener's pure decisions: who may call, when it may start, what a duplicate does."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from pacs_agent.config import AllowedCaller, ListenerSettings
from pacs_agent.db.index import Arrival, DuplicatePolicy, decide_arrival
from pacs_agent.net.scp import build_ae, caller_allowed, exposure_problem, is_loopback
from pacs_agent.storage.spool import Spool

ALLOWED = [
    AllowedCaller(ae_title="ANYWHERE"),
    AllowedCaller(ae_title="PINNED", hosts=["10.0.0.5"]),
    AllowedCaller(ae_title="SUBNET", hosts=["10.1.0.0/16", "fd00::/8"]),
]


@pytest.mark.parametrize(
    ("ae", "address", "allowed"),
    [
        ("ANYWHERE", "192.0.2.1", True),
        ("ANYWHERE  ", "192.0.2.1", True),  # AE titles are padded with spaces on the wire
        ("PINNED", "10.0.0.5", True),
        ("PINNED", "10.0.0.6", False),
        ("SUBNET", "10.1.200.3", True),
        ("SUBNET", "10.2.0.1", False),
        ("SUBNET", "fd12::1", True),
        ("UNKNOWN", "10.0.0.5", False),
        ("anywhere", "10.0.0.5", False),  # AE titles are case-sensitive
    ],
)
def test_caller_is_allowed_only_by_title_and_pinned_address(
    ae: str, address: str, allowed: bool
) -> None:
    assert caller_allowed(ae, address, ALLOWED) is allowed


def test_empty_allow_list_lets_any_caller_in() -> None:
    assert caller_allowed("WHOEVER", "192.0.2.9", [])


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("10.0.0.1", False),
        ("pacs.example", False),
        ("::", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_network_bind_needs_an_allow_list_or_an_explicit_any_caller() -> None:
    assert exposure_problem(ListenerSettings()) is None
    problem = exposure_problem(ListenerSettings(host="0.0.0.0"))
    assert problem is not None and "allow_any_caller" in problem
    assert exposure_problem(ListenerSettings(host="0.0.0.0", allow_any_caller=True)) is None
    listed = ListenerSettings(host="10.0.0.1", allowed_callers=[AllowedCaller(ae_title="CT")])
    assert exposure_problem(listed) is None


@pytest.mark.parametrize(
    ("indexed", "policy", "arrival"),
    [
        (None, DuplicatePolicy.REPLACE, Arrival.NEW),
        ("aa", DuplicatePolicy.REPLACE, Arrival.SAME),
        ("aa", DuplicatePolicy.KEEP_FIRST, Arrival.SAME),
        ("bb", DuplicatePolicy.REPLACE, Arrival.REPLACE),
        ("bb", DuplicatePolicy.KEEP_FIRST, Arrival.KEEP_FIRST),
        ("bb", DuplicatePolicy.KEEP_BOTH, Arrival.KEEP_BOTH),
    ],
)
def test_arrival_of_an_instance_depends_on_index_digest_and_policy(
    indexed: str | None, policy: DuplicatePolicy, arrival: Arrival
) -> None:
    assert decide_arrival(indexed, "aa", policy) is arrival


def test_second_copy_lives_outside_the_series_directory(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    digest = "0123456789abcdef" * 4
    assert spool.copy_path("1.2", "1.2.3", "1.2.3.4", digest) == Path(
        "duplicates/1.2/1.2.3/1.2.3.4.0123456789abcdef.dcm"
    )
    with pytest.raises(ValueError):
        spool.copy_path("1.2", "1.2.3", "1.2.3.4", "../../x")


def test_listener_limits_are_applied_to_the_application_entity() -> None:
    settings = ListenerSettings(
        max_pdu=65536,
        max_associations=3,
        acse_timeout_s=7,
        dimse_timeout_s=8,
        network_timeout_s=9,
    )
    ae = build_ae(settings)
    assert ae.maximum_pdu_size == 65536
    assert ae.maximum_associations == 3
    assert (ae.acse_timeout, ae.dimse_timeout, ae.network_timeout) == (7, 8, 9)
    assert ae.require_called_aet


def test_tls_settings_come_in_pairs(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        ListenerSettings(tls_certificate=tmp_path / "cert.pem")
    with pytest.raises(ValidationError):
        ListenerSettings(tls_client_ca=tmp_path / "ca.pem")
