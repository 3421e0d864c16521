"""Linear algebra on the NTK through NTK-vector products: spectra and kernel regression.

Both work on ``Θ = Θ(x, x)``, the full eNTK of ``f`` on one dataset as a symmetric
positive semi-definite ``(N O) x (N O)`` operator (``O`` = output entries per sample),
applied by :func:`ntkfunc.ntk_vp_fn` and never formed:

- :func:`top_eigenvalues`: the ``k`` largest eigenvalues by :func:`lanczos` (Lanczos with
  full reorthogonalisation), ``~k + 20`` products for the fast-decaying NTK spectra.
- :func:`ntk_solve`: ``α = (Θ + λI)⁻¹ y`` by conjugate gradients (:func:`cg`); the
  kernel-regression predictions at new points are then ``ntk_vp_fn(f, x_test, x, params)(α)``.

:func:`lanczos` and :func:`cg` take any symmetric ``matvec`` on flat vectors.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable

import torch
from torch.utils import _pytree as pytree

from ntkfunc._core.types import ApplyFn, PyTree
from ntkfunc.ntk_vp import ntk_vp_fn

MatVec = Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class LanczosResult:
    """``eigenvalues`` (k,) descending; ``eigenvectors`` (n, k) or None; ``iterations``
    (matrix-vector products); ``converged``: every Ritz residual below the tolerance."""

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None
    iterations: int
    converged: bool


def _random_unit(n: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    v = torch.randn(n, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
    return v / v.norm()


def _orthogonalise(w: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``w`` minus its projection on the orthonormal columns of ``basis`` (twice: DGKS)."""
    for _ in range(2):
        w = w - basis @ (basis.T @ w)
    return w


def lanczos(
    matvec: MatVec,
    n: int,
    k: int,
    *,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    max_iter: int | None = None,
    tol: float | None = None,
    seed: int = 0,
    return_eigenvectors: bool = False,
) -> LanczosResult:
    """The ``k`` largest eigenvalues of a symmetric ``n x n`` operator given by ``matvec``.

    Lanczos iteration with full reorthogonalisation (every new vector is orthogonalised
    twice against all previous ones, so no spurious copies of converged eigenvalues
    appear). When the Krylov space becomes invariant (exactly low-rank operators such
    as an NTK with fewer parameters than outputs) it restarts from a random vector
    orthogonal to all previous ones, so after ``n`` steps the result is exact.
    Stops when the residual bound ``|β_j s_ji|`` of each of the top ``k`` Ritz pairs is
    below ``tol * max |θ|`` (default ``tol``: ``sqrt(eps)`` of ``dtype``; the eigenvalue
    error is about the residual squared over the spectral gap), or after ``max_iter``
    products (default ``min(n, max(3k, k + 60))``; warns if not converged).

    Cost: ``m`` products and ``O(n m²)`` for the reorthogonalisation; memory ``n m``.

    Example:
      >>> import torch
      >>> a = torch.randn(50, 50, dtype=torch.float64); a = a @ a.T
      >>> res = lanczos(lambda v: a @ v, 50, k=3)
      >>> bool(torch.allclose(res.eigenvalues, torch.linalg.eigvalsh(a).flip(0)[:3]))
      True
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"lanczos(n={n!r}): expected a positive operator size")
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"lanczos(k={k!r}): expected 1 <= k <= n = {n}")
    m_max = min(n, max(3 * k, k + 60)) if max_iter is None else int(max_iter)
    if not k <= m_max <= n:
        raise ValueError(f"lanczos(max_iter={max_iter!r}): expected k = {k} <= max_iter <= n = {n}")
    tol = math.sqrt(torch.finfo(dtype).eps) if tol is None else float(tol)
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)

    basis = torch.empty(n, 0, dtype=dtype, device=device)
    q = _random_unit(n, gen, dtype, device)
    alphas: list[float] = []
    betas: list[float] = []  # betas[j] couples q_j and q_{j+1} (0 after a restart)
    scale = 0.0
    theta = s = None
    converged = False
    for j in range(m_max):
        basis = torch.cat([basis, q[:, None]], dim=1)
        w = matvec(q)
        if w.shape != (n,):
            raise ValueError(f"lanczos: matvec returned shape {tuple(w.shape)}; expected ({n},)")
        w = w.to(dtype)
        alphas.append(float(q @ w))
        w = _orthogonalise(w, basis)
        beta = float(w.norm())
        tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
        theta, s = torch.linalg.eigh(tri)  # ascending Ritz values
        scale = max(scale, float(theta.abs().max()), abs(alphas[-1]))
        if j + 1 >= k:
            residuals = (beta * s[-1, -k:]).abs()
            if j + 1 == n or bool((residuals <= tol * max(scale, 1e-300)).all()):
                converged = True
                break
        if j + 1 == m_max:
            break
        if beta <= 1e3 * torch.finfo(dtype).eps * max(scale, 1e-300):  # invariant subspace: restart
            w = _orthogonalise(_random_unit(n, gen, dtype, device), basis)
            if float(w.norm()) < 1e-3:
                converged = True
                break
            beta_next = 0.0
        else:
            beta_next = beta
        betas.append(beta_next)
        q = w / w.norm()
    if not converged:
        warnings.warn(
            f"lanczos: the top {k} Ritz values did not converge to tol={tol:g} in max_iter={m_max} products; "
            "raise max_iter or tol",
            RuntimeWarning,
            stacklevel=2,
        )
    assert theta is not None and s is not None
    values = theta.flip(0)[:k].to(dtype=dtype, device=device)
    vectors = None
    if return_eigenvectors:
        vectors = basis @ s.flip(1)[:, :k].to(dtype=dtype, device=device)
    return LanczosResult(values, vectors, len(alphas), converged)


def top_eigenvalues(
    f: ApplyFn,
    x: PyTree,
    params: PyTree,
    k: int = 10,
    *,
    max_iter: int | None = None,
    tol: float | None = None,
    seed: int = 0,
    return_eigenvectors: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, PyTree]:
    """The ``k`` largest eigenvalues of the full eNTK ``Θ(x, x)``, an ``(N O) x (N O)`` matrix.

    By :func:`lanczos` on :func:`ntkfunc.ntk_vp_fn` products: ``Θ`` is never formed. They
    are the eigenvalues of ``ntk_fn(f, trace_axes=())(x, None, params)`` reshaped to
    ``(N O, N O)`` (for an ``(N, O)`` output). With ``return_eigenvectors`` also returns
    the eigenvectors, as a pytree shaped like ``f(params, x)`` with a leading axis of size
    ``k``.

    Example:
      >>> import torch, ntkfunc
      >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()
      >>> f, params = ntkfunc.from_module(model)
      >>> x = torch.randn(30, 4, dtype=torch.float64)
      >>> top = ntkfunc.linalg.top_eigenvalues(f, x, params, k=3)
      >>> dense = ntkfunc.ntk_fn(f, trace_axes=())(x, None, params).permute(0, 2, 1, 3).reshape(60, 60)
      >>> bool(torch.allclose(top, torch.linalg.eigvalsh(dense).flip(0)[:3]))
      True
    """
    op = ntk_vp_fn(f, x, None, params)
    n = sum(math.prod(s) for s in op.in_shapes)
    res = lanczos(
        op.matvec, n, k, dtype=op.dtype, device=op.device, max_iter=max_iter, tol=tol, seed=seed,
        return_eigenvectors=return_eigenvectors,
    )
    if not return_eigenvectors:
        return res.eigenvalues
    assert res.eigenvectors is not None
    sizes = [math.prod(s) for s in op.in_shapes]
    parts = [c.T.reshape(k, *s) for c, s in zip(res.eigenvectors.split(sizes, dim=0), op.in_shapes)]
    return res.eigenvalues, pytree.tree_unflatten(parts, op._spec2)


@dataclasses.dataclass
class CGResult:
    """``x``: the solution (flat for :func:`cg`, shaped like ``y`` for :func:`ntk_solve`);
    ``iterations``; ``residual``: final ``‖b - A x‖ / ‖b‖``; ``converged``."""

    x: PyTree
    iterations: int
    residual: float
    converged: bool


def cg(
    matvec: MatVec,
    b: torch.Tensor,
    *,
    x0: torch.Tensor | None = None,
    tol: float = 1e-6,
    max_iter: int | None = None,
) -> CGResult:
    """Solves ``A x = b`` for a symmetric positive (semi-)definite ``A`` by conjugate gradients.

    Stops when ``‖b - A x‖ ≤ tol ‖b‖`` (the residual is recomputed as ``b - A x`` at the
    end) or after ``max_iter`` products (default ``10 n``, as SciPy: rounding slows CG on
    ill-conditioned systems; warns if not converged).

    Example:
      >>> import torch
      >>> a = torch.randn(20, 20, dtype=torch.float64); a = a @ a.T + torch.eye(20, dtype=torch.float64)
      >>> b = torch.randn(20, dtype=torch.float64)
      >>> res = cg(lambda v: a @ v, b, tol=1e-12)
      >>> bool(torch.allclose(res.x, torch.linalg.solve(a, b))), res.converged
      (True, True)
    """
    if b.ndim != 1:
        raise ValueError(f"cg: b has shape {tuple(b.shape)}; expected a vector")
    n = b.numel()
    max_iter = 10 * n if max_iter is None else int(max_iter)
    if max_iter < 1:
        raise ValueError(f"cg(max_iter={max_iter}): expected a positive number of iterations")
    if x0 is not None and x0.shape != b.shape:
        raise ValueError(f"cg: x0 has shape {tuple(x0.shape)}; expected {tuple(b.shape)} like b")
    b_norm = float(b.norm())
    if b_norm == 0.0:
        return CGResult(torch.zeros_like(b), 0, 0.0, True)
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - matvec(x) if x0 is not None else b.clone()
    p = r.clone()
    rr = float(r @ r)
    it = 0
    while it < max_iter and math.sqrt(rr) > tol * b_norm:
        ap = matvec(p)
        pap = float(p @ ap)
        if pap <= 0.0:  # A is singular along p and b has a component there
            break
        step = rr / pap
        x = x + step * p
        r = r - step * ap
        rr_new = float(r @ r)
        p = r + (rr_new / rr) * p
        rr = rr_new
        it += 1
    residual = float((b - matvec(x)).norm()) / b_norm
    converged = residual <= max(tol, 10 * torch.finfo(b.dtype).eps)
    if not converged:
        warnings.warn(
            f"cg: relative residual {residual:.3g} > tol={tol:g} after {it} iterations; raise max_iter, "
            "raise the ridge (better conditioning) or use float64",
            RuntimeWarning,
            stacklevel=2,
        )
    return CGResult(x, it, residual, converged)


def ntk_solve(
    f: ApplyFn,
    x: PyTree,
    params: PyTree,
    y: PyTree,
    ridge: float,
    *,
    tol: float = 1e-6,
    max_iter: int | None = None,
) -> CGResult:
    """Kernel regression weights ``α = (Θ(x, x) + ridge·I)⁻¹ y`` by conjugate gradients.

    ``y`` has the structure and shapes of ``f(params, x)`` (e.g. ``(N, O)`` targets), as
    does the solution ``result.x``. Predictions at new inputs are
    ``ntk_vp_fn(f, x_test, x, params)(result.x)``. ``Θ`` is the full eNTK (no trace), as
    in :func:`ntkfunc.ntk_vp_fn`; each CG step is one NTK-vector product.

    Example:
      >>> import torch, ntkfunc
      >>> model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()
      >>> f, params = ntkfunc.from_module(model)
      >>> x, y = torch.randn(20, 4, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
      >>> res = ntkfunc.linalg.ntk_solve(f, x, params, y, ridge=0.1, tol=1e-10)
      >>> theta = ntkfunc.ntk_fn(f, trace_axes=())(x, None, params).permute(0, 2, 1, 3).reshape(40, 40)
      >>> direct = torch.linalg.solve(theta + 0.1 * torch.eye(40, dtype=torch.float64), y.reshape(-1))
      >>> bool(torch.allclose(res.x.reshape(-1), direct, atol=1e-8))
      True
    """
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0:
        raise ValueError(f"ntk_solve(ridge={ridge!r}): expected a non-negative number")
    op = ntk_vp_fn(f, x, None, params)
    leaves = op._check(y, name="y")
    b = torch.cat([t.reshape(-1) for t in leaves])

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return op.matvec(v) + ridge * v

    res = cg(matvec, b, tol=tol, max_iter=max_iter)
    sizes = [math.prod(s) for s in op.in_shapes]
    parts = [c.reshape(s) for c, s in zip(res.x.split(sizes), op.in_shapes)]
    res.x = pytree.tree_unflatten(parts, op._spec2)
    return res
