"""/docs (Swagger UI) and /redoc served with their assets from this installation, not a CDN: the
pages work on a machine without internet. Swagger UI comes from the `swagger-ui-bundle` package,
ReDoc's standalone bundle is vendored in service/static/redoc."""

from pathlib import Path

import swagger_ui_bundle
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.staticfiles import StaticFiles

REDOC_DIR = Path(__file__).parent / "static" / "redoc"


def install_api_docs(app: FastAPI) -> None:
    """Call with an app made with docs_url=None and redoc_url=None."""
    app.mount("/static/swagger-ui", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="swagger-ui")
    app.mount("/static/redoc", StaticFiles(directory=REDOC_DIR), name="redoc")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - Swagger UI",
                                   swagger_js_url="/static/swagger-ui/swagger-ui-bundle.js",
                                   swagger_css_url="/static/swagger-ui/swagger-ui.css",
                                   swagger_favicon_url="/static/swagger-ui/favicon-32x32.png")

    @app.get("/redoc", include_in_schema=False)
    def redoc():
        return get_redoc_html(openapi_url=app.openapi_url, title=f"{app.title} - ReDoc",
                              redoc_js_url="/static/redoc/redoc.standalone.js",
                              redoc_favicon_url="/static/swagger-ui/favicon-32x32.png", with_google_fonts=False)
