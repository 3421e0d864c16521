"""Lower bounds, from this machine's own measured rates, for the per-sample rows and the sketched features of the CIFAR
ResNet-18 (one logit), against a batched forward+backward of the same samples (issue 23's goals on rows and sketches).

Every figure is thread CPU time on one thread, ms per sample, on 32 samples, the median of ``--rounds`` rounds (each
round the median of 3 calls after a warm-up), all in this one process:

- **forward+backward**: ``model(x).sum().backward()``, the issue's yardstick;
- **floor**: a forward and the input half of a backward (``autograd.grad`` with respect to ``x``, every parameter
  frozen). A per-sample gradient of every layer needs the cotangent at every layer's output, so no per-sample method
  runs less than this pass (it also forms the stem's input gradient, 3.5 MFLOP of the model's 1.1 GFLOP backward);
- **products**: each kernel's per-sample weight gradient, the faster of two ways: ``(C_out x S) @ (S x C_in kh kw)``
  as one ``mm`` per sample into a reused, cache-resident result (the GEMM shape alone: no im2col, no write to the
  rows), and the weight half of one convolution backward with the samples folded into the groups (what
  ``vmap(grad)`` runs; convolutions only);
- **writes**: filling the ``(32, P)`` rows once, already paged in (the rows' own memory traffic);
- **FFTs**: the two length-``dim`` real FFTs per position that TensorSketch takes per layer and sample (its product,
  sum and inverse FFT left out).

The bounds leave out everything else a method does (im2col, folds, hashing, bias and batch-norm rows, the last
linear layer), so each is below what any implementation of that method can reach here:

- rows >= floor + sum of products + writes;
- count-sketch or TensorSketch features >= floor + sum over layers of min(product, FFTs): the cheaper of forming the
  layer's per-sample gradient (which a count sketch of it needs) and TensorSketch's FFTs, per layer.

The same process also times the rows (``StructuredRows``) and the ``Sketch(dim)`` features (``ProjectedRows``,
``"auto"``) as they are, and the rows' writes parameter by parameter (``StructuredRows.write`` from one side pass),
grouped by shape, against each group's product and writes.

    python benchmarks/bench_bounds.py [--rounds 5] [--dim 8192]

``--grads MODEL`` instead bounds the per-sample gradients of ``bench_peers.py``'s per-sample cross-entropy on its
``mlp``, ``cnn`` or ``resnet18`` (``--n`` samples, default 64, 64, 16; the peers' sizes), the row of issue 22 where
``torch.func``'s ``vmap(grad)`` is the peer to beat:

- **floor**: the forward and the input half of the backward down to the first weight layer's output (parameters
  frozen, that output made the leaf: nothing below it is formed);
- **products**: as above, per weight of a convolution or linear layer (a linear layer on one position: the outer
  product, one ``mm`` of inner size 1);
- **writes**: filling the ``(N, P)`` gradients once, already paged in;
- **bound** = floor + products + writes (biases, im2col and the loss left out);
- **a fresh result**: ``torch.empty(N, P).fill_(1)``, allocation and first touch included. Both ``vmap(grad)`` and
  ``jacobian_fn`` return new tensors, and glibc serves a block above 32 MiB (``ntkfunc._core.heap``) with a fresh
  ``mmap`` whose pages the kernel faults in and zeroes on first touch; the **bound for a new result** = floor +
  products + this fill (the writes counted once);

against ``vmap(grad)`` (``bench_peers.vmap_grad``), ``ntkfunc.jacobian_fn`` of the loss (its default call, warm; and
with ``out=`` one reused buffer) and the rules' way forced (``StructuredRows``, into one reused buffer), each in ms per
sample and as a multiple of both bounds:

    python benchmarks/bench_bounds.py --grads cnn [--n 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import thread_cpu_ms  # noqa: E402


def kernels(model, x):  # type: ignore[no-untyped-def]
    """Per weight of a convolution or linear layer: ``(name, C_out, S, C_in kh kw)`` for one sample, and per
    convolution its module and input shape."""
    import torch

    shapes, convs, hooks = [], {}, []
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            def hook(mod, inp, out, name=name):  # type: ignore[no-untyped-def]
                s = out[0, 0].numel() if out.ndim == 4 else 1
                shapes.append((name, mod.weight.shape[0], s, mod.weight[0].numel()))
                if out.ndim == 4:
                    convs[name] = (mod, tuple(inp[0].shape[1:]), tuple(out.shape[1:]))
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(x[:1])
    for h in hooks:
        h.remove()
    return shapes, convs


def grads_bound(name: str, n: int | None, rounds: int) -> None:
    """``--grads``: the per-sample gradients of the peers' loss on ``name`` against their lower bound (module docstring)."""
    import torch
    from peer_models import load

    ntkfunc, bp = load(threads=1)
    from ntkfunc._core.heap import settle_heap
    from ntkfunc._core.problem import make_problem
    from ntkfunc._engines.rows import structured as rows_mod

    settle_heap()
    model, x, y = bp.build(name, n or bp.config(False)[name]["grads"])
    n = x.shape[0]
    params = bp.named_params(model)
    loss = bp.per_sample_loss(model)
    shapes, convs = kernels(model, x)
    width = sum(p.numel() for p in params.values())
    first = next(m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))

    def cpu_ms(fn: Callable[[], object]) -> float:
        return thread_cpu_ms(fn, per=n)

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y, reduction="sum").backward()

    def floor() -> None:
        leaf: list[torch.Tensor] = []

        def as_leaf(mod, inp, out):  # type: ignore[no-untyped-def]
            leaf.append(out.requires_grad_())
            return out

        hook = first.register_forward_hook(as_leaf)
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y, reduction="sum"), leaf)
        finally:
            hook.remove()
            for p in model.parameters():
                p.requires_grad_(True)

    product = _products(shapes, n)

    grads, reused = torch.zeros(n, width), torch.zeros(n, width)
    jac = ntkfunc.jacobian_fn(loss)
    problem = make_problem(loss, (x[:1], y[:1]), None, params, 0, (), ())
    rules = rows_mod.StructuredRows(problem, routes="rows")
    rules.buffers.seconds[("rows", n)] = {rows_mod.WARM: 0.0, rows_mod.RULES: 0.0, rows_mod.VMAP: math.inf}
    rows = torch.empty(n, *rules.out_shape, rules.slots.width)
    measured: dict[str, list[float]] = {}
    for _ in range(rounds):
        for key, fn in [("forward+backward", forward_backward), ("floor", floor), ("writes", lambda: grads.fill_(1.0)),
                        ("vmap(grad)", lambda: bp.vmap_grad(model, x, y)), ("jacobian_fn", lambda: jac((x, y), params)),
                        ("jacobian_fn out", lambda: jac((x, y), params, out=reused)),
                        ("rules", lambda: rules.compute([x, y], rows, n)), ("fresh", lambda: torch.empty(n, width).fill_(1.0))]:
            measured.setdefault(key, []).append(cpu_ms(fn))
        for shape in sorted({(r, s, d) for _, r, s, d in shapes}):
            measured.setdefault(f"product {shape}", []).append(cpu_ms(product(*shape)))
        for conv in convs:
            measured.setdefault(f"grouped {conv}", []).append(cpu_ms(_grouped(convs[conv], n)))
    med = {k: statistics.median(v) for k, v in measured.items()}
    products = 0.0
    print(f"{name}, {width:,} parameters, per-sample cross-entropy, {n} samples, one thread, medians of {rounds} rounds, "
          "ms of thread CPU time per sample\n")
    print("| layer | C_out x S x C_in kh kw | `mm` (ms) | grouped convolution (ms) |")
    print("|---|---|---|---|")
    for layer, r, s, d in shapes:
        mm, grouped = med[f"product {(r, s, d)}"], med.get(f"grouped {layer}", math.inf)
        products += min(mm, grouped)
        print(f"| {layer} | {r} x {s} x {d} | {mm:.3f} | {f'{grouped:.3f}' if math.isfinite(grouped) else '—'} |")
    bound = med["floor"] + products + med["writes"]
    fresh_bound = med["floor"] + products + med["fresh"]
    print(f"| all {len(shapes)} | | products, the faster way: {products:.3f} | |\n")
    print(f"The result: {n} x {width:,} float32, {n * width * 4 / 2**20:.0f} MiB.\n")
    print("| quantity | ms per sample | / bound | / bound for a new result | / vmap(grad) |")
    print("|---|---|---|---|---|")
    for label, value in [("forward+backward (batched)", med["forward+backward"]), ("floor: forward + input backward", med["floor"]),
                         ("products, the faster way", products), ("writes of the gradients, paged in", med["writes"]),
                         ("a new result: allocation and first touch", med["fresh"]),
                         ("**lower bound** (floor + products + writes)", bound),
                         ("**lower bound for a new result** (floor + products + new result)", fresh_bound),
                         ("`vmap(grad)`", med["vmap(grad)"]), ("`jacobian_fn(loss)`, its default call", med["jacobian_fn"]),
                         ("`jacobian_fn(loss)`, `out=` one reused buffer", med["jacobian_fn out"]),
                         ("the rules' way, forced, into one reused buffer", med["rules"])]:
        print(f"| {label} | {value:.3f} | {value / bound:.2f} | {value / fresh_bound:.2f} | {value / med['vmap(grad)']:.2f} |")


def _products(shapes: list, n: int) -> Callable[[int, int, int], Callable[[], object]]:
    """``product(r, s, d)``: a call forming ``n`` per-sample products ``(r x s) @ (s x d)``, one ``mm`` each into one
    reused, cache-resident result (random factors made once per shape of ``shapes``)."""
    import torch

    factors = {(r, s, d): (torch.randn(n, r, s), torch.randn(n, s, d), torch.empty(r, d)) for _, r, s, d in shapes}

    def product(r: int, s: int, d: int) -> Callable[[], object]:
        a, b, out = factors[(r, s, d)]
        return lambda: [torch.mm(a[i], b[i], out=out) for i in range(n)]

    return product


def _grouped(conv: tuple, n: int) -> Callable[[], object]:
    """The weight half of one convolution backward with ``n`` samples folded into the groups (``vmap(grad)``'s way)."""
    import torch

    mod, (ci, h, w), (co, ho, wo) = conv
    xs, gy = torch.randn(1, n * ci, h, w), torch.randn(1, n * co, ho, wo)
    weight = xs.new_empty(1).expand(n * co, ci, *mod.kernel_size)
    return lambda: torch.ops.aten.convolution_backward(gy, xs, weight, None, list(mod.stride), list(mod.padding),
                                                       list(mod.dilation), False, [0, 0], n, [False, True, False])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--grads", choices=["mlp", "cnn", "resnet18"], default=None,
                        help="instead: the per-sample gradients of the peers' loss on this model (module docstring)")
    parser.add_argument("--n", type=int, default=None, help="samples with --grads (default: the peers' size)")
    args = parser.parse_args()
    if args.grads:
        grads_bound(args.grads, args.n, args.rounds)
        return

    import dataclasses

    import torch

    torch.set_num_threads(1)
    from bench_blocked import ResNet18

    import ntkfunc
    from ntkfunc._core.heap import settle_heap
    from ntkfunc._core.problem import make_problem
    from ntkfunc._engines.rows.projected import ProjectedRows
    from ntkfunc._engines.rows.structured import StructuredRows
    from ntkfunc._engines.structured import kernel as structured

    settle_heap()
    torch.manual_seed(0)
    model = ResNet18(classes=1).eval()
    x = torch.randn(32, 3, 32, 32)
    n = x.shape[0]
    f, params = ntkfunc.from_module(model)
    problem = make_problem(f, x[:1], None, params, 0, (), ())
    rows_src = StructuredRows(problem, routes="rows")
    rows = torch.empty(n, *rows_src.out_shape, rows_src.slots.width)
    sketch_src = ProjectedRows(problem, "auto", args.dim, 0, True)
    features = torch.empty(n, 1, args.dim)
    width = rows_src.slots.width
    shapes, convs = kernels(model, x)

    def cpu_ms(fn: Callable[[], object]) -> float:
        return thread_cpu_ms(fn, per=n)

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    xr = x.clone().requires_grad_(True)

    def floor() -> None:
        for p in model.parameters():
            p.requires_grad_(False)
        torch.autograd.grad(model(xr).sum(), xr)
        for p in model.parameters():
            p.requires_grad_(True)

    product = _products(shapes, n)

    spectra = {s: torch.randn(2 * s, args.dim) for _, _, s, _ in shapes}

    def ffts(s: int) -> Callable[[], object]:
        v = spectra[s]
        return lambda: [torch.fft.rfft(v) for _ in range(n)]

    pb = dataclasses.replace(problem, x1_leaves=[x], x2_leaves=None, n1=n, n2=n)
    rows_src.compute([x], rows, n)  # the rules' measured ways chosen before the side pass below
    side = structured.side(pb, rows_src.cap, 1, 0, n)
    shapes_of = [tuple(p.shape) for p in model.parameters()]

    def write(k: int) -> Callable[[], object]:
        view = rows[..., rows_src.slots.slot(k)]
        return lambda: rows_src.write(pb, side, k, view)

    rows.fill_(0.0)  # paged in once, as the rows' buffer is reused
    measured: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        measured.setdefault(key, []).append(value)

    for _ in range(args.rounds):
        add("forward+backward", cpu_ms(forward_backward))
        add("floor", cpu_ms(floor))
        add("writes", cpu_ms(lambda: rows.fill_(1.0)))
        for shape in sorted({(r, s, d) for _, r, s, d in shapes}):
            add(f"product {shape}", cpu_ms(product(*shape)))
        for name in convs:
            add(f"grouped {name}", cpu_ms(_grouped(convs[name], n)))
        for s in sorted({s for _, _, s, _ in shapes}):
            add(f"ffts {s}", cpu_ms(ffts(s)))
        for k in rows_src.slots.leaves:
            add(f"write {k}", cpu_ms(write(k)))
        add("rows (now)", cpu_ms(lambda: rows_src.compute([x], rows, n)))
        add("features (now)", cpu_ms(lambda: sketch_src.compute([x], features, n)))
    med = {k: statistics.median(v) for k, v in measured.items()}

    fb = med["forward+backward"]
    print(f"ResNet-18 (one logit), {sum(p.numel() for p in model.parameters()):,} parameters, P = {width:,} row "
          f"entries, 32 samples, one thread, dim = {args.dim}, medians of {args.rounds} rounds, ms of thread CPU time "
          "per sample\n")
    print("| layer | C_out x S x C_in kh kw | `mm` (ms) | grouped convolution (ms) | TensorSketch FFTs (ms) | cheapest |")
    print("|---|---|---|---|---|---|")
    products = fft_total = cheaper_total = 0.0
    for name, r, s, d in shapes:
        ways = {"mm": med[f"product {(r, s, d)}"], "grouped": med.get(f"grouped {name}", float("inf"))}
        p, q = min(ways.values()), med[f"ffts {s}"]
        products += p
        fft_total += q
        cheaper_total += min(p, q)
        cheapest = min({**ways, "FFTs": q}.items(), key=lambda kv: kv[1])[0]
        grouped_ms = f"{ways['grouped']:.3f}" if math.isfinite(ways["grouped"]) else "—"
        print(f"| {name} | {r} x {s} x {d} | {ways['mm']:.3f} | {grouped_ms} | {q:.3f} | {cheapest} |")
    print(f"| all {len(shapes)} | | products, the faster way: {products:.2f} | | {fft_total:.2f} | {cheaper_total:.2f} |\n")
    print("The rows' writes parameter by parameter, grouped by shape, against products plus writes:\n")
    print("| parameters | count | writes, measured (ms) | product + writes (ms) | above |")
    print("|---|---|---|---|---|")
    per_entry = med["writes"] / width
    bound_of = {}
    for name, r, s, d in shapes:
        ways = [med[f"product {(r, s, d)}"], med.get(f"grouped {name}", float("inf"))]
        bound_of[(r, d)] = min(ways) + r * d * per_entry
    groups: dict[tuple[int, ...], list[float]] = {}
    for k in rows_src.slots.leaves:
        groups.setdefault(shapes_of[k], []).append(med[f"write {k}"])
    measured_total = bound_total = 0.0
    for shape, times in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
        matrix = (shape[0], math.prod(shape[1:])) if len(shape) > 1 else None
        bound = len(times) * bound_of[matrix] if matrix in bound_of else 0.0
        measured_total += sum(times)
        bound_total += bound
        print(f"| {'x'.join(map(str, shape))} | {len(times)} | {sum(times):.2f} | {bound:.2f} | {sum(times) - bound:.2f} |")
    print(f"| all | | {measured_total:.2f} | {bound_total:.2f} | {measured_total - bound_total:.2f} |\n")
    rows_bound = med["floor"] + products + med["writes"]
    features_bound = med["floor"] + cheaper_total
    print("| quantity | ms per sample | / forward+backward |")
    print("|---|---|---|")
    for label, value in [
        ("forward+backward", fb),
        ("floor: forward + input backward", med["floor"]),
        ("weight half of the backward (forward+backward - floor)", fb - med["floor"]),
        ("writes of the rows", med["writes"]),
        ("**rows, lower bound** (floor + products + writes)", rows_bound),
        ("rows, measured", med["rows (now)"]),
        ("**features, lower bound** (floor + cheaper of product and FFTs per layer)", features_bound),
        ("features, measured", med["features (now)"]),
    ]:
        print(f"| {label} | {value:.2f} | {value / fb:.2f} |")


if __name__ == "__main__":
    main()
