"""``from_module`` with the calling conventions of model libraries, on small stand-ins (no library needed).

The real HuggingFace models are in ``tests/test_integrations.py`` (skipped when transformers
is not installed); these stand-ins have the same surface: keyword inputs, ``use_cache``,
and a ``ModelOutput`` (an ordered dict whose class is named ``ModelOutput``) as the output.
"""

from __future__ import annotations

import collections

import pytest
import torch

import ntkfunc
from ntkfunc.testing import max_rel_err, reference_kernel

D = torch.float64


class ModelOutput(collections.OrderedDict):
    """Like transformers' ModelOutput: a dict of the fields that are not None, also readable as attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class CausalLMOutput(ModelOutput):
    pass


class TinyLM(torch.nn.Module):
    """``forward(input_ids, attention_mask=None, token_type_ids=None, use_cache=True)`` -> CausalLMOutput."""

    def __init__(self, vocab=11, dim=6, extra_outputs=False):
        super().__init__()
        self.wte = torch.nn.Embedding(vocab, dim)
        self.tte = torch.nn.Embedding(2, dim)
        self.mix = torch.nn.Linear(dim, dim)
        self.extra_outputs = extra_outputs
        self.seen: list = []

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, use_cache=True, **kwargs):
        self.seen.append(use_cache)
        h = self.wte(input_ids)
        if token_type_ids is not None:
            h = h + self.tte(token_type_ids)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1).to(h.dtype)
        h = torch.tanh(self.mix(h))
        out = CausalLMOutput(logits=torch.nn.functional.linear(h, self.wte.weight))
        if self.extra_outputs:
            out["hidden_states"] = (h, 2 * h)
        if use_cache:
            out["past_key_values"] = object()  # not a tensor: a kernel cannot be of it
        return out


def _inputs(n=3, t=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 11, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[0, :2] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.randint(0, 2, (n, t), generator=g)}


def test_dict_inputs_are_keywords_and_the_cache_is_off():
    torch.manual_seed(0)
    model = TinyLM().double().eval()
    f, p = ntkfunc.from_module(model)
    x1, x2 = _inputs(3, seed=1), _inputs(2, seed=2)
    out = f(p, x1)
    assert out.shape == (3, 4, 11) and model.seen[-1] is False  # the one tensor of the ModelOutput; use_cache=False
    for impl in (1, 2, 3, "auto"):
        k = ntkfunc.ntk_fn(f, trace_axes=(-1,), implementation=impl)(x1, x2, p)
        assert k.shape == (3, 2, 4, 4)
        assert max_rel_err(k, reference_kernel(f, p, x1, x2, (-1,), ())) <= 1e-10, impl


def test_tensor_input_is_positional_and_the_cache_still_off():
    model = TinyLM().double().eval()
    f, p = ntkfunc.from_module(model)
    assert f(p, _inputs()["input_ids"]).shape == (3, 4, 11) and model.seen[-1] is False
    with pytest.raises(ValueError, match=r"with 2 outputs \(logits, past_key_values\)"):
        f(p, {**_inputs(), "use_cache": True})  # the caller's use_cache wins, and the cache is then an output
    assert model.seen[-1] is True


@pytest.mark.parametrize(
    "output,shape",
    [("logits", (3, 4, 11)), (("hidden_states", -1), (3, 4, 6)), (lambda out: out.logits[:, -1], (3, 11))],
    ids=["key", "path", "callable"],
)
def test_output_selects_what_the_kernel_is_of(output, shape):
    torch.manual_seed(1)
    f, p = ntkfunc.from_module(TinyLM(extra_outputs=True).double().eval(), output=output)
    x = _inputs()
    assert tuple(f(p, x).shape) == shape
    k = ntkfunc.ntk_fn(f, implementation=3)(x, None, p)
    assert max_rel_err(k, reference_kernel(f, p, x, None)) <= 1e-10


def test_several_outputs_need_output():
    f, p = ntkfunc.from_module(TinyLM(extra_outputs=True).eval())
    with pytest.raises(ValueError, match=r"returned a CausalLMOutput with 2 outputs \(logits, hidden_states\); expected output="):
        f(p, _inputs())
    with pytest.raises(ValueError, match="from_module"):
        ntkfunc.ntk_fn(f)(_inputs(), None, p)


def test_bad_output_and_inputs_arguments():
    model = TinyLM().eval()
    f, p = ntkfunc.from_module(model, output="logitz")
    with pytest.raises(ValueError, match=r"from_module\(output='logitz'\): the output of TinyLM has the fields logits, and no 'logitz'"):
        f(p, _inputs())
    with pytest.raises(TypeError, match=r"from_module\(output=3.5\): expected None, a key"):
        ntkfunc.from_module(model, output=3.5)
    with pytest.raises(ValueError, match=r"from_module\(inputs='kw'\): expected one of 'auto', 'keywords', 'positional'"):
        ntkfunc.from_module(model, inputs="kw")


def test_dict_input_of_a_plain_module_stays_positional():
    class TakesDict(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, batch):
            return self.lin(batch["image"]) * batch["weight"]

    model = TakesDict().double()
    f, p = ntkfunc.from_module(model)
    x = {"image": torch.randn(4, 3, dtype=D), "weight": torch.rand(4, 1, dtype=D)}
    assert f(p, x).shape == (4, 2)
    k = ntkfunc.ntk_fn(f, implementation=3)(x, None, p)
    assert max_rel_err(k, reference_kernel(f, p, x, None)) <= 1e-10
    g, _ = ntkfunc.from_module(model, inputs="keywords")
    with pytest.raises(TypeError):
        g(p, x)  # forward() got an unexpected keyword argument


def test_value_dependent_control_flow_gets_a_clear_error():
    class SkipsMask(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x, attention_mask=None):
            if attention_mask is not None and not attention_mask.all():  # as HF's sdpa mask preparation
                x = x * attention_mask.unsqueeze(-1)
            return self.lin(x)

    model = SkipsMask().double()
    f, p = ntkfunc.from_module(model)
    x = {"x": torch.randn(3, 5, 3, dtype=D), "attention_mask": torch.ones(3, 5, dtype=D)}
    with pytest.raises(RuntimeError, match="data-dependent control flow.*vmap_axes=None in ntk_fn"):
        ntkfunc.ntk_fn(f)(x, None, p)
    k = ntkfunc.ntk_fn(f, vmap_axes=None, implementation=3)(x, None, p)
    assert max_rel_err(k, reference_kernel(f, p, x, None)) <= 1e-10
