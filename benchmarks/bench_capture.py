"""The capture pass's two shortcuts, eval-mode batch norm as per-channel affines (``BatchNorm.output``) and probes
added in place (``Rule.fresh_output``), each undone alone and both together, paired in one process.

The CIFAR ResNet-18 of ``bench_scale.py rows`` with non-trivial running statistics, one thread, 32 samples, ms of
thread CPU time per sample: the capture's batched pass, the rows (``StructuredRows(routes="rows")``) and a batched
forward+backward; the four variants rotate round by round, medians of 5 rounds (each the median of 3 calls).

    python benchmarks/bench_capture.py
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import thread_cpu_ms  # noqa: E402


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

    from ntkfunc.rules import base

    affine = (norm.BatchNorm.normalise, norm.BatchNorm.output)
    fresh = {cls: cls.__dict__["fresh_output"] for cls in _subclasses(base.Rule) if "fresh_output" in cls.__dict__}
    variants = {"now": (True, True), "batch_norm itself": (False, True), "probes on a copy": (True, False), "before": (False, False)}

    def use(variant: str) -> None:
        bn_affine, in_place = variants[variant]
        norm.BatchNorm.normalise, norm.BatchNorm.output = affine if bn_affine else (before_normalise, lambda self, a, o: None)  # type: ignore[method-assign]
        for cls, value in fresh.items():
            cls.fresh_output = value and in_place  # type: ignore[misc]

    src = StructuredRows(problem, routes="rows")
    buf = torch.empty(n, *src.out_shape, src.slots.width)
    pb = dataclasses.replace(problem, x1_leaves=[x], x2_leaves=None, n1=n, n2=n)

    def cpu_ms(fn: Callable[[], object]) -> float:
        return thread_cpu_ms(fn, per=n)

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    use("before")
    src.compute([x], buf, n)
    reference = buf.clone()
    use("now")
    src.compute([x], buf, n)
    print(f"rows now against before: max_rel_err {max_rel_err(buf, reference):.1e}\n")
    names = list(variants)
    res: dict[str, dict[str, list[float]]] = {v: {"capture": [], "rows": []} for v in names}
    fb: list[float] = []
    for r in range(5):
        fb.append(cpu_ms(fwd_bwd))
        for variant in names[r % len(names):] + names[: r % len(names)]:
            use(variant)
            res[variant]["capture"].append(cpu_ms(lambda: structured.side(pb, src.cap, 1, 0, n)))
            res[variant]["rows"].append(cpu_ms(lambda: src.compute([x], buf, n)))
    use("now")
    fwd = sorted(fb)[len(fb) // 2]
    print(f"forward+backward: {fwd:.2f} ms per sample (rounds: {', '.join(f'{a:.2f}' for a in fb)})\n")
    print("| variant | capture (ms/sample) | rows (ms/sample) | rows / forward+backward | capture rounds | rows rounds |")
    print("|---|---|---|---|---|---|")
    for variant in names:
        cap, rows = (sorted(res[variant][k])[2] for k in ("capture", "rows"))
        print(f"| {variant} | {cap:.2f} | {rows:.2f} | {rows / fwd:.2f} | "
              f"{', '.join(f'{a:.2f}' for a in res[variant]['capture'])} | {', '.join(f'{a:.2f}' for a in res[variant]['rows'])} |")


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


if __name__ == "__main__":
    main()
