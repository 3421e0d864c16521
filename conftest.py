"""pytest configuration shared by tests and doctests."""

collect_ignore = ["ntkfunc/__main__.py", "setup.py", "benchmarks", "examples"]
