"""``ntkfunc compute``: a whole-dataset eNTK from the command line (argparse -> ``kernel_matrix``).

Like empirical-ntks' ``ntk.py``: ``--data digits_0_200_0_100`` takes the first 200 training
and the first 100 test samples and writes the 300 x 200 kernel of (train + test) rows
against train columns. With no arguments it runs the embedded default: the small CNN of
``ntkfunc.models`` on the shipped digits (``digits_0_200_0_100``), written to ``out/ntk.npy``.

Data sources (``--data`` and, for files, ``--test``):

- ``digits``: the shipped 8x8 digits (1,797 images): train = the first 1,297, test = the last 500;
- ``file.npy`` (memory-mapped, never loaded whole) or ``file.pt`` (a tensor, a tuple/list whose
  first element is the inputs, or a dict with key ``"x"``), samples along axis 0;
- several named inputs (keyword inputs such as ``input_ids`` and ``attention_mask``, passed to the
  model's ``forward`` by name, every array with its samples along axis 0): a ``.npz`` of several
  arrays (read into memory: a zip cannot be memory-mapped), a ``.safetensors`` file (parsed here,
  no code runs, memory-mapped when its floating arrays are of ``--dtype`` already), or a ``.pt``
  dict of tensors without an ``"x"`` key (``torch.load(weights_only=True)``). A file of these
  with an ``"x"`` key gives that array alone (the others, labels for instance, are left out);
- a folder of per-sample ``.npy`` / ``.pt`` files (sorted by path, subfolders included: an
  ImageFolder-style ``root/<class>/<sample>.npy`` layout works), loaded one tile at a time.

Sample ranges: ``NAME_a_b`` or ``NAME_a_b_c_d`` for built-ins, ``--range a_b[_c_d]`` for any
source: rows are ``train[a:b]`` then ``test[c:d]``, columns ``train[a:b]``.
Bad arguments print one line and exit with status 2 before anything is written (an ``--out``
that is one of the inputs or inside a data folder, weights of another model, a device this
machine does not have, a data file torch.load refuses, ``--features`` that is a file or comes
without ``--sketch-dim``); a run that is refused prints one line and exits with status 1.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import pickle
import re
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from ntkfunc._core.checks import FINGERPRINT_ATTR
from ntkfunc._core.memory import fmt_bytes, parse_budget
from ntkfunc._engines import choices, get_engine

DEFAULT_MODEL = "ntkfunc.models:small_cnn"
DEFAULT_DATA = "digits_0_200_0_100"
_BUILTIN_TRAIN = {"digits": 1297}
_KERNELS: dict[str, dict[str, Any]] = {"trace": dict(trace_axes=(-1,)), "pntk": dict(trace_axes=(-1,), pntk=True), "full": dict(trace_axes=())}


class UsageError(ValueError):
    """A bad argument: reported on one line, exit status 2 (found while the kernel runs, a data file: status 1)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ntkfunc compute", description="A whole-dataset eNTK (ntkfunc.kernel_matrix) from the command line: tiled, "
                "out of core, resumable, verified.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"package.module:factory returning an nn.Module (default {DEFAULT_MODEL})")
    p.add_argument("--weights", type=Path, help="state_dict file (.pt) loaded with torch.load(weights_only=True)")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help=f"digits[_a_b[_c_d]], a .npy/.pt file, a .npz/.safetensors of named inputs, or a folder (default {DEFAULT_DATA})")
    p.add_argument("--test", help="test split for file/folder data (rows after the training rows)")
    p.add_argument("--range", dest="ranges", help="a_b or a_b_c_d: train[a:b] (and test[c:d])")
    p.add_argument(
        "--kernel", choices=sorted(_KERNELS), default="trace",
        help="trace: (N1, N2) averaged over outputs; pntk: sum of logits / sqrt(O); full: (N1, N2, O, O)",
    )
    p.add_argument("--implementation", help=f"ntk_fn implementation: {choices()}; default: auto")
    p.add_argument("--batch-size", type=int, help="samples per tile side (default: from the memory budget)")
    p.add_argument("--memory-budget", help="bytes or e.g. 4GB (default: half the available RAM, 80%% of free GPU memory)")
    p.add_argument("--out", type=Path, default=Path("out/ntk.npy"), help="output .npy (default out/ntk.npy)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True, help="continue an interrupted run (default) or start over")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a file at --out that is not an output of ntkfunc (by default it is refused and left as it is)")
    p.add_argument("--devices", help="'all' or a comma-separated list such as cuda:0,cuda:1 (default: the model's device)")
    p.add_argument("--device", default="cpu", help="device the model is moved to (default cpu)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--seed", type=int, default=0, help="seed set before the model factory runs (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--sketch-dim", type=int, help="a sketched kernel with this many features per output (ntkfunc.Sketch); default: exact")
    p.add_argument("--sketch-seed", type=int, default=0, help="seed of the sketch's projection (default 0)")
    p.add_argument("--sketch-kind", default="auto", help="auto (default), countsketch, tensorsketch or gaussian")
    p.add_argument("--features", type=Path, help="folder for the sketch's features .npy (default: <out>.features)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from ntkfunc._dataset.pipeline import kernel_matrix

    try:
        args = parser().parse_args(argv)
        dtype = getattr(torch, args.dtype)
        _check_paths(args)
        model = _model(args.model, args.weights, args.seed, dtype, args.device)
        x1, x2, desc = _data(args.data, args.test, args.ranges, dtype)
        impl = _implementation(args.implementation)
        if args.batch_size is not None and args.batch_size < 1:
            raise UsageError(f"--batch-size {args.batch_size}: expected a positive number of samples")
        _check_budget(args.memory_budget)
        devices = _devices(args.devices)
        if args.out.is_dir():
            raise UsageError(f"--out {args.out}: is a directory; expected the path of a .npy file to write, e.g. {args.out / 'ntk.npy'}")
        sketch = _sketch(args.sketch_dim, args.sketch_seed, args.sketch_kind)
        if args.out.suffix != ".npy":
            raise UsageError(f"--out {args.out}: expected a path ending in .npy")
        from ntkfunc.module import from_module

        f, params = from_module(model.eval())
        _check_model_runs(f, params, x1, x2, args.model, desc)
    except UsageError as err:
        print(f"ntkfunc compute: error: {err}", file=sys.stderr)
        return 2

    n1, n2 = _count(x1), _count(x1) if x2 is None else _count(x2)
    n_params = sum(p.numel() for p in params.values())
    how = "" if sketch is None else f" sketched (dim={sketch.dim}, seed={sketch.seed}, kind={sketch.kind})"
    print(f"ntkfunc compute: {args.kernel} eNTK{how} of {args.model} ({n_params:,} parameters) on {desc}: {n1} x {n2} -> {args.out}")
    start = time.perf_counter()
    try:
        k = kernel_matrix(
            f, params, x1, x2, implementation=impl, batch_size=args.batch_size, memory_budget=args.memory_budget,
            out=str(args.out), resume=args.resume, progress=not args.no_progress, devices=devices, sketch=sketch,
            features=args.features, overwrite=args.overwrite, **_KERNELS[args.kernel],
        )
    except (ValueError, TypeError, MemoryError, FloatingPointError, RuntimeError, OSError) as err:
        # e.g. another writer, a changed job, a full disk (whose OSError's text is the message, without "[Errno 28]")
        text = err.strerror if isinstance(err, OSError) and err.strerror and err.filename is None else str(err)
        print(f"ntkfunc compute: error: {text}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    print(
        f"  kernel {tuple(k.shape)} {str(k.dtype).replace('torch.', '')} ({fmt_bytes(k.numel() * k.element_size())}) in "
        f"{seconds:.1f} s ({k.numel() / max(seconds, 1e-9):.3g} entries/s); saved {args.out}"
    )
    if sketch is not None:
        _report_sketch(args.out)
    return 0


def _check_paths(args: argparse.Namespace) -> None:
    """``--out`` is none of the inputs (nor inside a data folder); ``--features`` is a folder and comes with ``--sketch-dim``."""
    out = args.out.resolve()
    for flag, value in (("--data", args.data), ("--test", args.test), ("--weights", args.weights)):
        if value is None or (flag == "--data" and not Path(value).exists()):
            continue  # a built-in dataset name (or a missing file, reported with the data)
        source = Path(value).resolve()
        if out == source or (args.out.exists() and Path(value).exists() and args.out.samefile(value)):
            raise UsageError(f"--out {args.out}: is the {flag} file; expected another path for the kernel (it would replace "
                             "the input it is computed from)")
        if source.is_dir() and source in out.parents:
            raise UsageError(f"--out {args.out}: is inside the {flag} folder {value}, whose .npy files are the samples; "
                             "expected a path outside it")
    if args.features is not None and args.sketch_dim is None:
        raise UsageError(f"--features {args.features}: is the folder of the sketch's features; expected --sketch-dim with it "
                         "(or no --features for the exact kernel)")
    if args.features is not None and args.features.exists() and not args.features.is_dir():
        raise UsageError(f"--features {args.features}: is a file; expected a folder for the features files (or a path where "
                         "one can be made)")


def _sketch(dim: int | None, seed: int, kind: str) -> Any:
    """The ``Sketch`` of ``--sketch-dim/--sketch-seed/--sketch-kind`` (None: the exact kernel)."""
    if dim is None:
        return None
    from ntkfunc.sketch import Sketch

    try:
        return Sketch(dim, seed, kind)
    except ValueError as err:
        flag = {"dim": "--sketch-dim", "seed": "--sketch-seed", "kind": "--sketch-kind"}
        name = next((v for k, v in flag.items() if f"Sketch({k}=" in str(err)), "--sketch-dim")
        raise UsageError(f"{name}: {str(err).split(': ', 1)[1]}") from None


def _report_sketch(out: Path) -> None:
    """The resolved sketch and its error estimate, from the output's manifest."""
    import json

    manifest = json.loads(Path(str(out) + ".manifest.json").read_text())
    record = manifest["fingerprint"]["sketch"]
    run = manifest.get("sketch_run", {})
    err = run.get("error_estimate", {}).get("relative_frobenius")
    est = "" if err is None else f"; estimated relative Frobenius error {err:.3g} (re-sketched features)"
    print(f"  sketch: {record['resolved']}{' (exact)' if record['exact'] else ''}{est}; features in {', '.join(p for p in run.get('features', []) if p)}")


def _model(spec: str, weights: Path | None, seed: int, dtype: torch.dtype, device: str) -> torch.nn.Module:
    m = re.fullmatch(r"([A-Za-z_][\w.]*):([A-Za-z_]\w*)", spec)
    if not m:
        raise UsageError(f"--model {spec!r}: expected package.module:factory, e.g. {DEFAULT_MODEL}")
    try:
        module = importlib.import_module(m.group(1))
    except ImportError as err:
        raise UsageError(f"--model {spec!r}: cannot import {m.group(1)} ({err})") from err
    factory = getattr(module, m.group(2), None)
    if not callable(factory):
        raise UsageError(f"--model {spec!r}: {m.group(1)} has no callable {m.group(2)}")
    target = _device(device, "--device")
    torch.manual_seed(seed)
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"--model {spec!r}: the factory returned a {type(model).__name__}; expected a torch.nn.Module")
    if weights is not None:
        try:
            model.load_state_dict(_state_dict(weights))
        except RuntimeError as err:  # keys or shapes of another model
            detail = " ".join(str(err).split())
            raise UsageError(f"--weights {weights}: not the weights of --model {spec} ({detail[:300]}{'...' if len(detail) > 300 else ''}); "
                             "expected a state_dict saved from the same model") from None
    try:
        return model.to(device=target, dtype=dtype)
    except (RuntimeError, AssertionError) as err:
        raise UsageError(f"--device {device!r}: {str(err).splitlines()[0]}") from None


def _device(text: str, flag: str) -> torch.device:
    """The device ``text`` names, refused when it is not one or this machine does not have it."""
    try:
        device = torch.device(text.strip())
    except (RuntimeError, ValueError):
        raise UsageError(f"{flag} {text!r}: is not a device; expected e.g. cpu, cuda or cuda:1") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"{flag} {text!r}: this machine has no CUDA device (torch {torch.__version__}); expected cpu")
        if device.index is not None and device.index >= count:
            raise UsageError(f"{flag} {text!r}: this machine has {count} CUDA device(s); expected cuda:0 to cuda:{count - 1}")
    return device


def _state_dict(weights: Path) -> dict[str, Any]:
    """The state_dict in ``weights``, loaded with ``weights_only=True`` (no code in the file runs)."""
    try:
        state = _load(weights)
    except pickle.UnpicklingError as err:  # weights_only=True refused something that is not tensors and containers
        raise UsageError(
            f"--weights {weights}: not a state_dict saved with torch.save(model.state_dict(), path): it holds objects that "
            f"torch.load(weights_only=True) does not run ({str(err).strip().splitlines()[0][:160]})"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise UsageError(f"--weights {weights}: cannot read it ({str(err).strip().splitlines()[0]}); expected a file saved "
                         "with torch.save(model.state_dict(), path)") from None
    if not isinstance(state, dict):
        raise UsageError(f"--weights {weights}: holds a {type(state).__name__}; expected a state_dict (a dict of tensors "
                         "by parameter name) saved with torch.save(model.state_dict(), path)")
    return state


def _digest_rows(data: Any, start: int, stop: int) -> str:
    """sha256 of rows ``start:stop`` of a source: every byte of an array's rows, of a folder's files."""
    if isinstance(data, (_Cast, _Folder, _Named)):
        return data.digest(start, stop)
    h = hashlib.sha256(f"{type(data).__name__}:{start}:{stop}".encode())
    step = 256
    for i in range(start, stop, step):
        h.update(np.ascontiguousarray(np.asarray(data[i : min(i + step, stop)])).tobytes())
    return h.hexdigest()


class _Rows(Dataset):
    """Rows ``start:stop`` of an array-like or dataset, without loading them."""

    def __init__(self, data: Any, start: int, stop: int) -> None:
        self.data, self.start, self.stop = data, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> Any:
        if not 0 <= i < len(self):
            raise IndexError(i)
        item = self.data[self.start + i]
        return torch.from_numpy(np.array(item)) if isinstance(item, np.ndarray) else item

    def __ntkfunc_fingerprint__(self) -> str:
        return _digest_rows(self.data, self.start, self.stop)


class _Concat(ConcatDataset):
    """Row ranges one after another (train rows, then test rows), fingerprinted part by part."""

    def __ntkfunc_fingerprint__(self) -> str:
        return hashlib.sha256("|".join(str(getattr(d, FINGERPRINT_ATTR)()) for d in self.datasets).encode()).hexdigest()


class _Cast(Dataset):
    """Items' inputs cast to a floating dtype (integer inputs are kept)."""

    def __init__(self, data: Any, dtype: torch.dtype) -> None:
        self.data, self.dtype = data, dtype

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.data[i]
        x = item[0] if isinstance(item, (tuple, list)) else item
        x = torch.as_tensor(x)
        return x.to(self.dtype) if x.is_floating_point() or x.dtype == torch.uint8 else x

    def __ntkfunc_fingerprint__(self) -> str:
        return self.digest(0, len(self))

    def digest(self, start: int, stop: int) -> str:
        return f"{self.dtype}:{_digest_rows(self.data, start, stop)}"


class _Folder(Dataset):
    """Per-sample ``.npy`` / ``.pt`` files under a folder, sorted by path."""

    def __init__(self, root: Path) -> None:
        self.files = sorted(p for p in root.rglob("*") if p.suffix in (".npy", ".pt") and p.is_file())

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor | np.ndarray:
        p = self.files[i]
        try:
            return torch.from_numpy(np.load(p)) if p.suffix == ".npy" else _tensor_of(_load(p), p)
        except pickle.UnpicklingError:  # weights_only=True refused to run what the pickle holds: nothing in the file ran
            raise ValueError(f"{p}: holds Python objects (a pickle) that torch.load(weights_only=True) does not run; expected a "
                             ".npy array or a .pt tensor saved with torch.save") from None
        except (OSError, RuntimeError, EOFError, ValueError) as err:
            detail = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
            raise ValueError(f"{p}: cannot read it ({detail}); expected a .npy array or a .pt tensor saved with torch.save") from None

    def __ntkfunc_fingerprint__(self) -> str:
        return self.digest(0, len(self.files))

    def digest(self, start: int, stop: int) -> str:
        """sha256 of the names and bytes of files ``start:stop``."""
        h = hashlib.sha256()
        for p in self.files[start:stop]:
            h.update(f"{p.name}:{p.stat().st_size};".encode())
            with open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        return h.hexdigest()


class _Named:
    """Named inputs (a model's keyword inputs), one array or tensor per name, samples along axis 0.

    ``rows(a, b)`` is the dict of rows ``a:b`` that ``kernel_matrix`` takes (memory maps stay memory maps); an item is one
    sample's dict, as a Dataset gives it (the training rows then the test rows).
    """

    def __init__(self, arrays: dict[str, Any], where: Any, dtype: torch.dtype) -> None:
        if not arrays:
            raise UsageError(f"{where}: holds no arrays; expected named inputs, samples along axis 0")
        self.arrays: dict[str, Any] = {}
        for name, a in arrays.items():
            if not isinstance(a, (np.ndarray, torch.Tensor)) or a.ndim == 0:
                got = f"a 0-d {type(a).__name__}" if isinstance(a, (np.ndarray, torch.Tensor)) else f"a {type(a).__name__}"
                raise UsageError(f"{where}: {name!r} is {got}; expected every named input to be an array with its samples along "
                                 "axis 0")
            self.arrays[name] = _as_dtype(a, dtype)
        sizes = {name: len(a) for name, a in self.arrays.items()}
        if len(set(sizes.values())) > 1:
            raise UsageError(f"{where}: its arrays hold different numbers of samples ({', '.join(f'{k}: {n}' for k, n in sizes.items())}); "
                             "expected every named input to hold the same samples along axis 0")
        self.n = next(iter(sizes.values()))

    def __len__(self) -> int:
        return self.n

    def rows(self, start: int, stop: int) -> dict[str, Any]:
        return {name: a[start:stop] for name, a in self.arrays.items()}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(np.array(a[i])) if isinstance(a, np.ndarray) else a[i] for name, a in self.arrays.items()}

    def keys(self) -> list[str]:
        return list(self.arrays)

    def digest(self, start: int, stop: int) -> str:
        h = hashlib.sha256(f"named:{start}:{stop}".encode())
        for name, a in self.arrays.items():
            h.update(f"{name}:{tuple(a.shape)}:{a.dtype};".encode())
            for i in range(start, stop, 256):
                part = a[i : min(i + 256, stop)]
                h.update(part.contiguous().numpy().tobytes() if isinstance(part, torch.Tensor) else np.ascontiguousarray(part).tobytes())
        return h.hexdigest()


def _as_dtype(a: Any, dtype: torch.dtype) -> Any:
    """Floating arrays in ``dtype`` (a memory map of another float dtype is read and cast); others as they are."""
    if isinstance(a, torch.Tensor):
        return a.to(dtype) if a.is_floating_point() else a
    if a.dtype.kind == "f" and a.dtype != np.dtype(str(dtype).replace("torch.", "")):
        return np.asarray(a, dtype=str(dtype).replace("torch.", ""))
    return a


_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1",
                       "BOOL": "?"}


def _safetensors(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a ``.safetensors`` file, memory-mapped: its JSON header is parsed here, no code in the file runs."""
    import json
    import struct

    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (size,) = struct.unpack("<Q", head)
        if size > 100 << 20:
            raise ValueError(f"a header of {size} bytes")
        header = json.loads(fh.read(size))
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        kind = _SAFETENSORS_DTYPES.get(str(info.get("dtype")))
        if kind is None:
            raise ValueError(f"{name!r} has dtype {info.get('dtype')}, which numpy cannot map; expected one of "
                             f"{', '.join(_SAFETENSORS_DTYPES)}")
        begin, end = (int(v) for v in info["data_offsets"])
        shape = tuple(int(d) for d in info["shape"])
        if end - begin != int(np.prod(shape)) * np.dtype(kind).itemsize:
            raise ValueError(f"{name!r}: its data offsets do not match its shape {shape}")
        out[name] = np.memmap(path, dtype=kind, mode="r", offset=8 + size + begin, shape=shape) if shape and shape[0] else np.zeros(shape, kind)
    return out


def _named_or_inputs(obj: dict[str, Any], where: Any, dtype: torch.dtype) -> Any:
    """A file's dict: the ``"x"`` entry as the inputs, else every entry as named inputs."""
    if "x" in obj:
        x = obj["x"]
        x = torch.from_numpy(np.array(x)) if isinstance(x, np.ndarray) and not isinstance(x, np.memmap) else x
        if not isinstance(x, (torch.Tensor, np.ndarray)):
            raise UsageError(f"{where}: its 'x' is a {type(x).__name__}; expected a tensor of inputs, samples along axis 0")
        return _as_dtype(x, dtype)
    return _Named(obj, where, dtype)


def _count(x: Any) -> int:
    """Samples in a ``kernel_matrix`` input: a tensor's, an array's or a Dataset's length, the first leaf's of a dict."""
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def _load(path: Path) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and containers only, no code in the file runs (quietly: torch
    warns about pickle protocols on the way)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True)


def _tensor_of(obj: Any, where: Any) -> torch.Tensor:
    if isinstance(obj, dict) and "x" in obj:
        obj = obj["x"]
    elif isinstance(obj, (tuple, list)) and obj:
        obj = obj[0]
    if isinstance(obj, np.ndarray):
        obj = torch.from_numpy(obj)
    if not isinstance(obj, torch.Tensor):
        raise UsageError(f"{where}: holds a {type(obj).__name__}; expected a tensor, (inputs, ...) or {{'x': inputs}}")
    return obj


def _source(spec: str, dtype: torch.dtype, what: str) -> Any:
    """A tensor, memory-mapped array or Dataset for ``spec`` (no range)."""
    path = Path(spec)
    if spec == "digits":
        from ntkfunc.datasets import load_digits

        return load_digits(dtype)[0]
    if path.is_dir():
        folder = _Folder(path)
        if not len(folder):
            raise UsageError(f"{what} {spec}: the folder has no .npy or .pt files")
        return _Cast(folder, dtype)
    if not path.is_file():
        names = ", ".join(sorted(_BUILTIN_TRAIN))
        raise UsageError(f"{what} {spec!r}: no such file or folder; expected one of the built-in datasets ({names}), a .npy/.pt file or a folder")
    try:
        if path.suffix == ".npy":
            arr = np.load(path, mmap_mode="r")
            if arr.dtype.kind == "f" and arr.dtype != np.dtype(str(dtype).replace("torch.", "")):
                return _Cast(arr, dtype)
            return arr
        if path.suffix == ".pt":
            obj = _load(path)
            if isinstance(obj, dict) and "x" not in obj:
                return _Named(obj, f"{what} {spec}", dtype)
            t = _tensor_of(obj, path)
            return t.to(dtype) if t.is_floating_point() else t
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
            return _named_or_inputs(arrays, f"{what} {spec}", dtype)
        if path.suffix == ".safetensors":
            return _named_or_inputs(_safetensors(path), f"{what} {spec}", dtype)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, KeyError, TypeError) as err:
        raise UsageError(f"{what} {spec}: cannot read it ({str(err).strip().splitlines()[0][:160]})") from None
    raise UsageError(f"{what} {spec}: unknown file type {path.suffix!r}; expected .npy, .pt, .npz or .safetensors")


def _parse_ranges(text: str, what: str) -> list[int]:
    m = re.fullmatch(r"(\d+)_(\d+)(?:_(\d+)_(\d+))?", text)
    if not m:
        raise UsageError(f"{what} {text!r}: expected a_b or a_b_c_d (train[a:b], test[c:d])")
    return [int(g) for g in m.groups() if g is not None]


def _data(spec: str, test: str | None, ranges: str | None, dtype: torch.dtype) -> tuple[Any, Any, str]:
    """``(x1, x2, description)``; ``x2`` is None for a symmetric kernel."""
    name, bounds = spec, None
    m = re.fullmatch(r"([A-Za-z][\w-]*?)_(\d+_\d+(?:_\d+_\d+)?)", spec)
    if m and m.group(1) in _BUILTIN_TRAIN:
        name, bounds = m.group(1), _parse_ranges(m.group(2), "--data")
    if ranges is not None:
        if bounds is not None:
            raise UsageError(f"--data {spec} already gives sample ranges; expected no --range {ranges}")
        bounds = _parse_ranges(ranges, "--range")
    data = _source(name, dtype, "--data")
    if name in _BUILTIN_TRAIN:
        if test is not None:
            raise UsageError(f"--test {test}: {name} has its own test split; expected --test only with file or folder data")
        cut = _BUILTIN_TRAIN[name]
        train, test_data = data[:cut], data[cut:]
    else:
        train = data
        test_data = None if test is None else _source(test, dtype, "--test")
        if isinstance(train, _Named) != isinstance(test_data, _Named) and test_data is not None or (
                isinstance(train, _Named) and isinstance(test_data, _Named) and train.keys() != test_data.keys()):
            keys = ", ".join(train.keys()) if isinstance(train, _Named) else "one array"
            got = ", ".join(test_data.keys()) if isinstance(test_data, _Named) else "one array"
            raise UsageError(f"--test {test}: holds {got}; expected the inputs of --data ({keys})")
    a, b = (0, len(train)) if bounds is None else bounds[:2]
    if not 0 <= a < b <= len(train):
        raise UsageError(f"sample range {a}_{b}: expected 0 <= a < b <= {len(train)} (training samples of {name})")
    rows = [(train, a, b)]
    if bounds is not None and len(bounds) == 4 or (test_data is not None and bounds is None):
        c, d = bounds[2:] if bounds is not None and len(bounds) == 4 else (0, len(test_data))
        if test_data is None:
            raise UsageError(f"sample range {c}_{d} of a test split: {name} has none; pass --test FILE")
        if not 0 <= c < d <= len(test_data):
            raise UsageError(f"sample range {c}_{d}: expected 0 <= c < d <= {len(test_data)} (test samples)")
        rows.append((test_data, c, d))
    desc = f"{name} train[{a}:{b}]" + (f" + test[{rows[1][1]}:{rows[1][2]}]" if len(rows) > 1 else "")
    if len(rows) == 1:
        return _slice(train, a, b), None, desc
    x1: Any = _Concat([_Rows(src, lo, hi) for src, lo, hi in rows])
    return x1, _slice(train, a, b), desc


def _slice(data: Any, a: int, b: int) -> Any:
    """Rows ``a:b`` as ``kernel_matrix`` reads them: a tensor, an array or a dict of them (sliced, not copied), else a Dataset."""
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return data[a:b]
    return data.rows(a, b) if isinstance(data, _Named) else _Rows(data, a, b)


def _implementation(text: str | None) -> Any:
    """The implementation named by ``--implementation`` (checked by the engine registry), or None."""
    if text is None:
        return None
    value: Any = int(text) if text.strip().isdigit() else text
    try:
        return get_engine(value, api="--implementation").implementation
    except ValueError:
        raise UsageError(f"--implementation {text}: expected {choices()}") from None


def _check_budget(text: str | None) -> None:
    """``--memory-budget``: a UsageError unless it parses (``"2GB"``, bytes)."""
    if text is None:
        return
    try:
        parse_budget(text, torch.device("cpu"))
    except (TypeError, ValueError) as err:
        raise UsageError(f"--memory-budget: {err}") from err


def _devices(text: str | None) -> Any:
    if text is None or text == "all":
        return text
    out = []
    for d in text.split(","):
        try:
            torch.device(d.strip())
        except RuntimeError as err:
            raise UsageError(f"--devices {text!r}: {d!r} is not a device; expected 'all' or e.g. cuda:0,cuda:1") from err
        out.append(_device(d, "--devices"))
    return out


def _check_model_runs(f: Any, params: Any, x1: Any, x2: Any, spec: str, desc: str) -> None:
    """The model runs on the first sample of ``x1`` (and of ``x2``) and returns ``(N, outputs)``, else a usage error."""
    from ntkfunc._dataset.data import Samples

    try:
        s1 = Samples(x1, "--data")
        if x2 is not None and Samples(x2, "--data").spec != s1.spec:  # a train split of other inputs than the test split's
            raise UsageError(f"--test: holds other inputs than --data ({Samples(x2, '--data').spec} vs {s1.spec})")
        x = s1.get(0, 1)
    except (TypeError, ValueError, UsageError) as err:
        raise UsageError(f"--data: {err}") from err
    device = next((t.device for t in params.values()), torch.device("cpu"))
    x = torch.utils._pytree.tree_map(lambda t: t.to(device), x)
    shapes = {k: tuple(v.shape[1:]) for k, v in x.items()} if isinstance(x, dict) else tuple(x.shape[1:])
    try:
        with torch.no_grad():
            y = f(params, x)
    except Exception as err:  # any failure of the user's model on the data is a usage error
        raise UsageError(f"--model {spec} fails on {desc} (sample shape {shapes}): {str(err).splitlines()[0]}") from err
    if not isinstance(y, torch.Tensor) or y.ndim < 2:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise UsageError(f"--model {spec} returns {got} on {desc}; expected a tensor of shape (N, outputs)")
