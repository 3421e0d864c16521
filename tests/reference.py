"""The float64 reference every implementation is tested against (see :mod:`ntkfunc.testing`).

It shares no code with the engines: the whole batch through ``f`` at once,
``torch.autograd.functional.jacobian`` of every output entry, ``J1 @ J2.T`` and traces /
diagonals one axis pair at a time.
"""

from ntkfunc.testing import full_jacobians, max_rel_err, reference_kernel, reference_nngp, trace_and_diagonal

__all__ = ["full_jacobians", "max_rel_err", "reference_kernel", "reference_nngp", "trace_and_diagonal"]
