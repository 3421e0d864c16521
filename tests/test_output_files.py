"""kernel_matrix(out=...): one writer per output, damaged or foreign files never reused, verify and load_kernel."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import ntkfunc
from ntkfunc import kernel_matrix
from ntkfunc._dataset import npyfile, runner
from ntkfunc._dataset.store import NpyStore
from tests.blocked_job import build as build_job
from tests.reference import max_rel_err, reference_kernel

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "blocked_job.py"


def _mlp(n=10, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    f, params = ntkfunc.from_module(model)
    return f, params, torch.randn(n, 4, dtype=torch.float64)


class _Interrupt(Exception):
    pass


def _interrupted(monkeypatch, after, *args, **kwargs):
    """kernel_matrix(*args, **kwargs) stopped after ``after`` committed tiles, as a kill would."""
    original, count = runner.Runner.commit, []

    def commit(self, *a):
        if len(count) == after:
            raise _Interrupt
        original(self, *a)
        count.append(1)

    monkeypatch.setattr(runner.Runner, "commit", commit)
    with pytest.raises(_Interrupt):
        kernel_matrix(*args, progress=False, **kwargs)
    monkeypatch.setattr(runner.Runner, "commit", original)


def _files(out):
    return {p: Path(str(out) + p) for p in ("", ".partial", ".manifest.json", ".tiles", ".lock")}


def _unfinished(out):
    """The data file of an unfinished output (K.npy.partial; K.npy before outputs had one)."""
    files = _files(out)
    return files[".partial"] if files[".partial"].exists() else files[""]


# --- 1. two writers on one output ----------------------------------------------------------


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def test_a_second_writer_is_refused_while_the_first_is_alive(tmp_path):
    """Regression: run B (resume=False) deleted and recreated the file under a live run A; A kept committing into it."""
    out = tmp_path / "K.npy"
    proc = subprocess.Popen([sys.executable, str(JOB), "--out", str(out), "--sleep", "0.4"], env=_env(),  # ~6 s of tiles
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marks = Path(str(out) + ".tiles")
    deadline = time.time() + 60
    while not (marks.exists() and any(not p.name.startswith(".") for p in marks.iterdir())):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    f, params, x = build_job()
    for resume in (False, True):
        with pytest.raises(RuntimeError, match=rf"kernel_matrix\(out='.*K.npy'\): another writer \(pid {proc.pid} on .*\) holds K.npy.lock; "
                                               "expected one writer per output"):
            kernel_matrix(f, params, x * 2, trace_axes=(), out=str(out), resume=resume, batch_size=3, progress=False)
    assert proc.poll() is None  # both refusals came while A was writing
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    expected = kernel_matrix(f, params, x, trace_axes=(), batch_size=3, progress=False)
    assert torch.equal(ntkfunc.load_kernel(out), expected)  # A's kernel, intact


def test_a_killed_writer_does_not_block_its_resume(tmp_path):
    out = tmp_path / "K.npy"
    proc = subprocess.Popen([sys.executable, str(JOB), "--out", str(out), "--sleep", "0.15"], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    marks = Path(str(out) + ".tiles")
    while not (marks.exists() and len([p for p in marks.iterdir() if not p.name.startswith(".")]) >= 2):
        assert proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    f, params, x = build_job()
    k = kernel_matrix(f, params, x, trace_axes=(), out=str(out), batch_size=3, progress=False)  # the lock died with it
    assert torch.equal(k, kernel_matrix(f, params, x, trace_axes=(), batch_size=3, progress=False))


def test_the_same_process_cannot_write_one_output_twice_at_once(tmp_path):
    f, params, x = _mlp()
    out = tmp_path / "K.npy"
    first = NpyStore.open(out, (10, 10), torch.float64, {}, {"block": 5}, resume=True)
    with pytest.raises(RuntimeError, match=r"another writer \(pid \d+ .*\) holds K.npy.lock"):
        kernel_matrix(f, params, x, out=str(out), progress=False)
    first.close()
    kernel_matrix(f, params, x, out=str(out), resume=False, progress=False)  # released: accepted


def test_a_writer_stops_when_its_file_or_manifest_was_replaced(tmp_path):
    """A run that does not honour the lock (another machine, an older ntkfunc) cannot make a writer mix kernels."""
    out = tmp_path / "K.npy"
    files = _files(out)
    for replace in ("data", "manifest"):
        store = NpyStore.open(out, (4, 4), torch.float32, {"run": 1}, {"block": 2}, resume=False)
        store.commit("0_0", [((slice(0, 2), slice(0, 2)), torch.ones(2, 2))])
        if replace == "data":
            np.save(tmp_path / "other.npy", np.zeros((4, 4), np.float32))
            os.replace(tmp_path / "other.npy", files[".partial"])
        else:
            manifest = json.loads(files[".manifest.json"].read_text())
            files[".manifest.json"].write_text(json.dumps(dict(manifest, file="another run")))
        with pytest.raises(RuntimeError, match=r"the output was replaced while this run was writing it .*stopped without writing into it"):
            store.commit("0_2", [((slice(0, 2), slice(2, 4)), torch.ones(2, 2))])
        store.close()


# --- 3. damaged outputs ------------------------------------------------------------------------


def test_an_unfinished_kernel_is_not_k_npy(tmp_path, monkeypatch):
    """Regression: a 59%-zero partial K.npy opened with np.load like a finished one."""
    f, params, x = _mlp()
    out = tmp_path / "K.npy"
    files = _files(out)
    _interrupted(monkeypatch, 3, f, params, x, out=str(out), batch_size=3)
    assert not files[""].exists() and files[".partial"].exists()
    with pytest.raises(FileNotFoundError):
        np.load(out)
    with pytest.raises(ValueError, match=r"load_kernel\('.*K.npy'\): the kernel is incomplete \(3 tiles committed to "
                                         r"K.npy.partial so far\); expected a finished kernel: run the same kernel_matrix call"):
        ntkfunc.load_kernel(out)
    k = kernel_matrix(f, params, x, out=str(out), batch_size=3, progress=False)
    assert files[""].exists() and not files[".partial"].exists()
    assert max_rel_err(k, reference_kernel(f, params, x, None)) <= 1e-10
    assert torch.equal(ntkfunc.load_kernel(out), k)


def test_a_truncated_partial_file_is_refused(tmp_path, monkeypatch):
    """Regression: a partial .npy truncated to half was re-extended with zeros on resume (exit 0)."""
    f, params, x = _mlp()
    out = tmp_path / "K.npy"
    _interrupted(monkeypatch, 4, f, params, x, out=str(out), batch_size=3)
    partial = _unfinished(out)
    size = partial.stat().st_size
    os.truncate(partial, size // 2)
    with pytest.raises(ValueError, match=rf"resume=True\): K.npy.partial is {size // 2:,} bytes; expected {size:,} for float64\[10, 10\] "
                                         r"\(the file was truncated\)"):
        kernel_matrix(f, params, x, out=str(out), batch_size=3, progress=False)
    k = kernel_matrix(f, params, x, out=str(out), batch_size=3, resume=False, progress=False)
    assert max_rel_err(k, reference_kernel(f, params, x, None)) <= 1e-10


def test_a_finished_file_replaced_by_another_array_is_refused(tmp_path):
    """Regression: K.npy replaced by a larger array was accepted and returned with the wrong shape."""
    f, params, x = _mlp()
    out = tmp_path / "K.npy"
    kernel_matrix(f, params, x, out=str(out), progress=False)
    np.save(out, np.zeros((12, 12)))
    with pytest.raises(ValueError, match=r"K.npy holds float64\[12, 12\]; expected float64\[10, 10\] as recorded in its manifest"):
        kernel_matrix(f, params, x, out=str(out), progress=False)
    with pytest.raises(ValueError, match=r"^load_kernel\(.*K.npy holds float64\[12, 12\]"):
        ntkfunc.load_kernel(out)


def test_an_edited_manifest_is_refused(tmp_path, monkeypatch):
    """Regression: editing the manifest's grid produced tiles of zeros."""
    f, params, x = _mlp()
    out = tmp_path / "K.npy"
    _interrupted(monkeypatch, 3, f, params, x, out=str(out), batch_size=3)
    mpath = _files(out)[".manifest.json"]
    manifest = json.loads(mpath.read_text())
    mpath.write_text(json.dumps(dict(manifest, grid={"block": 6})))
    with pytest.raises(ValueError, match=r"K.npy.manifest.json does not match its checksum \(it was edited or damaged\)"):
        kernel_matrix(f, params, x, out=str(out), batch_size=3, progress=False)


def test_stray_and_damaged_tiles_are_computed_again(tmp_path, monkeypatch):
    """Regression: a stray marker file made its tile count as done (zeros); damaged data were reused."""
    f, params, x = _mlp()
    out = tmp_path / "K.npy"
    files = _files(out)
    _interrupted(monkeypatch, 3, f, params, x, out=str(out), batch_size=3)
    (files[".tiles"] / "0_9").write_text("")  # stray: the last tile of the first row, never computed
    values = np.load(_unfinished(out), mmap_mode="r+")
    values[0, 0] += 1.0  # damage tile 0_0
    values.flush()
    del values
    with pytest.warns(RuntimeWarning, match=r"2 committed tile\(s\) \['0_0', '0_9'\] do not match their markers .*computing them again"):
        k = kernel_matrix(f, params, x, out=str(out), batch_size=3, progress=False)
    assert max_rel_err(k, reference_kernel(f, params, x, None)) <= 1e-10
    ntkfunc.verify_kernel(out)


def test_verify_and_load_kernel_check_every_tile(tmp_path):
    f, params, x = _mlp()
    out = tmp_path / "K.npy"
    k = kernel_matrix(f, params, x, batch_size=4, out=str(out), verify=True, progress=False)
    report = ntkfunc.verify_kernel(out)
    assert (report.shape, report.tiles, report.data_checked) == ((10, 10), 6, True)
    values = np.load(out, mmap_mode="r+")
    values[9, 0] = 0.0  # tile 0_8 (mirrored entry)
    values.flush()
    del values
    with pytest.raises(ValueError, match=r"^load_kernel\(.*\): the entries of 1 tiles \(\['0_8'\]\) do not match the checksums written"):
        ntkfunc.load_kernel(out)
    assert ntkfunc.load_kernel(out, verify=False).shape == (10, 10)  # structure only
    with pytest.warns(RuntimeWarning, match=r"\['0_8'\] do not match"):  # a rerun repairs it
        assert torch.equal(kernel_matrix(f, params, x, batch_size=4, out=str(out), verify=True, progress=False), k)
    os.unlink(_files(out)[".tiles"] / "4_4")
    with pytest.raises(ValueError, match=r"1 of 6 tiles have no valid marker in K.npy.tiles/ \(\['4_4'\]\)"):
        ntkfunc.verify_kernel(out)
    np.save(tmp_path / "plain.npy", np.zeros(3))
    with pytest.raises(ValueError, match=r"plain.npy.manifest.json is missing, so nothing records what the file holds"):
        ntkfunc.load_kernel(tmp_path / "plain.npy")
    with pytest.raises(ValueError, match=r"^kernel_matrix\(verify=True, out=None\): verify reads the kernel file back; expected out="):
        kernel_matrix(f, params, x, verify=True, progress=False)


def test_out_that_is_a_directory_is_refused_before_anything_is_written(tmp_path):
    f, params, x = _mlp()
    with pytest.raises(ValueError, match=r"kernel_matrix\(out='.*'\): .* is a directory; expected the path of a .npy file"):
        kernel_matrix(f, params, x, out=str(tmp_path), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_the_file_is_preallocated_and_a_full_disk_is_an_error_at_the_start(tmp_path, monkeypatch):
    """Regression: a sparse file; with the disk full the process died of SIGBUS (exit 135) when a tile was written."""
    header = npyfile.create(tmp_path / "big.npy", (512, 512), np.float64, "kernel_matrix")
    assert os.stat(tmp_path / "big.npy").st_blocks * 512 >= header.size  # blocks reserved, not a sparse file
    f, params, x = _mlp()

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    out = tmp_path / "K.npy"
    with pytest.raises(OSError, match=r"kernel_matrix\(out=...\): no room for the kernel file K.npy.partial: it needs .* \(928 bytes\) "
                                      r"and .* free \(No space left on device\); expected enough free space"):
        kernel_matrix(f, params, x, out=str(out), progress=False)
    assert not _files(out)[".partial"].exists() and not _files(out)[".manifest.json"].exists()
