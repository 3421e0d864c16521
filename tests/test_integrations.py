"""HuggingFace, timm and torchvision models out of the box: exact kernels, rules on >= 90% of parameters.

Each family of ``examples/_libraries.py`` (random weights, no download) in float64:
implementations 1 and 3 against the float64 reference (``ntkfunc.testing.reference_kernel``),
and ``explain``'s coverage. Skipped, with the reason, when the library is not installed
(``pip install -e '.[integrations]'``, see the Makefile). Also runs the README section's
snippets (the GPT-2 example runs in tests/test_examples.py).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

import ntkfunc
from ntkfunc.testing import max_rel_err, reference_kernel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
import _libraries as L  # noqa: E402

sys.path.pop(0)

# HF Llama computes RMSNorm in float32 even in a float64 model (and so do its derivatives): the
# reverse-mode implementations (1, 3) round as the reverse-mode reference does and agree to 1e-16;
# implementation 2's forward mode rounds elsewhere and agrees to ~3e-9 (measured 2.6e-9 to 3.8e-9).
TOL = {("hf llama eager", 2): 1e-8, ("hf llama sdpa", 2): 1e-8}
CNNS = ("torchvision resnet18", "torchvision mobilenet_v3_small", "torchvision efficientnet_b0")


def _build(name: str, size: str = "tiny"):
    try:
        return L.FAMILIES[name].build(size, 0)
    except ImportError as err:
        pytest.skip(str(err))


def coverage(report: ntkfunc.Explanation) -> float:
    """Fraction of parameters (by count) that a rule handles."""
    total = sum(torch.Size(p.shape).numel() for p in report.params)
    return sum(torch.Size(p.shape).numel() for p in report.params if p.method == "rule") / total


@pytest.mark.parametrize("name", list(L.FAMILIES))
def test_family_is_exact_and_ruled(name):
    model, x, kw = _build(name)
    vision = not isinstance(x, dict)
    if vision:  # two logits of two images: the full architectures, a small reference Jacobian
        kw = {**kw, "output": lambda y: y[:, :2]}
        x = x.double()
    f, p = ntkfunc.from_module(model.double(), **kw)
    trace = () if vision else (-1,)  # LMs: the kernel between token positions, vocabulary traced
    report = ntkfunc.explain(f, p, x, trace_axes=trace)
    assert coverage(report) >= 0.9, str(report)
    ref = reference_kernel(f, p, x, None, trace, ())
    for impl in (3,) if name in CNNS else (1, 2, 3):  # 1 and 2 on CNNs: the zoo of tests/test_ntk.py
        k = ntkfunc.ntk_fn(f, trace_axes=trace, implementation=impl)(x, None, p)
        assert max_rel_err(k, ref) <= TOL.get((name, impl), 1e-12), (impl, max_rel_err(k, ref))


def test_gpt2_tied_embedding_and_addmm_rules():
    model, x, kw = _build("hf gpt2 eager")
    f, p = ntkfunc.from_module(model.double(), **kw)
    report = {r.name: r for r in ntkfunc.explain(f, p, x).params}
    assert report["transformer.wte.weight"].rule == "embedding:weight+linear:weight"
    assert report["transformer.h.0.attn.c_attn.weight"].rule == "addmm:mat2"
    assert report["transformer.h.0.attn.c_attn.bias"].rule == "addmm:input"


def test_vit_class_token_through_expand():
    model, x, kw = _build("timm vit_tiny")
    f, p = ntkfunc.from_module(model, **kw)
    report = {r.name: r for r in ntkfunc.explain(f, p, x).params}
    assert report["cls_token"].rule == "cat:tensor0" and "expand" in report["cls_token"].via


def test_hf_keyword_inputs_with_a_padding_mask():
    """GPT-2 eager prepares its mask in plain ops (vmap works); sdpa reads the mask's values (vmap_axes=None)."""
    for name, vmap_axes in (("hf gpt2 eager", 0), ("hf gpt2 sdpa", None)):
        model, x, kw = _build(name)
        f, p = ntkfunc.from_module(model.double(), **kw, output=lambda out: out.logits[..., :3])
        mask = torch.ones_like(x["input_ids"])
        mask[0, :2] = 0
        x = {**x, "attention_mask": mask}
        k = ntkfunc.ntk_fn(f, vmap_axes=vmap_axes, implementation=3)(x, None, p)
        assert max_rel_err(k, reference_kernel(f, p, x, None)) <= 1e-12, name


def test_hf_model_output_with_several_tensors_needs_output():
    _build("hf gpt2 eager")  # skips without transformers
    tr = L.load("transformers")
    model = tr.GPT2Model(tr.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8, output_hidden_states=True)).eval()
    f, p = ntkfunc.from_module(model)
    with pytest.raises(ValueError, match="returned a BaseModelOutputWithPastAndCrossAttentions with 2 outputs"):
        f(p, torch.zeros(1, 4, dtype=torch.long))
    g, p = ntkfunc.from_module(model, output=("hidden_states", -1))
    assert g(p, torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 8)


def _readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Using ntkfunc with HuggingFace, timm and torchvision models")
    end = text.index("\n## ", start + 3)
    return text[start:end]


def test_readme_section_runs():
    """The README section's ``python`` blocks, run in order in one namespace (they assert what they show)."""
    for lib in ("transformers", "timm", "torchvision"):
        try:
            L.load(lib)
        except ImportError as err:
            pytest.skip(str(err))
    blocks = re.findall(r"```python\n(.*?)```", _readme_section(), flags=re.S)
    assert blocks, "no python blocks in the README section"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
