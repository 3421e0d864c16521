"""Command line: ``ntkfunc [demo]`` runs the embedded default job; ``ntkfunc compute`` a
whole-dataset kernel (:mod:`ntkfunc._cli.compute`); ``ntkfunc verify`` checks kernel files
(:mod:`ntkfunc._cli.verify`). argparse -> public API, no maths."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ntkfunc._cli import demo


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] == "demo":
        return demo.main(argv[1:])
    if argv[0] == "compute":
        from ntkfunc._cli import compute

        return compute.main(argv[1:])
    if argv[0] == "verify":
        from ntkfunc._cli import verify

        return verify.main(argv[1:])
    print(f"ntkfunc: unknown command {argv[0]!r}; expected 'demo', 'compute' or 'verify'", file=sys.stderr)
    return 2
