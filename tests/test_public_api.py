"""The public surface is exactly what ntkfunc/__init__.py exports."""

import ntkfunc


def test_all_is_pinned():
    assert sorted(ntkfunc.__all__) == [
        "Explanation", "Features", "Implementation", "Sketch", "datasets", "explain", "feature_matrix", "features_fn", "from_module", "group_kernels",
        "jacobian_fn", "kernel_fn", "kernel_matrix", "linalg", "linearize", "load_kernel", "models", "monte_carlo_kernel_fn", "nngp_fn", "ntk_fn",
        "ntk_vp_fn", "pntk_fn", "predict", "rules", "sketched_ntk_fn", "taylor_expand", "testing", "verify_kernel",
    ]
    for name in ntkfunc.__all__:
        assert getattr(ntkfunc, name) is not None


def test_implementations_and_auto():
    assert [int(i) for i in ntkfunc.Implementation] == [0, 1, 2, 3]
    assert ntkfunc.Implementation.AUTO == 0


def test_datasets_after_a_plain_import_ntkfunc():
    """ntkfunc.datasets.load_digits works after `import ntkfunc` alone (a fresh interpreter: nothing else imported it)."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    code = "import ntkfunc; x, y = ntkfunc.datasets.load_digits(); print(tuple(x.shape), int(y.max()))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root,
                         env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "(1797, 1, 8, 8) 9"
