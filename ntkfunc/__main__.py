"""``python -m ntkfunc``: the command-line interface (see ``ntkfunc.cli``)."""

from ntkfunc.cli import main

raise SystemExit(main())
