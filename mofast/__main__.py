from mofast.cli import main

raise SystemExit(main())
