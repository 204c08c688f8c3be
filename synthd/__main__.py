from synthd.cli import main

raise SystemExit(main())
