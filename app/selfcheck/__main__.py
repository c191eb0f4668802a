from app.selfcheck.check import main

raise SystemExit(main())
