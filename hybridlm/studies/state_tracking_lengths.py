"""Scaled accuracy of trained paper-protocol runs at many lengths, from their checkpoints: where a run's
answer stops being right (inside the training lengths, or only past them).

    python -m hybridlm.studies.state_tracking_lengths RUN_FOLDER [--runs PATTERNS]
        [--lengths 10,20,40,60,80,100,120,160,256] [--samples 256] [--seed 1] [--checkpoint last|best] [--device cpu]

RUN_FOLDER is the study's ``--out`` folder (``runs/studies/state-tracking-paper``): each run's
``work/<run id>/checkpoint.pt`` (a paused run's last step; ``last.pt`` once the run finished) or ``best.pt``
(its best evaluation at the report length).
A run's settings (task, depth, width) come from its id, as the study planned it under study.toml. Each
length gets ``samples`` fresh examples (``seed``: 1, not the study's held-out set, seed 0). Prints a
markdown table of scaled accuracy (%), (accuracy − chance) ÷ (1 − chance).
"""
from __future__ import annotations

import argparse
import fnmatch
import sys
import tempfile
from pathlib import Path

import torch

from hybridlm.studies import state_tracking, state_tracking_paper
from hybridlm.studies.config import find_study_folder, load_config
from hybridlm.studies.state_tracking_train import Batch, Trainer, accuracy
from hybridlm.studies.tables import markdown_table

# The files holding each kind of weights, first found wins: a paused run's checkpoint.pt, a finished one's
# last.pt (runs finished before last.pt existed kept only best.pt).
CHECKPOINTS = {"last": ("checkpoint.pt", "last.pt"), "best": ("best.pt",)}


def checkpoint_file(run_folder: Path, checkpoint: str) -> Path | None:
    return next((run_folder / name for name in CHECKPOINTS[checkpoint] if (run_folder / name).is_file()), None)


def study_config():
    """study.toml under the paper protocol, every task planned; the trainer's own held-out set kept tiny
    (this module evaluates on sets of its own)."""
    return load_config(find_study_folder("state-tracking"), state_tracking.Config, overrides={
        "protocol": "paper", "paper": {"tasks": list(state_tracking.TASKS), "eval_lengths": [8], "report_length": 8,
                                       "eval_samples": 8}})


def trained(cfg, run: str, folder: Path, checkpoint: str, device: str, scratch: Path) -> tuple[Trainer, int]:
    """The run's model (settings from ``cfg``, :func:`study_config`) with the checkpoint's weights, and the
    checkpoint's step (``scratch``: the trainer's folder, which it leaves empty)."""
    model, task, width, lr = cfg.paper.sweep(cfg.tasks)[run]
    settings = state_tracking_paper.run_settings(cfg, model, task, width, lr)
    trainer = Trainer(settings, scratch / run, device=device)
    state = torch.load(checkpoint_file(folder / "work" / run, checkpoint), map_location=trainer.device,
                       weights_only=False)
    trainer.model.load_state_dict(state["model"])
    return trainer, int(state["step"])


def scaled_accuracy(trainer: Trainer, length: int, samples: int, seed: int) -> float:
    """Scaled accuracy on ``samples`` fresh examples of ``length`` symbols."""
    full = torch.tensor([e.ids for e in trainer.batches.task.examples(length, samples, seed=seed)],
                        device=trainer.device)
    ends = torch.full((samples,), full.shape[1] - 2, device=trainer.device)
    with torch.no_grad():
        acc = accuracy(trainer.model, Batch(full[:, :-1], full[:, -1], ends), classes=trainer.classes)
    return (acc - trainer.chance) / (1 - trainer.chance)


def length_profile(folder: Path, runs: list[str], lengths: list[int], samples: int = 256, seed: int = 1,
                   checkpoint: str = "last", device: str = "cpu") -> list[dict]:
    """One row per run: its id, the checkpoint's step, and scaled accuracy at each length."""
    rows, cfg = [], study_config()
    with tempfile.TemporaryDirectory(prefix="st-lengths-") as scratch:
        for run in runs:
            trainer, step = trained(cfg, run, folder, checkpoint, device, Path(scratch))
            rows.append({"run": run, "step": step,
                         "scaled": {n: scaled_accuracy(trainer, n, samples, seed) for n in lengths}})
    return rows


def find_runs(folder: Path, patterns: list[str], checkpoint: str) -> list[str]:
    """The runs under ``folder/work`` with the checkpoint, whose ids match a pattern (all if none); each must
    be a run of the sweep."""
    work = folder / "work"
    if not work.is_dir():
        raise SystemExit(f"error: {folder} has no work/ folder: give the study's --out folder")
    matching = sorted(p.name for p in work.iterdir()
                      if p.is_dir() and (not patterns or any(fnmatch.fnmatchcase(p.name, q) for q in patterns)))
    chosen = [r for r in matching if checkpoint_file(work / r, checkpoint)]
    lacking = [r for r in matching if r not in chosen]
    files = " or ".join(CHECKPOINTS[checkpoint])
    if lacking:  # say so rather than leave them out silently
        print(f"note: left out, without {files} (a run finished before last.pt was kept has only best.pt: "
              f"--checkpoint best): {', '.join(lacking)}", file=sys.stderr)
    if not chosen:
        raise SystemExit(f"error: no run under {work} has {files}"
                         + (f" and matches {', '.join(patterns)}" if patterns else ""))
    sweep = study_config().paper.sweep(list(state_tracking.TASKS))
    strays = [r for r in chosen if r not in sweep]
    if strays:
        raise SystemExit(f"error: not runs of the sweep under study.toml: {', '.join(strays)}")
    return chosen


def main(argv: list[str] | None = None) -> None:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the study's --out folder")
    parser.add_argument("--runs", default="", help="comma-separated shell patterns of run ids (default: every run)")
    parser.add_argument("--lengths", type=ints, default=[10, 20, 40, 60, 80, 100, 120, 160, 256])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--checkpoint", choices=sorted(CHECKPOINTS), default="last")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    runs = find_runs(args.folder, [p for p in args.runs.split(",") if p], args.checkpoint)
    rows = length_profile(args.folder, runs, args.lengths, args.samples, args.seed, args.checkpoint, args.device)
    print(markdown_table(["run", "step"] + [str(n) for n in args.lengths],
                         [[r["run"], f"{r['step']:,}"] + [f"{100 * r['scaled'][n]:.0f}" for n in args.lengths]
                          for r in rows]))


if __name__ == "__main__":
    main()
