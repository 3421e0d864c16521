"""Closed-form predictions of wide networks from their kernels (``neural_tangents.predict``).

- :func:`gradient_descent_mse`: outputs of continuous-time gradient descent on the MSE
  loss of a model linearised around its initialisation, at any time(s) ``t``.
- :func:`gp_inference`: posterior mean and covariance of the NNGP / NTK / NTKGP.
- :func:`max_learning_rate`: the largest stable learning rate of gradient descent.

Conventions (as neural-tangents 0.6.5): kernels have the layout of
:func:`ntkfunc.ntk_fn` — for ``y_train`` of shape ``(N, O)``, ``trace_axes=(-1,)`` means
``k_train_train`` of shape ``(N, N)`` (the kernel is ``Θ ⊗ I`` along traced axes) and
``trace_axes=()`` means ``(N, N, O, O)``; time is in units of ``learning_rate``; the loss
is ``|f - y|² / (2 y_train.numel())``; ``diag_reg`` is relative to the mean diagonal of
``k_train_train`` unless ``diag_reg_absolute_scale``. Factorisations (Cholesky for
``t=None``, an eigendecomposition for finite ``t``) are computed once, on first use,
and kept in the returned closure.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from typing import Any, Union

import torch

from ntkfunc._core.types import Axes

Gaussian = collections.namedtuple("Gaussian", "mean covariance")
"""A posterior: ``mean`` shaped like the outputs, ``covariance`` shaped like a kernel."""

Scalar = Union[float, int, torch.Tensor]


# --- kernel layout helpers ----------------------------------------------------------------


def _canonical(axes: Axes, ndim: int, caller: str) -> tuple[int, ...]:
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"{caller}: trace_axes={axes} has axis {a} out of range for y_train of ndim {ndim}")
    return tuple(sorted({a % ndim for a in axes}))


def _make_2d(k: torch.Tensor) -> torch.Tensor:
    """``(a1, b1, a2, b2, ...)`` interleaved kernel -> ``(a1 a2 ..., b1 b2 ...)`` matrix."""
    n = k.ndim // 2
    return k.permute(list(range(0, 2 * n, 2)) + list(range(1, 2 * n, 2))).reshape(math.prod(k.shape[0::2]), -1)


def _zip_axes(k: torch.Tensor) -> torch.Tensor:
    """``(a1, a2, ..., b1, b2, ...)`` -> interleaved ``(a1, b1, a2, b2, ...)``."""
    n = k.ndim // 2
    return k.permute([p for i in range(n) for p in (i, n + i)])


def _even(k: torch.Tensor) -> list[int]:
    return list(range(0, k.ndim, 2))


def _odd(k: torch.Tensor) -> list[int]:
    return list(range(1, k.ndim, 2))


def _check_kernel(k: torch.Tensor, y: torch.Tensor, trace_axes: tuple[int, ...], name: str, caller: str) -> None:
    expected = tuple(d for i, s in enumerate(y.shape) if i not in trace_axes for d in (s, s))
    if not isinstance(k, torch.Tensor):
        raise TypeError(f"{caller}: {name} is a {type(k).__name__}; expected a torch.Tensor")
    if tuple(k.shape) != expected:
        raise ValueError(
            f"{caller}: y_train of shape {tuple(y.shape)} with trace_axes={trace_axes} does not match {name} of "
            f"shape {tuple(k.shape)}; expected {name} of shape {expected} (each untraced axis of y_train twice)"
        )


def _regularised(a: torch.Tensor, diag_reg: float, absolute: bool) -> torch.Tensor:
    if diag_reg == 0:
        return a
    scale = diag_reg if absolute else diag_reg * torch.diagonal(a).mean()
    return a + scale * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)


class _Cholesky:
    """``solve(b, b_axes)``: ``K⁻¹ b`` where ``b``'s axes other than ``b_axes`` match K's columns."""

    def __init__(self, k: torch.Tensor, diag_reg: float, absolute: bool, caller: str) -> None:
        self.col_shape = tuple(k.shape[1::2])
        a = _regularised(_make_2d(k), diag_reg, absolute)
        factor, info = torch.linalg.cholesky_ex(a)
        if int(info.max()) > 0:
            raise ValueError(
                f"{caller}: k_train_train (as a {a.shape[0]}x{a.shape[1]} matrix, diag_reg={diag_reg}) is not "
                "positive definite, so it has no Cholesky factor; expected a positive definite kernel: "
                "pass diag_reg > 0 (e.g. 1e-4)"
            )
        self.factor = factor

    def __call__(self, b: torch.Tensor, b_axes: tuple[int, ...]) -> torch.Tensor:
        b_axes = tuple(a % b.ndim for a in b_axes)
        rest = [i for i in range(b.ndim) if i not in b_axes]
        moved = b.permute(rest + list(b_axes))
        x = torch.cholesky_solve(moved.reshape(self.factor.shape[0], -1), self.factor)
        return x.reshape(self.col_shape + tuple(b.shape[a] for a in b_axes))


def _as_tensor(value: Scalar, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


# --- gradient descent ---------------------------------------------------------------------


def gradient_descent_mse(
    k_train_train: torch.Tensor,
    y_train: torch.Tensor,
    learning_rate: float = 1.0,
    diag_reg: float = 0.0,
    diag_reg_absolute_scale: bool = False,
    trace_axes: Axes = (-1,),
) -> Callable[..., Any]:
    """Returns ``predict_fn(t=None, fx_train_0=0., fx_test_0=None, k_test_train=None)``.

    The outputs of the linearised model trained by continuous-time gradient descent
    (gradient flow) on ``|f(x_train) - y_train|² / (2 y_train.numel())`` with learning rate
    ``learning_rate``: ``df/dt = -η K (f - y) / y.numel()`` on the training set, and on a test
    set ``df_test/dt = -η K_test,train (f - y) / y.numel()``.

    Args:
      k_train_train: ``(N, N)`` for ``y_train (N, O)`` and ``trace_axes=(-1,)``; ``(N, N, O, O)``
        with ``trace_axes=()`` (each untraced axis of ``y_train`` twice, interleaved).
      y_train: targets. learning_rate: η (time is measured in steps of size η).
      diag_reg: added to the diagonal of ``k_train_train``, times its mean diagonal unless
        ``diag_reg_absolute_scale``.
      trace_axes: axes of ``y_train`` along which the kernel is ``Θ ⊗ I``.

    ``predict_fn`` arguments: ``t`` a non-negative scalar or tensor of times (its shape becomes
    leading axes of the results) or ``None`` for ``t = ∞`` (Cholesky solve, no
    eigendecomposition; a kernel that is not positive definite is refused). Finite times are
    exact also for a rank-deficient kernel (a zero eigenvalue takes its limit, see
    ``_flow_factors``), and ``t=float("inf")`` is the limit of the flow: the pseudo-inverse of
    ``k_train_train`` (equal to ``t=None`` when it has full rank); ``fx_train_0`` outputs on the training set at ``t = 0`` (``None``: do not
    predict on it); ``fx_test_0`` outputs on a test set at ``t = 0`` (needs ``k_test_train``, of
    shape ``(N_test, N)`` / ``(N_test, N, O, O)``). Returns ``fx_train_t``, ``fx_test_t`` or
    ``(fx_train_t, fx_test_t)``.

    Example:
      >>> import torch, ntkfunc
      >>> a = torch.randn(4, 6, dtype=torch.float64)
      >>> k = a @ a.T
      >>> y = torch.randn(4, 2, dtype=torch.float64)
      >>> predict = ntkfunc.predict.gradient_descent_mse(k, y)
      >>> predict(t=torch.tensor([0.0, 1.0, 10.0]), fx_train_0=torch.zeros(4, 2)).shape
      torch.Size([3, 4, 2])
      >>> torch.allclose(predict(None, fx_train_0=torch.zeros(4, 2)), y)
      True
    """
    caller = "gradient_descent_mse"
    if not isinstance(y_train, torch.Tensor):
        raise TypeError(f"{caller}: y_train is a {type(y_train).__name__}; expected a torch.Tensor")
    t_axes = _canonical(trace_axes, y_train.ndim, caller)
    _check_kernel(k_train_train, y_train, t_axes, "k_train_train", caller)
    ndim = y_train.ndim
    non_t = [i for i in range(ndim) if i not in t_axes]
    n_t = len(t_axes)
    rhs_shape = tuple(y_train.shape[a] for a in t_axes)
    size = y_train.numel()
    cache: dict[str, Any] = {}

    def cholesky() -> _Cholesky:
        if "cho" not in cache:
            cache["cho"] = _Cholesky(k_train_train, diag_reg, diag_reg_absolute_scale, caller)
        return cache["cho"]

    def eigh() -> tuple[torch.Tensor, torch.Tensor]:
        if "eigh" not in cache:
            evals, evecs = torch.linalg.eigh(_regularised(_make_2d(k_train_train), diag_reg, diag_reg_absolute_scale))
            cache["eigh"] = (evals, evecs)
        return cache["eigh"]

    def to_last(b: torch.Tensor, lead: int = 0) -> torch.Tensor:
        """Move the traced axes of a (lead + y-shaped) tensor last."""
        return b.permute(list(range(lead)) + [lead + i for i in non_t] + [lead + i for i in t_axes])

    def from_last(b: torch.Tensor, lead: int) -> torch.Tensor:
        """Inverse of :func:`to_last`."""
        order = non_t + list(t_axes)
        inverse = [order.index(i) for i in range(ndim)]
        return b.permute(list(range(lead)) + [lead + i for i in inverse])

    def predict_inf(fx_train_0: Any, fx_test_0: Any, k_test_train: Any) -> Any:
        fx_train_t = y_train.to(k_train_train.dtype)
        if fx_test_0 is None:
            return fx_train_t
        rhs = y_train if fx_train_0 is None else y_train - fx_train_0
        sol = cholesky()(rhs, t_axes)  # (*train non-traced, *traced)
        n_k = k_test_train.ndim
        d = torch.tensordot(k_test_train, sol, dims=(_odd(k_test_train), list(range(n_k // 2))))
        fx_test_t = fx_test_0 + from_last(d, 0)
        if fx_train_0 is None:
            return fx_test_t
        return fx_train_t, fx_test_t

    def predict_finite(t: torch.Tensor, fx_train_0: Any, fx_test_0: Any, k_test_train: Any) -> Any:
        t = t * learning_rate
        t_shape = tuple(t.shape)
        lead = len(t_shape)
        t = t.reshape(-1, 1)
        evals, evecs = eigh()
        rhs = -y_train if fx_train_0 is None else fx_train_0 - y_train
        rhs = to_last(torch.broadcast_to(_as_tensor(rhs, k_train_train), y_train.shape)).reshape(-1, *rhs_shape)
        expm1, inv = _flow_factors(evals, t, size)  # (T, n) each
        shape = t_shape + tuple(k_train_train.shape[1::2]) + rhs_shape
        fx_train_t = fx_test_t = None
        if fx_train_0 is not None:
            d = torch.einsum("ji,ti,ki,k...->tj...", evecs, expm1, evecs, rhs).reshape(shape)
            fx0 = _as_tensor(fx_train_0, k_train_train)
            fx_train_t = fx0.reshape((1,) * lead + tuple(fx0.shape)) + from_last(d, lead)
        if fx_test_0 is not None:
            d = torch.einsum("ji,ti,ki,k...->tj...", evecs, inv, evecs, rhs).reshape(shape)
            n_non_t = ndim - n_t
            d = torch.tensordot(k_test_train, d, dims=(_odd(k_test_train), [lead + i for i in range(n_non_t)]))
            # (*test non-traced, *t, *traced) -> (*t, *test non-traced, *traced)
            perm = list(range(n_non_t, n_non_t + lead)) + list(range(n_non_t)) + list(range(n_non_t + lead, d.ndim))
            d = from_last(d.permute(perm), lead)
            fx0 = _as_tensor(fx_test_0, k_train_train)
            fx_test_t = fx0.reshape((1,) * lead + tuple(fx0.shape)) + d
        if fx_train_t is not None and fx_test_t is not None:
            return fx_train_t, fx_test_t
        return fx_train_t if fx_test_t is None else fx_test_t

    def predict_fn(t: Scalar | None = None, fx_train_0: Any = 0.0, fx_test_0: Any = None,
                   k_test_train: torch.Tensor | None = None) -> Any:
        """Outputs at time(s) ``t`` (``None``: infinity); see :func:`gradient_descent_mse`."""
        _check_predict_inputs(fx_train_0, fx_test_0, k_test_train, k_train_train, caller)
        if t is None:
            return predict_inf(fx_train_0, fx_test_0, k_test_train)
        tt = _as_tensor(t, k_train_train)
        if bool((tt < 0).any()) or bool(torch.isnan(tt).any()):
            raise ValueError(f"{caller}: predict_fn(t={t!r}) has a negative (or NaN) time; expected t >= 0, or None for infinity")
        return predict_finite(tt, fx_train_0, fx_test_0, k_test_train)

    return predict_fn


def _check_predict_inputs(fx_train_0: Any, fx_test_0: Any, k_test_train: Any, k_train_train: torch.Tensor, caller: str) -> None:
    if fx_train_0 is None and fx_test_0 is None:
        raise ValueError(f"{caller}: predict_fn(fx_train_0=None, fx_test_0=None) has nothing to predict; expected at least one of them")
    if fx_test_0 is not None and k_test_train is None:
        raise ValueError(
            f"{caller}: predict_fn got fx_test_0 but k_test_train=None; expected k_test_train, the test-train "
            "kernel, to predict on the test set"
        )
    if k_test_train is not None and tuple(k_test_train.shape[1::2]) != tuple(k_train_train.shape[1::2]):
        raise ValueError(
            f"{caller}: k_test_train has shape {tuple(k_test_train.shape)}; expected its odd axes to be the training "
            f"axes {tuple(k_train_train.shape[1::2])} of k_train_train {tuple(k_train_train.shape)}"
        )


def _flow_factors(evals: torch.Tensor, t: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient flow in the eigenbasis of the training kernel: ``(train, test)`` factors per time and eigenvalue.

    For an eigenvalue ``λ`` and time ``t`` (``t``: ``(T, 1)``, ``evals``: ``(n,)``; results ``(T, n)``):

    - ``train = expm1(-λ t / size)``: how far the training residual of that mode has decayed;
    - ``test = expm1(-λ t / size) / λ``: what the mode contributes to test outputs (through
      ``k_test_train``), computed as ``-(t / size) φ(λ t / size)`` with ``φ(z) = -expm1(-z) / z``,
      ``φ(0) = 1``: finite and smooth at ``λ = 0``, where it is the limit ``-t / size``.

    Negative eigenvalues (round-off in a positive semi-definite kernel) are taken as 0, as in
    neural-tangents; neural-tangents 0.6.5 then divides by ``|λ|`` (0 for a negative eigenvalue,
    NaN for a zero one), here every such mode follows the ``λ = 0`` limit. At ``t = inf`` the
    limit is taken: modes with ``λ`` above ``torch.linalg.pinv``'s cutoff (``n`` eps ``λ_max``)
    converge (``train = -1``, ``test = -1 / λ``) and the others do not move (0): the
    pseudo-inverse of the training kernel, equal to ``t=None``'s solve when the kernel has full rank.

    >>> train, test = _flow_factors(torch.tensor([0.0, 2.0], dtype=torch.float64), torch.tensor([[1.0], [float("inf")]], dtype=torch.float64), 1)
    >>> test.tolist()
    [[-1.0, -0.43233235838169365], [0.0, -0.5]]
    """
    lam = evals.clamp(min=0).unsqueeze(0)
    finite = torch.isfinite(t)
    tf = torch.where(finite, t, torch.zeros_like(t))
    z = lam * tf / size
    positive = z > 0
    z_safe = torch.where(positive, z, torch.ones_like(z))
    phi = torch.where(positive, -torch.expm1(-z_safe) / z_safe, torch.ones_like(z))
    train, test = torch.expm1(-z), -(tf / size) * phi
    cutoff = evals.abs().max() * evals.shape[0] * torch.finfo(evals.dtype).eps
    converged = lam > cutoff
    lam_safe = torch.where(converged, lam, torch.ones_like(lam))
    train_inf = torch.where(converged, -torch.ones_like(lam), torch.zeros_like(lam))
    test_inf = torch.where(converged, -1 / lam_safe, torch.zeros_like(lam))
    return torch.where(finite, train, train_inf), torch.where(finite, test, test_inf)


# --- GP inference -------------------------------------------------------------------------


def _get(k: Any, g: str, name: str) -> torch.Tensor:
    if isinstance(k, torch.Tensor):
        return k
    value = getattr(k, g, None)
    if value is None:
        raise ValueError(f"gp_inference: {name} has no {g!r} kernel; expected a tensor or a namedtuple with a {g!r} field")
    return value


def gp_inference(
    k_train_train: Any,
    y_train: torch.Tensor,
    diag_reg: float = 0.0,
    diag_reg_absolute_scale: bool = False,
    trace_axes: Axes = (-1,),
) -> Callable[..., Any]:
    """Returns ``predict_fn(get=None, k_test_train=None, k_test_test=None)``: the GP posterior on a test set.

    ``get``: ``"nngp"`` (Bayesian posterior of the infinitely wide network), ``"ntk"``
    (infinite ensemble trained by gradient flow to ``t = ∞``), ``"ntkgp"`` (GP with the NTK as
    covariance), a tuple of them (a namedtuple ``Gaussians`` with those fields), or ``None``
    for ``("nngp", "ntk")``. Kernels are tensors or namedtuples with ``nngp`` / ``ntk`` fields
    (e.g. from :func:`ntkfunc.kernel_fn` with ``get=("nngp", "ntk")``); the NTK covariance needs
    both. Each result is the posterior mean (shaped like the test outputs) or, when
    ``k_test_test`` is given, a :data:`Gaussian` ``(mean, covariance)`` with the covariance in
    kernel layout. ``k_test_train=None`` predicts on the training set (``N(y_train, 0)``).
    Cholesky factors are computed once per kernel and cached in the closure.

    Example:
      >>> import torch, ntkfunc
      >>> a = torch.randn(5, 8, dtype=torch.float64)
      >>> k = a @ a.T
      >>> y = torch.randn(4, 1, dtype=torch.float64)
      >>> predict = ntkfunc.predict.gp_inference(k[:4, :4], y, diag_reg=1e-6)
      >>> post = predict("nngp", k[4:, :4], k[4:, 4:])
      >>> post.mean.shape, post.covariance.shape
      (torch.Size([1, 1]), torch.Size([1, 1]))
    """
    caller = "gp_inference"
    t_axes = _canonical(trace_axes, y_train.ndim, caller)
    for g in ("nngp", "ntk"):
        if isinstance(k_train_train, torch.Tensor) or getattr(k_train_train, g, None) is not None:
            _check_kernel(_get(k_train_train, g, "k_train_train"), y_train, t_axes, "k_train_train", caller)
    solves: dict[str, _Cholesky] = {}
    k_inv_ys: dict[str, torch.Tensor] = {}

    def solve(g: str) -> _Cholesky:
        if g not in solves:
            solves[g] = _Cholesky(_get(k_train_train, g, "k_train_train"), diag_reg, diag_reg_absolute_scale, caller)
        return solves[g]

    def k_inv_y(g: str) -> torch.Tensor:
        if g not in k_inv_ys:
            k_inv_ys[g] = solve(g)(y_train, t_axes)
        return k_inv_ys[g]

    def tdot(a: torch.Tensor, b: torch.Tensor, axes_a: list[int], axes_b: list[int]) -> torch.Tensor:
        return torch.tensordot(a, b, dims=(axes_a, axes_b))

    def predict_fn(get: Any = None, k_test_train: Any = None, k_test_test: Any = None) -> Any:
        """Posterior per ``get``; see :func:`gp_inference`."""
        single = isinstance(get, str)
        fields = ("nngp", "ntk") if get is None else (get,) if single else tuple(get)
        bad = [g for g in fields if g not in ("nngp", "ntk", "ntkgp")]
        if bad or not fields:
            raise ValueError(f"gp_inference: predict_fn(get={get!r}); expected 'nngp', 'ntk', 'ntkgp', a tuple of them, or None")
        out: dict[str, Any] = {}
        for g in fields:
            kind = "ntk" if g == "ntkgp" else g
            k_dd = _get(k_train_train, kind, "k_train_train")
            k_td = None if k_test_train is None else _get(k_test_train, kind, "k_test_train")
            if k_td is None:
                mean = y_train.to(k_dd.dtype)
            else:
                if tuple(k_td.shape[1::2]) != tuple(k_dd.shape[1::2]):
                    raise ValueError(
                        f"gp_inference: k_test_train has shape {tuple(k_td.shape)}; expected its odd axes to be the "
                        f"training axes {tuple(k_dd.shape[1::2])} of k_train_train {tuple(k_dd.shape)}"
                    )
                first = list(range(k_td.ndim // 2))
                mean = tdot(k_td, k_inv_y(kind), _odd(k_td), first)
                n_t = len(t_axes)
                mean = torch.movedim(mean, list(range(mean.ndim - n_t, mean.ndim)), list(t_axes))
            if k_test_test is None:
                out[g] = mean
                continue
            if k_td is None:
                out[g] = Gaussian(mean, torch.zeros_like(k_dd))
                continue
            first = list(range(k_td.ndim // 2))
            last = list(range(k_td.ndim // 2, k_td.ndim))
            init = "ntk" if g == "ntkgp" else "nngp"
            k_td_init_inv = solve(kind)(_get(k_test_train, init, "k_test_train"), tuple(_even(k_td)))
            k_tt = _get(k_test_test, init, "k_test_test")
            if g in ("nngp", "ntkgp"):
                cov = k_tt - _zip_axes(tdot(k_td, k_td_init_inv, _odd(k_td), first))
            else:
                term_1 = solve("ntk")(k_td, tuple(_even(k_td)))  # K⁻¹ K_td ᵀ
                cov = tdot(_get(k_train_train, "nngp", "k_train_train"), term_1, _odd(k_td), first)
                cov = tdot(term_1, cov, first, first)
                term_2 = tdot(k_td, k_td_init_inv, _odd(k_td), first)
                term_2 = term_2 + torch.movedim(term_2, first, last)
                cov = _zip_axes(cov - term_2) + k_tt
            out[g] = Gaussian(mean, cov)
        if single:
            return out[fields[0]]
        return collections.namedtuple("Gaussians", fields)(*(out[g] for g in fields))

    return predict_fn


def max_learning_rate(ntk_train_train: torch.Tensor, y_train_size: int | None = None, momentum: float = 0.0,
                      eps: float = 1e-12) -> float:
    """The largest learning rate for which gradient descent on the MSE converges (infinite width).

    ``2 (1 + momentum) y_train_size / (λ_max(Θ) + eps)`` for the loss
    ``|f - y|² / (2 y_train_size)``; ``y_train_size=None`` takes ``Θ``'s side as a matrix (right
    for ``trace_axes=()`` kernels).

    Example:
      >>> import torch, ntkfunc
      >>> round(ntkfunc.predict.max_learning_rate(torch.eye(3, dtype=torch.float64) * 2.0), 6)
      3.0
    """
    mat = _make_2d(ntk_train_train)
    factor = mat.shape[0] if y_train_size is None else y_train_size
    max_eval = torch.linalg.eigvalsh(mat)[-1]
    return float(2 * (1 + momentum) * factor / (max_eval + eps))
