"""What a ``kernel_matrix`` run is given and what it knows after probing ``f``, as small frozen records.

- :class:`Job`: the validated request (the function, params, engine, data and settings), one field per fact;
- :class:`Output`: where results go (``out``, the features folder, ``resume``, ``verify``);
- :class:`Workers`: who computes (this process's devices, the ``torchrun`` ranks, a progress bar or not);
- :class:`Shape`: the probed kernel (its problem on one sample, layout, shape);
- :func:`problem_on`: the probed problem on a device, as every stage builds it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import torch

from ntkfunc._core.checks import explained_f_errors, split_vmap_axes
from ntkfunc._core.layout import Layout
from ntkfunc._core.memory import itemsize
from ntkfunc._core.ops import transform_friendly_attention
from ntkfunc._core.problem import Problem, make_problem
from ntkfunc._core.pytree import tree_map
from ntkfunc._core.types import ApplyFn, PyTree, VMapAxes
from ntkfunc._dataset.data import Samples
from ntkfunc._dataset.distributed import Ranks
from ntkfunc._dataset.plan import Sizes
from ntkfunc._engines import Engine
from ntkfunc.pntk import sum_of_logits
from ntkfunc.sketch import Sketch

API = "kernel_matrix"
WITHOUT_VMAP = "use ntk_fn(f, vmap_axes=None) for the kernel of a whole batch without vmap (kernel_matrix needs per-sample outputs)"


@dataclasses.dataclass(frozen=True)
class Job:
    """A validated request: the function whose kernel is computed, the engine, the data and the settings."""

    f: ApplyFn  # the user's function (named in the fingerprint)
    params: PyTree
    engine: Engine
    s1: Samples
    s2: Samples  # s1 itself with x2=None
    trace: tuple
    diag: tuple
    pntk: bool
    nonfinite: str
    precision: str = "highest"
    sketch: Sketch | None = None
    vmap_axes: VMapAxes = 0  # as ntk_fn's: the inputs' batch axes (the Samples slice by them) and the output's

    @functools.cached_property
    def fn_axes(self) -> VMapAxes:
        """The ``vmap_axes`` of :attr:`fn`: the sum of the logits has its batch axis first."""
        if not self.pntk:
            return self.vmap_axes
        x_axis, _ = split_vmap_axes(self.vmap_axes, API)
        return (x_axis, 0, {})

    @property
    def symmetric(self) -> bool:
        return self.s2 is self.s1

    @functools.cached_property
    def fn(self) -> ApplyFn:
        """The function differentiated: ``f``, or the sum of its logits with ``pntk=True``."""
        if not self.pntk:
            return self.f
        _, fx_axis = split_vmap_axes(self.vmap_axes, API)
        return sum_of_logits(self.f, fx_axis, api=f"{API}(pntk=True)", keepdim=True)


@dataclasses.dataclass(frozen=True)
class Output:
    """Where the results go: ``out`` (None: memory), the features folder, whether to resume and verify, and whether a
    file at ``out`` that no manifest describes may be replaced (``overwrite``)."""

    out: None | str | os.PathLike[str]
    features: None | str | os.PathLike[str]
    resume: bool
    verify: bool
    overwrite: bool = False

    @property
    def features_folder(self) -> None | str | os.PathLike[str]:
        """``features=``, or ``<out>.features`` with ``out``; None: the features stay in memory."""
        if self.features is None and self.out is not None:
            return str(self.out) + ".features"
        return self.features


@dataclasses.dataclass(frozen=True)
class Workers:
    """Who computes: this process's devices, the ``torchrun`` ranks, and whether this process shows a progress bar."""

    devices: list[torch.device]
    rk: Ranks
    progress: bool


@dataclasses.dataclass(frozen=True)
class Shape:
    """The probed kernel: its problem on one sample, layout, shape, dtype and bytes per sample pair."""

    problem: Problem
    layout: Layout
    kshape: tuple[int, ...]
    n1: int
    n2: int

    @property
    def dtype(self) -> torch.dtype:
        return self.problem.out_dtype

    @property
    def trace_size(self) -> int:
        """What a kernel block is divided by (traces are averaged)."""
        return self.layout.trace_size(self.problem.out_shapes1[0])

    @property
    def pair_bytes(self) -> int:
        pairs = max(1, self.n1 * (1 if self.layout.batch_paired else self.n2))
        return math.prod(self.kshape) // pairs * itemsize(self.dtype)

    def sizes(self, symmetric: bool) -> Sizes:
        return Sizes(self.n1, self.n2, symmetric, self.layout.batch_paired)


def problem_on(job: Job, device: torch.device, params: PyTree, api: str = API) -> Problem:
    """The problem on the first sample of each side on ``device``, copied out of its source (a view of a
    dataset tensor would make every tensor saved for backward count the whole dataset's storage); ``api``
    names the public function in errors."""
    with transform_friendly_attention():
        x1 = tree_map(lambda t: t.to(device).clone(), job.s1.get(0, 1))
        x2 = None if job.symmetric else tree_map(lambda t: t.to(device).clone(), job.s2.get(0, 1))
        with explained_f_errors(api, params, {"x1": x1, "x2": x2}, job.vmap_axes, without_vmap=WITHOUT_VMAP):
            return make_problem(job.fn, x1, x2, params, job.fn_axes, job.trace, job.diag, api=api)
