"""``asrctl`` and what it runs: plan (pure) → render (files) → act (live system), and the daemons."""
