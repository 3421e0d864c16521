"""``ntkfunc features``: sketched per-sample gradients of a dataset written to resumable ``.npy`` files (argparse -> ``feature_matrix``).

Takes the model and data arguments of ``ntkfunc compute`` (``--model``, ``--weights``, ``--data``,
``--test``, ``--range``, ``--dtype``, ``--seed``, ``--device``) and a sketch (``--sketch-dim``,
``--sketch-seed``, ``--sketch-kind``), and writes the features ``J(x) Π`` of the kernel's rows (and,
with a test split, of its columns) into the folder ``--out`` as ``features-<key>.npy``: exactly the
files ``ntkfunc compute`` with the same arguments and ``--features`` that folder reads, so its kernel
computes no gradient again. A killed run resumes (``--no-resume`` starts over). Bad arguments print
one line and exit with status 2 before anything is written; a run that is refused prints one line
and exits with status 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from ntkfunc._cli.compute import DEFAULT_DATA, DEFAULT_MODEL, UsageError, _check_budget, _check_model_runs, _data, _devices, _implementation, _model, _sketch
from ntkfunc._core.memory import fmt_bytes

DEFAULT_OUT = Path("out/features")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ntkfunc features", description="Sketched per-sample gradients of a dataset (ntkfunc.feature_matrix), written "
                "to resumable, checksummed .npy files that ntkfunc compute --features reuses.")
    p.add_argument("--sketch-dim", type=int, required=True, help="features per output (ntkfunc.Sketch's dim; required)")
    p.add_argument("--sketch-seed", type=int, default=0, help="seed of the projection (default 0)")
    p.add_argument("--sketch-kind", default="auto", help="auto (default), countsketch, tensorsketch or gaussian")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"package.module:factory returning an nn.Module (default {DEFAULT_MODEL})")
    p.add_argument("--weights", type=Path, help="state_dict file (.pt) loaded with torch.load(weights_only=True)")
    p.add_argument("--data", default=DEFAULT_DATA, help=f"digits[_a_b[_c_d]], a .npy/.pt file or a folder (default {DEFAULT_DATA})")
    p.add_argument("--test", help="test split for file/folder data (rows after the training rows, as ntkfunc compute)")
    p.add_argument("--range", dest="ranges", help="a_b or a_b_c_d: train[a:b] (and test[c:d])")
    p.add_argument("--pntk", action="store_true", help="features of the sum of logits / sqrt(O) (ntkfunc compute --kernel pntk)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder of the features files (default {DEFAULT_OUT})")
    p.add_argument("--implementation", help="how per-sample gradients are formed: auto (default), 3 or 1")
    p.add_argument("--memory-budget", help="bytes or e.g. 4GB (default: half the available RAM, 80%% of free GPU memory)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True, help="continue an interrupted run (default) or start over")
    p.add_argument("--overwrite", action="store_true", help="replace a file at a features file's path that is not one (refused by default)")
    p.add_argument("--devices", help="'all' or a comma-separated list such as cuda:0,cuda:1 (default: the model's device)")
    p.add_argument("--device", default="cpu", help="device the model is moved to (default cpu)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--seed", type=int, default=0, help="seed set before the model factory runs (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from ntkfunc._dataset.feature_writer import feature_matrix
    from ntkfunc.module import from_module

    try:
        args = parser().parse_args(argv)
        sketch = _sketch(args.sketch_dim, args.sketch_seed, args.sketch_kind)
        _check_out(args)
        dtype = getattr(torch, args.dtype)
        model = _model(args.model, args.weights, args.seed, dtype, args.device)
        x1, x2, desc = _data(args.data, args.test, args.ranges, dtype)
        impl = _implementation(args.implementation)
        _check_budget(args.memory_budget)
        devices = _devices(args.devices)
        f, params = from_module(model.eval())
        _check_model_runs(f, params, x1, x2, args.model, desc)
    except UsageError as err:
        print(f"ntkfunc features: error: {err}", file=sys.stderr)
        return 2

    n_params = sum(p.numel() for p in params.values())
    print(f"ntkfunc features: sketched features (dim={sketch.dim}, seed={sketch.seed}, kind={sketch.kind}) of {args.model} "
          f"({n_params:,} parameters) on {desc} -> {args.out}")
    sides: list[tuple[str, Any]] = [("rows", x1)] + ([] if x2 is None else [("columns", x2)])
    for name, x in sides:
        start = time.perf_counter()
        try:
            feats = feature_matrix(f, params, x, sketch, out=args.out, pntk=args.pntk, implementation=impl,
                                   memory_budget=args.memory_budget, resume=args.resume, progress=not args.no_progress,
                                   devices=devices, overwrite=args.overwrite)
        except (ValueError, TypeError, MemoryError, FloatingPointError, RuntimeError, OSError) as err:
            text = err.strerror if isinstance(err, OSError) and err.strerror and err.filename is None else str(err)
            print(f"ntkfunc features: error: {text}", file=sys.stderr)
            return 1
        t = feats.tensor
        print(f"  {name}: {tuple(t.shape)} {str(t.dtype).replace('torch.', '')} ({fmt_bytes(t.numel() * t.element_size())}) in "
              f"{time.perf_counter() - start:.1f} s; saved {feats.path}")
    print(f"  sketch: {feats.plan['resolved']}{' (exact)' if feats.plan['exact'] else ''}; ntkfunc compute with the same --model, "
          f"--data and --sketch-* arguments{' and --kernel pntk' if args.pntk else ''} and --features {args.out} reuses them")
    return 0


def _check_out(args: argparse.Namespace) -> None:
    """``--out`` is a folder (or a path where one can be made), and not a data folder or inside one."""
    out = args.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file; expected a folder for the features files (or a path where one can be made)")
    if out.suffix == ".npy":
        raise UsageError(f"--out {out}: expected a folder (the features are written into it as features-<key>.npy), not a .npy path")
    for flag, value in (("--data", args.data), ("--test", args.test)):
        if value is not None and Path(value).is_dir():
            source = Path(value).resolve()
            if out.resolve() == source or source in out.resolve().parents:
                raise UsageError(f"--out {out}: is inside the {flag} folder {value}, whose .npy files are the samples; "
                                 "expected a folder outside it")
