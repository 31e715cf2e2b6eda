from postfix_mtasts.cli import main

raise SystemExit(main())
