"""No wrong kernel and no lost file (issue 24): foreign outputs, what a resume compares, non-finite tiles on resume,
markers that describe another tile, the results format, linear finishing, full disks, permissions, params with grad."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ntkfunc
from ntkfunc import kernel_matrix
from ntkfunc._dataset import fingerprint, runner
from ntkfunc._dataset.fileformat import OutputFiles, write_manifest
from tests.interrupt import stopped_after
from tests.reference import max_rel_err, reference_kernel

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second intra-op thread only contends


def _mlp(n=10, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    f, params = ntkfunc.from_module(model)
    return f, params, torch.randn(n, 4, dtype=torch.float64)


def _cli(*args, cwd, env_extra=None, preexec=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "ntkfunc", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=preexec)


# --- 2. a file at out that is not a kernel is never deleted -------------------------------------------------


def test_a_foreign_file_at_out_is_refused_and_kept(tmp_path):
    """Regression: kernel_matrix(out="results.npy") silently replaced an unrelated array, with the default resume=True too."""
    f, params, x = _mlp()
    out = tmp_path / "results.npy"
    mine = np.arange(12.0)
    np.save(out, mine)
    for resume in (True, False):
        with pytest.raises(ValueError, match=r"kernel_matrix\(out='.*results.npy'\): .*results.npy exists and is not a kernel file "
                                             r"written by kernel_matrix \(no results.npy.manifest.json describes it\), so it is left as "
                                             r"it is; .*pass overwrite=True \(ntkfunc compute --overwrite\) to replace it"):
            kernel_matrix(f, params, x, out=str(out), resume=resume, progress=False)
    assert np.array_equal(np.load(out), mine) and sorted(p.name for p in tmp_path.iterdir()) == ["results.npy"]  # nothing written
    k = kernel_matrix(f, params, x, out=str(out), overwrite=True, progress=False)
    assert max_rel_err(k, reference_kernel(f, params, x, None)) <= 1e-10
    assert torch.equal(kernel_matrix(f, params, x, out=str(out), progress=False), k)  # now ours: resumed, no overwrite needed


def test_a_foreign_features_file_is_refused_and_kept(tmp_path):
    f, params, x = _mlp()
    sketch = ntkfunc.Sketch(32)
    folder = tmp_path / "feats"
    kernel_matrix(f, params, x, sketch=sketch, features=folder, progress=False)
    (path,) = folder.glob("features-*.npy")
    Path(str(path) + ".manifest.json").unlink()  # no longer described: someone's file of that name
    with pytest.raises(ValueError, match=r"kernel_matrix\(features='.*feats'\): .*features-.*\.npy exists and is not a features file"):
        kernel_matrix(f, params, x, sketch=sketch, features=folder, progress=False)
    k = kernel_matrix(f, params, x, sketch=sketch, features=folder, overwrite=True, progress=False)
    torch.testing.assert_close(k, ntkfunc.sketched_ntk_fn(f, sketch)(x, None, params))


def test_cli_out_equal_to_the_data_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    """Regression: ntkfunc compute --data x.npy --out x.npy exited 0 and replaced the data set by the kernel."""
    from ntkfunc import _cli as cli

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    x = torch.rand(6, 1, 8, 8).numpy()
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "t.npy", x[:2])
    for args, flag in [(["--data", "x.npy", "--out", "x.npy"], "--data"), (["--data", "x.npy", "--out", "./x.npy"], "--data"),
                       (["--data", "x.npy", "--test", "t.npy", "--out", "t.npy"], "--test")]:
        assert cli.main(["compute", *args, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"is the {flag} file; expected another path for the kernel" in err, err
    assert np.array_equal(np.load(tmp_path / "x.npy"), x) and sorted(p.name for p in tmp_path.iterdir()) == ["t.npy", "x.npy"]
    assert cli.main(["compute", "--data", "x.npy", "--out", "t.npy", "--no-progress"]) == 1  # t.npy is not an input now
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "t.npy exists and is not a kernel file written by kernel_matrix" in err, err
    assert np.array_equal(np.load(tmp_path / "t.npy"), x[:2])
    assert cli.main(["compute", "--data", "x.npy", "--out", "t.npy", "--overwrite", "--no-progress"]) == 0
    assert np.load(tmp_path / "t.npy").shape == (6, 6)


# --- 3. what a resume compares ------------------------------------------------------------------------------


def test_a_changed_table_a_hand_written_f_captures_is_refused(tmp_path):
    """Regression: an embedding table captured by f changed at tokens that only samples other than x1's first, middle
    and last use: resumed, the old kernel returned (error 7.1 against max|K| 6.5)."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 10, (21, 3), generator=gen)
    tokens[[0, 10, 20]] = 0  # the three samples the old probe ran on use token 0 only
    p = {"w": torch.randn(4, 2, dtype=torch.float64, generator=gen)}
    out = str(tmp_path / "K.npy")

    def make(table):
        def f(params, x):
            return torch.tanh(table[x].mean(1) @ params["w"])

        return f

    table = torch.randn(10, 4, dtype=torch.float64, generator=gen)
    kernel_matrix(make(table), p, tokens, out=out, progress=False)
    changed = table.clone()
    changed[1:] *= 3.0
    with pytest.raises(ValueError, match=r"computed with different captured.table \(recorded in K.npy.manifest.json\)"):
        kernel_matrix(make(changed), p, tokens, out=out, progress=False)
    k = kernel_matrix(make(changed), p, tokens, out=out, resume=False, progress=False)
    assert max_rel_err(k, reference_kernel(make(changed), p, tokens, None)) <= 1e-10


TABLE = torch.randn(10, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _reads_a_global(params, x):
    return torch.tanh(TABLE[x].mean(1) @ params["w"])


def test_a_changed_global_a_hand_written_f_reads_is_refused(tmp_path, monkeypatch):
    tokens = torch.randint(1, 10, (8, 3), generator=torch.Generator().manual_seed(0))
    p = {"w": torch.randn(4, 2, dtype=torch.float64)}
    out = str(tmp_path / "K.npy")
    kernel_matrix(_reads_a_global, p, tokens, out=out, progress=False)
    monkeypatch.setattr(sys.modules[__name__], "TABLE", TABLE * 2)
    with pytest.raises(ValueError, match=r"computed with different captured.TABLE \(recorded"):
        kernel_matrix(_reads_a_global, p, tokens, out=out, progress=False)


class Clip(torch.nn.Module):
    """A hyper-parameter kept as a plain attribute: in neither repr nor state_dict."""

    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x):
        return x.clamp(-self.c, self.c)


def test_a_module_hyper_parameter_kept_as_an_attribute_is_compared(tmp_path):
    """Regression: Clip(3.0) -> Clip(1.0), a plain attribute, was resumed and the old kernel returned (12.2 against 43.9)."""
    x = torch.randn(9, 4, dtype=torch.float64) * 3
    out = str(tmp_path / "K.npy")

    def model(c):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), Clip(c), torch.nn.Linear(8, 2)).double()

    f3, p3 = ntkfunc.from_module(model(3.0))
    kernel_matrix(f3, p3, x, out=out, progress=False)
    f1, p1 = ntkfunc.from_module(model(1.0))
    assert all(torch.equal(p1[k], p3[k]) for k in p3)
    with pytest.raises(ValueError, match=r"computed with different module.attributes \(recorded in K.npy.manifest.json\)"):
        kernel_matrix(f1, p1, x, out=out, progress=False)
    k = kernel_matrix(f1, p1, x, out=out, resume=False, progress=False)
    assert max_rel_err(k, reference_kernel(f1, p1, x, None)) <= 1e-10


def test_the_probe_runs_on_spread_samples_of_x1_and_x2(tmp_path):
    """What f reads through another object is not captured: the probe of its outputs on spread samples of x1 and x2
    (first, middle and last of x1 only before) sees a change that only x2's samples (or x1's others) meet."""

    class Lookup:  # an object: its attributes are not among what a resume compares exactly
        def __init__(self, table):
            self.table = table

    lookup = Lookup(TABLE.clone())

    def f(params, x):
        return torch.tanh(lookup.table[x].mean(1) @ params["w"])

    x1 = torch.zeros(20, 3, dtype=torch.long)
    x1[4] = 3  # neither first, middle nor last
    x2 = torch.full((5, 3), 5, dtype=torch.long)
    x2[0] = 0
    p = {"w": torch.randn(4, 2, dtype=torch.float64)}
    out = str(tmp_path / "K.npy")
    for row in (3, 5):  # a token of x1[4] only; of x2[1:] only
        lookup.table = TABLE.clone()
        kernel_matrix(f, p, x1, x2, out=out, resume=False, progress=False)
        lookup.table[row] += 1.0
        with pytest.raises(ValueError, match=r"computed with different f \(its outputs or gradients on the probe samples of x1 and x2"):
            kernel_matrix(f, p, x1, x2, out=out, progress=False)
    picks = json.loads(Path(out + ".manifest.json").read_text())["fingerprint"]["probe"]["samples"]
    assert picks == {"x1": fingerprint.probe_samples(20), "x2": [0, 1, 2, 3, 4]} and len(picks["x1"]) == fingerprint.PROBE_SAMPLES


# --- 4. non-finite tiles committed by an earlier run --------------------------------------------------------


def test_nonfinite_tiles_committed_with_warn_are_raised_on_resume(tmp_path, monkeypatch):
    """Regression: a run with nonfinite="warn" committed NaNs; the same call with the default "raise" returned them."""
    f, params, x = _mlp()
    x[6, 0] = float("nan")
    out = str(tmp_path / "K.npy")
    with pytest.warns(RuntimeWarning, match=r"from x1 samples \[6\]"):
        kernel_matrix(f, params, x, out=out, batch_size=4, nonfinite="warn", progress=False)
    message = (r"kernel_matrix: 4 non-finite kernel entries in the tile x1\[0:4\] x x2\[4:8\] committed to K.npy by an earlier run, "
               r"from x1 samples \[0, 1, 2, 3\] and x2 samples \[6\]; expected finite values")
    with pytest.raises(FloatingPointError, match=message + r".* \(pass resume=False to compute the kernel again\)"):
        kernel_matrix(f, params, x, out=out, batch_size=4, progress=False)
    with pytest.raises(FloatingPointError, match=r"non-finite kernel entries"):  # as out=None does
        kernel_matrix(f, params, x, batch_size=4, progress=False)
    with pytest.warns(RuntimeWarning, match=message):
        k = kernel_matrix(f, params, x, out=out, batch_size=4, nonfinite="warn", progress=False)
    assert torch.isnan(k[6]).all() and torch.isnan(k[:, 6]).all() and torch.isfinite(k[:6, :6]).all()
    assert torch.isnan(kernel_matrix(f, params, x, out=out, batch_size=4, nonfinite="ignore", progress=False)[6]).all()

    out2 = str(tmp_path / "K2.npy")  # an interrupted run: refused before computing the rest
    with pytest.warns(RuntimeWarning):
        stopped_after(monkeypatch, 4, f, params, x, out=out2, batch_size=4, nonfinite="warn")
    computed = []
    monkeypatch.setattr(runner.Runner, "commit", lambda self, *a: computed.append(a))
    with pytest.raises(FloatingPointError, match=r"committed to K2.npy.partial by an earlier run, from x1 samples \[0, 1, 2, 3\] and x2 samples \[6\]"):
        kernel_matrix(f, params, x, out=out2, batch_size=4, progress=False)
    assert computed == []


# --- 5. markers describe their own tile ---------------------------------------------------------------------


def test_a_marker_copied_over_another_tiles_is_refused(tmp_path):
    """Regression: a marker copied over another tile's (valid file id and checksum) and that tile zeroed passed
    verify_kernel, load_kernel and resume (50 zero entries)."""
    f, params, x = _mlp()
    out = tmp_path / "K.npy"
    k = kernel_matrix(f, params, x, batch_size=4, out=str(out), progress=False)
    tiles = Path(str(out) + ".tiles")
    shutil.copy(tiles / "0_0", tiles / "4_4")  # same size: the regions still add up to every entry
    values = np.load(out, mmap_mode="r+")
    values[4:8, 4:8] = 0.0
    values.flush()
    del values
    for check in (ntkfunc.verify_kernel, ntkfunc.load_kernel, lambda p: ntkfunc.verify_kernel(p, data=False)):
        with pytest.raises(ValueError, match=r"1 of 6 tiles have no valid marker in K.npy.tiles/ \(\['4_4'\]\); expected one per tile, "
                                             r"describing that tile \(the markers were removed, edited or copied over one another\)"):
            check(out)
    with pytest.warns(RuntimeWarning, match=r"1 committed tile\(s\) \['4_4'\] do not match their markers .*or a marker describes "
                                            r"another tile\); computing them again"):
        again = kernel_matrix(f, params, x, batch_size=4, out=str(out), progress=False)
    assert torch.equal(again, k) and max_rel_err(again, reference_kernel(f, params, x, None)) <= 1e-10
    ntkfunc.verify_kernel(out)

    files = OutputFiles(out)  # a manifest that lists fewer tiles (with a valid checksum) is refused too
    manifest = json.loads(files.manifest.read_text())
    write_manifest(files, {**{k: v for k, v in manifest.items() if k != "checksum"}, "tiles": manifest["tiles"][:-1]})
    with pytest.raises(ValueError, match=r"its manifest lists 5 tiles; expected the 6 tiles of its grid \(block 4\), each once"):
        ntkfunc.verify_kernel(out)


# --- 6. the results format ----------------------------------------------------------------------------------


def test_files_of_another_results_format_are_not_reused(tmp_path, monkeypatch):
    """Regression: a file written by a version with a since-fixed wrong result was reused by the fixed version."""
    f, params, x = _mlp()
    out = str(tmp_path / "K.npy")
    sketch = ntkfunc.Sketch(32)
    kernel_matrix(f, params, x, out=out, progress=False)
    kernel_matrix(f, params, x, sketch=sketch, features=tmp_path / "feats", progress=False)
    (features,) = (tmp_path / "feats").glob("features-*.npy")
    for manifest in (Path(out + ".manifest.json"), Path(str(features) + ".manifest.json")):
        recorded = json.loads(manifest.read_text())
        assert recorded["fingerprint"]["results_format"] == fingerprint.RESULTS_FORMAT
        assert recorded["written_by"] == f"ntkfunc {ntkfunc.__version__}"
    monkeypatch.setattr(fingerprint, "RESULTS_FORMAT", fingerprint.RESULTS_FORMAT + 1)  # a fix changed what is computed
    new = fingerprint.RESULTS_FORMAT
    with pytest.raises(ValueError, match=rf"the existing output was written by ntkfunc {ntkfunc.__version__} in results format {new - 1}; "
                                         rf"this ntkfunc computes results format {new} \(a fix changed what it computes since\)"):
        kernel_matrix(f, params, x, out=out, progress=False)
    k = kernel_matrix(f, params, x, sketch=sketch, features=tmp_path / "feats", progress=False)  # a new features file
    assert len(list((tmp_path / "feats").glob("features-*.npy"))) == 2
    torch.testing.assert_close(k, ntkfunc.sketched_ntk_fn(f, sketch)(x, None, params))
    k = kernel_matrix(f, params, x, out=out, resume=False, progress=False)
    assert max_rel_err(k, reference_kernel(f, params, x, None)) <= 1e-10


# --- 7. finishing, resuming and reusing are linear ----------------------------------------------------------


def test_finishing_resuming_and_verifying_read_each_marker_a_few_times(tmp_path, monkeypatch):
    """Regression: finishing re-read every tile marker once per tile (465 tiles: 216,225 reads)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    f, params = ntkfunc.from_module(model)
    x = torch.randn(60, 3)
    out = tmp_path / "K.npy"
    reads = []
    real = Path.read_text

    def read_text(self, *a, **kw):
        if self.parent.name == "K.npy.tiles":
            reads.append(self.name)
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", read_text)
    tiles = 30 * 31 // 2  # 465 tiles of 2 samples
    kernel_matrix(f, params, x, batch_size=2, out=str(out), progress=False)
    assert len(reads) <= 3 * tiles, len(reads)
    for again in (lambda: kernel_matrix(f, params, x, batch_size=2, out=str(out), progress=False), lambda: ntkfunc.verify_kernel(out)):
        reads.clear()
        again()
        assert len(reads) <= 4 * tiles, len(reads)


def test_reusing_a_features_file_hashes_it_about_once(tmp_path, monkeypatch):
    """Regression: reusing a features file re-hashed the whole file once per chunk (100 MiB file: 2,000 MiB hashed)."""
    import ntkfunc._dataset.features as featuring

    monkeypatch.setattr(featuring, "CHUNK_SAMPLES", 4)
    f, params, _ = _mlp()
    x = torch.randn(80, 4, dtype=torch.float64)  # 20 chunks
    folder = tmp_path / "feats"
    sketch = ntkfunc.Sketch(64)
    kernel_matrix(f, params, x, sketch=sketch, features=folder, progress=False)
    (path,) = folder.glob("features-*.npy")
    hashed = []
    real = np.ascontiguousarray

    def counting(a, *args, **kw):
        out = real(a, *args, **kw)
        hashed.append(out.nbytes)
        return out

    monkeypatch.setattr(np, "ascontiguousarray", counting)
    k = kernel_matrix(f, params, x, sketch=sketch, features=folder, progress=False)
    assert sum(hashed) <= 2 * path.stat().st_size, (sum(hashed), path.stat().st_size)
    torch.testing.assert_close(k, ntkfunc.sketched_ntk_fn(f, sketch)(x, None, params))


# --- 8. full disks ------------------------------------------------------------------------------------------


def _enospc(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_for_features_is_an_error_at_the_start(tmp_path, monkeypatch):
    """Regression: the features file was created sparse and written through a memory map: SIGBUS (exit 135) on a full disk."""
    f, params, x = _mlp()
    monkeypatch.setattr(os, "posix_fallocate", _enospc)
    folder = tmp_path / "feats"
    with pytest.raises(OSError, match=r"kernel_matrix\(features=...\): no room for the features file features-.*\.npy\.partial: it "
                                      r"needs .* \(\d[\d,]* bytes\) and .* free \(No space left on device\); expected enough free space"):
        kernel_matrix(f, params, x, sketch=ntkfunc.Sketch(32), features=folder, progress=False)
    assert not list(folder.glob("*.partial"))


def test_a_filesystem_that_cannot_reserve_blocks_compares_the_free_space(tmp_path, monkeypatch):
    """Where posix_fallocate is not supported the file stayed sparse whatever the free space: now the size is compared."""
    f, params, x = _mlp(n=60)  # files of more than a block (the header's block is allocated)
    def unsupported(*args):
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=100))
    for kwargs, noun in [(dict(out=str(tmp_path / "K.npy")), "kernel file K.npy.partial"),
                         (dict(sketch=ntkfunc.Sketch(32), features=tmp_path / "feats"), "features file features-.*\\.npy\\.partial")]:
        with pytest.raises(OSError, match=rf"no room for the {noun}: it needs .* and .* has 100 B free \(No space left on device\)"):
            kernel_matrix(f, params, x, progress=False, **kwargs)
    monkeypatch.setattr(shutil, "disk_usage", real)  # room enough: a sparse file, written
    k = kernel_matrix(f, params, x, out=str(tmp_path / "K.npy"), progress=False)
    assert max_rel_err(k, reference_kernel(f, params, x, None)) <= 1e-10


def test_a_disk_that_fills_up_while_writing_is_an_oserror_not_a_signal(tmp_path, monkeypatch):
    """Units are written with pwrite: ENOSPC is an OSError naming the file (a memory-mapped write would be SIGBUS)."""
    f, params, x = _mlp()
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: _enospc() if offset else real(fd, data, offset))  # a lock's pid: offset 0
    with pytest.raises(OSError, match=r"kernel_matrix\(out='.*K.npy'\) \(K.npy.partial, tile 0_0\): writing into the file failed "
                                      r"\(No space left on device\); its committed units are kept"):
        kernel_matrix(f, params, x, out=str(tmp_path / "K.npy"), batch_size=5, progress=False)
    with pytest.raises(OSError, match=r"features-.*\.npy\.partial, chunk 0\): writing into the file failed \(No space left on device\)"):
        kernel_matrix(f, params, x, sketch=ntkfunc.Sketch(32), features=tmp_path / "feats", progress=False)


def _small_filesystem():
    """A file size limit of 1 MiB for the child (ulimit -f): what a nearly full filesystem is to a file that must grow."""
    import resource

    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


def test_cli_features_larger_than_the_filesystem_allows_one_line_status_1(tmp_path):
    """Regression: the CLI died of SIGBUS (exit 135, no message) when the features file did not fit."""
    res = _cli("compute", "--data", "digits_0_120", "--sketch-dim", "512", "--out", "K.npy", "--no-progress", cwd=tmp_path,
               preexec=_small_filesystem)
    assert res.returncode == 1, (res.returncode, res.stderr[-2000:])
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("ntkfunc compute: error: kernel_matrix(features=...): no room for the "
                                                                 "features file features-"), res.stderr
    assert "File too large: the filesystem's or this process's file size limit, ulimit -f" in res.stderr


# --- unclear errors: permissions, params that require grad ---------------------------------------------------


def test_manifests_and_markers_are_as_readable_as_the_data(tmp_path):
    """Regression: manifests and markers were created readable by their owner only: another user could load a kernel but
    not verify it."""
    f, params, x = _mlp()
    old = os.umask(0o022)
    try:
        kernel_matrix(f, params, x, batch_size=5, out=str(tmp_path / "K.npy"), progress=False)
        kernel_matrix(f, params, x, sketch=ntkfunc.Sketch(32), features=tmp_path / "feats", progress=False)
    finally:
        os.umask(old)
    (features,) = (tmp_path / "feats").glob("features-*.npy")
    for data in (tmp_path / "K.npy", features):
        mode = stat.S_IMODE(os.stat(data).st_mode)
        assert mode == 0o644
        markers = Path(f"{data}.{'tiles' if data.name == 'K.npy' else 'chunks'}")
        for p in [Path(str(data) + ".manifest.json"), *markers.iterdir()]:
            assert stat.S_IMODE(os.stat(p).st_mode) == mode, p


def test_params_and_inputs_that_require_grad(tmp_path):
    """Regression: kernel_matrix failed with torch's "cat(): functions with out=... arguments don't support automatic
    differentiation" (implementation 1; an internal AssertionError under "auto" before) on dict(model.named_parameters()),
    which ntk_fn accepts."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    params = dict(model.named_parameters())
    assert all(p.requires_grad for p in params.values())

    def f(p, x):
        return torch.func.functional_call(model, p, (x,))

    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    expected = reference_kernel(f, {k: v.detach() for k, v in params.items()}, x.detach(), None, ())
    for impl in (1, 3, "auto"):
        for kwargs in ({}, {"out": str(tmp_path / f"K{impl}.npy")}):
            k = kernel_matrix(f, params, x, trace_axes=(), batch_size=3, implementation=impl, progress=False, **kwargs)
            assert not k.requires_grad and max_rel_err(k, expected) <= 1e-10
