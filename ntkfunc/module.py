"""``from_module``: an ``nn.Module`` as a pure function ``f(params, x)`` and its params."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import re
import threading
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, replace_all_batch_norm_modules_

from ntkfunc._core.calls import Convention, Inputs, Output
from ntkfunc._core.casts import SkipDowncasts
from ntkfunc._core.checks import BATCH_COUPLED_ATTR, FINGERPRINT_ATTR, check_bool
from ntkfunc._core.hashing import module_attributes, tensor_digest
from ntkfunc._core.types import ApplyFn, PyTree

_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")


def from_module(
    module: nn.Module, *, vmap_axes: Any = 0, output: Output = None, inputs: Inputs = "auto", skip_downcasts: bool = False
) -> tuple[ApplyFn, dict[str, torch.Tensor]]:
    """Returns ``(f, params)`` with ``f(params, x) = module(x)`` computed by ``functional_call``.

    - ``params``: the trainable parameters (``requires_grad=True``), detached, by name.
      Frozen parameters and buffers are constants inside ``f``.
    - A module in training mode with dropout is refused (kernels of a random function are
      not defined): call ``module.eval()``.
    - ``f`` is thread-safe (``kernel_matrix(devices=...)`` runs one worker thread per
      device): ``functional_call`` swaps tensors into a module, so each thread other than
      the main one runs its own copy of the module's structure (its tensors on the meta
      device: every parameter and buffer is passed at call time). It behaves the same in
      every thread: ``f(p, x)`` refuses a ``p`` that lacks a trainable parameter or has a
      name the module does not know, and refuses to run once ``module.train()`` /
      ``module.eval()`` changed a submodule's mode after ``from_module`` (call it again).
    - ``f`` carries the module's identity (class names, ``repr``, ``state_dict`` keys, modes,
      ``inputs=`` / ``output=``, buffers and frozen parameters) for ``kernel_matrix``'s resume
      fingerprint.
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
    - ``skip_downcasts=True``: inside ``f``, casts of floating tensors to a dtype of fewer bits
      (``.to(torch.float32)``, ``.float()``, ``softmax(..., dtype=torch.float32)``) keep the
      tensor's dtype (:mod:`ntkfunc._core.casts`). For a float64 model whose layers compute in
      float32 (HuggingFace's RMSNorm in Llama / T5 / Mistral / Qwen2, eager attention's softmax),
      ``f`` is then the model in float64 throughout, and every implementation agrees with the
      float64 reference to float64 rounding (forward and reverse mode round the float32 parts
      differently, about 1e-9 apart, without it). ``f``'s outputs then differ from the
      module's by that float32 rounding.

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
    check_bool(skip_downcasts, "skip_downcasts", "from_module")
    params = {k: v.detach() for k, v in module.named_parameters() if v.requires_grad}
    if not params:
        raise ValueError(f"from_module: {type(module).__name__} has no trainable parameter (requires_grad=True)")

    dropout = [n for n, m in module.named_modules() if m.training and isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
    if dropout:
        raise ValueError(
            f"from_module: dropout module(s) {dropout} are in training mode, so the model is random; "
            "expected module.eval() (or dropout with p=0)"
        )
    modes = [(n, m, m.training) for n, m in module.named_modules()]  # of the user's module: checked at every call
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

    casts = SkipDowncasts if skip_downcasts else contextlib.nullcontext
    consts: dict[str, torch.Tensor] = {k: v.detach() for k, v in module.named_parameters() if not v.requires_grad}
    consts.update({k: v.detach() for k, v in module.named_buffers()})

    per_thread = _PerThreadModules(module)
    known = {k for k, _ in module.named_parameters(remove_duplicate=False)} | {k for k, _ in module.named_buffers(remove_duplicate=False)}
    cls = type(module).__name__
    call = Convention.of(module, inputs=inputs, output=output)

    def f(p: PyTree, x: PyTree) -> PyTree:
        _check_call(p, params, known, modes, cls)
        args, kwargs = call.arguments(x)
        try:
            with casts():
                out = functional_call(per_thread.get(), (p, consts), args, kwargs, strict=False)
        except RuntimeError as err:
            if "data-dependent control flow" in str(err):
                raise RuntimeError(_DATA_DEPENDENT.format(name=cls)) from err
            raise
        return call.select(out)

    def identity() -> dict[str, str]:
        """What besides params determines f: the module's structure and modes, how it is called, its constants."""
        selected = getattr(output, "__qualname__", None) if callable(output) else output
        structure = [
            [f"{type(m).__module__}.{type(m).__qualname__}" for m in module.modules()],
            _ADDRESS.sub("0x?", repr(module)),
            list(module.state_dict(keep_vars=True)),
            [m.training for m in module.modules()],
            [inputs, repr(selected)] + (["skip_downcasts"] if skip_downcasts else []),
        ]
        return {"structure": hashlib.sha256(repr(structure).encode()).hexdigest(),
                "attributes": module_attributes(module),  # hyper-parameters kept as plain attributes (Clip(3.0) vs Clip(1.0))
                "constants": tensor_digest(list(consts.values()), list(consts))}

    f.__name__ = f"{cls}_apply"
    setattr(f, FINGERPRINT_ATTR, identity)
    if coupled:
        setattr(f, BATCH_COUPLED_ATTR, coupled)
    return f, params


def _check_call(p: PyTree, params: Mapping[str, torch.Tensor], known: set[str], modes: list[tuple[str, nn.Module, bool]], cls: str) -> None:
    """Refuse, in every thread alike, a params dict that is not the module's, and a module whose mode changed."""
    if not isinstance(p, Mapping):
        raise TypeError(f"from_module's f(params, x): params is a {type(p).__name__}; expected the dict of tensors from_module returned")
    missing = [k for k in params if k not in p]
    unknown = [k for k in p if k not in known]
    if missing or unknown:
        what = (f"lacks {missing[:5]}" if missing else "") + (" and " if missing and unknown else "") + (
            f"has {unknown[:5]}, which {cls} has no parameter or buffer of" if unknown else "")
        raise ValueError(
            f"from_module's f(params, x): params {what}; expected every trainable parameter of {cls} by the names "
            "from_module returned (frozen parameters and buffers may be given too)"
        )
    changed = [(name or "(the module)", m.training) for name, m, was in modes if m.training != was]
    if changed:
        now = "training" if changed[0][1] else "eval"
        raise ValueError(
            f"from_module's f(params, x): {cls} submodules {[n for n, _ in changed][:5]} were switched to {now} mode after "
            "from_module, whose f keeps the mode the module had then; expected that mode: call from_module again "
            "after model.train() / model.eval()"
        )


_DATA_DEPENDENT = (
    "from_module: {name} reads the values of its inputs in Python (data-dependent control flow), which "
    "torch.func.vmap cannot do per sample (HuggingFace's attention-mask preparation does this for some "
    "attention implementations); expected either vmap_axes=None in ntk_fn (the exact kernel of the whole batch, "
    "computed as one unit) or inputs without the value-dependent argument (e.g. no attention_mask when no "
    "token is padded)"
)


def _transformed(t: torch.Tensor) -> bool:
    """A tensor a torch.func transform wrapped (e.g. an attribute a hook set while a kernel was computed)."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


class _PerThreadModules:
    """The module for the main thread; structural copies (meta tensors) for other threads."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        memo: dict[int, Any] = {}
        for t in list(module.parameters()) + list(module.buffers()):
            meta = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
        for m in module.modules():  # tensors computed from parameters and kept as attributes (the hook-based
            for value in vars(m).values():  # torch.nn.utils.weight_norm's `weight`, recomputed at every call)
                if isinstance(value, torch.Tensor) and id(value) not in memo and (value.grad_fn is not None or _transformed(value)):
                    memo[id(value)] = value.detach()  # deepcopy refuses non-leaf tensors; no data is copied
        self.template = copy.deepcopy(module, memo)  # no parameter or buffer data copied
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
