from bench import stop_on_sigterm
from bench.cli import main

stop_on_sigterm()
raise SystemExit(main())
