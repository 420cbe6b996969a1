"""The pages for people: the dashboard (/) and the API reference (/docs), from vendored
assets under `api/static`."""

from pathlib import Path

from fastapi import APIRouter
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

STATIC = Path(__file__).parent.parent / "static"
_DASHBOARD = (STATIC / "dashboard" / "index.html").read_text()
# The dashboard loads only its own files, talks only to this API, and is never framed. The
# one inline style is the vendored chart library's attribution logo, allowed by its hash
# (tests/api/test_dashboard.py fails on any CSP violation, so a library upgrade that changes it
# is caught).
_CHART_LOGO_STYLE = "'sha256-3pRED1tOXas1FXFoPb9TGCjmYe9XQsmO9OV23khV2nY='"
DASHBOARD_CSP = (
    f"default-src 'none'; script-src 'self'; style-src 'self' {_CHART_LOGO_STYLE}; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

router = APIRouter()


@router.get("/", include_in_schema=False)
async def dashboard() -> HTMLResponse:
    return HTMLResponse(_DASHBOARD, headers={"Content-Security-Policy": DASHBOARD_CSP})


@router.get("/docs", include_in_schema=False)
async def docs() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="crypto-client API",
        swagger_js_url="/static/swagger-ui/swagger-ui-bundle.js",
        swagger_css_url="/static/swagger-ui/swagger-ui.css",
        swagger_favicon_url="/static/swagger-ui/favicon-32x32.png",
    )
