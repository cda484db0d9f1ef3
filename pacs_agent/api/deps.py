"""Request dependencies: the app state, a read session, the caller and their role."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from pacs_agent.api.auth import Principal
from pacs_agent.db.session import read_session

if TYPE_CHECKING:
    from pacs_agent.api.app import AppState

#: The dashboard's session cookie (HttpOnly): the token given at the login form.
COOKIE = "pacs_agent_token"


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.pacs
    return state


def db(request: Request) -> Iterator[Session]:
    with read_session(app_state(request).session_factory) as session:
        yield session


DB = Annotated[Session, Depends(db)]


def bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _unauthorized(request: Request) -> HTTPException:
    why = "unknown token" if request.headers.get("authorization") else "missing token"
    return HTTPException(
        401,
        f"{why}: send the header 'Authorization: Bearer <token>'",
        headers={"WWW-Authenticate": "Bearer"},
    )


def reader(request: Request) -> Principal:
    """The caller of the JSON API (header token only), any role."""
    principal = app_state(request).tokens.principal(bearer(request))
    if principal is None:
        raise _unauthorized(request)
    return principal


def admin(request: Request) -> Principal:
    principal = reader(request)
    if not principal.is_admin:
        raise HTTPException(403, "this token may read only; reprocess, retry and cancel need admin")
    return principal


Reader = Annotated[Principal, Depends(reader)]
Admin = Annotated[Principal, Depends(admin)]


def utc(value: datetime | None, name: str) -> datetime | None:
    """A query's time as UTC (naive means UTC); 422 for one that cannot be one."""
    if value is None:
        return None
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except (OverflowError, ValueError) as exc:
        raise HTTPException(422, f"{name}: {value.isoformat()} is out of range") from exc
