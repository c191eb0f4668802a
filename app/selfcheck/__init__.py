"""The GPU host self-check (``python -m app.selfcheck``), with the speech and random models it uses."""
