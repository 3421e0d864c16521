"""The registry of implementations: one :class:`Engine` record each, and the only lookup.

Adding an implementation is one module with ``kernel(problem, budget, per_param=False)``
plus one record in :data:`ENGINES` (and a member of :class:`Implementation` if it gets a
public name). Nothing else validates ``implementation=`` or infers what an engine can do:
every public function calls :func:`get_engine` and reads the record's capabilities.
"""

from __future__ import annotations

import dataclasses
import enum
import types
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ntkfunc._core.heap import settle_heap
from ntkfunc._core.memory import parse_budget
from ntkfunc._core.problem import Problem
from ntkfunc._core.pytree import tree_unflatten
from ntkfunc._core.types import MemoryBudget, PyTree
from ntkfunc._engines import auto, jacobian, rows, vp
from ntkfunc._engines.structured import kernel as structured


class Implementation(enum.IntEnum):
    """How the empirical NTK is computed (values match ``neural_tangents.NtkImplementation``).

    - ``JACOBIAN_CONTRACTION`` (1): per-sample Jacobians by reverse mode, contracted
      parameter by parameter. Cost ``N O [FP] + N1 N2 O^2 P``. Best when O·P is small
      relative to a forward pass (narrow MLPs, O = 1, traced kernels).
    - ``NTK_VECTOR_PRODUCTS`` (2): VJPs at ``x2`` for every output cotangent, pushed
      through JVPs at ``x1``. Cost ``N1 N2 O [FP]``; never contracts over P, so it wins
      when parameters are many and shared across positions (convolutions) and N is small.
    - ``STRUCTURED_DERIVATIVES`` (3): per-primitive rules (``ntkfunc.rules``) that
      contract cotangents with layer inputs without forming Jacobians.
    - ``AUTO`` (0, also ``"auto"``): per parameter, the cheaper of the structured rule and
      Jacobian contraction, by opt_einsum's FLOP estimates.
    """

    AUTO = 0
    JACOBIAN_CONTRACTION = 1
    NTK_VECTOR_PRODUCTS = 2
    STRUCTURED_DERIVATIVES = 3


KernelImpl = Callable[..., list]
"""``kernel(problem, budget_bytes, per_param=False) -> [kernel per output leaf]``; with
``per_param=True``, per output leaf a list over the differentiated parameter leaves."""


@dataclasses.dataclass(frozen=True)
class Engine:
    """One implementation and what it can do.

    Attributes:
      implementation: its number (``ntk_fn(implementation=...)``).
      name: a short name for messages and tables.
      kernel: ``kernel(problem, budget, per_param=False)`` (see :data:`KernelImpl`).
      per_param: it can split the kernel by parameter tensor (``per_param=True``).
      param_vmap: its kernels work under ``torch.func.vmap`` over ``params`` (an ensemble axis).
      rows: how ``kernel_matrix`` makes this engine's per-sample rows (gradients flattened over
        parameters, :mod:`ntkfunc._engines.rows`) to keep them across tiles (panels) and
        contract them with one matrix product per tile; None: ``ntk_fn`` per tile.
      thread_safe: it may run in several threads at once (an engine that runs forward-mode AD must
        hold `_core.forward_ad.forward_ad_section`: torch keeps its dual levels per process).
      captures: its per-sample gradients come from the structured capture (cotangents and the
        rules' operands at every parameter-consuming primitive), which also gives the factors that
        sketches project without forming gradients; False: ``vmap(jacrev)`` rows.
    """

    implementation: Implementation
    name: str
    kernel: KernelImpl
    per_param: bool = True
    param_vmap: bool = True
    rows: rows.RowsFactory | None = None
    thread_safe: bool = True
    captures: bool = False

    @property
    def reuses_jacobians(self) -> bool:
        """``kernel_matrix`` keeps per-sample rows across tiles (see ``rows``)."""
        return self.rows is not None


def _table(*records: Engine) -> Mapping[int, Engine]:
    table: dict[int, Engine] = {}
    for e in records:
        if int(e.implementation) in table:
            raise KeyError(f"implementation {int(e.implementation)} is registered twice")
        table[int(e.implementation)] = e
    return types.MappingProxyType(table)


ENGINES: Mapping[int, Engine] = _table(
    Engine(Implementation.AUTO, "auto", auto.kernel, rows=rows.structured_rows, captures=True),
    Engine(Implementation.JACOBIAN_CONTRACTION, "Jacobian contraction", jacobian.kernel, rows=rows.jacobian_rows),
    Engine(Implementation.NTK_VECTOR_PRODUCTS, "NTK-vector products", vp.kernel),
    Engine(Implementation.STRUCTURED_DERIVATIVES, "structured derivatives", structured.kernel, rows=rows.structured_rows, captures=True),
)
"""Every implementation, by number (read-only)."""


def engines() -> list[Engine]:
    """The registered engines in increasing order of their number.

    >>> [int(e.implementation) for e in engines()]
    [0, 1, 2, 3]
    """
    return [ENGINES[k] for k in sorted(ENGINES)]


def choices() -> str:
    """The valid values of ``implementation=``, for error messages and ``--help``.

    >>> choices()
    "'auto' or one of [0, 1, 2, 3] (AUTO, JACOBIAN_CONTRACTION, NTK_VECTOR_PRODUCTS, STRUCTURED_DERIVATIVES)"
    """
    numbers = sorted(ENGINES)
    names = ", ".join(ENGINES[k].implementation.name for k in numbers)
    return f"'auto' or one of {numbers} ({names})"


def get_engine(implementation: int | str | Implementation, *, api: str) -> Engine:
    """The engine of ``implementation`` (a number, an :class:`Implementation` or ``"auto"``).

    The only place that validates ``implementation``: anything else raises a ValueError
    that starts with ``api`` and lists the valid choices.

    >>> get_engine("auto", api="ntk_fn").name, get_engine(3, api="ntk_fn").name
    ('auto', 'structured derivatives')
    """
    key: Any = implementation
    if isinstance(key, str) and key.strip().lower() == "auto":
        key = int(Implementation.AUTO)
    if isinstance(key, bool) or not isinstance(key, int) or int(key) not in ENGINES:
        raise ValueError(f"{api}: implementation={implementation!r}; expected {choices()}")
    return ENGINES[int(key)]


def refuse_param_vmap(engine: Engine, params: PyTree, api: str) -> None:
    """Refuse to run ``engine`` under ``torch.func.vmap`` over ``params`` when it cannot."""
    if engine.param_vmap:
        return
    if any(isinstance(t, torch.Tensor) and torch._C._functorch.is_batchedtensor(t) for t in pytree.tree_leaves(params)):
        able = [int(e.implementation) for e in engines() if e.param_vmap]
        raise NotImplementedError(
            f"{api}(implementation={int(engine.implementation)}) does not support torch.func.vmap over params (an "
            f"ensemble axis); expected one of implementations {able} for vmapped params, or a Python loop over the ensemble"
        )


def refuse_without_rows(engine: Engine, api: str, given: str = "") -> None:
    """Refuse an engine without per-sample rows where they are needed (sketches project them).

    ``given``: the caller's other arguments to show before ``implementation=`` (``"sketch=..., "``).
    """
    if engine.rows is not None:
        return
    able = [int(e.implementation) for e in engines() if e.rows is not None and e.implementation != Implementation.AUTO]
    raise ValueError(
        f"{api}({given}implementation={int(engine.implementation)}): implementation {int(engine.implementation)} "
        f"({engine.name}) has no per-sample gradients to project; expected one of {able} or 'auto' (None)"
    )


def refuse_per_param(engine: Engine, api: str) -> None:
    """Refuse ``per_param=True`` for an engine that cannot split the kernel by parameter."""
    if engine.per_param:
        return
    able = [int(e.implementation) for e in engines() if e.per_param]
    raise NotImplementedError(
        f"{api}(implementation={int(engine.implementation)}, per_param=True): implementation "
        f"{int(engine.implementation)} cannot split the kernel by parameter; expected one of {able}"
    )


def compute(problem: Problem, engine: Engine, memory_budget: MemoryBudget = None, per_param: bool = False) -> PyTree:
    """The kernel of a checked :class:`Problem` with ``engine`` (split by parameter if asked), as a pytree."""
    budget = parse_budget(memory_budget, problem.device)
    settle_heap()  # freed temporaries reused across calls instead of faulted in again (CPU tensors)
    if per_param:
        per_leaf = engine.kernel(problem, budget, per_param=True)
        leaves: list = [None] * len(problem.params.leaves)
        for k, pos in enumerate(problem.params.diff_index):
            leaves[pos] = problem.finish([per_leaf[leaf][k] for leaf in range(len(problem.layouts))])
        return tree_unflatten(leaves, problem.params.spec)
    return problem.finish(engine.kernel(problem, budget))
