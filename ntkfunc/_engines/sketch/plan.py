"""Which sketch each parameter gets, by which route, at what predicted cost: the one place this is decided.

Kinds (what ``Π`` is; the features depend on it):

- ``"countsketch"``: :mod:`~ntkfunc._engines.sketch.countsketch` (one ``±1`` per row of ``Π``;
  exact when ``dim`` holds every parameter);
- ``"tensorsketch"``: :mod:`~ntkfunc._engines.sketch.tensorsketch` (hashes of rows and columns
  combined; from a layer's cotangents and inputs by FFTs);
- ``"gaussian"``: :mod:`~ntkfunc._engines.sketch.gaussian` (dense, i.i.d. ``N(0, 1/dim)``);
- ``"auto"``: per parameter, the cheapest kind whose predicted error is no worse than a
  Gaussian projection's at the same ``dim`` (:func:`variance_factor` at most
  :data:`VARIANCE_TOLERANCE`): TensorSketch where its FFTs are predicted cheaper than forming and
  count-sketching the gradient and the parameter's rows fit in ``dim``, the count sketch
  elsewhere, and the count sketch everywhere when that makes the sketch exact.

Routes (how the features are computed; they never change the features): ``"factors"`` (the
count sketch of ``G = c x`` from permuted factors, one ``bmm``), ``"fft"`` (TensorSketch from
``c`` and ``x``), ``"formed"`` (the per-sample gradient formed, then projected). The fast
routes need the structured capture (implementations 3 and ``"auto"``) of a 2-D convolution
(``groups=1``) or ``F.linear`` weight; everything else is formed.

``auto`` decides from a cost model (:data:`RATES`: seconds per GEMM FLOP, per element moved,
per FFT butterfly, measured on a 2-core x86 CPU; see ``benchmarks/bench_sketch.py``) applied
to the parameter's shape, its positions per sample ``S`` and the outputs per sample ``O``,
never from timings: the same model, input shape and ``dim`` give the same ``Π`` on every
machine, device count and tiling. The plan (:class:`SketchPlan`) records each choice and
its predicted cost, and prints as a table.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from ntkfunc._core.pytree import display_name
from ntkfunc._engines.sketch import countsketch
from ntkfunc.rules import Factorable

KINDS = ("countsketch", "tensorsketch", "gaussian")
"""The sketches a parameter can get (``Sketch(kind=...)`` also takes ``"auto"``)."""

ROUTES = ("factors", "fft", "formed")

TABLES = {"countsketch": "signed folds of wide rows", "tensorsketch": "columns without collisions", "gaussian": "float32 draws"}
"""How each kind draws ``Π`` from the seed, recorded with the features (:meth:`SketchPlan.record`): a new
entry whenever the drawn values change, so that features files of another version are not reused."""

VARIANCE_TOLERANCE = 1.1
"""``auto`` takes a kind for a parameter only if its predicted error variance is at most this times a
Gaussian projection's at the same ``dim`` (:func:`variance_factor`)."""

RATES = {"gemm_flop": 1 / 150e9, "element": 0.5e-9, "fft_unit": 1.3e-10}
"""Seconds per matrix-product FLOP, per element read or written, per ``n log2 n`` unit of an FFT.

Measured with ``python benchmarks/bench_sketch.py rates`` on the development machine (2 shared
cores): float32 GEMMs at ~150 GFLOP/s inside the per-layer products, ~2 GB/s of scattered
element traffic, a length-8192 real FFT in ~14 us. Only their ratios matter to ``auto``.
"""


@dataclasses.dataclass(frozen=True)
class ParamSketch:
    """One parameter's sketch: kind, route and predicted seconds per sample of each kind."""

    leaf: int
    name: str
    shape: tuple[int, ...]
    kind: str
    route: str
    seconds: float
    alternatives: tuple[tuple[str, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class SketchPlan:
    """Every parameter's sketch (documented order), and whether the whole ``Π`` is exact (orthogonal).

    ``record()`` is what manifests and fingerprints keep; ``str(plan)`` is a table.
    """

    dim: int
    seed: int
    requested: str
    exact: bool
    params: tuple[ParamSketch, ...]

    @property
    def kind(self) -> str:
        """The resolved kind: one name, or ``"auto"``'s mix as ``"tensorsketch+countsketch"``."""
        kinds = sorted({p.kind for p in self.params}, key=KINDS.index)
        return "+".join(kinds)

    def record(self) -> dict:
        """``{"kind", "dim", "seed", "resolved", "exact", "per_parameter", "tables"}`` for a manifest (JSON);
        ``tables``: the :data:`TABLES` version of each kind used (features files drawn otherwise have
        another fingerprint)."""
        rec = {
            "kind": self.requested, "dim": self.dim, "seed": self.seed, "resolved": self.kind, "exact": self.exact,
            "per_parameter": {p.name: p.kind for p in self.params},
        }
        used = {p.kind for p in self.params}
        rec["tables"] = {k: v for k, v in TABLES.items() if k in used}
        return rec

    @property
    def seconds(self) -> float:
        """Predicted projection seconds per sample (the gradient pass itself not included)."""
        return sum(p.seconds for p in self.params)

    def __str__(self) -> str:
        rows = [("parameter", "shape", "kind", "route", "ms/sample", "alternatives (ms/sample)")]
        for p in self.params:
            alt = ", ".join(f"{k} {1e3 * s:.3g}" for k, s in p.alternatives)
            rows.append((p.name, "x".join(map(str, p.shape)) or "scalar", p.kind, p.route, f"{1e3 * p.seconds:.3g}", alt))
        exact = "exact (orthogonal)" if self.exact else "unbiased"
        rows.append(("total", "", self.kind, exact, f"{1e3 * self.seconds:.3g}", f"dim={self.dim}, seed={self.seed}, kind={self.requested!r}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# --- variance -----------------------------------------------------------------------------------


def variance_factor(kind: str, shape: Sequence[int], dim: int, outputs: int) -> float:
    """The error variance of ``kind`` on a parameter of ``shape``, relative to a Gaussian projection's at ``dim``,
    where the kernel is traced over ``outputs`` output entries per sample (the default of ``ntk_fn``).

    The count sketch's is a count sketch's (at most the Gaussian's: its hash has no collisions within
    a row of the parameter's matrix view, and rows wider than ``dim`` sign their folds independently,
    :mod:`~ntkfunc._engines.sketch.countsketch`), and so is TensorSketch's when the rows fit in
    ``dim`` (its column hash has no collisions then). TensorSketch of rows wider than ``dim``
    collides columns within a row, the same columns with the same signs in every row: the rows
    share the layer's input, so every output gets the same error, which a trace does not average
    (``outputs`` times a Gaussian's variance, when the outputs' errors would otherwise be
    independent: a last layer's, whose outputs are its rows).

    >>> variance_factor("tensorsketch", (10, 4096), 2048, 10), variance_factor("tensorsketch", (256, 1024), 2048, 10)
    (10.0, 1.0)
    >>> variance_factor("countsketch", (10, 4096), 2048, 10)
    1.0
    """
    if kind == "tensorsketch" and countsketch.matrix_view(shape)[1] > dim:
        return float(max(outputs, 2))  # one output: still collisions a Gaussian does not have
    return 1.0


# --- costs --------------------------------------------------------------------------------------


def _fft(dim: int) -> float:
    return RATES["fft_unit"] * dim * math.log2(max(dim, 2))


def formed_seconds(kind: str, numel: int, outputs: int, dim: int, fac: Factorable | None) -> float:
    """Forming the gradient (``O`` rows of ``numel``) and projecting it with ``kind``."""
    e, g = RATES["element"], RATES["gemm_flop"]
    form = outputs * numel * e + (2 * outputs * fac.positions * fac.rows * fac.cols * g if fac else 0.0)
    project = {"countsketch": 4 * outputs * numel * e, "tensorsketch": 5 * outputs * numel * e,
               "gaussian": 2 * outputs * numel * dim * g + outputs * dim * e}[kind]
    return form + project


def factors_seconds(fac: Factorable, outputs: int, dim: int) -> float:
    """The count sketch of ``G = c x`` from permuted factors: one ``bmm`` into bucket order, one fold."""
    e, g = RATES["element"], RATES["gemm_flop"]
    stride = countsketch.row_stride(fac.rows, fac.cols, dim)
    return (2 * outputs * fac.positions * fac.rows * stride * g + 2 * outputs * fac.rows * stride * e
            + 3 * fac.positions * fac.cols * e + 2 * outputs * fac.rows * fac.positions * e)


def fft_seconds(fac: Factorable, outputs: int, dim: int) -> float:
    """TensorSketch from ``c`` and ``x``: ``(O + 1) S`` forward FFTs, ``O`` inverse, the spectra's products."""
    e = RATES["element"]
    ffts = (outputs + 1) * fac.positions + outputs
    fill = 2 * (outputs + 1) * fac.positions * dim * e + (outputs * fac.rows + fac.cols) * fac.positions * 4 * e
    return ffts * _fft(dim) + fill + 4 * outputs * fac.positions * (dim // 2 + 1) * e


# --- resolution ----------------------------------------------------------------------------------


def resolve(kind: str, dim: int, seed: int, names: Sequence[str], shapes: Sequence[tuple[int, ...]], outputs: int,
            factorable: dict[int, Factorable], fast_routes: bool) -> SketchPlan:
    """The plan for parameters ``shapes`` (documented order) of a function with ``outputs`` outputs per sample.

    ``factorable``: parameter index -> its structure where the capture found a 2-D convolution
    or linear weight (the same whatever the implementation, so ``auto`` chooses alike);
    ``fast_routes``: whether the factors are available at run time (the structured capture).

    >>> p = resolve("auto", 8192, 0, ["w", "b"], [(4096, 4096), (4096,)], 1, {0: Factorable(4096, 4096, 1)}, True)
    >>> [(q.name, q.kind, q.route) for q in p.params]
    [('w', 'tensorsketch', 'fft'), ('b', 'countsketch', 'formed')]
    >>> resolve("auto", 64, 0, ["w"], [(3, 5)], 1, {0: Factorable(3, 5, 1)}, True).exact   # dim >= P: exact
    True
    """
    if kind not in KINDS and kind != "auto":
        raise ValueError(f"Sketch(kind={kind!r}): expected 'auto' or one of {list(KINDS)}")
    items = list(enumerate(shapes))
    cs_exact = countsketch.is_exact(items, dim)
    chosen: list[ParamSketch] = []
    for k, shape in items:
        numel = math.prod(shape)
        fac = factorable.get(k)
        costs: dict[str, tuple[str, float]] = {}  # kind -> (route, seconds)
        for name in KINDS:
            route, sec = "formed", formed_seconds(name, numel, outputs, dim, fac)
            if fac is not None and name == "countsketch":
                route, sec = ("factors", factors_seconds(fac, outputs, dim)) if fast_routes else (route, sec)
            if fac is not None and name == "tensorsketch":
                route, sec = ("fft", fft_seconds(fac, outputs, dim)) if fast_routes else (route, sec)
            costs[name] = (route, sec)
        if kind != "auto":
            pick = kind
        elif cs_exact or fac is None:
            pick = "countsketch"
        elif variance_factor("tensorsketch", shape, dim, outputs) > VARIANCE_TOLERANCE:
            pick = "countsketch"  # TensorSketch would be faster but less accurate than a Gaussian projection
        else:  # the decision is on the structured routes' costs, whatever this run's implementation
            pick = "tensorsketch" if fft_seconds(fac, outputs, dim) < factors_seconds(fac, outputs, dim) else "countsketch"
        alt = tuple((n, s) for n, (_, s) in costs.items() if n != pick and n != "gaussian")
        chosen.append(ParamSketch(k, display_name(names[k]), tuple(shape), pick, costs[pick][0], costs[pick][1], alt))
    exact = all(p.kind == "countsketch" for p in chosen) and cs_exact
    return SketchPlan(dim, seed, kind, exact, tuple(chosen))
