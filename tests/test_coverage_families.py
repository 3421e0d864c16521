"""Implementation 3's rules on the torch.nn families of issue 21, against the float64 reference.

Per family: a small model whose every parameter ``explain`` reports on a rule (the rules named),
and whose implementation-3 kernel with every rule in use equals the float64 reference and the
kernel with rules disabled (:func:`ntkfunc.testing.check_rule`). The expansions (recurrent layers,
attention, ``W[ids]``) are checked to reproduce torch's own results, and never to run outside
implementation 3's capture.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import ntkfunc
from ntkfunc import rules
from ntkfunc.testing import check_rule

D = torch.float64
T, IN, H = 4, 3, 5  # steps, input features, hidden width
ONE = (((), ()),)  # the full kernel only: enough for the rule, and fast


def _fn(model: nn.Module):
    model = model.to(D).eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    return (lambda p, x: functional_call(model, p, (x,))), params


def _check(model: nn.Module, x: torch.Tensor, expected: dict[str, str] | None = None, settings=ONE):
    """check_rule on x[:3] against x[3:]; every parameter on a rule (``expected``: some of them by name)."""
    f, params = _fn(model)
    report = check_rule(f, params, x[:3], x[3:], expected=expected, settings=settings)
    assert not report.fallbacks, str(report)
    return report


def _zeros(x: torch.Tensor, width: int, layers: int = 0) -> torch.Tensor:
    """A zero state batched like ``x`` (``(B, width)``, or ``(layers, B, width)``)."""
    z = torch.zeros_like(x[:, :1, 0]).expand(x.shape[0], width)
    return (z.unsqueeze(0).expand(layers, *z.shape) if layers else z).contiguous()


class Readout(nn.Module):
    def __init__(self, body: nn.Module, width: int) -> None:
        super().__init__()
        self.body, self.head = body, nn.Linear(width, 2)

    def forward(self, x):
        h = self.body(x)
        return self.head(torch.tanh(h.mean(1) if h.dim() == 3 else h))


# --- recurrent layers ----------------------------------------------------------------------


class Recurrent(nn.Module):
    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        r = self.rnn
        layers = r.num_layers * (2 if r.bidirectional else 1)
        h0 = _zeros(x, r.proj_size or r.hidden_size, layers)
        state = (h0, _zeros(x, r.hidden_size, layers)) if isinstance(r, nn.LSTM) else h0
        return r(x if r.batch_first else x.transpose(0, 1), state)[0]


def _rnn(kind: str, **kw) -> nn.RNNBase:
    if kind == "lstm":
        return nn.LSTM(IN, H, **kw)
    if kind == "gru":
        return nn.GRU(IN, H, **kw)
    return nn.RNN(IN, H, nonlinearity=kind, **kw)


@pytest.mark.parametrize("kind,kw", [
    ("lstm", {"num_layers": 2, "batch_first": True}),
    ("lstm", {"bidirectional": True, "proj_size": 2}),
    ("gru", {"num_layers": 2, "bias": False, "batch_first": True}),
    ("tanh", {"bidirectional": True, "batch_first": True}),
    ("relu", {"num_layers": 2}),
])
def test_fused_recurrent_layers_on_the_linear_rule(kind, kw):
    torch.manual_seed(0)
    rnn = _rnn(kind, **kw)
    width = (rnn.proj_size or H) * (2 if rnn.bidirectional else 1)
    body = Recurrent(rnn)
    if not rnn.batch_first:
        body = nn.Sequential(body, Transpose())
    report = _check(Readout(body, width), torch.randn(5, T, IN))
    by_name = {r.name: r for r in report.params}
    w_ih = next(n for n in by_name if n.endswith("weight_ih_l0"))
    w_hh = next(n for n in by_name if n.endswith("weight_hh_l0"))
    assert by_name[w_ih].rule == "linear:weight"  # the input projection of every step at once
    assert by_name[w_hh].rule == "+".join(["linear:weight"] * T) and by_name[w_hh].uses == T  # one use per step


class Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(0, 1)


class CellLoop(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.cell = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "tanh": nn.RNNCell}[kind](IN, H)

    def forward(self, x):
        h = _zeros(x, H)
        state = (h, torch.zeros_like(h)) if self.kind == "lstm" else h
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return state[0] if self.kind == "lstm" else state


@pytest.mark.parametrize("kind", ["lstm", "gru", "tanh"])
def test_cell_loops_on_the_linear_rule(kind):
    torch.manual_seed(1)
    report = _check(Readout(CellLoop(kind), H), torch.randn(5, T, IN))
    assert {r.rule for r in report.params if r.name.startswith("body.cell")} == {"+".join(["linear:weight"] * T),
                                                                                 "+".join(["linear:bias"] * T)}


def _fused(rnn: nn.RNNBase):
    if isinstance(rnn, nn.LSTM):
        return torch.lstm
    if isinstance(rnn, nn.GRU):
        return torch.gru
    return torch.rnn_tanh if rnn.nonlinearity == "tanh" else torch.rnn_relu


@pytest.mark.parametrize("kind", ["lstm", "gru", "tanh", "relu"])
def test_recurrent_expansions_reproduce_the_fused_ops(kind):
    torch.manual_seed(2)
    for layers, bidir, batch_first, bias, proj in itertools.product([1, 2], [False, True], [False, True], [True, False], [0, 2]):
        if proj and kind != "lstm":
            continue
        rnn = _rnn(kind, num_layers=layers, bidirectional=bidir, batch_first=batch_first, bias=bias,
                   **({"proj_size": proj} if proj else {})).to(D)
        x = torch.randn(2, T, IN, dtype=D) if batch_first else torch.randn(T, 2, IN, dtype=D)
        n = layers * (2 if bidir else 1)
        h0 = torch.randn(n, 2, proj or H, dtype=D)
        state = (h0, torch.randn(n, 2, H, dtype=D)) if kind == "lstm" else h0
        want = rnn(x, state)
        got = rules.expansion(_fused(rnn))(x, state, rnn._flat_weights, bias, layers, 0.0, False, bidir, batch_first)
        want = [want[0], *(want[1] if kind == "lstm" else [want[1]])]
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.shape == b.shape and torch.allclose(a, b, rtol=0, atol=1e-12)
    # the forms left to the fused op: dropout between layers in training mode, packed sequences
    rnn = _rnn(kind, num_layers=2, dropout=0.5).to(D)
    state = (torch.zeros(2, 2, H, dtype=D),) * 2 if kind == "lstm" else torch.zeros(2, 2, H, dtype=D)
    assert rules.expansion(_fused(rnn))(torch.randn(T, 2, IN, dtype=D), state, rnn._flat_weights, True, 2, 0.5, True, False,
                                        False) is NotImplemented
    assert rules.expansion(_fused(rnn))(torch.randn(T, IN, dtype=D), torch.tensor([2, 2]), state, rnn._flat_weights, True, 2,
                                        0.0, False, False) is NotImplemented


@pytest.mark.parametrize("cls,fused", [(nn.LSTMCell, torch.lstm_cell), (nn.GRUCell, torch.gru_cell),
                                       (nn.RNNCell, torch.rnn_tanh_cell), (nn.RNNCell, torch.rnn_relu_cell)])
def test_cell_expansions_reproduce_the_fused_ops(cls, fused):
    torch.manual_seed(3)
    for bias in (True, False):
        kw = {"nonlinearity": "relu"} if fused is torch.rnn_relu_cell else {}
        cell = cls(IN, H, bias=bias, **kw).to(D)
        x, h = torch.randn(2, IN, dtype=D), torch.randn(2, H, dtype=D)
        state = (h, torch.randn(2, H, dtype=D)) if cls is nn.LSTMCell else h
        want = cell(x, state)
        got = rules.expansion(fused)(x, state, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
        for a, b in zip(*(([got], [want]) if cls is not nn.LSTMCell else (got, want))):
            assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_lstm_without_initial_state_is_exact_by_its_rules():
    """nn.LSTM builds its zero state with torch.zeros (not batched under vmap); the expansion adds into it out of place."""
    torch.manual_seed(4)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(IN, H, batch_first=True)

        def forward(self, x):
            return self.lstm(x)[0]

    _check(Readout(Net(), H), torch.randn(5, T, IN))


# --- attention: masks and cross-attention ------------------------------------------------------


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tgt, self.mem = nn.Linear(IN, 4), nn.Linear(IN, 4)
        self.dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(4, 2, 8, dropout=0.0, batch_first=True), 1)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)
        return self.dec(self.tgt(x), self.mem(torch.flip(x, (1,))), tgt_mask=mask, tgt_is_causal=True)


class PaddedEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(IN, 4)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True), 1)

    def forward(self, x):
        pad = torch.zeros(x.shape[:2], dtype=torch.bool)
        pad[:, -1] = True
        return self.enc(self.inp(x), src_key_padding_mask=pad)


@pytest.mark.parametrize("body", [Decoder, PaddedEncoder])
def test_transformer_decoder_and_padded_encoder_on_the_linear_rule(body):
    torch.manual_seed(5)
    report = _check(Readout(body(), 4), torch.randn(5, T, IN))
    assert {r.rule for r in report.params if "attn.in_proj" in r.name} == {"linear:weight", "linear:bias"}


def _mha_case(m: nn.MultiheadAttention, cross: str, batched: bool, kpm, attn_mask, need: bool, causal: bool):
    L, S, B = 3, 5, 2
    kd = m.kdim
    q = torch.randn(L, B, m.embed_dim, dtype=D)
    k = q if cross == "self" else torch.randn(S, B, kd, dtype=D)
    v = k if cross != "all" else torch.randn(S, B, kd, dtype=D)
    src = L if cross == "self" else S
    pad = None
    if kpm:
        pad = torch.zeros(B, src, dtype=torch.bool)
        pad[0, -2:] = True
        pad[1, :] = kpm == "all"  # a sequence whose keys are all masked: NaN with need_weights, zeros without
    mask = None
    if attn_mask:
        mask = torch.ones(L, src, dtype=torch.bool).triu(1) if causal else torch.rand(L, src) < 0.3
        mask = mask if attn_mask == "bool" else torch.zeros(L, src, dtype=D).masked_fill(mask, float("-inf"))
        pad = pad if pad is None or attn_mask == "bool" else torch.zeros(B, src, dtype=D).masked_fill(pad, float("-inf"))
    if not batched:
        q, k, v = q[:, 0], (q[:, 0] if cross == "self" else k[:, 0]), None
        v = k if cross != "all" else torch.randn(S, kd, dtype=D)
        pad = None if pad is None else pad[0]
    want = m(q, k, v, key_padding_mask=pad, attn_mask=mask, need_weights=need, is_causal=causal)
    kw = dict(training=False, key_padding_mask=pad, need_weights=need, attn_mask=mask, is_causal=causal)
    if not m._qkv_same_embed_dim:
        kw.update(use_separate_proj_weight=True, q_proj_weight=m.q_proj_weight, k_proj_weight=m.k_proj_weight,
                  v_proj_weight=m.v_proj_weight)
    got = rules.expansion(F.multi_head_attention_forward)(q, k, v, m.embed_dim, m.num_heads, m.in_proj_weight, m.in_proj_bias,
                                                          m.bias_k, m.bias_v, m.add_zero_attn, 0.0, m.out_proj.weight,
                                                          m.out_proj.bias, **kw)
    return got, want


def test_attention_expansion_reproduces_torch():
    """Against nn.MultiheadAttention's own (non-fast) path, NaN and zero rows included."""
    torch.manual_seed(6)
    variants = [{}, {"kdim": 6, "vdim": 6}, {"add_bias_kv": True}, {"add_zero_attn": True}]
    count = 0
    for variant, cross, batched, kpm, attn_mask, need in itertools.product(
            variants, ["self", "kv", "all"], [True, False], [None, "all"], [None, "bool", "float"], [True, False]):
        if (variant and (not batched or attn_mask == "float")) or ("kdim" in variant and cross == "self"):
            continue
        m = nn.MultiheadAttention(4, 2, **variant).to(D).eval()
        with torch.no_grad():
            for p in m.parameters():
                p.normal_()
        for causal in ([False, True] if attn_mask and cross == "self" else [False]):
            got, want = _mha_case(m, cross, batched, kpm, attn_mask, need, causal)
            assert torch.allclose(got[0], want[0], rtol=0, atol=1e-12, equal_nan=True)
            assert (got[1] is None) == (want[1] is None)
            assert got[1] is None or torch.allclose(got[1], want[1], rtol=0, atol=1e-12, equal_nan=True)
            count += 1
    assert count > 150
    # what stays with the fused op: dropout in training mode
    m = nn.MultiheadAttention(4, 2, dropout=0.5).to(D)
    x = torch.randn(3, 2, 4, dtype=D)
    assert rules.expansion(F.multi_head_attention_forward)(
        x, x, x, 4, 2, m.in_proj_weight, m.in_proj_bias, None, None, False, 0.5, m.out_proj.weight, m.out_proj.bias,
        training=True) is NotImplemented


def test_attention_with_separate_projections_bias_kv_and_masks_is_exact():
    torch.manual_seed(7)

    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.att = nn.MultiheadAttention(4, 2, kdim=IN, vdim=IN, add_bias_kv=True, batch_first=True)
            self.q = nn.Linear(IN, 4)

        def forward(self, x):
            pad = torch.zeros(x.shape[:2], dtype=torch.bool)
            pad[:, 0] = True
            return self.att(self.q(x), x, torch.tanh(x), key_padding_mask=pad, need_weights=True)[0]

    report = _check(Readout(Cross(), 4), torch.randn(5, T, IN))
    rule = {r.name: r.rule for r in report.params}
    assert rule["body.att.q_proj_weight"] == "linear:weight" and rule["body.att.in_proj_bias"] == "add:other"
    assert rule["body.att.bias_k"] == "add:other"


# --- parametrizations ----------------------------------------------------------------------------


def _mlp(wrap) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated
        return nn.Sequential(wrap(nn.Linear(IN, H)), nn.Tanh(), wrap(nn.Linear(H, H)), nn.Tanh(), nn.Linear(H, 2))


P = nn.utils.parametrizations


@pytest.mark.parametrize("wrap", [
    P.weight_norm, lambda m: P.weight_norm(m, dim=None), lambda m: P.weight_norm(m, dim=1), nn.utils.weight_norm,
], ids=["dim0", "whole", "dim1", "hooks"])
def test_weight_norm_on_its_rule(wrap):
    torch.manual_seed(8)
    report = _check(_mlp(wrap), torch.randn(5, IN), settings=(((), ()), ((-1,), ())))
    rule = {r.name.rsplit(".", 1)[-1] if "parametrizations" not in r.name else r.name.split("parametrizations.")[1]: r.rule
            for r in report.params if r.name.startswith("0.")}
    g, v = ("weight.original0", "weight.original1") if "weight.original0" in rule else ("weight_g", "weight_v")
    assert rule[g] == "weight_norm:g" and rule[v] == "weight_norm:v+weight_norm:v_radial"


def test_weight_norm_kernel_gradients_are_exact():
    """The rule's operands (u, g / ‖v‖) are functions of the parameters, and torch's fused second derivative of
    _weight_norm is wrong (so it is decomposed where a kernel may be differentiated): the gradients of the kernel by
    implementations 1 and 3 both equal a central difference."""
    torch.manual_seed(9)
    f, params = _fn(_mlp(P.weight_norm))
    x = torch.randn(3, IN, dtype=D)
    direction = {k: torch.randn_like(v) for k, v in params.items()}

    def loss(impl, p):
        with rules.forced():
            return ntkfunc.ntk_fn(f, trace_axes=(), implementation=impl)(x, None, p).square().sum()

    h = 1e-6
    shifted = [{k: v + s * h * direction[k] for k, v in params.items()} for s in (1, -1)]
    central = (loss(1, shifted[0]) - loss(1, shifted[1])) / (2 * h)
    for impl in (1, 3):
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        grads = torch.autograd.grad(loss(impl, p), list(p.values()), allow_unused=True)
        slope = sum((g * direction[k]).sum() for k, g in zip(p, grads) if g is not None)
        assert abs(slope - central) <= 1e-6 * abs(central), (impl, float(slope), float(central))


def test_spectral_norm_on_matmul_and_division_rules():
    torch.manual_seed(10)
    report = _check(_mlp(P.spectral_norm), torch.randn(5, IN))
    assert {r.rule for r in report.params if "original" in r.name} == {"mv:lhs+div:input"}


def test_spectral_norm_conv_kernel_pairs_its_flattened_use():
    torch.manual_seed(11)
    model = nn.Sequential(P.spectral_norm(nn.Conv2d(2, 3, 3)), nn.Tanh(), nn.Flatten(), nn.Linear(12, 2))
    report = _check(model, torch.randn(5, 2, 4, 4))
    (kernel,) = [r for r in report.params if "original" in r.name]
    assert kernel.rule == "mv:lhs+div:input" and kernel.via == "TensorBase.flatten"


@pytest.mark.parametrize("orthogonal_map", ["matrix_exp", "cayley", "householder"])
def test_orthogonal_on_the_triangle_rule(orthogonal_map):
    torch.manual_seed(12)
    model = nn.Sequential(P.orthogonal(nn.Linear(IN, H), orthogonal_map=orthogonal_map), nn.Tanh(),
                          P.orthogonal(nn.Linear(H, H), orthogonal_map=orthogonal_map), nn.Linear(H, 2))
    report = _check(model, torch.randn(5, IN))
    assert {r.rule for r in report.params if "original" in r.name} == {"tril:input"}


def test_division_rule_takes_the_numerator_only():
    torch.manual_seed(13)
    p = {"w": torch.randn(4, 3, dtype=D), "s": torch.rand(3, dtype=D) + 1}

    def f(p, x):
        return torch.tanh(x @ (p["w"] / 2.5) / torch.tanh(x[:, :3]).exp()) / p["s"]

    def f_ok(p, x):
        return torch.tanh(x @ (p["w"] / 2.5)) / torch.tanh(x[:, :3]).exp()

    check_rule(f_ok, {"w": p["w"]}, torch.randn(3, 4, dtype=D), torch.randn(2, 4, dtype=D), expected={"w": "div:input"})
    report = ntkfunc.explain(f, p, torch.randn(3, 4, dtype=D))
    assert [r.name for r in report.fallbacks] == ["s"]  # a / θ is not linear in θ


# --- bilinear, embedding bags, W[ids], einsum, instance norm ------------------------------------


class BilinearNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(IN, 4)
        self.bil = nn.Bilinear(4, IN, 3)

    def forward(self, x):
        return self.bil(torch.tanh(self.a(x)), x)


def test_bilinear_rule():
    torch.manual_seed(14)
    _check(BilinearNet(), torch.randn(5, IN), {"bil.weight": "bilinear:weight", "bil.bias": "bilinear:bias"},
           settings=(((), ()), ((-1,), ())))
    _check(BilinearNet(), torch.randn(5, 2, IN))  # leading positions


class Bag(nn.Module):
    def __init__(self, mode: str, weighted: bool = False, padding_idx: int | None = None, offsets: bool = False) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(12, 4, mode=mode, padding_idx=padding_idx)
        self.weighted, self.offsets = weighted, offsets

    def forward(self, ids):
        w = torch.linspace(0.5, 1.5, ids.shape[-1], dtype=self.bag.weight.dtype).expand(ids.shape) if self.weighted else None
        if self.offsets:  # a flat list with offsets: each sample's bags of 2, 0 and the rest of its ids
            n, length = ids.shape
            offsets = (torch.arange(n) * length).unsqueeze(-1) + torch.tensor([0, 2, 2])
            out = self.bag(ids.reshape(-1), offsets.reshape(-1), per_sample_weights=None if w is None else w.reshape(-1))
            return out.reshape(n, 3, -1)
        return self.bag(ids, per_sample_weights=w)


@pytest.mark.parametrize("mode,weighted,padding_idx,offsets", [
    ("sum", True, None, False), ("mean", False, 3, False), ("max", False, None, False), ("mean", False, None, True),
    ("max", False, 2, True),
])
def test_embedding_bag_on_the_embedding_rule(mode, weighted, padding_idx, offsets):
    """Inside kernels F.embedding_bag is computed as F.embedding and the bags' reductions (ntkfunc._core.batchable)."""
    torch.manual_seed(15)
    ids = torch.randint(0, 12, (5, 6))
    ids[:, 0] = 3  # a padding entry in some bags
    _check(Readout(Bag(mode, weighted, padding_idx, offsets), 4), ids, {"body.bag.weight": "embedding:weight"})


class Positions(nn.Module):
    """Whisper's decoder: learned positions indexed by position ids, ``weight[ids]``."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(12, 4), nn.Parameter(torch.randn(8, 4))
        self.bias = nn.Parameter(torch.randn(8))

    def forward(self, ids):
        positions = torch.arange(ids.shape[-1])
        h = self.tok(ids) + self.pos[positions] + self.pos[-positions - 1, :]  # negative ids too
        return h * self.bias[positions].unsqueeze(-1)


def test_indexed_positions_are_embeddings():
    torch.manual_seed(17)
    report = _check(Readout(Positions(), 4), torch.randint(0, 12, (5, 6)))
    rule = {r.name: r.rule for r in report.params}
    assert rule["body.pos"] == "embedding:weight+embedding:weight" and rule["body.bias"] == "embedding:weight"
    table, ids = torch.randn(8, 4), torch.tensor([[0, 7, -1]])
    for index in (ids, (ids, slice(None)), (ids, ...)):
        assert torch.equal(rules.expansion(torch.Tensor.__getitem__)(table, index), table[index])
    assert torch.equal(rules.expansion(torch.Tensor.__getitem__)(table[:, 0], ids), table[:, 0][ids])
    for other in (slice(1, 3), (ids, 0), ids > 2, 1):  # views and other indexing stay what they are
        assert rules.expansion(torch.Tensor.__getitem__)(table, other) is NotImplemented


@pytest.mark.parametrize("eq,shapes,x_shape", [
    ("bi,ij,jk->bk", [(3, 4), (4, 2)], (3,)),          # two parameters
    ("bk,kk->bk", [(3, 3)], (3,)),                     # a parameter's diagonal
    ("bii,ij->bj", [(3, 2)], (3, 3)),                  # an input's diagonal
    ("bi,ij,ij->bj", "tied", (3,)),                    # one parameter twice (the product rule)
    ("bi,iji,jk->bk", [(3, 2, 3), (2, 2)], (3,)),      # both at once
])
def test_einsum_with_several_parameters_or_repeated_subscripts(eq, shapes, x_shape):
    torch.manual_seed(18)
    if shapes == "tied":
        params = {"w": torch.randn(3, 2, dtype=D)}

        def f(p, x):
            return torch.einsum(eq, torch.tanh(x), p["w"], p["w"])
    else:
        params = {f"w{i}": torch.randn(*s, dtype=D) for i, s in enumerate(shapes)}

        def f(p, x):
            return torch.einsum(eq, torch.tanh(x), *p.values())
    report = check_rule(f, params, torch.randn(3, *x_shape, dtype=D), torch.randn(2, *x_shape, dtype=D))
    assert not report.fallbacks and all(r.rule.startswith("einsum:operand") for r in report.params)


@pytest.mark.parametrize("track", [False, True])
def test_instance_norm_rule(track):
    torch.manual_seed(19)
    norm = nn.InstanceNorm2d(3, affine=True, track_running_stats=track)
    if track:
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), norm, nn.Tanh(), nn.Flatten(), nn.Linear(48, 2))
    _check(model, torch.randn(5, 2, 4, 4), {"1.weight": "instance_norm:weight", "1.bias": "instance_norm:bias"})


# --- the expansions change nothing outside implementation 3 -------------------------------------


def test_expansions_run_only_in_the_capture(monkeypatch):
    """Implementations 1 and 2 never call an expansion: they run torch's fused ops as they are."""
    calls: list[str] = []
    for op, fn in list(rules.EXPANSIONS.items()):
        def counted(*args, _fn=fn, **kwargs):
            calls.append(_fn.__name__)
            return _fn(*args, **kwargs)
        monkeypatch.setitem(rules.EXPANSIONS, op, counted)
    torch.manual_seed(20)
    f, params = _fn(Readout(Decoder(), 4))
    x = torch.randn(3, T, IN, dtype=D)
    k1 = ntkfunc.ntk_fn(f, implementation=1)(x, None, params)
    k2 = ntkfunc.ntk_fn(f, implementation=2)(x, None, params)
    assert calls == [] and torch.allclose(k1, k2)
    with rules.forced():
        k3 = ntkfunc.ntk_fn(f, implementation=3)(x, None, params)
    assert "multi_head_attention" in calls and torch.allclose(k3, k1)


def test_a_recurrent_weight_takes_its_rule_where_it_pays():
    """Each step's use of W_hh is one contraction call: many small ones cost more than reverse mode (CALL_FLOPS),
    a wide layer's few large ones less."""
    torch.manual_seed(21)

    def w_hh_route(width: int, n: int, **kw) -> str:
        model = Readout(Recurrent(nn.GRU(8, width, 2, batch_first=True)), width).eval()
        f, params = ntkfunc.from_module(model)
        report = ntkfunc.explain(f, params, torch.randn(n, 6, 8), **kw)
        return next(r.route for r in report.params if r.name.endswith("weight_hh_l0"))

    assert w_hh_route(16, 64) == "reverse-mode"  # 36 small Gram equations: "gram" by FLOPs alone, and 2x slower
    assert w_hh_route(128, 8, trace_axes=()) in ("gram", "formed")
