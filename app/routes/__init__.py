"""The HTTP layer of one instance: every route, and the Flask app that serves them.

``create_app`` is the factory gunicorn calls in each worker (``app.routes:create_app()``); tests call it
with their own settings.
"""
from __future__ import annotations


from flask import Flask, g

from app.config import Settings, load_settings


def create_app(settings: Settings | None = None, *, load_in_background: bool = True) -> Flask:
    from app.routes import asr, auth, models, openai, pages, probes, realtime
    from app.runtime import context, logs, metrics
    from app import errors
    from app.runtime.instance import ModelInstance

    settings = settings or load_settings()
    logs.configure()

    app = Flask(__name__)
    # werkzeug refuses larger bodies with 413 before reading them; nginx enforces the same bound.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
    app.json.sort_keys = False

    inst = ModelInstance(settings)
    app.extensions["asr_instance"] = inst

    context.init_app(app)  # first: the request id and start time the other hooks read
    errors.init_app(app)
    metrics.init_app(app, inst)
    logs.init_app(app, inst)
    app.register_blueprint(asr.bp)
    app.register_blueprint(probes.bp)
    app.register_blueprint(openai.bp)
    app.register_blueprint(models.bp)
    app.register_blueprint(realtime.bp)
    if settings.jobs:
        from app.routes import jobs as jobs_api

        app.request_class = jobs_api.UploadRequest  # spools a job's upload to disk, never to memory
        app.register_blueprint(jobs_api.bp)
    auth.init_app(app, settings)
    pages.init_app(app, settings)  # after the API modules: it documents their routes

    @app.after_request
    def _echo_request_id(response):
        response.headers["X-Request-ID"] = g.get("request_id", "")
        response.headers["X-ASR-Instance"] = inst.id
        return response

    if load_in_background:
        inst.start_loading()
    else:
        inst.load_now()
    return app
