"""Model families that crashed or were wrong with default arguments, each exact now (issue 21).

Every family runs on a model of its own with every implementation (``tests.zoo.implementations``:
1, 2, 3, "auto" and 3 with every rule forced), default arguments, against the float64
reference (``tests/reference.py``), and through ``pntk_fn`` and ``kernel_matrix``:
``nn.PReLU`` (a silently wrong kernel when a block's sample count equalled the number of
outputs), ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` without an initial state, ``nn.TransformerEncoder``
with a padding mask, ``nn.EmbeddingBag`` (implementation 2), the hook-based
``torch.nn.utils.weight_norm`` in ``from_module``, and float32 layers in a float64 model
(``from_module(..., skip_downcasts=True)``). Also: the message for ops ``vmap`` cannot batch,
and that the replacements of :mod:`ntkfunc._core.batchable` compute what torch's ops compute.
"""

from __future__ import annotations

import re
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

import ntkfunc
from ntkfunc._core import batchable
from tests.reference import max_rel_err, reference_kernel
from tests.zoo import implementations

D = torch.float64
TOL = 1e-12


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second intra-op thread only contends



def _check_all(f, params, x1, x2, *, out=3, kernel_matrix=True, tol=TOL):
    """Every implementation, pntk_fn and kernel_matrix, default arguments, against the float64 reference."""
    full = reference_kernel(f, params, x1, x2, (), ())
    traced = torch.diagonal(full, dim1=2, dim2=3).mean(-1)
    for impl in (1, 2, 3, "auto"):
        k = ntkfunc.ntk_fn(f, implementation=impl)(x1, x2, params)
        assert max_rel_err(k, traced) <= tol, (impl, max_rel_err(k, traced))
        k = ntkfunc.ntk_fn(f, trace_axes=(), implementation=impl)(x1, x2, params)
        assert max_rel_err(k, full) <= tol, (impl, "full", max_rel_err(k, full))
    pntk = ntkfunc.pntk_fn(f)(x1, x2, params)
    assert max_rel_err(pntk, full.sum((2, 3)) / out) <= tol
    if kernel_matrix:
        k = ntkfunc.kernel_matrix(f, params, x1, x2, progress=False)
        assert max_rel_err(k, traced) <= tol


def _impl_kernel(f, params, x1, x2, implementation):
    return ntkfunc.ntk_fn(f, trace_axes=(), implementation=implementation)(x1, x2, params)


# --- PReLU --------------------------------------------------------------------------------


class PReLUNet(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, padding=1)
        self.act = nn.PReLU(channels)
        self.head = nn.Linear(4 * 5, 3)

    def forward(self, x):
        return self.head(self.act(self.conv(x)).flatten(1))


@pytest.mark.parametrize("channels", [1, 4])
@pytest.mark.parametrize("implementation", implementations())
@pytest.mark.parametrize("n1", [3, 5], ids=["N=O", "N!=O"])
def test_prelu(channels, implementation, n1):
    """Was 13-15% off (every implementation) when a block's sample count equalled the 3 outputs, a crash otherwise."""
    torch.manual_seed(0)
    model = PReLUNet(channels).to(D).eval()
    with torch.no_grad():
        model.act.weight.uniform_(0.1, 0.5)
    f, params = ntkfunc.from_module(model)
    x1, x2 = torch.randn(n1, 2, 5, dtype=D), torch.randn(2, 2, 5, dtype=D)
    for b in (x2, None):
        assert max_rel_err(_impl_kernel(f, params, x1, b, implementation), reference_kernel(f, params, x1, b, (), ())) <= TOL


def test_prelu_pntk_and_kernel_matrix():
    torch.manual_seed(1)
    model = PReLUNet(4).to(D).eval()
    f, params = ntkfunc.from_module(model)
    _check_all(f, params, torch.randn(3, 2, 5, dtype=D), torch.randn(4, 2, 5, dtype=D))


# --- recurrent layers -------------------------------------------------------------------------


class Recurrent(nn.Module):
    """A sequence classifier on the last output of a recurrent layer called without an initial state."""

    def __init__(self, kind: type, **kwargs) -> None:
        super().__init__()
        self.rnn = kind(3, 4, batch_first=True, **kwargs)
        self.head = nn.Linear(4 * (2 if kwargs.get("bidirectional") else 1), 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


RECURRENT = {
    "LSTM": (nn.LSTM, {}),
    "GRU": (nn.GRU, {}),
    "RNN": (nn.RNN, {}),
    "LSTM-2layers-bidirectional": (nn.LSTM, {"num_layers": 2, "bidirectional": True}),
    "RNN-relu-2layers": (nn.RNN, {"num_layers": 2, "nonlinearity": "relu"}),
}


@pytest.mark.parametrize("implementation", implementations())
@pytest.mark.parametrize("name", list(RECURRENT))
def test_recurrent_without_initial_state(name, implementation):
    """Crashed under vmap: "output with shape [1, 8] doesn't match the broadcast shape [3, 1, 8]"."""
    torch.manual_seed(0)
    kind, kwargs = RECURRENT[name]
    model = Recurrent(kind, **kwargs).to(D).eval()
    f, params = ntkfunc.from_module(model)
    x1, x2 = torch.randn(3, 4, 3, dtype=D), torch.randn(2, 4, 3, dtype=D)
    assert max_rel_err(_impl_kernel(f, params, x1, x2, implementation), reference_kernel(f, params, x1, x2, (), ())) <= TOL


class LearnedState(nn.Module):
    """A GRU whose initial state is a parameter (not batched over samples, as the zero state was not)."""

    def __init__(self) -> None:
        super().__init__()
        self.gru, self.h0, self.head = nn.GRU(3, 4, batch_first=True), nn.Parameter(torch.randn(1, 1, 4)), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.gru(x, self.h0.expand(1, x.shape[0], 4).contiguous())[0][:, -1])


def test_recurrent_with_a_learned_initial_state():
    torch.manual_seed(0)
    f, params = ntkfunc.from_module(LearnedState().to(D))
    x = torch.randn(3, 5, 3, dtype=D)
    ref = reference_kernel(f, params, x, None, (), ())
    for impl in (1, 2, 3, "auto"):
        assert max_rel_err(_impl_kernel(f, params, x, None, impl), ref) <= TOL, impl


def test_recurrent_float32_and_pntk_kernel_matrix():
    """float32 (CPU: oneDNN's LSTM path) and the dataset path."""
    torch.manual_seed(0)
    model = Recurrent(nn.LSTM).eval()
    f, params = ntkfunc.from_module(model)
    x = torch.randn(4, 5, 3)
    k = ntkfunc.ntk_fn(f, trace_axes=())(x, None, params)
    ref = reference_kernel(f, params, x.double(), None, (), ())
    assert max_rel_err(k, ref) <= 1e-5
    model = Recurrent(nn.GRU).to(D).eval()
    f, params = ntkfunc.from_module(model)
    _check_all(f, params, torch.randn(3, 4, 3, dtype=D), torch.randn(2, 4, 3, dtype=D))


# --- TransformerEncoder with a padding mask ------------------------------------------------------


class PaddedEncoder(nn.Module):
    """Token ids (0 is padding) -> a TransformerEncoder with ``src_key_padding_mask`` -> the first position."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids), src_key_padding_mask=ids == 0)[:, 0])


def _padded_ids(n: int) -> torch.Tensor:
    ids = torch.randint(1, 10, (n, 5))
    for i in range(n):
        ids[i, 5 - i % 3:] = 0  # right-padded, a different length per sample
    return ids


@pytest.mark.parametrize("implementation", implementations())
def test_transformer_encoder_with_padding_mask(implementation):
    """Crashed: "Batching rule not implemented for aten::_nested_tensor_from_mask_left_aligned" (its fast path)."""
    torch.manual_seed(0)
    model = PaddedEncoder().to(D).eval()
    f, params = ntkfunc.from_module(model)
    x1, x2 = _padded_ids(3), _padded_ids(2)
    assert max_rel_err(_impl_kernel(f, params, x1, x2, implementation), reference_kernel(f, params, x1, x2, (), ())) <= TOL
    assert torch.backends.mha.get_fastpath_enabled()  # the flag is restored after the kernel


def test_transformer_encoder_pntk_kernel_matrix_and_dict_inputs():
    torch.manual_seed(1)
    model = PaddedEncoder().to(D).eval()
    f, params = ntkfunc.from_module(model)
    _check_all(f, params, _padded_ids(3), _padded_ids(4))

    class Keywords(nn.Module):  # the mask as a keyword input of its own, batched like the tokens
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, src, src_key_padding_mask):
            return self.inner.head(self.inner.encoder(src, src_key_padding_mask=src_key_padding_mask)[:, 0])

    model.embed.requires_grad_(False)  # not used by Keywords: frozen, a constant
    g, p = ntkfunc.from_module(Keywords(model))
    ids = _padded_ids(3)
    x = {"src": model.embed(ids).detach(), "src_key_padding_mask": ids == 0}
    for impl in (1, 2):
        k = ntkfunc.ntk_fn(g, implementation=impl)(x, None, p)
        assert max_rel_err(k, reference_kernel(g, p, x, None)) <= TOL


def test_fast_path_off_during_kernels_only():
    seen = []

    def f(p, x):
        seen.append(torch.backends.mha.get_fastpath_enabled())
        return x @ p

    ntkfunc.ntk_fn(f)(torch.randn(2, 3), None, torch.randn(3, 2))
    assert seen and not any(seen) and torch.backends.mha.get_fastpath_enabled()


# --- EmbeddingBag --------------------------------------------------------------------------------


class Bags(nn.Module):
    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(12, 4, **kwargs)
        self.head = nn.Linear(4, 3)

    def forward(self, ids, weights=None):
        return self.head(torch.tanh(self.bag(ids, per_sample_weights=weights)))


BAGS = {"mean": {}, "sum": {"mode": "sum"}, "max": {"mode": "max"}, "mean-padding": {"padding_idx": 0}, "max-padding": {"mode": "max", "padding_idx": 0}}


@pytest.mark.parametrize("implementation", implementations())
@pytest.mark.parametrize("name", list(BAGS))
def test_embedding_bag(name, implementation):
    """Implementation 2 raised "the derivative for '_embedding_bag_backward' is not implemented"."""
    torch.manual_seed(0)
    model = Bags(**BAGS[name]).to(D).eval()
    f, params = ntkfunc.from_module(model)
    x1, x2 = torch.randint(0, 12, (3, 5)), torch.randint(0, 12, (2, 5))
    x1[0] = 0  # an empty bag where 0 is padding
    assert max_rel_err(_impl_kernel(f, params, x1, x2, implementation), reference_kernel(f, params, x1, x2, (), ())) <= TOL


def test_embedding_bag_weights_offsets_pntk_kernel_matrix():
    torch.manual_seed(0)
    model = Bags(mode="sum").to(D).eval()
    f, params = ntkfunc.from_module(model)
    _check_all(f, params, torch.randint(0, 12, (3, 5)), torch.randint(0, 12, (4, 5)))
    x = {"ids": torch.randint(0, 12, (3, 5)), "weights": torch.rand(3, 5, dtype=D)}  # per-sample weights, batched
    for impl in (1, 2, 3):
        assert max_rel_err(ntkfunc.ntk_fn(f, implementation=impl)(x, None, params), reference_kernel(f, params, x, None)) <= TOL
    # 1-D ids with offsets: the bags of a batch share one tensor, so the batch is one unit (vmap_axes=None)
    ids, offsets = torch.randint(0, 12, (9,)), torch.tensor([0, 2, 2, 6])  # bag 1 is empty
    for mode in ("mean", "max"):
        bag = nn.EmbeddingBag(12, 4, mode=mode).to(D)
        g, p = ntkfunc.from_module(bag)
        x = {"input": ids, "offsets": offsets}
        ref = reference_kernel(g, p, x, None, (), ())
        for impl in (1, 2, 3):
            assert max_rel_err(ntkfunc.ntk_fn(g, trace_axes=(), vmap_axes=None, implementation=impl)(x, None, p), ref) <= TOL


# --- weight_norm and parametrizations --------------------------------------------------------------


def _weight_normed() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated, and common
        conv = nn.utils.weight_norm(nn.Conv1d(2, 3, 3))
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.utils.parametrizations.weight_norm(nn.Linear(9, 3))).to(D).eval()


@pytest.mark.parametrize("implementation", implementations())
def test_weight_norm(implementation):
    """from_module crashed: its per-thread structural copy deep-copied the hook's non-leaf `weight`."""
    torch.manual_seed(0)
    model = _weight_normed()
    f, params = ntkfunc.from_module(model)
    assert "0.weight_g" in params and "3.parametrizations.weight.original1" in params
    x1, x2 = torch.randn(3, 2, 5, dtype=D), torch.randn(2, 2, 5, dtype=D)
    assert max_rel_err(_impl_kernel(f, params, x1, x2, implementation), reference_kernel(f, params, x1, x2, (), ())) <= TOL


def test_weight_norm_in_threads_pntk_kernel_matrix():
    torch.manual_seed(1)
    model = _weight_normed()
    f, params = ntkfunc.from_module(model)
    x1, x2 = torch.randn(3, 2, 5, dtype=D), torch.randn(4, 2, 5, dtype=D)
    _check_all(f, params, x1, x2)
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("k", ntkfunc.ntk_fn(f, trace_axes=())(x1, x2, params)))
    thread.start()
    thread.join()
    assert max_rel_err(out["k"], reference_kernel(f, params, x1, x2, (), ())) <= TOL
    with torch.no_grad():
        assert torch.equal(f(params, x1), model(x1))  # the module itself still works


# --- f that vmap cannot batch --------------------------------------------------------------------------


class MaskedMessagePassing(nn.Module):
    """GNN-style: keep the nodes whose score is positive with boolean-mask indexing, then sum them."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):  # (graphs, nodes, 4)
        h = torch.tanh(self.lin(x))
        return torch.stack([g[g[:, 0] > 0].sum(0) for g in h])


def test_op_vmap_cannot_batch_gets_one_message():
    torch.manual_seed(0)
    model = MaskedMessagePassing().to(D).eval()
    f, params = ntkfunc.from_module(model)
    x = torch.randn(3, 6, 4, dtype=D)
    f(params, x)  # runs without vmap
    expected = r"^ntk_fn\(vmap_axes=0\): f\(params, x\) runs on one sample without vmap but fails under torch.func.vmap .* in Tensor.__getitem__ " \
               r"\(torch says: vmap: .*boolean mask.*\); expected f built from ops that vmap can batch .* pass vmap_axes=None"
    for impl in (1, 2, 3, "auto"):
        with pytest.raises(ValueError, match=expected):
            ntkfunc.ntk_fn(f, implementation=impl)(x, None, params)
    with pytest.raises(ValueError, match=r"in Tensor.__getitem__ .* pass vmap_axes=None"):  # (pntk_fn's errors name ntk_fn)
        ntkfunc.pntk_fn(f)(x, None, params)
    with pytest.raises(ValueError, match=r"^kernel_matrix\(vmap_axes=0\): .* in Tensor.__getitem__ .* ntk_fn\(f, vmap_axes=None\)"):
        ntkfunc.kernel_matrix(f, params, x, progress=False)
    ref = reference_kernel(f, params, x, None, (), ())
    for impl in (1, 2, 3, "auto"):  # what the message offers is exact
        assert max_rel_err(ntkfunc.ntk_fn(f, trace_axes=(), vmap_axes=None, implementation=impl)(x, None, params), ref) <= TOL


def test_unbatchable_op_named_from_torch():
    """An op without a batching rule: named as f called it, and by its aten name; a genuine error of f is left alone."""
    w = torch.randn(3, 2, dtype=D)

    def f(p, x):
        h = x @ p
        return torch.zeros(1, 2, dtype=D).add_(h)  # in place into a tensor that is not batched

    with pytest.raises(ValueError, match=r"in Tensor.add_ \(torch says: output with shape \[1, 2\]"):
        ntkfunc.ntk_fn(f)(torch.randn(3, 3, dtype=D), None, w)

    def g(p, x):
        return (x @ p).reshape(7)  # fails without vmap too: torch's own error

    with pytest.raises(RuntimeError, match="shape '\\[7\\]' is invalid"):
        ntkfunc.ntk_fn(g)(torch.randn(3, 3, dtype=D), None, w)


# --- float32 layers in a float64 model --------------------------------------------------------------


class HFStyleRMSNorm(nn.Module):
    """As HuggingFace's LlamaRMSNorm: computed in float32 whatever the model's dtype."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, h):
        dtype = h.dtype
        h = h.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(dtype)


class Float32Inside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.norm, self.down = nn.Linear(4, 16), HFStyleRMSNorm(16), nn.Linear(16, 3)

    def forward(self, x):
        return self.down(F.softmax(self.norm(self.up(x)), -1, dtype=torch.float32).to(x.dtype))


def test_float32_layers_in_float64_skip_downcasts():
    torch.manual_seed(0)
    model = Float32Inside().to(D).eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
    x1, x2 = torch.randn(3, 4, dtype=D), torch.randn(2, 4, dtype=D)
    f, params = ntkfunc.from_module(model)  # as the module computes: forward and reverse mode round differently
    errs = {impl: max_rel_err(_impl_kernel(f, params, x1, x2, impl), reference_kernel(f, params, x1, x2, (), ())) for impl in (1, 2)}
    assert errs[1] <= TOL and 1e-12 < errs[2] <= 1e-6, errs
    f, params = ntkfunc.from_module(model, skip_downcasts=True)
    with torch.no_grad():
        out = f(params, x1)
        assert out.dtype == D and 0 < (out - model(x1)).abs().max() <= 1e-6  # float64 throughout
    _check_all(f, params, x1, x2)
    with pytest.raises(TypeError, match=r"from_module\(skip_downcasts='yes'\): expected True or False"):
        ntkfunc.from_module(model, skip_downcasts="yes")


def test_hf_llama_skip_downcasts():
    """HF Llama's RMSNorm and eager softmax compute in float32: with skip_downcasts implementation 2 is exact too."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        import _libraries as L

        model, x, kw = L.FAMILIES["hf llama eager"].build("tiny", 0)
    except ImportError as err:
        pytest.skip(str(err))
    finally:
        sys.path.pop(0)
    f, params = ntkfunc.from_module(model.double(), skip_downcasts=True, **kw)
    ref = reference_kernel(f, params, x, None)
    for impl in (1, 2):
        assert max_rel_err(ntkfunc.ntk_fn(f, implementation=impl)(x, None, params), ref) <= TOL


# --- the replacements compute what torch computes ------------------------------------------------------


def test_replacements_compute_torchs_values():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, dtype=D)
    for w in (torch.rand(1, dtype=D), torch.rand(3, dtype=D)):
        assert torch.equal(batchable.prelu(x, w), F.prelu(x, w))
    scalar, w1 = torch.tensor(-2.0, dtype=D), torch.rand(1, dtype=D)
    assert batchable.prelu(scalar, w1).shape == F.prelu(scalar, w1).shape == () and torch.equal(batchable.prelu(scalar, w1), F.prelu(scalar, w1))
    assert torch.equal(batchable.rrelu(x, 0.1, 0.3), F.rrelu(x, 0.1, 0.3))
    weight = torch.randn(12, 4, dtype=D)
    ids = torch.randint(0, 12, (5, 6))
    ids[0] = 3  # a bag of padding only
    psw = torch.rand(5, 6, dtype=D)
    cases = [dict(mode=m, padding_idx=p) for m in ("sum", "mean", "max") for p in (None, 3, -9)] + [dict(mode="sum", per_sample_weights=psw)]
    for kw in cases:
        assert torch.allclose(batchable.embedding_bag(ids, weight, **kw), F.embedding_bag(ids, weight, **kw), rtol=1e-14, atol=1e-15), kw
    flat, offsets = ids.reshape(-1), torch.tensor([0, 4, 4, 17, 30])
    for kw in [dict(mode=m, padding_idx=p, include_last_offset=last) for m in ("sum", "mean", "max") for p in (None, 3) for last in (False, True)]:
        got, want = batchable.embedding_bag(flat, weight, offsets, **kw), F.embedding_bag(flat, weight, offsets, **kw)
        assert torch.allclose(got, want, rtol=1e-14, atol=1e-15), kw
    # the recurrent layers: the same numbers as torch's op, under vmap (where it now runs) and without
    lstm = nn.LSTM(3, 4, batch_first=True).to(D)
    seq = torch.randn(3, 2, 5, 3, dtype=D)
    with batchable.BatchableOps():
        batched = vmap(lambda s: lstm(s)[0])(seq)
        plain = lstm(seq[1])[0]
    assert torch.equal(plain, lstm(seq[1])[0])
    assert torch.allclose(batched, torch.stack([lstm(s)[0] for s in seq]), rtol=1e-14, atol=1e-15)


def test_model_outputs_unchanged_inside_kernels():
    """f computes the same values inside a kernel computation (under vmap, with the replacements) as the module."""
    from ntkfunc._core.ops import kernel_context
    from ntkfunc._core.problem import make_problem

    torch.manual_seed(0)
    for model, x in [(PReLUNet(4), torch.randn(3, 2, 5)), (Recurrent(nn.GRU), torch.randn(3, 4, 3)),
                     (PaddedEncoder(), _padded_ids(3)), (Bags(mode="max", padding_idx=0), torch.randint(0, 12, (3, 5)))]:
        model = model.to(D).eval()
        x = x.to(D) if x.is_floating_point() else x
        f, params = ntkfunc.from_module(model)
        with kernel_context(x, None, params):
            problem = make_problem(f, x, None, params, 0, (), ())
            inside = vmap(problem.sample_fn(), in_dims=(None, problem.x_axes))(problem.params.diff_leaves, [x])[0]
        with torch.no_grad():
            assert torch.allclose(inside, model(x), rtol=1e-13, atol=1e-14), type(model).__name__


def test_readme_family_section_names_each_family():
    """The README's family section lists what BatchableOps replaces; keep the two in step."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Model families"):]
    section = section[: section.index("\n## ", 3)]
    for name in ("PReLU", "LSTM", "EmbeddingBag", "RReLU", "weight_norm", "vmap_axes=None", "skip_downcasts", "requires_grad=False"):
        assert re.search(re.escape(name), section), name
