"""The public surface is exactly what ntkfunc/__init__.py exports."""

import ntkfunc


def test_all_is_pinned():
    assert sorted(ntkfunc.__all__) == [
        "Explanation", "Implementation", "Sketch", "datasets", "explain", "features_fn", "from_module", "group_kernels",
        "kernel_fn", "kernel_matrix", "linalg", "linearize", "models", "monte_carlo_kernel_fn", "nngp_fn", "ntk_fn",
        "ntk_vp_fn", "pntk_fn", "predict", "rules", "sketched_ntk_fn", "taylor_expand", "testing",
    ]
    for name in ntkfunc.__all__:
        assert getattr(ntkfunc, name) is not None


def test_implementations_and_auto():
    assert [int(i) for i in ntkfunc.Implementation] == [0, 1, 2, 3]
    assert ntkfunc.Implementation.AUTO == 0
