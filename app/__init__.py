"""The speech-recognition service: model instances served by gunicorn behind nginx, run by ``asrctl``.

The data path, one request through one instance: ``routes`` (HTTP: the API, OpenAI's endpoints, jobs,
docs pages) → ``audio`` (decode, VAD, chunking, long-form scheduling, fan-out to siblings) →
``runtime`` (the model instance, its queue and batching, the stuck-call guard, metrics, logs) →
``engines`` → ``formats``. Async ``jobs`` keep their store and runner apart from their routes.

The control path, ``asrctl`` and its daemons: ``control.plan`` (pure placement, policy, the pool) →
``control.render`` (config files from ``templates/``) → ``control.act`` (supervisord, nginx, processes),
with ``control.daemons`` (watcher, autoscaler) running those on a timer. ``hardware`` (NVML, CUDA, CPU
sets) serves both; ``config`` is the one source of settings. ``selfcheck`` is the GPU host self-check.
The data path never imports the control path.
"""
