"""Export settings and the retry policy: pure decisions, no network."""

from __future__ import annotations

import pytest

from pacs_agent.config import (
    ConfigError,
    DicomDestination,
    DicomWebDestination,
    Settings,
    effective_settings,
    load_settings,
)
from pacs_agent.export import RetryPolicy, backoff_s, retry_policy


def test_backoff_grows_exponentially_up_to_its_cap_and_stops_at_the_attempt_limit() -> None:
    policy = RetryPolicy(max_attempts=6, initial_s=2.0, factor=3.0, max_s=30.0)
    assert [backoff_s(policy, n) for n in range(1, 7)] == [2.0, 6.0, 18.0, 30.0, 30.0, None]


def test_a_single_attempt_policy_never_waits() -> None:
    assert backoff_s(RetryPolicy(1, 2.0, 2.0, 60.0), 1) is None


def test_destinations_of_both_kinds_parse_with_dicom_as_the_default_kind() -> None:
    settings = Settings(
        export={
            "max_attempts": 4,
            "destinations": [
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104},
                {
                    "kind": "dicomweb",
                    "name": "web",
                    "url": "https://127.0.0.1/dicom-web/",
                    "token": "s3cret",
                    "max_attempts": 2,
                },
            ],
        }
    )
    pacs, web = settings.export.destinations
    assert isinstance(pacs, DicomDestination) and not pacs.tls
    assert isinstance(web, DicomWebDestination)
    assert web.url == "https://127.0.0.1/dicom-web"
    assert retry_policy(settings.export, pacs).max_attempts == 4
    assert retry_policy(settings.export, web).max_attempts == 2
    shown = effective_settings(settings)["export"]["destinations"][1]
    assert "s3cret" not in str(shown)


@pytest.mark.parametrize(
    ("destination", "message"),
    [
        ({"kind": "dicomweb", "name": "w", "url": "ftp://x"}, "not an http"),
        (
            {"kind": "dicomweb", "name": "w", "url": "http://x", "username": "u"},
            "username and password go together",
        ),
        (
            {
                "name": "p",
                "ae_title": "P",
                "host": "h",
                "port": 104,
                "tls_certificate": "/c.pem",
            },
            "tls_certificate and tls_private_key go together",
        ),
        ({"kind": "hl7", "name": "x"}, "hl7"),
    ],
)
def test_invalid_destinations_are_refused_with_the_reason(
    destination: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(export={"destinations": [destination]})


def test_destination_names_must_be_unique() -> None:
    same = {"name": "p", "ae_title": "P", "host": "h", "port": 104}
    with pytest.raises(ConfigError, match="destination names must be unique"):
        load_settings(export={"destinations": [same, same]})
