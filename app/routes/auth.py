"""``GET /auth``: whether a request carries one of the API keys, for a proxy that asks before it forwards.

On one host nginx checks ``Authorization: Bearer <key>`` itself (a map rendered from
``api_keys_file``). In Kubernetes the Ingress controller asks this route instead (ingress-nginx's
``auth-url``, deploy/k8s/base/ingress.yaml), with the client's headers: 204 lets the request through,
401 refuses it. Same keys file, same header, same answer as at the host. No keys configured: 204.
Without ``Authorization``, a WebSocket subprotocol ``openai-insecure-api-key.<key>`` carries the key
(a browser cannot set headers on a WebSocket), at the host as here.
"""
from __future__ import annotations

import hmac

from flask import Flask, Response, jsonify, request

from app.config import API_KEY_SUBPROTOCOL, Settings


def init_app(app: Flask, settings: Settings) -> None:
    keys = [f"Bearer {key}".encode() for key in settings.api_keys()]

    @app.get("/auth")
    def auth():
        given = credential(request.headers).encode()
        # Compare with every key, in constant time each: no early exit tells which prefix matched.
        if not keys or any([hmac.compare_digest(given, key) for key in keys]):
            return Response(status=204)
        response = jsonify(error={"code": "unauthorized", "message": "send Authorization: Bearer <api key>"})
        response.status_code = 401
        response.headers["WWW-Authenticate"] = 'Bearer realm="asr"'
        return response


def credential(headers) -> str:
    """``Authorization``, or else the key a WebSocket subprotocol offers, as "Bearer <key>" (nginx's
    ``$asr_credential`` map reads the same)."""
    if headers.get("Authorization"):
        return headers["Authorization"]
    for protocol in headers.get("Sec-WebSocket-Protocol", "").split(","):
        protocol = protocol.strip()
        if protocol.startswith(API_KEY_SUBPROTOCOL) and len(protocol) > len(API_KEY_SUBPROTOCOL):
            return "Bearer " + protocol[len(API_KEY_SUBPROTOCOL):]
    return ""
