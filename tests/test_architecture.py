"""The middle layer: one engine registry, errors named after the public function, module boundaries."""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import pytest
import torch

import ntkfunc
from ntkfunc._engines import ENGINES, engines, get_engine

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ntkfunc"


def _mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    f, params = ntkfunc.from_module(model)
    return f, params, torch.randn(5, 4), torch.randn(3, 4)


def _init(gen):
    return {"w": torch.randn(4, 3, generator=gen)}


def _g(p, x):
    return x @ p["w"]


# --- every public function names itself ----------------------------------------------

BAD_IMPLEMENTATION = [
    ("ntk_fn", lambda f, p, x1, x2: ntkfunc.ntk_fn(f, implementation=7)),
    ("kernel_fn", lambda f, p, x1, x2: ntkfunc.kernel_fn(f, implementation=7)),
    ("pntk_fn", lambda f, p, x1, x2: ntkfunc.pntk_fn(f, implementation=7)),
    ("monte_carlo_kernel_fn", lambda f, p, x1, x2: ntkfunc.monte_carlo_kernel_fn(_g, _init, 2, implementation=7)),
    ("kernel_matrix", lambda f, p, x1, x2: ntkfunc.kernel_matrix(f, p, x1, implementation=7)),
    ("feature_matrix", lambda f, p, x1, x2: ntkfunc.feature_matrix(f, p, x1, ntkfunc.Sketch(8), implementation=7)),
]


@pytest.mark.parametrize("api,call", BAD_IMPLEMENTATION, ids=[a for a, _ in BAD_IMPLEMENTATION])
def test_bad_implementation_is_reported_by_the_function_called(api, call):
    """Regression: kernel_fn(implementation=7) and others reported their error as coming from ntk_fn."""
    f, params, x1, x2 = _mlp()
    with pytest.raises(ValueError, match=rf"^{api}: implementation=7; expected 'auto' or one of \[0, 1, 2, 3\]"):
        call(f, params, x1, x2)


BAD_AXES = [
    ("ntk_fn", lambda f, p, x1, x2: ntkfunc.ntk_fn(f, trace_axes=(5,))(x1, x2, p)),
    ("kernel_fn", lambda f, p, x1, x2: ntkfunc.kernel_fn(f, trace_axes=(5,))(x1, x2, "ntk", p)),
    ("nngp_fn", lambda f, p, x1, x2: ntkfunc.nngp_fn(f, trace_axes=(5,))(x1, x2, p)),
    ("explain", lambda f, p, x1, x2: ntkfunc.explain(f, p, x1, trace_axes=(5,))),
    ("kernel_matrix", lambda f, p, x1, x2: ntkfunc.kernel_matrix(f, p, x1, trace_axes=(5,), progress=False)),
]


@pytest.mark.parametrize("api,call", BAD_AXES, ids=[a for a, _ in BAD_AXES])
def test_shared_axis_checks_name_the_caller(api, call):
    f, params, x1, x2 = _mlp()
    with pytest.raises(ValueError, match=rf"^{api}\(trace_axes=\(5,\)\): axis 5 out of range for an output of ndim 2"):
        call(f, params, x1, x2)


def test_shared_input_checks_name_the_caller():
    f, params, x1, _ = _mlp()
    with pytest.raises(ValueError, match=r"^kernel_fn: x1 and x2 have mismatched feature shapes"):
        ntkfunc.kernel_fn(f)(x1, torch.randn(3, 5), "ntk", params)
    with pytest.raises(ValueError, match=r"^pntk_fn|^ntk_fn"):  # pntk_fn is the NTK of the sum of logits
        ntkfunc.pntk_fn(f)(x1, torch.randn(3, 5), params)
    with pytest.raises(TypeError, match=r"^explain: params\['w'\] is a str"):
        ntkfunc.explain(f, {"w": "no"}, x1)


@pytest.mark.parametrize("value", [True, False, 1.0, "two", None])
def test_get_engine_refuses_what_is_not_an_implementation(value):
    with pytest.raises(ValueError, match=r"^kernel_matrix: implementation=.*; expected 'auto' or one of"):
        get_engine(value, api="kernel_matrix")
    if value is not None:  # None means "auto" for kernel_matrix only
        f, params, x1, _ = _mlp()
        with pytest.raises(ValueError, match=r"^kernel_matrix: implementation="):
            ntkfunc.kernel_matrix(f, params, x1, implementation=value, progress=False)


def test_get_engine_accepts_numbers_members_and_auto():
    for e in engines():
        assert get_engine(int(e.implementation), api="t") is e
        assert get_engine(e.implementation, api="t") is e
    assert get_engine("auto", api="t") is get_engine(" Auto ", api="t") is ENGINES[0]


def test_registry_is_read_only_and_complete():
    with pytest.raises(TypeError):
        ENGINES[9] = ENGINES[1]  # type: ignore[index]
    assert [e.implementation for e in engines()] == list(ntkfunc.Implementation)
    assert all(dataclasses.is_dataclass(e) for e in engines())


# --- module boundaries ---------------------------------------------------------------


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def _package_of(module: str) -> str:
    """``ntkfunc._engines.structured.plan`` -> ``ntkfunc._engines``; top-level modules -> ``ntkfunc``."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or (len(parts) == 2 and parts[1].startswith("_") and (PACKAGE / parts[1]).is_dir()) else "ntkfunc"


def test_no_module_imports_another_packages_private_names():
    """Across package boundaries only public names are imported (``_core`` is the shared place)."""
    offences = []
    for module, path in _modules():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ntkfunc"):
                if _package_of(node.module) == _package_of(module):
                    continue
                for alias in node.names:
                    if alias.name.startswith("_") and alias.name != "__version__":
                        offences.append(f"{module}: from {node.module} import {alias.name}")
    assert not offences, offences


def test_implementations_are_validated_only_by_the_registry():
    text = {m: p.read_text() for m, p in _modules()}
    assert not [m for m, t in text.items() if "_IMPLS" in t]
    # no engine capability inferred from a signature (_core.calls reads a module's forward() for its calling convention)
    assert not [m for m, t in text.items() if "inspect.signature" in t and m != "ntkfunc._core.calls"]
    callers = [m for m, t in text.items() if "get_engine(" in t and m != "ntkfunc._engines.registry"]
    assert set(callers) >= {"ntkfunc.ntk", "ntkfunc.empirical_kernel", "ntkfunc.monte_carlo", "ntkfunc.pntk",
                            "ntkfunc._dataset.pipeline", "ntkfunc._cli.compute"}


def test_planner_terms_exist_once():
    text = "\n".join(p.read_text() for _, p in _modules())
    assert text.count("SAFETY = ") == 1
    assert text.count("(2 * o + 1)") + text.count("2 * outputs_per_sample(problem) + 1") == 1



def test_row_chunks_are_sized_in_one_place():
    """Issue 20: the samples-per-pass cap and the quarter-of-the-budget rule were written in two modules."""
    text = {m: p.read_text() for m, p in _modules()}
    assert [m for m, t in text.items() if "\nCHUNK = " in t] == ["ntkfunc._engines.rows.source"]
    assert [m for m, t in text.items() if "0.25 * " in t and "// max(" in t] == ["ntkfunc._engines.rows.source"]
    assert sum(t.count("(1 + 2 * ") for t in text.values()) == 1

# --- issue 20: one route decision ---


def test_routes_are_decided_only_by_the_route_planner():
    """No second decider: the probing threshold, auto's minimum saving and the Gram-or-Jacobian
    comparison (``RouteCost.use_gram``, defined with the prices) are read only in the planner, which
    implementation 3, ``"auto"``, the per-sample rows and ``explain`` all ask."""
    import re

    planner = "ntkfunc._engines.structured.routes"
    policy = {"MIN_SAVING", "PROBE_FLOPS", "use_gram"}
    offences = []
    for module, path in _modules():
        if module == planner:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
            if name in policy:
                offences.append(f"{module}:{node.lineno}: {name}")
    assert not offences, offences
    text = {m: p.read_text() for m, p in _modules()}
    assert "PROBE_FLOPS = " in text[planner] and "MIN_SAVING = " in text[planner]
    readers = {m for m, t in text.items() if re.search(r"\broutes\.(decide|on_tile|for_rows|rows_plan|forced)\(", t)} - {planner}
    assert readers == {"ntkfunc._engines.structured.kernel", "ntkfunc._engines.rows.structured"}, readers
    # which path a contraction runs along (issue 23): chosen only in the planner, by price or measured seconds
    defining = {"ntkfunc._engines.structured.plan", "ntkfunc._engines.structured.contraction", "ntkfunc._engines.structured.input_gram"}
    choosers = {m for m, t in text.items() if re.search(r"\.run\([^)]*path=|\bPAIRED\b", t)} - {planner, *defining}
    assert not choosers, choosers
    gram_runners = {m for m, t in text.items() if re.search(r"gram_equation\([^\n]*\)\.run\(", t)}
    assert not gram_runners, f"Gram equations run outside routes.contract: {gram_runners}"
    asks = {m for m, t in text.items() if "route_plan(" in t} - {"ntkfunc._engines.structured.kernel"}
    assert asks == {"ntkfunc._engines.auto", "ntkfunc.explain"}, asks


# --- issue 20: per-layer maths in the rules ---


def _family_classes() -> set[str]:
    """Classes of the rule families (rules and their metadata; ``rules/base.py``'s are the shared interface)."""
    return {node.name for path in (PACKAGE / "rules").glob("*.py") if path.name not in ("base.py", "__init__.py")
            for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ClassDef)}


def _names_in(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}


def _outside_rules():
    for module, path in _modules():
        if module != "ntkfunc.rules" and not module.startswith("ntkfunc.rules."):
            yield module, ast.parse(path.read_text())


def test_no_caller_dispatches_on_a_rule_class():
    """A primitive's per-sample maths is its rule's method (``write_gradient``, ``factors``, ...): nothing outside
    ``ntkfunc/rules/`` asks ``isinstance(rule, Conv2d)``."""
    classes = _family_classes()
    assert {"Conv2d", "Linear", "ConvMeta", "LinearMeta"} <= classes
    offences = [
        f"{module}:{node.lineno}: {ast.unparse(node)}"
        for module, tree in _outside_rules() for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("isinstance", "issubclass")
        and len(node.args) == 2 and _names_in(node.args[1]) & classes
    ]
    assert not offences, offences


def test_capture_metadata_is_read_by_attribute_not_string_key():
    """A rule's settings are its frozen dataclass: no ``meta["kernel"]`` / ``meta.get("kernel")`` outside the rules."""

    def is_meta(node: ast.AST) -> bool:
        return (isinstance(node, ast.Name) and node.id == "meta") or (isinstance(node, ast.Attribute) and node.attr == "meta")

    offences = []
    for module, tree in _outside_rules():
        for node in ast.walk(tree):
            keyed = isinstance(node, ast.Subscript) and is_meta(node.value) and isinstance(node.slice, ast.Constant)
            got = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" and is_meta(node.func.value)
            if keyed or got:
                offences.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
    assert not offences, offences


def test_every_rule_of_the_zoo_captures_a_frozen_dataclass():
    """Typed capture metadata: each rule of the architecture zoo returns its own frozen dataclass."""
    from ntkfunc._core.problem import make_problem
    from ntkfunc._engines.structured import capture
    from tests.zoo import CASES

    seen = set()
    for case in CASES:
        f, params, x1, x2, vmap_axes = case.build(torch.float64)
        problem = make_problem(f, x1, x2, params, vmap_axes, (), ())
        for ev in capture.discover(problem).events:
            assert dataclasses.is_dataclass(ev.meta) and ev.meta.__dataclass_params__.frozen, (case.name, ev.rule.name, ev.meta)
            seen.add(ev.rule.name)
    assert {"linear", "conv2d", "conv1d", "layer_norm", "group_norm", "embedding", "matmul"} <= seen


def test_one_im2col():
    """Patches are gathered in ``rules/conv.py`` alone (``patches`` views; ``im2col``, the strided copy into reused buffers)."""
    offences = []
    for module, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if module != "ntkfunc.rules.conv" and isinstance(node, ast.Attribute) and node.attr in ("unfold", "im2col", "col2im"):
                offences.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
            named = isinstance(node, ast.FunctionDef) and ("im2col" in node.name or node.name.strip("_") == "patches")
            if named and module != "ntkfunc.rules.conv":
                offences.append(f"{module}:{node.lineno}: def {node.name}")
    assert not offences, offences


def test_one_work_buffer_class():
    """Reused work buffers come from ``_core.buffers.Buffers``: no second class, no hand-rolled ``workspace`` dict."""
    defs = [m for m, p in _modules() for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, ast.ClassDef) and node.name == "Buffers"]
    assert defs == ["ntkfunc._core.buffers"]
    text = {m: p.read_text() for m, p in _modules()}
    assert not [m for m, t in text.items() if "workspace: dict" in t or "def _workspace(" in t]


# --- issue 20: one writer ---


def _dataset_modules() -> dict[str, str]:
    return {m: p.read_text() for m, p in _modules() if m.startswith("ntkfunc._dataset")}


def _where(pattern: str) -> list[str]:
    import re

    return sorted(m for m, t in _dataset_modules().items() if re.search(pattern, t, re.MULTILINE))


def test_one_implementation_of_each_piece_of_the_writer():
    """Kernel outputs and features files share one file format, one lock, one rank-0 open and one runner."""
    assert _where(r"^def atomic_write\(") == ["ntkfunc._dataset.fileformat"]
    assert _where(r"^def _checksum\(") == ["ntkfunc._dataset.fileformat"]  # the manifest's checksum
    assert _where(r"\bFORMAT = ") == ["ntkfunc._dataset.fileformat"]
    assert _where(r"^def numpy_dtype\(|_NUMPY = ") == ["ntkfunc._dataset.fileformat"]
    assert _where(r"os\.fsync\(") == ["ntkfunc._dataset.fileformat", "ntkfunc._dataset.npyfile", "ntkfunc._dataset.store"]
    assert _where(r"^(?!\s*>>>).*OutputLock\.acquire\(") == ["ntkfunc._dataset.store"]  # one lock, taken by the one writer (doctests aside)
    assert _where(r"broadcast_int\(0\)") == ["ntkfunc._dataset.distributed"]  # one rank-0 open (Ranks.rank0_first)
    assert _where(r"rank0_first\(") == ["ntkfunc._dataset.distributed", "ntkfunc._dataset.store"]
    assert _where(r"threading\.Thread\(") == ["ntkfunc._dataset.runner"]  # one thread pool, one background committer
    assert _where(r"queue\.Queue\b") == ["ntkfunc._dataset.runner"]
    # entries are read through one read-only memory map and written in one place, with pwrite (issue 24: a write through a
    # memory map is a SIGBUS on a full disk, a pwrite an OSError); the lock writes its holder's pid
    assert _where(r"np\.memmap\(|open_memmap\(") == ["ntkfunc._dataset.fileformat"]
    assert _where(r"os\.pwrite\(") == ["ntkfunc._dataset.lock", "ntkfunc._dataset.npyfile"]
    from ntkfunc._dataset import features

    assert not [n for n in ("FeatureStore", "_run", "_open") if hasattr(features, n)]


def test_the_runner_calls_declared_capabilities_only():
    """No capability probing in the runner; the background committer calls the runner's public commit."""
    from ntkfunc._dataset import panels, runner

    text = (PACKAGE / "_dataset" / "runner.py").read_text()
    assert "hasattr(" not in text and "getattr(" not in text
    private = [n.attr for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Attribute)
               and isinstance(n.value, ast.Attribute) and n.value.attr == "runner" and n.attr.startswith("_")]
    assert not private, private
    declared = {"tile", "tiles", "release"}
    assert declared <= set(vars(panels.TileKernel))
    for kernel in (panels.RowPanels, panels.PerTileKernel):
        assert all(callable(getattr(kernel, n, None)) for n in declared), kernel
    assert callable(runner.Runner.commit)


def test_the_pipeline_plans_rows_instead_of_faking_an_engine():
    """No engine record is copied with another ``rows`` (or any field): a sketch plans a row source."""
    from ntkfunc._engines import Engine

    engine_fields = {f.name for f in dataclasses.fields(Engine)}
    offences = []
    for module, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("dataclasses.replace", "replace") and node.args:
                target = ast.unparse(node.args[0]).lower()
                if "engine" in target or engine_fields & {k.arg for k in node.keywords if k.arg} - {"kernel"}:
                    offences.append(f"{module}: {ast.unparse(node)}")
    assert not offences, offences
    pipeline_text = (PACKAGE / "_dataset" / "pipeline.py").read_text()
    assert ".manifest[" not in pipeline_text  # the store records what the run found (finish(record=...))


def test_a_job_has_one_field_per_fact():
    from ntkfunc._dataset.job import Job

    names = {f.name for f in dataclasses.fields(Job)}
    assert not names & {"fn", "fn_axes", "sketch_record", "rows_data"}, names  # derived: properties
    assert len(names) <= 12  # f, params, engine, s1, s2, trace, diag, pntk, nonfinite, precision, sketch, vmap_axes
