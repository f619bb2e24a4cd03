"""`python -m harmonicd` runs the command-line tool (harmonicctl)."""

from harmonicd.cli import main

raise SystemExit(main())
