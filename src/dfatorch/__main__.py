"""``python -m dfatorch``: the command line."""

from .cli import main

raise SystemExit(main())
