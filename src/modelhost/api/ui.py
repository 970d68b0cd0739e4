"""The web dashboard and the API docs' scripts, served from packaged files (no CDN).

The page and its assets are static and hold no data, so they are served without the API key;
every call the page makes goes to the API with the key. The dashboard is plain ES modules
(``web/app.js`` imports ``web/api.js``, ``web/state.js``, ``web/ui.js`` and ``web/panels/*``),
served from a fixed list under a Content-Security-Policy that runs only this server's files.
Swagger UI's and ReDoc's files come from the ``fastapi-offline`` package, which ships them.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from modelhost.errors import ModelNotFound

router = APIRouter(include_in_schema=False)

WEB_DIR = Path(str(resources.files("modelhost") / "web"))
# The page's files, a fixed list: its ES modules (app.js imports the rest) and its style.
DASHBOARD_FILES = {
    "app.js": "text/javascript",
    "api.js": "text/javascript",
    "state.js": "text/javascript",
    "ui.js": "text/javascript",
    "panels/cache.js": "text/javascript",
    "panels/catalog.js": "text/javascript",
    "panels/downloads.js": "text/javascript",
    "panels/models.js": "text/javascript",
    "panels/pull.js": "text/javascript",
    "panels/speak.js": "text/javascript",
    "panels/tryit.js": "text/javascript",
    "style.css": "text/css",
}
# The dashboard runs only its own files: no inline script, no other host; audio plays from
# the blob: URLs it makes of the server's answers.
DASHBOARD_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "media-src 'self' blob:; connect-src 'self' blob:; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
DASHBOARD_HEADERS = {
    "Content-Security-Policy": DASHBOARD_CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
DOCS_FILES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
DOCS_STATIC = "/static/docs"


def docs_dir() -> Path:
    """Where the installed ``fastapi-offline`` keeps Swagger UI's and ReDoc's files."""
    return Path(str(resources.files("fastapi_offline") / "static"))


def _asset(
    directory: Path, name: str, types: dict[str, str], headers: dict[str, str] | None = None
) -> FileResponse:
    if name not in types:  # a fixed list: no path from the request reaches the filesystem
        raise ModelNotFound(f"No such file: {name}", error="Not found")
    return FileResponse(
        directory / name, media_type=types[name], headers=headers or {"Cache-Control": "no-cache"}
    )


@router.get("/")
@router.get("/ui")
async def dashboard() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html", headers=DASHBOARD_HEADERS)


@router.get("/ui/{name:path}")
async def dashboard_asset(name: str) -> FileResponse:
    return _asset(WEB_DIR, name, DASHBOARD_FILES, DASHBOARD_HEADERS)


@router.get(DOCS_STATIC + "/{name}")
async def docs_asset(name: str) -> FileResponse:
    return _asset(docs_dir(), name, DOCS_FILES)
