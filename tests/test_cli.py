"""``ntkfunc compute``: files, built-in ranges, kernels, weights; bad arguments exit 2 writing nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ntkfunc
from ntkfunc import _cli as cli
from ntkfunc import kernel_matrix
from ntkfunc.datasets import load_digits
from ntkfunc.models import small_cnn

ROOT = Path(__file__).resolve().parents[1]


def tiny_mlp() -> torch.nn.Module:
    """A factory for ``--model tests.test_cli:tiny_mlp`` (inputs of 6 features, 3 outputs)."""
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def not_a_module():
    return 3


def _expected(factory, x1, x2=None, seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    f, params = ntkfunc.from_module(factory().to(dtype).eval())
    return kernel_matrix(f, params, x1, x2, progress=False, **kw)


def test_compute_on_npy_file_with_ranges_and_test_split(tmp_path, capsys):
    rng = np.random.default_rng(0)
    train, test = rng.standard_normal((12, 6)).astype(np.float32), rng.standard_normal((5, 6)).astype(np.float32)
    np.save(tmp_path / "train.npy", train)
    torch.save({"x": torch.from_numpy(test)}, tmp_path / "test.pt")
    out = tmp_path / "K.npy"
    argv = ["compute", "--model", "tests.test_cli:tiny_mlp", "--data", str(tmp_path / "train.npy"), "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    assert "12 x 12" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(out), _expected(tiny_mlp, torch.from_numpy(train)).numpy(), rtol=1e-5, atol=1e-6)
    argv += ["--test", str(tmp_path / "test.pt"), "--range", "2_10_1_4", "--kernel", "full", "--batch-size", "3", "--no-resume"]
    assert cli.main(argv) == 0
    x1 = torch.from_numpy(np.concatenate([train[2:10], test[1:4]]))
    expected = _expected(tiny_mlp, x1, torch.from_numpy(train[2:10]), trace_axes=())
    assert np.load(out).shape == (11, 8, 3, 3)
    np.testing.assert_allclose(np.load(out), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_builtin_digits_ranges_like_empirical_ntks(tmp_path):
    out = tmp_path / "K.npy"
    assert cli.main(["compute", "--data", "digits_0_30_0_10", "--kernel", "pntk", "--out", str(out), "--no-progress"]) == 0
    x, _ = load_digits()
    expected = _expected(small_cnn, torch.cat([x[:30], x[1297:1307]]), x[:30], pntk=True)
    assert np.load(out).shape == (40, 30)
    np.testing.assert_allclose(np.load(out), expected.numpy(), rtol=1e-4, atol=1e-6)


def test_weights_and_float64_and_folder_data(tmp_path):
    torch.manual_seed(5)
    model = tiny_mlp().double()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    folder = tmp_path / "samples" / "class0"
    folder.mkdir(parents=True)
    x = torch.randn(7, 6, dtype=torch.float64)
    for i in range(7):
        np.save(folder / f"{i:03d}.npy", x[i].numpy())
    out = tmp_path / "K.npy"
    argv = ["compute", "--model", "tests.test_cli:tiny_mlp", "--weights", str(tmp_path / "w.pt"), "--dtype", "float64",
            "--data", str(tmp_path / "samples"), "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    f, params = ntkfunc.from_module(model.eval())
    np.testing.assert_allclose(np.load(out), ntkfunc.ntk_fn(f)(x, None, params).numpy(), rtol=1e-12)


def test_no_arguments_runs_the_embedded_default(tmp_path):
    res = subprocess.run([sys.executable, "-m", "ntkfunc", "compute"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert "small_cnn" in res.stdout and "300 x 200" in res.stdout
    k = np.load(tmp_path / "out" / "ntk.npy")
    assert k.shape == (300, 200) and np.isfinite(k).all()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--data", "cifar_0_10"], r"--data 'cifar_0_10': no such file or folder; expected one of the built-in datasets \(digits\)"),
        (["--data", "digits_0_5000"], r"sample range 0_5000: expected 0 <= a < b <= 1297"),
        (["--data", "digits_0_10_0_900"], r"sample range 0_900: expected 0 <= c < d <= 500"),
        (["--data", "digits", "--range", "5_2"], r"sample range 5_2: expected 0 <= a < b"),
        (["--data", "digits", "--range", "x"], r"--range 'x': expected a_b or a_b_c_d"),
        (["--model", "nomodule.sub:f"], r"--model 'nomodule.sub:f': cannot import nomodule.sub"),
        (["--model", "small_cnn"], r"--model 'small_cnn': expected package.module:factory"),
        (["--model", "tests.test_cli:not_a_module"], r"the factory returned a int; expected a torch.nn.Module"),
        (["--model", "tests.test_cli:tiny_mlp"], r"--model tests.test_cli:tiny_mlp fails on digits"),
        (["--weights", "missing.pt"], r"--weights missing.pt: "),
        (["--kernel", "diag"], r"argument --kernel: invalid choice: 'diag'"),
        (["--implementation", "9"], r"--implementation 9: expected 'auto' or one of \[0, 1, 2, 3\]"),
        (["--memory-budget", "lots"], r"--memory-budget: memory_budget='lots': expected a number of bytes"),
        (["--batch-size", "0"], r"--batch-size 0: expected a positive number"),
        (["--devices", "gpu:x"], r"--devices 'gpu:x': 'gpu:x' is not a device"),
        (["--out", "K.txt"], r"--out K.txt: expected a path ending in .npy"),
        (["--out", "."], r"--out \.: is a directory; expected the path of a \.npy file to write, e\.g\. ntk\.npy"),
        (["--frobnicate"], r"unrecognized arguments: --frobnicate"),
    ],
)
def test_bad_arguments_one_line_exit_2_nothing_written(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["compute", *args, "--out" if "--out" not in args else "--no-progress", *(["K.npy"] if "--out" not in args else [])])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("ntkfunc compute: error: ")
    import re

    assert re.search(message, err), err
    assert list(tmp_path.iterdir()) == []


def test_unknown_command_lists_compute(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "expected 'demo', 'compute', 'features' or 'verify'" in capsys.readouterr().err


@pytest.mark.parametrize("choice", ["auto", "AUTO", "0", "1", "2", "3"])
def test_every_implementation_offered_by_help_is_accepted(tmp_path, capsys, choice):
    """Regression: --help offered 'auto' but the CLI read its own list of implementations and refused it."""
    out = tmp_path / "K.npy"
    argv = ["compute", "--data", "digits_0_12_0_4", "--implementation", choice, "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    x, _ = load_digits()
    expected = _expected(small_cnn, torch.cat([x[:12], x[1297:1301]]), x[:12])
    np.testing.assert_allclose(np.load(out), expected.numpy(), rtol=1e-4, atol=1e-6)


def test_help_lists_the_registry_choices(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compute", "--help"])
    assert "'auto' or one of [0, 1, 2, 3]" in capsys.readouterr().out


def test_weights_that_are_not_a_state_dict_are_refused_in_one_line(tmp_path, capsys):
    """Regression: a pickled model passed as --weights gave a 20-line UnpicklingError traceback."""
    torch.save(tiny_mlp(), tmp_path / "model.pt")  # the whole module, not its state_dict
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    argv = ["compute", "--model", "tests.test_cli:tiny_mlp", "--out", str(tmp_path / "K.npy"), "--no-progress"]
    for name, message in [
        ("model.pt", r"--weights .*model.pt: not a state_dict saved with torch.save\(model.state_dict\(\), path\): it holds objects "
                     r"that torch.load\(weights_only=True\) does not run"),
        ("tensor.pt", r"--weights .*tensor.pt: holds a Tensor; expected a state_dict"),
    ]:
        assert cli.main(argv + ["--weights", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("ntkfunc compute: error: "), err
        import re

        assert re.search(message, err), err
    assert not (tmp_path / "K.npy.tiles").exists()


def test_a_full_disk_is_one_line_at_the_start(tmp_path, capsys, monkeypatch):
    import errno
    import os

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    assert cli.main(["compute", "--data", "digits_0_10", "--out", str(tmp_path / "K.npy"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no room for the kernel file K.npy.partial: it needs" in err


def test_verify_command(tmp_path, capsys):
    out = tmp_path / "K.npy"
    assert cli.main(["compute", "--data", "digits_0_10", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main(["verify", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith("K.npy: complete float32[10, 10] kernel, 1 tiles, entries match their checksums")
    values = np.load(out, mmap_mode="r+")
    values[3, 4] += 1
    values.flush()
    del values
    assert cli.main(["verify", "--quick", str(out)]) == 0  # structure only
    assert cli.main(["verify", str(out), str(tmp_path / "missing.npy")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert "do not match the checksums" in err[0] and "no kernel there" in err[1]


def test_top_level_help_lists_the_verbs(capsys):
    """Regression: ntkfunc --help answered "unknown command '--help'"."""
    for flag in ("--help", "-h"):
        assert cli.main([flag]) == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: ntkfunc [-h] {demo,compute,features,verify} ...")
        assert all(f"    {verb} " in out for verb in ("demo", "compute", "features", "verify"))


class _Payload:
    """A pickle whose loading would create a file: torch.load(weights_only=True) must not run it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("case", ["weights of another model", "a device this machine lacks", "a pickle in a data folder",
                                  "--features that is a file", "--features without --sketch-dim", "--out inside the data folder"])
def test_more_bad_arguments_one_line_exit_2_nothing_written(case, tmp_path, monkeypatch, capsys):
    """Regression: tracebacks of 18, 29 and 37 lines; "[Errno 17] File exists"; --features silently ignored."""
    import pickle
    import re

    monkeypatch.chdir(tmp_path)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    torch.save(tiny_mlp().state_dict(), inputs / "w.pt")
    (inputs / "notes").write_text("a file")
    folder = inputs / "samples"
    folder.mkdir()
    with open(folder / "000.pt", "wb") as fh:
        pickle.dump(_Payload(tmp_path / "payload-ran"), fh)
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    args, message = {
        "weights of another model": (["--weights", "inputs/w.pt"], r"--weights inputs/w.pt: not the weights of --model "
                                     r"ntkfunc.models:small_cnn \(Error\(s\) in loading state_dict for Sequential: Missing key\(s\)"),
        "a device this machine lacks": (["--device", f"cuda:{devices}"], r"--device 'cuda:\d+': this machine has "),
        "a pickle in a data folder": (["--data", "inputs/samples"], r"--data: inputs/samples/000.pt: holds Python objects \(a pickle\) "
                                      r"that torch.load\(weights_only=True\) does not run; expected a .npy array or a .pt tensor"),
        "--features that is a file": (["--sketch-dim", "8", "--features", "inputs/notes"], r"--features inputs/notes: is a file; "
                                      r"expected a folder"),
        "--features without --sketch-dim": (["--features", "feats"], r"--features feats: is the folder of the sketch's features; "
                                            r"expected --sketch-dim with it"),
        "--out inside the data folder": (["--data", "inputs/samples", "--out", "inputs/samples/K.npy"], r"--out inputs/samples/K.npy: "
                                         r"is inside the --data folder inputs/samples, whose .npy files are the samples"),
    }[case]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    argv = ["compute", *args] + ([] if "--out" in args else ["--out", "K.npy"])
    assert cli.main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ntkfunc compute: error: "), err
    assert re.search(message, err), err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written, the payload did not run


def test_a_budget_that_leaves_nothing_is_one_line_and_writes_nothing(tmp_path, capsys):
    """Regression: --memory-budget 1 reported memory_budget=0 (the share ntk_fn got) and left K.npy.partial behind."""
    assert cli.main(["compute", "--data", "digits_0_10", "--memory-budget", "1", "--out", str(tmp_path / "K.npy"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "kernel_matrix(memory_budget='1'): 1 B leaves 0 B for the work" in err, err
    assert list(tmp_path.iterdir()) == []
