"""Bad input gets a clear error naming what was given and what was expected."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import ntkfunc
from tests.reference import max_rel_err, reference_kernel


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    return ntkfunc.from_module(model)


X = torch.randn(4, 3, dtype=torch.float64)


@pytest.mark.parametrize("impl", [-1, 4, "1", "fast", True])
def test_unknown_implementation(impl):
    f, _ = _mlp()
    with pytest.raises(ValueError, match=r"implementation=.*expected 'auto' or one of \[0, 1, 2, 3\]"):
        ntkfunc.ntk_fn(f, implementation=impl)


def test_mismatched_feature_shapes():
    f, params = _mlp()
    with pytest.raises(ValueError, match=r"mismatched feature shapes: \(4, 3\) vs \(2, 4\)"):
        ntkfunc.ntk_fn(f)(X, torch.randn(2, 4, dtype=torch.float64), params)


def test_mismatched_input_structures():
    f = lambda p, x: x["a"] @ p  # noqa: E731
    p = torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="different structures"):
        ntkfunc.ntk_fn(f)({"a": X}, {"b": X}, p)


def test_integer_output():
    f = lambda p, x: (x @ p).argmax(-1, keepdim=True)  # noqa: E731
    with pytest.raises(TypeError, match=r"dtype torch.int64.*expected floating-point outputs"):
        ntkfunc.ntk_fn(f)(X, None, torch.randn(3, 2, dtype=torch.float64))


@pytest.mark.parametrize("axes,kind", [((2,), "trace_axes"), ((-3,), "trace_axes"), ((5,), "diagonal_axes")])
def test_axis_out_of_range(axes, kind):
    f, params = _mlp()
    kw = {"trace_axes": (), "diagonal_axes": ()}
    kw[kind] = axes
    with pytest.raises(ValueError, match=rf"{kind}=.*out of range for an output of ndim 2; expected -2 <= axis < 2"):
        ntkfunc.ntk_fn(f, **kw)(X, None, params)


@pytest.mark.parametrize("trace,diag", [((-1,), (-1,)), ((1,), (-1,))])
def test_same_axis_in_trace_and_diagonal(trace, diag):
    f, params = _mlp()
    with pytest.raises(ValueError, match="in both; an axis is either traced"):
        ntkfunc.ntk_fn(f, trace_axes=trace, diagonal_axes=diag)(X, None, params)


def test_vmap_axes_missing_in_input():
    f, params = _mlp()
    with pytest.raises(ValueError, match=r"axis 3 does not exist in x1 of shape \(4, 3\)"):
        ntkfunc.ntk_fn(f, vmap_axes=3)(X, None, params)


def test_vmap_axes_structure_mismatch():
    f = lambda p, x: x["a"] @ p  # noqa: E731
    with pytest.raises(ValueError, match="does not match the structure of the inputs"):
        ntkfunc.ntk_fn(f, vmap_axes={"zzz": 0, "yyy": 0})({"a": X}, None, torch.randn(3, 2, dtype=torch.float64))


def test_batch_reducing_function_needs_vmap_axes_none():
    p = torch.randn(3, 2, dtype=torch.float64)

    def f(p, x):  # output has no batch axis: it sums over samples
        return (x @ p).sum(0)

    with pytest.raises(ValueError, match=r"batch axis|vmap_axes=None"):
        ntkfunc.ntk_fn(f)(X, None, p)
    k = ntkfunc.ntk_fn(f, vmap_axes=None, trace_axes=())(X, None, p)
    assert max_rel_err(k, reference_kernel(f, p, X, None, (), ())) <= 1e-12


def test_output_batch_size_disagrees_with_vmap_axes():
    p = torch.randn(3, 2, dtype=torch.float64)

    def f(p, x):
        return torch.cat([x @ p, x @ p])  # doubles the batch

    with pytest.raises(ValueError, match=r"size 2 along its batch axis 0; expected 1"):
        ntkfunc.ntk_fn(f)(X, None, p)


def test_inplace_mutation_of_params():
    def f(p, x):
        p["w"].mul_(2.0)
        return x @ p["w"]

    params = {"w": torch.randn(3, 2, dtype=torch.float64)}
    before = params["w"].clone()
    with pytest.raises(ValueError, match=r"f modified \['w'\] in place; expected a pure function"):
        ntkfunc.ntk_fn(f)(X, None, params)
    assert torch.equal(params["w"], before)  # the check runs on copies


def test_inplace_mutation_of_inputs():
    def f(p, x):
        x.add_(1.0)
        return x @ p

    with pytest.raises(ValueError, match=r"modified input leaf 0 in place"):
        ntkfunc.ntk_fn(f)(X.clone(), None, torch.randn(3, 2, dtype=torch.float64))


def test_unused_parameter_warns_and_contributes_zero():
    def f(p, x):
        return torch.tanh(x @ p["used"])

    params = {"used": torch.randn(3, 2, dtype=torch.float64), "unused": torch.randn(7, dtype=torch.float64)}
    for impl in (1, 2):
        with pytest.warns(UserWarning, match=r"does not depend on \['unused'\]; their kernel contribution is zero"):
            k = ntkfunc.ntk_fn(f, implementation=impl)(X, None, params)
        ref = reference_kernel(lambda p, x: torch.tanh(x @ p["used"]), {"used": params["used"]}, X, None)
        assert max_rel_err(k, ref) <= 1e-12


def test_output_independent_of_all_params():
    f = lambda p, x: x * 2.0  # noqa: E731
    with pytest.raises(ValueError, match="does not depend on any parameter"):
        ntkfunc.ntk_fn(f)(X, None, {"w": torch.ones(2, dtype=torch.float64)})


def test_non_tensor_param_leaf():
    f = lambda p, x: x @ p["w"]  # noqa: E731
    with pytest.raises(TypeError, match=r"params\['scale'\] is a float; expected every leaf of params to be a torch.Tensor"):
        ntkfunc.ntk_fn(f)(X, None, {"w": torch.ones(3, 2, dtype=torch.float64), "scale": 2.0})


@pytest.mark.parametrize("budget,match", [
    ("lots", "expected a number of bytes"), (-5, "expected a positive size"), ([1], "expected bytes"),
    (float("nan"), r"memory_budget=nan: expected a finite number of bytes"), (float("inf"), r"memory_budget=inf: expected a finite"),
])
def test_bad_memory_budget(budget, match):
    f, params = _mlp()
    with pytest.raises((ValueError, TypeError), match=match):
        ntkfunc.ntk_fn(f, memory_budget=budget)(X, None, params)


def test_budget_too_small_for_one_sample_says_what_to_do():
    f, params = _mlp()
    with pytest.raises(MemoryError, match=r"alone needs .* per sample .* raise memory_budget, or use implementation=2"):
        ntkfunc.ntk_fn(f, trace_axes=(), memory_budget=100)(X, torch.randn(3, 3, dtype=torch.float64), params)


def test_batch_axis_pairing_needs_equal_sizes():
    f, params = _mlp()
    with pytest.raises(ValueError, match=r"f\(x1\) has shape \(4, 2\) and f\(x2\) has shape \(2, 2\).*axis 0 differs \(4 vs 2\)"):
        ntkfunc.ntk_fn(f, trace_axes=(), diagonal_axes=(0,))(X, X[:2], params)


# --- from_module ------------------------------------------------------------------


def test_from_module_skips_frozen_params_and_keeps_buffers_constant():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double().eval()
    model[0].weight.requires_grad_(False)
    model[1].running_mean.add_(0.3)
    f, params = ntkfunc.from_module(model)
    assert sorted(params) == ["0.bias", "1.bias", "1.weight", "2.bias", "2.weight"]
    assert torch.allclose(f(params, X), model(X))
    mean_before = model[1].running_mean.clone()
    ntkfunc.ntk_fn(f)(X, None, params)
    assert torch.equal(model[1].running_mean, mean_before)


def test_from_module_refuses_train_mode_batchnorm_unless_vmap_axes_none():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double().train()
    with pytest.raises(ValueError, match=r"BatchNorm module\(s\) \['1'\] are in training mode .* vmap_axes=None"):
        ntkfunc.from_module(model)
    f, params = ntkfunc.from_module(model, vmap_axes=None)
    with pytest.raises(ValueError, match=r"ntk_fn\(vmap_axes=0\): BatchNorm .* pass vmap_axes=None"):
        ntkfunc.ntk_fn(f)
    stats = model[1].running_mean.clone()
    k = ntkfunc.ntk_fn(f, vmap_axes=None)(X, None, params)
    assert k.shape == (4, 4)
    assert torch.equal(model[1].running_mean, stats)  # the user's module is untouched
    assert model[1].track_running_stats


def test_from_module_refuses_train_mode_dropout():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"dropout module\(s\) \['1'\] are in training mode.*expected module.eval\(\)"):
        ntkfunc.from_module(model)
    ntkfunc.from_module(model.eval())


def test_from_module_rejects_non_module():
    with pytest.raises(TypeError, match="expected a torch.nn.Module, got function"):
        ntkfunc.from_module(lambda x: x)


def test_no_warning_on_clean_model():
    f, params = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ntkfunc.ntk_fn(f)(X, None, params)


# --- inputs that do not fit params, or no samples, or an axis that is not one ---------------


def test_inputs_of_another_dtype_than_params():
    """Regression: torch's raw 'mat1 and mat2 must have the same dtype' with no word on which input."""
    f, params = _mlp()  # float64
    x = X.float()
    expected = (r"f\(params, x\) failed \(mat1 and mat2 must have the same dtype.*\): x1 is torch.float32 and params are torch.float64; "
                r"expected inputs of the dtype of params \(e.g. x1.to\(torch.float64\)\)")
    with pytest.raises(TypeError, match="^ntk_fn: " + expected):
        ntkfunc.ntk_fn(f)(x, None, params)
    with pytest.raises(TypeError, match="^kernel_fn: " + expected):
        ntkfunc.kernel_fn(f)(x, None, "ntk", params)
    with pytest.raises(TypeError, match="^kernel_matrix: " + expected):
        ntkfunc.kernel_matrix(f, params, x, progress=False)


def test_inputs_on_another_device_than_params():
    """Regression: torch's raw 'Tensor on device cpu is not on the expected device meta!'."""
    f, params = _mlp()
    with pytest.raises(ValueError, match=r"^ntk_fn: f\(params, x\) failed \(.*\): x1 is on meta and params on cpu; expected inputs on the device of params"):
        ntkfunc.ntk_fn(f)(X.to("meta"), None, params)
    with pytest.raises(ValueError, match=r"^nngp_fn: f\(params, x\) failed .*x1 is on meta and params on cpu"):
        ntkfunc.nngp_fn(f)(X.to("meta"), None, params)


def test_no_samples_is_refused_clearly():
    """Regression: 'start (0) + length (1) exceeds dimension size (0)'."""
    f, params = _mlp()
    with pytest.raises(ValueError, match=r"^ntk_fn: x1 has no samples \(size 0 along its batch axis\); expected at least one sample"):
        ntkfunc.ntk_fn(f)(X[:0], None, params)
    with pytest.raises(ValueError, match=r"^ntk_fn: x2 has no samples"):
        ntkfunc.ntk_fn(f)(X, X[:0], params)
    with pytest.raises(ValueError, match=r"^kernel_fn: x1 has no samples"):
        ntkfunc.kernel_fn(f)(X[:0], None, "ntk", params)


@pytest.mark.parametrize("axes", ["0", 1.0, {"a": "0"}, (0, "0", {})])
def test_vmap_axes_that_are_not_axes(axes):
    """Regression: vmap_axes='0' failed inside with "'<=' not supported between instances of 'int' and 'str'"."""
    f, _ = _mlp()
    with pytest.raises(TypeError, match=r"^ntk_fn\(vmap_axes=.*\): .* is a (str|float); expected the batch axis as an int, None"):
        ntkfunc.ntk_fn(f, vmap_axes=axes)
    with pytest.raises(TypeError, match=r"^nngp_fn\(vmap_axes="):
        ntkfunc.nngp_fn(f, vmap_axes=axes)


def test_python_control_flow_under_vmap_says_vmap_axes_none_exists():
    """Regression: torch's vmap error did not say that vmap_axes=None computes the kernel without vmap."""
    f, params = _mlp()

    def g(p, x):
        return f(p, x) if x.sum() > 0 else -f(p, x)

    with pytest.raises(ValueError, match=r"^ntk_fn\(vmap_axes=0\): f uses a tensor's value in Python control flow .* "
                                         r"or pass vmap_axes=None to compute the kernel of the whole batch"):
        ntkfunc.ntk_fn(g)(X, None, params)
    with pytest.raises(ValueError, match=r"^kernel_matrix\(vmap_axes=0\): f uses a tensor's value .* ntk_fn\(f, vmap_axes=None\)"):
        ntkfunc.kernel_matrix(g, params, X, implementation=1, progress=False)
    k = ntkfunc.ntk_fn(g, vmap_axes=None, trace_axes=())(X, None, params)  # what the message offers works
    assert max_rel_err(k, reference_kernel(g, params, X, None, (), ())) <= 1e-12
