"""``python -m ntkfunc``: the command-line interface (see :mod:`ntkfunc._cli`)."""

from ntkfunc._cli import main

raise SystemExit(main())
