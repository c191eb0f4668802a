"""Acting on the live system, one module per outside system: supervisord, nginx, the processes we own,
and healing; ``actuator`` applies a plan through them."""
