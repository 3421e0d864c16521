"""Eval-mode ``batch_norm`` in the capture pass: as per-channel affines (``BatchNorm.output``, now) against
``batch_norm`` itself (before), paired in one process.

The CIFAR ResNet-18 of ``bench_scale.py rows`` with non-trivial running statistics, one thread, 32 samples, ms of
thread CPU time per sample: the capture's batched pass, the rows (``StructuredRows(routes="rows")``) and a batched
forward+backward; the two ways alternate round by round, medians of 5 rounds (each the median of 3 calls).

    python benchmarks/bench_capture_bn.py
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    import bench_scale

    import ntkfunc
    from ntkfunc._core.heap import settle_heap
    from ntkfunc._core.problem import make_problem
    from ntkfunc._engines.rows.structured import StructuredRows
    from ntkfunc._engines.structured import kernel as structured
    from ntkfunc.rules import norm
    from ntkfunc.testing import max_rel_err

    settle_heap()
    model, x = bench_scale.rows_models()["resnet18 (1 logit)"]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    f, params = ntkfunc.from_module(model)
    n = x.shape[0]
    problem = make_problem(f, x[:1], None, params, 0, (), ())

    def before_normalise(self, a):  # type: ignore[no-untyped-def]
        if a["training"]:
            return F.batch_norm(a["input"], None, None, None, None, True, 0.0, a["eps"])
        return F.batch_norm(a["input"], a["running_mean"], a["running_var"], None, None, False, 0.0, a["eps"])

    ways = {"now": (norm.BatchNorm.normalise, norm.BatchNorm.output), "before": (before_normalise, lambda self, a, o: None)}

    def use(way: str) -> None:
        norm.BatchNorm.normalise, norm.BatchNorm.output = ways[way]  # type: ignore[method-assign]

    src = StructuredRows(problem, routes="rows")
    buf = torch.empty(n, *src.out_shape, src.slots.width)
    pb = dataclasses.replace(problem, x1_leaves=[x], x2_leaves=None, n1=n, n2=n)

    def cpu_ms(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.thread_time()
            fn()
            times.append(time.thread_time() - t0)
        return 1000 * sorted(times)[1] / n

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    use("before")
    src.compute([x], buf, n)
    reference = buf.clone()
    use("now")
    src.compute([x], buf, n)
    print(f"rows now against before: max_rel_err {max_rel_err(buf, reference):.1e}")
    res: dict[str, list[float]] = {}
    for r in range(5):
        res.setdefault("forward+backward", []).append(cpu_ms(fwd_bwd))
        for way in ("before", "now") if r % 2 == 0 else ("now", "before"):
            use(way)
            res.setdefault(f"{way}: capture", []).append(cpu_ms(lambda: structured.side(pb, src.cap, 1, 0, n)))
            res.setdefault(f"{way}: rows", []).append(cpu_ms(lambda: src.compute([x], buf, n)))
    med = {k: sorted(v)[len(v) // 2] for k, v in res.items()}
    print("| measure | median (ms/sample) | rounds |\n|---|---|---|")
    for k, v in sorted(res.items()):
        print(f"| {k} | {med[k]:.2f} | {', '.join(f'{a:.2f}' for a in v)} |")
    fb = med["forward+backward"]
    print(f"\nrows / forward+backward: before {med['before: rows'] / fb:.2f}, now {med['now: rows'] / fb:.2f}")


if __name__ == "__main__":
    main()
