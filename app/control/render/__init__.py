"""Config files from the plan: supervisord, nginx, systemd and Prometheus targets, from ``templates/``."""
