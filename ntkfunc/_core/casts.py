"""Skip casts to a lower floating-point precision inside ``f`` (``from_module(..., skip_downcasts=True)``).

Some layers compute in float32 whatever the model's dtype: HuggingFace's RMSNorm (T5, Llama,
Mistral, Qwen2) casts its input with ``.to(torch.float32)`` and eager attention takes
``softmax(..., dtype=torch.float32)``. In a float64 model their derivatives are then rounded
to float32 too, and implementations that round in different places (forward mode against
reverse mode) agree to about 1e-9 only. Inside :class:`SkipDowncasts` such a cast of a
floating tensor to a floating dtype of fewer bits keeps the tensor's dtype, so the layer
computes in the model's precision: ``f`` is then the model in exact float64 arithmetic (its
outputs differ from the model's by the float32 rounding they no longer have).

Casts it sees: ``Tensor.to`` (by dtype, or ``to(other)``), ``.float()``, ``.half()``,
``.bfloat16()``, ``.type(dtype)``, and the ``dtype=`` argument of any torch function whose
tensor arguments have more precision (``softmax``, ``log_softmax``, ``sum``, ``mean``, ...).
Casts to a higher precision, to integer dtypes and between 16-bit formats are unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

_IMPLIED = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16}


def lower(source: torch.dtype, target: Any) -> bool:
    """Whether casting floating ``source`` to ``target`` loses bits of precision.

    >>> lower(torch.float64, torch.float32), lower(torch.float32, torch.float64), lower(torch.float16, torch.bfloat16)
    (True, False, False)
    """
    if not isinstance(target, torch.dtype) or not source.is_floating_point or not target.is_floating_point:
        return False
    return torch.finfo(target).bits < torch.finfo(source).bits


def _precise(tree: Any) -> torch.dtype | None:
    """The floating dtype of most bits among the tensors of ``tree``, or None."""
    best = None
    for t in pytree.tree_leaves(tree):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and (best is None or torch.finfo(t.dtype).bits > torch.finfo(best).bits):
            best = t.dtype
    return best


def _tensor_method(func: Any) -> str | None:
    owner = getattr(func, "__objclass__", None)
    return getattr(func, "__name__", None) if isinstance(owner, type) and issubclass(owner, torch._C.TensorBase) else None


class SkipDowncasts(TorchFunctionMode):
    """Inside this mode, casts of floating tensors to floating dtypes of fewer bits keep their dtype.

    Example:
      >>> x = torch.ones(2, dtype=torch.float64)
      >>> with SkipDowncasts():
      ...     x.to(torch.float32).dtype, x.float().dtype, torch.softmax(x, 0, dtype=torch.float32).dtype, x.to(torch.int64).dtype
      (torch.float64, torch.float64, torch.float64, torch.int64)
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        method = _tensor_method(func)
        if method is not None and args and isinstance(args[0], torch.Tensor):
            source = args[0].dtype
            if method in _IMPLIED and lower(source, _IMPLIED[method]):
                return args[0]
            if method in ("to", "type"):
                args = tuple(source if lower(source, a) else a for a in args)
                if len(args) > 1 and isinstance(args[1], torch.Tensor) and lower(source, args[1].dtype):  # to(other)
                    args = (args[0], args[1].device, source) + args[2:]
                if lower(source, kwargs.get("dtype")):
                    kwargs["dtype"] = source
                return func(*args, **kwargs)
        target = kwargs.get("dtype")
        if isinstance(target, torch.dtype):
            widest = _precise((args, {k: v for k, v in kwargs.items() if k != "dtype"}))
            if widest is not None and lower(widest, target):
                kwargs["dtype"] = widest
        return func(*args, **kwargs)
