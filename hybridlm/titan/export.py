"""A torchtitan DCP checkpoint -> a hybridlm model folder (safetensors + spec + tokenizer + length).

Needs no process group and works for checkpoints written by any number of ranks. The run record
that ``hybridlm train`` writes into the dump folder supplies the spec, tokenizer and training length.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch

from hybridlm.errors import HybridLMError
from hybridlm.titan.trainer import RUN_RECORD

_STEP = re.compile(r"^step-(\d+)$")


def find_step_folder(path: str | Path) -> Path:
    """A ``step-N`` folder as given, or the newest one under a dump folder / its checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise HybridLMError(f"checkpoint {path} does not exist")
    if _STEP.match(path.name) and (path / ".metadata").exists():
        return path
    candidates = [p for folder in (path, path / "checkpoint") if folder.is_dir() for p in folder.iterdir()
                  if _STEP.match(p.name) and (p / ".metadata").exists()]
    if not candidates:
        raise HybridLMError(f"no step-N checkpoint under {path} (train with --checkpoint.enable)")
    return max(candidates, key=lambda p: int(_STEP.match(p.name).group(1)))


def find_run_record(step_folder: Path) -> dict:
    for folder in list(step_folder.parents)[:3]:
        if (folder / RUN_RECORD).is_file():
            return json.loads((folder / RUN_RECORD).read_text())
    raise HybridLMError(f"no {RUN_RECORD} above {step_folder}: was it written by `hybridlm train`?")


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, dtype: "torch.dtype | str | None" = None,
                      overwrite: bool = False) -> Path:
    """Write the checkpoint's weights as a model folder ``out``; an existing model folder there is
    replaced only with ``overwrite=True`` (``--overwrite``), any other non-empty folder is refused."""
    import torch.distributed.checkpoint as dcp

    from hybridlm.builder.model.hybrid_lm import HybridLM
    from hybridlm.builder.io.pretrained import check_save_target, resolve_dtype, save_pretrained
    from hybridlm.layouts.spec import ModelSpec
    from hybridlm.tokenizer import load_tokenizer

    dtype = resolve_dtype(dtype)
    check_save_target(out, overwrite=overwrite)  # before reading the checkpoint
    step_folder = find_step_folder(checkpoint)
    record = find_run_record(step_folder)
    spec = ModelSpec.model_validate(record["spec"])
    model = HybridLM(spec)
    state = model.state_dict()
    if spec.tie_embeddings:
        state.pop("output.weight")  # the same tensor as the embedding
    with warnings.catch_warnings():  # "no process group: loading in one process" is what we want
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(step_folder))
    model.load_state_dict(state, strict=not spec.tie_embeddings)
    model.tie_weights()
    if dtype is not None:
        model.to(dtype)
    step = int(_STEP.match(step_folder.name).group(1))
    metadata = {"step": step, "data": record.get("data"), "loss_on": record.get("loss_on"),
                "checkpoint": str(step_folder.resolve())}
    return save_pretrained(model.eval(), out, tokenizer=load_tokenizer(record["tokenizer"]),
                           train_seq_len=record["train_seq_len"], metadata=metadata, overwrite=overwrite)
