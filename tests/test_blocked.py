"""kernel_matrix: tiled whole-dataset kernels equal ntk_fn; files, resume, ranks, budgets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import ntkfunc
from ntkfunc import kernel_matrix
from ntkfunc._core.layout import Layout
from ntkfunc._dataset import panels, runner
from tests.blocked_job import build as build_job
from tests.reference import max_rel_err, reference_kernel
from tests.zoo import CASES, implementations, settings

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "blocked_job.py"
IMPLEMENTATIONS = implementations()
# single-tensor cases with the batch axis first (kernel_matrix's domain)
TILE_CASES = [c for c in CASES if c.name not in ("pytree", "batch_axis_1", "batchnorm_train_vmap_none", "set_pooling_vmap_none")]
ALL_SETTINGS = ("mlp", "cnn", "attention_matmul", "conv1d_multi_output")  # 2-D and 3-D outputs; others: full kernel
PARAMS = [
    pytest.param(case, tr, dg, id=f"{case}-trace{tr}-diag{dg}")
    for case in TILE_CASES
    for tr, dg in (settings(case) if case.name in ALL_SETTINGS else [((), ())])
    if not any(a % case.out_ndim == 0 for a in tr)  # a traced batch axis is no matrix: see test_errors
]


def _env() -> dict:
    # gloo on the loopback interface: the machine's hostname may resolve to an address
    # its connections cannot use, which leaves both ranks waiting in init_process_group.
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")


def _x2_for(case, dg, x1, x2):
    return x1.flip(0) if any(a % case.out_ndim == 0 for a in dg) else x2  # diagonal batch axis: equal lengths


@pytest.mark.parametrize("symmetric", [False, True], ids=["x2", "x2None"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("case,tr,dg", PARAMS)
def test_tiled_equals_ntk_fn(case, tr, dg, impl, symmetric):
    f, params, x1, x2, _ = case.build(torch.float64)
    x2 = None if symmetric else _x2_for(case, dg, x1, x2)
    whole = ntkfunc.ntk_fn(f, trace_axes=tr, diagonal_axes=dg, implementation=impl)(x1, x2, params)
    k = kernel_matrix(f, params, x1, x2, trace_axes=tr, diagonal_axes=dg, implementation=impl, batch_size=2, progress=False)
    assert k.shape == whole.shape and k.dtype == torch.float64
    assert max_rel_err(k, whole) <= 1e-10


def _mlp(n1=9, n2=5, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)
    f, params = ntkfunc.from_module(model)
    return f, params, torch.randn(n1, 4, dtype=dtype), torch.randn(n2, 4, dtype=dtype)


def test_against_float64_reference_with_default_settings():
    f, params, x1, x2 = _mlp()
    for x2_ in (x2, None):
        assert max_rel_err(kernel_matrix(f, params, x1, x2_, batch_size=4, progress=False), reference_kernel(f, params, x1, x2_)) <= 1e-10


class _Pairs(Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i].numpy(), i  # (input as numpy, label)


def test_dataset_dataloader_and_memmap_inputs(tmp_path):
    f, params, x1, x2 = _mlp()
    ref = kernel_matrix(f, params, x1, x2, batch_size=4, progress=False)
    np.save(tmp_path / "x1.npy", x1.numpy())
    mm = np.load(tmp_path / "x1.npy", mmap_mode="r")
    loader = DataLoader(TensorDataset(x2, torch.arange(len(x2))), batch_size=2, shuffle=False)
    for a, b in [(_Pairs(x1), x2), (mm, loader), (x1.numpy(), TensorDataset(x2))]:
        k = kernel_matrix(f, params, a, b, batch_size=4, progress=False)
        assert torch.equal(k, ref)


def test_loads_only_the_samples_of_a_tile():
    f, params, x1, _ = _mlp(n1=10)
    seen = []

    class Spy(Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            seen.append(i)
            return x1[i]

    kernel_matrix(f, params, Spy(), batch_size=3, progress=False)
    assert max(seen) == 9 and len(seen) < 120  # fingerprint probes + one Jacobian per block


ROW_IMPLEMENTATIONS = [i for i in implementations(rules_forced=False) if ntkfunc._engines.get_engine(i, api="test").rows is not None]


@pytest.mark.parametrize("impl", ROW_IMPLEMENTATIONS)
def test_reuses_block_rows_when_they_fit(monkeypatch, impl):
    """With room in the budget every sample block's rows are computed once, not once per tile."""
    engines, products = [], []
    init, contract = panels.RowPanels.__init__, Layout.contract

    def capture(self, *args, **kw):
        init(self, *args, **kw)
        engines.append(self)

    def counting_contract(self, a, b, n):
        products.append((a.shape[0], b.shape[0]))
        return contract(self, a, b, n)

    monkeypatch.setattr(panels.RowPanels, "__init__", capture)
    monkeypatch.setattr(Layout, "contract", counting_contract)
    f, params, x1, x2 = _mlp(n1=12, n2=8)
    ref = reference_kernel(f, params, x1, None)
    assert max_rel_err(kernel_matrix(f, params, x1, None, batch_size=3, implementation=impl, progress=False), ref) <= 1e-10
    assert engines[-1].rows_computed == 12  # 10 tiles, each sample's rows once
    assert products == [(3, 3), (6, 3), (9, 3), (12, 3)]  # one product per x2 block: all the panel rows above it
    products.clear()
    kernel_matrix(f, params, x1, x2, batch_size=3, implementation=impl, progress=False)
    assert engines[-1].rows_computed == 12 + 8
    assert products == [(12, 3), (12, 3), (12, 2)]
    products.clear()
    from ntkfunc._dataset import pipeline, plan

    monkeypatch.setattr(pipeline, "plan_tiles", lambda *a, **kw: plan.DatasetPlan(3, 2, 2))  # room for 2 blocks only
    k = kernel_matrix(f, params, x1, None, batch_size=3, implementation=impl, progress=False)
    # panel 0-5 once; x2 blocks 9-11 then 6-8 streamed; panel 6-11 takes 6-8 from the stream, computes 9-11
    assert engines[-1].rows_computed == 6 + 6 + 3
    assert max_rel_err(k, ref) <= 1e-10


def test_pntk_is_kernel_of_scaled_sum_of_logits():
    f, params, x1, x2 = _mlp()

    def g(p, x):
        return f(p, x).sum(-1, keepdim=True) / 3**0.5

    k = kernel_matrix(f, params, x1, x2, pntk=True, batch_size=4, progress=False)
    assert k.shape == (9, 5)
    assert max_rel_err(k, reference_kernel(g, params, x1, x2)) <= 1e-10
    def g3(p, x):  # (N, 4, 3): the pNTK sums every output entry, as pntk_fn does
        return f(p, x).unsqueeze(1) * torch.arange(1.0, 5.0, dtype=x.dtype).reshape(1, 4, 1)

    k3 = kernel_matrix(g3, params, x1, x2, pntk=True, batch_size=4, progress=False)
    assert max_rel_err(k3, ntkfunc.pntk_fn(g3)(x1, x2, params)) <= 1e-10


def test_out_file_manifest_and_refused_resume(tmp_path):
    f, params, x1, x2 = _mlp()
    out = tmp_path / "K.npy"
    k = kernel_matrix(f, params, x1, x2, trace_axes=(), batch_size=4, out=str(out), progress=False)
    assert torch.equal(k, kernel_matrix(f, params, x1, x2, trace_axes=(), batch_size=4, progress=False))
    assert np.load(out).shape == (9, 5, 3, 3)
    manifest = json.loads((tmp_path / "K.npy.manifest.json").read_text())
    assert manifest["complete"] and manifest["shape"] == [9, 5, 3, 3] and set(manifest["fingerprint"]) >= {"params", "x1", "x2"}
    assert len(os.listdir(tmp_path / "K.npy.tiles")) == 6
    changed_params = {k_: v * 1.01 for k_, v in params.items()}
    for kwargs, what in [
        (dict(params=changed_params), "params"),
        (dict(x1=x1 + 1), "x1"),
        (dict(x2=x2 + 1), "x2"),
        (dict(trace_axes=(-1,)), "kernel_shape, trace_axes"),
        (dict(pntk=True), "kernel_shape, pntk"),
    ]:
        call = dict(params=params, x1=x1, x2=x2, trace_axes=())
        call.update(kwargs)
        with pytest.raises(ValueError, match=rf"computed with different {what} \(recorded in K.npy.manifest.json\)"):
            kernel_matrix(f, call.pop("params"), call.pop("x1"), call.pop("x2"), out=str(out), batch_size=4, progress=False, **call)
    k2 = kernel_matrix(f, changed_params, x1, x2, trace_axes=(), out=str(out), resume=False, batch_size=4, progress=False)
    assert not torch.equal(k2, k)


def _wait_for_tiles(marks: Path, n: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if marks.exists() and len([p for p in marks.iterdir() if not p.name.startswith(".")]) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("the job made no progress")


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    out = tmp_path / "K.npy"
    proc = subprocess.Popen([sys.executable, str(JOB), "--out", str(out), "--sleep", "0.2"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_tiles(Path(str(out) + ".tiles"), 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    total = 15  # 5 blocks of 3 samples: 15 tiles on and above the diagonal
    done_before = len([p for p in Path(str(out) + ".tiles").iterdir() if not p.name.startswith(".")])
    assert 3 <= done_before < total
    res = subprocess.run([sys.executable, str(JOB), "--out", str(out)], env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["computed"] == total - done_before  # only the missing tiles
    f, params, x = build_job()
    expected = kernel_matrix(f, params, x, trace_axes=(), batch_size=3, progress=False)
    assert torch.equal(torch.from_numpy(np.load(out)), expected)
    with pytest.raises(ValueError, match="computed with different x1"):  # a changed input is refused
        kernel_matrix(f, params, x * 2, trace_axes=(), out=str(out), batch_size=3, progress=False)
    assert torch.equal(torch.from_numpy(np.load(out)), expected)


_TRANSPORT_LOST = ("Connection reset by peer", "Connection closed by peer")  # gloo's socket errors


def _run_torchrun(cmd: list, outputs: list, attempts: int = 3, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run a torchrun job from scratch; kill it with all its ranks and start over if it hangs.

    A job that calls ``kernel_matrix`` twice used to hang now and then in the second gloo
    rendezvous (fixed: the process group is now kept for the life of the process). Should
    torch.distributed itself hang here, the attempt is killed, ranks included, and the job
    runs again *from nothing* (``outputs`` deleted first), so a retry can never count tiles
    that an earlier attempt wrote. If every attempt hangs the test is skipped with that
    reason. A job that fails is returned at once, unless its ranks lost their gloo connections
    (``Connection reset by peer`` / ``closed by peer``, seen once on a loaded machine): that
    attempt is reported as a warning, with its stderr, and the job runs again from nothing;
    the test asserts on the last attempt, so a job that keeps failing still fails the test.
    """
    import shutil

    import psutil

    result = None
    for attempt in range(attempts):
        for path in outputs:
            shutil.rmtree(str(path) + ".tiles", ignore_errors=True)
            for p in (path, Path(str(path) + ".partial"), Path(str(path) + ".manifest.json")):
                p.unlink(missing_ok=True)
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for child in psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]:
                try:
                    child.kill()
                except psutil.NoSuchProcess:
                    pass
            proc.communicate()
            continue
        result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
        lost = proc.returncode != 0 and any(s in err for s in _TRANSPORT_LOST)
        if not lost or attempt == attempts - 1:
            return result
        warnings.warn(f"torchrun attempt {attempt + 1} lost its gloo connections (exit {proc.returncode}); "
                      f"running the job again from nothing. Its stderr ends:\n{err[-2000:]}", stacklevel=2)
    if result is None:
        pytest.skip(f"torch.distributed hung in all {attempts} attempts (> {timeout:.0f} s each) on this machine")
    return result  # an attempt that lost its connections, then hung ones: the failure stands


_FLAKY_JOB = r"""
import pathlib, sys
count = pathlib.Path(sys.argv[1])
n = int(count.read_text()) + 1 if count.exists() else 1
count.write_text(str(n))
if n <= int(sys.argv[2]):  # the first attempts lose their connections
    sys.exit("RuntimeError: [gloo/transport/tcp/pair.cc:534] Connection reset by peer")
print("done", n)
"""


def test_torchrun_retry_is_only_for_lost_connections_and_cannot_hide_a_failure(tmp_path):
    count = tmp_path / "attempts"

    def run(failures, script=_FLAKY_JOB):
        count.unlink(missing_ok=True)
        return _run_torchrun([sys.executable, "-c", script, str(count), str(failures)], [tmp_path / "K.npy"], attempts=3)

    with pytest.warns(UserWarning, match=r"(?s)torchrun attempt 1 lost its gloo connections .* from nothing.*Connection reset by peer"):
        res = run(1)
    assert res.returncode == 0 and res.stdout.split() == ["done", "2"]  # retried once, from nothing
    with pytest.warns(UserWarning, match="lost its gloo connections"):
        res = run(5)
    assert res.returncode != 0 and count.read_text() == "3"  # failing every time: the failure is returned
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = run(0, script="import sys; sys.exit('ValueError: a real failure')")
    assert res.returncode != 0 and "a real failure" in res.stderr and not count.exists()  # not retried


def _rank_records(stdout: str, world: int) -> dict[int, int]:
    """``{rank: tiles computed}`` from the job's JSON lines, one per rank, each whole.

    Lines that are not JSON objects (anything torchrun or a library prints) are skipped; a line
    that starts like one but does not parse, a rank missing or reported twice fail the test
    with the whole output.
    """
    records: dict[int, int] = {}
    for line in stdout.splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"a JSON line of the job does not parse: {line!r}\nstdout:\n{stdout}")
        assert record["rank"] not in records, f"rank {record['rank']} reported twice:\n{stdout}"
        records[record["rank"]] = record["computed"]
    assert sorted(records) == list(range(world)), f"expected one line from each of ranks 0..{world - 1}:\n{stdout}"
    return records


def test_rank_records_refuse_garbled_missing_and_repeated_lines():
    assert _rank_records('warning: x\n{"rank": 1, "computed": 3}\n{"rank": 0, "computed": 4}\n', world=2) == {0: 4, 1: 3}
    with pytest.raises(pytest.fail.Exception, match="does not parse"):  # two ranks' lines interleaved
        _rank_records('{"rank": 0, "computed": 4}{"rank": 1, "computed": 3}\n\n', world=2)
    with pytest.raises(AssertionError, match="one line from each of ranks 0..1"):
        _rank_records('{"rank": 0, "computed": 4}\n', world=2)
    with pytest.raises(AssertionError, match="rank 0 reported twice"):
        _rank_records('{"rank": 0, "computed": 4}\n{"rank": 0, "computed": 3}\n', world=2)


def test_torchrun_two_cpu_processes_equal_one(tmp_path):
    out, result = tmp_path / "K.npy", tmp_path / "mem.npy"
    f, params, x = build_job()
    expected = kernel_matrix(f, params, x, trace_axes=(), batch_size=3, progress=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(JOB), "--out", str(out), "--result", str(result)]
    res = _run_torchrun(cmd, [out, result])
    assert res.returncode == 0, res.stderr[-3000:]
    counts = _rank_records(res.stdout, world=2)
    assert sum(counts.values()) == 30 and min(counts.values()) > 0  # twice 15 tiles (file, then in memory), split by cost
    assert torch.equal(torch.from_numpy(np.load(out)), expected)  # written to one file by both ranks
    assert torch.equal(torch.from_numpy(np.load(result)), expected)  # in memory: gathered on every rank


def test_torchrun_ranks_that_disagree_are_refused_before_any_work(tmp_path):
    """Regression (issue 24): with out=None ranks holding other params (a script without torch.manual_seed) or other data
    summed their tiles into a kernel of neither model and exited 0; a sketch's in-memory features mixed the same way; with
    a file output rank 1 advised resume=False while rank 0 died of a gloo error. Now every rank refuses with one message."""
    from tests.ranks_job import build as build_ranks_job
    from tests.ranks_job import build_dict as build_dict_job

    job = ROOT / "tests" / "ranks_job.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(job), str(tmp_path)]
    res = _run_torchrun(cmd, [tmp_path / "K.npy", tmp_path / "Kd.npy"], timeout=120)  # a rank left waiting fails after 30 s (the job's group)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    by = {(r["scenario"], r["rank"]): r for r in lines}
    assert len(by) == len(lines) == 20, res.stdout
    differs = {"unseeded": "params", "data": "x1", "sketch": "params", "file": "params", "pytree-data": "x1"}
    for scenario, what in differs.items():
        first, second = by[(scenario, 0)], by[(scenario, 1)]
        assert first["error"] == second["error"], (scenario, first, second)  # one message, on every rank
        assert first["error"] and first["error"].startswith(
            f"kernel_matrix: the 2 torchrun ranks would not compute one kernel: rank 1 has different {what} than rank 0; "
            "expected every rank to hold the same f, params, buffers, data and settings"), first["error"]
        assert first["computed"] == second["computed"] == 0  # refused before any work
    assert not any(p.name.startswith("K.npy") for p in tmp_path.iterdir())  # nothing written for the file scenario
    f, params, x = build_ranks_job(seed=0)
    expected = float(kernel_matrix(f, params, x, batch_size=3, progress=False).sum())
    assert by[("same", 0)]["error"] is None and by[("same", 0)]["sum"] == pytest.approx(expected, rel=1e-12)
    assert by[("same", 1)]["sum"] == by[("same", 0)]["sum"]
    # feature_matrix: the ranks share the chunks of one file (the one-process features), in memory each computes all,
    # and ranks holding different models refuse, every one with the same message, before any work
    features = ntkfunc.feature_matrix(f, params, x, ntkfunc.Sketch(16, seed=1), progress=False).tensor
    (path,) = (tmp_path / "feats").glob("features-*.npy")
    torch.testing.assert_close(torch.from_numpy(np.load(path)), features, rtol=1e-12, atol=1e-12)
    assert (by[("features-file", 0)]["computed"], by[("features-file", 1)]["computed"]) == (2, 2)  # chunks 0, 2 and 1, 3
    assert by[("features-file", 0)]["sum"] == by[("features-file", 1)]["sum"] == pytest.approx(float(features.sum()), rel=1e-12)
    assert by[("features-memory", 0)]["computed"] == by[("features-memory", 1)]["computed"] == 4
    first, second = by[("features-unseeded", 0)], by[("features-unseeded", 1)]
    assert first["error"] == second["error"] and first["error"].startswith(
        "feature_matrix: the 2 torchrun ranks would not compute the same features: rank 1 has different params than rank 0"), first
    assert first["computed"] == second["computed"] == 0 and not (tmp_path / "other").exists()
    # a pytree input (dict of leaves sharing the batch axis): the ranks share the tiles of one file, which holds the
    # one-process kernel
    g, params, inputs = build_dict_job(seed=0)
    expected_dict = kernel_matrix(g, params, inputs, batch_size=3, progress=False)
    first, second = by[("pytree-file", 0)], by[("pytree-file", 1)]
    assert first["error"] is None and second["error"] is None, (first, second)
    assert first["computed"] > 0 and second["computed"] > 0  # both ranks did a share
    assert first["sum"] == second["sum"] == pytest.approx(float(expected_dict.sum()), rel=1e-12)
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "Kd.npy")), expected_dict, rtol=1e-12, atol=1e-12)


_RSS_SCRIPT = r"""
import resource, sys, json, torch, ntkfunc
from ntkfunc import kernel_matrix
torch.set_num_threads(1)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(400, 250), torch.nn.Tanh(), torch.nn.Linear(250, 10))
f, params = ntkfunc.from_module(model)
x = torch.randn(48, 400)
kernel_matrix(f, params, x[:2], progress=False)  # warm up (allocator, code paths)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
budget = int(sys.argv[1])
kernel_matrix(f, params, x, trace_axes=(), memory_budget=budget, out=sys.argv[2], progress=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"grew": peak - base, "jacobians": 48 * 10 * sum(p.numel() for p in params.values()) * 4}))
"""


def test_peak_rss_stays_under_budget(tmp_path):
    budget = 60_000_000
    res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(budget), str(tmp_path / "K.npy")], env=_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["jacobians"] > 3 * budget  # the whole Jacobian would not fit
    assert got["grew"] <= budget, got


def test_in_memory_kernel_larger_than_budget_is_refused():
    f, params, x1, _ = _mlp(n1=300)
    with pytest.raises(MemoryError, match=r"the kernel \(300, 300, 3, 3\) alone needs .* pass out='K.npy'"):
        kernel_matrix(f, params, x1, trace_axes=(), memory_budget=100_000, progress=False)


def test_cuda_oom_halves_the_block_and_retries(monkeypatch):
    original = panels.RowPanels._fill
    ok, failed = [], []

    def fill(self, src, i0, i1, target):
        if i1 - i0 > 2:
            failed.append(i1 - i0)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        ok.append(i1 - i0)
        return original(self, src, i0, i1, target)

    monkeypatch.setattr(panels.RowPanels, "_fill", fill)
    f, params, x1, x2 = _mlp(n1=9, n2=7)
    for x2_ in (x2, None):
        ok.clear(), failed.clear()
        k = kernel_matrix(f, params, x1, x2_, trace_axes=(), implementation=1, batch_size=5, progress=False)
        assert max_rel_err(k, reference_kernel(f, params, x1, x2_, ())) <= 1e-10
        assert failed[0] == 5 and 3 in failed  # 5 -> 3 -> 2: halved until it fits
        assert ok and max(ok) <= 2


def test_nonfinite_entries_name_their_samples():
    f, params, x1, x2 = _mlp()
    x1 = x1.clone()
    x1[6, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"x1 samples \[6\] and x2 samples \[0, 1, 2, 3\]"):
        kernel_matrix(f, params, x1, x2, batch_size=4, progress=False)
    with pytest.warns(RuntimeWarning, match=r"from x1 samples \[6\]"):
        k = kernel_matrix(f, params, x1, x2, batch_size=4, progress=False, nonfinite="warn")
    assert torch.isnan(k[6]).all() and torch.isfinite(k[:6]).all()


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_devices_split_tiles_over_workers(monkeypatch, impl):
    """Two workers take whole panels (x1 rows cut in two by cost) and together give the same kernel."""
    panels_seen = []
    original = runner.Runner._work

    def work(self, engine, jobs, dev, bar, commits, stop):
        taken = list(jobs)
        panels_seen.append(sorted({self.work.plan.panel_of(t.i0) for job in taken for t in job}))
        return original(self, engine, iter(taken), dev, bar, commits, stop)

    monkeypatch.setattr(runner.Runner, "_work", work)
    f, params, x1, x2 = _mlp(n1=11, n2=7)
    one = kernel_matrix(f, params, x1, x2, batch_size=2, implementation=impl, progress=False)
    for x2_ in (x2, None):
        ref = reference_kernel(f, params, x1, x2_)
        panels_seen.clear()
        two = kernel_matrix(f, params, x1, x2_, batch_size=2, implementation=impl, progress=False, devices=["cpu", "cpu"])
        assert max_rel_err(two, ref) <= 1e-10  # the panels' products have other shapes: equal to rounding
        taken = [p for ps in panels_seen for p in ps]
        assert len(panels_seen) == 2 and sorted(taken) == sorted(set(taken))  # every panel by one worker
    assert torch.equal(kernel_matrix(f, params, x1, x2, batch_size=2, implementation=impl, progress=False, devices="all"), one)


def test_memory_budget_decides_the_tiles():
    f, params, x1, _ = _mlp(n1=40)
    seen = []
    original = runner.Runner.commit

    def commit(self, t, block, bar, seconds):
        seen.append(t)
        return original(self, t, block, bar, seconds)

    try:
        runner.Runner.commit = commit
        big = kernel_matrix(f, params, x1, implementation=1, memory_budget="1GB", progress=False)
        n_big = len(seen)
        seen.clear()
        small = kernel_matrix(f, params, x1, implementation=1, memory_budget=150_000, progress=False)
    finally:
        runner.Runner.commit = original
    assert n_big == 1 and len(seen) > 3
    assert max_rel_err(small, big) <= 1e-12


def test_progress_bar_only_on_a_terminal(capsys, monkeypatch):
    f, params, x1, _ = _mlp()
    kernel_matrix(f, params, x1, batch_size=3, progress=True)
    assert capsys.readouterr().err == ""  # stderr is not a terminal under pytest
    from ntkfunc._dataset.progress import Progress

    bar = Progress(True, 4, 1)
    bar.advance(100, 0.1)
    bar.close()
    err = capsys.readouterr().err
    assert "2/4" in err and "entries/s" in err


def test_default_implementation_is_auto(monkeypatch):
    from ntkfunc._dataset import pipeline

    chosen = []
    original = pipeline.validate

    def spy(*args, **kwargs):
        job = original(*args, **kwargs)
        chosen.append(job.engine.implementation)
        return job

    monkeypatch.setattr(pipeline, "validate", spy)
    f, params, x1, _ = _mlp()
    kernel_matrix(f, params, x1, progress=False)
    assert chosen == [ntkfunc.Implementation.AUTO]  # per-parameter cheapest path


def test_errors_say_what_was_given_and_expected(tmp_path):
    f, params, x1, x2 = _mlp()
    with pytest.raises(ValueError, match=r"batch_size=0\): expected a positive int"):
        kernel_matrix(f, params, x1, batch_size=0)
    with pytest.raises(ValueError, match=r"implementation=7; expected .auto. or one of"):
        kernel_matrix(f, params, x1, implementation=7)
    with pytest.raises(ValueError, match=r"trace_axes=\(0,\)\): the batch axis 0 is traced"):
        kernel_matrix(f, params, x1, trace_axes=(0,))
    with pytest.raises(ValueError, match=r"expected x1 and x2 of equal lengths, got 9 and 5"):
        kernel_matrix(f, params, x1, x2, trace_axes=(), diagonal_axes=(0,))
    with pytest.raises(TypeError, match=r"x1\[0\] is an int; expected x1 to be a torch.Tensor, a numpy array"):
        kernel_matrix(f, params, [1, 2])  # a list is a pytree of inputs, as for ntk_fn: its leaves must be tensors
    with pytest.raises(ValueError, match=r"x2 has no samples"):
        kernel_matrix(f, params, x1, x1[:0])
    with pytest.raises(ValueError, match=r"nonfinite='nope'\): expected 'raise', 'warn' or 'ignore'"):
        kernel_matrix(f, params, x1, nonfinite="nope")
    with pytest.raises(ValueError, match=r"returned 2 output tensors; expected one tensor with a batch axis"):
        kernel_matrix(lambda p, x: (f(p, x), f(p, x)), params, x1)
    with pytest.raises(ValueError, match=r"devices='gpu0'\).*expected None, 'all' or a list of devices"):
        kernel_matrix(f, params, x1, devices="gpu0")
    with pytest.raises(TypeError, match=r"dtype torch.bfloat16 cannot be stored in a .npy file"):
        fb, pb, xb, _ = _mlp(dtype=torch.bfloat16)
        kernel_matrix(fb, pb, xb, out=str(tmp_path / "K.npy"), progress=False)
