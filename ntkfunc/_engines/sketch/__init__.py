"""Random projections of per-sample gradients (sketched eNTKs): kinds, plans, and the features engine.

- :mod:`.seeds`: every table drawn from ``(seed, labels)`` alone;
- :mod:`.countsketch`, :mod:`.tensorsketch`, :mod:`.gaussian`: the kinds of ``Π``, each a
  per-parameter block with a ``formed`` route (a formed gradient) and, where it has one, a
  route from a layer's factors (``factors``, ``fft``);
- :mod:`.plan`: which kind and route each parameter gets, priced in one place (``auto``);
- :mod:`.features`: any ``f`` (pytree outputs, batch axes, ``vmap_axes=None``) for the public functions.
"""
