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
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hybridlm.builder.model import HybridLM
from hybridlm.errors import BackendUnavailable, HybridLMError, SpecError
from hybridlm.layouts.io import load_spec, save_spec
from hybridlm.layouts.spec import ModelSpec
from hybridlm.tokenizer import TOKENIZER_FILE, ByteTokenizer, check_vocab, load_tokenizer

FORMAT = "hybridlm-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "spec.yaml"
META_FILE = "hybridlm.json"
HF_CONFIG_FILE = "config.json"
MAX_META_BYTES = 64 << 20
OWN_FILES = (WEIGHTS_FILE, SPEC_FILE, META_FILE, HF_CONFIG_FILE, TOKENIZER_FILE)  # all a save may write

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
          "float64": torch.float64, "fp64": torch.float64, "double": torch.float64}
# Top-level spec fields that shape or compute the model from its weights. Fields that do not, and so
# may be edited in a saved folder's spec.yaml: a label (name), kernel choices (backend, chunk_size)
# and initialization-only settings (init_std, dt_min, dt_max, dt_init_floor).
_MODEL_FIELDS = ("vocab_size", "d_model", "tie_embeddings", "norm_eps", "residual_in_fp32")
_FREE_FIELDS = frozenset({"name", "backend", "chunk_size", "init_std", "dt_min", "dt_max", "dt_init_floor"})


class NonFiniteWeightsWarning(RuntimeWarning):
    """A loaded model folder holds NaN or inf weights."""


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


# -- arguments -------------------------------------------------------------------------------------
def resolve_dtype(dtype: "torch.dtype | str | None") -> torch.dtype | None:
    """``None``, a floating-point torch dtype, or its name ("float32", "bfloat16", "float16", ...)."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise HybridLMError(f"dtype {dtype} is not a floating-point type; use float32, bfloat16 or float16")
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower()
        key = key[len("torch."):] if key.startswith("torch.") else key
        if key in DTYPES:
            return DTYPES[key]
    raise HybridLMError(f"unknown dtype {_shown(dtype)}: use one of float32, bfloat16, float16, float64 "
                        f"(or {', '.join(k for k in DTYPES if k not in ('float32', 'bfloat16', 'float16', 'float64'))}"
                        ") or a torch dtype such as torch.bfloat16")


def resolve_device(device: "torch.device | str | int | None") -> torch.device:
    """A device torch knows and this machine has, or one clear error."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise HybridLMError(f"unknown device {_shown(device)}: use e.g. 'cpu', 'cuda' or 'cuda:0' "
                            f"(torch says: {str(err).splitlines()[0]})") from None
    if dev.type == "meta":
        raise HybridLMError("device 'meta' holds no weights: load onto 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise HybridLMError(f"device {str(device)!r} asked for, but CUDA is not available here; use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise HybridLMError(f"device {str(device)!r} asked for, but this machine has {n} CUDA device(s) "
                                f"(cuda:0..cuda:{n - 1})")
    return dev


def _shown(value: Any, limit: int = 120) -> str:
    """A bounded repr for messages (a damaged file may hold a huge value)."""
    import reprlib

    r = reprlib.Repr()
    r.maxstring = r.maxother = r.maxlong = limit
    r.maxlist = r.maxdict = r.maxtuple = r.maxset = 8
    r.maxlevel = 3
    text = r.repr(value)
    return text if len(text) <= limit + 20 else text[:limit] + "..."


def _check_train_seq_len(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HybridLMError(f"{where}: train_seq_len {_shown(value)} must be a positive integer (or null when unknown)")
    return int(value)


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
    train_seq_len = _check_train_seq_len(train_seq_len, "save_pretrained")
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
        _fsync_tree(tmp)
        check_save_target(target, overwrite=overwrite)  # nothing appeared there meanwhile
        _move_into_place(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def check_save_target(folder: str | Path, *, overwrite: bool = False) -> None:
    """Refuse, before any work, a save that would clobber something (``hybridlm export`` calls it first)."""
    folder = Path(folder)
    if folder.is_symlink():
        folder = Path(os.path.realpath(folder))
    if not folder.exists():
        if folder.parent.exists() and not folder.parent.is_dir():
            raise HybridLMError(f"cannot save a model to {folder}: {folder.parent} is a file, not a folder")
        return
    if not folder.is_dir():
        raise HybridLMError(f"cannot save a model to {folder}: it is an existing file, not a folder; "
                            "give the path of a new (or empty) folder")
    try:
        entries = sorted(os.listdir(folder))
    except OSError as err:
        raise HybridLMError(f"cannot save a model to {folder}: cannot list it ({err.strerror or err})") from None
    if not entries:
        return
    foreign = [e for e in entries if e not in OWN_FILES]
    complete = (folder / META_FILE).is_file()
    incomplete = not complete and not foreign and (folder / SPEC_FILE).exists()  # an interrupted in-place save
    if not (complete or incomplete):
        raise HybridLMError(f"refusing to save a model into {folder}: the folder is not empty and is not a hybridlm "
                            f"model folder (it holds {_listing(folder, entries)}); choose a new or empty folder")
    if not overwrite:
        what = "a hybridlm model folder" if complete else "an incomplete hybridlm model folder (an interrupted save?)"
        raise HybridLMError(f"{folder} already holds {what}; pass overwrite=True (`--overwrite` on the command line) "
                            "to replace it, or choose another folder")
    if foreign:
        raise HybridLMError(f"refusing to replace the model folder {folder}: besides the model it holds "
                            f"{_listing(folder, foreign)}, which replacing the folder would delete; "
                            "move them out or choose another folder")


def _listing(folder: Path, names: list[str], most: int = 6) -> str:
    shown = [n + ("/" if (folder / n).is_dir() else "") for n in names[:most]]
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(shown) + more


def _fsync_tree(folder: Path) -> None:
    """Flush the new files before the rename, so a crash cannot leave a renamed folder of empty files."""
    for path in [*folder.iterdir(), folder]:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def _is_cwd(path: Path) -> bool:
    try:
        return os.path.samefile(path, os.getcwd())
    except OSError:
        return False


def _move_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        _fsync_dir(target.parent)
        return
    # Renaming the working directory away would strand the process, and a mount point cannot be
    # renamed: those are filled in place instead.
    if not _is_cwd(target) and not os.path.ismount(target):
        shutil.copymode(target, tmp)
        try:
            if not any(target.iterdir()):  # an empty folder: rename over it (POSIX replaces an empty directory)
                os.replace(tmp, target)
            else:  # a model folder, overwrite=True: old aside, new in, old deleted
                old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
                os.rename(target, old)
                try:
                    os.rename(tmp, target)
                except BaseException:
                    os.rename(old, target)
                    raise
                shutil.rmtree(old, ignore_errors=True)
            _fsync_dir(target.parent)
            return
        except OSError:
            pass  # nothing was changed: fill it in place
    _replace_contents(tmp, target)


def _replace_contents(tmp: Path, target: Path) -> None:
    """In place, file by file: hybridlm.json goes first and comes back last, so a folder never reads as
    complete while it mixes old and new files (and spec.yaml comes first, so it stays recognisable)."""
    def remove(p: Path) -> None:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()

    remove(target / META_FILE)
    new = [p.name for p in tmp.iterdir() if p.name != META_FILE]
    for name in sorted(new, key=lambda n: n != SPEC_FILE):
        if (target / name).is_dir() and not (target / name).is_symlink():
            remove(target / name)
        os.replace(tmp / name, target / name)
    for name in OWN_FILES:
        if name not in new and name != META_FILE:
            remove(target / name)
    os.replace(tmp / META_FILE, target / META_FILE)
    _fsync_dir(target)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    meta = _read_meta(folder)
    meta_path = folder / META_FILE
    train_seq_len = _check_train_seq_len(meta.get("train_seq_len"), str(meta_path))
    metadata = meta.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise HybridLMError(f"{meta_path}: \"metadata\" must be a JSON object, not {_json_type(metadata)}")
    spec_path = folder / SPEC_FILE
    if not spec_path.is_file():
        raise HybridLMError(f"{folder} has no {SPEC_FILE} (the model spec); the folder is incomplete: "
                            "save or export the model again")
    try:
        spec = load_spec(spec_path)
    except SpecError as err:
        msg = str(err)
        raise HybridLMError(msg if str(spec_path) in msg else f"{spec_path}: {msg}") from None
    saved_spec = _recorded_spec(meta, meta_path)
    tokenizer = _load_folder_tokenizer(meta.get("tokenizer"), folder, spec)

    weights = folder / WEIGHTS_FILE
    model = HybridLM(spec, device="meta")
    _check_weights(weights, model, spec_changes=_spec_changes(saved_spec, spec))
    _check_spec_unchanged(saved_spec, spec, folder)
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
    _warn_non_finite(model, weights)
    if dtype is not None:
        model.to(dtype)
    return Pretrained(model.eval(), spec, tokenizer, train_seq_len, metadata, folder)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _read_meta(folder: Path) -> dict:
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
        raise HybridLMError(f"{path} holds {_json_type(meta)}, not the JSON object a model folder's {META_FILE} is")
    version = meta.get("version", FORMAT_VERSION)
    if meta.get("format") != FORMAT:
        raise HybridLMError(f"{path}: format {_shown(meta.get('format'))} is not {FORMAT!r}: this is not a hybridlm "
                            "model folder, or one this hybridlm cannot read (upgrade hybridlm)")
    if isinstance(version, bool) or not isinstance(version, int):
        raise HybridLMError(f"{path}: version {_shown(version)} must be an integer (this hybridlm reads {FORMAT} "
                            f"version 1..{FORMAT_VERSION})")
    if version > FORMAT_VERSION:
        raise HybridLMError(f"{path}: format {FORMAT!r} version {version} is not one this hybridlm reads "
                            f"({FORMAT} <= {FORMAT_VERSION}); upgrade hybridlm")
    if version < 1:
        raise HybridLMError(f"{path}: version {version} is not a version hybridlm ever wrote (1..{FORMAT_VERSION})")
    return meta


def _load_folder_tokenizer(record: Any, folder: Path, spec: ModelSpec):
    meta_path = folder / META_FILE
    if record is not None and record != "byte" and not isinstance(record, dict):
        raise HybridLMError(f"{meta_path}: the tokenizer record {_shown(record)} is not an object like "
                            '{"kind": "byte"} or {"kind": "tokenizers", "file": "tokenizer.json"}')
    name = record.get("file") if isinstance(record, dict) else None
    if isinstance(name, str) and (Path(name).is_absolute() or ".." in Path(name).parts):
        raise HybridLMError(f"{meta_path}: the tokenizer record names {_shown(name)}, which is not a file inside "
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


def _recorded_spec(meta: dict, meta_path: Path) -> ModelSpec | None:
    """The spec recorded at save time; ``None`` for folders written before it was recorded."""
    recorded = meta.get("spec")
    if recorded is None:
        return None
    if not isinstance(recorded, dict):
        raise HybridLMError(f"{meta_path}: the recorded \"spec\" is {_json_type(recorded)}, not an object; "
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


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(data, list) and any(isinstance(v, (dict, list)) for v in data):
        out = {}
        for i, v in enumerate(data):
            out.update(_flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: data}


def _spec_changes(saved: ModelSpec | None, now: ModelSpec) -> list[str]:
    """``field: saved X, now Y`` for every spec field that differs (the free fields aside)."""
    if saved is None or _same_model(saved, now):
        return []
    a = _flatten(saved.to_dict(exclude_defaults=False))
    b = _flatten(now.to_dict(exclude_defaults=False))
    missing = object()
    out = []
    keys = [k for k in a] + [k for k in b if k not in a]
    for key in [k for k in keys if k.rsplit(".", 1)[-1] not in _FREE_FIELDS]:
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            out.append(f"{key}: saved {'(absent)' if va is missing else _shown(va)}, "
                       f"now {'(absent)' if vb is missing else _shown(vb)}")
    return out or ["the resolved blocks differ"]


def _check_spec_unchanged(saved: ModelSpec | None, spec: ModelSpec, folder: Path) -> None:
    changes = _spec_changes(saved, spec)
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


def _check_weights(path: Path, model: HybridLM, spec_changes: list[str] | None = None) -> None:
    """Names, shapes and dtypes on disk against the spec's model, as one readable error (not torch's)."""
    from safetensors import safe_open

    if not path.exists():
        present = sorted(os.listdir(path.parent))
        raise HybridLMError(f"{path.parent} has no {WEIGHTS_FILE} (the weights; the folder holds "
                            f"{_listing(path.parent, present) or 'nothing'}): save or export the model again")
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


def _warn_non_finite(model: HybridLM, path: Path) -> None:
    stored = set(model.state_dict())  # not the non-persistent buffers; tied weights once
    bad = [name for name, t in [*model.named_parameters(), *model.named_buffers()]
           if name in stored and (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" (and {len(bad) - 8} more)" if len(bad) > 8 else ""
        warnings.warn(f"{path}: {len(bad)} tensor(s) hold NaN or inf values: {', '.join(bad[:8])}{more}; "
                      "the model's outputs will not be finite (did training diverge?)",
                      NonFiniteWeightsWarning, stacklevel=3)
