"""Whole-dataset kernels (``kernel_matrix``) as a pipeline: validate -> probe -> (features) -> plan -> open store -> run tiles.

- :mod:`.pipeline`: ``kernel_matrix`` itself, one function per step (its docstring lists the data path);
- :mod:`.job`: the records the steps pass (the validated job, output, workers, probed shape);
- :mod:`.features`: ``sketch=``'s first stage, the features of each side (chunks written by the same runner and writer);
- :mod:`.plan`: block size, parameter groups and panels from the memory budget;
- :mod:`.panels`: how a tile is computed (rows kept in panels across tiles, or ``ntk_fn`` per tile);
- :mod:`.runner`: the one runner (units over devices, background commits, progress) and the kernel's tiles;
- :mod:`.store`: the one writer (memory, or a resumable ``.npy``; rank-0 opening), :mod:`.fileformat`: its files
  (manifest with checksum, markers, atomic writes), :mod:`.npyfile`: the ``.npy`` header, :mod:`.lock`: one writer per file;
- :mod:`.kernel_file`: reading finished kernels back (``verify_kernel``, ``load_kernel``);
- :mod:`.data`, :mod:`.fingerprint`: sample sources (any pytree of inputs, sliced along ``vmap_axes``) and what a resume
  must match;
- :mod:`.distributed`: devices and ``torchrun`` ranks; :mod:`.progress`: the progress bar.
"""
