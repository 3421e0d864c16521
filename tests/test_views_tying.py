"""The rules model libraries need (addmm & co., cat), parameters used through views, tied parameters.

Every case goes through :func:`ntkfunc.testing.check_rule`: the intended rule handles the
parameter (or it falls back, with the reason), and implementation 3 equals the float64
reference and itself under ``rules.disabled()``, for several trace/diagonal settings, with
``x2`` and ``x2=None``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ntkfunc
from ntkfunc._engines.structured import plan, views
from ntkfunc.rules import Structure
from ntkfunc.testing import check_rule, max_rel_err, reference_kernel

D = torch.float64
SETTINGS = (((), ()), ((-1,), ()), ((), (-1,)), ((), (0,)))


def _r(*shape, scale=0.5):
    return scale * torch.randn(*shape, dtype=D)


def _check(f, p, x1, x2, expected, **kw):
    report = check_rule(f, p, x1, x2, expected={k: v for k, v in expected.items() if v is not None}, settings=SETTINGS, **kw)
    got = {r.name: r for r in report.params}
    for name, rule in expected.items():
        if rule is None:
            assert got[name].method == "fallback", str(report)
    return got


# --- addmm family ------------------------------------------------------------------------


def test_addmm_as_in_hf_conv1d():
    torch.manual_seed(0)
    p = {"w": _r(4, 5), "b": _r(5)}

    def f(p, x):  # HF Conv1D: addmm(bias, x.view(-1, in), W) with W (in, out)
        h = torch.tanh(x)
        return torch.addmm(p["b"], h.view(-1, h.size(-1)), p["w"]).view(*h.shape[:-1], 5)

    _check(f, p, _r(3, 2, 4), _r(3, 2, 4), {"w": "addmm:mat2", "b": "addmm:input"})


@pytest.mark.parametrize("beta,alpha", [(0.5, 2.0), (1, -1)])
def test_addmm_scales_and_left_parameter(beta, alpha):
    torch.manual_seed(1)
    p = {"w": _r(3, 4), "b": _r(3, 1)}

    def f(p, x):  # W @ x + b (b broadcast along columns); Tensor.addmm form
        return torch.stack([p["b"].addmm(p["w"], torch.sin(xn), beta=beta, alpha=alpha) for xn in x])

    _check(f, p, _r(3, 4, 2), _r(3, 4, 2), {"w": "addmm:mat1", "b": "addmm:input"})


def test_baddbmm_addbmm_addmv():
    torch.manual_seed(2)
    x1, x2 = _r(3, 2, 5, 4), _r(3, 2, 5, 4)
    p = {"w": _r(2, 4, 3), "b": _r(5, 3)}
    f = lambda p, x: torch.stack([torch.baddbmm(p["b"], torch.sin(xn), p["w"], beta=2.0) for xn in x])  # noqa: E731
    _check(f, p, x1, x2, {"w": "baddbmm:batch2", "b": "baddbmm:input"})
    p = {"a": _r(2, 3, 5), "b": _r(3, 4)}
    f = lambda p, x: torch.stack([torch.addbmm(p["b"], p["a"], torch.sin(xn)) for xn in x])  # noqa: E731
    _check(f, p, x1, x2, {"a": "addbmm:batch1", "b": "addbmm:input"})
    p = {"m": _r(3, 4), "b": _r(3)}
    f = lambda p, x: torch.stack([torch.addmv(p["b"], p["m"], torch.tanh(xn), alpha=-1.5) for xn in x])  # noqa: E731
    _check(f, p, _r(3, 4), _r(3, 4), {"m": "addmv:mat", "b": "addmv:input"})


def test_addmm_with_both_matrices_parameters_falls_back():
    torch.manual_seed(3)
    p = {"a": _r(2, 3), "b": _r(3, 2)}
    f = lambda p, x: torch.stack([torch.addmm(torch.tanh(xn), p["a"], p["b"]) for xn in x])  # noqa: E731
    got = _check(f, p, _r(2, 2, 2), _r(2, 2, 2), {"a": None, "b": None})
    assert "addmm" in got["a"].detail


# --- views ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "use,rule",
    [
        (lambda h, w: F.linear(h, w.T.T), "linear:weight"),
        (lambda h, w: h @ w.T, "matmul:rhs"),
        (lambda h, w: h @ w.mT, "matmul:rhs"),
        (lambda h, w: torch.matmul(h, w.t()), "matmul:rhs"),
        (lambda h, w: h @ w.permute(1, 0), "matmul:rhs"),
        (lambda h, w: torch.einsum("nti,ik->ntk", h, torch.transpose(w, 0, 1)), "einsum:operand1"),
        (lambda h, w: F.linear(h, w.reshape(20).view(5, 4)), "linear:weight"),
    ],
    ids=["linear_TT", "matmul_T", "matmul_mT", "matmul_t", "permute", "einsum_transpose", "reshape_view"],
)
def test_transposed_and_reshaped_weights(use, rule):
    torch.manual_seed(4)
    p = {"w": _r(5, 4)}
    _check(lambda p, x: use(torch.tanh(x), p["w"]), p, _r(3, 2, 4), _r(3, 2, 4), {"w": rule})


@pytest.mark.parametrize("vmap_axes", [0, None], ids=["per_sample", "whole_batch"])
def test_class_token_expand_and_cat(vmap_axes):
    torch.manual_seed(5)
    p = {"cls": _r(1, 1, 4), "reg": _r(1, 2, 4), "pos": _r(8, 4)}

    def f(p, x):  # timm / torchvision ViT: cat([cls.expand(n, -1, -1), x], 1) + pos
        n = x.shape[0]
        h = torch.cat([p["cls"].expand(n, -1, -1), p["reg"].expand(n, -1, -1), torch.tanh(x)], dim=1)
        return torch.sin(h + p["pos"])

    got = _check(f, p, _r(3, 5, 4), _r(3, 5, 4), {"cls": "cat:tensor0", "reg": "cat:tensor1", "pos": "add:other"}, vmap_axes=vmap_axes)
    assert got["cls"].via == "TensorBase.expand"


@pytest.mark.parametrize(
    "scale",
    [
        lambda g, x: x.mul(g.reshape(1, -1, 1, 1)),  # timm ConvNeXt layer scale
        lambda g, x: x * g[None, :, None, None],
        lambda g, x: x * g.view(1, -1, 1, 1).expand(x.shape[0], -1, x.shape[2], x.shape[3]),
        lambda g, x: x * g.unsqueeze(-1).unsqueeze(-1),
    ],
    ids=["reshape", "getitem_none", "view_expand", "unsqueeze"],
)
@pytest.mark.parametrize("vmap_axes", [0, None], ids=["per_sample", "whole_batch"])
def test_layer_scale_through_views(scale, vmap_axes):
    torch.manual_seed(6)
    p = {"g": _r(3)}
    _check(lambda p, x: torch.tanh(scale(p["g"], torch.sin(x))), p, _r(2, 3, 4, 4), _r(2, 3, 4, 4), {"g": "mul:other"}, vmap_axes=vmap_axes)


def test_slice_of_a_parameter_used_once():
    torch.manual_seed(7)
    p = {"pos": _r(8, 4)}
    _check(lambda p, x: torch.sin(x + p["pos"][: x.shape[1]]), p, _r(3, 5, 4), _r(3, 5, 4), {"pos": "add:other"})


def test_views_that_do_not_compose_fall_back_with_the_reason():
    torch.manual_seed(8)
    p = {"w": _r(5, 4), "pos": _r(8, 4), "s": _r(4)}

    def f(p, x):
        h = torch.tanh(x) @ p["w"].t().contiguous()  # a copy, not a view
        h = h[..., :4] + p["pos"][:5] * p["pos"][3:]  # two slices of one parameter
        return h * p["s"].to(torch.float32).to(D)  # a copy through another dtype

    got = _check(f, p, _r(3, 5, 4), _r(3, 5, 4), {"w": None, "pos": None, "s": None})
    assert "expected a view of the parameter" in got["w"].detail
    assert "no rule" in got["pos"].detail  # mul of two parameter views: no rule
    assert "s" in got and got["s"].method == "fallback"


def test_view_map_properties():
    w = torch.zeros(3, 4)
    assert views.ViewMap.of(w.T, w, ("T",)).bijective
    vm = views.ViewMap.of(torch.zeros(1, 4).expand(5, 4), None, ("expand",))
    assert isinstance(vm, str)
    base = torch.zeros(1, 4)
    vm = views.ViewMap.of(base.expand(5, 4), base, ("expand",))
    assert vm.broadcast == (0,) and vm.covers and not vm.bijective
    part = views.ViewMap.of(w[1:, :2], w, ("getitem",))
    assert part.injective and not part.covers and part.kept_numel == 4
    overlapping = views.ViewMap(("as_strided",), (3, 3), (1, 1), 0, 9)
    assert not overlapping.injective
    s = Structure((3, 3), "ab", "ab", [])
    with pytest.raises(views.ViewError, match="addresses some entries of the parameter twice"):
        views.compose(s, overlapping, tied=False)


# --- tied parameters --------------------------------------------------------------------


def _lm(p, x):  # GPT-2 style: token embedding and LM head share one table
    h = torch.tanh(F.embedding(x, p["e"]) + p["pos"][: x.shape[1]])
    return F.linear(h, p["e"])


def test_embedding_tied_to_the_lm_head():
    torch.manual_seed(9)
    p = {"e": _r(7, 4), "pos": _r(6, 4)}
    ids1, ids2 = torch.randint(0, 7, (3, 5)), torch.randint(0, 7, (3, 5))
    got = _check(_lm, p, ids1, ids2, {"e": "embedding:weight+linear:weight", "pos": "add:other"})
    assert got["e"].uses == 2


def test_tied_through_a_transposed_view_and_in_batch_mode():
    torch.manual_seed(10)
    p = {"w": _r(5, 4), "b": _r(5)}
    f = lambda p, x: torch.tanh(torch.tanh(x) @ p["w"].T + p["b"]) @ p["w"]  # noqa: E731
    for vmap_axes in (0, None):
        _check(f, p, _r(3, 2, 4), _r(3, 2, 4), {"w": "matmul:rhs+matmul:rhs", "b": "add:other"}, vmap_axes=vmap_axes)


def test_tied_within_one_call():
    torch.manual_seed(11)
    p = {"c": _r(1, 2, 4)}
    f = lambda p, x: torch.sin(torch.cat([p["c"], torch.tanh(x), p["c"]], dim=1))  # noqa: E731
    _check(f, p, _r(1, 3, 4), _r(1, 3, 4), {"c": "cat:tensor0+cat:tensor2"})


def test_tied_with_a_use_without_rule_falls_back():
    torch.manual_seed(12)
    p = {"e": _r(7, 4)}
    f = lambda p, x: F.linear(torch.tanh(F.embedding(x, p["e"])), torch.sin(p["e"]))  # noqa: E731
    ids = torch.randint(0, 7, (3, 5))
    got = _check(f, p, ids, ids.flip(0), {"e": None})
    assert "sin" in got["e"].detail


def test_tied_uses_that_factor_the_parameter_differently_fall_back():
    torch.manual_seed(13)
    p = {"w": _r(2, 6)}
    # one use sees (2, 6), the other a (3, 4) reshape of it: no common factorisation of the entries
    f = lambda p, x: torch.tanh(x @ p["w"].T) @ p["w"].reshape(3, 4)[:2]  # noqa: E731
    got = _check(f, p, _r(3, 6), _r(3, 6), {"w": None})
    assert got["w"].method == "fallback"


@pytest.mark.parametrize("route", ["gram", "jacobian"])
def test_tied_both_routes_and_per_param(route, monkeypatch):
    monkeypatch.setattr(plan.RouteCost, "use_gram", property(lambda self: route == "gram"))
    torch.manual_seed(14)
    p = {"e": _r(7, 4), "pos": _r(6, 4)}
    ids1, ids2 = torch.randint(0, 7, (3, 5)), torch.randint(0, 7, (2, 5))
    for tr in ((), (-1,)):
        per = ntkfunc.ntk_fn(_lm, trace_axes=tr, implementation=3, per_param=True)(ids1, ids2, p)
        full = ntkfunc.ntk_fn(_lm, trace_axes=tr, implementation=1, per_param=True)(ids1, ids2, p)
        for name in p:
            assert max_rel_err(per[name], full[name]) <= 1e-10, (name, tr)


def test_tied_with_auto_and_under_vmap_over_params():
    torch.manual_seed(15)
    p = {"e": _r(7, 4), "pos": _r(6, 4)}
    ids1, ids2 = torch.randint(0, 7, (3, 5)), torch.randint(0, 7, (2, 5))
    ref = reference_kernel(_lm, p, ids1, ids2, (), ())
    assert max_rel_err(ntkfunc.ntk_fn(_lm, trace_axes=(), implementation="auto")(ids1, ids2, p), ref) <= 1e-10
    ens = {k: torch.stack([v, 0.5 * v]) for k, v in p.items()}
    ks = torch.func.vmap(ntkfunc.ntk_fn(_lm, trace_axes=(), implementation=3), in_dims=(None, None, 0))(ids1, ids2, ens)
    for i in range(2):
        one = {k: v[i] for k, v in ens.items()}
        assert max_rel_err(ks[i], reference_kernel(_lm, one, ids1, ids2, (), ())) <= 1e-10


def test_tied_module_from_module():
    class TiedLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(9, 6)
            self.mix = torch.nn.Linear(6, 6)
            self.head = torch.nn.Linear(6, 9, bias=False)
            self.head.weight = self.emb.weight  # as HF's tie_weights

        def forward(self, ids):
            return self.head(torch.tanh(self.mix(self.emb(ids))))

    torch.manual_seed(16)
    model = TiedLM().double()
    f, p = ntkfunc.from_module(model)
    assert "head.weight" not in p
    ids = torch.randint(0, 9, (3, 4))
    got = _check(f, p, ids, ids.flip(0), {"emb.weight": "embedding:weight+linear:weight", "mix.weight": "linear:weight"})
    assert got["emb.weight"].uses == 2
