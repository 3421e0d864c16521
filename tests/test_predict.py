"""``ntkfunc.predict`` against explicit integration of the gradient-flow ODE and direct solves."""

from __future__ import annotations

import pytest
import torch

import ntkfunc
from ntkfunc import predict


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _psd(n, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, rank or n + 2, generator=g)
    return a @ a.T / a.shape[1]


def _full_kernel(n_total, n_out, seed):
    """A PSD kernel over (N + extra) samples x n_out outputs, as (Ntot, Ntot, O, O)."""
    k = _psd(n_total * n_out, seed=seed).reshape(n_total, n_out, n_total, n_out)
    return k.permute(0, 2, 1, 3).contiguous()


def _euler(apply_k, apply_k_test, y, f0, ft0, eta, t, steps):
    """Explicit Euler for df/dt = -η K (f - y) / y.numel() (train) and the test outputs."""
    f, ft = f0.clone(), ft0.clone()
    dt = t / steps
    for _ in range(steps):
        r = f - y
        f, ft = f - dt * eta * apply_k(r) / y.numel(), ft - dt * eta * apply_k_test(r) / y.numel()
    return f, ft


def _euler_extrapolated(*args, steps=1500):
    """Richardson-extrapolated Euler: O(dt²) accurate."""
    a = _euler(*args, steps=steps)
    b = _euler(*args, steps=2 * steps)
    return [2 * q - p for p, q in zip(a, b)]


def _reg(k2d, diag_reg, absolute):
    scale = diag_reg if absolute else diag_reg * torch.diagonal(k2d).mean()
    return k2d + scale * torch.eye(k2d.shape[0])


@pytest.mark.parametrize("diag_reg,absolute", [(0.0, False), (0.3, False), (0.05, True)])
def test_traced_kernel_matches_euler(diag_reg, absolute):
    n, nt, o = 5, 3, 2
    k = _psd(n + nt, seed=1)
    ktt, ktd = k[:n, :n], k[n:, :n]
    g = torch.Generator().manual_seed(2)
    y, f0, ft0 = torch.randn(n, o, generator=g), torch.randn(n, o, generator=g), torch.randn(nt, o, generator=g)
    eta, times = 0.7, torch.tensor([0.0, 3.0, 11.0])
    fn = predict.gradient_descent_mse(ktt, y, learning_rate=eta, diag_reg=diag_reg, diag_reg_absolute_scale=absolute)
    train, test = fn(times, f0, ft0, ktd)
    assert train.shape == (3, n, o) and test.shape == (3, nt, o)
    kreg = _reg(ktt, diag_reg, absolute)
    for i, t in enumerate(times.tolist()):
        ef, eft = _euler_extrapolated(lambda r: kreg @ r, lambda r: ktd @ r, y, f0, ft0, eta, t)
        assert torch.allclose(train[i], ef, atol=1e-6), (train[i] - ef).abs().max()
        assert torch.allclose(test[i], eft, atol=1e-6), (test[i] - eft).abs().max()


def test_full_kernel_with_a_traced_middle_axis_matches_euler():
    """y (N, C, O) with trace_axes=(1,): kernel (N, N, O, O) acts as Θ ⊗ I along C."""
    n, nt, c, o = 4, 2, 3, 2
    k = _full_kernel(n + nt, o, seed=3)
    ktt, ktd = k[:n, :n], k[n:, :n]
    g = torch.Generator().manual_seed(4)
    y, f0, ft0 = torch.randn(n, c, o, generator=g), torch.randn(n, c, o, generator=g), torch.randn(nt, c, o, generator=g)
    eta = 1.3
    fn = predict.gradient_descent_mse(ktt, y, learning_rate=eta, trace_axes=(1,))
    times = torch.tensor([[0.5, 2.0], [4.0, 9.0]])  # a (2, 2) grid of times: two leading axes
    train, test = fn(times, f0, ft0, ktd)
    assert train.shape == (2, 2, n, c, o) and test.shape == (2, 2, nt, c, o)
    apply = lambda r: torch.einsum("nmab,mcb->nca", ktt, r)  # noqa: E731
    apply_t = lambda r: torch.einsum("nmab,mcb->nca", ktd, r)  # noqa: E731
    for i in range(2):
        for j in range(2):
            ef, eft = _euler_extrapolated(apply, apply_t, y, f0, ft0, eta, times[i, j].item())
            assert torch.allclose(train[i, j], ef, atol=1e-6)
            assert torch.allclose(test[i, j], eft, atol=1e-6)


def test_untraced_kernel_matches_euler_and_scalar_time():
    n, nt, o = 4, 3, 3
    k = _full_kernel(n + nt, o, seed=5)
    ktt, ktd = k[:n, :n], k[n:, :n]
    g = torch.Generator().manual_seed(6)
    y, ft0 = torch.randn(n, o, generator=g), torch.randn(nt, o, generator=g)
    fn = predict.gradient_descent_mse(ktt, y, trace_axes=())
    train, test = fn(2.5, 0.0, ft0, ktd)  # fx_train_0 = 0. (a scalar), t a scalar
    assert train.shape == (n, o) and test.shape == (nt, o)
    apply = lambda r: torch.einsum("nmab,mb->na", ktt, r)  # noqa: E731
    apply_t = lambda r: torch.einsum("nmab,mb->na", ktd, r)  # noqa: E731
    ef, eft = _euler_extrapolated(apply, apply_t, y, torch.zeros(n, o), ft0, 1.0, 2.5)
    assert torch.allclose(train, ef, atol=1e-6) and torch.allclose(test, eft, atol=1e-6)
    only_test = fn(2.5, None, ft0, ktd)
    assert torch.allclose(only_test, test)


@pytest.mark.parametrize("trace_axes", [(-1,), ()])
def test_infinite_time_is_a_direct_solve(trace_axes):
    n, nt, o = 5, 2, 2
    g = torch.Generator().manual_seed(7)
    y, f0, ft0 = torch.randn(n, o, generator=g), torch.randn(n, o, generator=g), torch.randn(nt, o, generator=g)
    if trace_axes:
        k = _psd(n + nt, seed=8)
        ktt, ktd = k[:n, :n], k[n:, :n]
        kreg = _reg(ktt, 0.1, False)
        direct = ft0 + ktd @ torch.linalg.solve(kreg, y - f0)
    else:
        k = _full_kernel(n + nt, o, seed=8)
        ktt, ktd = k[:n, :n], k[n:, :n]
        k2 = ktt.permute(0, 2, 1, 3).reshape(n * o, n * o)
        kreg = _reg(k2, 0.1, False)
        sol = torch.linalg.solve(kreg, (y - f0).reshape(-1)).reshape(n, o)
        direct = ft0 + torch.einsum("tnab,nb->ta", ktd, sol)
    fn = predict.gradient_descent_mse(ktt, y, diag_reg=0.1, trace_axes=trace_axes)
    train, test = fn(None, f0, ft0, ktd)
    assert torch.equal(train, y)
    assert torch.allclose(test, direct, atol=1e-10)
    late_train, late_test = fn(torch.tensor(1e7), f0, ft0, ktd)  # the eigenbasis path converges to it
    assert torch.allclose(late_test, direct, atol=1e-7) and torch.allclose(late_train, y, atol=1e-7)


def test_factorisations_are_cached(monkeypatch):
    k, y = _psd(4, seed=9), torch.randn(4, 1)
    calls = {"eigh": 0, "chol": 0}
    eigh, chol = torch.linalg.eigh, torch.linalg.cholesky_ex

    def counting_eigh(*a, **kw):
        calls["eigh"] += 1
        return eigh(*a, **kw)

    def counting_chol(*a, **kw):
        calls["chol"] += 1
        return chol(*a, **kw)

    monkeypatch.setattr(torch.linalg, "eigh", counting_eigh)
    monkeypatch.setattr(torch.linalg, "cholesky_ex", counting_chol)
    fn = predict.gradient_descent_mse(k, y)
    for t in (1.0, 2.0, None, None, 3.0):
        fn(t, torch.zeros(4, 1), torch.zeros(2, 1), k[:2])
    assert calls == {"eigh": 1, "chol": 1}


def test_gradient_descent_mse_bad_inputs():
    k, y = _psd(4, seed=10), torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"y_train of shape \(3, 2\).*expected k_train_train of shape \(3, 3\)"):
        predict.gradient_descent_mse(k, torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"expected k_train_train of shape \(4, 4, 2, 2\)"):
        predict.gradient_descent_mse(k, y, trace_axes=())
    fn = predict.gradient_descent_mse(k, y)
    with pytest.raises(ValueError, match=r"t=-1.0.*negative.*expected t >= 0"):
        fn(-1.0, torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"negative.*expected t >= 0"):
        fn(torch.tensor([1.0, -0.5]), torch.zeros(4, 2))
    with pytest.raises(ValueError, match=r"fx_test_0 but k_test_train=None; expected k_test_train"):
        fn(1.0, torch.zeros(4, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"nothing to predict"):
        fn(1.0, None, None)
    with pytest.raises(ValueError, match=r"k_test_train has shape \(2, 3\); expected its odd axes"):
        fn(1.0, torch.zeros(4, 2), torch.zeros(2, 2), torch.zeros(2, 3))
    singular = torch.ones(4, 4)
    with pytest.raises(ValueError, match=r"not positive definite.*diag_reg > 0"):
        predict.gradient_descent_mse(singular, y)(None, torch.zeros(4, 2), torch.zeros(1, 2), torch.ones(1, 4))


def _kernels(n, nt, seed):
    """NNGP and NTK (as 2D traced kernels) on train + test points."""
    return _psd(n + nt, seed=seed), _psd(n + nt, seed=seed + 100)


@pytest.mark.parametrize("diag_reg", [0.0, 0.2])
def test_gp_inference_matches_direct_formulas(diag_reg):
    n, nt, o = 5, 3, 2
    nngp, ntk = _kernels(n, nt, 11)
    y = torch.randn(n, o, generator=torch.Generator().manual_seed(12))
    Kernel = ntkfunc.empirical_kernel.kernel_tuple(("nngp", "ntk"))
    ktt = Kernel(nngp[:n, :n], ntk[:n, :n])
    ktd = Kernel(nngp[n:, :n], ntk[n:, :n])
    kte = Kernel(nngp[n:, n:], ntk[n:, n:])
    fn = predict.gp_inference(ktt, y, diag_reg=diag_reg)
    post = fn(("nngp", "ntk", "ntkgp"), ktd, kte)
    assert post._fields == ("nngp", "ntk", "ntkgp")

    k_reg, th_reg = _reg(nngp[:n, :n], diag_reg, False), _reg(ntk[:n, :n], diag_reg, False)
    kd, td = nngp[n:, :n], ntk[n:, :n]
    mean_nngp = kd @ torch.linalg.solve(k_reg, y)
    cov_nngp = nngp[n:, n:] - kd @ torch.linalg.solve(k_reg, kd.T)
    a = td @ torch.linalg.inv(th_reg)  # Θ_td Θ⁻¹
    mean_ntk = a @ y
    cov_ntk = nngp[n:, n:] + a @ nngp[:n, :n] @ a.T - (a @ kd.T + kd @ a.T)
    cov_ntkgp = ntk[n:, n:] - td @ torch.linalg.solve(th_reg, td.T)
    for got, (m, c) in zip(post, [(mean_nngp, cov_nngp), (mean_ntk, cov_ntk), (mean_ntk, cov_ntkgp)]):
        assert torch.allclose(got.mean, m, atol=1e-9) and torch.allclose(got.covariance, c, atol=1e-9)
    assert torch.allclose(fn("nngp", ktd), mean_nngp, atol=1e-9)  # mean only
    default = fn(None, ktd)
    assert default._fields == ("nngp", "ntk")
    train = fn("ntk", None, True)
    assert torch.equal(train.mean, y) and torch.count_nonzero(train.covariance) == 0


def test_gp_inference_full_kernel_matches_direct_formulas():
    n, nt, o = 4, 2, 2
    k = _full_kernel(n + nt, o, seed=13)
    y = torch.randn(n, o, generator=torch.Generator().manual_seed(14))
    fn = predict.gp_inference(k[:n, :n], y, diag_reg=1e-3, trace_axes=())
    post = fn("nngp", k[n:, :n], k[n:, n:])
    m2 = lambda t: t.permute(0, 2, 1, 3).reshape(t.shape[0] * t.shape[2], -1)  # noqa: E731
    kreg = _reg(m2(k[:n, :n]), 1e-3, False)
    mean = (m2(k[n:, :n]) @ torch.linalg.solve(kreg, y.reshape(-1))).reshape(nt, o)
    cov = m2(k[n:, n:]) - m2(k[n:, :n]) @ torch.linalg.solve(kreg, m2(k[n:, :n]).T)
    assert torch.allclose(post.mean, mean, atol=1e-9)
    assert torch.allclose(post.covariance, cov.reshape(nt, o, nt, o).permute(0, 2, 1, 3), atol=1e-9)


def test_gp_inference_bad_inputs():
    k, y = _psd(4, seed=15), torch.randn(4, 1)
    with pytest.raises(ValueError, match=r"y_train of shape \(5, 1\).*expected k_train_train of shape \(5, 5\)"):
        predict.gp_inference(k, torch.randn(5, 1))
    fn = predict.gp_inference(k, y)
    with pytest.raises(ValueError, match=r"get='nngpp'.*expected 'nngp', 'ntk', 'ntkgp'"):
        fn("nngpp", k[:2])


def test_max_learning_rate_matches_eigenvalue_and_separates_convergence():
    k = _psd(6, seed=16)
    lr = predict.max_learning_rate(k, y_train_size=6)
    assert lr == pytest.approx(2 * 6 / torch.linalg.eigvalsh(k)[-1].item())
    # discrete GD f <- f - lr K (f - y) / size: contracts below lr_max, blows up above
    y = torch.randn(6, 1, generator=torch.Generator().manual_seed(17))
    for factor, converges in ((0.95, True), (1.05, False)):
        f = torch.zeros(6, 1)
        for _ in range(3000):
            f = f - factor * lr * k @ (f - y) / 6
        assert bool((f - y).abs().max() < 1e-3) == converges


def _rank_deficient_problem(zero_at=0):
    """A bias-free ReLU net with one all-zero training input: its kernel is singular.

    With the zero input first, ``eigh`` finds an exact zero eigenvalue; at position 2 a tiny negative one.
    """
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16, bias=False), torch.nn.ReLU(), torch.nn.Linear(16, 1, bias=False))
    f, params = ntkfunc.from_module(model)
    x_train, x_test = torch.randn(6, 3), torch.randn(9, 3)
    x_train[zero_at] = 0.0
    kernel = ntkfunc.ntk_fn(f)
    ktt, ktd = kernel(x_train, None, params), kernel(x_test, x_train, params)
    g = torch.Generator().manual_seed(1)
    y = torch.randn(6, 1, generator=g)
    return ktt, ktd, y, f(params, x_train).detach(), f(params, x_test).detach()


def test_zero_eigenvalue_gives_finite_predictions_that_follow_the_flow():
    """Regression: expm1(-λt)/λ was 0/0 at λ = 0, so every test prediction was NaN."""
    ktt, ktd, y, f0, ft0 = _rank_deficient_problem()
    assert torch.count_nonzero(ktt[0]) == 0 and torch.linalg.eigvalsh(ktt)[0] == 0  # an exact zero eigenvalue
    fn = predict.gradient_descent_mse(ktt, y, learning_rate=0.5)
    times = torch.tensor([0.0, 2.0, 7.0])
    train, test = fn(times, f0, ft0, ktd)
    assert torch.isfinite(train).all() and torch.isfinite(test).all()
    for i, t in enumerate(times.tolist()):
        ef, eft = _euler_extrapolated(lambda r: ktt @ r, lambda r: ktd @ r, y, f0, ft0, 0.5, t)
        assert torch.allclose(train[i], ef, atol=1e-6) and torch.allclose(test[i], eft, atol=1e-6)


def test_small_eigenvalues_are_stable_and_continuous_at_zero():
    evals = torch.tensor([0.0, 1e-300, 1e-12, 1e-6, 3.0])
    t = torch.tensor([[0.0], [2.0], [1e3]])
    train, test = predict._flow_factors(evals, t, 4)
    assert torch.isfinite(train).all() and torch.isfinite(test).all()
    expected = torch.expm1(-evals[3:] * t / 4) / evals[3:]  # where the direct formula is accurate
    assert torch.allclose(test[:, 3:], expected, rtol=1e-12)
    assert torch.allclose(test[:, :3], (-t / 4).expand(3, 3), rtol=1e-9)  # the λ -> 0 limit: -t / size


@pytest.mark.parametrize("zero_at", [0, 2], ids=["exact-zero", "round-off-negative"])
def test_infinite_time_on_a_rank_deficient_kernel_is_the_pseudo_inverse(zero_at):
    """Regression: t=inf computed 0 * inf = NaN for a zero (or clamped negative) eigenvalue, train and test."""
    ktt, ktd, y, f0, ft0 = _rank_deficient_problem(zero_at)
    fn = predict.gradient_descent_mse(ktt, y)
    train, test = fn(float("inf"), f0, ft0, ktd)
    pinv = torch.linalg.pinv(ktt, hermitian=True)
    assert torch.allclose(test, ft0 + ktd @ pinv @ (y - f0), atol=1e-9)
    assert torch.allclose(train, f0 + ktt @ pinv @ (y - f0), atol=1e-9)  # the zero mode's output does not move
    assert torch.allclose(train[zero_at], f0[zero_at]) and not torch.allclose(train[zero_at], y[zero_at])
    full = _psd(5, seed=3)  # full rank: the limit is t=None's solve
    yf = torch.randn(5, 2, generator=torch.Generator().manual_seed(4))
    fnf = predict.gradient_descent_mse(full[:4, :4], yf[:4])
    a, b = fnf(float("inf"), torch.zeros(4, 2), torch.zeros(1, 2), full[4:, :4]), fnf(None, torch.zeros(4, 2), torch.zeros(1, 2), full[4:, :4])
    assert torch.allclose(a[0], b[0], atol=1e-9) and torch.allclose(a[1], b[1], atol=1e-9)
