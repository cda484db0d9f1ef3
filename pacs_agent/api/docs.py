"""The API's documentation pages, served whole by the application itself.

FastAPI's own ``/docs`` and ``/redoc`` load Swagger UI and ReDoc from a public CDN (and
ReDoc its fonts from Google), which hospital networks do not reach: the page stays blank.
Here the pages load the same scripts from the ``fastapi-offline`` package's copy, under
``/docs-assets`` (decision record 0022-api-docs-served-offline).
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs-assets"
ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"


#: The pages may load from this application only (ReDoc's side menu, for one, shows an image
#: from its vendor's CDN): the browser refuses anything else before it is requested.
CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; "
    "connect-src 'self'; frame-ancestors 'none'"
)


def _offline(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CSP
    return page


def add_docs(app: FastAPI) -> None:
    """Swagger UI at ``/docs`` and ReDoc at ``/redoc``, every asset from this app. Create
    ``app`` with ``docs_url=None, redoc_url=None`` (FastAPI's CDN pages)."""
    if not (ASSETS_DIR / "swagger-ui-bundle.js").is_file():
        raise RuntimeError(f"Swagger UI assets missing in {ASSETS_DIR} (fastapi-offline)")
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"
    title = app.title

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = str(request.scope.get("root_path", ""))  # behind a proxy's path prefix
        assets = f"{root}{ASSETS_URL}"
        return _offline(
            get_swagger_ui_html(
                openapi_url=f"{root}{openapi_url}",
                title=f"{title} - Swagger UI",
                swagger_js_url=f"{assets}/swagger-ui-bundle.js",
                swagger_css_url=f"{assets}/swagger-ui.css",
                swagger_favicon_url=f"{assets}/favicon.png",
                oauth2_redirect_url=None,
                # No badge from the public online validator.
                swagger_ui_parameters={"validatorUrl": None},
            )
        )

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root = str(request.scope.get("root_path", ""))
        assets = f"{root}{ASSETS_URL}"
        return _offline(
            get_redoc_html(
                openapi_url=f"{root}{openapi_url}",
                title=f"{title} - ReDoc",
                redoc_js_url=f"{assets}/redoc.standalone.js",
                redoc_favicon_url=f"{assets}/favicon.png",
                with_google_fonts=False,
            )
        )
