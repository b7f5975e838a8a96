from picoalign.cli import main

raise SystemExit(main())
