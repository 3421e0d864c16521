"""What every engine shares: the checked problem, output layouts, pytrees, tiles, memory terms, op contexts.

Nothing here knows about a particular implementation; engines (``ntkfunc._engines``),
the dataset pipeline (``ntkfunc._dataset``) and the public functions build on it.
"""
