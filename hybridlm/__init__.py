"""hybridlm: build, train and study Mamba-3 / attention / SwiGLU hybrid language models.

    import hybridlm
    spec = hybridlm.load_spec("specs/tiny-hybrid.yaml")   # or hybridlm.get_preset("hybrid-1.5b")
    model = hybridlm.build_model(spec)
    print(hybridlm.format_account(hybridlm.account(spec)))

Importing hybridlm needs only torch, pydantic, PyYAML and einops; GPU packages load on demand.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ModelSpec": "hybridlm.layouts",
    "Mamba3Spec": "hybridlm.layouts",
    "AttentionSpec": "hybridlm.layouts",
    "SwiGLUSpec": "hybridlm.layouts",
    "BlockSpec": "hybridlm.layouts",
    "load_spec": "hybridlm.layouts",
    "save_spec": "hybridlm.layouts",
    "dump_spec": "hybridlm.layouts",
    "spec_from_yaml": "hybridlm.layouts",
    "spec_json_schema": "hybridlm.layouts",
    "get_preset": "hybridlm.layouts.presets",
    "preset_names": "hybridlm.layouts.presets",
    "build_model": "hybridlm.builder",
    "register_block": "hybridlm.builder",
    "account": "hybridlm.builder",
    "format_account": "hybridlm.builder",
    "HybridLM": "hybridlm.builder",
    "Decoder": "hybridlm.builder",
    "SpecError": "hybridlm.errors",
    "HybridLMError": "hybridlm.errors",
    "BackendUnavailable": "hybridlm.errors",
    "ByteTokenizer": "hybridlm.tokenizer",
    "load_tokenizer": "hybridlm.tokenizer",
    "save_pretrained": "hybridlm.builder.io.pretrained",
    "load_pretrained": "hybridlm.builder.io.pretrained",
    "load": "hybridlm.builder.io.pretrained:load_pretrained",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, _, attr = _EXPORTS[name].partition(":")
        return getattr(import_module(module), attr or name)
    raise AttributeError(f"module 'hybridlm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
