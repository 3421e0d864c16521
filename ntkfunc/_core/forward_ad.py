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
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.func import vjp

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
