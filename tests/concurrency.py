"""Running test bodies in several threads at once, with their errors raised in the test's thread."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def in_threads(*targets: Callable[[], Any]) -> None:
    """Run each target in its own thread, wait for all, then raise the first error any of them raised."""
    errors: list[BaseException] = []

    def run(target: Callable[[], Any]) -> None:
        try:
            target()
        except BaseException as err:  # reported below, in the caller's thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(t,)) for t in targets]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
