"""Every structured rule alone, on random shapes, against the float64 reference.

Each case also checks (with ``explain``) that the intended rule handled every
parameter, so a case cannot pass through the Jacobian fallback unnoticed.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import ntkfunc
from ntkfunc import rules
from tests.reference import full_jacobians, max_rel_err, trace_and_diagonal

D = torch.float64


def _r(*shape, scale=0.5):
    return scale * torch.randn(*shape, dtype=D)


def _reference(f, params, x1, x2, settings):
    """The float64 reference for every setting, from one pair of full Jacobians."""
    (shape1, j1), = full_jacobians(f, params, x1)[0]
    shape2, j2 = (shape1, j1) if x2 is None else full_jacobians(f, params, x2)[0][0]
    full = (j1 @ j2.T).reshape(*shape1, *shape2)
    return [trace_and_diagonal(full, len(shape1), tr, dg) for tr, dg in settings]


def check(f, params, x1, x2, expected, settings=(((), ()),), vmap_axes=0):
    """Impl 3 equals the reference for x2 and x2=None, and ``expected`` maps names to rules; with the rules forced (on
    models this small the planner would otherwise send most parameters to reverse-mode Jacobians, and the rules under
    test would not run) and as the planner chooses."""
    report = ntkfunc.explain(f, params, x1, vmap_axes=vmap_axes, trace_axes=settings[0][0])
    assert {p.name: p.rule for p in report.params} == expected, str(report)
    for forced in (True, False):
        for x2_ in (x2, None):
            for (tr, dg), ref in zip(settings, _reference(f, params, x1, x2_, settings)):
                with ntkfunc.rules.forced() if forced else contextlib.nullcontext():
                    k = ntkfunc.ntk_fn(f, trace_axes=tr, diagonal_axes=dg, vmap_axes=vmap_axes, implementation=3)(x1, x2_, params)
                assert max_rel_err(k, ref) <= 1e-10, (tr, dg, x2_ is None, forced)


# --- linear family --------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_linear_on_sequences(bias):
    torch.manual_seed(0)
    p = {"w": _r(5, 4), **({"b": _r(5)} if bias else {})}

    def f(p, x):  # (N, T, 4) -> (N, T, 5)
        return F.linear(torch.tanh(x), p["w"], p.get("b"))

    expected = {"w": "linear:weight", **({"b": "linear:bias"} if bias else {})}
    check(f, p, _r(3, 2, 4), _r(2, 2, 4), expected, settings=[((), ()), ((-1,), ()), ((1,), (2,)), ((), (1, 2))])


@pytest.mark.parametrize(
    "w_shape,x_shape,param_left",
    [
        ((4, 3), (2, 4), False),  # x @ W
        ((3, 4), (4, 2), True),  # W @ x
        ((2, 4, 3), (2, 5, 4), False),  # batched W against (N, H, T, k): broadcast over N
        ((1, 4, 3), (2, 5, 4), False),  # size-1 batch axis of W broadcast
        ((4,), (5, 4), False),  # matrix @ vector
        ((4,), (4, 3), True),  # vector @ matrix
    ],
    ids=["x@W", "W@x", "batched_W", "broadcast_W", "matvec", "vecmat"],
)
def test_matmul_with_parameter_on_either_side(w_shape, x_shape, param_left):
    torch.manual_seed(1)
    p = {"w": _r(*w_shape)}

    def f(p, x):
        h = torch.sin(x)
        y = p["w"] @ h if param_left else h @ p["w"]
        return y.reshape(x.shape[0], -1)

    check(f, p, _r(3, *x_shape), _r(2, *x_shape), {"w": "matmul:" + ("lhs" if param_left else "rhs")})


def test_mm_bmm_and_rmatmul():
    torch.manual_seed(2)
    p = {"a": _r(4, 3), "b": _r(2, 3, 3), "c": _r(3, 2)}

    def f(p, x):  # x: (N, 2, 5, 4)
        n = x.shape[0]
        h = torch.tanh(torch.mm(x.reshape(-1, 4), p["a"])).reshape(n, 2, 5, 3).transpose(0, 1).reshape(2, n * 5, 3)
        h = torch.bmm(h, p["b"]).reshape(2, n, 5, 3).transpose(0, 1)
        return p["c"].__rmatmul__(h).sum(2)  # (N, 2, 2)

    check(f, p, _r(3, 2, 5, 4), _r(2, 2, 5, 4), {"a": "matmul:rhs", "b": "bmm:rhs", "c": "matmul:rhs"},
          settings=[((), ()), ((-1,), ())])


@pytest.mark.parametrize(
    "eq,w_shape",
    [("ntk,hkd->nthd", (2, 4, 3)), ("...k,kd->...d", (4, 3)), ("btk,kj", (4, 3)), ("hkd,ntk->nhd", (2, 4, 3)), ("ntk,kz->nt", (4, 3))],
    ids=["explicit", "ellipsis", "implicit_output", "param_first", "param_axis_summed_alone"],
)
def test_einsum(eq, w_shape):
    torch.manual_seed(3)
    p = {"w": _r(*w_shape)}
    param_first = eq.startswith("hkd")

    def f(p, x):
        h = torch.tanh(x)
        y = torch.einsum(eq, p["w"], h) if param_first else torch.einsum(eq, h, p["w"])
        return y.reshape(x.shape[0], -1)

    check(f, p, _r(3, 5, 4), _r(2, 5, 4), {"w": "einsum:operand" + ("0" if param_first else "1")})


def test_einsum_operand_list_form():
    torch.manual_seed(4)
    p = {"w": _r(4, 3)}

    def f(p, x):
        return torch.einsum("nk,kd->nd", [x, p["w"]])

    check(f, p, _r(3, 4), _r(2, 4), {"w": "einsum:operand1"})


# --- conv family ----------------------------------------------------------------------

CONV_CASES = [
    (1, dict(stride=2, padding=1), 4, 2, 3, 11),
    (1, dict(padding="same", dilation=2), 4, 2, 4, 9),
    (2, dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2)), 4, 2, 3, 7),
    (2, dict(padding="same", groups=2), 4, 6, 3, 6),
    (2, dict(padding="valid", groups=2, stride=2), 2, 4, 2, 7),
    (3, dict(stride=2, padding=1, groups=2), 2, 4, 3, 5),
]


@pytest.mark.parametrize("d,kw,cin,cout,k,size", CONV_CASES, ids=[f"conv{c[0]}d-{c[1]}" for c in CONV_CASES])
def test_conv(d, kw, cin, cout, k, size):
    torch.manual_seed(5)
    groups = kw.get("groups", 1)
    p = {"w": _r(cout, cin // groups, *[k] * d), "b": _r(cout)}
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[d]

    def f(p, x):
        return conv(torch.tanh(x), p["w"], p["b"], **kw).reshape(x.shape[0], -1)

    check(f, p, _r(3, cin, *[size] * d), _r(2, cin, *[size] * d), {"w": f"conv{d}d:weight", "b": f"conv{d}d:bias"})


TCONV_CASES = [
    (1, dict(stride=2, padding=1, output_padding=1), 2, 4, 3, 5),
    (2, dict(stride=2, padding=1), 4, 2, 3, 4),
    (2, dict(stride=(2, 3), padding=(0, 1), output_padding=(1, 0), groups=2, dilation=(1, 2)), 4, 6, 3, 3),
    (3, dict(stride=2, groups=2), 2, 4, 2, 3),
]


@pytest.mark.parametrize("d,kw,cin,cout,k,size", TCONV_CASES, ids=[f"tconv{c[0]}d-{c[1]}" for c in TCONV_CASES])
def test_conv_transpose(d, kw, cin, cout, k, size):
    torch.manual_seed(6)
    groups = kw.get("groups", 1)
    p = {"w": _r(cin, cout // groups, *[k] * d), "b": _r(cout)}
    conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[d]

    def f(p, x):
        return conv(torch.tanh(x), p["w"], p["b"], **kw).reshape(x.shape[0], -1)

    name = f"conv_transpose{d}d"
    check(f, p, _r(3, cin, *[size] * d), _r(2, cin, *[size] * d), {"w": name + ":weight", "b": name + ":bias"})


def test_conv_module_unbatched_input_and_traced_channels():
    torch.manual_seed(7)
    p = {"w": _r(3, 2, 3, 3)}

    def f(p, x):  # the conv sees unbatched (C, H, W) inputs
        return torch.stack([F.conv2d(xi, p["w"]) for xi in x])  # (N, 3, 2, 2)

    check(f, p, _r(3, 2, 4, 4), _r(2, 2, 4, 4), {"w": "conv2d:weight"},
          settings=[((), ()), ((1,), (2, 3)), ((1, 2, 3), ())])


# --- norm family ----------------------------------------------------------------------


def test_layer_norm_over_two_axes():
    torch.manual_seed(8)
    p = {"lin": _r(4, 4), "w": 1 + _r(3, 4), "b": _r(3, 4)}

    def f(p, x):  # (N, 3, 4)
        return F.layer_norm(x @ p["lin"], (3, 4), p["w"], p["b"], eps=1e-3).reshape(x.shape[0], -1)

    check(f, p, _r(3, 3, 4), _r(2, 3, 4), {"lin": "matmul:rhs", "w": "layer_norm:weight", "b": "layer_norm:bias"})


def test_group_norm_and_rms_norm():
    torch.manual_seed(9)
    p = {"gw": 1 + _r(4), "gb": _r(4), "rw": 1 + _r(5)}

    def f(p, x):  # (N, 4, 5)
        h = F.group_norm(x, 2, p["gw"], p["gb"])
        return F.rms_norm(torch.tanh(h), (5,), p["rw"], eps=1e-6).reshape(x.shape[0], -1)

    check(f, p, _r(3, 4, 5), _r(2, 4, 5), {"gw": "group_norm:weight", "gb": "group_norm:bias", "rw": "rms_norm:weight"})


def test_batch_norm_eval_uses_running_stats_as_constants():
    torch.manual_seed(10)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(12, 2)).double()
    bn = model[1]
    bn.running_mean.copy_(torch.randn(3, dtype=D))
    bn.running_var.copy_(torch.rand(3, dtype=D) + 0.5)
    model.eval()
    f, params = ntkfunc.from_module(model)
    expected = {"0.weight": "conv2d:weight", "0.bias": "conv2d:bias", "1.weight": "batch_norm:weight",
                "1.bias": "batch_norm:bias", "4.weight": "linear:weight", "4.bias": "linear:bias"}
    check(f, params, _r(3, 2, 4, 4), _r(2, 2, 4, 4), expected)


def test_batch_norm_training_mode_whole_batch():
    torch.manual_seed(11)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    f, params = ntkfunc.from_module(model, vmap_axes=None)
    expected = {"0.weight": "linear:weight", "0.bias": "linear:bias", "1.weight": "batch_norm:weight",
                "1.bias": "batch_norm:bias", "3.weight": "linear:weight", "3.bias": "linear:bias"}
    check(f, params, _r(5, 3), _r(4, 3), expected, vmap_axes=None)


# --- elementwise family ---------------------------------------------------------------


def test_broadcast_bias_scale_and_positional_embedding():
    torch.manual_seed(12)
    p = {"pos": _r(4, 3), "scale": 1 + _r(1, 3), "shift": _r(3), "neg": _r(4, 1), "alpha": _r(3), "s2": _r(3)}

    def f(p, x):  # (N, 4, 3)
        h = x + p["pos"]  # learned positional embedding, broadcast over N
        h = torch.tanh(h * p["scale"])  # (1, 3) scale: size-1 axis broadcast
        h = p["shift"] - h  # parameter on the left of a subtraction
        h = torch.sin(h - p["neg"])  # parameter on the right: sign flips
        h = torch.add(h, p["alpha"], alpha=2.5)
        return h * (p["s2"] * 3.0)  # scalar factor

    expected = {"pos": "add:other", "scale": "mul:other", "shift": "sub:input", "neg": "sub:other",
                "alpha": "add:other", "s2": "mul:input"}
    check(f, p, _r(3, 4, 3), _r(2, 4, 3), expected, settings=[((), ()), ((-1,), ()), ((1,), (2,))])


def test_parameter_on_the_left_of_add_and_mul():
    torch.manual_seed(13)
    p = {"b": _r(3), "s": _r(2, 3)}

    def f(p, x):  # (N, 2, 3)
        return (p["s"] * torch.tanh(p["b"] + x)).sum(1)

    check(f, p, _r(3, 2, 3), _r(2, 2, 3), {"b": "add:input", "s": "mul:input"})


# --- embedding family -----------------------------------------------------------------


@pytest.mark.parametrize("padding_idx", [None, 2, -1])
def test_embedding(padding_idx):
    torch.manual_seed(14)
    p = {"emb": _r(6, 3), "out": _r(2, 3)}

    def f(p, ids):
        h = F.embedding(ids, p["emb"], padding_idx=padding_idx)
        return F.linear(torch.tanh(h).mean(1), p["out"])

    ids1, ids2 = torch.randint(0, 6, (4, 5)), torch.randint(0, 6, (3, 5))
    ids1[0, :2] = 2
    ids2[1, 1] = 5
    check(f, p, ids1, ids2, {"emb": "embedding:weight", "out": "linear:weight"}, settings=[((), ()), ((-1,), ())])


# --- registry -------------------------------------------------------------------------


def test_register_refuses_duplicates_and_empty():
    with pytest.raises(KeyError, match="already has rule linear"):
        rules.register(F.linear)(type("Other", (rules.Rule,), {"name": "other"}))
    with pytest.raises(ValueError, match="expected at least one op"):
        rules.register()


def test_lookup_covers_the_required_primitives():
    required = [F.linear, torch.matmul, torch.Tensor.__matmul__, torch.bmm, torch.einsum, F.conv1d, F.conv2d, F.conv3d,
                F.conv_transpose2d, F.layer_norm, F.group_norm, F.batch_norm, F.rms_norm, torch.add, torch.mul, F.embedding]
    assert all(rules.lookup(op) is not None for op in required)
    assert rules.lookup(torch.tanh) is None


# --- expansions -----------------------------------------------------------------------


@pytest.mark.parametrize("need_weights,batch_first", [(False, True), (True, False)])
def test_multihead_self_attention_is_expanded_into_linear_rules(need_weights, batch_first):
    torch.manual_seed(15)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.att = torch.nn.MultiheadAttention(6, 2, batch_first=batch_first)

        def forward(self, x):
            h = x if batch_first else x.transpose(0, 1)
            out = self.att(h, h, h, need_weights=need_weights)[0]
            return (out if batch_first else out.transpose(0, 1)).sum(1)

    f, params = ntkfunc.from_module(Block().double().eval())
    expected = {"att.in_proj_weight": "linear:weight", "att.in_proj_bias": "linear:bias",
                "att.out_proj.weight": "linear:weight", "att.out_proj.bias": "linear:bias"}
    check(f, params, _r(3, 4, 6), _r(2, 4, 6), expected)


def test_attention_with_distinct_key_and_value_is_expanded_and_exact():
    torch.manual_seed(16)
    att = torch.nn.MultiheadAttention(4, 2, batch_first=True).double().eval()

    def f(p, x):
        return torch.func.functional_call(att, p, (x, torch.tanh(x), x), {"need_weights": False})[0].sum(1)

    params = {k: v.detach() for k, v in att.named_parameters()}
    x1 = _r(3, 3, 4)
    report = ntkfunc.explain(f, params, x1, trace_axes=())
    assert not report.fallbacks and {r.rule for r in report.params} == {"linear:weight", "linear:bias"}
    with ntkfunc.rules.forced():
        k = ntkfunc.ntk_fn(f, trace_axes=(), implementation=3)(x1, None, params)
    assert max_rel_err(k, _reference(f, params, x1, None, [((), ())])[0]) <= 1e-10


# --- the extension point: disabled(), the structure check, check_rule ------------------


def test_disabled_sends_every_parameter_to_the_fallback_and_changes_nothing():
    torch.manual_seed(17)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.GroupNorm(1, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                                torch.nn.Linear(12, 2)).double()
    f, params = ntkfunc.from_module(model)
    x1, x2 = _r(3, 2, 4, 4), _r(2, 2, 4, 4)
    assert not ntkfunc.explain(f, params, x1).fallbacks
    with_rules = ntkfunc.ntk_fn(f, trace_axes=(), implementation=3)(x1, x2, params)
    with rules.disabled():
        report = ntkfunc.explain(f, params, x1)
        without = ntkfunc.ntk_fn(f, trace_axes=(), implementation=3)(x1, x2, params)
        assert rules.lookup(F.linear) is None and rules.expansion(F.multi_head_attention_forward) is None
    assert len(report.fallbacks) == len(params)
    assert rules.enabled() and rules.lookup(F.linear) is not None  # restored on exit
    assert max_rel_err(with_rules, without) <= 1e-12


def test_disabled_is_restored_after_an_error():
    with pytest.raises(ZeroDivisionError):
        with rules.disabled():
            raise ZeroDivisionError
    assert rules.enabled()


class _BadLetters(type(rules.lookup(F.linear))):  # a linear rule whose structure names too few axes
    name = "bad_linear"

    def structure(self, role, operands, meta, y_shape):
        s = super().structure(role, operands, meta, y_shape)
        return rules.Structure(s.y_shape, s.y[:-1], s.theta, s.operands)


class _WrongScale(type(rules.lookup(F.linear))):  # well-formed but wrong: twice the derivative
    name = "wrong_linear"

    def structure(self, role, operands, meta, y_shape):
        s = super().structure(role, operands, meta, y_shape)
        return rules.Structure(s.y_shape, s.y, s.theta, s.operands, 2.0)


def _linear_case():
    torch.manual_seed(18)
    p = {"w": _r(5, 4), "b": _r(5)}

    def f(p, x):
        return F.linear(torch.tanh(x), p["w"], p["b"])

    return f, p, _r(3, 4), _r(2, 4)


def test_malformed_structures_are_caught_in_one_place(monkeypatch):
    monkeypatch.setitem(rules.RULES, F.linear, _BadLetters())
    f, p, x1, x2 = _linear_case()
    with pytest.raises(RuntimeError, match=r"rule bad_linear \(role 'weight'\) returned a malformed Structure: y letters"):
        ntkfunc.ntk_fn(f, implementation=3)(x1, x2, p)
    s = rules.Structure((3, 5), "az", "zy", [("ay", torch.zeros(1, 3, 4))])
    with pytest.raises(RuntimeError, match=r"theta axes of sizes \(5, 4\) for a parameter of shape \(5, 3\)"):
        rules.check_structure(s, rule="linear", role="weight", theta_shape=(5, 3))
    with pytest.raises(RuntimeError, match=r"letter 'a' has sizes 3 and 2"):
        rules.check_structure(rules.Structure((3, 5), "az", "zy", [("ay", torch.zeros(1, 2, 4))]), rule="r", role="w", theta_shape=(5, 4))
    with pytest.raises(RuntimeError, match=r"operand 'ay' of shape \(3, 4\)"):
        rules.check_structure(rules.Structure((3, 5), "az", "zy", [("ay", torch.zeros(3, 4))]), rule="r", role="w", theta_shape=(5, 4))


def test_check_rule_passes_a_good_rule_and_catches_a_wrong_one(monkeypatch):
    f, p, x1, x2 = _linear_case()
    report = ntkfunc.testing.check_rule(f, p, x1, x2, expected={"w": "linear:weight", "b": "linear:bias"})
    assert not report.fallbacks
    with pytest.raises(AssertionError, match=r"w is handled by linear:weight .*; expected conv2d:weight"):
        ntkfunc.testing.check_rule(f, p, x1, expected={"w": "conv2d:weight"})
    monkeypatch.setitem(rules.RULES, F.linear, _WrongScale())
    with pytest.raises(AssertionError, match=r"check_rule: trace_axes=\(\), diagonal_axes=\(\), x2: relative errors"):
        ntkfunc.testing.check_rule(f, p, x1, x2)


def test_rules_bind_their_arguments_once(monkeypatch):
    """The capture binds a call's arguments once and hands the dict to match and capture."""
    rule = rules.lookup(F.linear)
    calls = []
    original = type(rule).bind

    def counting(self, args, kwargs):
        calls.append(1)
        return original(self, args, kwargs)

    monkeypatch.setattr(type(rule), "bind", counting)
    f, p, x1, _ = _linear_case()
    ntkfunc.explain(f, p, x1)
    assert len(calls) == 2  # one linear call in the discovery pass, one in the probing pass
