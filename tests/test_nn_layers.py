"""Every ``torch.nn`` layer ntkfunc supports, under the exact nesting its kernels use.

Implementation 1 vmaps samples outside and output cotangents inside (``vmap(jacrev)``);
implementation 2 vmaps tangents outside and samples inside ``jvp``. A batching rule that
mixes up the two levels gives a wrong kernel only when the sizes line up (``nn.PReLU``'s
backward was exact unless a block's sample count equalled the number of outputs), so every
layer runs with x1 of ``OUTPUTS`` samples and x2 of another count, against the float64 reference
(``tests/reference.py``: no vmap at all). Each layer sits between two linear maps (or after
integer ids), so that its backward is exercised whether or not it has parameters.

Layers left out, each for a reason: ``FractionalMaxPool2d/3d`` (random pooling regions
at every call: no kernel), ``AdaptiveLogSoftmaxWithLoss`` (its ``forward`` needs targets;
its ``log_prob`` is tested), ``SyncBatchNorm`` (needs a process group), lazy modules (they
become the listed ones on their first call) and losses (not layers).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import ntkfunc
from tests.reference import max_rel_err, reference_kernel

D = torch.float64
OUTPUTS = 3  # per sample, = the samples of x1 (the case that exposed PReLU)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second intra-op thread only contends



def first(y):
    return y[0] if isinstance(y, tuple) else y


def output(m, h):
    """The output sequence of a recurrent layer (its first result)."""
    return m(h)[0]


def output_seq_first(m, h):
    """The same for a layer that takes the sequence axis first (``batch_first=False``)."""
    return m(h.transpose(0, 1))[0].transpose(0, 1)


def _unpool(pool: nn.Module, unpool: nn.Module) -> Callable:
    def call(_, h):
        y, idx = pool(h)
        return unpool(y, idx)
    return call


class _Pair(nn.Module):
    """Holds two modules (e.g. pool and unpool) so that both are part of the model."""

    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a, self.b = a, b


# name -> (factory, per-sample input shape (None: integer ids), call(layer, h) or None)
LAYERS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...] | None, Callable | None]] = {
    "Identity": (nn.Identity, (4,), None),
    "Linear": (lambda: nn.Linear(4, 3), (4,), None),
    "Bilinear": (lambda: nn.Bilinear(2, 2, 3), (4,), lambda m, h: m(h[:, :2], h[:, 2:])),
    "Conv1d": (lambda: nn.Conv1d(2, 3, 3, padding=1), (2, 5), None),
    "Conv2d": (lambda: nn.Conv2d(2, 2, 2, stride=2, groups=2), (2, 4, 4), None),
    "Conv3d": (lambda: nn.Conv3d(1, 2, 2), (1, 3, 3, 3), None),
    "ConvTranspose1d": (lambda: nn.ConvTranspose1d(2, 2, 3, stride=2), (2, 3), None),
    "ConvTranspose2d": (lambda: nn.ConvTranspose2d(2, 1, 2), (2, 3, 3), None),
    "ConvTranspose3d": (lambda: nn.ConvTranspose3d(1, 1, 2), (1, 2, 2, 2), None),
    "Fold": (lambda: nn.Fold((3, 3), 2), (4, 4), None),
    "Unfold": (lambda: nn.Unfold(2), (1, 3, 3), None),
    "MaxPool1d": (lambda: nn.MaxPool1d(2), (2, 6), None),
    "MaxPool2d": (lambda: nn.MaxPool2d(2, padding=1), (1, 4, 4), None),
    "MaxPool3d": (lambda: nn.MaxPool3d(2), (1, 4, 4, 4), None),
    "MaxUnpool2d": (lambda: _Pair(nn.MaxPool2d(2, return_indices=True), nn.MaxUnpool2d(2)), (1, 4, 4),
                    lambda m, h: _unpool(m.a, m.b)(m, h)),
    "AvgPool1d": (lambda: nn.AvgPool1d(2), (2, 6), None),
    "AvgPool2d": (lambda: nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), (1, 5, 5), None),
    "AvgPool3d": (lambda: nn.AvgPool3d(2), (1, 4, 4, 4), None),
    "LPPool1d": (lambda: nn.LPPool1d(2, 2), (2, 6), None),
    "LPPool2d": (lambda: nn.LPPool2d(2, 2), (1, 4, 4), None),
    "AdaptiveMaxPool1d": (lambda: nn.AdaptiveMaxPool1d(3), (2, 7), None),
    "AdaptiveMaxPool2d": (lambda: nn.AdaptiveMaxPool2d((2, 3)), (1, 5, 5), None),
    "AdaptiveAvgPool1d": (lambda: nn.AdaptiveAvgPool1d(3), (2, 7), None),
    "AdaptiveAvgPool2d": (lambda: nn.AdaptiveAvgPool2d(2), (2, 5, 5), None),
    "AdaptiveAvgPool3d": (lambda: nn.AdaptiveAvgPool3d(2), (1, 3, 3, 3), None),
    "ReflectionPad1d": (lambda: nn.ReflectionPad1d(2), (2, 4), None),
    "ReflectionPad2d": (lambda: nn.ReflectionPad2d(1), (1, 3, 3), None),
    "ReplicationPad2d": (lambda: nn.ReplicationPad2d((1, 0, 2, 1)), (1, 3, 3), None),
    "ReplicationPad3d": (lambda: nn.ReplicationPad3d(1), (1, 2, 2, 2), None),
    "ZeroPad2d": (lambda: nn.ZeroPad2d(1), (1, 3, 3), None),
    "ConstantPad1d": (lambda: nn.ConstantPad1d(2, 0.5), (2, 3), None),
    "CircularPad2d": (lambda: nn.CircularPad2d(1), (1, 3, 3), None),
    "ELU": (nn.ELU, (4,), None),
    "Hardshrink": (lambda: nn.Hardshrink(0.3), (4,), None),
    "Hardsigmoid": (nn.Hardsigmoid, (4,), None),
    "Hardtanh": (lambda: nn.Hardtanh(-0.5, 0.5), (4,), None),
    "Hardswish": (nn.Hardswish, (4,), None),
    "LeakyReLU": (lambda: nn.LeakyReLU(0.1), (4,), None),
    "LogSigmoid": (nn.LogSigmoid, (4,), None),
    "PReLU": (nn.PReLU, (4,), None),
    "PReLU-channels": (lambda: nn.PReLU(2), (2, 3), None),
    "PReLU-image": (lambda: nn.PReLU(2), (2, 2, 2), None),
    "ReLU": (nn.ReLU, (4,), None),
    "ReLU6": (nn.ReLU6, (4,), None),
    "RReLU": (nn.RReLU, (4,), None),  # eval: a fixed slope
    "SELU": (nn.SELU, (4,), None),
    "CELU": (lambda: nn.CELU(0.7), (4,), None),
    "GELU": (nn.GELU, (4,), None),
    "GELU-tanh": (lambda: nn.GELU("tanh"), (4,), None),
    "Sigmoid": (nn.Sigmoid, (4,), None),
    "SiLU": (nn.SiLU, (4,), None),
    "Mish": (nn.Mish, (4,), None),
    "Softplus": (lambda: nn.Softplus(2.0), (4,), None),
    "Softshrink": (lambda: nn.Softshrink(0.3), (4,), None),
    "Softsign": (nn.Softsign, (4,), None),
    "Tanh": (nn.Tanh, (4,), None),
    "Tanhshrink": (nn.Tanhshrink, (4,), None),
    "Threshold": (lambda: nn.Threshold(0.1, -1.0), (4,), None),
    "GLU": (nn.GLU, (4,), None),
    "Softmin": (lambda: nn.Softmin(-1), (4,), None),
    "Softmax": (lambda: nn.Softmax(-1), (4,), None),
    "Softmax2d": (nn.Softmax2d, (2, 2, 2), None),
    "LogSoftmax": (lambda: nn.LogSoftmax(-1), (4,), None),
    "AdaptiveLogSoftmaxWithLoss.log_prob": (lambda: nn.AdaptiveLogSoftmaxWithLoss(4, 6, [2, 4], div_value=2.0), (4,), lambda m, h: m.log_prob(h)),
    "MultiheadAttention": (lambda: nn.MultiheadAttention(4, 2, batch_first=True), (3, 4), lambda m, h: m(h, h, h)[0]),
    "MultiheadAttention-kv": (lambda: nn.MultiheadAttention(4, 2, kdim=3, vdim=2, bias=False, add_bias_kv=True), (3, 4),
                              lambda m, h: m(h.transpose(0, 1), h[..., :3].transpose(0, 1), h[..., 2:].transpose(0, 1))[0].transpose(0, 1)),
    "BatchNorm1d": (lambda: nn.BatchNorm1d(2), (2, 3), None),
    "BatchNorm2d": (lambda: nn.BatchNorm2d(2), (2, 2, 2), None),
    "BatchNorm3d": (lambda: nn.BatchNorm3d(1), (1, 2, 2, 2), None),
    "GroupNorm": (lambda: nn.GroupNorm(2, 4), (4, 3), None),
    "InstanceNorm1d": (lambda: nn.InstanceNorm1d(2, affine=True), (2, 4), None),
    "InstanceNorm2d": (lambda: nn.InstanceNorm2d(2, affine=True, track_running_stats=True), (2, 3, 3), None),
    "InstanceNorm3d": (lambda: nn.InstanceNorm3d(1), (1, 2, 2, 3), None),
    "LayerNorm": (lambda: nn.LayerNorm(4), (4,), None),
    "LayerNorm-2d": (lambda: nn.LayerNorm((2, 3), bias=False), (2, 3), None),
    "LocalResponseNorm": (lambda: nn.LocalResponseNorm(2), (3, 4), None),
    "RMSNorm": (lambda: nn.RMSNorm(4), (4,), None),
    "RNN": (lambda: nn.RNN(2, 3, batch_first=True), (3, 2), output),
    "RNN-relu-2layers-bidirectional": (lambda: nn.RNN(2, 2, num_layers=2, nonlinearity="relu", bidirectional=True), (3, 2), output_seq_first),
    "LSTM": (lambda: nn.LSTM(2, 3, batch_first=True), (3, 2), output),
    "LSTM-proj-2layers": (lambda: nn.LSTM(2, 4, num_layers=2, proj_size=2), (3, 2), output_seq_first),
    "GRU": (lambda: nn.GRU(2, 3, batch_first=True), (3, 2), output),
    "GRU-bidirectional": (lambda: nn.GRU(2, 2, bidirectional=True, bias=False), (3, 2), output_seq_first),
    "RNNCell": (lambda: nn.RNNCell(4, 3), (4,), None),
    "LSTMCell": (lambda: nn.LSTMCell(4, 3), (4,), output),
    "GRUCell": (lambda: nn.GRUCell(4, 3), (4,), None),
    "TransformerEncoderLayer": (lambda: nn.TransformerEncoderLayer(4, 2, 6, dropout=0.1, batch_first=True), (3, 4), None),
    "TransformerEncoderLayer-norm-first-gelu": (lambda: nn.TransformerEncoderLayer(4, 2, 6, activation="gelu", norm_first=True), (3, 4),
                                                lambda m, h: m(h.transpose(0, 1)).transpose(0, 1)),  # sequence first
    "TransformerEncoder-padding-mask": (lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(4, 2, 6, batch_first=True), 2), (3, 4),
                                        lambda m, h: m(h, src_key_padding_mask=torch.tensor([[False, False, True]]).expand(h.shape[0], 3))),
    "TransformerDecoderLayer": (lambda: nn.TransformerDecoderLayer(4, 2, 6, batch_first=True), (3, 4), lambda m, h: m(h, h.flip(1))),
    "Transformer": (lambda: nn.Transformer(4, 2, 1, 1, 6, batch_first=True), (3, 4),
                    lambda m, h: m(h, h[:, :2], tgt_mask=nn.Transformer.generate_square_subsequent_mask(2, dtype=D), tgt_is_causal=True)),
    "Dropout": (nn.Dropout, (4,), None),
    "Dropout2d": (nn.Dropout2d, (2, 2, 1), None),
    "AlphaDropout": (nn.AlphaDropout, (4,), None),
    "FeatureAlphaDropout": (nn.FeatureAlphaDropout, (2, 2, 1), None),
    "Embedding": (lambda: nn.Embedding(7, 3, padding_idx=0), None, None),
    "EmbeddingBag-mean": (lambda: nn.EmbeddingBag(7, 3), None, None),
    "EmbeddingBag-max-padding": (lambda: nn.EmbeddingBag(7, 3, mode="max", padding_idx=1), None, None),
    "EmbeddingBag-sum-weights": (lambda: nn.EmbeddingBag(7, 3, mode="sum"), None,
                                 lambda m, ids: m(ids, per_sample_weights=ids.to(m.weight.dtype) / 7)),
    "CosineSimilarity": (nn.CosineSimilarity, (2, 3), lambda m, h: m(h[:, :1], h[:, 1:])),
    "PairwiseDistance": (nn.PairwiseDistance, (4,), lambda m, h: m(h[:, :2], h[:, 2:])),
    "PixelShuffle": (lambda: nn.PixelShuffle(2), (4, 1, 2), None),
    "PixelUnshuffle": (lambda: nn.PixelUnshuffle(2), (1, 2, 4), None),
    "ChannelShuffle": (lambda: nn.ChannelShuffle(2), (4, 1, 2), None),
    "Upsample-nearest": (lambda: nn.Upsample(scale_factor=2), (1, 2, 2), None),
    "Upsample-bilinear": (lambda: nn.Upsample(scale_factor=2, mode="bilinear"), (1, 2, 2), None),
    "Upsample-bicubic": (lambda: nn.Upsample(size=(3, 3), mode="bicubic", align_corners=True), (1, 2, 2), None),
    "Upsample-trilinear": (lambda: nn.Upsample(scale_factor=2, mode="trilinear"), (1, 2, 2, 1), None),
    "UpsamplingNearest2d": (lambda: nn.UpsamplingNearest2d(scale_factor=2), (1, 2, 2), None),
    "Flatten": (nn.Flatten, (2, 3), None),
    "Unflatten": (lambda: nn.Unflatten(1, (2, 2)), (4,), None),
}


class Around(nn.Module):
    """``head(flatten(layer(stem(x))))``: a linear stem (none for integer ids) and a linear head to ``OUTPUTS`` outputs."""

    def __init__(self, layer: nn.Module, shape: tuple[int, ...] | None, call: Callable | None) -> None:
        super().__init__()
        self.layer, self.shape, self.call = layer, shape, call
        self.stem = None if shape is None else nn.Linear(4, math.prod(shape))
        with torch.no_grad():
            width = self.features(self.example(1)).shape[1]
        self.head = nn.Linear(width, OUTPUTS)

    def example(self, n: int) -> torch.Tensor:
        return torch.randint(0, 7, (n, 4)) if self.shape is None else torch.randn(n, 4)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.stem is None else self.stem(x).reshape(x.shape[0], *self.shape)
        y = self.layer(h) if self.call is None else self.call(self.layer, h)
        return first(y).reshape(x.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _model(name: str) -> tuple[Around, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    factory, shape, call = LAYERS[name]
    model = Around(factory(), shape, call).to(D)
    for m in model.modules():  # non-trivial running statistics
        if getattr(m, "running_mean", None) is not None:
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    model.eval()
    x1, x2 = model.example(OUTPUTS), model.example(2)
    return model, (x1 if shape is None else x1.to(D)), (x2 if shape is None else x2.to(D))


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_under_the_kernels_nesting(name):
    """Implementations 1 and 2 (the two nestings; 3 and "auto" take 1's path for a layer without a rule)."""
    model, x1, x2 = _model(name)
    f, params = ntkfunc.from_module(model)
    ref = reference_kernel(f, params, x1, x2, (), ())
    for implementation in (1, 2):
        k = ntkfunc.ntk_fn(f, trace_axes=(), implementation=implementation)(x1, x2, params)
        assert max_rel_err(k, ref) <= 1e-12, (implementation, max_rel_err(k, ref))


def test_the_list_names_torch_nn_layers():
    """Every entry is a ``torch.nn`` layer (its name up to a '-' or '.' variant), so the list cannot drift from torch."""
    for name in LAYERS:
        base = name.split("-")[0].split(".")[0]
        assert isinstance(getattr(nn, base, None), type) and issubclass(getattr(nn, base), nn.Module), name
