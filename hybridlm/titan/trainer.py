"""torchtitan's Trainer, plus a run record next to the checkpoints (what `hybridlm export` needs).

The record is written only once the checkpoint has loaded, and a resume first checks that the spec is
the one the checkpoints were trained with: a failed or refused resume leaves the old record (and so the
exportability of the old run) untouched.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException
from torchtitan.train import Trainer

from hybridlm.errors import HybridLMError, shorten
from hybridlm.layouts.diff import spec_differences

RUN_RECORD = "hybridlm_run.json"
ALLOW_SPEC_CHANGE_FLAG = "--hybrid.allow_spec_change"
_STEP = re.compile(r"step-(\d+)")  # torchtitan's checkpoint folder names (CheckpointManager._find_load_step)
_SHOWN_DIFFERENCES = 6


class HybridTrainer(Trainer):
    def __init__(self, job_config):
        # Before torchtitan builds, writes or loads anything.
        self._spec_changed = check_resume_spec(job_config)
        super().__init__(job_config)
        self._record_after_load()

    def _record_after_load(self) -> None:
        """Write the run record right after ``checkpointer.load`` returns (it runs inside ``train()``), so a
        resume that fails to load keeps the record that matches the checkpoints."""
        load = self.checkpointer.load
        job_config, model_args, tokenizer = self.job_config, self.model_args, self.tokenizer
        spec_changed = self._spec_changed
        changed = ", ".join(spec_changed[:_SHOWN_DIFFERENCES]) + (", ..." if len(spec_changed) > _SHOWN_DIFFERENCES
                                                                   else "")

        def load_then_record(*args, **kwargs):
            try:
                loaded = load(*args, **kwargs)
            except (Exception, CheckpointException) as err:  # DCP's exception is a BaseException
                if not spec_changed:
                    raise
                # The user allowed a spec change the checkpoint's tensors cannot take: say so in one line.
                last = [line for line in str(err).splitlines() if line.strip()][-1:] or [type(err).__name__]
                raise HybridLMError(
                    f"the checkpoint in {job_config.job.dump_folder} does not fit the new spec "
                    f"({ALLOW_SPEC_CHANGE_FLAG} allowed {changed}): {shorten(last[0].strip(), 200)}. "
                    f"Only changes that keep every tensor's shape can resume; train into a new "
                    f"--job.dump_folder ({RUN_RECORD} is unchanged)") from err
            if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
                write_run_record(job_config, model_args, tokenizer)
            return loaded

        self.checkpointer.load = load_then_record


def write_run_record(job_config, model_args, tokenizer) -> Path:
    folder = Path(job_config.job.dump_folder)
    folder.mkdir(parents=True, exist_ok=True)
    h = job_config.hybrid
    record = {
        "spec": model_args.spec, "spec_source": model_args.spec_source,
        "train_seq_len": job_config.training.seq_len, "tokenizer": h.tokenizer, "data": h.data,
        "loss_on": h.loss_on, "seed": h.seed, "steps": job_config.training.steps,
        "checkpoint_folder": job_config.checkpoint.folder,
    }
    path = folder / RUN_RECORD
    tmp = path.with_name(f".{RUN_RECORD}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)  # never a half-written record
    return path


# -- resume check ---------------------------------------------------------------------------------

def checkpoint_steps(job_config) -> list[int]:
    """The steps torchtitan would resume from: ``step-N`` folders holding a checkpoint."""
    folder = Path(job_config.job.dump_folder) / job_config.checkpoint.folder
    if not folder.is_dir():
        return []
    steps = []
    for entry in folder.iterdir():
        match = _STEP.search(entry.name)
        if match and ((entry / ".metadata").is_file() or (entry / "model.safetensors.index.json").is_file()):
            steps.append(int(match.group(1)))
    return sorted(steps)


def check_resume_spec(job_config) -> list[str]:
    """On a resume (checkpoints and a run record in the dump folder), stop unless the new spec is the
    saved one, or ``--hybrid.allow_spec_change`` says a change is meant. Returns the changed fields
    (dotted paths) a resume goes on with: none unless the flag allowed them."""
    record_path = Path(job_config.job.dump_folder) / RUN_RECORD
    steps = checkpoint_steps(job_config)
    if not steps or not record_path.is_file() or not job_config.hybrid.spec:
        return []  # a fresh run (or no spec: torchtitan's own error follows)
    allowed = getattr(job_config.hybrid, "allow_spec_change", False)
    new = _spec_dict(job_config.hybrid.spec)
    try:
        old = _saved_spec(record_path)
    except HybridLMError:
        if allowed:
            return ["spec"]
        raise
    differences = list(spec_differences(old, new))
    if not differences or allowed:
        return [path for path, _, _ in differences]
    shown = "; ".join(f"{path}: {_short(a)} -> {_short(b)}" for path, a, b in differences[:_SHOWN_DIFFERENCES])
    more = f"; and {len(differences) - _SHOWN_DIFFERENCES} more" if len(differences) > _SHOWN_DIFFERENCES else ""
    raise HybridLMError(
        f"{job_config.job.dump_folder} holds checkpoints up to step-{steps[-1]} of another spec "
        f"({record_path.name}); resuming with --hybrid.spec {shorten(job_config.hybrid.spec, 80)} would change "
        f"{shown}{more}. Train into a new --job.dump_folder, or pass {ALLOW_SPEC_CHANGE_FLAG} to resume "
        f"with the new spec anyway")


def _spec_dict(source: str) -> dict:
    from hybridlm.layouts.presets import spec_or_preset

    return json.loads(json.dumps(spec_or_preset(source).to_dict(exclude_defaults=False)))


def _saved_spec(record_path: Path) -> Any:
    """The record's spec, normalized like a new one (fields added since then take their defaults)."""
    from hybridlm.errors import SpecError
    from hybridlm.layouts.spec import ModelSpec

    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HybridLMError(f"{record_path} cannot be read ({shorten(str(err), 120)}), so this resume cannot be "
                            f"checked against the checkpoints' spec. Train into a new --job.dump_folder, or pass "
                            f"{ALLOW_SPEC_CHANGE_FLAG} to resume anyway") from None
    saved = record.get("spec") if isinstance(record, dict) else None
    try:
        return json.loads(json.dumps(ModelSpec.model_validate(saved).to_dict(exclude_defaults=False)))
    except SpecError:
        return saved  # an invalid saved spec differs from any valid new one: the diff shows where


def _short(value: Any) -> str:
    return shorten(repr(value), 60)
