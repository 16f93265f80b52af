"""Reading a model folder back: every file is checked, and each problem is one HybridLMError that
names the folder and the file (or, for NaN/inf weights, one warning naming the tensors)."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from hybridlm.builder.io.folder_format import (FORMAT, FORMAT_VERSION, MAX_META_BYTES, META_FILE, SPEC_FILE,
                                            WEIGHTS_FILE)
from hybridlm.builder.io.folder_write import listing
from hybridlm.builder.model.hybrid_lm import HybridLM
from hybridlm.errors import BackendUnavailable, HybridLMError, SpecError, shown_value
from hybridlm.layouts.diff import MISSING, spec_differences
from hybridlm.layouts.spec import ModelSpec
from hybridlm.tokenizer import TOKENIZER_FILE, check_vocab, load_tokenizer

# Top-level spec fields that shape or compute the model from its weights. Fields that do not, and so
# may be edited in a saved folder's spec.yaml: a label (name), kernel choices (backend, chunk_size)
# and initialization-only settings (init_std, dt_min, dt_max, dt_init_floor).
_MODEL_FIELDS = ("vocab_size", "d_model", "tie_embeddings", "norm_eps", "residual_in_fp32")
_FREE_FIELDS = frozenset({"name", "backend", "chunk_size", "init_std", "dt_min", "dt_max", "dt_init_floor"})


class NonFiniteWeightsWarning(RuntimeWarning):
    """A loaded model folder holds NaN or inf weights."""


def check_train_seq_len(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HybridLMError(f"{where}: train_seq_len {shown_value(value)} must be a positive integer (or null when unknown)")
    return int(value)


def json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def read_meta(folder: Path) -> dict:
    path = folder / META_FILE
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_META_BYTES + 1)  # never more: a huge file stops here
        if len(raw) > MAX_META_BYTES:
            raise HybridLMError(f"{path} is larger than {MAX_META_BYTES >> 20} MiB; a model folder's {META_FILE} "
                                "is a few kilobytes: the folder is damaged, or its metadata belongs in a file "
                                "beside it")
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise HybridLMError(f"{path}: cannot read it ({getattr(err, 'strerror', None) or err})") from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as err:
        raise HybridLMError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                            "the folder is damaged: save or export the model again") from None
    except RecursionError:
        raise HybridLMError(f"{path} nests JSON lists or objects too deeply; the folder is damaged") from None
    if not isinstance(meta, dict):
        raise HybridLMError(f"{path} holds {json_type(meta)}, not the JSON object a model folder's {META_FILE} is")
    version = meta.get("version", FORMAT_VERSION)
    if meta.get("format") != FORMAT:
        raise HybridLMError(f"{path}: format {shown_value(meta.get('format'))} is not {FORMAT!r}: this is not a hybridlm "
                            "model folder, or one this hybridlm cannot read (upgrade hybridlm)")
    if isinstance(version, bool) or not isinstance(version, int):
        raise HybridLMError(f"{path}: version {shown_value(version)} must be an integer (this hybridlm reads {FORMAT} "
                            f"version 1..{FORMAT_VERSION})")
    if version > FORMAT_VERSION:
        raise HybridLMError(f"{path}: format {FORMAT!r} version {version} is not one this hybridlm reads "
                            f"({FORMAT} <= {FORMAT_VERSION}); upgrade hybridlm")
    if version < 1:
        raise HybridLMError(f"{path}: version {version} is not a version hybridlm ever wrote (1..{FORMAT_VERSION})")
    return meta


def load_folder_tokenizer(record: Any, folder: Path, spec: ModelSpec):
    meta_path = folder / META_FILE
    if record is not None and record != "byte" and not isinstance(record, dict):
        raise HybridLMError(f"{meta_path}: the tokenizer record {shown_value(record)} is not an object like "
                            '{"kind": "byte"} or {"kind": "tokenizers", "file": "tokenizer.json"}')
    name = record.get("file") if isinstance(record, dict) else None
    if isinstance(name, str) and (Path(name).is_absolute() or ".." in Path(name).parts):
        raise HybridLMError(f"{meta_path}: the tokenizer record names {shown_value(name)}, which is not a file inside "
                            f"the folder (a model folder keeps its tokenizer as {TOKENIZER_FILE})")
    try:
        tokenizer = load_tokenizer(record, folder)
        check_vocab(tokenizer, spec.vocab_size)
    except BackendUnavailable:
        raise
    except HybridLMError as err:
        msg = str(err)
        raise HybridLMError(msg if str(folder) in msg else f"{meta_path}: {msg}") from None
    return tokenizer


def recorded_spec(meta: dict, meta_path: Path) -> ModelSpec | None:
    """The spec recorded at save time; ``None`` for folders written before it was recorded."""
    recorded = meta.get("spec")
    if recorded is None:
        return None
    if not isinstance(recorded, dict):
        raise HybridLMError(f"{meta_path}: the recorded \"spec\" is {json_type(recorded)}, not an object; "
                            "the folder is damaged: save or export the model again")
    try:
        return ModelSpec.model_validate(recorded)
    except SpecError as err:
        raise HybridLMError(f"{meta_path}: the spec recorded at save time is not valid ({err}); "
                            "save or export the model again (or upgrade hybridlm)") from None


def _block_key(block) -> tuple:
    data = block.model_dump(mode="json")
    return block.kind, {k: v for k, v in data.items() if k not in _FREE_FIELDS}


def _same_model(a: ModelSpec, b: ModelSpec) -> bool:
    """Equal as models of these weights: the same top-level fields and the same resolved blocks in
    order (the symbols, how pattern and overrides are written, and the free fields may differ)."""
    return (all(getattr(a, f) == getattr(b, f) for f in _MODEL_FIELDS)
            and [_block_key(r.spec) for r in a.resolve()] == [_block_key(r.spec) for r in b.resolve()])


def spec_changes(saved: ModelSpec | None, now: ModelSpec) -> list[str]:
    """``field: saved X, now Y`` for every spec field that differs (the free fields aside)."""
    if saved is None or _same_model(saved, now):
        return []
    differences = spec_differences(saved.to_dict(exclude_defaults=False), now.to_dict(exclude_defaults=False))
    out = [f"{path}: saved {'(absent)' if a is MISSING else shown_value(a, 120)}, "
           f"now {'(absent)' if b is MISSING else shown_value(b, 120)}"
           for path, a, b in differences if path.rsplit(".", 1)[-1] not in _FREE_FIELDS]
    return out or ["the resolved blocks differ"]


def check_spec_unchanged(saved: ModelSpec | None, spec: ModelSpec, folder: Path) -> None:
    changes = spec_changes(saved, spec)
    if changes:
        more = f" (and {len(changes) - 8} more)" if len(changes) > 8 else ""
        raise HybridLMError(f"{folder / SPEC_FILE} was changed after the weights were saved: it no longer matches "
                            f"the spec recorded in {META_FILE} ({'; '.join(changes[:8])}{more}); restore "
                            f"{SPEC_FILE} (the saved spec is under \"spec\" in {META_FILE}) or save the model again")


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def _dtype_kind(dtype: "str | torch.dtype") -> str:
    if isinstance(dtype, torch.dtype):
        return "float" if dtype.is_floating_point else "complex" if dtype.is_complex else \
            "bool" if dtype == torch.bool else "integer"
    if dtype in _FLOAT_DTYPES or dtype.startswith("F8") or dtype.startswith("F4") or dtype.startswith("F6"):
        return "float"
    return {"BOOL": "bool", "C64": "complex", "C128": "complex"}.get(dtype, "integer")


def check_weights(path: Path, model: HybridLM, spec_changes: list[str] | None = None) -> None:
    """Names, shapes and dtypes on disk against the spec's model, as one readable error (not torch's)."""
    from safetensors import safe_open

    if not path.exists():
        present = sorted(os.listdir(path.parent))
        raise HybridLMError(f"{path.parent} has no {WEIGHTS_FILE} (the weights; the folder holds "
                            f"{listing(path.parent, present) or 'nothing'}): save or export the model again")
    if path.is_dir():
        raise HybridLMError(f"{path} is a folder, not a safetensors weights file: save or export the model again")
    if path.stat().st_size == 0:
        raise HybridLMError(f"{path} is empty (0 bytes): an interrupted save? Save or export the model again")
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as err:  # SafetensorError on a truncated or foreign file, OSError
        raise HybridLMError(f"{path} is not a readable safetensors file ({err}); it is damaged or incomplete: "
                            "save or export the model again") from None
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    if model.spec.tie_embeddings:  # stored once, under either name
        expected.pop("output.weight", None)
        if "tok_embeddings.weight" not in stored and "output.weight" in stored:
            stored["tok_embeddings.weight"] = stored.pop("output.weight")
        stored.pop("output.weight", None)
    problems = [f"missing {k}" for k in sorted(set(expected) - set(stored))]
    problems += [f"unexpected {k}" for k in sorted(set(stored) - set(expected))]
    problems += [f"{k} is {list(stored[k][0])}, the spec needs {list(expected[k][0])}"
                 for k in sorted(set(stored) & set(expected)) if stored[k][0] != expected[k][0]]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        changed = (f"; {SPEC_FILE} was changed after the weights were saved ({'; '.join(spec_changes[:8])})"
                   if spec_changes else "")
        raise HybridLMError(f"{path} does not match {SPEC_FILE}: {'; '.join(problems[:5])}{more}{changed}")
    wrong = [f"{k} is stored as {stored[k][1]} ({_dtype_kind(stored[k][1])}), but it is a "
             f"{_dtype_kind(expected[k][1])} tensor" for k in sorted(set(stored) & set(expected))
             if _dtype_kind(stored[k][1]) != _dtype_kind(expected[k][1])]
    if wrong:
        more = f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else ""
        raise HybridLMError(f"{path}: tensors of the wrong type: {'; '.join(wrong[:5])}{more}; "
                            "the file was not written by hybridlm: save or export the model again")


def warn_non_finite(model: HybridLM, path: Path) -> None:
    stored = set(model.state_dict())  # not the non-persistent buffers; tied weights once
    bad = [name for name, t in [*model.named_parameters(), *model.named_buffers()]
           if name in stored and (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" (and {len(bad) - 8} more)" if len(bad) > 8 else ""
        warnings.warn(f"{path}: {len(bad)} tensor(s) hold NaN or inf values: {', '.join(bad[:8])}{more}; "
                      "the model's outputs will not be finite (did training diverge?)",
                      NonFiniteWeightsWarning, stacklevel=3)
