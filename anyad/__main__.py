from anyad.cli import main

raise SystemExit(main())
