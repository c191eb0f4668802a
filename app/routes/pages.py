"""What a browser gets: the try-it page at ``/``, the OpenAPI document at ``/openapi.json`` and
Swagger UI at ``/docs``.

Swagger UI's files come from the ``flask-swagger-ui`` package (swagger-ui's own dist, versioned with
it), so the page works on a host without internet access and nothing is loaded from a CDN.
"""
from __future__ import annotations

from importlib.metadata import version

import logging

from flask import Flask, jsonify

from app.routes import openapi

log = logging.getLogger(__name__)

DOCS_URL = "/docs"
OPENAPI_URL = "/openapi.json"


def init_app(app: Flask, settings) -> None:
    document = openapi.document(settings, version("asr-service"))

    @app.get("/")
    def index():
        return app.send_static_file("index.html")

    @app.get(OPENAPI_URL)
    def openapi_json():
        return jsonify(document)

    try:  # an install without the page (the GPU self-check's carried set) still serves the API
        from flask_swagger_ui import get_swaggerui_blueprint
    except ImportError:
        log.warning("flask-swagger-ui is not installed: no Swagger UI at %s (%s is served)", DOCS_URL, OPENAPI_URL)

        @app.get(DOCS_URL)
        def docs_missing():
            return jsonify(error={"code": "docs_not_installed", "message":
                                  f"Swagger UI needs the flask-swagger-ui package; the document is at {OPENAPI_URL}"}), 404
        return
    app.register_blueprint(get_swaggerui_blueprint(DOCS_URL, OPENAPI_URL, config={
        "app_name": "asr-service", "displayRequestDuration": True}))
