"""What a browser gets: the try-it page at ``/``, the OpenAPI document at ``/openapi.json`` and
Swagger UI at ``/docs``.

Swagger UI's files come from the ``flask-swagger-ui`` package (swagger-ui's own dist, versioned with
it), so the page works on a host without internet access and nothing is loaded from a CDN.
"""
from __future__ import annotations

from importlib.metadata import version

from flask import Flask, jsonify
from flask_swagger_ui import get_swaggerui_blueprint

from app import openapi

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

    app.register_blueprint(get_swaggerui_blueprint(DOCS_URL, OPENAPI_URL, config={
        "app_name": "asr-service", "displayRequestDuration": True}))
