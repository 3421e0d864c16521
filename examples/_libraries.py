"""The third-party model families ntkfunc is checked on, built from configs with random weights (no download).

- :func:`load`: import ``transformers``, ``timm`` or ``torchvision``, or raise ImportError
  with the reason. PyPI's torchvision wheel is built against a CUDA torch and its C
  operators do not load beside a CPU build of torch ("operator torchvision::nms does not
  exist", raised while importing it, and so while importing timm or transformers, which
  import torchvision when it is installed); its model classes need none of them, so
  :func:`load` defines the two operator schemas its import registers fakes for first.
- :data:`FAMILIES`: name -> :class:`Family` (the library, and a builder of
  ``(module, input, from_module kwargs)`` at a ``"tiny"`` size for tests or the ``"base"``
  size people use). Used by ``tests/test_integrations.py``, ``benchmarks/coverage.py`` and
  ``examples/gpt2_token_ntk.py``.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

_SCHEMAS: list[Any] = []  # the torchvision library fragment defined by load(), kept alive


def _torchvision_schemas() -> None:
    """Define ``torchvision::nms`` / ``qnms`` when torchvision is installed but its C operators did not load."""
    if _SCHEMAS or importlib.util.find_spec("torchvision") is None:
        return
    try:
        torch.ops.torchvision.nms  # noqa: B018  (loaded: nothing to do)
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _SCHEMAS.append(lib)


def load(name: str) -> ModuleType:
    """``transformers``, ``timm`` or ``torchvision``; ImportError (with the reason) when it cannot be imported."""
    if importlib.util.find_spec(name) is None:
        raise ImportError(f"{name} is not installed (pip install -e '.[integrations]', see the Makefile)")
    _torchvision_schemas()
    try:
        return importlib.import_module(name)
    except Exception as err:  # a broken install: report it, do not crash the caller
        raise ImportError(f"{name} is installed but does not import: {type(err).__name__}: {err}") from err


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: its library and ``build(size, seed) -> (module, x, from_module kwargs)``."""

    library: str
    build: Callable[[str, int], tuple[torch.nn.Module, Any, dict[str, Any]]]


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _tokens(n: int, t: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _tv(name: str, **kw: Any) -> Callable[[str, int], tuple[torch.nn.Module, Any, dict[str, Any]]]:
    def build(size: str, seed: int) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
        tv = load("torchvision")
        torch.manual_seed(seed)
        model = getattr(tv.models, name)(num_classes=10, **kw)
        return model.eval(), _images(2, 16 if size == "tiny" else 32, seed), {}

    return build


def _tv_vit(size: str, seed: int) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    tv = load("torchvision")
    torch.manual_seed(seed)
    dims = dict(num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32) if size == "tiny" else dict(num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072)
    model = tv.models.VisionTransformer(image_size=32, patch_size=8, num_classes=10, **dims)
    return model.eval(), _images(2, 32, seed), {}


def _timm(name: str, tiny: dict[str, Any]) -> Callable[[str, int], tuple[torch.nn.Module, Any, dict[str, Any]]]:
    def build(size: str, seed: int) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
        timm = load("timm")
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, num_classes=10, **(tiny if size == "tiny" else {"img_size": 32} if "vit" in name else {}))
        return model.eval(), _images(2, 32, seed), {}

    return build


def _hf(kind: str, attn: str) -> Callable[[str, int], tuple[torch.nn.Module, Any, dict[str, Any]]]:
    def build(size: str, seed: int) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
        tr = load("transformers")
        torch.manual_seed(seed)
        tiny = size == "tiny"
        if kind == "gpt2":
            cfg = tr.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=16) if tiny else tr.GPT2Config()
            cls, kw = tr.GPT2LMHeadModel, {}
        elif kind == "bert":
            cfg = (tr.BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=32,
                                 max_position_embeddings=16) if tiny else tr.BertConfig())
            cls, kw = tr.BertForMaskedLM, {}
        else:  # a Llama with grouped-query attention and tied embeddings (the SmolLM-135M shape at "base")
            cfg = (tr.LlamaConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                                  vocab_size=32, max_position_embeddings=16, tie_word_embeddings=True) if tiny else
                   tr.LlamaConfig(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536,
                                  vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True))
            cls, kw = tr.LlamaForCausalLM, {}
        cfg._attn_implementation = attn
        model = cls(cfg).eval()
        x = {"input_ids": _tokens(2, 5 if tiny else 8, cfg.vocab_size, seed)}
        if not tiny:  # the kernel of a few logits: the same rules, a small output (coverage only)
            kw["output"] = lambda out: out.logits[:, -1, :4]
        return model, x, kw

    return build


FAMILIES: dict[str, Family] = {
    "torchvision resnet18": Family("torchvision", _tv("resnet18")),
    "torchvision mobilenet_v3_small": Family("torchvision", _tv("mobilenet_v3_small")),
    "torchvision efficientnet_b0": Family("torchvision", _tv("efficientnet_b0")),
    "torchvision vit": Family("torchvision", _tv_vit),
    "timm convnext_atto": Family("timm", _timm("convnext_atto", {"depths": (1, 1, 1, 1), "dims": (8, 16, 24, 32)})),
    "timm vit_tiny": Family("timm", _timm("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2})),
    "hf gpt2 eager": Family("transformers", _hf("gpt2", "eager")),
    "hf gpt2 sdpa": Family("transformers", _hf("gpt2", "sdpa")),
    "hf bert eager": Family("transformers", _hf("bert", "eager")),
    "hf bert sdpa": Family("transformers", _hf("bert", "sdpa")),
    "hf llama eager": Family("transformers", _hf("llama", "eager")),
    "hf llama sdpa": Family("transformers", _hf("llama", "sdpa")),
}
