"""``ntkfunc verify K.npy [...]``: check kernel files (``kernel_matrix(out=...)`` / ``ntkfunc compute``) and features files.

For each file: its manifest is intact and complete, the ``.npy`` has the recorded header,
shape and size, the manifest lists every tile of its grid, every tile's marker is there and
describes exactly that tile (so every entry is covered once), and (unless ``--quick``) every
tile's entries match the checksum written with them. Features files (``features-<key>.npy`` of
``feature_matrix`` / ``ntkfunc features`` / ``kernel_matrix(sketch=)``) are checked the same way,
chunk by chunk. Prints one line per
file; exit status 0 when all pass, 1 otherwise. argparse -> :func:`ntkfunc.verify_kernel`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from ntkfunc._dataset.kernel_file import verify_kernel


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"ntkfunc verify: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> int:
    p = _Parser(prog="ntkfunc verify", description=__doc__.splitlines()[0])
    p.add_argument("paths", nargs="+", help="kernel files (K.npy) or features files (features-<key>.npy)")
    p.add_argument("--quick", action="store_true", help="do not read the entries (manifest, header, size and markers only)")
    args = p.parse_args(argv)
    status = 0
    for path in args.paths:
        try:
            print(f"ntkfunc verify: {verify_kernel(path, data=not args.quick, api='ntkfunc verify')}")
        except (ValueError, OSError) as err:
            print(f"ntkfunc verify: error: {err}", file=sys.stderr)
            status = 1
    return status
