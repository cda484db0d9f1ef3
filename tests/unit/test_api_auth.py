"""API tokens: roles, hashed tokens, the open loopback mode and the network-bind refusal."""

from __future__ import annotations

import pytest

from pacs_agent.api.auth import Role, TokenBook, exposure_problem, hash_token
from pacs_agent.config import ApiSettings, effective_settings, load_settings

READ = "reader-token-0123456789"
ADMIN = "admin-token-0123456789"


def test_tokens_given_plain_or_as_sha256_map_to_their_role_and_others_are_refused() -> None:
    book = TokenBook(ApiSettings(read_tokens=[READ], admin_tokens=[hash_token(ADMIN)]))
    reader, admin = book.principal(READ), book.principal(ADMIN)
    assert reader is not None and reader.role == Role.READ and not reader.is_admin
    assert admin is not None and admin.role == Role.ADMIN
    assert READ not in reader.actor and ADMIN not in admin.actor
    assert book.principal("wrong-token-0123456789") is None
    assert book.principal(None) is None and book.principal("") is None
    assert not book.open


def test_no_token_is_open_admin_on_loopback_and_refused_on_a_network_address() -> None:
    book = TokenBook(ApiSettings())
    who = book.principal(None)
    assert book.open and who is not None and who.is_admin
    assert exposure_problem(ApiSettings()) is None
    problem = exposure_problem(ApiSettings(host="0.0.0.0"))
    assert problem is not None and "api.host" in problem
    assert exposure_problem(ApiSettings(host="0.0.0.0", read_tokens=[READ])) is None


def test_short_or_malformed_tokens_are_a_settings_error() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        ApiSettings(read_tokens=["short"])
    with pytest.raises(ValueError, match="64 lowercase hex"):
        ApiSettings(admin_tokens=["sha256:abc"])


def test_csrf_token_belongs_to_the_session_token() -> None:
    book = TokenBook(ApiSettings(admin_tokens=[ADMIN], read_tokens=[READ]))
    form = book.csrf_token(ADMIN)
    assert book.csrf_ok(ADMIN, form)
    assert (
        not book.csrf_ok(READ, form)
        and not book.csrf_ok(ADMIN, "")
        and not book.csrf_ok(ADMIN, None)
    )


def test_config_show_masks_the_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACS_AGENT_API__ADMIN_TOKENS", f'["{ADMIN}"]')
    shown = effective_settings(load_settings())
    assert shown["api"]["admin_tokens"] == ["**********"]
    assert ADMIN not in str(shown)
