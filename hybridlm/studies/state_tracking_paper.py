"""The paper's own state-tracking protocol (arXiv 2603.15569 App. D, with Grazzi et al.'s recipe).

``hybridlm study state-tracking --set protocol=paper`` (config: the ``[paper]`` table of
specs/studies/state-tracking/study.toml; docs/results.md §1):

* every model x task x width {32, 64} x 8 learning rates log-spaced in [1e-4, 1e-2];
* batch 256 examples, each of its own length (right-padded, as Grazzi et al.'s harness), the
  curriculum 3..40 -> 3..160 in 4 stages of 10^4 steps;
* AdamW, 2,000 warm-up steps then cosine, weight decay 0 for parity, no clipping; fp32;
* a held-out evaluation at length 256 every 100 steps; the best is reported, per model and task
  the best over the sweep (as the paper does); every run's curve is kept.

Each run is a process of :mod:`hybridlm.studies.state_tracking_train`, run side by side and
resumed across calls by :mod:`hybridlm.studies.resumable_runner`. To measure how many fit side by side:

    python -m hybridlm.studies.state_tracking_paper --side-by-side 1,8,16,24 --seconds 60
"""
from __future__ import annotations

import argparse
import fnmatch
import functools
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from hybridlm.eval.run import EvalRequest
from hybridlm.studies.config import Estimate, Strict
from hybridlm.studies.resumable_runner import TRAINER, ResumableExecutor, read_progress
from hybridlm.studies.runner import Run
from hybridlm.studies.state_tracking_settings import CADENCE_FLAGS, RunSettings
from hybridlm.studies.tables import environment_lines, markdown_table, pct

PROTOCOL = "paper"


class PaperModel(Strict):
    label: str
    spec: str  # a spec file in the study folder; its pattern "(...) *1" is repeated to the task's depth


class PaperProtocol(Strict):
    """The ``[paper]`` table of study.toml."""

    jobs: int = Field(gt=0)  # runs side by side on one GPU
    budget_minutes: float = Field(gt=0)
    estimate: Estimate
    tasks: list[str] = Field(min_length=1)
    models: dict[str, PaperModel] = Field(min_length=1)
    widths: list[int] = Field(min_length=1)
    lr_min: float = Field(gt=0)
    lr_max: float = Field(gt=0)
    lr_count: int = Field(gt=0)
    batch: int = Field(gt=0)
    stages: int = Field(gt=0)
    steps_per_stage: int = Field(gt=0)
    min_length: int = Field(gt=0)
    first_max: int = Field(gt=0)
    last_max: int = Field(gt=0)
    length_per: Literal["example", "batch"] = "example"
    logits_over: Literal["vocab", "answers"] = "answers"
    warmup_steps: int = Field(ge=0)
    min_lr_factor: float = Field(ge=0, le=1)
    beta1: float = 0.9
    beta2: float = 0.999
    max_norm: float = Field(0.0, ge=0)
    weight_decay: dict[str, float]  # task -> AdamW weight decay
    eval_lengths: list[int] = Field(min_length=1)
    report_length: int
    eval_every: int = Field(gt=0)
    eval_samples: int = Field(gt=0)
    diagnostics_every: int = Field(ge=0)
    checkpoint_every: int = Field(1000, gt=0)
    log_freq: int = Field(gt=0)
    compile: str = "none"  # state_tracking_settings.COMPILE_MODES
    embedding_std: float = Field(0.0, ge=0)  # the token embedding's init std; 0 = the spec's init_std
    solved_at: float = Field(0.0, ge=0, le=1)  # a run stops once its best scaled accuracy reaches this; 0 = never
    steps_per_call: int = Field(0, ge=0)  # stop every run after this many steps per call; 0 = the time budget
    lr_first: float = Field(1e-3, gt=0)  # runs start at the lr nearest this one and go outwards
    # run only these of the sweep's lrs (empty: all), e.g. the ones an earlier session's record lacks;
    # each must be one of lrs(), so a run keeps the id and settings it has in the whole sweep
    lr_subset: list[float] = []
    # run only the runs whose ids match one of these shell patterns (empty: all), e.g. one call's mix of
    # tasks and models: ["paper-*-arith-d32-*", "paper-real-mixer-parity-*-lr0.0001"]
    only_runs: list[str] = []

    @model_validator(mode="after")
    def _consistent(self) -> "PaperProtocol":
        missing = [t for t in self.tasks if t not in self.weight_decay]
        if missing:
            raise ValueError(f"paper.weight_decay names no value for task(s) {', '.join(missing)}")
        if self.report_length not in self.eval_lengths:
            raise ValueError(f"paper.report_length {self.report_length} is not in paper.eval_lengths")
        if self.lr_min > self.lr_max:
            raise ValueError(f"paper.lr_min {self.lr_min:g} exceeds paper.lr_max {self.lr_max:g}")
        strays = [lr for lr in self.lr_subset if lr not in self.lrs()]
        if strays:
            raise ValueError(f"paper.lr_subset names {', '.join(f'{lr:g}' for lr in strays)}, not among the sweep's "
                             f"lrs {', '.join(f'{lr:g}' for lr in self.lrs())}")
        ids = list(self.sweep(self.tasks))
        idle = [pattern for pattern in self.only_runs if not fnmatch.filter(ids, pattern)]
        if idle:
            raise ValueError(f"paper.only_runs pattern(s) {', '.join(idle)} match no run of the sweep (ids look like "
                             f"{ids[0]}; tasks {', '.join(self.tasks)})")
        return self

    def sweep(self, tasks: list[str]) -> dict[str, tuple[str, str, int, float]]:
        """Every run id of the sweep over ``tasks`` -> (model, task, width, lr), whatever only_runs and lr_subset say."""
        return {run_id(m, t, w, lr): (m, t, w, lr)
                for t in tasks for m in self.models for w in self.widths for lr in self.lrs()}

    def chosen(self, run: str) -> bool:
        """Whether ``only_runs`` lets this run id through."""
        return not self.only_runs or any(fnmatch.fnmatchcase(run, pattern) for pattern in self.only_runs)

    @property
    def steps(self) -> int:
        return self.stages * self.steps_per_stage

    def lrs_in_run_order(self) -> list[float]:
        """The sweep's lrs nearest ``lr_first`` first (in log distance): the runs most likely to
        learn come first when a budget ends midway."""
        chosen = [lr for lr in self.lrs() if not self.lr_subset or lr in self.lr_subset]
        return sorted(chosen, key=lambda lr: (abs(math.log(lr / self.lr_first)), lr))

    def lrs(self) -> list[float]:
        """``lr_count`` learning rates log-spaced from lr_min to lr_max (3 significant digits)."""
        if self.lr_count == 1:
            return [self.lr_min]
        ratio = math.log(self.lr_max / self.lr_min)
        return [float(f"{self.lr_min * math.exp(ratio * i / (self.lr_count - 1)):.3g}") for i in range(self.lr_count)]


def lift(data: dict) -> dict:
    """With ``protocol = "paper"`` the ``[paper]`` table's jobs, budget, estimate, tasks and models
    stand for the study's own (the driver plans, estimates and filters ``--only`` by those)."""
    paper = data.get("paper")
    if data.get("protocol") != PROTOCOL or not isinstance(paper, dict):
        return data
    depths = sorted(set((data.get("layers") or {}).values()))
    models = {name: {"label": m.get("label"), "specs": {n: m.get("spec") for n in depths}}
              if isinstance(m, dict) else m for name, m in (paper.get("models") or {}).items()}
    return {**data, **{k: paper[k] for k in ("jobs", "budget_minutes", "estimate", "tasks") if k in paper},
            "models": models}


def run_settings(cfg, model: str, task: str, width: int, lr: float) -> RunSettings:
    p: PaperProtocol = cfg.paper
    return RunSettings(
        task=task, spec=str(cfg.path(p.models[model].spec)), d_model=width, layers=cfg.layers[task], seed=cfg.seed,
        embedding_std=p.embedding_std, steps=p.steps, solved_at=p.solved_at, batch=p.batch, max_norm=p.max_norm,
        lr=lr, weight_decay=p.weight_decay[task], beta1=p.beta1, beta2=p.beta2, warmup_steps=p.warmup_steps,
        min_lr_factor=p.min_lr_factor, min_length=p.min_length,
        first_max=p.first_max, last_max=p.last_max, stages=p.stages, steps_per_stage=p.steps_per_stage,
        length_per=p.length_per, logits_over=p.logits_over,
        eval_lengths=p.eval_lengths, report_length=p.report_length, eval_every=p.eval_every,
        eval_samples=p.eval_samples, diagnostics_every=p.diagnostics_every, checkpoint_every=p.checkpoint_every,
        log_freq=p.log_freq, compile=p.compile)


def run_id(model: str, task: str, width: int, lr: float) -> str:
    return f"paper-{model}-{task}-d{width}-lr{lr:g}"


def runs(cfg) -> list[Run]:
    """Task by task, lrs from ``lr_first`` outwards; within a task the models of one (lr, width)
    next to each other, so runs that go side by side compare like with like."""
    p: PaperProtocol = cfg.paper
    out = []
    for task in cfg.tasks:
        for lr in p.lrs_in_run_order():
            for width in p.widths:
                for model in p.models:
                    if not p.chosen(run_id(model, task, width, lr)):
                        continue
                    s = run_settings(cfg, model, task, width, lr)
                    meta = {"protocol": PROTOCOL, "phase": PROTOCOL, "model": model, "task": task, "width": width,
                            "lr": lr, "layers": s.layers, "spec": p.models[model].spec,
                            "weight_decay": s.weight_decay}
                    request = EvalRequest(task, ",".join(map(str, p.eval_lengths)), samples=p.eval_samples,
                                          batch_size=p.batch, seed=cfg.seed)
                    out.append(Run(run_id(model, task, width, lr), cfg.path(p.models[model].spec), s.to_flags(),
                                   request, s.steps, s.batch, meta, cadence_flags=CADENCE_FLAGS))
    return out


def executor_class(cfg):
    return functools.partial(ResumableExecutor, steps_per_call=cfg.paper.steps_per_call or None)


# -- summary ---------------------------------------------------------------------------------------
def run_state(run: Run, finished: dict[str, dict], work: Path) -> dict | None:
    """What is known of a run: its record when done, else its progress.json (``running`` True)."""
    record = finished.get(run.id)
    if record is not None:
        return {"running": False, "step": record["train"]["steps"], "best": record["best"],
                "history": record["history"], "losses": record["train"]["losses"]}
    progress = read_progress(work / run.id)
    if progress is None or progress.get("best") is None:
        return None
    return {"running": True, "step": progress["step"], "best": progress["best"],
            "history": progress.get("history", []), "losses": progress.get("losses", [])}


def summarize(cfg, finished: dict[str, dict], out: Path, sessions: list[dict]):
    from hybridlm.studies.driver import Summary
    from hybridlm.studies.state_tracking import PAPER, PAPER_TASKS
    from hybridlm.studies.state_tracking_plots import paper_plots

    p: PaperProtocol = cfg.paper
    planned = runs(cfg)
    states = {r.id: run_state(r, finished, out / "work") for r in planned}
    rep = p.report_length
    held = {r.id: held_best(states[r.id]["history"], rep, p.eval_every) if states[r.id] else None
            for r in planned}
    best: dict[tuple[str, str], tuple[Run, dict]] = {}
    for r in planned:
        st = states[r.id]
        key = (r.meta["model"], r.meta["task"])
        if st and (key not in best or st["best"]["scaled_accuracy"] > best[key][1]["best"]["scaled_accuracy"]):
            best[key] = (r, st)

    parts = [f"### {cfg.title}: the paper's protocol",
             f"Best scaled accuracy (%) at length {rep} over the sweep ({len(p.widths)} widths × {p.lr_count} "
             f"learning rates, best evaluation of each run, every {p.eval_every:,} steps); (width, lr, step) of "
             "the best; * = the sweep is not finished."]
    rows, held_rows, data = [], [], {"best": {}, "runs": {}}
    for model, entry in p.models.items():
        row = [entry.label]
        for task in cfg.tasks:
            planned_here = [r for r in planned if r.meta["model"] == model and r.meta["task"] == task]
            complete = all(r.id in finished for r in planned_here)
            if (model, task) not in best:
                row.append(None)
                continue
            r, st = best[(model, task)]
            value = st["best"]["scaled_accuracy"]
            row.append(f"{100 * value:.1f}{'' if complete else '*'} (d{r.meta['width']}, {r.meta['lr']:g}, "
                       f"{st['best']['step']:,})")
            data["best"][f"{model}/{task}"] = {"scaled_accuracy": value, "run": r.id, "step": st["best"]["step"],
                                               "complete": complete}
        rows.append(row)
        held_row = [entry.label]
        for task in cfg.tasks:
            here = [(held[r.id], r) for r in planned
                    if r.meta["model"] == model and r.meta["task"] == task and held[r.id] is not None]
            if not here:
                held_row.append(None)
                continue
            value, r = max(here, key=lambda vr: vr[0])
            held_row.append(f"{100 * value:.1f} (d{r.meta['width']}, {r.meta['lr']:g})")
            data["best"].setdefault(f"{model}/{task}", {})["held"] = {"scaled_accuracy": value, "run": r.id}
        held_rows.append(held_row)
    if tuple(cfg.tasks) == PAPER_TASKS:  # the paper's values are in its column order
        rows += [[f"paper: {name}"] + [f"{v:.2f}" for v in values] for name, values in PAPER.items()]
    parts.append(markdown_table(["model"] + [f"{t} @ {rep}" for t in cfg.tasks], rows))
    parts.append(f"The same sweep, **held**: the best scaled accuracy (%) at {rep} that every evaluation of "
                 f"{HOLD_STEPS:,} consecutive steps reached ({max(2, HOLD_STEPS // p.eval_every)} evaluations in a "
                 "row; the paper's measure above also counts a one-evaluation peak), and the run that held it:")
    parts.append(markdown_table(["model"] + [f"{t} @ {rep}, held" for t in cfg.tasks], held_rows))

    others = [n for n in p.eval_lengths if n != rep]
    run_rows = []
    for r in planned:
        st = states[r.id]
        done = r.id in finished
        losses = [loss for _, loss in st["losses"]] if st else []
        run_rows.append([r.id, f"{st['step'] if st else 0:,}/{r.steps:,}", "done" if done else
                         ("paused" if st else "not started"),
                         pct(st["best"]["scaled_accuracy"]) if st else None,
                         f"{st['best']['step']:,}" if st else None,
                         pct(held[r.id]),
                         *[pct(best_at(st["history"], n)) if st else None for n in others],
                         f"{min(losses):.4f}" if losses else None, f"{losses[-1]:.4f}" if losses else None])
        data["runs"][r.id] = {"step": st["step"] if st else 0, "done": done,
                              "best": st["best"] if st else None,
                              "held": held[r.id]}
    parts.append(f"Every run (scaled accuracy (%) at {rep}, the best evaluation so far; at "
                 f"{', '.join(map(str, others)) or '-'}: the best of any evaluation, whether the run learned "
                 f"the task within its training lengths; the training loss: {p.log_freq}-step means):")
    parts.append(markdown_table(["run", "steps", "status", f"best @ {rep}", "at step", f"held @ {rep}",
                                 *[f"best @ {n}" for n in others], "lowest loss", "last loss"], run_rows))
    diag = _diagnostics_lines(best)
    if diag:
        parts.append("Diagnostics of each model's best run, last evaluation (layer 0): per head, the largest "
                     "|mean Δ·tanh(θ)| over its rotated pairs on '1' and on '0' tokens (units of π), and the "
                     "mean |A|·Δ:\n" + diag)
    plots = paper_plots(cfg, planned, states, best, out)
    if sessions:  # none when the runs come from committed records (state_tracking_merge.py)
        parts.append("Runs recorded:\n" + environment_lines(sessions))
    return Summary("\n\n".join(parts), plots, data)


HOLD_STEPS = 1_000  # "held": every evaluation of this many consecutive steps reached the value


def held_best(history: list[dict], length: int, every: int, steps: int | None = None) -> float | None:
    """The highest scaled accuracy at ``length`` that every evaluation of a window of ``steps // every``
    consecutive evaluations (``every`` steps apart) reached: the best value a run held, where the paper's
    best-of-evaluations also counts a one-evaluation peak. A gap in the evaluations (a record trimmed of
    its low points) ends a window. None: no complete window."""
    key = f"scaled_accuracy@{length}"
    points = sorted((h["step"], h[key]) for h in history if key in h)
    size = max(2, (HOLD_STEPS if steps is None else steps) // every)
    best, window = None, []
    for step, value in points:
        if window and step - window[-1][0] != every:
            window = []
        window = (window + [(step, value)])[-size:]
        if len(window) == size:
            low = min(v for _, v in window)
            best = low if best is None else max(best, low)
    return best


def best_at(history: list[dict], length: int) -> float | None:
    """The highest scaled accuracy at ``length`` over a run's evaluations (None: never evaluated there)."""
    return max((h[f"scaled_accuracy@{length}"] for h in history if f"scaled_accuracy@{length}" in h), default=None)


def _diagnostics_lines(best: dict) -> str:
    lines = []
    for (model, task), (run, st) in best.items():
        entries = [h for h in st["history"] if h.get("diagnostics")]
        if not entries:
            continue
        layer = entries[-1]["diagnostics"][0]
        on1 = [max((abs(v) for v in pairs), default=0.0) for pairs in layer["turn_on_1"]]
        on0 = [max((abs(v) for v in pairs), default=0.0) for pairs in layer["turn_on_0"]]
        lines.append(f"- {run.id} (step {entries[-1]['step']:,}): on '1' "
                     f"{', '.join(f'{v:.3f}' for v in on1)}; on '0' {', '.join(f'{v:.3f}' for v in on0)}; "
                     f"|A|·Δ {', '.join(f'{v:.2e}' for v in layer['decay'])}")
    return "\n".join(lines)


# -- how many runs side by side -------------------------------------------------------------------
def side_by_side(cfg, counts: list[int], seconds: float, work: Path, log=print) -> list[dict]:
    """Start ``n`` copies of the first run for each n in ``counts`` (lengths of the last curriculum
    stage, the slowest), ``seconds`` of training each after start-up; steps/s a run and in all."""
    first = runs(cfg)[0]
    settings = RunSettings.from_flags(first.train_flags).model_copy(update={"first_max": cfg.paper.last_max})
    results = []
    for n in counts:
        folders = [work / f"side-by-side-{n}-{i}" for i in range(n)]
        procs = []
        for i, folder in enumerate(folders):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            cmd = [sys.executable, "-m", TRAINER, "--out", str(folder), "--time-limit", str(seconds),
                   *settings.to_flags()]
            with (folder / "train.log").open("w") as log_file:
                procs.append(subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                              env=_env(n)))
        started = time.monotonic()
        codes = [proc.wait() for proc in procs]
        rates = [(read_progress(f) or {}).get("slices", [{}])[-1].get("steady_steps_per_second") for f in folders]
        ok = [r for r in rates if r]
        entry = {"side_by_side": n, "failed": sum(c != 0 for c in codes), "steps_per_second_each": ok,
                 "per_run": min(ok) if ok else None, "in_all": sum(ok),
                 "wall_seconds": round(time.monotonic() - started)}
        results.append(entry)
        log(f"{n:3d} side by side: {entry['per_run'] or 0:.1f} steps/s a run (slowest), {entry['in_all']:.0f} in all, "
            f"{entry['failed']} failed")
        failed = next((f for f, c in zip(folders, codes) if c != 0), None)
        if failed is not None:  # why (the folders go next)
            tail = (failed / "train.log").read_text(errors="replace").splitlines()[-25:]
            log(f"    the first failed run's log ({failed.name}), last lines:\n" + "\n".join("    " + t for t in tail))
            entry["first_failure"] = "\n".join(tail)
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
    return results


def _env(jobs: int) -> dict:
    import os

    return {"TRITON_CACHE_AUTOTUNING": "1", **os.environ, "PYTHONUNBUFFERED": "1", "HYBRIDLM_STUDY_JOBS": str(jobs),
            "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}


def main(argv: list[str] | None = None) -> int:
    from hybridlm.studies.config import find_study_folder, load_config
    from hybridlm.studies.driver import overrides_from
    from hybridlm.studies.state_tracking import Config

    parser = argparse.ArgumentParser(description="Measure steps/s of paper-protocol runs side by side on this machine.")
    parser.add_argument("--side-by-side", default="1,8,16", help="comma-separated numbers of runs at once")
    parser.add_argument("--seconds", type=float, default=60.0, help="training seconds of each measurement")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--quick", action="store_true", help="the [quick] settings (a CPU check)")
    parser.add_argument("--out", type=Path, default=Path("runs/studies/state-tracking-paper-probe"))
    args = parser.parse_args(argv)
    overrides = overrides_from(["protocol=paper", *args.overrides])
    cfg = load_config(find_study_folder("state-tracking"), Config, quick=args.quick, overrides=overrides)
    counts = [int(n) for n in args.side_by_side.split(",") if n.strip()]
    results = side_by_side(cfg, counts, args.seconds, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "side_by_side.json").write_text(json.dumps(results, indent=1) + "\n")
    steps = len(runs(cfg)) * cfg.paper.steps
    for entry in results:
        if entry["per_run"]:
            minutes = steps / (entry["per_run"] * entry["side_by_side"]) / 60
            print(f"{entry['side_by_side']} side by side: all {len(runs(cfg))} runs ({steps:,} steps) in "
                  f"~{minutes:.0f} min "
                  f"= {math.ceil(minutes / 8.5)} calls of 8.5 min; set --set paper.jobs={entry['side_by_side']} "
                  f"--set paper.estimate.seconds_per_step={1 / entry['per_run']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
