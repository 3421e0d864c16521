"""The package version: one place, read by ``ntkfunc.__version__``, setup.cfg and the output manifests."""

__version__ = "0.1.0"
