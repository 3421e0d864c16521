"""Test-wide fixtures: the ``rules_forced`` variant of implementation 3 (see ``tests.zoo.implementations``)."""

from __future__ import annotations

import pytest

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
