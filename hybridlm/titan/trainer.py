"""torchtitan's Trainer, plus a run record next to the checkpoints (what `hybridlm export` needs)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torchtitan.train import Trainer

RUN_RECORD = "hybridlm_run.json"


class HybridTrainer(Trainer):
    def __init__(self, job_config):
        super().__init__(job_config)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            write_run_record(job_config, self.model_args, self.tokenizer)


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
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
