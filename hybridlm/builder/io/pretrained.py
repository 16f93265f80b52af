"""Model folders: weights + spec + training length + tokenizer, loadable without any trainer.

    DIR/model.safetensors   the weights (tied embeddings stored once)
    DIR/spec.yaml           the ModelSpec
    DIR/hybridlm.json       format version, training length, tokenizer record, the spec the weights
                            were saved with, free-form metadata
    DIR/config.json         an HF-style summary (``layer_types``) for other tools; never read back
    DIR/tokenizer.json      only for `tokenizers` tokenizers

``save_pretrained`` writes one into a temporary sibling folder and renames it into place, so an
interrupted save leaves either the old folder or the new one, never a mix. ``load_pretrained``
(``hybridlm.load``) rebuilds the model and checks every file on the way, as one
:class:`HybridLMError` that names the folder and the file.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hybridlm.builder.model.devices import resolve_device, resolve_dtype
from hybridlm.builder.io.folder_checks import (NonFiniteWeightsWarning, check_spec_unchanged, check_train_seq_len,
                                            check_weights, json_type, load_folder_tokenizer, read_meta,
                                            recorded_spec, spec_changes, warn_non_finite)
from hybridlm.builder.io.folder_format import (FORMAT, FORMAT_VERSION, HF_CONFIG_FILE, META_FILE, OWN_FILES,
                                            SPEC_FILE, WEIGHTS_FILE)
from hybridlm.builder.io.folder_write import check_save_target, fsync_tree, move_into_place
from hybridlm.builder.model.hybrid_lm import HybridLM
from hybridlm.errors import HybridLMError, SpecError
from hybridlm.layouts.io import load_spec, save_spec
from hybridlm.layouts.spec import ModelSpec
from hybridlm.tokenizer import ByteTokenizer, check_vocab, load_tokenizer

__all__ = ["FORMAT", "FORMAT_VERSION", "HF_CONFIG_FILE", "META_FILE", "OWN_FILES", "SPEC_FILE", "WEIGHTS_FILE",
           "NonFiniteWeightsWarning", "Pretrained", "check_save_target", "hf_config", "is_model_folder",
           "load_pretrained", "resolve_device", "resolve_dtype", "save_pretrained"]


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


# -- saving ----------------------------------------------------------------------------------------
def save_pretrained(model: HybridLM, folder: str | Path, *, tokenizer=None, train_seq_len: int | None = None,
                    metadata: dict | None = None, overwrite: bool = False) -> Path:
    """Write a model folder; returns ``folder``.

    Everything is written into a temporary sibling folder first and renamed into place at the end.
    ``folder`` may be new or empty; an existing model folder is replaced only with ``overwrite=True``;
    any other non-empty folder (or a file) is refused.
    """
    from safetensors.torch import save_model

    folder = Path(folder)
    tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else (tokenizer or ByteTokenizer())
    check_vocab(tokenizer, model.spec.vocab_size)
    train_seq_len = check_train_seq_len(train_seq_len, "save_pretrained")
    if metadata is not None and not isinstance(metadata, dict):
        raise HybridLMError(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        json.dumps(metadata or {})
    except (TypeError, ValueError) as err:
        raise HybridLMError(f"metadata must be JSON-serialisable (str, int, float, bool, None, list, dict): "
                            f"{err}") from None
    target = Path(os.path.realpath(folder)) if folder.is_symlink() else Path(os.path.abspath(folder))
    check_save_target(target, overwrite=overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise HybridLMError(f"cannot create the folder {target.parent} for {folder}: {err.strerror or err}") from None
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        tmp.mkdir()
    except OSError as err:
        raise HybridLMError(f"cannot write into {target.parent}: {err.strerror or err}") from None
    try:
        save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        save_spec(model.spec, tmp / SPEC_FILE)
        meta = {"format": FORMAT, "version": FORMAT_VERSION, "train_seq_len": train_seq_len,
                "tokenizer": tokenizer.save(tmp), "spec": model.spec.to_dict(exclude_defaults=False),
                "metadata": metadata or {}}
        (tmp / HF_CONFIG_FILE).write_text(json.dumps(hf_config(model.spec, train_seq_len), indent=2) + "\n")
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        fsync_tree(tmp)
        check_save_target(target, overwrite=overwrite)  # nothing appeared there meanwhile
        move_into_place(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def hf_config(spec: ModelSpec, train_seq_len: int | None) -> dict:
    return {"model_type": "hybridlm", "architectures": ["HybridLM"], "vocab_size": spec.vocab_size,
            "hidden_size": spec.d_model, "num_hidden_layers": len(spec.layer_types()),
            "layer_types": spec.layer_types(), "tie_word_embeddings": spec.tie_embeddings,
            "rms_norm_eps": spec.norm_eps, "max_position_embeddings": train_seq_len}


# -- loading ---------------------------------------------------------------------------------------
def load_pretrained(folder: str | Path, device: torch.device | str = "cpu",
                    dtype: "torch.dtype | str | None" = None) -> Pretrained:
    """Rebuild a model folder's model (in eval mode) with its tokenizer and training length.

    ``dtype``: a torch dtype or its name ("float32", "bfloat16", "float16"); ``None`` keeps float32.
    Every problem with the folder is one :class:`HybridLMError` naming the folder and the file;
    NaN/inf weights give one :class:`NonFiniteWeightsWarning` naming the tensors.
    """
    from safetensors.torch import load_model

    dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    folder = Path(folder)
    if not folder.exists():
        raise HybridLMError(f"model folder {folder} does not exist")
    if not folder.is_dir():
        raise HybridLMError(f"{folder} is a file, not a hybridlm model folder (pass the folder that holds {META_FILE})")
    if not is_model_folder(folder):
        raise HybridLMError(f"{folder} is not a hybridlm model folder (no {META_FILE}); "
                            "write one with hybridlm.save_pretrained or `hybridlm export`")
    meta = read_meta(folder)
    meta_path = folder / META_FILE
    train_seq_len = check_train_seq_len(meta.get("train_seq_len"), str(meta_path))
    metadata = meta.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise HybridLMError(f"{meta_path}: \"metadata\" must be a JSON object, not {json_type(metadata)}")
    spec_path = folder / SPEC_FILE
    if not spec_path.is_file():
        raise HybridLMError(f"{folder} has no {SPEC_FILE} (the model spec); the folder is incomplete: "
                            "save or export the model again")
    try:
        spec = load_spec(spec_path)
    except SpecError as err:
        msg = str(err)
        raise HybridLMError(msg if str(spec_path) in msg else f"{spec_path}: {msg}") from None
    saved_spec = recorded_spec(meta, meta_path)
    tokenizer = load_folder_tokenizer(meta.get("tokenizer"), folder, spec)

    weights = folder / WEIGHTS_FILE
    model = HybridLM(spec, device="meta")
    check_weights(weights, model, spec_changes=spec_changes(saved_spec, spec))
    check_spec_unchanged(saved_spec, spec, folder)
    try:
        model.to_empty(device=device)
    except (RuntimeError, AssertionError) as err:
        raise HybridLMError(f"cannot place the model of {folder} on device {device}: {err}") from None
    try:
        load_model(model, str(weights), strict=True, device=str(device))
    except Exception as err:  # safetensors' own errors, torch's copy errors: all mean a damaged file
        raise HybridLMError(f"{weights}: cannot read the weights ({err}); the file is damaged or incomplete: "
                            "save or export the model again") from None
    model.tie_weights()
    warn_non_finite(model, weights)
    if dtype is not None:
        model.to(dtype)
    return Pretrained(model.eval(), spec, tokenizer, train_seq_len, metadata, folder)
