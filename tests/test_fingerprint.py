"""A resume compares what determines the kernel: the model's structure and buffers, what f computes, all the data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

import ntkfunc
from ntkfunc import _cli as cli
from ntkfunc import kernel_matrix
from ntkfunc._core.checks import FINGERPRINT_ATTR
from ntkfunc._dataset.fingerprint import differences, probes_match
from tests.interrupt import stopped_after
from tests.reference import max_rel_err, reference_kernel


def _model(act):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), act, torch.nn.Linear(6, 3)).double()


def cnn_tanh():
    """``--model tests.test_fingerprint:cnn_tanh`` (the CLI's default digits: 1 x 8 x 8)."""
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(72, 3))


def cnn_relu():
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(72, 3))


def test_another_activation_with_the_same_params_is_refused(tmp_path, monkeypatch):
    """Regression: Tanh -> ReLU with identical params resumed into a mixed kernel, or returned the old one."""
    x = torch.randn(9, 4, dtype=torch.float64)
    out = str(tmp_path / "K.npy")
    f_tanh, p_tanh = ntkfunc.from_module(_model(torch.nn.Tanh()))
    f_relu, p_relu = ntkfunc.from_module(_model(torch.nn.ReLU()))
    assert all(torch.equal(p_tanh[k], p_relu[k]) for k in p_tanh)
    stopped_after(monkeypatch, 2, f_tanh, p_tanh, x, out=out, batch_size=3)
    with pytest.raises(ValueError, match=r"computed with different module.structure \(recorded in K.npy.manifest.json\)"):
        kernel_matrix(f_relu, p_relu, x, out=out, batch_size=3, progress=False)  # mid-run
    kernel_matrix(f_tanh, p_tanh, x, out=out, batch_size=3, progress=False)
    with pytest.raises(ValueError, match=r"computed with different module.structure"):
        kernel_matrix(f_relu, p_relu, x, out=out, batch_size=3, progress=False)  # finished
    k = kernel_matrix(f_relu, p_relu, x, out=out, batch_size=3, resume=False, progress=False)
    assert max_rel_err(k, reference_kernel(f_relu, p_relu, x, None)) <= 1e-10


def test_changed_buffers_are_refused(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Linear(6, 3)).double().eval()
    x = torch.randn(8, 4, dtype=torch.float64)
    out = str(tmp_path / "K.npy")
    f, params = ntkfunc.from_module(model)
    kernel_matrix(f, params, x, out=out, progress=False)
    with torch.no_grad():
        model[1].running_var.mul_(4.0)  # the same params, other running statistics
    with pytest.raises(ValueError, match=r"computed with different module.constants \(recorded"):
        kernel_matrix(f, params, x, out=out, progress=False)


class _TwoHeads(torch.nn.Module):
    """A module whose output is a dict (as a HuggingFace model's); ``output=`` selects a head."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(4, 6)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return {"a": h[:, :3], "b": h[:, 3:]}


def test_another_output_selection_is_refused(tmp_path):
    """``from_module(output=...)`` is part of the module's identity: the same module and params, another head."""
    torch.manual_seed(0)
    model = _TwoHeads().double()
    x = torch.randn(6, 4, dtype=torch.float64)
    out = str(tmp_path / "K.npy")
    f_a, params = ntkfunc.from_module(model, output="a")
    f_b, _ = ntkfunc.from_module(model, output="b")
    identity = {k: getattr(f, FINGERPRINT_ATTR)() for k, f in [("a", f_a), ("b", f_b), ("a again", ntkfunc.from_module(model, output="a")[0])]}
    assert identity["a"] != identity["b"] and identity["a"] == identity["a again"]
    kernel_matrix(f_a, params, x, out=out, progress=False)
    with pytest.raises(ValueError, match=r"computed with different module.structure"):
        kernel_matrix(f_b, params, x, out=out, progress=False)


def test_a_function_that_computes_something_else_is_refused(tmp_path):
    """A plain f whose captured constant changed (named: captured.scale), or whose outputs differ through something it
    does not capture (an object's attribute: the probe of f)."""
    x = torch.randn(8, 4, dtype=torch.float64)
    p = {"w": torch.randn(4, 3, dtype=torch.float64)}
    out = str(tmp_path / "K.npy")

    def make(scale):
        def f(params, x):
            return torch.tanh(x @ params["w"]) * scale

        return f

    kernel_matrix(make(1.0), p, x, out=out, progress=False)
    kernel_matrix(make(1.0), p, x, out=out, progress=False)  # the same function: resumed (nothing to do)
    with pytest.raises(ValueError, match=r"computed with different captured.scale \(recorded"):
        kernel_matrix(make(1.5), p, x, out=out, progress=False)

    class Settings:
        scale = 1.0

    settings = Settings()

    def g(params, x):
        return torch.tanh(x @ params["w"]) * settings.scale

    kernel_matrix(g, p, x, out=out, resume=False, progress=False)
    settings.scale = 1.5
    with pytest.raises(ValueError, match=r"computed with different f \(its outputs or gradients on the probe samples of x1 and x2"):
        kernel_matrix(g, p, x, out=out, progress=False)


def test_probes_tolerate_round_off_only():
    x = torch.randn(8, 4, dtype=torch.float32)
    p = {"w": torch.randn(4, 3)}
    from ntkfunc._core.problem import make_problem
    from ntkfunc._dataset.data import Samples
    from ntkfunc._dataset.fingerprint import probe_fingerprint

    def probe(f):
        return probe_fingerprint(make_problem(f, x[:1], None, p, 0, (), ()), Samples(x, "x1"))

    base = probe(lambda q, x: x @ q["w"])
    assert probes_match(base, probe(lambda q, x: (x @ q["w"]) * (1 + 1e-6)))  # another thread count, device
    assert not probes_match(base, probe(lambda q, x: (x @ q["w"]) * (1 + 1e-3)))
    assert not probes_match(base, probe(lambda q, x: x @ q["w"].detach() + 0 * q["w"].sum()))  # same outputs, no gradient
    assert differences({"x1": "a", "probe": base}, {"x1": "a", "probe": base}) == []


class _Items(Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], 0


def test_every_item_of_a_small_dataset_is_compared(tmp_path):
    """Regression: only 64 spread items of a Dataset were hashed, so a changed item 5 of 200 was resumed."""
    torch.manual_seed(0)
    f, params = ntkfunc.from_module(_model(torch.nn.Tanh()))
    x = torch.randn(200, 4, dtype=torch.float64)
    out = str(tmp_path / "K.npy")
    kernel_matrix(f, params, _Items(x), x[:3], out=out, progress=False)
    changed = x.clone()
    changed[5] += 1.0
    with pytest.raises(ValueError, match=r"computed with different x1 \(recorded"):
        kernel_matrix(f, params, _Items(changed), x[:3], out=out, progress=False)


def _write_digits(path, x):
    np.save(path, x.numpy())


def test_cli_model_and_files_are_compared(tmp_path, capsys):
    """Regression: --model a:cnn_relu then a:cnn_tanh on one --out resumed; so did a changed test image."""
    from ntkfunc.datasets import load_digits

    x, _ = load_digits()
    train, test = tmp_path / "train.npy", tmp_path / "test.npy"
    _write_digits(train, x[:12])
    _write_digits(test, x[100:104])
    out = tmp_path / "K.npy"
    argv = ["compute", "--data", str(train), "--test", str(test), "--out", str(out), "--no-progress"]
    assert cli.main(argv + ["--model", "tests.test_fingerprint:cnn_relu"]) == 0
    assert cli.main(argv + ["--model", "tests.test_fingerprint:cnn_tanh"]) == 1
    assert "computed with different module.structure" in capsys.readouterr().err
    changed = x[100:104].clone()
    changed[2, 0, 3, 3] += 0.5  # one pixel of one test image
    _write_digits(test, changed)
    assert cli.main(argv + ["--model", "tests.test_fingerprint:cnn_relu"]) == 1
    assert "computed with different x1" in capsys.readouterr().err
    assert cli.main(argv + ["--model", "tests.test_fingerprint:cnn_relu", "--no-resume"]) == 0
    torch.manual_seed(0)
    f, params = ntkfunc.from_module(cnn_relu().eval())
    expected = kernel_matrix(f, params, torch.cat([x[:12], changed]), x[:12], progress=False)
    np.testing.assert_allclose(np.load(out), expected.numpy(), rtol=1e-5, atol=1e-6)


SCALE = 2.0
_LIBRARY = torch.nn.functional.linear  # a library function: not followed


def _helper(x):
    return x * SCALE


class _Scaled:
    def __init__(self, s):
        self.s = s

    def __call__(self, p, x):
        return _helper(x @ p["w"]) * self.s

    def apply(self, p, x):
        return x @ p["w"] * self.s


def test_what_a_hand_written_f_captures():
    """Closure cells, the globals it reads (and those of the functions of its module it calls), defaults, a partial's
    arguments, a bound method's and a callable object's attributes; imports and library functions are not data."""
    import functools
    import math as _math

    from ntkfunc._dataset.fingerprint import captured

    table = torch.ones(3)
    model = torch.nn.Linear(2, 2)

    def f(p, x, offset=1.5):
        return _LIBRARY(torch.tanh(_helper(x) @ p["w"]) * table.sum() + offset + _math.pi, model.weight)

    got = captured(f)
    assert sorted(got) == ["_helper.SCALE", "defaults[0]", "model", "table"], got
    assert got["defaults[0]"] == "1.5" and got["_helper.SCALE"] == "2.0" and got["model"].startswith("module:")
    with torch.no_grad():
        model.weight[0, 0] += 1.0
    assert captured(f)["model"] != got["model"]  # its state, byte by byte
    assert sorted(captured(_Scaled(3.0))) == ["_helper.SCALE", "s"]
    assert captured(_Scaled(3.0).apply) == {"self.s": "3.0"}
    assert captured(functools.partial(lambda p, x, k: x * k, k=torch.zeros(2)))["k"].startswith("tensor:")
    assert captured(lambda p, x: x @ p["w"]) == {}
