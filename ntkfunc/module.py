"""``from_module``: an ``nn.Module`` as a pure function ``f(params, x)`` and its params."""

from __future__ import annotations

import copy
import threading
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, replace_all_batch_norm_modules_

from ntkfunc._core.calls import Convention, Inputs, Output
from ntkfunc._core.checks import BATCH_COUPLED_ATTR
from ntkfunc._core.types import ApplyFn, PyTree


def from_module(
    module: nn.Module, *, vmap_axes: Any = 0, output: Output = None, inputs: Inputs = "auto"
) -> tuple[ApplyFn, dict[str, torch.Tensor]]:
    """Returns ``(f, params)`` with ``f(params, x) = module(x)`` computed by ``functional_call``.

    - ``params``: the trainable parameters (``requires_grad=True``), detached, by name.
      Frozen parameters and buffers are constants inside ``f``.
    - A module in training mode with dropout is refused (kernels of a random function are
      not defined): call ``module.eval()``.
    - ``f`` is thread-safe (``kernel_matrix(devices=...)`` runs one worker thread per
      device): ``functional_call`` swaps tensors into a module, so each thread other than
      the main one runs its own copy of the module's structure (its tensors on the meta
      device: every parameter and buffer is passed at call time).
    - A module in training mode with BatchNorm normalises with batch statistics, so one
      sample's output depends on the whole batch. It is refused unless ``vmap_axes=None``,
      in which case ``f`` uses a copy of the module whose BatchNorm layers keep no running
      statistics (nothing in ``module`` is modified); pass the same ``vmap_axes=None`` to
      ``ntk_fn``.
    - Model libraries' conventions (HuggingFace, timm, torchvision; see the README): ``x`` a
      dict whose keys name ``forward``'s parameters (``input_ids``, ``attention_mask``, ...) is
      passed as keyword arguments (``inputs="auto"``; or ``"keywords"`` / ``"positional"``), a
      ``forward`` with a ``use_cache`` parameter gets ``use_cache=False``, and ``output``
      selects what the kernel is of: a key or attribute (``"logits"``), a path
      (``("hidden_states", -1)``) or a callable of the module's output. With ``output=None`` a
      HuggingFace ``ModelOutput`` holding one tensor gives that tensor, one holding several is
      refused with an error that lists them. timm and torchvision models return tensors and
      need none of this.

    Example:
      >>> import torch, ntkfunc
      >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
      >>> f, params = ntkfunc.from_module(model)
      >>> sorted(params)
      ['0.bias', '0.weight', '2.bias', '2.weight']
      >>> f(params, torch.ones(5, 3)).shape
      torch.Size([5, 2])
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"from_module: expected a torch.nn.Module, got {type(module).__name__}")
    params = {k: v.detach() for k, v in module.named_parameters() if v.requires_grad}
    if not params:
        raise ValueError(f"from_module: {type(module).__name__} has no trainable parameter (requires_grad=True)")

    dropout = [n for n, m in module.named_modules() if m.training and isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
    if dropout:
        raise ValueError(
            f"from_module: dropout module(s) {dropout} are in training mode, so the model is random; "
            "expected module.eval() (or dropout with p=0)"
        )
    batchnorms = [n for n, m in module.named_modules() if m.training and isinstance(m, nn.modules.batchnorm._BatchNorm)]
    coupled = None
    if batchnorms:
        coupled = f"BatchNorm module(s) {batchnorms} are in training mode (batch statistics)"
        if vmap_axes is not None:
            raise ValueError(
                f"from_module(vmap_axes={vmap_axes!r}): {coupled}, so one sample's output depends on the "
                "whole batch; call module.eval() to use running statistics, or pass vmap_axes=None here and "
                "to ntk_fn for the exact kernel of the whole batch"
            )
        module = copy.deepcopy(module)
        replace_all_batch_norm_modules_(module)

    consts: dict[str, torch.Tensor] = {k: v.detach() for k, v in module.named_parameters() if not v.requires_grad}
    consts.update({k: v.detach() for k, v in module.named_buffers()})

    per_thread = _PerThreadModules(module)
    call = Convention.of(module, inputs=inputs, output=output)

    def f(p: PyTree, x: PyTree) -> PyTree:
        args, kwargs = call.arguments(x)
        try:
            out = functional_call(per_thread.get(), (p, consts), args, kwargs, strict=False)
        except RuntimeError as err:
            if "data-dependent control flow" in str(err):
                raise RuntimeError(_DATA_DEPENDENT.format(name=type(module).__name__)) from err
            raise
        return call.select(out)

    f.__name__ = f"{type(module).__name__}_apply"
    if coupled:
        setattr(f, BATCH_COUPLED_ATTR, coupled)
    return f, params


_DATA_DEPENDENT = (
    "from_module: {name} reads the values of its inputs in Python (data-dependent control flow), which "
    "torch.func.vmap cannot do per sample (HuggingFace's attention-mask preparation does this for some "
    "attention implementations); expected either vmap_axes=None in ntk_fn (the exact kernel of the whole batch, "
    "computed as one unit) or inputs without the value-dependent argument (e.g. no attention_mask when no "
    "token is padded)"
)


class _PerThreadModules:
    """The module for the main thread; structural copies (meta tensors) for other threads."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        memo: dict[int, Any] = {}
        for t in list(module.parameters()) + list(module.buffers()):
            meta = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
        self.template = copy.deepcopy(module, memo)  # no tensor data copied
        self.lock = threading.Lock()
        self.local = threading.local()

    def get(self) -> nn.Module:
        if threading.current_thread() is threading.main_thread():
            return self.module
        module = getattr(self.local, "module", None)
        if module is None:
            with self.lock:
                module = self.local.module = copy.deepcopy(self.template)
        return module
