"""Whole-dataset kernels (``kernel_matrix``) as a pipeline: validate -> plan -> open store -> run tiles.

- :mod:`.pipeline`: ``kernel_matrix`` itself, one function per step;
- :mod:`.plan`: block size, parameter groups and panels from the memory budget;
- :mod:`.panels`: how a tile is computed (Jacobian panels reused across tiles, or ``ntk_fn`` per tile);
- :mod:`.runner`: tiles over devices, CUDA-OOM splitting, finiteness checks, commits with mirrors;
- :mod:`.store`: where the kernel goes (memory, or a resumable ``.npy``);
- :mod:`.data`, :mod:`.fingerprint`: sample sources and what a resume must match;
- :mod:`.distributed`: devices and ``torchrun`` ranks; :mod:`.progress`: the progress bar.
"""
