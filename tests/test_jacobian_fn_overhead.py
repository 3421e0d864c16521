"""jacobian_fn's per-call work: what it skips (the RAM reading, BatchableOps, the sum of a 0-d loss) and that the
results stay those of the float64 reference and of the path that does not skip it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ntkfunc
from ntkfunc._core import memory
from ntkfunc._core.cache import KernelCache
from ntkfunc._core.problem import make_problem
from tests.reference import full_jacobians, max_rel_err


def _mlp(out: int = 3, act: torch.nn.Module | None = None) -> tuple:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), act or torch.nn.Tanh(), torch.nn.Linear(7, out)).double()
    return ntkfunc.from_module(model)


def _reference_rows(f, params, x) -> torch.Tensor:
    """``(N, *out, P)`` in the documented order, from the whole batch's float64 Jacobian (samples do not interact)."""
    (shape, jac), = full_jacobians(f, params, x)[0]
    return jac.reshape(*shape, jac.shape[-1])


def _no_ram_reading(monkeypatch) -> None:
    def refuse() -> int:
        raise AssertionError("the available RAM was read")

    monkeypatch.setattr(memory, "available_ram", refuse)


@pytest.mark.parametrize("impl", [None, 1, 3], ids=str)
def test_the_default_budget_is_not_read_where_the_whole_batch_fits_any_budget(impl, monkeypatch):
    f, params = _mlp()
    x = torch.randn(6, 5, dtype=torch.float64)
    given = ntkfunc.jacobian_fn(f, implementation=impl, flat=True, memory_budget="100GB")(x, params)
    _no_ram_reading(monkeypatch)
    jac = ntkfunc.jacobian_fn(f, implementation=impl, flat=True)
    got = jac(x, params)
    assert torch.equal(got, given)  # the same plan (one pass) as under a large budget: the same numbers
    assert max_rel_err(got, _reference_rows(f, params, x)) <= 1e-12
    assert torch.equal(jac(x, params), got)


@pytest.mark.parametrize("impl", [1, 3], ids=str)
def test_the_default_budget_is_read_where_the_batch_might_not_fit(impl, monkeypatch, row_chunks):
    """With a floor too small for the whole batch, the available RAM decides: a small one cuts the batch in chunks."""
    reads, chunks = [], row_chunks
    monkeypatch.setattr(memory, "RAM_FLOOR", 1)
    monkeypatch.setattr(memory, "available_ram", lambda: reads.append(1) or 60_000)
    f, params = _mlp()
    x = torch.randn(9, 5, dtype=torch.float64)
    got = ntkfunc.jacobian_fn(f, implementation=impl, flat=True)(x, params)
    assert reads, "the default budget was not read"
    assert chunks and max(chunks) < x.shape[0]  # the small RAM: several passes
    assert max_rel_err(got, _reference_rows(f, params, x)) <= 1e-12


def test_planned_budget_uses_a_given_budget_and_refuses_a_bad_one(monkeypatch):
    _no_ram_reading(monkeypatch)
    cpu = torch.device("cpu")
    assert memory.planned_budget(1000, cpu, enough=lambda b: True) == 1000 * memory.SAFETY
    assert memory.planned_budget("2GB", cpu) == 2e9 * memory.SAFETY
    floor = memory.RAM_FLOOR * memory.CPU_SHARE * memory.SAFETY
    assert memory.planned_budget(None, cpu, enough=lambda b: b >= floor) == floor
    with pytest.raises(AssertionError, match="available RAM was read"):  # the floor does not suffice: the RAM is read
        memory.planned_budget(None, cpu, enough=lambda b: b > floor)
    with pytest.raises(ValueError, match=r"memory_budget='lots': expected a number of bytes"):
        memory.planned_budget("lots", cpu, enough=lambda b: True)


@pytest.mark.parametrize("vmap_axes", [0, None], ids=str)
def test_a_bad_memory_budget_is_refused_on_every_call(vmap_axes):
    f, params = _mlp()
    x = torch.randn(4, 5, dtype=torch.float64)
    jac = ntkfunc.jacobian_fn(f, vmap_axes, memory_budget="lots")
    for _ in range(2):
        with pytest.raises(ValueError, match=r"memory_budget='lots': expected a number of bytes or a string like '2GB'"):
            jac(x, params)
    with pytest.raises(ValueError, match=r"memory_budget=-5: expected a positive size"):
        ntkfunc.jacobian_fn(f, vmap_axes, memory_budget=-5)(x, params)


def _prelu(p, x):
    return F.prelu(x @ p["w"], p["a"])


def _bag(p, x):
    return F.embedding_bag(x, p["e"], mode="sum") @ p["w"]


def test_the_vmap_probe_finds_whether_f_calls_an_op_batchable_ops_replaces():
    torch.manual_seed(0)
    f, params = _mlp()
    x = torch.randn(3, 5, dtype=torch.float64)
    cache = KernelCache()
    assert make_problem(f, x, None, params, 0, (), (), cache).batchable is False
    assert make_problem(f, x, None, params, 0, (), (), cache).batchable is False  # kept with the probe
    assert make_problem(f, x, None, params, 0, (), ()).batchable is False  # probed again without a cache
    assert make_problem(f, x, None, params, None, (), ()).batchable is True  # no vmap probe: not known, the mode stays
    p = {"w": torch.randn(5, 3, dtype=torch.float64), "a": torch.tensor([0.25], dtype=torch.float64)}
    assert make_problem(_prelu, x, None, p, 0, (), (), KernelCache()).batchable is True
    ids = torch.randint(0, 6, (3, 4))
    pb = {"e": torch.randn(6, 2, dtype=torch.float64), "w": torch.randn(2, 3, dtype=torch.float64)}
    assert make_problem(_bag, ids, None, pb, 0, (), (), KernelCache()).batchable is True


@pytest.mark.parametrize("impl", [None, 1, 3], ids=str)
def test_without_batchable_ops_and_with_them_the_rows_are_the_reference(impl):
    """A model without the replaced ops runs ``f`` without the mode; prelu (whose batching rule mixes up the levels
    when a block's samples equal the outputs: N = O = 3 here) keeps it, and both are the float64 reference."""
    f, params = _mlp()
    x = torch.randn(3, 5, dtype=torch.float64)
    assert max_rel_err(ntkfunc.jacobian_fn(f, implementation=impl, flat=True)(x, params), _reference_rows(f, params, x)) <= 1e-12
    torch.manual_seed(1)
    p = {"w": torch.randn(5, 3, dtype=torch.float64), "a": torch.tensor([0.25], dtype=torch.float64)}
    jac = ntkfunc.jacobian_fn(_prelu, implementation=impl, flat=True)
    for _ in range(2):  # the probe's call and a call from the cache
        assert max_rel_err(jac(x, p), _reference_rows(_prelu, p, x)) <= 1e-12


@pytest.mark.parametrize("out_shape", [(), (1,), (1, 1)], ids=str)
def test_per_sample_losses_of_one_entry_are_their_gradients(out_shape):
    """One output entry per sample, 0-d (its own scalar, no sum) or not (summed): the float64 reference."""
    f, params = _mlp(out=4)
    x = torch.randn(5, 5, dtype=torch.float64)
    y = torch.tensor([1, 0, 3, 2, 1])

    def loss(p, batch):
        xb, yb = batch
        return F.cross_entropy(f(p, xb), yb, reduction="none").reshape(-1, *out_shape)

    ref = _reference_rows(loss, params, (x, y))
    for impl in (1, None):
        got = ntkfunc.jacobian_fn(loss, implementation=impl, flat=True)((x, y), params)
        assert got.shape == (5, *out_shape, sum(p.numel() for p in params.values()))
        assert max_rel_err(got, ref) <= 1e-12


def test_params_names_are_found_when_asked_and_bad_leaves_are_named():
    from ntkfunc._core.problem import Params

    p = Params.make({"enc": {"w": torch.zeros(2)}, "n": torch.zeros(1, dtype=torch.long), "b": torch.zeros(3)})
    assert p.names == ["['enc']['w']", "['n']", "['b']"]  # flatten order
    assert p.diff_names == ["['enc']['w']", "['b']"]
    assert Params.make(torch.zeros(2)).names == ["params"]
    with pytest.raises(TypeError, match=r"jacobian_fn: params\['enc'\]\[1\] is a float; expected every leaf of params"):
        Params.make({"enc": [torch.zeros(1), 2.0]}, "jacobian_fn")


class _SelfAttention(torch.nn.Module):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.mha = None if fused else torch.nn.MultiheadAttention(4, 2, batch_first=True)
        self.out = torch.nn.Linear(4, 2)

    def forward(self, x):
        if self.mha is None:
            return self.out(F.scaled_dot_product_attention(x, x, x)).mean(1)
        return self.out(self.mha(x, x, x, need_weights=False)[0]).mean(1)


def test_the_vmap_probe_finds_whether_f_calls_attention():
    f, params = _mlp()
    x = torch.randn(3, 5, dtype=torch.float64)
    assert make_problem(f, x, None, params, 0, (), (), KernelCache()).attention is False
    assert make_problem(f, x, None, params, None, (), ()).attention is True  # no vmap probe: not known, routed
    tokens = torch.randn(3, 5, 4, dtype=torch.float64)
    for fused in (True, False):
        g, gp = ntkfunc.from_module(_SelfAttention(fused).double().eval())
        cache = KernelCache()
        assert make_problem(g, tokens, None, gp, 0, (), (), cache).attention is True
        assert make_problem(g, tokens, None, gp, 0, (), (), cache).attention is True  # kept with the probe


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "multihead"])
def test_attention_is_routed_and_an_f_without_it_is_not(fused, monkeypatch):
    """The math backend and no MHA fast path while an attention model's rows are formed; the flags left alone for
    an f that calls no attention function (after its first call: the probe); both equal to the float64 reference."""
    from ntkfunc._core import ops

    entered = []
    original = ops._MathAttention.enter
    monkeypatch.setattr(ops._MathAttention, "enter", classmethod(lambda cls: (entered.append(1), original.__func__(cls))[1]))
    f, params = _mlp()
    x = torch.randn(3, 5, dtype=torch.float64)
    for impl in (1, None):
        jac = ntkfunc.jacobian_fn(f, implementation=impl, flat=True)
        jac(x, params)
        entered.clear()
        got = jac(x, params)
        assert not entered, impl
        assert max_rel_err(got, _reference_rows(f, params, x)) <= 1e-12

    g, gp = ntkfunc.from_module(_SelfAttention(fused).double().eval())
    tokens = torch.randn(3, 5, 4, dtype=torch.float64)
    flags = []
    inner = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        flags.append((torch.backends.cuda.flash_sdp_enabled(), torch.backends.mha.get_fastpath_enabled()))
        return inner(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    jac = ntkfunc.jacobian_fn(g, implementation=1, flat=True)
    jac(tokens, gp)
    flags.clear()
    entered.clear()
    got = jac(tokens, gp)
    assert entered and flags and set(flags) == {(False, False)}
    assert max_rel_err(got, _reference_rows(g, gp, tokens)) <= 1e-10
