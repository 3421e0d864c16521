"""Command line: ``ntkfunc [demo]`` runs the embedded default job; ``ntkfunc compute`` a
whole-dataset kernel (:mod:`ntkfunc._cli.compute`); ``ntkfunc features`` a dataset's sketched
per-sample gradients (:mod:`ntkfunc._cli.features`); ``ntkfunc verify`` checks kernel files
(:mod:`ntkfunc._cli.verify`). argparse -> public API, no maths."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ntkfunc._cli import demo

COMMANDS = {
    "demo": "the full eNTK of a small CNN on shipped digits with every implementation (the default)",
    "compute": "a whole-dataset kernel written to a resumable .npy (ntkfunc compute --help)",
    "features": "sketched per-sample gradients of a dataset written to resumable .npy files (ntkfunc features --help)",
    "verify": "check kernel and features files written by compute, features or kernel_matrix (ntkfunc verify --help)",
}


def parser() -> argparse.ArgumentParser:
    """The top-level parser, for ``ntkfunc --help``: each verb parses its own arguments."""
    p = argparse.ArgumentParser(prog="ntkfunc", description="Empirical neural tangent kernels of PyTorch models.")
    verbs = p.add_subparsers(title="commands", metavar="{" + ",".join(COMMANDS) + "}")
    for name, text in COMMANDS.items():
        verbs.add_parser(name, help=text, add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        parser().print_help()
        return 0
    if not argv or argv[0] == "demo":
        return demo.main(argv[1:])
    if argv[0] == "compute":
        from ntkfunc._cli import compute

        return compute.main(argv[1:])
    if argv[0] == "features":
        from ntkfunc._cli import features

        return features.main(argv[1:])
    if argv[0] == "verify":
        from ntkfunc._cli import verify

        return verify.main(argv[1:])
    print(f"ntkfunc: unknown command {argv[0]!r}; expected 'demo', 'compute', 'features' or 'verify' (ntkfunc --help lists them)", file=sys.stderr)
    return 2
