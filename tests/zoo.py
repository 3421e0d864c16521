"""Architectures every implementation is checked on.

Each case builds ``(f, params, x1, x2, vmap_axes)`` for a dtype; ``settings`` lists
the (trace_axes, diagonal_axes) pairs that make sense for its output rank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

import ntkfunc


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    build: Callable
    out_ndim: int

    def __str__(self) -> str:
        return self.name


SETTINGS_2D = [((-1,), ()), ((), ()), ((), (-1,)), ((), (0,)), ((0,), ())]
SETTINGS_3D = [((-1,), ()), ((), ()), ((1,), (2,)), ((), (1, 2)), ((1, 2), ()), ((-1,), (0,)), ((2,), ())]


def settings(case: Case):
    return SETTINGS_2D if case.out_ndim == 2 else SETTINGS_3D


def _seeded(seed: int = 0) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _module_case(make_model, make_x, vmap_axes=0, module_vmap_axes=0):
    def build(dtype):
        _seeded()
        model = make_model().to(dtype)
        f, params = ntkfunc.from_module(model, vmap_axes=module_vmap_axes)
        x1, x2 = make_x(5, dtype), make_x(3, dtype)
        return f, params, x1, x2, vmap_axes

    return build


class Flatten(nn.Module):
    def forward(self, x):
        return x.reshape(x.shape[0], -1)  # needs the batch axis, as real models do


class GroupNormResBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.conv2(torch.relu(self.norm(self.conv1(x)))) + x
        return self.head(h.mean(dim=(2, 3)))


class MatmulAttention(nn.Module):
    """Self-attention written with ``x @ W`` products (as in hand-written transformers)."""

    def __init__(self, d: int = 6, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.wq, self.wk, self.wv = (nn.Parameter(torch.randn(d, d) / d**0.5) for _ in range(3))
        self.wo = nn.Parameter(torch.randn(d, 4) / d**0.5)
        self.pos = nn.Parameter(0.1 * torch.randn(4, d))

    def forward(self, x):
        n, t, d = x.shape
        x = x + self.pos[:t]
        q, k, v = (torch.matmul(x, w).reshape(n, t, self.heads, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        h = (att @ v).transpose(1, 2).reshape(n, t, d)
        return h @ self.wo  # (N, T, 4)


class MHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(6, 2, batch_first=True)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.att(x, x, x, need_weights=False)[0])  # (N, T, 2)


class EmbeddingModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 5)
        self.lin = nn.Linear(5, 3)

    def forward(self, tokens):
        return self.lin(torch.tanh(self.emb(tokens)).mean(1))


class TiedWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 6) / 2)
        self.b = nn.Parameter(torch.randn(6) / 2)

    def forward(self, x):
        return torch.tanh(x @ self.w + self.b) @ self.w.T  # W used twice: (N, 4)


class SetPooling(nn.Module):
    """Samples interact through the batch mean: needs vmap_axes=None."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return self.out(h - h.mean(0, keepdim=True))


def _pytree_case(dtype):
    _seeded()
    params = {
        "enc": {"w": torch.randn(3, 5).to(dtype) / 2, "b": torch.randn(5).to(dtype) / 3},
        "heads": [torch.randn(5 + 2, 2).to(dtype) / 2, (torch.randn(5, 4).to(dtype) / 2,)],
        "step": torch.tensor(3),  # an integer leaf: a constant
    }

    def f(p, x):
        h = torch.tanh(x["a"] @ p["enc"]["w"] + p["enc"]["b"]) * p["step"]
        return {"logits": torch.cat([h, x["b"]], -1) @ p["heads"][0], "aux": (h @ p["heads"][1][0],)}

    def x(n):
        return {"a": torch.randn(n, 3).to(dtype), "b": torch.randn(n, 2).to(dtype)}

    return f, params, x(5), x(3), 0


def _batch_axis_one_case(dtype):
    _seeded()
    w1, w2 = torch.randn(4, 3).to(dtype) / 2, torch.randn(2, 4).to(dtype) / 2
    params = (w1, w2)

    def f(p, x):  # x: (features, N) -> (outputs, N)
        return p[1] @ torch.tanh(p[0] @ x)

    return f, params, torch.randn(3, 5).to(dtype), torch.randn(3, 3).to(dtype), 1


def _batchnorm_train_case(dtype):
    _seeded()
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).to(dtype).train()
    f, params = ntkfunc.from_module(model, vmap_axes=None)
    return f, params, torch.randn(5, 3).to(dtype), torch.randn(3, 3).to(dtype), None


def _set_case(dtype):
    _seeded()
    model = SetPooling().to(dtype)
    f, params = ntkfunc.from_module(model)
    return f, params, torch.randn(5, 3).to(dtype), torch.randn(3, 3).to(dtype), None


CASES = [
    Case("mlp", _module_case(lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), lambda n, dt: torch.randn(n, 4).to(dt)), 2),
    Case("cnn", _module_case(
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2), nn.Tanh(),
            Flatten(), nn.Linear(4 * 4 * 4, 3)),
        lambda n, dt: torch.randn(n, 2, 8, 8).to(dt)), 2),
    Case("layernorm_mlp", _module_case(
        lambda: nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 3)),
        lambda n, dt: torch.randn(n, 4).to(dt)), 2),
    Case("attention_matmul", _module_case(MatmulAttention, lambda n, dt: torch.randn(n, 4, 6).to(dt)), 3),
    Case("multihead_attention", _module_case(MHA, lambda n, dt: torch.randn(n, 3, 6).to(dt)), 3),
    Case("resblock_groupnorm", _module_case(GroupNormResBlock, lambda n, dt: torch.randn(n, 4, 5, 5).to(dt)), 2),
    Case("conv1d_multi_output", _module_case(
        lambda: nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv1d(3, 2, 3, stride=2)),
        lambda n, dt: torch.randn(n, 2, 9).to(dt)), 3),
    Case("embedding_int_inputs", _module_case(EmbeddingModel, lambda n, dt: torch.randint(0, 11, (n, 4))), 2),
    Case("tied_weights", _module_case(TiedWeights, lambda n, dt: torch.randn(n, 4).to(dt)), 2),
    Case("pytree", _pytree_case, 2),
    Case("batch_axis_1", _batch_axis_one_case, 2),
    Case("batchnorm_train_vmap_none", _batchnorm_train_case, 2),
    Case("set_pooling_vmap_none", _set_case, 2),
]


def double(tree):
    return torch.utils._pytree.tree_map(lambda t: t.double() if t.is_floating_point() else t, tree)


def implementations(*, param_vmap: bool = False, rules_forced: bool = True) -> list:
    """Every registered implementation (``"auto"`` by name), from the engine registry, as pytest params.

    ``param_vmap``: only those whose kernels work under ``vmap`` over params. ``rules_forced``:
    also implementation 3 with every matching rule in use (id ``3-rules``, run inside
    ``ntkfunc.rules.forced()`` by ``tests/conftest.py``): otherwise the zoo's small models
    would mostly exercise its reverse-mode Jacobians, not its rules.
    """
    import pytest

    from ntkfunc._engines import Implementation, engines

    out: list = ["auto" if e.implementation == Implementation.AUTO else int(e.implementation)
                 for e in engines() if e.param_vmap or not param_vmap]
    if rules_forced and 3 in out:
        out.append(pytest.param(3, id="3-rules", marks=pytest.mark.rules_forced))
    return out
