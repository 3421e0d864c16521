"""ntkfunc against the PyTorch libraries a user would pick instead, in one process (issue 22).

Peers (benchmark-only, installed into their own environment by ``benchmarks/peers_setup.sh``;
none of them is a dependency of ntkfunc): nngeometry 0.4 (``GramMatrix``, ``Jacobian``), ASDL
(asdfghjkl 0.1a5: ``empirical_direct_ntk``, ``empirical_class_wise_direct_ntk``,
``batch_gradient``), BackPACK 1.7.1 (``BatchGrad``), Opacus 1.6.0 (``GradSampleModule``), TRAK
0.3.2 (``BasicProjector``, its CPU projector), and the two methods of the torch.func NTK tutorial
(Jacobian contraction, NTK-vector products) plus ``vmap(grad)``.

Rows (the same model object's weights and the same inputs for every method of a row):

- ``full``: the full eNTK ``(N, N, O, O)`` of ``x`` with itself (``ntk_fn(f, trace_axes=())``);
- ``traced``: the output-averaged eNTK ``(N, N)`` (``ntk_fn(f)``; peers: their full kernel traced,
  ASDL's class-wise kernel averaged over classes, the tutorial's ``"trace"`` contraction);
- ``grads``: per-sample gradients of the summed cross-entropy, ``(N, *θ)`` per parameter
  (``jacobian_fn`` of the per-sample loss; also with ``out=``, one ``(N, P)`` buffer passed to every call as a
  training loop would, a row of its own: the ratios stay against the default call);
- ``projected``: per-sample gradients of that loss projected to ``k`` features
  (``features_fn(loss, Sketch(k))``) against TRAK's pipeline (``vmap(grad)``, TRAK's gradient
  computer, then ``BasicProjector`` with Gaussian ``Π``), timed, and the relative Frobenius error of
  the kernel ``F Fᵀ`` (TRAK: ``F Fᵀ / k``) against the exact ``G Gᵀ``, mean over ``--seeds``.

ntkfunc rows use its DEFAULT call (no ``implementation`` argument). Models: an MLP 784-512-512-10
(669,706 parameters), a small CNN (``bench_impls.py``'s, 3x32x32 input, 97k parameters) and the
CIFAR ResNet-18 of ``bench_impls.py`` (11.2M parameters, BatchNorm in eval mode).

Checks: every method's first call is compared with a float64 reference (``torch.func.jacrev``
per sample on a float64 copy of the model, then the contraction; nothing of ntkfunc), computed on
the first ``check_n`` inputs of the row (all of them except for ResNet-18's kernels, where the
float64 Jacobians of more samples would not fit this machine; those methods are also called on
that subset); ``err`` is ``max |K - K_ref| / max |K_ref|`` (per-sample gradients: over all
entries). A method that fails its check (``> --tol``) is reported and not timed.

Timing: after the check call, ``--reps`` rounds call every method of the row once each, in turn
(interleaved: all methods see the same machine load), each round starting one method later (the first
call after a round's garbage collection, and after the other libraries' allocations, pays for them:
about 5 % of the small CNN's per-sample gradients when ``ntkfunc`` always went first); the table gives the median wall seconds and
the median process CPU seconds of each method, and the ratio peer / ntkfunc of both. With one
thread (default ``--threads 1``) CPU seconds are the steadier measure on a shared machine.

    bash benchmarks/peers_setup.sh                                   # once: benchmarks/.venv-peers
    benchmarks/.venv-peers/bin/python benchmarks/bench_peers.py      # everything, a few minutes
    benchmarks/.venv-peers/bin/python benchmarks/bench_peers.py --quick --only mlp
    benchmarks/.venv-peers/bin/python benchmarks/bench_peers.py --out /tmp/peers.md --json /tmp/peers.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's ntkfunc, not an installed one
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap  # noqa: E402

import ntkfunc  # noqa: E402

Result = Any
Method = Callable[[], Result]


# --- models -----------------------------------------------------------------------------


def _bench_impls_models():  # type: ignore[no-untyped-def]
    import importlib.util

    spec = importlib.util.spec_from_file_location("_bench_impls", os.path.join(ROOT, "benchmarks", "bench_impls.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod._models()


def build(name: str, n: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """``(model.eval(), x, y)`` for a model name, seeded."""
    torch.manual_seed(0)
    models = _bench_impls_models()
    if name == "mlp":
        model: nn.Module = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                                         nn.Linear(512, 10))
        x = torch.randn(n, 784)
    elif name == "cnn":
        model, x = models["cnn"](), torch.randn(n, 3, 32, 32)
    elif name == "resnet18":
        model, x = models["resnet18"](), torch.randn(n, 3, 32, 32)
        with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.1, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
    else:
        raise ValueError(f"unknown model {name!r}")
    model.eval()
    return model, x, torch.randint(0, 10, (n,))


def named_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


# --- float64 reference (torch.func only) ---------------------------------------------------


def reference_jacobian(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 ``(N, O, P)`` (``y`` given: ``(N, P)``, the per-sample cross-entropy's gradient), sample by sample."""
    m64 = copy.deepcopy(model).double()
    p64 = named_params(m64)
    buffers = {k: v for k, v in m64.named_buffers()}

    def single(p, xi, yi):  # type: ignore[no-untyped-def]
        out = functional_call(m64, (p, buffers), (xi.unsqueeze(0),))
        if yi is None:
            return out.squeeze(0)
        return F.cross_entropy(out, yi.unsqueeze(0), reduction="sum")

    rows = []
    for i in range(x.shape[0]):
        j = jacrev(single)(p64, x[i].double(), None if y is None else y[i])
        rows.append(torch.cat([v.reshape(*(v.shape[:1] if y is None else ()), -1) for v in j.values()], -1))
    return torch.stack(rows)


def reference_kernel(model: nn.Module, x: torch.Tensor, trace: bool) -> torch.Tensor:
    j = reference_jacobian(model, x)  # (N, O, P)
    if trace:
        return torch.einsum("nap,map->nm", j, j) / j.shape[1]
    return torch.einsum("nap,mbp->nmab", j, j)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double(), ref.detach().double()
    if a.shape != ref.shape:
        raise ValueError(f"shape {tuple(a.shape)}, reference {tuple(ref.shape)}")
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def flat_grads(tree: Any, model: nn.Module, n: int) -> torch.Tensor:
    """Per-parameter per-sample gradients (a dict by name or a list in ``model.parameters()`` order) as ``(N, P)``."""
    if isinstance(tree, torch.Tensor):
        return tree.reshape(n, -1)
    if isinstance(tree, dict):
        parts = [tree[k] for k, _ in model.named_parameters()]
    else:
        parts = list(tree)
    return torch.cat([p.reshape(n, -1) for p in parts], 1)


# --- methods ------------------------------------------------------------------------------


def tutorial_fnet_single(model: nn.Module) -> Callable[..., torch.Tensor]:
    buffers = {k: v for k, v in model.named_buffers()}

    def fnet_single(p, xi):  # type: ignore[no-untyped-def]
        return functional_call(model, (p, buffers), (xi.unsqueeze(0),)).squeeze(0)

    return fnet_single


def tutorial_jacobian_contraction(model: nn.Module, x: torch.Tensor, trace: bool) -> torch.Tensor:
    """The torch.func NTK tutorial's ``empirical_ntk_jacobian_contraction`` (x1 = x2 = x)."""
    params = named_params(model)
    jac = vmap(jacrev(tutorial_fnet_single(model)), (None, 0))(params, x)
    jac1 = [j.flatten(2) for j in jac.values()]
    expr = "Naf,Maf->NM" if trace else "Naf,Mbf->NMab"
    k = torch.stack([torch.einsum(expr, j, j) for j in jac1]).sum(0)
    return k / jac1[0].shape[1] if trace else k  # the tutorial's trace sums; ntkfunc's averages


def tutorial_ntk_vps(model: nn.Module, x: torch.Tensor, trace: bool) -> torch.Tensor:
    """The torch.func NTK tutorial's ``empirical_ntk_ntk_vps`` (x1 = x2 = x)."""
    params = named_params(model)
    fnet_single = tutorial_fnet_single(model)

    def get_ntk(x1, x2):  # type: ignore[no-untyped-def]
        def func_x1(p):  # type: ignore[no-untyped-def]
            return fnet_single(p, x1)

        def func_x2(p):  # type: ignore[no-untyped-def]
            return fnet_single(p, x2)

        output, vjp_fn = vjp(func_x1, params)

        def get_ntk_slice(vec):  # type: ignore[no-untyped-def]
            vjps = vjp_fn(vec)
            _, jvps = jvp(func_x2, (params,), vjps)
            return jvps

        basis = torch.eye(output.numel(), dtype=output.dtype, device=output.device).view(output.numel(), -1)
        return vmap(get_ntk_slice)(basis)

    result = vmap(vmap(get_ntk, (None, 0)), (0, None))(x, x)  # (N1, N2, O, O)
    if trace:
        return torch.einsum("NMKK->NM", result) / result.shape[-1]
    return result


def nngeometry_full(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from nngeometry import GramMatrix
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(x), batch_size=x.shape[0])
    gram = GramMatrix(model, loader, function=lambda *d: model(d[0]))
    return gram.to_torch().permute(1, 3, 0, 2)  # (O, N, O, N) -> (N, N, O, O)


def asdl_full(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ASDL's direct NTK (``asdl.empirical_direct_ntk``'s algorithm): one forward, per class a backward
    collecting batch gradients ``(N, P)``, then ``J Jᵀ``.

    ``empirical_direct_ntk`` of 0.1a5 reads ``module.operation``, which that release's ``extend``
    no longer sets (it fails with "expected a non-empty list of Tensors"); this is its code with
    the batch gradients read from the context ``extend`` returns, as ``asdl.batch_gradient`` does.
    """
    from asdl import OP_BATCH_GRADS, extend

    with extend(model, OP_BATCH_GRADS) as cxt:
        outputs = model(x)
        js = []
        for k in range(outputs.shape[-1]):
            model.zero_grad()
            outputs[:, k].sum().backward(retain_graph=k < outputs.shape[-1] - 1)
            js.append(torch.cat([g for m in model.modules() if (g := cxt.batch_grads(m, flatten=True)) is not None], 1))
            cxt.clear_batch_grads()  # they accumulate over backward passes otherwise
    j = torch.stack(js, 1)  # (N, O, P)
    return torch.einsum("ncp,mdp->nmcd", j, j)


def asdl_traced(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    from asdl import empirical_class_wise_direct_ntk

    return empirical_class_wise_direct_ntk(model, x).mean(-1)


def per_sample_loss(model: nn.Module) -> Callable[..., torch.Tensor]:
    buffers = {k: v for k, v in model.named_buffers()}

    def loss(p, batch):  # type: ignore[no-untyped-def]  # (N,) per-sample losses
        xb, yb = batch
        return F.cross_entropy(functional_call(model, (p, buffers), (xb,)), yb, reduction="none")

    return loss


def vmap_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    params = named_params(model)
    buffers = {k: v for k, v in model.named_buffers()}

    def loss_single(p, xi, yi):  # type: ignore[no-untyped-def]
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    return vmap(grad(loss_single), (None, 0, 0))(params, x, y)


def patch_backpack_converter() -> None:
    """BackPACK 1.7.1's converter (``extend(..., use_converter=True)``, needed for skip connections)
    treats a function called twice (``F.relu`` in a residual block) as a duplicated module and fails
    with "'function' object has no attribute 'split'"; its duplicate removal, restricted to modules."""
    from backpack.custom_module import graph_utils as gu

    def remove_duplicates(module, debug):  # type: ignore[no-untyped-def]
        graph = gu.BackpackTracer().trace(module)
        targets = [n.target for n in graph.nodes if n.op == "call_module"]
        for node in [n for n in graph.nodes if n.op == "call_module" and targets.count(n.target) > 1]:
            original = module.get_submodule(node.target)
            if any(True for _ in original.parameters()):
                raise NotImplementedError(f"module {node.target} with parameters is used several times")
            new_target = gu._get_free_name(module, node.target)
            module.add_submodule(new_target, copy.deepcopy(original))
            node.target = new_target
        graph.lint()
        return gu.GraphModule(module, graph)

    gu._transform_remove_duplicates = remove_duplicates


def backpack_grads(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    from backpack import backpack
    from backpack.extensions import BatchGrad

    model.zero_grad()
    loss = loss_fn(model(x), y)
    with backpack(BatchGrad()):
        loss.backward()
    return [p.grad_batch for p in model.parameters()]


def opacus_grads(gsm: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    gsm.zero_grad(set_to_none=True)
    F.cross_entropy(gsm(x), y, reduction="sum").backward()
    return [p.grad_sample for p in gsm.parameters()]


def asdl_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from asdl import batch_gradient

    def closure():  # type: ignore[no-untyped-def]
        model.zero_grad()
        loss = F.cross_entropy(model(x), y, reduction="sum")
        loss.backward()
        return loss

    return batch_gradient(model, closure)


def nngeometry_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from nngeometry import Jacobian
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(x, y), batch_size=x.shape[0])
    jac = Jacobian(model, loader, function=lambda xb, yb: F.cross_entropy(model(xb), yb, reduction="none"))
    return jac.to_torch()[0]  # (1, N, P) -> (N, P)


# --- rows ---------------------------------------------------------------------------------


def kernel_memory(n: int, o: int, p: int) -> dict[str, int]:
    """Bytes the methods that materialise per-sample Jacobians or parameter-sized cotangents hold (float32)."""
    return {"ASDL direct": 2 * n * o * p * 4, "tutorial jac-contraction": 2 * n * o * p * 4,
            "tutorial NTK-vps": n * n * o * p * 4}  # the tutorial vmaps vjps over all (x1, x2, output) triples


def kernel_methods(model: nn.Module, trace: bool) -> dict[str, Callable[[torch.Tensor], Result]]:
    """Name -> ``fn(x)``: every way to get the full / traced eNTK of ``x`` with itself."""
    f, params = ntkfunc.from_module(model)
    kern = ntkfunc.ntk_fn(f) if trace else ntkfunc.ntk_fn(f, trace_axes=())
    copies = {k: copy.deepcopy(model) for k in ("nngeometry", "asdl")}  # hooks of one peer never reach another
    out: dict[str, Callable[[torch.Tensor], Result]] = {
        "ntkfunc": lambda x: kern(x, None, params),
        "nngeometry GramMatrix": (lambda x: _trace(nngeometry_full(copies["nngeometry"], x))) if trace
        else (lambda x: nngeometry_full(copies["nngeometry"], x)),
        "ASDL class-wise" if trace else "ASDL direct": (lambda x: asdl_traced(copies["asdl"], x)) if trace
        else (lambda x: asdl_full(copies["asdl"], x)),
        "tutorial jac-contraction": lambda x: tutorial_jacobian_contraction(model, x, trace),
        "tutorial NTK-vps": lambda x: tutorial_ntk_vps(model, x, trace),
    }
    return out


def _trace(k: torch.Tensor) -> torch.Tensor:
    return torch.einsum("nmaa->nm", k) / k.shape[-1]


def grad_methods(model: nn.Module) -> tuple[dict[str, Callable[[torch.Tensor, torch.Tensor], Result]], dict[str, str]]:
    """Name -> ``fn(x, y)`` giving per-sample gradients; and peers that could not be set up, with the reason."""
    f_loss = per_sample_loss(model)
    params = named_params(model)
    jac = ntkfunc.jacobian_fn(f_loss)
    width = sum(p.numel() for p in params.values())
    reused: dict[int, torch.Tensor] = {}  # per N: the one buffer a training loop would pass every step

    def into_buffer(x: torch.Tensor, y: torch.Tensor) -> Result:
        buf = reused.setdefault(x.shape[0], torch.empty(x.shape[0], width))
        return jac((x, y), params, out=buf)

    out: dict[str, Callable[[torch.Tensor, torch.Tensor], Result]] = {
        "ntkfunc": lambda x, y: jac((x, y), params),
        "ntkfunc, out= one reused buffer": into_buffer,
        "torch.func vmap(grad)": lambda x, y: vmap_grad(model, x, y),
    }
    unavailable: dict[str, str] = {}
    try:
        from backpack import extend

        bp = copy.deepcopy(model)
        residual = any(type(m).__name__ == "BasicBlock" for m in bp.modules())
        if residual:
            patch_backpack_converter()
        bp = extend(bp, use_converter=residual)  # BackPACK needs its converter (torch.fx) for skip connections
        bp_loss = extend(nn.CrossEntropyLoss(reduction="sum"))
        out["BackPACK BatchGrad"] = lambda x, y: backpack_grads(bp, bp_loss, x, y)
    except Exception as exc:  # noqa: BLE001 (recorded in the table)
        unavailable["BackPACK BatchGrad"] = f"{type(exc).__name__}: {exc}"
    try:
        from opacus import GradSampleModule

        has_buffers = any(True for _ in model.buffers())
        # strict=False: BatchNorm (eval mode here, so no coupling of samples) has buffers, which Opacus'
        # strict check refuses; its functorch fallback then computes those layers' rows.
        gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="sum", strict=not has_buffers)
        gsm.train()  # Opacus records activations in training mode only (these models have no dropout)
        for m in gsm.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()  # the same function as the other methods: running statistics
        out["Opacus GradSampleModule"] = lambda x, y: opacus_grads(gsm, x, y)
    except Exception as exc:  # noqa: BLE001
        unavailable["Opacus GradSampleModule"] = f"{type(exc).__name__}: {exc}"
    asdl_model = copy.deepcopy(model)
    out["ASDL batch_gradient"] = lambda x, y: asdl_grads(asdl_model, x, y)
    ngeo_model = copy.deepcopy(model)
    out["nngeometry Jacobian"] = lambda x, y: nngeometry_grads(ngeo_model, x, y)
    return out, unavailable


def projected_methods(model: nn.Module, k: int) -> dict[str, Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]]:
    """Name -> ``fn(x, y, seed)`` giving ``(N, k)`` features whose ``F Fᵀ`` estimates ``G Gᵀ``."""
    from trak.projectors import BasicProjector, ProjectionType

    f_loss = per_sample_loss(model)
    params = named_params(model)
    n_params = sum(p.numel() for p in params.values())
    feats: dict[tuple[str, int], Any] = {}
    projectors: dict[int, Any] = {}

    def ntk(kind: str) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
        def run(x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
            if (kind, seed) not in feats:  # one features function per sketch, as a user keeps it
                sketch = ntkfunc.Sketch(k, seed=seed) if kind == "default" else ntkfunc.Sketch(k, seed=seed, kind=kind)
                feats[kind, seed] = ntkfunc.features_fn(f_loss, sketch)
            return feats[kind, seed]((x, y), params)

        return run

    def trak(x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
        if seed not in projectors:
            projectors[seed] = BasicProjector(n_params, k, seed, ProjectionType.normal, torch.device("cpu"))
        g = vmap_grad_sum(model, x, y)  # TRAK's FunctionalGradientComputer: vmap(grad) of the per-sample output
        return projectors[seed].project(g, model_id=0) / math.sqrt(k)

    out = {"ntkfunc": ntk("default"), "TRAK BasicProjector": trak}
    if n_params * k * 4 <= 2**30:  # ntkfunc's Gaussian kind keeps Π while it fits; a reference row where it does
        out["ntkfunc gaussian"] = ntk("gaussian")
    return out


def vmap_grad_sum(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample gradients of the (unreduced) cross-entropy, flat ``(N, P)``: TRAK's gradient step."""
    g = vmap_grad(model, x, y)
    return torch.cat([v.reshape(x.shape[0], -1) for v in g.values()], 1)


# --- timing -------------------------------------------------------------------------------


def timed(fn: Method) -> tuple[float, float, Result]:
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def run_row(label: str, methods: dict[str, Method], check: Callable[[str, Result], float], reps: int, tol: float,
            log: Callable[[str], None], rep_seconds: float = math.inf) -> dict[str, Any]:
    """Check each method's first call, then ``reps`` interleaved rounds (a method stops being timed once
    its timed calls took ``rep_seconds``); medians per method."""
    res: dict[str, Any] = {}
    live: dict[str, Method] = {}
    for name, fn in methods.items():
        try:
            wall, cpu, out = timed(fn)
            err = check(name, out)
            del out
            res[name] = {"first_s": wall, "err": err, "wall": [], "cpu": []}
            if not err <= tol:
                res[name]["failed"] = f"error {err:.2e} > tol {tol:.0e}"
            else:
                live[name] = fn
        except Exception as exc:  # noqa: BLE001 (a peer that cannot run this row is reported, not fatal)
            res[name] = {"failed": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"}
            traceback.print_exc(file=sys.stderr)
        gc.collect()
    order = list(live.items())
    for r in range(reps):  # each round starts one method later: none is always the first after the collection below
        for name, fn in order[r % len(order):] + order[: r % len(order)] if order else []:
            if sum(res[name]["wall"]) > rep_seconds:  # enough of a slow method: its median is clear
                continue
            wall, cpu, out = timed(fn)
            del out
            res[name]["wall"].append(wall)
            res[name]["cpu"].append(cpu)
        gc.collect()
    for r in res.values():
        if r.get("wall"):
            r["median_s"] = statistics.median(r["wall"])
            r["median_cpu_s"] = statistics.median(r["cpu"])
    base = res.get("ntkfunc", {})
    for r in res.values():
        if "median_s" in r and "median_s" in base:
            r["ratio"] = r["median_s"] / base["median_s"]
            r["cpu_ratio"] = r["median_cpu_s"] / base["median_cpu_s"]
    for name, r in res.items():
        log(f"  {label:28s} {name:26s} " + (f"{r['median_s']:9.4f} s  cpu {r['median_cpu_s']:9.4f} s  "
                                            f"ratio {r.get('ratio', float('nan')):6.2f} / {r.get('cpu_ratio', float('nan')):6.2f}"
                                            + (f"  err {r['err']:.1e}" if "err" in r else "") if "median_s" in r
                                            else f"FAILED {r['failed']}"))
    return res


def config(quick: bool) -> dict[str, dict[str, int]]:
    """Sizes per model: N of the kernel rows, of the per-sample gradient rows and of the projection rows."""
    if quick:
        return {"mlp": dict(kernel=4, grads=8, projected=8, check=4), "cnn": dict(kernel=4, grads=8, projected=8, check=4),
                "resnet18": dict(kernel=2, grads=2, projected=0, check=1)}
    return {"mlp": dict(kernel=32, grads=64, projected=64, check=16),  # the MLP's J at N=32 is 0.86 GB
            "cnn": dict(kernel=32, grads=64, projected=64, check=32),
            # TRAK's BasicProjector holds P x 100 Gaussians (4.5 GB for ResNet-18's 11.2M parameters): no projection row
            # nngeometry's GramMatrix takes ~20 CPU-s per ResNet-18 kernel at N=2; float64 Jacobians of more need GBs
            "resnet18": dict(kernel=2, grads=16, projected=0, check=2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help="comma-separated models (mlp, cnn, resnet18)")
    ap.add_argument("--rows", default="full,traced,grads,projected", help="comma-separated row kinds")
    ap.add_argument("--reps", type=int, default=5, help="interleaved timed rounds per row")
    ap.add_argument("--rep-seconds", type=float, default=15.0, help="stop timing a method once its timed calls took this")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-gb", type=float, default=3.0, help="skip a method whose tensors would exceed this")
    ap.add_argument("--k", type=int, default=2048, help="projection dimension of the projected rows")
    ap.add_argument("--seeds", type=int, default=3, help="sketch seeds averaged for the projection error")
    ap.add_argument("--tol", type=float, default=1e-3, help="max relative error against float64 (float32 methods)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    ap.add_argument("--out", default=None, help="write the markdown tables here")
    ap.add_argument("--json", default=None, help="write raw results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.k = min(args.k, 256)  # TRAK regenerates P x k Gaussians per call: seconds even on tiny inputs at k=2048
    sizes = config(args.quick)
    models = [m for m in sizes if args.only is None or m in args.only.split(",")]
    kinds = args.rows.split(",")
    results: list[dict[str, Any]] = []
    log = lambda s: print(s, flush=True)  # noqa: E731
    versions = _versions()
    log(f"torch {torch.__version__}, threads {args.threads}; " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    t_start = time.perf_counter()
    for name in models:
        sz = sizes[name]
        for kind in kinds:
            if kind in ("full", "traced"):
                model, x, _ = build(name, sz["kernel"])
                trace = kind == "traced"
                nc = sz["check"]
                ref = reference_kernel(model, x[:nc], trace)
                fns = kernel_methods(model, trace)
                need = kernel_memory(x.shape[0], 10, _n_params(model))
                skipped = {m: f"skipped: needs ~{need[m] / 2**30:.1f} GB (> --max-gb {args.max_gb})" for m in fns
                           if need.get(m, 0) > args.max_gb * 2**30}
                methods = {m: (lambda fn=fn, x=x: fn(x)) for m, fn in fns.items() if m not in skipped}
                if nc < x.shape[0]:  # checked on the subset the reference fits: one more call each
                    def check(m: str, out: Result, fns=fns, ref=ref, nc=nc, x=x) -> float:
                        return rel_err(fns[m](x[:nc]), ref)
                else:
                    def check(m: str, out: Result, ref=ref) -> float:
                        return rel_err(out, ref)
                row = run_row(f"{name} {kind} N={x.shape[0]}", methods, check, args.reps, args.tol, log, args.rep_seconds)
                row.update({m: {"failed": why} for m, why in skipped.items()})
                results.append(dict(model=name, row=kind, n=x.shape[0], check_n=nc, params=_n_params(model), methods=row))
            elif kind == "grads":
                model, x, y = build(name, sz["grads"])
                nc = min(sz["grads"], 8)
                ref = reference_jacobian(model, x[:nc], y[:nc])
                gfns, unavailable = grad_methods(model)
                methods = {m: (lambda fn=fn, x=x, y=y: fn(x, y)) for m, fn in gfns.items()}

                def check_g(m: str, out: Result, ref=ref, nc=nc, model=model, n=x.shape[0]) -> float:
                    return rel_err(flat_grads(out, model, n)[:nc], ref)

                row = run_row(f"{name} grads N={x.shape[0]}", methods, check_g, args.reps, args.tol, log, args.rep_seconds)
                for m, why in unavailable.items():
                    row[m] = {"failed": why}
                    log(f"  {name} grads {m}: unavailable: {why}")
                results.append(dict(model=name, row=kind, n=x.shape[0], check_n=nc, params=_n_params(model), methods=row))
            elif kind == "projected" and sz["projected"]:
                results.append(projected_row(name, sz["projected"], args, log))
            gc.collect()
    log(f"total {time.perf_counter() - t_start:.0f} s wall, {time.process_time():.0f} s CPU")
    md = markdown(results, args, versions)
    print(md)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(md)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(results=results, versions=versions, args=vars(args)), fh, indent=1, default=str)


def projected_row(name: str, n: int, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Time (interleaved, seed 0) and kernel error against the exact ``G Gᵀ`` (mean over seeds) at equal ``k``."""
    model, x, y = build(name, n)
    g = reference_jacobian(model, x, y)  # float64 (N, P)
    exact = g @ g.T
    fns = projected_methods(model, args.k)
    errs: dict[str, list[float]] = {m: [] for m in fns}
    for seed in range(args.seeds):
        for m, fn in fns.items():
            feats = fn(x, y, seed).double()
            errs[m].append(float(torch.linalg.norm(feats @ feats.T - exact) / torch.linalg.norm(exact)))
    methods = {m: (lambda fn=fn: fn(x, y, 0)) for m, fn in fns.items()}
    for m in fns:
        log(f"  {name} projected {m:26s} kernel error {statistics.mean(errs[m]):.4f} (seeds {', '.join(f'{e:.4f}' for e in errs[m])})")
    row = run_row(f"{name} projected N={n} k={args.k}", methods, lambda m, out: 0.0, args.reps, math.inf, log, args.rep_seconds)
    for m in fns:
        row[m]["kernel_err"] = statistics.mean(errs[m])
        row[m]["kernel_errs"] = errs[m]
        row[m].pop("err", None)
    return dict(model=name, row="projected", n=n, k=args.k, params=_n_params(model), methods=row)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("nngeometry", "asdfghjkl", "backpack-for-pytorch", "opacus", "traker"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def markdown(results: list[dict[str, Any]], args: argparse.Namespace, versions: dict[str, str]) -> str:
    lines = [
        f"torch {torch.__version__}, {args.threads} thread(s), float32, {platform.processor() or platform.machine()}; "
        + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        "",
        f"Median of {args.reps} interleaved rounds; ratio = method / ntkfunc (> 1: ntkfunc faster), wall and CPU; "
        "err = max relative error against the float64 reference.",
        "",
        "| model | row | N | method | wall s | CPU s | ratio wall | ratio CPU | err |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for m, v in r["methods"].items():
            if "median_s" not in v:
                lines.append(f"| {r['model']} | {r['row']} | {r['n']} | {m} | — | — | — | — | {v.get('failed', '')} |")
                continue
            err = f"{v['kernel_err']:.4f} (kernel)" if "kernel_err" in v else f"{v['err']:.1e}"
            lines.append(f"| {r['model']} | {r['row']} | {r['n']} | {m} | {v['median_s']:.4g} | {v['median_cpu_s']:.4g} | "
                         f"{v.get('ratio', float('nan')):.2f} | {v.get('cpu_ratio', float('nan')):.2f} | {err} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
