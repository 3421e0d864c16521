"""Coverage of implementation 3's rules on model families built from ``torch.nn`` (issue 21), as a markdown table.

For each family below (a small model of it, random weights, float32): the share of parameters
(by count) that ``ntkfunc.explain`` reports on a rule (``method == "rule"``), the fallback tensors
and why they fall back. Which parameters are on a rule does not depend on the routes; the share
whose kernel term the engine then takes *by its rule* (route ``gram`` or ``formed``, not
``reverse-mode``) does, so both are reported: with the default routes (implementation 3's
planner) and inside ``ntkfunc.rules.forced()`` (every matching rule used).

``--speed`` times, on wider recurrent models and a Transformer decoder where the rules pay, the full
``N x N x 10 x 10`` kernel with implementation 1 and with implementation 3 (default routes), one thread,
thread CPU time of the second call (the first plans the routes).

``--time`` also times ``ntk_fn`` (the traced ``N x N`` kernel of ``--time-n`` samples, one thread, median
thread CPU time of ``--reps`` calls after a warm-up: robust on a shared machine) with implementation 1
and with implementation 3 (default routes), to show that what the rules change leaves
implementation 1 alone.

Run: ``python benchmarks/coverage_families.py`` (about a minute on 2 CPU cores); with
``PYTHONPATH`` pointing at another checkout it measures that version of ntkfunc (``before``).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from timing import median_seconds  # benchmarks/ is this script's folder
from torch import nn
from torch.func import functional_call

import ntkfunc

T, D, H, N = 6, 8, 16, 4  # sequence length, input features, hidden width, samples


class Head(nn.Module):
    """A body whose output ``(N, ..., H)`` is pooled over its middle axes and read out by a linear layer."""

    def __init__(self, body: nn.Module, width: int = H, out: int = 3) -> None:
        super().__init__()
        self.body, self.head = body, nn.Linear(width, out)

    def forward(self, x: Any) -> torch.Tensor:
        h = self.body(x)
        h = h[0] if isinstance(h, tuple) else h
        return self.head(torch.tanh(h).flatten(1, -2).mean(1) if h.ndim > 2 else torch.tanh(h))


def zeros_like_batch(x: torch.Tensor, shape: tuple[int, ...], layers: int = 0) -> torch.Tensor:
    """Zeros ``(B, *shape)`` (``(layers, B, *shape)`` if given) batched like ``x`` under ``vmap`` (a state built with
    ``torch.zeros`` is not, and torch's fused recurrent ops then fail under ``vmap``)."""
    z = torch.zeros_like(x[:, :1, 0]).expand(x.shape[0], *shape)
    return (z.unsqueeze(0).expand(layers, *z.shape) if layers else z).contiguous()


class CellLoop(nn.Module):
    """A hand-written loop over time of an ``LSTMCell`` / ``GRUCell`` / ``RNNCell``."""

    def __init__(self, cell: str) -> None:
        super().__init__()
        self.kind = cell
        self.cell = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}[cell](D, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = zeros_like_batch(x, (H,))
        state: Any = (h, torch.zeros_like(h)) if self.kind == "lstm" else h
        outs = []
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
            outs.append(state[0] if self.kind == "lstm" else state)
        return torch.stack(outs, 1)


class Recurrent(nn.Module):
    """``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` with an explicit zero initial state (batch-first)."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.rnn
        layers = r.num_layers * (2 if r.bidirectional else 1)
        h0 = zeros_like_batch(x, (r.proj_size or r.hidden_size,), layers)
        state = (h0, zeros_like_batch(x, (r.hidden_size,), layers)) if isinstance(r, nn.LSTM) else h0
        return r(x, state)[0]


class BilinearNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(D, H), nn.Linear(D, H // 2)
        self.bil = nn.Bilinear(H, H // 2, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bil(torch.tanh(self.a(x)), torch.tanh(self.b(x)))


class BagNet(nn.Module):
    def __init__(self, mode: str, weighted: bool = False) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(100, 4 * H, mode=mode)
        self.weighted = weighted

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = torch.linspace(0.5, 1.5, ids.shape[-1], dtype=self.bag.weight.dtype).expand(ids.shape) if self.weighted else None
        return self.bag(ids, per_sample_weights=w)


class EinsumNet(nn.Module):
    """Two parameters in one einsum, and a parameter with a repeated index (its diagonal)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(D, H) / D**0.5), nn.Parameter(torch.randn(H, H) / H**0.5)
        self.d = nn.Parameter(torch.randn(H, H))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(torch.einsum("bi,ij,jk->bk", x, self.w1, self.w2))
        return torch.einsum("bk,kk->bk", h, self.d)


class Decoder(nn.Module):
    """``nn.TransformerDecoder`` (causal self-attention and cross-attention to a memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.tgt, self.mem = nn.Linear(D, H), nn.Linear(D, H)
        layer = nn.TransformerDecoderLayer(H, 2, 2 * H, dropout=0.0, batch_first=True)
        self.dec = nn.TransformerDecoder(layer, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)
        return self.dec(self.tgt(x), self.mem(x), tgt_mask=mask, tgt_is_causal=True)


class PaddedEncoder(nn.Module):
    """``nn.TransformerEncoder`` with a key padding mask (the last two positions padded)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(D, H)
        layer = nn.TransformerEncoderLayer(H, 2, 2 * H, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = torch.zeros(x.shape[:2], dtype=torch.bool)
        pad[:, -2:] = True
        return self.enc(self.inp(x), src_key_padding_mask=pad)


class InstanceNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True)
        self.c2 = nn.Conv2d(8, H, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.relu(self.n1(self.c1(x)))).permute(0, 2, 3, 1)


class WhisperStyle(nn.Module):
    """Token embedding plus learned positions indexed ``weight[ids]``, then a small MLP (as Whisper's decoder)."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(100, H), nn.Embedding(32, H)
        self.mlp = nn.Sequential(nn.LayerNorm(H), nn.Linear(H, 2 * H), nn.GELU(), nn.Linear(2 * H, H))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[-1])
        h = self.tok(ids) + self.pos.weight[positions]
        return h + self.mlp(h)


def _mlp(wrap: Callable[[nn.Module], nn.Module]) -> nn.Module:
    return nn.Sequential(wrap(nn.Linear(D, 2 * H)), nn.Tanh(), wrap(nn.Linear(2 * H, 2 * H)), nn.Tanh(), nn.Linear(2 * H, 3))


def _param(name: str) -> Callable[[nn.Module], nn.Module]:
    P = nn.utils.parametrizations
    return {"weight_norm": P.weight_norm, "spectral_norm": P.spectral_norm, "orthogonal": P.orthogonal,
            "weight_norm (hooks)": nn.utils.weight_norm}[name]


def _sn_conv() -> nn.Module:
    sn = nn.utils.parametrizations.spectral_norm
    return Head(nn.Sequential(sn(nn.Conv2d(3, 8, 3, padding=1)), nn.LeakyReLU(0.2), sn(nn.Conv2d(8, H, 3, padding=1)),
                              nn.Flatten(2), Transpose()))


class Transpose(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


def _seq() -> torch.Tensor:
    return torch.randn(N, T, D)


def _ids() -> torch.Tensor:
    return torch.randint(0, 100, (N, T))


def _image() -> torch.Tensor:
    return torch.randn(N, 3, 6, 6)


FAMILIES: dict[str, Callable[[], tuple[nn.Module, Any]]] = {
    "nn.LSTM (2 layers)": lambda: (Head(Recurrent(nn.LSTM(D, H, 2, batch_first=True))), _seq()),
    "nn.LSTM (bidirectional, proj_size)": lambda: (
        Head(Recurrent(nn.LSTM(D, H, 1, batch_first=True, bidirectional=True, proj_size=H // 2))), _seq()),
    "nn.GRU (2 layers)": lambda: (Head(Recurrent(nn.GRU(D, H, 2, batch_first=True))), _seq()),
    "nn.RNN tanh (2 layers)": lambda: (Head(Recurrent(nn.RNN(D, H, 2, batch_first=True))), _seq()),
    "nn.RNN relu (bidirectional)": lambda: (
        Head(Recurrent(nn.RNN(D, H, 1, nonlinearity="relu", batch_first=True, bidirectional=True)), 2 * H), _seq()),
    "LSTMCell loop": lambda: (Head(CellLoop("lstm")), _seq()),
    "GRUCell loop": lambda: (Head(CellLoop("gru")), _seq()),
    "RNNCell loop": lambda: (Head(CellLoop("rnn")), _seq()),
    "weight_norm (parametrizations)": lambda: (_mlp(_param("weight_norm")), torch.randn(N, D)),
    "weight_norm (hooks)": lambda: (_mlp(_param("weight_norm (hooks)")), torch.randn(N, D)),
    "spectral_norm (linear)": lambda: (_mlp(_param("spectral_norm")), torch.randn(N, D)),
    "spectral_norm (conv)": lambda: (_sn_conv(), _image()),
    "orthogonal": lambda: (_mlp(_param("orthogonal")), torch.randn(N, D)),
    "nn.Bilinear": lambda: (Head(BilinearNet()), torch.randn(N, D)),
    "nn.EmbeddingBag (mean)": lambda: (Head(BagNet("mean"), 4 * H), _ids()),
    "nn.EmbeddingBag (sum, weighted)": lambda: (Head(BagNet("sum", True), 4 * H), _ids()),
    "nn.EmbeddingBag (max)": lambda: (Head(BagNet("max"), 4 * H), _ids()),
    "torch.einsum (two params, repeated index)": lambda: (Head(EinsumNet()), torch.randn(N, D)),
    "nn.TransformerDecoder": lambda: (Head(Decoder()), _seq()),
    "nn.TransformerEncoder (padding mask)": lambda: (Head(PaddedEncoder()), _seq()),
    "nn.InstanceNorm2d": lambda: (Head(InstanceNet()), _image()),
    "positions weight[ids] (Whisper)": lambda: (Head(WhisperStyle()), _ids()),
}


class WideRecurrent(nn.Module):
    """A recurrent layer of width ``width`` over ``steps`` steps of 16 features, 10 logits from the last step."""

    def __init__(self, kind: str, width: int) -> None:
        super().__init__()
        self.kind = kind
        self.rnn: nn.Module = {"gru": nn.GRU, "lstm": nn.LSTM}[kind](16, width, batch_first=True) if kind != "lstm_cell" \
            else nn.LSTMCell(16, width)
        self.head, self.width = nn.Linear(width, 10), width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = zeros_like_batch(x, (self.width,))
        if self.kind == "lstm_cell":
            state = (h, h)
            for t in range(x.shape[1]):
                state = self.rnn(x[:, t], state)
            return self.head(state[0])
        state: Any = (h.unsqueeze(0), h.unsqueeze(0)) if self.kind == "lstm" else h.unsqueeze(0)
        return self.head(self.rnn(x, state)[0][:, -1])


class WideDecoder(nn.Module):
    """``nn.TransformerDecoder`` of width 128 (causal self-attention, cross-attention), 10 logits from the mean."""

    def __init__(self) -> None:
        super().__init__()
        self.tgt, self.mem = nn.Linear(16, 128), nn.Linear(16, 128)
        self.dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(128, 4, 256, dropout=0.0, batch_first=True), 2)
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype)
        return self.head(self.dec(self.tgt(x), self.mem(x), tgt_mask=mask, tgt_is_causal=True).mean(1))


SPEED: dict[str, Callable[[], nn.Module]] = {
    "nn.GRU, width 256, 8 steps": lambda: WideRecurrent("gru", 256),
    "nn.LSTM, width 256, 8 steps": lambda: WideRecurrent("lstm", 256),
    "LSTMCell loop, width 256, 8 steps": lambda: WideRecurrent("lstm_cell", 256),
    "nn.TransformerDecoder, width 128, 8 tokens": WideDecoder,
}


def speed(name: str, n: int = 16) -> dict:
    """CPU seconds of the second call of the full kernel on ``n`` sequences of 8 steps, implementations 1 and 3."""
    torch.manual_seed(0)
    model = SPEED[name]().eval()
    f, params = ntkfunc.from_module(model)
    x = torch.randn(n, 8, 16)
    row: dict[str, Any] = {"family": name, "params": sum(p.numel() for p in params.values())}
    for impl in (1, 3):
        kernel = ntkfunc.ntk_fn(f, trace_axes=(), implementation=impl)
        kernel(x, None, params)
        t0 = time.thread_time()
        kernel(x, None, params)
        row[f"impl{impl}_s"] = time.thread_time() - t0
    report = ntkfunc.explain(f, params, x, trace_axes=())
    row["routed"] = sum(math.prod(r.shape) for r in report.params if r.method == "rule" and r.route != "reverse-mode")
    return row


def build(name: str, dtype: torch.dtype = torch.float32) -> tuple[Callable, dict, Any]:
    """``(f, params, x)`` of one family (seeded), its parameters, buffers and floating inputs in ``dtype``."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated
        model, x = FAMILIES[name]()
    model.to(dtype).eval()
    x = x.to(dtype) if x.is_floating_point() else x
    try:
        f, params = ntkfunc.from_module(model)
        f(params, x)
    except Exception:  # noqa: BLE001  an ntkfunc whose from_module cannot take the model: call it by hand
        params = {k: v.detach() for k, v in model.named_parameters()}

        def f(p: dict, x: Any) -> Any:
            return functional_call(model, p, (x,))
    return f, params, x


def shares(report: ntkfunc.Explanation) -> tuple[int, int, int]:
    """``(parameters, on a rule, on a rule's route)`` by count."""
    size = {r.name: math.prod(r.shape) for r in report.params}
    ruled = [r for r in report.params if r.method == "rule"]
    routed = [r for r in ruled if r.route != "reverse-mode"]
    return sum(size.values()), sum(size[r.name] for r in ruled), sum(size[r.name] for r in routed)


def measure(name: str, timing: bool, reps: int, time_n: int = 16) -> dict:
    f, params, x = build(name)
    row: dict[str, Any] = {"family": name}
    try:
        report = ntkfunc.explain(f, params, x)
        with ntkfunc.rules.forced():
            forced = ntkfunc.explain(f, params, x)
    except Exception as err:  # noqa: BLE001  a crash is a result too
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:90]}"
        return row
    total, ruled, routed = shares(report)
    _, _, routed_forced = shares(forced)
    reasons: collections.Counter = collections.Counter()
    for r in report.fallbacks:
        reasons[r.detail] += math.prod(r.shape)
    row.update(params=total, ruled=ruled, routed=routed, routed_forced=routed_forced,
               fallback_tensors=len(report.fallbacks), reasons=dict(reasons.most_common()),
               rules=sorted({r.rule for r in report.params if r.rule}))
    if timing:
        torch.manual_seed(1)
        xt = torch.randint(0, 100, (time_n, *x.shape[1:])) if not x.is_floating_point() else torch.randn(time_n, *x.shape[1:])
        for impl in (1, 3):
            kernel = ntkfunc.ntk_fn(f, implementation=impl)
            try:
                row[f"impl{impl}_s"] = median_seconds(lambda kernel=kernel: kernel(xt, None, params), reps)
            except Exception as err:  # noqa: BLE001
                row[f"impl{impl}_s"] = f"{type(err).__name__}"
    return row


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}%"


def table_row(row: dict, timing: bool) -> str:
    if "error" in row:
        return f"| {row['family']} | - | error: {row['error']} | | | | |" + (" | |" if timing else "")
    why = "; ".join(f"{n:,}: {d}" for d, n in row["reasons"].items()) or "-"
    cells = [row["family"], f"{row['params']:,}", _pct(row["ruled"], row["params"]), _pct(row["routed"], row["params"]),
             _pct(row["routed_forced"], row["params"]), str(row["fallback_tensors"]), why]
    if timing:
        cells += [f"{row[k] * 1e3:.0f} ms" if isinstance(row[k], float) else row[k] for k in ("impl1_s", "impl3_s")]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", nargs="*", default=list(FAMILIES), help="families to measure (default: all)")
    ap.add_argument("--time", action="store_true", help="also time ntk_fn with implementations 1 and 3")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--time-n", type=int, default=16, help="samples of the timed kernels")
    ap.add_argument("--speed", action="store_true", help="only time the wider models of SPEED")
    ap.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.speed:
        print("| model | parameters | on a rule's route (default) | impl 1 (CPU) | impl 3 (CPU) |\n|---|---:|---:|---:|---:|", flush=True)
        rows = [speed(name) for name in SPEED]
        for r in rows:
            print(f"| {r['family']} | {r['params']:,} | {100 * r['routed'] / r['params']:.1f}% | {r['impl1_s']:.2f} s | {r['impl3_s']:.2f} s |")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
        return
    head = "| family | parameters | on a rule | rule's route (default) | rule's route (forced) | fallback tensors | why they fall back |"
    sep = "|---|---:|---:|---:|---:|---:|---|"
    if args.time:
        head += " impl 1 (CPU) | impl 3 (CPU) |"
        sep += "---:|---:|"
    print(head + "\n" + sep, flush=True)
    rows = []
    for name in args.family:
        row = measure(name, args.time, args.reps, args.time_n)
        rows.append(row)
        print(table_row(row, args.time), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
