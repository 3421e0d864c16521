"""``feature_matrix`` (issue 22): projected per-sample gradients of a dataset, in memory or in a resumable, checked features
file that ``kernel_matrix(sketch=, features=)`` reuses; against ``features_fn``, ``kernel_matrix`` and the float64 reference."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ntkfunc
from ntkfunc._dataset import features as featuring
from tests.reference import max_rel_err, reference_kernel

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second intra-op thread only contends


def _mlp(dtype=torch.float64, n=9, outputs=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, outputs)).to(dtype)  # P = 80 + 17 outputs
    f, params = ntkfunc.from_module(model)
    return f, params, torch.randn(n, 4, dtype=dtype)


def _cnn(dtype=torch.float32, n=7):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).to(dtype)
    f, params = ntkfunc.from_module(model)
    return f, params, torch.randn(n, 2, 6, 6, dtype=dtype)


def _counting(monkeypatch):
    """The chunks computed from now on (``Chunks.compute``: one gradient pass per chunk, reused files compute none)."""
    calls: list[int] = []
    real = featuring.Chunks.compute

    def compute(self, engine, cs, dev):
        calls.extend(cs)
        return real(self, engine, cs, dev)

    monkeypatch.setattr(featuring.Chunks, "compute", compute)
    return calls


@pytest.mark.parametrize("model", ["mlp64", "cnn32"])
@pytest.mark.parametrize("kind", ["countsketch", "gaussian", "auto"])
def test_features_are_features_fn_and_their_kernel_is_kernel_matrix(model, kind, tmp_path):
    f, params, x = _mlp() if model == "mlp64" else _cnn()
    sketch = ntkfunc.Sketch(48, seed=5, kind=kind)
    mem = ntkfunc.feature_matrix(f, params, x, sketch, progress=False)
    assert mem.path is None and mem.tensor.shape == (len(x), 3, 48) and mem.tensor.dtype == x.dtype
    tol = dict(rtol=1e-10, atol=1e-12) if x.dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mem.tensor, ntkfunc.features_fn(f, sketch)(x, params), **tol)
    # the kernel of the features, scaled as documented, is kernel_matrix's sketched kernel (in memory)
    torch.testing.assert_close(mem.kernel(), ntkfunc.kernel_matrix(f, params, x, sketch=sketch, progress=False), **tol)
    full = torch.einsum("nok,mpk->nmop", mem.tensor, mem.tensor)
    torch.testing.assert_close(full, ntkfunc.kernel_matrix(f, params, x, sketch=sketch, trace_axes=(), progress=False), **tol)
    # written to a file: the same numbers, a complete .npy any numpy opens, the resolved plan recorded
    disk = ntkfunc.feature_matrix(f, params, x, sketch, out=tmp_path, progress=False)
    assert disk.path is not None and disk.path.parent == tmp_path and disk.path.name.startswith("features-")
    torch.testing.assert_close(torch.from_numpy(np.load(disk.path)), mem.tensor, rtol=0, atol=0)
    torch.testing.assert_close(disk.tensor, mem.tensor, rtol=0, atol=0)
    manifest = json.loads(Path(str(disk.path) + ".manifest.json").read_text())
    assert manifest["complete"] and manifest["content"] == "features" and manifest["fingerprint"]["sketch"] == disk.plan
    assert disk.plan["kind"] == kind and disk.dim == 48 and disk.outputs == 3


def test_exact_count_sketch_features_give_the_float64_reference_kernel(tmp_path):
    """dim >= P: the count sketch is orthogonal, so F Fᵀ is the eNTK itself (up to rounding), full and traced, and pNTK."""
    f, params, x = _mlp()
    sketch = ntkfunc.Sketch(256, seed=1, kind="countsketch")  # P = 131
    feats = ntkfunc.feature_matrix(f, params, x, sketch, out=tmp_path, progress=False)
    assert feats.plan["exact"]
    assert max_rel_err(feats.kernel(), reference_kernel(f, params, x, None)) < 1e-12
    full = torch.einsum("nok,mpk->nmop", feats.tensor, feats.tensor)
    assert max_rel_err(full, reference_kernel(f, params, x, None, trace_axes=())) < 1e-12
    pntk = ntkfunc.feature_matrix(f, params, x, sketch, pntk=True, out=tmp_path, progress=False)
    assert pntk.tensor.shape == (len(x), 1, 256) and pntk.path != feats.path
    logits = lambda p, xx: f(p, xx).sum(-1, keepdim=True) / 3**0.5  # noqa: E731 - the sum of logits / sqrt(O)
    assert max_rel_err(pntk.tensor[:, 0] @ pntk.tensor[:, 0].T, reference_kernel(logits, params, x, None)) < 1e-12


def test_pytree_inputs_with_a_leaf_batched_on_axis_1(tmp_path):
    """A dict input whose sequence leaf has its samples on axis 1 (``vmap_axes``): exact count-sketch features give the
    float64 reference kernel; the file is found again only with the same axes."""
    f0, params, _ = _mlp()
    gen = torch.Generator().manual_seed(3)
    inputs = {"seq": torch.randn(5, 9, 4, dtype=torch.float64, generator=gen), "scale": torch.rand(9, dtype=torch.float64, generator=gen)}

    def f(p, inp):  # (T, N, 4) and (N,) -> (N, 3)
        return f0(p, inp["seq"].mean(0) * inp["scale"][:, None])

    axes = ({"seq": 1, "scale": 0}, 0, {})
    sketch = ntkfunc.Sketch(256, seed=1, kind="countsketch")
    feats = ntkfunc.feature_matrix(f, params, inputs, sketch, out=tmp_path, vmap_axes=axes, progress=False)
    assert feats.tensor.shape == (9, 3, 256)
    assert max_rel_err(feats.kernel(), reference_kernel(f, params, inputs, None)) < 1e-12
    k = ntkfunc.kernel_matrix(f, params, inputs, sketch=sketch, features=tmp_path, vmap_axes=axes, progress=False)
    assert max_rel_err(k, feats.kernel()) < 1e-12
    assert len(list(Path(tmp_path).glob("features-*.npy"))) == 1  # kernel_matrix read the same file
    with pytest.raises(ValueError, match=r"feature_matrix\(vmap_axes=1\): the output's batch axis is 1; expected 0"):
        ntkfunc.feature_matrix(f, params, inputs, sketch, vmap_axes=1, progress=False)
    with pytest.raises(ValueError, match=r"feature_matrix\(vmap_axes=None\): feature_matrix cuts the data into blocks"):
        ntkfunc.feature_matrix(f, params, inputs, sketch, vmap_axes=None, progress=False)
    with pytest.raises(ValueError, match=r"feature_matrix: the leaves of x hold different numbers of samples"):
        ntkfunc.feature_matrix(f, params, inputs, sketch, progress=False)  # axis 0 everywhere: 5 sequences, 9 scales


def test_a_hand_written_f_with_one_output_per_sample(tmp_path, monkeypatch):
    """``f(params, x) -> (N,)`` with dict params: features ``(N, dim)``, ``F Fᵀ`` the reference kernel (exact count sketch),
    and the file reused by kernel_matrix(trace_axes=()) (the only kernel of a 1-D output)."""
    torch.manual_seed(0)
    params = {"w": torch.randn(4, 3, dtype=torch.float64), "v": torch.randn(3, dtype=torch.float64)}

    def f(p, x):
        return torch.tanh(x @ p["w"]) @ p["v"]

    x = torch.randn(6, 4, dtype=torch.float64)
    sketch = ntkfunc.Sketch(64, kind="countsketch")
    feats = ntkfunc.feature_matrix(f, params, x, sketch, out=tmp_path, progress=False)
    assert feats.tensor.shape == (6, 64) and feats.outputs == 1 and feats.plan["exact"]
    assert max_rel_err(feats.kernel(), reference_kernel(f, params, x, None, trace_axes=())) < 1e-12
    calls = _counting(monkeypatch)
    k = ntkfunc.kernel_matrix(f, params, x, trace_axes=(), sketch=sketch, features=tmp_path, progress=False)
    assert calls == [] and max_rel_err(k, feats.kernel()) < 1e-12


def test_half_precision_features_keep_their_dtype(tmp_path):
    """Nothing is upcast: bfloat16 features in memory, float16 in a file; a bfloat16 file (no .npy dtype) is refused first."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    for dtype in (torch.bfloat16, torch.float16):
        f, params = ntkfunc.from_module(model.to(dtype))
        x = torch.randn(5, 4, dtype=dtype)
        expected = ntkfunc.features_fn(f, ntkfunc.Sketch(16))(x, params)
        mem = ntkfunc.feature_matrix(f, params, x, ntkfunc.Sketch(16), progress=False)
        assert mem.tensor.dtype == dtype and torch.equal(mem.tensor, expected)
        if dtype == torch.bfloat16:
            with pytest.raises(TypeError, match=r"^feature_matrix\(out=...\): features of dtype torch.bfloat16 cannot be stored"):
                ntkfunc.feature_matrix(f, params, x, ntkfunc.Sketch(16), out=tmp_path / "bf16", progress=False)
            assert not (tmp_path / "bf16").exists() or not list((tmp_path / "bf16").glob("*.npy*"))
        else:
            disk = ntkfunc.feature_matrix(f, params, x, ntkfunc.Sketch(16), out=tmp_path / "f16", progress=False)
            assert disk.tensor.dtype == dtype and torch.equal(disk.tensor, expected)


@pytest.mark.parametrize("seed", [0, 1])
def test_gaussian_features_with_large_dim_estimate_the_float64_reference_kernel(seed):
    """F Fᵀ / O of a Gaussian sketch is unbiased with relative error ~ sqrt(2 / dim): within 10% at dim 4096."""
    f, params, x = _mlp(torch.float32)
    feats = ntkfunc.feature_matrix(f, params, x, ntkfunc.Sketch(4096, seed=seed, kind="gaussian"), progress=False)
    exact = reference_kernel(f, params, x.double(), None)
    err = (feats.kernel().double() - exact).norm() / exact.norm()
    assert 0 < err < 0.1, err


def test_a_killed_run_resumes_at_its_first_missing_chunk(tmp_path, monkeypatch):
    f, params, x = _cnn(n=18)
    sketch = ntkfunc.Sketch(32, seed=2)
    monkeypatch.setattr(featuring, "CHUNK_SAMPLES", 4)  # 5 chunks
    real, written = featuring.Chunks.writes, []

    def killed_after_two(self, c, block):
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        written.append(c)
        return real(self, c, block)

    monkeypatch.setattr(featuring.Chunks, "writes", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        ntkfunc.feature_matrix(f, params, x, sketch, out=tmp_path, progress=False)
    (partial,) = tmp_path.glob("features-*.npy.partial")  # not features-<key>.npy: an unfinished file is never loaded
    assert not list(tmp_path.glob("features-*.npy"))
    monkeypatch.setattr(featuring.Chunks, "writes", real)
    calls = _counting(monkeypatch)
    feats = ntkfunc.feature_matrix(f, params, x, sketch, out=tmp_path, progress=False)
    assert sorted(calls) == [2, 3, 4] and str(feats.path) + ".partial" == str(partial)
    torch.testing.assert_close(feats.tensor, ntkfunc.features_fn(f, sketch)(x, params), rtol=1e-5, atol=1e-6)
    calls.clear()
    again = ntkfunc.feature_matrix(f, params, x, sketch, out=tmp_path, progress=False)  # complete: reused
    assert calls == [] and again.path == feats.path


def test_kernel_matrix_reuses_the_files_and_feature_matrix_reuses_kernel_matrix_s(tmp_path, monkeypatch):
    f, params, x = _cnn(n=12)
    train, test = x[:8], x[8:]
    sketch = ntkfunc.Sketch(32, seed=4)
    a = ntkfunc.feature_matrix(f, params, train, sketch, out=tmp_path / "feats", progress=False)
    b = ntkfunc.feature_matrix(f, params, test, sketch, out=tmp_path / "feats", progress=False)
    files = [p for p in (tmp_path / "feats").rglob("*") if p.is_file() and p.suffix != ".lock"]
    stamps = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files if p.suffix != ".json"}  # data and chunk markers
    manifests = {p: p.read_text() for p in files if p.suffix == ".json"}  # rewritten as complete: the same text
    calls = _counting(monkeypatch)
    k = ntkfunc.kernel_matrix(f, params, test, train, sketch=sketch, features=tmp_path / "feats", progress=False)
    k_train = ntkfunc.kernel_matrix(f, params, train, sketch=sketch, out=tmp_path / "K.npy", features=tmp_path / "feats",
                                    progress=False)
    assert calls == []  # no chunk computed again: both sides read from the files feature_matrix wrote
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in stamps} == stamps  # nor written again
    assert {p: p.read_text() for p in manifests} == manifests and len(stamps) == 2 + 2 * 1
    torch.testing.assert_close(k, b.kernel(a), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k_train, a.kernel(), rtol=1e-5, atol=1e-6)
    # the other way round: the features kernel_matrix wrote (by default next to out) are found by feature_matrix
    ntkfunc.kernel_matrix(f, params, test, sketch=sketch, out=tmp_path / "K2.npy", progress=False)
    calls.clear()
    c = ntkfunc.feature_matrix(f, params, test, sketch, out=tmp_path / "K2.npy.features", progress=False)
    assert calls == [] and c.path is not None and c.path.parent == tmp_path / "K2.npy.features"
    torch.testing.assert_close(c.tensor, b.tensor, rtol=0, atol=0)
    # pNTK features are found by kernel_matrix(pntk=True), whatever its output axes
    p = ntkfunc.feature_matrix(f, params, train, sketch, pntk=True, out=tmp_path / "feats", progress=False)
    calls.clear()
    k_pntk = ntkfunc.kernel_matrix(f, params, train, sketch=sketch, pntk=True, trace_axes=(), features=tmp_path / "feats",
                                   progress=False)
    assert calls == [] and k_pntk.shape == (8, 8, 1, 1)
    torch.testing.assert_close(k_pntk[..., 0, 0], p.tensor[:, 0] @ p.tensor[:, 0].T, rtol=1e-5, atol=1e-6)


def test_foreign_changed_and_damaged_files_are_refused_or_recomputed(tmp_path, monkeypatch):
    f, params, x = _cnn(n=10)
    sketch = ntkfunc.Sketch(16, seed=0)
    monkeypatch.setattr(featuring, "CHUNK_SAMPLES", 4)
    feats = ntkfunc.feature_matrix(f, params, x, sketch, out=tmp_path, progress=False)
    path = feats.path
    assert path is not None
    # a damaged chunk: computed again, with a warning naming it
    mm = np.load(path, mmap_mode="r+")
    mm[5] += 1.0
    mm.flush()
    del mm
    calls = _counting(monkeypatch)
    with pytest.warns(RuntimeWarning, match=r"^feature_matrix\(out='.*'\): 1 committed chunk\(s\) \['1'\] of features-.*\.npy do not match"):
        again = ntkfunc.feature_matrix(f, params, x, sketch, out=tmp_path, progress=False)
    assert calls == [1]
    expected = ntkfunc.features_fn(f, sketch)(x, params)
    torch.testing.assert_close(again.tensor, expected, rtol=1e-5, atol=1e-6)
    # a manifest that says another dataset computed the file: refused, naming what changed (the manifest's checksum redone)
    from ntkfunc._dataset.fileformat import FEATURES, OutputFiles, write_manifest

    mpath = Path(str(path) + ".manifest.json")
    man = json.loads(mpath.read_text())
    man["fingerprint"]["data"] = "0" * 64
    write_manifest(OutputFiles(path, FEATURES), {k: v for k, v in man.items() if k != "checksum"})
    with pytest.raises(ValueError, match=r"^feature_matrix\(out='.*', resume=True\): the existing features file features-.*\.npy "
                                         r"was computed with different data .*pass another out= folder"):
        ntkfunc.feature_matrix(f, params, x, sketch, out=tmp_path, progress=False)
    # an array of the user's at the file's path (no manifest): left as it is unless overwrite=True
    mpath.unlink()
    np.save(path, np.zeros(3))
    with pytest.raises(ValueError, match=r"^feature_matrix\(out='.*'\): .*features-.*\.npy exists and is not a features file "
                                         r"written by feature_matrix .*pass overwrite=True \(ntkfunc features --overwrite\)"):
        ntkfunc.feature_matrix(f, params, x, sketch, out=tmp_path, progress=False)
    assert np.load(path).shape == (3,)
    replaced = ntkfunc.feature_matrix(f, params, x, sketch, out=tmp_path, overwrite=True, progress=False)
    torch.testing.assert_close(replaced.tensor, expected, rtol=1e-5, atol=1e-6)


def test_verify_checks_every_chunk_of_a_features_file_and_load_kernel_refuses_one(tmp_path, monkeypatch, capsys):
    from ntkfunc import _cli as cli

    f, params, x = _cnn(n=10)
    monkeypatch.setattr(featuring, "CHUNK_SAMPLES", 4)
    feats = ntkfunc.feature_matrix(f, params, x, ntkfunc.Sketch(16), out=tmp_path, verify=True, progress=False)
    path = feats.path
    assert path is not None
    assert str(ntkfunc.verify_kernel(path)).split(": ", 1)[1] == "complete float32[10, 3, 16] features file, 3 chunks, entries match their checksums"
    assert cli.main(["verify", str(path)]) == 0 and "features file, 3 chunks" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"^load_kernel\('.*'\): features-.*\.npy\.manifest\.json describes a features file; expected a kernel"):
        ntkfunc.load_kernel(path)
    mm = np.load(path, mmap_mode="r+")
    mm[9] += 1.0
    mm.flush()
    del mm
    with pytest.raises(ValueError, match=r"^verify_kernel\('.*'\): the entries of 1 chunks \(\['2'\]\) do not match the checksums"):
        ntkfunc.verify_kernel(path)
    Path(str(path) + ".chunks", "1").unlink()
    with pytest.raises(ValueError, match=r"1 of 3 chunks have no valid marker in features-.*\.npy\.chunks/ \(\['1'\]\)"):
        ntkfunc.verify_kernel(path, data=False)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(sketch=8), TypeError, r"^feature_matrix\(sketch=8\): expected ntkfunc.Sketch\(dim, seed=0, kind='auto'\)"),
    (dict(implementation=2), ValueError, r"^feature_matrix\(sketch=..., implementation=2\): implementation 2 .* has no per-sample"),
    (dict(out="F.npy"), ValueError, r"^feature_matrix\(out='F.npy'\): expected a folder, not a .npy path"),
    (dict(out=3), TypeError, r"^feature_matrix\(out=3\): expected None \(memory\) or the path of a folder"),
    (dict(pntk=1), TypeError, r"^feature_matrix\(pntk=1\)"),
    (dict(verify=True), ValueError, r"^feature_matrix\(verify=True, out=None\): verify reads the features file back; expected out='DIR'"),
    (dict(memory_budget=20_000), MemoryError, r"^feature_matrix: the features \(9, 3, 4096\) of x need .* pass out='DIR'"),
])
def test_bad_arguments_are_refused_before_anything_runs(kwargs, error, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f, params, x = _mlp()
    args = dict(sketch=ntkfunc.Sketch(4096), progress=False) | kwargs
    with pytest.raises(error, match=match):
        ntkfunc.feature_matrix(f, params, x, **args)
    assert not os.listdir(tmp_path)


def test_out_that_is_a_file_is_refused(tmp_path):
    f, params, x = _mlp()
    (tmp_path / "notes").write_text("mine")
    with pytest.raises(ValueError, match=r"^feature_matrix\(out='.*notes'\): .*notes is a file; expected a folder"):
        ntkfunc.feature_matrix(f, params, x, ntkfunc.Sketch(8), out=tmp_path / "notes", progress=False)
    assert (tmp_path / "notes").read_text() == "mine"


# --- ntkfunc features ------------------------------------------------------------------------


def _tiny_mlp(dtype=torch.float32):
    """``--model tests.test_cli:tiny_mlp`` as the CLI builds it (seed 0)."""
    from tests.test_cli import tiny_mlp

    torch.manual_seed(0)
    return ntkfunc.from_module(tiny_mlp().to(dtype).eval())


def test_cli_features_writes_the_files_compute_reuses(tmp_path, capsys, monkeypatch):
    from ntkfunc import _cli as cli

    rng = np.random.default_rng(0)
    train, test = rng.standard_normal((12, 6)).astype(np.float32), rng.standard_normal((5, 6)).astype(np.float32)
    np.save(tmp_path / "train.npy", train)
    np.save(tmp_path / "test.npy", test)
    data = ["--model", "tests.test_cli:tiny_mlp", "--data", str(tmp_path / "train.npy"), "--test", str(tmp_path / "test.npy")]
    sketch = ["--sketch-dim", "16", "--sketch-seed", "3"]
    feats = tmp_path / "feats"
    assert cli.main(["features", *data, *sketch, "--out", str(feats), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "rows: (17, 3, 16) float32" in out and "columns: (12, 3, 16) float32" in out, out
    assert len(list(feats.glob("features-*.npy"))) == 2
    f, params = _tiny_mlp()
    rows = torch.from_numpy(np.concatenate([train, test]))
    expected = ntkfunc.feature_matrix(f, params, torch.from_numpy(train), ntkfunc.Sketch(16, seed=3), progress=False)
    (columns,) = [p for p in feats.glob("features-*.npy") if np.load(p).shape[0] == 12]
    torch.testing.assert_close(torch.from_numpy(np.load(columns)), expected.tensor, rtol=1e-5, atol=1e-6)
    # ntkfunc compute with the same arguments and --features reads them: no chunk computed
    calls = _counting(monkeypatch)
    k = tmp_path / "K.npy"
    assert cli.main(["compute", *data, *sketch, "--features", str(feats), "--out", str(k), "--no-progress"]) == 0
    assert calls == []
    k_expected = ntkfunc.kernel_matrix(f, params, rows, torch.from_numpy(train), sketch=ntkfunc.Sketch(16, seed=3), progress=False)
    np.testing.assert_allclose(np.load(k), k_expected.numpy(), rtol=1e-5, atol=1e-6)
    # run again: both files reused
    capsys.readouterr()
    calls.clear()
    assert cli.main(["features", *data, *sketch, "--out", str(feats), "--no-progress"]) == 0 and calls == []


@pytest.mark.parametrize("case", ["no --sketch-dim", "bad kind", "--out a file", "--out .npy", "--out inside --data", "bad budget"])
def test_cli_features_bad_arguments_are_one_line_status_2_writing_nothing(case, tmp_path, capsys, monkeypatch):
    from ntkfunc import _cli as cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    np.save(tmp_path / "data" / "a.npy", np.zeros(6, np.float32))
    (tmp_path / "notes").write_text("mine")
    model = ["--model", "tests.test_cli:tiny_mlp", "--data", "data"]
    argv, message = {
        "no --sketch-dim": ([*model], r"the following arguments are required: --sketch-dim"),
        "bad kind": ([*model, "--sketch-dim", "8", "--sketch-kind", "srht"], r"--sketch-kind: expected 'auto' or one of"),
        "--out a file": ([*model, "--sketch-dim", "8", "--out", "notes"], r"--out notes: is a file; expected a folder"),
        "--out .npy": ([*model, "--sketch-dim", "8", "--out", "F.npy"], r"--out F.npy: expected a folder .*not a .npy path"),
        "--out inside --data": ([*model, "--sketch-dim", "8", "--out", "data/feats"], r"--out data/feats: is inside the --data folder"),
        "bad budget": ([*model, "--sketch-dim", "8", "--memory-budget", "lots"], r"--memory-budget: "),
    }[case]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert cli.main(["features", *argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ntkfunc features: error: ") and err.count("\n") == 1, err
    assert __import__("re").search(message, err), err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_cli_features_refused_run_is_one_line_status_1(tmp_path, capsys):
    from ntkfunc import _cli as cli

    np.save(tmp_path / "train.npy", np.zeros((5, 6), np.float32))
    argv = ["features", "--model", "tests.test_cli:tiny_mlp", "--data", str(tmp_path / "train.npy"), "--sketch-dim", "8",
            "--out", str(tmp_path / "feats"), "--no-progress"]
    assert cli.main(argv) == 0
    (path,) = (tmp_path / "feats").glob("features-*.npy")
    Path(str(path) + ".manifest.json").unlink()  # the file is now an array no manifest describes
    capsys.readouterr()
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists and is not a features file" in err and "ntkfunc features --overwrite" in err, err
    assert cli.main([*argv, "--overwrite"]) == 0

