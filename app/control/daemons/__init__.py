"""The long-running control programs under supervisord: the watcher (liveness) and the autoscaler."""
