"""Context managers that make torch ops behave under nested ``torch.func`` transforms.

:func:`kernel_context` is the routing every kernel is computed under; its parts
(:func:`transform_friendly_attention`, :func:`exact_higher_order`) are used alone where
only one of them applies.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_ft = torch._C._functorch


class _MathAttention:
    """torch's process-wide attention flags, set for transforms while any thread is in a block.

    Two sets of flags: the SDPA backends (the math backend is selected) and the fast path
    of ``nn.MultiheadAttention`` / ``nn.TransformerEncoder`` (``torch.backends.mha``, switched
    off: it calls fused kernels and converts padded batches to nested tensors, neither of which
    ``vmap`` can batch; ``TransformerEncoder`` checks it before it checks grad mode).
    ``torch.nn.attention.sdpa_kernel`` saves the flags on entry and restores them on exit, so
    two threads whose blocks overlap restore each other's saved state, and the last one out
    can leave flash and memory-efficient attention disabled for the rest of the process.
    Here the first block in (in any thread) saves the flags and sets them, and the last block
    out restores them. The flags themselves are global, which is why this count is too: it is
    the one piece of state that mirrors them.
    """

    lock = threading.Lock()
    depth = 0
    active: Any = None  # the sdpa_kernel context entered by the first block
    fastpath: bool | None = None  # torch.backends.mha's flag as the first block found it

    @classmethod
    def enter(cls) -> None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with cls.lock:
            if cls.depth == 0:
                cls.active = sdpa_kernel([SDPBackend.MATH])
                cls.active.__enter__()
                mha = getattr(torch.backends, "mha", None)
                if mha is not None and hasattr(mha, "set_fastpath_enabled"):
                    cls.fastpath = mha.get_fastpath_enabled()
                    mha.set_fastpath_enabled(False)
            cls.depth += 1

    @classmethod
    def exit(cls) -> None:
        with cls.lock:
            cls.depth -= 1
            if cls.depth == 0:
                active, cls.active = cls.active, None
                active.__exit__(None, None, None)
                if cls.fastpath is not None:
                    torch.backends.mha.set_fastpath_enabled(cls.fastpath)
                    cls.fastpath = None


def _attention_functions() -> frozenset[Any]:
    found = {F.scaled_dot_product_attention, F.multi_head_attention_forward}
    for name in ("_native_multi_head_attention", "_transformer_encoder_layer_fwd"):  # the fused fast paths
        if hasattr(torch, name):
            found.add(getattr(torch, name))
    return frozenset(found)


ATTENTION_FUNCTIONS = _attention_functions()
"""The torch functions whose computation :func:`transform_friendly_attention` routes (``nn.MultiheadAttention``
and ``nn.TransformerEncoder`` call ``F.multi_head_attention_forward`` where their fast path is off). A function
that calls none of them computes the same with or without the routing."""


@contextlib.contextmanager
def transform_friendly_attention(enabled: bool = True) -> Iterator[None]:
    """Route attention to forms every ``torch.func`` transform supports, for this block.

    - ``scaled_dot_product_attention`` runs its math backend: the fused CPU/CUDA attention
      kernels have neither batching rules (vmap falls back to a slow per-sample loop) nor
      forward-mode derivatives; the math backend is plain matmul + softmax.
    - The fast path of ``nn.MultiheadAttention`` / ``nn.TransformerEncoder``
      (``torch.backends.mha``) is off: it calls fused kernels and turns a padding mask into
      nested tensors, which ``vmap`` cannot batch.

    torch selects both by process-wide flags: they are set while any thread is inside such a
    block and restored when the last one leaves (see :class:`_MathAttention`), also when
    blocks of several threads overlap. ``enabled=False`` changes nothing: for a function known
    to call none of :data:`ATTENTION_FUNCTIONS` (setting and restoring the flags costs about
    15 µs a block).

    Example:
      >>> import torch
      >>> before = torch.backends.cuda.flash_sdp_enabled(), torch.backends.mha.get_fastpath_enabled()
      >>> with transform_friendly_attention():
      ...     torch.backends.cuda.flash_sdp_enabled(), torch.backends.mha.get_fastpath_enabled()
      (False, False)
      >>> (torch.backends.cuda.flash_sdp_enabled(), torch.backends.mha.get_fastpath_enabled()) == before
      True
    """
    if not enabled:
        yield
        return
    try:
        from torch.nn.attention import sdpa_kernel  # noqa: F401
    except ImportError:  # torch < 2.3: nothing to select
        yield
        return
    _MathAttention.enter()
    try:
        yield
    finally:
        _MathAttention.exit()


# --- normalisation ops as elementary ops ------------------------------------------------
#
# PyTorch's fused normalisation kernels have first-order derivative rules that are
# right, but their higher-order ones are not all right (torch 2.13: nested forward mode
# through layer_norm / batch_norm, and reverse-over-vmap(jacrev) through layer_norm,
# give wrong numbers; pytorch issues 196699, 196700, 198017). Written with mean / var /
# rsqrt, every order of every transform is derived from elementary rules and is exact.


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(tuple(normalized_shape)), 0)) if not isinstance(normalized_shape, int) else (-1,)
    mean = input.mean(dim=dims, keepdim=True)
    centred = input - mean
    var = (centred * centred).mean(dim=dims, keepdim=True)
    out = centred * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def _rms_norm(input, normalized_shape, weight=None, eps=None):
    dims = tuple(range(-len(tuple(normalized_shape)), 0)) if not isinstance(normalized_shape, int) else (-1,)
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    out = input * torch.rsqrt((input * input).mean(dim=dims, keepdim=True) + eps)
    return out if weight is None else out * weight


def _channel_shape(input: torch.Tensor) -> tuple[int, ...]:
    return (1, -1) + (1,) * (input.ndim - 2)


def _affine(out, weight, bias):
    if weight is not None:
        out = out * weight.reshape(_channel_shape(out))
    if bias is not None:
        out = out + bias.reshape(_channel_shape(out))
    return out


def _batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    use_batch = training or running_mean is None or running_var is None
    if use_batch:
        dims = (0,) + tuple(range(2, input.ndim))
        mean = input.mean(dim=dims, keepdim=True)
        centred = input - mean
        var = (centred * centred).mean(dim=dims, keepdim=True)
        if training and running_mean is not None and running_var is not None:
            n = input.numel() // input.shape[1]
            with torch.no_grad():  # the running statistics, as F.batch_norm updates them
                m = momentum if momentum is not None else 0.1
                running_mean.mul_(1 - m).add_(m * mean.detach().reshape(-1))
                running_var.mul_(1 - m).add_(m * var.detach().reshape(-1) * n / max(n - 1, 1))
        out = centred * torch.rsqrt(var + eps)
    else:
        shape = _channel_shape(input)
        out = (input - running_mean.reshape(shape)) * torch.rsqrt(running_var.reshape(shape) + eps)
    return _affine(out, weight, bias)


def _instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                   use_input_stats=True, momentum=0.1, eps=1e-5):
    if not use_input_stats and running_mean is not None and running_var is not None:
        shape = _channel_shape(input)
        out = (input - running_mean.reshape(shape)) * torch.rsqrt(running_var.reshape(shape) + eps)
        return _affine(out, weight, bias)
    dims = tuple(range(2, input.ndim))
    mean = input.mean(dim=dims, keepdim=True)
    centred = input - mean
    var = (centred * centred).mean(dim=dims, keepdim=True)
    return _affine(centred * torch.rsqrt(var + eps), weight, bias)


def _group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    n, _c = input.shape[0], input.shape[1]
    grouped = input.reshape(n, num_groups, -1)
    mean = grouped.mean(dim=-1, keepdim=True)
    centred = grouped - mean
    var = (centred * centred).mean(dim=-1, keepdim=True)
    out = (centred * torch.rsqrt(var + eps)).reshape(input.shape)
    return _affine(out, weight, bias)


def _weight_norm(v, g, dim=0):
    """``torch._weight_norm``: its fused second derivative is wrong too (torch 2.13: gradgradcheck fails)."""
    axes = [d for d in range(v.dim()) if d != dim]
    return v * (g / (v.norm(dim=axes, keepdim=True) if axes else v.abs()))


NORM_DECOMPOSITIONS: dict[Callable[..., Any], Callable[..., Any]] = {
    F.layer_norm: _layer_norm,
    F.batch_norm: _batch_norm,
    F.instance_norm: _instance_norm,
    F.group_norm: _group_norm,
    torch._weight_norm: _weight_norm,
}
if hasattr(F, "rms_norm"):
    NORM_DECOMPOSITIONS[F.rms_norm] = _rms_norm


class _DecomposeNorms(TorchFunctionMode):
    """Replaces the fused normalisation functions by :data:`NORM_DECOMPOSITIONS`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        impl = NORM_DECOMPOSITIONS.get(func)
        if impl is not None:
            return impl(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def exact_higher_order(enabled: bool = True) -> Iterator[None]:
    """Route normalisation ops through elementary-op decompositions for this block.

    Use it whenever a derivative of a derivative will be taken (a kernel that is itself
    differentiated, ``linearize``, ``taylor_expand``): PyTorch's fused ``layer_norm`` and
    ``batch_norm`` have wrong second-order derivatives. ``enabled=False`` keeps the fused
    (faster) kernels. Nothing global is changed outside the block.

    Example:
      >>> import torch
      >>> x = torch.randn(3, 4, dtype=torch.float64)
      >>> with exact_higher_order():
      ...     y = torch.nn.functional.layer_norm(x, (4,))
      >>> torch.allclose(y, torch.nn.functional.layer_norm(x, (4,)))
      True
    """
    if not enabled:
        yield
        return
    with _DecomposeNorms():
        yield


def needs_higher_order(*trees: Any) -> bool:
    """True when a kernel computed from ``trees`` may be differentiated again.

    That is the case when a tensor leaf requires grad (with grad mode on) or is wrapped
    by an outer ``torch.func`` transform (``grad``, ``jacrev``, ``vmap``...).
    """
    grad_on = torch.is_grad_enabled()
    for t in torch.utils._pytree.tree_leaves(trees):
        if not isinstance(t, torch.Tensor):
            continue
        # vmap alone (an ensemble axis) differentiates nothing: look through batching wrappers;
        # any other wrapper (grad, jacrev, jvp...) means a derivative of the kernel is taken.
        while _ft.is_functorch_wrapped_tensor(t):
            if not _ft.is_batchedtensor(t):
                return True
            t = _ft.get_unwrapped(t)
        if grad_on and t.requires_grad:
            return True
    return False


def keeps_graph(tensors: Sequence[torch.Tensor], higher: bool | None = None) -> bool:
    """Whether results formed from ``tensors`` must be differentiable themselves: :func:`needs_higher_order` (given as
    ``higher`` where the caller has it), or a tensor wrapped by any ``torch.func`` transform, ``vmap`` included
    (buffers written in place, such as per-sample rows, are seen by neither autograd nor the transforms).

    >>> keeps_graph([torch.ones(2)]), keeps_graph([torch.ones(2, requires_grad=True)])
    (False, True)
    """
    if higher is None:
        higher = needs_higher_order(tensors)
    return higher or any(_ft.is_functorch_wrapped_tensor(t) for t in tensors)


@contextlib.contextmanager
def kernel_context(*trees: Any) -> Iterator[None]:
    """The op routing every kernel is computed under.

    Attention always uses its math backend; normalisation ops are decomposed into
    elementary ops when the kernel may be differentiated again (a leaf of ``trees``
    requires grad or is wrapped by an outer ``torch.func`` transform), because torch's
    fused norms have wrong second-order derivatives. Otherwise the fused ops are kept.
    """
    with transform_friendly_attention(), exact_higher_order(needs_higher_order(trees)):
        yield


@functools.cache
def load_forward_ad_decompositions() -> None:
    """Load torch's forward-mode decompositions now, without its ``torch.jit.script`` deprecation warning.

    torch imports them lazily on the first ``jvp`` (``torch.autograd.forward_ad``) and scripts
    them with ``torch.jit.script``, which warns that it is deprecated: a warning about torch's
    own internals that users of ``ntkfunc`` can do nothing about. Called before every ``jvp``
    path (implementation 2, ``ntk_vp_fn``, ``taylor_expand``); the same condition as torch's.
    """
    if os.environ.get("PYTORCH_JIT", "1") == "1" and __debug__:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`torch.jit.script` is deprecated")
            from torch._decomp import decompositions_for_jvp  # noqa: F401
