"""JSON errors: every failure a client can cause is an ``ApiError`` with a stable code."""
from __future__ import annotations

from flask import Flask, g, jsonify
from werkzeug.exceptions import HTTPException


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None):
    g.error_code = code  # for the request's log line
    response = jsonify(error={"code": code, "message": message})
    response.status_code = status
    response.headers.update(headers or {})
    return response


def known_error_response(e: Exception):
    """The JSON answer to one of our errors or werkzeug's, or None for any other exception."""
    if isinstance(e, ApiError):
        return error_response(e.status, e.code, e.message, e.headers)
    if isinstance(e, HTTPException):
        code = (e.name or "error").lower().replace(" ", "_")
        return error_response(e.code or 500, code, e.description or e.name)
    return None


def init_app(app: Flask) -> None:
    """Turn our errors and werkzeug's (413 from MAX_CONTENT_LENGTH, 404, 405...) into JSON."""
    app.register_error_handler(ApiError, known_error_response)
    app.register_error_handler(HTTPException, known_error_response)
