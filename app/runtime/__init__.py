"""The worker runtime inside one gunicorn process: the model instance, its inference queue with dynamic
batching, the stuck-call guard, request context, metrics and logs."""
