"""Forward-mode derivatives, safe to use from several threads.

torch keeps forward-mode AD state per process, not per thread: one dual level at a time
(``torch.autograd.forward_ad``) and ``torch.func.jvp``'s nesting counter. Two threads that
run ``jvp`` at once share that state, and one of them fails ("Trying to access a forward
AD level with an invalid index") or, worse, reads the other's tangents. Every ntkfunc
section that runs forward mode does so inside :func:`forward_ad_section`, which holds one
re-entrant lock for the whole process: the lock mirrors a resource that is global in
torch itself, and is the only such lock in ntkfunc. Forward mode run by other code in
another thread at the same time is not covered (torch offers no way to).

:func:`jvp_by_double_vjp` computes the same JVP from reverse mode alone (no dual levels),
for functions with ops that lack a forward-mode derivative.

:class:`ScalarOverloads` sends ``tensor * 2.0``-style calls to the ops' ``.Scalar`` overloads
while forward mode runs (the same kernels and numbers, without a slow path of torch's).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.func import vjp
from torch.overrides import TorchFunctionMode

_LOCK = threading.RLock()


@contextlib.contextmanager
def forward_ad_section() -> Iterator[None]:
    """Hold the process-wide forward-mode lock for this block (re-entrant in the same thread).

    >>> import torch
    >>> from torch.func import jvp
    >>> with forward_ad_section():
    ...     out, tangent = jvp(torch.sin, (torch.zeros(3),), (torch.ones(3),))
    >>> tangent.tolist()
    [1.0, 1.0, 1.0]
    """
    with _LOCK:
        yield


def jvp_by_double_vjp(fn: Callable[..., Any], primals: Sequence[Any], tangents: Sequence[Any]) -> tuple[Any, Any]:
    """``torch.func.jvp`` without forward mode: the VJP is linear in its cotangent, so its VJP is the JVP.

    Same signature and result as ``jvp(fn, primals, tangents)``; needs no dual level, so it
    works for ops without forward-mode rules (and needs no lock).

    >>> import torch
    >>> out, t = jvp_by_double_vjp(lambda x: x ** 3, (torch.tensor([2.0]),), (torch.tensor([1.0]),))
    >>> t.tolist()
    [12.0]
    """
    out, vjp_fn = vjp(fn, *primals)[:2]
    transpose = vjp(vjp_fn, torch.utils._pytree.tree_map(torch.zeros_like, out))[1]
    return out, transpose(tuple(tangents))[0]  # the cotangent of vjp_fn's output: one per primal


_aten = torch.ops.aten
_B = torch._C.TensorBase
SCALAR_OVERLOADS: dict[Any, Any] = {
    _B.mul: _aten.mul.Scalar, torch.mul: _aten.mul.Scalar, _B.div: _aten.div.Scalar, torch.div: _aten.div.Scalar,
    _B.add: _aten.add.Scalar, torch.add: _aten.add.Scalar, _B.sub: _aten.sub.Scalar, torch.sub: _aten.sub.Scalar,
}
"""Tensor-by-number method or function (``2 * t`` and ``t + 1`` arrive as ``t.mul(2)``, ``t.add(1)``) -> the aten
``.Scalar`` overload :class:`ScalarOverloads` calls instead."""


class ScalarOverloads(TorchFunctionMode):
    """``t * c``, ``t / c``, ``t + c``, ``t - c`` (``c`` a Python ``int`` or ``float``, no keywords) as the
    ``.Scalar`` overloads of ``mul`` / ``div`` / ``add`` / ``sub``.

    Python turns ``t / 4.0`` into ``aten::div.Tensor`` with the number wrapped in a tensor; under
    forward mode (``torch.func.jvp``, torch 2.13) torch then runs that op through a Python
    reference implementation, about 0.4 ms per call whatever the size (measured: 0.55 ms
    against 0.13 ms for ``aten::div.Scalar`` on a 1,024-element tensor under ``vmap(jvp)``).
    The ``.Scalar`` overloads wrap the number the same way and run the same kernel and the
    same derivative formula, so values and tangents are identical. Other calls pass through.

    >>> from torch.func import jvp
    >>> from ntkfunc._core.ops import load_forward_ad_decompositions
    >>> load_forward_ad_decompositions()  # what every forward-mode path of ntkfunc does first
    >>> x, t = torch.randn(5), torch.randn(5)
    >>> with ScalarOverloads():
    ...     fast = jvp(lambda h: (h / 3.0 - 1) * 2 + 0.5, (x,), (t,))
    >>> slow = jvp(lambda h: (h / 3.0 - 1) * 2 + 0.5, (x,), (t,))
    >>> all(torch.equal(a, b) for a, b in zip(fast, slow))
    True
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        op = scalar_overload(func, args, kwargs)
        return func(*args, **(kwargs or {})) if op is None else op(*args)


def scalar_overload(func: Any, args: Sequence[Any], kwargs: dict[str, Any] | None) -> Any:
    """The ``.Scalar`` overload :class:`ScalarOverloads` calls instead of ``func(*args, **kwargs)``, or ``None``.

    (The one test of which calls are sent; also used by modes that send them themselves, such as
    :class:`~ntkfunc._core.batchable.BatchableOps` with ``scalar_overloads=True``.)

    >>> scalar_overload(torch.Tensor.mul, (torch.ones(2), 2.0), None)
    <OpOverload(op='aten.mul', overload='Scalar')>
    >>> scalar_overload(torch.Tensor.mul, (torch.ones(2), torch.ones(2)), None) is None
    True
    """
    op = SCALAR_OVERLOADS.get(func)
    if (op is not None and not kwargs and len(args) == 2 and type(args[1]) in (int, float)
            and type(args[0]) in (torch.Tensor, torch.nn.Parameter)):
        return op
    return None
