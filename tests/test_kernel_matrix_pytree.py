"""kernel_matrix on every input structure ntk_fn takes: pytrees of tensors and arrays, Datasets of pytrees, vmap_axes.

Every kernel is checked against the float64 reference (``tests/reference.py``: the whole batch through ``f``, no
vmap), tiled (``batch_size`` smaller than the data), in memory and out of core, resumed after an interrupted run,
split over ranks (two in-process ranks with thread-backed collectives), sketched, and with the pNTK; a changed leaf,
structure or batch axis is refused on resume; bad structures get errors that name the leaves.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import ntkfunc
from ntkfunc import kernel_matrix
from ntkfunc._dataset import pipeline, runner
from ntkfunc._dataset.distributed import Ranks
from tests.interrupt import Killed, counting_commits
from tests.reference import max_rel_err, reference_kernel

IMPLS = (1, 2, 3, "auto")
_COMMIT, _INIT = runner.Runner.commit, runner.Runner.__init__


class Masked(torch.nn.Module):
    """A keyword-input model: per-position features ``x`` (N, T, 3) pooled under a padding ``mask`` (N, T)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.head = torch.nn.Linear(3, 5), torch.nn.Linear(5, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inner(x)) * mask.unsqueeze(-1)
        return self.head(h.sum(1) / (1 + mask.sum(1, keepdim=True)))


def _masked(n: int = 7, seed: int = 0):
    torch.manual_seed(seed)
    f, params = ntkfunc.from_module(Masked().double())  # a dict's keys name forward's parameters
    x = {"x": torch.randn(n, 4, 3, dtype=torch.float64), "mask": (torch.rand(n, 4) > 0.3).double()}
    return f, params, x


def _tuple_model(seed: int = 0):
    """``f(p, (features, ids))``: a float input and integer token ids, two inputs of one sample."""
    torch.manual_seed(seed)
    params = {"w": torch.randn(3, 4, dtype=torch.float64), "emb": torch.randn(9, 4, dtype=torch.float64),
              "v": torch.randn(4, 2, dtype=torch.float64)}

    def f(p, x):
        feats, ids = x
        return torch.tanh(feats @ p["w"] + p["emb"][ids].mean(1)) @ p["v"]

    return f, params


def _tuple_data(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, dtype=torch.float64, generator=g), torch.randint(0, 9, (n, 5), generator=g)


@pytest.mark.parametrize("impl", IMPLS)
def test_dict_input_matches_reference(impl):
    f, params, x = _masked()
    x2 = {k: v[:4] * 1.5 if v.is_floating_point() and k == "x" else v[:4] for k, v in x.items()}
    settings = (((-1,), ()), ((), ()), ((), (-1,))) if impl in (1, "auto") else (((), ()),)
    for trace, diag in settings:
        k = kernel_matrix(f, params, x, trace_axes=trace, diagonal_axes=diag, implementation=impl, batch_size=3, progress=False)
        assert max_rel_err(k, reference_kernel(f, params, x, None, trace, diag)) < 1e-12, (trace, diag)
    k = kernel_matrix(f, params, x, x2, trace_axes=(), implementation=impl, batch_size=3, progress=False)
    assert k.shape == (7, 4, 2, 2) and max_rel_err(k, reference_kernel(f, params, x, x2, (), ())) < 1e-12


@pytest.mark.parametrize("impl", IMPLS)
def test_tuple_input_with_integer_ids(impl):
    f, params = _tuple_model()
    x1, x2 = _tuple_data(8), _tuple_data(5, seed=2)
    k = kernel_matrix(f, params, x1, x2, trace_axes=(), implementation=impl, batch_size=3, progress=False)
    assert max_rel_err(k, reference_kernel(f, params, x1, x2, (), ())) < 1e-12
    k = kernel_matrix(f, params, x1, implementation=impl, batch_size=3, progress=False)  # x2=None: mirrored tiles
    assert max_rel_err(k, reference_kernel(f, params, x1, None)) < 1e-12


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_axis_1_on_a_leaf_and_on_the_output(impl):
    f, params, x = _masked()
    x_t = {"x": x["x"], "mask": x["mask"].T.contiguous()}  # the mask with its batch axis last: (T, N)

    def g(p, inputs):
        return f(p, {"x": inputs["x"], "mask": inputs["mask"].T})

    axes = ({"x": 0, "mask": 1}, 0, {})  # neural-tangents' (x_axes, fx_axes, {}): the output's batch axis stays 0
    k = kernel_matrix(g, params, x_t, trace_axes=(), vmap_axes=axes, implementation=impl, batch_size=3, progress=False)
    assert max_rel_err(k, reference_kernel(g, params, x_t, None, (), ())) < 1e-12
    # a sequence-first GRU: batch on axis 1 of its input (T, N, F) and of its output (T, N, H); kernel (T, T, N, N)
    torch.manual_seed(0)
    gru, gp = ntkfunc.from_module(torch.nn.GRU(2, 3).double(), output=0)
    seqs = torch.randn(3, 5, 2, dtype=torch.float64)
    k = kernel_matrix(gru, gp, seqs, seqs[:, 2:] + 0.5, vmap_axes=1, implementation=impl, batch_size=2, progress=False)
    assert k.shape == (3, 3, 5, 3) and max_rel_err(k, reference_kernel(gru, gp, seqs, seqs[:, 2:] + 0.5)) < 1e-12
    k = kernel_matrix(gru, gp, seqs, vmap_axes=1, diagonal_axes=(0,), trace_axes=(-1,), implementation=impl, batch_size=2,
                      progress=False)
    assert k.shape == (3, 5, 5) and max_rel_err(k, reference_kernel(gru, gp, seqs, None, (-1,), (0,))) < 1e-12


def test_numpy_leaves_datasets_of_pytrees_and_shared_leaves(tmp_path):
    f, params, x = _masked()
    ref = reference_kernel(f, params, x, None, (), ())
    np.save(tmp_path / "x.npy", x["x"].numpy())
    mapped = {"x": np.load(tmp_path / "x.npy", mmap_mode="r"), "mask": x["mask"].numpy()}  # memory-mapped leaf: read by tile
    assert max_rel_err(kernel_matrix(f, params, mapped, trace_axes=(), batch_size=3, progress=False), ref) < 1e-12

    class Items(torch.utils.data.Dataset):  # HF-datasets style: (inputs as a dict, label), one sample per item
        def __len__(self):
            return 7

        def __getitem__(self, i):
            return {"x": x["x"][i], "mask": x["mask"][i].numpy()}, i % 2

    loader = torch.utils.data.DataLoader(Items(), batch_size=2)
    assert max_rel_err(kernel_matrix(f, params, loader, trace_axes=(), batch_size=3, progress=False), ref) < 1e-12
    # a leaf shared by all samples (None in vmap_axes): passed whole with every block
    table = torch.randn(9, 4, dtype=torch.float64)

    def h(p, inputs):
        feats, tab = inputs
        return torch.tanh(feats @ p["w"] + tab.sum(0)) @ p["v"]

    f2, p2 = _tuple_model()
    feats = _tuple_data(6)[0]
    k = kernel_matrix(h, p2, (feats, table), vmap_axes=((0, None), 0, {}), batch_size=4, progress=False)
    assert max_rel_err(k, ntkfunc.ntk_fn(h, vmap_axes=((0, None), 0, {}), implementation=1)(
        (feats, table), None, p2)) < 1e-12
    assert max_rel_err(k, reference_kernel(lambda p, a: h(p, (a, table)), p2, feats, None)) < 1e-12


def test_out_of_core_resume_after_an_interrupted_run(tmp_path, monkeypatch):
    f, params, x = _masked(n=9)
    out = tmp_path / "K.npy"
    counting_commits(monkeypatch, stop_after=2)
    with pytest.raises(Killed):
        kernel_matrix(f, params, x, trace_axes=(), batch_size=3, out=str(out), progress=False)
    done = counting_commits(monkeypatch)
    k = kernel_matrix(f, params, x, trace_axes=(), batch_size=3, out=str(out), progress=False)
    assert len(done) == 6 - 2  # 6 tiles on and above the diagonal; 2 were committed before the interruption
    assert max_rel_err(k, reference_kernel(f, params, x, None, (), ())) < 1e-12
    assert max_rel_err(torch.from_numpy(np.load(out)), k) == 0


def test_a_changed_leaf_structure_or_axis_is_refused_on_resume(tmp_path):
    f, params, x = _masked(n=6)
    out = str(tmp_path / "K.npy")
    kernel_matrix(f, params, x, batch_size=3, out=out, progress=False)
    mask = x["mask"].clone()
    mask[5, 0] = 1 - mask[5, 0]  # one entry of one leaf
    with pytest.raises(ValueError, match=r"computed with different x1 \(recorded in K.npy.manifest.json\)"):
        kernel_matrix(f, params, {**x, "mask": mask}, batch_size=3, out=out, progress=False)
    # the same bytes in another structure (a list instead of a tuple), or along another batch axis: refused too
    g, p = _tuple_model()

    def h(q, inputs):
        feats, square = inputs
        return g(q, (feats, torch.zeros(feats.shape[0], 2, dtype=torch.long))) * (1 + square.sum() / 100)

    feats, square = _tuple_data(6)[0], torch.rand(6, 6, dtype=torch.float64)
    out2 = str(tmp_path / "K2.npy")
    kernel_matrix(h, p, (feats, square), batch_size=3, out=out2, progress=False)
    assert kernel_matrix(h, p, (feats, square), batch_size=3, out=out2, progress=False).shape == (6, 6)  # resumed: done
    for data, axes in (([feats, square], 0), ((feats, square), ((0, 1), 0, {}))):
        with pytest.raises(ValueError, match="computed with different x1"):
            kernel_matrix(h, p, data, vmap_axes=axes, batch_size=3, out=out2, progress=False)


class _ThreadRanks(Ranks):
    """Rank ``rank`` of ``world`` ranks run as threads of this process; collectives through a shared board and barrier."""

    def __init__(self, rank: int, world: int, board: dict, barrier: threading.Barrier) -> None:
        super().__init__(rank, world)
        object.__setattr__(self, "board", board)
        object.__setattr__(self, "sync", barrier)

    def _exchange(self, value):
        self.sync.wait()
        self.board[self.rank] = value
        self.sync.wait()
        values = [self.board[r] for r in range(self.world)]
        self.sync.wait()
        return values

    def broadcast_int(self, value):
        return int(self._exchange(value)[0])

    def broadcast_object(self, value):
        return self._exchange(value)[0]

    def gather_objects(self, value):
        return self._exchange(value)

    def barrier(self):
        self.sync.wait()

    def all_reduce_sum(self, t):
        parts = self._exchange(t.clone())
        return sum(parts[1:], parts[0])


def _two_ranks(monkeypatch, call):
    """``call(rank)`` on two ranks at once (threads), each rank's kernel_matrix with its own Ranks: ``(results, errors,
    commits)`` by rank."""
    board, barrier, local = {}, threading.Barrier(2, timeout=60), threading.local()
    monkeypatch.setattr(pipeline, "ranks", lambda: _ThreadRanks(local.rank, 2, board, barrier))
    commits: dict[int, list] = {0: [], 1: []}

    def make(self, *a, **kw):  # a runner belongs to the rank whose thread makes it (its commits run in its own thread)
        _INIT(self, *a, **kw)
        self.rank = local.rank

    def commit(self, unit, *a):
        _COMMIT(self, unit, *a)
        commits[self.rank].append(unit)

    monkeypatch.setattr(runner.Runner, "__init__", make)
    monkeypatch.setattr(runner.Runner, "commit", commit)
    results, errors = {}, {}

    def work(rank):
        local.rank = rank
        try:
            results[rank] = call(rank)
        except Exception as err:  # noqa: BLE001 - returned to the test
            errors[rank] = err

    threads = [threading.Thread(target=work, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results, errors, commits


def test_ranks_split_pytree_work(tmp_path, monkeypatch):
    f, params, x = _masked(n=9)
    ref = reference_kernel(f, params, x, None, (), ())
    out = str(tmp_path / "K.npy")
    for target in (None, out):
        results, errors, commits = _two_ranks(monkeypatch, lambda rank, target=target: kernel_matrix(
            f, params, x, trace_axes=(), batch_size=3, out=target, progress=False))
        assert not errors, errors
        assert commits[0] and commits[1] and len(commits[0]) + len(commits[1]) == 6, commits  # each rank a share, once
        for rank in (0, 1):
            assert max_rel_err(results[rank], ref) < 1e-12, (target, rank)
    assert max_rel_err(torch.from_numpy(np.load(out)), ref) < 1e-12
    mask = x["mask"].clone()
    mask[0, 0] = 1 - mask[0, 0]
    # rank 1 holds another mask: every rank refuses, with one message, before any work
    _, errors, commits = _two_ranks(monkeypatch, lambda rank: kernel_matrix(
        f, params, x if rank == 0 else {**x, "mask": mask}, batch_size=3, progress=False))
    assert errors.keys() == {0, 1} and str(errors[0]) == str(errors[1]), errors
    assert "rank 1 has different x1 than rank 0" in str(errors[0]) and commits == {0: [], 1: []}


def test_sketch_path_with_pytree_inputs(tmp_path):
    f, params, x = _masked()
    n_params = sum(p.numel() for p in params.values())
    exact = ntkfunc.Sketch(4 * n_params, seed=0, kind="countsketch")  # a count sketch that holds every parameter: exact
    k = kernel_matrix(f, params, x, trace_axes=(), sketch=exact, batch_size=3, progress=False)
    assert max_rel_err(k, reference_kernel(f, params, x, None, (), ())) < 1e-12
    sketch = ntkfunc.Sketch(32, seed=3)
    x2 = {k_: v[:3] for k_, v in x.items()}
    folder = tmp_path / "features"
    k = kernel_matrix(f, params, x, x2, sketch=sketch, features=str(folder), batch_size=3, progress=False)
    assert max_rel_err(k, ntkfunc.sketched_ntk_fn(f, sketch)(x, x2, params)) < 1e-10
    assert len(list(folder.glob("features-*.npy"))) == 2
    # the other way round, and x alone: both sides' files are found again (a pytree's data hashes alike as x1 and x2)
    k21 = kernel_matrix(f, params, x2, x, sketch=sketch, features=str(folder), batch_size=3, progress=False)
    assert max_rel_err(k21, k.T) < 1e-12 and len(list(folder.glob("features-*.npy"))) == 2
    kernel_matrix(f, params, x, sketch=sketch, features=str(folder), batch_size=3, progress=False)
    assert len(list(folder.glob("features-*.npy"))) == 2
    axes = ({"x": 0, "mask": 1}, 0, {})
    x_t = {"x": x["x"], "mask": x["mask"].T.contiguous()}

    def g(p, inputs):
        return f(p, {"x": inputs["x"], "mask": inputs["mask"].T})

    k = kernel_matrix(g, params, x_t, sketch=sketch, vmap_axes=axes, batch_size=3, progress=False)
    assert max_rel_err(k, ntkfunc.sketched_ntk_fn(g, sketch, vmap_axes=axes)(x_t, None, params)) < 1e-10


def test_pntk_of_pytree_inputs_and_outputs():
    f, params, x = _masked()

    def two_heads(p, inputs):  # a pytree of outputs: pntk=True sums all of them
        y = f(p, inputs)
        return {"a": y, "b": torch.tanh(y[:, :1])}

    for impl in (1, 2, 3):  # 2: ntk_fn per tile, of the sum of the logits
        k = kernel_matrix(two_heads, params, x, pntk=True, implementation=impl, batch_size=3, progress=False)
        assert max_rel_err(k, ntkfunc.pntk_fn(two_heads, implementation=1)(x, None, params)) < 1e-12
        assert max_rel_err(k, reference_kernel(lambda p, a: sum(t.sum(1) for t in two_heads(p, a).values()) / 3 ** 0.5,
                                               params, x, None, ())) < 1e-12
    with pytest.raises(ValueError, match="f returned 2 output tensors; expected one tensor with a batch axis"):
        kernel_matrix(two_heads, params, x, progress=False)


def test_bad_structures_are_refused_with_what_was_given():
    f, params, x = _masked()
    with pytest.raises(ValueError, match=r"the leaves of x1 hold different numbers of samples along their batch axes "
                                         r"\(x1\['x'\] has 7, x1\['mask'\] has 6; vmap_axes=0\)"):
        kernel_matrix(f, params, {"x": x["x"], "mask": x["mask"][:6]}, progress=False)
    with pytest.raises(TypeError, match=r"x1\['scale'\] is a float; expected x1 to be a torch.Tensor, a numpy array"):
        kernel_matrix(f, params, {**x, "scale": 0.5}, progress=False)
    with pytest.raises(ValueError, match="x1 is an empty dict; expected a tensor, a numpy array, a pytree of them"):
        kernel_matrix(f, params, {}, progress=False)
    with pytest.raises(ValueError, match="x1 and x2 have different structures"):
        kernel_matrix(f, params, x, {"x": x["x"]}, progress=False)
    with pytest.raises(ValueError, match=r"vmap_axes=None\): kernel_matrix cuts the data into blocks of samples"):
        kernel_matrix(f, params, x, vmap_axes=None, progress=False)
    with pytest.raises(ValueError, match=r"axis 2 does not exist in x1\['mask'\], which has 2 axes"):
        kernel_matrix(f, params, x, vmap_axes=({"x": 0, "mask": 2}, 0, {}), progress=False)
    with pytest.raises(TypeError, match=r"vmap_axes='0'\): '0' is a str"):
        kernel_matrix(f, params, x, vmap_axes="0", progress=False)
    with pytest.raises(ValueError, match="does not match the structure of the inputs"):
        kernel_matrix(f, params, x, vmap_axes=({"x": 0}, 0, {}), progress=False)

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {"x": x["x"][i], "n": "three"}

    with pytest.raises(TypeError, match=r"x1\[0\]\['n'\] gives a str as input; expected a tensor or numpy array"):
        kernel_matrix(f, params, Items(), progress=False)


def test_hf_keyword_inputs_with_attention_mask_at_dataset_scale():
    """A tiny GPT-2 (eager attention: its mask is prepared per sample) on input_ids and a left-padding attention_mask."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    import _libraries as L  # noqa: E402

    sys.path.pop(0)
    try:
        model, x, kw = L.FAMILIES["hf gpt2 eager"].build("tiny", 0)
    except ImportError as err:
        pytest.skip(str(err))
    f, params = ntkfunc.from_module(model.double(), **kw, output=lambda out: out.logits[:, -1, :3])
    ids = x["input_ids"]
    ids = torch.cat([ids, ids.flip(0)])[:5]
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[3, :1] = 0
    data = {"input_ids": ids, "attention_mask": mask}
    k = kernel_matrix(f, params, data, batch_size=2, progress=False)
    assert max_rel_err(k, reference_kernel(f, params, data, None)) < 1e-12


class Pooled(torch.nn.Module):
    """``forward(input_ids, attention_mask)``: token embeddings pooled under the mask, as a HuggingFace encoder's head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(20, 4), torch.nn.Linear(4, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(input_ids)) * attention_mask.unsqueeze(-1)
        return self.head(h.sum(1) / attention_mask.sum(1, keepdim=True))


def pooled() -> torch.nn.Module:
    """A factory for ``--model tests.test_kernel_matrix_pytree:pooled``."""
    return Pooled()


def _token_data(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, 20, (n, 5)), "attention_mask": (np.arange(5) < rng.integers(1, 6, (n, 1))).astype(np.float32)}


def test_cli_named_inputs_from_npz_safetensors_and_pt(tmp_path):
    from ntkfunc import _cli as cli

    train, test = _token_data(9, 0), _token_data(4, 1)
    np.savez(tmp_path / "train.npz", **train)
    torch.save({k: torch.from_numpy(v) for k, v in test.items()}, tmp_path / "test.pt")
    out = tmp_path / "K.npy"
    argv = ["compute", "--model", "tests.test_kernel_matrix_pytree:pooled", "--dtype", "float64", "--kernel", "full",
            "--batch-size", "4", "--out", str(out), "--no-progress"]
    torch.manual_seed(0)  # as the CLI builds the model (--seed 0)
    f, params = ntkfunc.from_module(pooled().double().eval())

    def as_torch(d, a=0, b=None):
        return {k: torch.from_numpy(v[a:b]).double() if v.dtype.kind == "f" else torch.from_numpy(v[a:b]) for k, v in d.items()}

    assert cli.main(argv + ["--data", str(tmp_path / "train.npz")]) == 0
    assert max_rel_err(torch.from_numpy(np.load(out)), reference_kernel(f, params, as_torch(train), None, (), ())) < 1e-12
    # train rows 2:8 and test rows 1:3 against train rows 2:8; the test split from a .pt dict of tensors
    assert cli.main(argv + ["--data", str(tmp_path / "train.npz"), "--test", str(tmp_path / "test.pt"), "--range", "2_8_1_3",
                            "--no-resume"]) == 0
    x1 = {k: torch.cat([as_torch(train, 2, 8)[k], as_torch(test, 1, 3)[k]]) for k in train}
    expected = reference_kernel(f, params, x1, as_torch(train, 2, 8), (), ())
    assert np.load(out).shape == (8, 6, 2, 2) and max_rel_err(torch.from_numpy(np.load(out)), expected) < 1e-12
    safetensors = pytest.importorskip("safetensors.numpy")
    safetensors.save_file(train, str(tmp_path / "train.safetensors"))  # memory-mapped by ntkfunc's own reader
    assert cli.main(argv + ["--data", str(tmp_path / "train.safetensors"), "--no-resume"]) == 0
    assert max_rel_err(torch.from_numpy(np.load(out)), reference_kernel(f, params, as_torch(train), None, (), ())) < 1e-12


def test_cli_named_inputs_that_do_not_fit_are_usage_errors(tmp_path, capsys):
    from ntkfunc import _cli as cli

    train = _token_data(6, 0)
    np.savez(tmp_path / "short.npz", input_ids=train["input_ids"], attention_mask=train["attention_mask"][:4])
    np.savez(tmp_path / "train.npz", **train)
    np.savez(tmp_path / "other.npz", input_ids=train["input_ids"])
    argv = ["compute", "--model", "tests.test_kernel_matrix_pytree:pooled", "--out", str(tmp_path / "K.npy"), "--no-progress"]
    cases = {
        "short.npz": (["--data", str(tmp_path / "short.npz")],
                      r"its arrays hold different numbers of samples \(input_ids: 6, attention_mask: 4\)"),
        "other keys": (["--data", str(tmp_path / "train.npz"), "--test", str(tmp_path / "other.npz")],
                       r"holds input_ids; expected the inputs of --data \(input_ids, attention_mask\)"),
    }
    for name, (extra, message) in cases.items():
        assert cli.main(argv + extra) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("ntkfunc compute: error: ") and __import__("re").search(message, err), (name, err)
    assert not (tmp_path / "K.npy").exists()
