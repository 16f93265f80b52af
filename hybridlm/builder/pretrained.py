"""Model folders: weights + spec + training length + tokenizer, loadable without any trainer.

    DIR/model.safetensors   the weights (tied embeddings stored once)
    DIR/spec.yaml           the ModelSpec
    DIR/hybridlm.json       format version, training length, tokenizer record, free-form metadata
    DIR/config.json         an HF-style summary (``layer_types``) for other tools; never read back
    DIR/tokenizer.json      only for `tokenizers` tokenizers

``save_pretrained`` writes one; ``load_pretrained`` (``hybridlm.load``) rebuilds the model.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hybridlm.builder.model import HybridLM
from hybridlm.errors import HybridLMError
from hybridlm.layouts.io import load_spec, save_spec
from hybridlm.layouts.spec import ModelSpec
from hybridlm.tokenizer import ByteTokenizer, check_vocab, load_tokenizer

FORMAT = "hybridlm-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "spec.yaml"
META_FILE = "hybridlm.json"
HF_CONFIG_FILE = "config.json"


@dataclass
class Pretrained:
    """A loaded model folder."""

    model: HybridLM
    spec: ModelSpec
    tokenizer: Any
    train_seq_len: int | None
    metadata: dict = field(default_factory=dict)
    path: Path | None = None


def is_model_folder(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def save_pretrained(model: HybridLM, folder: str | Path, *, tokenizer=None, train_seq_len: int | None = None,
                    metadata: dict | None = None) -> Path:
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or ByteTokenizer()
    check_vocab(tokenizer, model.spec.vocab_size)
    save_model(model, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT})
    save_spec(model.spec, folder / SPEC_FILE)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "train_seq_len": train_seq_len,
            "tokenizer": tokenizer.save(folder), "metadata": metadata or {}}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    (folder / HF_CONFIG_FILE).write_text(json.dumps(hf_config(model.spec, train_seq_len), indent=2) + "\n")
    return folder


def hf_config(spec: ModelSpec, train_seq_len: int | None) -> dict:
    return {"model_type": "hybridlm", "architectures": ["HybridLM"], "vocab_size": spec.vocab_size,
            "hidden_size": spec.d_model, "num_hidden_layers": len(spec.layer_types()),
            "layer_types": spec.layer_types(), "tie_word_embeddings": spec.tie_embeddings,
            "rms_norm_eps": spec.norm_eps, "max_position_embeddings": train_seq_len}


def load_pretrained(folder: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None) -> Pretrained:
    """Rebuild a model folder's model (in eval mode) with its tokenizer and training length."""
    from safetensors.torch import load_model

    folder = Path(folder)
    if not is_model_folder(folder):
        raise HybridLMError(f"{folder} is not a hybridlm model folder (no {META_FILE}); "
                            "write one with hybridlm.save_pretrained or `hybridlm export`")
    meta = json.loads((folder / META_FILE).read_text())
    if meta.get("format") != FORMAT or meta.get("version", 0) > FORMAT_VERSION:
        raise HybridLMError(f"{folder / META_FILE}: format {meta.get('format')!r} version {meta.get('version')} "
                            f"is not one this hybridlm reads ({FORMAT} <= {FORMAT_VERSION}); upgrade hybridlm")
    spec = load_spec(folder / SPEC_FILE)
    model = HybridLM(spec, device="meta")
    model.to_empty(device=device)
    _check_weights(folder / WEIGHTS_FILE, model)
    load_model(model, str(folder / WEIGHTS_FILE), strict=True, device=str(device))
    model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    tokenizer = load_tokenizer(meta.get("tokenizer"), folder)
    check_vocab(tokenizer, spec.vocab_size)
    return Pretrained(model.eval(), spec, tokenizer, meta.get("train_seq_len"), meta.get("metadata", {}), folder)


def _check_weights(path: Path, model: HybridLM) -> None:
    """Names and shapes on disk against the spec's model, as one readable error (not torch's)."""
    from safetensors import safe_open

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with safe_open(str(path), framework="pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if model.spec.tie_embeddings:  # stored once, under either name
        expected.pop("output.weight", None)
        if "tok_embeddings.weight" not in stored and "output.weight" in stored:
            stored["tok_embeddings.weight"] = stored.pop("output.weight")
        stored.pop("output.weight", None)
    problems = [f"missing {k}" for k in sorted(set(expected) - set(stored))]
    problems += [f"unexpected {k}" for k in sorted(set(stored) - set(expected))]
    problems += [f"{k} is {list(stored[k])}, the spec needs {list(expected[k])}"
                 for k in sorted(set(stored) & set(expected)) if stored[k] != expected[k]]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise HybridLMError(f"{path} does not match {SPEC_FILE}: {'; '.join(problems[:5])}{more}")
