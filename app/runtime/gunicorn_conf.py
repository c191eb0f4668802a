"""gunicorn settings for one model instance (``gunicorn --config python:app.runtime.gunicorn_conf``).

Values come from the same settings the operator configured (``$ASR_CONFIG`` + ``ASR_*``), with the
per-instance port and id that supervisord (or a Kubernetes pod spec) puts in the environment.
"""
from app.config import load_settings

_settings = load_settings()
_port = _settings.instance_port or _settings.base_port

wsgi_app = "app.routes:create_app()"
bind = f"{_settings.instance_host}:{_port}"
proc_name = _settings.instance_id or f"asr-{_port}"

# One worker = one model in memory. Threads accept requests, answer probes and refuse overload at
# once; the model itself runs on the instance's single inference thread (app/runtime/queue.py).
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

# No gunicorn access log: the app writes one JSON line per request (app/runtime/logs.py) with what gunicorn
# cannot know (instance, audio seconds, error code). gunicorn's own messages go to stderr.
accesslog = None
errorlog = "-"

# supervisord is the control interface. gunicorn >= 25.1 would otherwise open one control socket at
# the same path ($HOME/.gunicorn/gunicorn.ctl) for every instance on the host.
control_socket_disable = True


def post_fork(server, worker):
    """The worker dies with its master.

    If the master is killed (kill -9, OOM killer), an orphaned gthread worker would shut down
    gracefully for up to graceful_timeout while holding the port, so supervisord's replacement could
    not bind. With PR_SET_PDEATHSIG the kernel kills the worker at once; nginx retries its requests on
    another instance.
    """
    import ctypes
    import os
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != worker.ppid:  # the master died before prctl took effect
        os._exit(1)


def post_worker_init(worker):
    """A stop (SIGTERM from supervisord) drains the instance first: live streams finish the turn being
    spoken and close with 1012 while gunicorn waits up to graceful_timeout, rather than being cut off."""
    import signal

    stop = signal.getsignal(signal.SIGTERM)
    inst = getattr(worker.wsgi, "extensions", {}).get("asr_instance")

    def drain_then_stop(signum, frame):
        if inst is not None:
            inst.drain()
        stop(signum, frame)

    if inst is not None and callable(stop):
        signal.signal(signal.SIGTERM, drain_then_stop)
