"""Coverage of the structured rules on HuggingFace, timm and torchvision models (``explain``), as a table.

For each family of ``examples/_libraries.py`` (random weights, no download): the fraction of
parameters (by count) that a rule handles, the number of parameter tensors that fall back,
and why. ``--size base`` builds the sizes people use (GPT-2 small, BERT-base, a 135M Llama,
ViT-B/8 at 32x32; kernels of a few logits, the same rules); ``tiny`` the test configs.

Run: ``python benchmarks/coverage.py --size base`` (a few minutes on 2 CPU cores); with
``PYTHONPATH`` pointing at another checkout it measures that version of ntkfunc.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
import _libraries as L  # noqa: E402

import ntkfunc  # noqa: E402


def measure(name: str, size: str) -> dict:
    """Coverage of one family: ruled fraction, parameter counts, fallbacks and their reasons."""
    model, x, kw = L.FAMILIES[name].build(size, 0)
    try:
        f, p = ntkfunc.from_module(model, **kw)
        if isinstance(x, dict):
            f(p, x)
    except (TypeError, AttributeError):  # an ntkfunc before from_module's HF conventions: call the model by hand
        _, p = ntkfunc.from_module(model)
        select = kw.get("output", lambda out: out.logits)

        def f(p, x):
            return select(torch.func.functional_call(model, p, (), dict(x)))
    report = ntkfunc.explain(f, p, x, trace_axes=(-1,) if isinstance(x, dict) else ())
    total = sum(torch.Size(r.shape).numel() for r in report.params)
    ruled = sum(torch.Size(r.shape).numel() for r in report.params if r.method == "rule")
    reasons: collections.Counter = collections.Counter()
    for r in report.fallbacks:
        reasons[r.detail] += torch.Size(r.shape).numel()
    return {"family": name, "size": size, "params": total, "ruled": ruled, "coverage": ruled / total,
            "fallback_tensors": len(report.fallbacks), "reasons": dict(reasons.most_common())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("tiny", "base"), default="base")
    ap.add_argument("--family", nargs="*", default=list(L.FAMILIES), help="families to measure (default: all)")
    ap.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    print("| family | parameters | on a rule | fallback tensors | why they fall back |\n|---|---:|---:|---:|---|")
    for name in args.family:
        try:
            row = measure(name, args.size)
        except ImportError as err:
            print(f"| {name} | - | skipped: {err} | | |")
            continue
        rows.append(row)
        why = "; ".join(f"{n:,}: {d}" for d, n in row["reasons"].items()) or "-"
        print(f"| {name} | {row['params']:,} | {100 * row['coverage']:.1f}% | {row['fallback_tensors']} | {why} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
