"""Random numbers of a sketch: every table comes from ``(seed, labels...)`` alone.

A projection is never stored: each piece of it (a parameter's permutations and signs, a
block of Gaussian rows) is drawn from a CPU :class:`torch.Generator` seeded by a hash of the
sketch's seed and labels that name the piece (the parameter's position in the documented
row order, the block number). So the same seed gives the same projection whatever the
tiling, the device, the rank or the order in which pieces are needed, and drawing one piece
never shifts another.

>>> derive(0, "countsketch", 3) == derive(0, "countsketch", 3), derive(0, "a") != derive(1, "a")
(True, True)
>>> signs(4, generator(7, "demo")).tolist() == signs(4, generator(7, "demo")).tolist()
True
"""

from __future__ import annotations

import hashlib

import torch


def derive(seed: int, *labels: object) -> int:
    """A 63-bit seed for the piece named by ``labels`` of the sketch with ``seed`` (blake2b of their repr)."""
    digest = hashlib.blake2b(repr((int(seed), *labels)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(seed: int, *labels: object) -> torch.Generator:
    """A CPU generator for the piece ``labels`` (tables are drawn on the CPU, then moved)."""
    return torch.Generator(device="cpu").manual_seed(derive(seed, *labels))


def signs(n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` independent Rademacher signs (float64 +-1)."""
    return torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64).to(torch.float64).mul_(2).sub_(1)


def permutation(n: int, gen: torch.Generator) -> torch.Tensor:
    """A uniformly random permutation of ``range(n)`` (int64)."""
    return torch.randperm(n, generator=gen)
