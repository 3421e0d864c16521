"""How ``from_module`` calls a module and what of its output the kernel is of.

The conventions of the model libraries people use, in one place:

- **Inputs**: ``x`` a tensor (or any pytree) is the module's one positional argument.
  ``x`` a dict whose keys name parameters of ``forward`` (HuggingFace: ``input_ids``,
  ``attention_mask``, ``token_type_ids``, ...) is passed as keyword arguments
  (``inputs="auto"``; ``"keywords"`` / ``"positional"`` to say so). Every leaf of ``x`` is
  batched along ``vmap_axes`` like any input pytree, masks included.
- **Caches**: a ``forward`` with a ``use_cache`` parameter gets ``use_cache=False`` (a kernel
  has no use for key/value caches; they are not tensors of the output) unless ``x`` sets it.
- **Outputs**: ``output=None`` keeps what the module returns, except a HuggingFace
  ``ModelOutput``: one tensor in it is the output, several are an error that lists them.
  ``output="logits"`` (a key or attribute), a path such as ``("hidden_states", -1)``, or a
  callable ``output(module_output)`` selects what the kernel is of.

Example:
  >>> import torch
  >>> class Toy(torch.nn.Module):
  ...     def forward(self, input_ids, attention_mask=None, use_cache=True):
  ...         return {"logits": input_ids.float() * attention_mask, "cache": use_cache}
  >>> call = Convention.of(Toy(), inputs="auto", output="logits")
  >>> args, kwargs = call.arguments({"input_ids": torch.ones(2, 3), "attention_mask": torch.ones(2, 3)})
  >>> args, sorted(kwargs)
  ((), ['attention_mask', 'input_ids', 'use_cache'])
  >>> call.select(Toy()(*args, **kwargs)).shape
  torch.Size([2, 3])
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Union

import torch
from torch import nn

Inputs = Literal["auto", "keywords", "positional"]
Output = Union[None, str, int, Sequence[Union[str, int]], Callable[[Any], Any]]
"""``output=`` of ``from_module``: None, a key / attribute / index, a path of them, or a callable."""

INPUTS = ("auto", "keywords", "positional")


def is_model_output(out: object) -> bool:
    """Whether ``out`` is a HuggingFace ``ModelOutput`` (checked by class name: transformers need not be installed)."""
    return any(c.__name__ == "ModelOutput" for c in type(out).__mro__)


@dataclasses.dataclass(frozen=True)
class Convention:
    """How one module is called (:meth:`arguments`) and what of its output is kept (:meth:`select`).

    Attributes:
      name: the module's class name (for error messages).
      inputs: ``"auto"``, ``"keywords"`` or ``"positional"`` (see the module docstring).
      output: what ``select`` keeps (see :data:`Output`).
      params: names of ``forward``'s parameters; var_keyword: whether it takes ``**kwargs``.
      no_cache: whether ``use_cache=False`` is passed.
    """

    name: str
    inputs: Inputs
    output: Output
    params: frozenset[str]
    var_keyword: bool
    no_cache: bool

    @staticmethod
    def of(module: nn.Module, *, inputs: str, output: Output) -> Convention:
        """The convention for ``module``; a ValueError / TypeError for a bad ``inputs`` or ``output``."""
        if inputs not in INPUTS:
            raise ValueError(f"from_module(inputs={inputs!r}): expected one of {', '.join(map(repr, INPUTS))}")
        if not (output is None or callable(output) or isinstance(output, (str, int)) or _is_path(output)):
            raise TypeError(
                f"from_module(output={output!r}): expected None, a key or attribute name such as 'logits', "
                "a path such as ('hidden_states', -1), or a callable applied to the module's output"
            )
        try:
            sig = inspect.signature(module.forward)
        except (TypeError, ValueError):  # builtins without a signature: nothing is known, nothing is added
            return Convention(type(module).__name__, inputs, output, frozenset(), True, False)  # type: ignore[arg-type]
        kinds = {p.name: p.kind for p in sig.parameters.values()}
        named = frozenset(n for n, k in kinds.items() if k not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD))
        var_kw = inspect.Parameter.VAR_KEYWORD in kinds.values()
        return Convention(type(module).__name__, inputs, output, named, var_kw, "use_cache" in named)  # type: ignore[arg-type]

    def keywords(self, x: Any) -> bool:
        """Whether ``x`` goes in as keyword arguments: the one place this is decided."""
        if self.inputs != "auto":
            return self.inputs == "keywords"
        if not isinstance(x, Mapping) or not x or not all(isinstance(k, str) for k in x):
            return False
        known = [k in self.params for k in x]
        return all(known) or (self.var_keyword and any(known))

    def arguments(self, x: Any) -> tuple[tuple, dict[str, Any]]:
        """``(args, kwargs)`` for calling the module on ``x``."""
        if self.keywords(x):
            if not isinstance(x, Mapping):
                raise TypeError(f"from_module(inputs='keywords'): x is a {type(x).__name__}; expected a dict of keyword arguments")
            args: tuple = ()
            kwargs = dict(x)
        else:
            args, kwargs = (x,), {}
        if self.no_cache:
            kwargs.setdefault("use_cache", False)
        return args, kwargs

    def select(self, out: Any) -> Any:
        """What the kernel is of, from the module's output ``out``."""
        if self.output is None:
            return _only_tensor(out, self.name) if is_model_output(out) else out
        if callable(self.output):
            return self.output(out)
        path = (self.output,) if isinstance(self.output, (str, int)) else tuple(self.output)
        for depth, key in enumerate(path):
            out = _step(out, key, path[:depth], self)
        return out


def _is_path(output: object) -> bool:
    return isinstance(output, (tuple, list)) and bool(output) and all(isinstance(k, (str, int)) for k in output)


def _fields(out: Any) -> list[str]:
    if isinstance(out, Mapping):
        return [str(k) for k in out]
    if dataclasses.is_dataclass(out):
        return [f.name for f in dataclasses.fields(out)]
    return []


def _only_tensor(out: Any, name: str) -> torch.Tensor:
    """The one tensor of a ``ModelOutput``, or a ValueError that says what to pass."""
    items = {str(k): v for k, v in out.items()}
    if len(items) == 1 and isinstance(next(iter(items.values())), torch.Tensor):
        return next(iter(items.values()))
    first = next((k for k, v in items.items() if isinstance(v, torch.Tensor)), "logits")
    raise ValueError(
        f"from_module: {name} returned a {type(out).__name__} with {len(items)} outputs ({', '.join(items) or 'none'}); "
        f"expected output= to say which one the kernel is of, e.g. from_module(model, output={first!r}), a path "
        "such as output=('hidden_states', -1), or a callable output=lambda out: out.logits[:, -1]"
    )


def _step(out: Any, key: str | int, done: tuple, call: Convention) -> Any:
    """``out[key]`` (or ``getattr(out, key)``) with an error that names the path and what there is."""
    try:
        if isinstance(key, str) and not isinstance(out, Mapping):
            return getattr(out, key)
        return out[key]
    except (KeyError, IndexError, AttributeError, TypeError):
        where = "the output" + "".join(f"[{k!r}]" for k in done)
        fields = _fields(out)
        has = f"has the fields {', '.join(fields)}" if fields else f"is a {type(out).__name__}"
        raise ValueError(
            f"from_module(output={call.output!r}): {where} of {call.name} {has}, and no {key!r}. "
            "Expected a key, attribute or index it has (for HuggingFace models usually 'logits' or 'last_hidden_state')"
        ) from None
