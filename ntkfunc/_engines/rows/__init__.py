"""One home for per-sample rows: one interface (:class:`RowSource`), four sources.

- :class:`JacobianRows` (:mod:`.jacobian`): implementation 1, ``vmap(jacrev(f))``;
- :class:`StructuredRows` (:mod:`.structured`): implementations 3 and ``"auto"``, formed by the
  rules from one batched pass, Gram-route parameters kept as factors;
- :class:`ProjectedRows` (:mod:`.projected`): a sketch ``J(x) Π`` of either, from the factors
  directly where the rule allows;
- :class:`StoredRows` (:mod:`.stored`): features read back from memory or a features file.

The dataset layer (:mod:`ntkfunc._dataset`) imports only the interface and runs any source
over chunks and tiles.
"""

from ntkfunc._engines.rows.jacobian import JacobianRows
from ntkfunc._engines.rows.projected import ProjectedRows
from ntkfunc._engines.rows.source import Factors, Flops, RowsFactory, RowSource, SampleBytes, Slots
from ntkfunc._engines.rows.stored import StoredRows
from ntkfunc._engines.rows.structured import StructuredRows, jacobian_rows, per_sample_gradients, structured_rows

__all__ = [
    "Factors", "Flops", "JacobianRows", "ProjectedRows", "RowSource", "RowsFactory", "SampleBytes", "Slots", "StoredRows",
    "StructuredRows", "jacobian_rows", "per_sample_gradients", "structured_rows",
]
