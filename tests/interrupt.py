"""Runs stopped part way, as a kill would: ``Runner.commit`` patched to count units and raise after some of them."""

from __future__ import annotations

from typing import Any

import pytest

from ntkfunc import kernel_matrix
from ntkfunc._dataset import runner

_COMMIT = runner.Runner.commit  # the real commit, whatever a test has patched since


class Killed(Exception):
    """Raised where the run is stopped (in place of the kill)."""


def counting_commits(monkeypatch: pytest.MonkeyPatch, stop_after: int | None = None) -> list[Any]:
    """The units committed from now on (a list that grows); after ``stop_after`` of them the next commit raises
    :class:`Killed` before writing anything."""
    done: list[Any] = []

    def commit(self, unit, *a):
        if stop_after is not None and len(done) == stop_after:
            raise Killed
        _COMMIT(self, unit, *a)
        done.append(unit)

    monkeypatch.setattr(runner.Runner, "commit", commit)
    return done


def stopped_after(monkeypatch: pytest.MonkeyPatch, n: int, *args: Any, **kwargs: Any) -> None:
    """``kernel_matrix(*args, **kwargs)`` stopped after ``n`` committed tiles; commits are real again afterwards."""
    counting_commits(monkeypatch, stop_after=n)
    with pytest.raises(Killed):
        kernel_matrix(*args, progress=False, **kwargs)
    monkeypatch.setattr(runner.Runner, "commit", _COMMIT)
