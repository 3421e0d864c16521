"""``feature_matrix``: the projected per-sample gradients ``J(x) Π`` of a whole dataset, in memory or in a features file.

The features stage of ``kernel_matrix(..., sketch=)`` (:mod:`ntkfunc._dataset.features`) on its own:
the same chunks, runner, writer (:mod:`.store`), file format (:mod:`.fileformat`), fingerprint and
file name ``<out>/features-<key>.npy``, so that ``kernel_matrix(..., sketch=, features=out)`` finds the
file this writes and computes nothing again (and this finds the files ``kernel_matrix`` wrote). The steps:
check the arguments, probe ``f`` on one sample, agree across ``torchrun`` ranks, resolve the sketch,
then :func:`ntkfunc._dataset.features.write` (reuse, resume or compute, chunk by chunk, with progress).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from ntkfunc._core.checks import check_bool, explained_f_errors, refuse_batch_coupled, split_vmap_axes
from ntkfunc._core.memory import SAFETY
from ntkfunc._core.pytree import tree_map
from ntkfunc._core.types import ApplyFn, MemoryBudget, PyTree, VMapAxes
from ntkfunc._dataset import features as featuring
from ntkfunc._dataset.data import Samples
from ntkfunc._dataset.distributed import Devices, ranks, resolve_devices
from ntkfunc._dataset.fileformat import FEATURE_FILE
from ntkfunc._dataset.job import WITHOUT_VMAP, Job, Output, Workers, problem_on
from ntkfunc._dataset.kernel_file import verify_kernel
from ntkfunc._dataset.pipeline import agree, check_budget
from ntkfunc._engines import Implementation, get_engine, refuse_without_rows
from ntkfunc._engines.rows.projected import ProjectedRows
from ntkfunc.sketch import Sketch

API = "feature_matrix"


@dataclasses.dataclass(frozen=True)
class Features:
    """What :func:`feature_matrix` returns: the features, where they are, and how they were drawn.

    Attributes:
      tensor: ``(N, *out, dim)`` float features ``J(x) Π`` (``out``: ``f``'s per-sample output shape; ``(1,)``
        with ``pntk=True``): in memory, or a tensor over a copy-on-write memory map of ``path``.
      path: the features file ``<out>/features-<key>.npy`` (``np.load(path, mmap_mode="r")`` opens it), or None.
      sketch: the :class:`ntkfunc.Sketch` (``dim``, ``seed``, ``kind``).
      plan: the resolved sketch as the file's manifest records it (the kind of every parameter, ``exact``).

    Scale: ``E[Π Πᵀ] = I``, so ``Σ_k F1[n, o, k] F2[m, p, k]`` estimates (unbiased) the full eNTK
    ``Θ(x1_n, x2_m)[o, p]``; ``kernel_matrix``'s default (outputs traced, **averaged**) is that sum over
    ``o = p`` divided by :attr:`outputs` (:meth:`kernel`). With one output per sample (``pntk=True``, or
    ``f`` of shape ``(N, 1)``) it is plainly ``F1[:, 0] @ F2[:, 0].T``.
    """

    tensor: torch.Tensor
    path: Path | None
    sketch: Sketch
    plan: dict[str, Any]

    @property
    def dim(self) -> int:
        return self.sketch.dim

    @property
    def outputs(self) -> int:
        """Outputs per sample (the product of ``out``): what the traced kernel averages over."""
        return self.tensor[0].numel() // self.dim if len(self.tensor) else 0

    def kernel(self, other: Features | None = None) -> torch.Tensor:
        """``(N1, N2)``: the sketched kernel of these features against ``other``'s (None: these), outputs traced and
        averaged as ``kernel_matrix``'s default (in memory: for datasets whose kernel fits; else
        ``kernel_matrix(..., sketch=, features=)``)."""
        b = self if other is None else other
        if (b.dim, b.tensor.shape[1:]) != (self.dim, self.tensor.shape[1:]):
            raise ValueError(f"Features.kernel: features of shape {tuple(self.tensor.shape)} and {tuple(b.tensor.shape)}; "
                             "expected the same per-sample shape (the same f and sketch)")
        a1, a2 = self.tensor.reshape(len(self.tensor), -1), b.tensor.reshape(len(b.tensor), -1)
        return (a1 @ a2.T) / max(self.outputs, 1)


def feature_matrix(
    f: ApplyFn,
    params: PyTree,
    x: Any,
    sketch: Sketch,
    *,
    out: None | str | os.PathLike[str] = None,
    pntk: bool = False,
    implementation: None | int | str | Implementation = None,
    memory_budget: MemoryBudget = None,
    resume: bool = True,
    progress: bool = True,
    devices: Devices = None,
    overwrite: bool = False,
    verify: bool = False,
    vmap_axes: VMapAxes = 0,
) -> Features:
    """The sketched per-sample gradients ``J(x) Π`` of a whole dataset (TRAK's projected gradients), written once.

    :func:`ntkfunc.features_fn` for datasets, as :func:`ntkfunc.kernel_matrix` is ``ntk_fn`` for datasets:
    the features are computed a chunk of samples at a time (one batched gradient pass per few samples;
    no full gradient row is held) and kept in memory or written to a resumable, checksummed ``.npy``.

    Args:
      f: ``f(params, x) -> (N, ...)``, one output tensor with the batch axis first.
      params: a pytree of tensors (detached: the features are not differentiable).
      x: as ``kernel_matrix``'s: a tensor, numpy array (memory maps too), a pytree of them whose leaves
        share the batch axis (a dict of keyword inputs, a tuple), or a ``Dataset`` / ``DataLoader`` of
        inputs or ``(input, ...)`` tuples; only a chunk's samples are loaded at a time.
      sketch: the :class:`ntkfunc.Sketch` (``dim`` features per output, ``seed``, ``kind``).
      out: None keeps the features in memory (refused with a MemoryError when they exceed the budget);
        a folder writes them to ``<out>/features-<key>.npy`` (``<key>`` hashes f, params, data, sketch,
        pntk and dtype), exactly the file ``kernel_matrix(..., sketch=sketch, features=out)`` (or
        ``ntkfunc compute --features``) reads, so that its kernel reuses these features; the file is
        ``.npy.partial`` until complete, with a manifest and one checksummed marker per chunk.
      pntk: the features of ``Σ_o f_o(x) / sqrt(O)`` (one output per sample, as ``kernel_matrix(pntk=True)``).
      implementation: how per-sample gradients are formed: None/``"auto"``, ``3`` or ``1`` (the features
        are the same); ``2`` has none and is refused.
      memory_budget: bytes (or ``"2GB"``) for the gradient passes and, with ``out=None``, the features.
      resume: continue a killed run at its first chunk without a valid marker, or reuse a complete file
        (refused, naming what changed, if the file was computed with another f, params, data or sketch;
        chunks whose entries no longer match their checksums are computed again, with a warning);
        False computes the file again.
      progress: a tqdm bar (chunks, ETA, samples/s) on stderr when it is a terminal.
      devices: None (params' device; ``cuda:LOCAL_RANK`` under ``torchrun``), ``"all"`` or a list; under
        ``torchrun`` the ranks first check that they hold the same job, then each computes every
        ``world``-th chunk of the file (with ``out=None`` every rank computes all of them).
      overwrite: replace a file at the features file's path that no manifest describes (an array of
        yours, refused by default).
      verify: with ``out``, read the finished file back and check every chunk against its checksum
        (:func:`ntkfunc.verify_kernel`, which checks features files too; ``ntkfunc verify F.npy``) before returning.
      vmap_axes: as ``kernel_matrix``'s: the batch axis of each input leaf (an int, a pytree of ints
        matching ``x``, None for a leaf every sample shares) or ``(x_axes, 0, {})``; the output's
        batch axis must be 0 (the features are ``(N, *out, dim)``).

    Returns:
      :class:`Features`: ``tensor`` ``(N, *out, dim)`` in ``f``'s output dtype (float16/32/64 in a file, bfloat16
      too in memory: nothing is upcast; ``kernel_matrix``'s ``precision=`` is for the kernel's products, not
      these), ``path``, ``sketch`` and the resolved ``plan``. Scale: ``E[Π Πᵀ] = I``, so
      ``einsum("n...k,m...k->nm", F1, F2) / outputs`` (:meth:`Features.kernel`) is an unbiased estimate of
      ``kernel_matrix``'s default kernel (traced outputs averaged), and ``F1[:, 0] @ F2[:, 0].T`` of the
      kernel with one output (``pntk=True``). :meth:`ntkfunc.Sketch.error_estimate` estimates its error
      from the features alone.

    Example:
      >>> import tempfile, torch, ntkfunc
      >>> model = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
      >>> f, params = ntkfunc.from_module(model)
      >>> x = torch.randn(10, 4)
      >>> folder = tempfile.mkdtemp()
      >>> F = ntkfunc.feature_matrix(f, params, x, ntkfunc.Sketch(64), out=folder, progress=False)
      >>> F.tensor.shape, F.path.name.startswith("features-")                 # (N, O, dim)
      (torch.Size([10, 3, 64]), True)
      >>> k = ntkfunc.kernel_matrix(f, params, x, sketch=ntkfunc.Sketch(64), features=folder, progress=False)
      >>> torch.allclose(k, F.kernel(), atol=1e-6)                             # the file was reused
      True
    """
    sketch_ok = validate(f, sketch, implementation, pntk, resume, progress, overwrite, out, verify, vmap_axes)
    engine = get_engine("auto" if implementation is None else implementation, api=API)
    samples = Samples(x, "x", vmap_axes, API)
    detached = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, params)
    job = Job(f, detached, engine, samples, samples, (), (), bool(pntk), "raise", "highest", sketch_ok, vmap_axes)
    rk = ranks()
    workers = Workers(resolve_devices(devices, detached, rk, API), rk, bool(progress) and rk.rank == 0)
    budget = check_budget(memory_budget, workers.devices[0], API)
    problem = problem_on(job, workers.devices[0], detached, API)
    if len(problem.layouts) != 1 or problem.fx_axes != [0]:
        raise ValueError(f"{API}: f returned {len(problem.layouts)} output tensors with batch axes {problem.fx_axes}; expected one "
                         "tensor with the batch axis first (use features_fn for pytree outputs)")
    with explained_f_errors(API, detached, {}, without_vmap=WITHOUT_VMAP):
        source = ProjectedRows(problem, sketch_ok.kind, sketch_ok.dim, sketch_ok.seed, engine.captures)
        shape = (len(samples), *source.out_shape, sketch_ok.dim)
        if rk.world > 1:
            agree(featuring.fingerprint(job, problem, samples, source.plan.record(), shape), rk, API, "the same features")
        usable = budget * SAFETY
        if out is None:
            featuring.check_fits(source, [("x", len(samples))], usable, budget, API, "pass out='DIR' to write them to a file")
        output = Output(None, out, bool(resume), False, bool(overwrite))
        tensor, path = featuring.write(job, problem, source, samples, "x", usable, out, output, workers, FEATURE_FILE)
    if verify and path is not None and rk.rank == 0:
        verify_kernel(path, api=f"{API}(verify=True)")
    return Features(tensor, path, sketch_ok, source.plan.record())


def validate(f: ApplyFn, sketch: Any, implementation: Any, pntk: Any, resume: Any, progress: Any, overwrite: Any,
             out: Any, verify: Any = False, vmap_axes: Any = 0) -> Sketch:
    """Check the arguments before anything runs; the sketch."""
    if not isinstance(sketch, Sketch):
        raise TypeError(f"{API}(sketch={sketch!r}): expected ntkfunc.Sketch(dim, seed=0, kind='auto')")
    refuse_without_rows(get_engine("auto" if implementation is None else implementation, api=API), API, "sketch=..., ")
    for name, value in (("pntk", pntk), ("resume", resume), ("progress", progress), ("overwrite", overwrite), ("verify", verify)):
        check_bool(value, name, API)
    if verify and out is None:
        raise ValueError(f"{API}(verify=True, out=None): verify reads the features file back; expected out='DIR'")
    _, fx_axes = split_vmap_axes(vmap_axes, API)  # refuses None (samples that interact) with its message
    if fx_axes not in (0, None) and not pntk:
        raise ValueError(f"{API}(vmap_axes={vmap_axes!r}): the output's batch axis is {fx_axes!r}; expected 0 (the features "
                         "are (N, *out, dim)): move the batch axis of f's output first")
    refuse_batch_coupled(f, vmap_axes, API)
    if out is not None:
        if not isinstance(out, (str, os.PathLike)):
            raise TypeError(f"{API}(out={out!r}): expected None (memory) or the path of a folder")
        if os.path.exists(out) and not os.path.isdir(out):
            raise ValueError(f"{API}(out={str(out)!r}): {out} is a file; expected a folder (the features are written into it "
                             "as features-<key>.npy, the name kernel_matrix(features=) looks up) or a path where one can be made")
        if str(out).endswith(".npy"):
            raise ValueError(f"{API}(out={str(out)!r}): expected a folder, not a .npy path (the features are written into it "
                             "as features-<key>.npy, the name kernel_matrix(features=) looks up)")
    return sketch
