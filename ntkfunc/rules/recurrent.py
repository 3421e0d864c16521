"""Recurrent layers as expansions: ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` and their cells, one ``F.linear`` per step.

torch runs a recurrent layer as one fused op (``_VF.lstm``, ``_VF.gru``, ``_VF.rnn_tanh``,
``_VF.rnn_relu``; the cells ``_VF.lstm_cell``, ``gru_cell``, ``rnn_tanh_cell``,
``rnn_relu_cell``) that consumes all of its weights at once, so without help every weight
would fall back to reverse-mode Jacobians. A recurrent layer is a linear map per time step
around elementwise gates: during capture these expansions re-run the op as

- one ``F.linear(x, W_ih, b_ih)`` over every time step (the input projection),
- per step ``F.linear(h, W_hh, b_hh)`` (the recurrence) and, for an LSTM with ``proj_size``,
  ``F.linear(h, W_hr)``,
- the gates in plain elementwise ops (LSTM: ``i, f, g, o``; GRU: ``r, z, n`` with ``b_hn``
  inside the reset product, as torch computes it),

so the linear rule handles every weight and bias: ``W_ih`` by one use, ``W_hh`` (and the
cells' weights in a hand-written loop) by one use per step, as a parameter tied across steps
(every pair of steps contracted, cross terms included). Multi-layer and bidirectional
layers, ``batch_first``, ``proj_size``, inputs without a batch axis and layers without
biases are expanded; packed sequences and dropout between layers in training mode keep the
fused op (and their weights fall back). The values are the fused op's up to rounding.

Example:
  >>> import torch
  >>> from ntkfunc.rules import expansion
  >>> lstm = torch.nn.LSTM(3, 4, num_layers=2).double()
  >>> x = torch.randn(5, 2, 3, dtype=torch.float64)
  >>> h0 = (torch.zeros(2, 2, 4, dtype=torch.float64), torch.zeros(2, 2, 4, dtype=torch.float64))
  >>> out, h, c = expansion(torch.lstm)(x, h0, lstm._flat_weights, True, 2, 0.0, False, False, False)
  >>> torch.allclose(out, lstm(x, h0)[0])
  True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ntkfunc.rules.base import expand

Tensor = torch.Tensor
Cell = Callable[[Tensor, Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor | None]]
"""``cell(gx, gh, h, c) -> (h', c')``: a step's gates from the input and recurrent projections."""


def _lstm_gates(gx: Tensor, gh: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
    assert c is not None
    i, f, g, o = (gx + gh).chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _gru_gates(gx: Tensor, gh: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
    xr, xz, xn = gx.chunk(3, -1)
    hr, hz, hn = gh.chunk(3, -1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return n + z * (h - n), None


def _tanh_gates(gx: Tensor, gh: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
    return torch.tanh(gx + gh), None


def _relu_gates(gx: Tensor, gh: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
    return torch.relu(gx + gh), None


CELLS: dict[str, Cell] = {"lstm": _lstm_gates, "gru": _gru_gates, "rnn_tanh": _tanh_gates, "rnn_relu": _relu_gates}


def _direction(cell: Cell, x: Tensor, h: Tensor, c: Tensor | None, weights: Sequence[Tensor | None], reverse: bool
               ) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer in one direction over ``x`` ``(T, B, I)``: ``(outputs (T, B, H_out), h_T, c_T)``."""
    w_ih, w_hh, b_ih, b_hh, w_hr = weights
    assert w_ih is not None and w_hh is not None
    gx = F.linear(x, w_ih, b_ih)  # every step's input projection at once
    outs: list[Tensor] = [x] * x.shape[0]
    for t in reversed(range(x.shape[0])) if reverse else range(x.shape[0]):
        h, c = cell(gx[t], F.linear(h, w_hh, b_hh), h, c)
        if w_hr is not None:
            h = F.linear(h, w_hr)
        outs[t] = h
    return torch.stack(outs), h, c


def _layers(kind: str, x: Tensor, hx: Tensor, cx: Tensor | None, params: Sequence[Tensor], has_biases: bool, num_layers: int,
            dropout: float, train: bool, bidirectional: bool, batch_first: bool) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """The fused op's ``(output, h_n, c_n)`` in primitives, or None where it is outside what is expanded."""
    dirs = 2 if bidirectional else 1
    per = len(params) // max(1, num_layers * dirs)
    base = 2 + 2 * int(has_biases)
    proj = kind == "lstm" and per == base + 1
    if (dropout > 0 and train and num_layers > 1) or per * num_layers * dirs != len(params) or per not in (base, base + int(proj)):
        return None
    if x.dim() != 3 or hx.dim() != 3 or (cx is not None and cx.dim() != 3):
        return None
    cell = CELLS[kind]
    layer_in = x.transpose(0, 1) if batch_first else x
    hs: list[Tensor] = []
    cs: list[Tensor] = []
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            k = layer * dirs + d
            w = list(params[k * per : (k + 1) * per])
            weights = (w[0], w[1], w[2] if has_biases else None, w[3] if has_biases else None, w[-1] if proj else None)
            out, h, c = _direction(cell, layer_in, hx[k], None if cx is None else cx[k], weights, reverse=d == 1)
            outs.append(out)
            hs.append(h)
            if c is not None:
                cs.append(c)
        layer_in = outs[0] if dirs == 1 else torch.cat(outs, -1)
    output = layer_in.transpose(0, 1) if batch_first else layer_in
    return output, torch.stack(hs), torch.stack(cs) if cs else None


def _is_weights(p: Any) -> bool:
    return isinstance(p, (list, tuple)) and all(isinstance(t, Tensor) for t in p)


@expand(torch.lstm)
def lstm(*args: Any, **kwargs: Any) -> Any:
    """``_VF.lstm(input, (h0, c0), weights, has_biases, num_layers, dropout, train, bidirectional, batch_first)``."""
    if kwargs or len(args) != 9 or not _is_weights(args[1]) or len(args[1]) != 2 or not _is_weights(args[2]):
        return NotImplemented  # the packed-sequence form, or an unexpected call
    x, (h0, c0), params, has_biases, num_layers, dropout, train, bidirectional, batch_first = args
    out = _layers("lstm", x, h0, c0, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
    return NotImplemented if out is None else out


def _single_state(kind: str) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        if kwargs or len(args) != 9 or not isinstance(args[1], Tensor) or not _is_weights(args[2]):
            return NotImplemented  # the packed-sequence form (input, batch_sizes, hx, ...), or an unexpected call
        x, h0, params, has_biases, num_layers, dropout, train, bidirectional, batch_first = args
        out = _layers(kind, x, h0, None, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
        return NotImplemented if out is None else out[:2]

    run.__name__ = run.__qualname__ = kind
    run.__doc__ = f"``_VF.{kind}(input, h0, weights, has_biases, num_layers, dropout, train, bidirectional, batch_first)``."
    return run


gru = expand(torch.gru)(_single_state("gru"))
rnn_tanh = expand(torch.rnn_tanh)(_single_state("rnn_tanh"))
rnn_relu = expand(torch.rnn_relu)(_single_state("rnn_relu"))


# --- cells: one step, called by the user's own loop ----------------------------------------


def _cell_step(kind: str, x: Tensor, h: Tensor, c: Tensor | None, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
               b_hh: Tensor | None) -> tuple[Tensor, Tensor | None]:
    return CELLS[kind](F.linear(x, w_ih, b_ih), F.linear(h, w_hh, b_hh), h, c)


@expand(torch.lstm_cell)
def lstm_cell(input: Tensor, hx: Sequence[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
              b_hh: Tensor | None = None) -> Any:
    """``_VF.lstm_cell(input, (h, c), w_ih, w_hh, b_ih, b_hh) -> (h', c')``."""
    if not _is_weights(hx) or len(hx) != 2:
        return NotImplemented
    h, c = _cell_step("lstm", input, hx[0], hx[1], w_ih, w_hh, b_ih, b_hh)
    return h, c


def _single_cell(kind: str) -> Callable[..., Any]:
    def run(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None, b_hh: Tensor | None = None) -> Any:
        if not isinstance(hx, Tensor):
            return NotImplemented
        return _cell_step(kind, input, hx, None, w_ih, w_hh, b_ih, b_hh)[0]

    run.__name__ = run.__qualname__ = f"{kind}_cell"
    run.__doc__ = f"``_VF.{kind}_cell(input, h, w_ih, w_hh, b_ih, b_hh) -> h'``."
    return run


gru_cell = expand(torch.gru_cell)(_single_cell("gru"))
rnn_tanh_cell = expand(torch.rnn_tanh_cell)(_single_cell("rnn_tanh"))
rnn_relu_cell = expand(torch.rnn_relu_cell)(_single_cell("rnn_relu"))
