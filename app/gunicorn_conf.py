"""gunicorn settings for one model instance (``gunicorn --config python:app.gunicorn_conf``).

Values come from the same settings the operator configured (``$ASR_CONFIG`` + ``ASR_*``), with the
per-instance port and id that supervisord (or a Kubernetes pod spec) puts in the environment.
"""
from app.config import load_settings

_settings = load_settings()
_port = _settings.instance_port or _settings.base_port

wsgi_app = "app:create_app()"
bind = f"{_settings.instance_host}:{_port}"
proc_name = _settings.instance_id or f"asr-{_port}"

# One worker = one model in memory. Threads accept requests, answer probes and refuse overload at
# once; the model itself runs on the instance's single inference thread (app/queue.py).
workers = 1
worker_class = "gthread"
threads = _settings.gunicorn_threads

# gthread workers heartbeat from their main loop, so a long inference does not trip this.
timeout = 60
# A graceful stop waits for the request in flight; supervisord's stopwaitsecs is longer still.
graceful_timeout = _settings.graceful_timeout_seconds
# Longer than nginx's upstream keepalive_timeout (60 s), so nginx never reuses a connection
# gunicorn is closing.
keepalive = 75

accesslog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms rid=%({x-request-id}i)s'
errorlog = "-"
