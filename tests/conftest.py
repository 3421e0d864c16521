"""Test-wide fixtures: the ``rules_forced`` variant of implementation 3 (see ``tests.zoo.implementations``),
``one_thread`` for modules of tiny kernels, and ``row_chunks`` (the chunk sizes the row sources run)."""

from __future__ import annotations

import pytest
import torch

from ntkfunc import rules


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "rules_forced: run the test inside ntkfunc.rules.forced() (every matching rule in use)")


@pytest.fixture(autouse=True)
def _rules_forced(request: pytest.FixtureRequest):
    """Implementation 3 takes reverse-mode Jacobians where they are cheaper than its rules, which on
    the zoo's small models is nearly everywhere; the ``3-rules`` variant runs every rule instead."""
    if request.node.get_closest_marker("rules_forced") is None:
        yield
        return
    with rules.forced():
        yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny kernels (``pytestmark = pytest.mark.usefixtures("one_thread")``): a second
    thread only adds wake-ups, and on a shared 2-core machine waits for a core (up to 6x slower); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def row_chunks(monkeypatch) -> list[int]:
    """The chunk size of every ``chunks(...)`` call of the row sources during the test, in order."""
    from ntkfunc._engines.rows import source

    sizes: list[int] = []
    original = source.chunks

    def spy(x, axes, b, chunk):  # type: ignore[no-untyped-def]
        sizes.append(chunk)
        return original(x, axes, b, chunk)

    monkeypatch.setattr(source, "chunks", spy)
    for module in ("ntkfunc._engines.rows.jacobian", "ntkfunc._engines.rows.structured", "ntkfunc._engines.rows.per_sample"):
        monkeypatch.setattr(f"{module}.chunks", spy)
    return sizes
