"""Study 1: state tracking (paper Table 5b, scaled), in two protocols.

The default (`protocol = "packed"`), below, is the scaled-down one of the first GPU session. The
paper's own protocol (`--set protocol=paper`: the full sweep, 4 x 10^4 steps of 256 examples, the
best held-out evaluation, the official module as a control) lives in state_tracking_paper.py.

Parity, modular arithmetic without and with brackets; 1-layer models for parity, 3-layer for
arithmetic (the paper's sizes); Mamba-3 against Mamba-3 with the rotation off (real-valued
state transitions) and the Mamba-2-like preset. Trained with the paper's length curriculum (max
length 40 -> 160 in four stages over the run), evaluated at 256 symbols and around it. One
learning rate for all runs, the best of a short sweep of Mamba-3 on every task.

    hybridlm study state-tracking
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from hybridlm.eval.run import EvalRequest
from hybridlm.eval.tasks.state_tracking import LengthCurriculum
from hybridlm.studies.config import Strict, StudyConfig, TrainSettings
from hybridlm.studies.plots import Panel, plot_panels, smooth
from hybridlm.studies import state_tracking_paper
from hybridlm.studies.runner import Run
from hybridlm.studies.state_tracking_paper import PaperProtocol, lift
from hybridlm.studies.tables import environment_lines, markdown_table, mean, pct, training_table

NAME = "state-tracking"
# The paper's three (Table 5b), then arithmetic with + and - only (the operator-set question of
# hybridlm/eval/tasks/state_tracking.py).
PAPER_TASKS = ("parity", "arith", "arith-brackets")
TASKS = (*PAPER_TASKS, "arith-sum", "arith-brackets-sum")
# Paper Table 5b, scaled accuracy (%) on PAPER_TASKS, for the table's reference rows.
PAPER = {"Mamba-3": (100.00, 98.51, 87.75), "Mamba-3 (no RoPE)": (2.27, 1.49, 0.72),
         "Mamba-3 (standard RoPE)": (1.56, 20.70, 2.62), "Mamba-2": (0.90, 47.81, 0.88)}


class LayeredModel(Strict):
    label: str
    specs: dict[int, str]  # layers -> spec file in the study folder


class Sweep(Strict):
    model: str
    tasks: list[str]
    lrs: list[float] = Field(min_length=1)
    steps: int = Field(gt=0)
    eval_lengths: list[int] = Field(min_length=1)


class StateEval(Strict):
    lengths: list[int] = Field(min_length=1)
    report_length: int
    samples: int = Field(gt=0)
    batch_size: int = Field(gt=0)


class Config(StudyConfig):
    protocol: Literal["packed", "paper"] = "packed"
    tasks: list[str] = Field(min_length=1)
    layers: dict[str, int]
    models: dict[str, LayeredModel]
    train: TrainSettings
    sweep: Sweep
    eval: StateEval
    paper: PaperProtocol | None = None

    @model_validator(mode="before")
    @classmethod
    def _lift_paper(cls, data):
        return lift(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        if self.protocol == "paper" and self.paper is None:
            raise ValueError("protocol 'paper' needs a [paper] table")
        for task in {*self.tasks, *self.sweep.tasks}:
            if task not in TASKS:
                raise ValueError(f"task {task!r} is not a state-tracking task ({', '.join(TASKS)})")
            if task not in self.layers:
                raise ValueError(f"[layers] names no layer count for task {task!r}")
        for name, model in self.models.items():
            missing = sorted({self.layers[t] for t in self.tasks} - set(model.specs))
            if missing:
                raise ValueError(f"models.{name}.specs has no spec for {missing} layer(s)")
        if self.sweep.model not in self.models:
            raise ValueError(f"sweep.model {self.sweep.model!r} is not one of models ({', '.join(self.models)})")
        if self.report_length_missing():
            raise ValueError(f"eval.report_length {self.eval.report_length} is not in eval.lengths")
        self.check_files([s for m in self.models.values() for s in m.specs.values()])
        return self

    def report_length_missing(self) -> bool:
        return self.eval.report_length not in self.eval.lengths


def _run(cfg: Config, phase: str, model: str, task: str, lr: float | None, settings: TrainSettings,
         lengths: list[int]) -> Run:
    spec = cfg.models[model].specs[cfg.layers[task]]
    flags = settings.flags(lr) + ["--hybrid.data", f"task:{task}", "--hybrid.seed", str(cfg.seed)]
    request = EvalRequest(task, ",".join(map(str, lengths)), samples=cfg.eval.samples,
                          batch_size=cfg.eval.batch_size, seed=cfg.seed)
    run_id = f"sweep-lr{lr:g}-{task}" if phase == "sweep" else f"{model}-{task}"
    meta = {"phase": phase, "model": model, "task": task, "lr": lr, "layers": cfg.layers[task], "spec": spec}
    return Run(run_id, cfg.path(spec), flags, request, settings.steps, settings.tokens_per_step, meta)


def sweep_runs(cfg: Config) -> list[Run]:
    settings = cfg.train.model_copy(update={"steps": cfg.sweep.steps})
    return [_run(cfg, "sweep", cfg.sweep.model, task, lr, settings, cfg.sweep.eval_lengths)
            for lr in cfg.sweep.lrs for task in cfg.sweep.tasks]


def choose_lr(cfg: Config, finished: dict[str, dict]) -> tuple[float | None, list[dict]]:
    """The sweep's best lr: highest mean scaled accuracy over its tasks and lengths, then lowest
    answer NLL. None until every sweep run has finished."""
    scores = []
    for lr in cfg.sweep.lrs:
        records = [finished.get(r.id) for r in sweep_runs(cfg) if r.meta["lr"] == lr]
        if any(r is None for r in records):
            return None, []
        cells = [c for r in records for c in r["eval"]]
        scores.append({"lr": lr, "scaled_accuracy": mean([c["scaled_accuracy"] for c in cells]),
                       "nll": mean([c["nll_per_token"] for c in cells]),
                       "per_task": {r["meta"]["task"]: mean([c["scaled_accuracy"] for c in r["eval"]])
                                    for r in records}})
    best = max(scores, key=lambda s: (round(s["scaled_accuracy"], 6), -s["nll"]))
    return best["lr"], scores


def executor_class(cfg: Config):
    """The driver's executor for this protocol: None = the default (train, export, evaluate)."""
    if cfg.protocol == "paper":
        return state_tracking_paper.executor_class(cfg)
    return None


def plan(cfg: Config, finished: dict[str, dict], *, preview: bool = False, extra_meta: dict | None = None):
    from hybridlm.studies.driver import Plan

    if cfg.protocol == "paper":
        return Plan(state_tracking_paper.runs(cfg))
    runs: list[Run] = []
    lr = cfg.train.lr
    if lr is None:  # no lr given: sweep first
        runs += sweep_runs(cfg)
        lr, _ = choose_lr(cfg, finished)
        if lr is None and not preview:
            return Plan(runs, waiting=f"the main runs wait for the learning-rate sweep of {cfg.sweep.model} "
                                      "(or give one: --set train.lr=0.003)")
    runs += [_run(cfg, "main", model, task, lr, cfg.train, cfg.eval.lengths) for model in cfg.models
             for task in cfg.tasks]
    return Plan(runs)


def _cell(record: dict, length: int) -> dict | None:
    return next((c for c in record["eval"] if c["length"] == length), None)


def summarize(cfg: Config, finished: dict[str, dict], out: Path, sessions: list[dict]):
    from hybridlm.studies.driver import Summary

    if cfg.protocol == "paper":
        return state_tracking_paper.summarize(cfg, finished, out, sessions)
    finished = {rid: r for rid, r in finished.items() if r["meta"].get("protocol", "packed") == "packed"}
    main = {(r["meta"]["model"], r["meta"]["task"]): r for r in finished.values() if r["meta"]["phase"] == "main"}
    lr, sweep = choose_lr(cfg, finished) if cfg.train.lr is None else (cfg.train.lr, [])
    parts = [f"### {cfg.title}"]
    data: dict = {"lr": lr, "sweep": sweep, "scaled_accuracy": {}}

    head = ["model"] + [f"{t} @ {cfg.eval.report_length}" for t in cfg.tasks]
    rows = []
    for model, entry in cfg.models.items():
        row = [entry.label]
        for task in cfg.tasks:
            cell = _cell(main[(model, task)], cfg.eval.report_length) if (model, task) in main else None
            row.append(pct(cell["scaled_accuracy"]) if cell else None)
            data["scaled_accuracy"][f"{model}/{task}"] = cell["scaled_accuracy"] if cell else None
        rows.append(row)
    rows += [[f"paper: {name}"] + [f"{v:.2f}" for v in values] for name, values in PAPER.items()
             if tuple(cfg.tasks) == PAPER_TASKS]
    parts.append(f"Scaled accuracy (%) at length {cfg.eval.report_length}, (acc − chance) / (1 − chance); "
                 f"learning rate {lr:g}" if lr else "Scaled accuracy (%): learning rate not chosen yet")
    parts.append(markdown_table(head, rows))

    length_head = ["model", "task"] + [str(n) for n in cfg.eval.lengths]
    length_rows = [[cfg.models[m].label, t] + [pct(c["scaled_accuracy"]) if (c := _cell(r, n)) else None
                                               for n in cfg.eval.lengths] for (m, t), r in main.items()]
    if length_rows:
        parts.append("Scaled accuracy (%) by evaluation length (symbols; training lengths are 3–160):")
        parts.append(markdown_table(length_head, length_rows))
    if sweep:
        parts.append(f"Learning-rate sweep ({cfg.models[cfg.sweep.model].label}, {cfg.sweep.steps:,} steps, mean "
                     f"scaled accuracy (%) over lengths {', '.join(map(str, cfg.sweep.eval_lengths))}):")
        parts.append(markdown_table(["lr"] + cfg.sweep.tasks + ["mean", "chosen"],
                                    [[f"{s['lr']:g}"] + [pct(s["per_task"][t]) for t in cfg.sweep.tasks]
                                     + [pct(s["scaled_accuracy"]), "✓" if s["lr"] == lr else ""] for s in sweep]))
    parts.append(training_table(sorted(finished.items())))
    plots = _plots(cfg, main, sweep, out)
    parts.append("Runs recorded:\n" + environment_lines(sessions))
    return Summary("\n\n".join(p for p in parts if p), plots, data)


def _plots(cfg: Config, main: dict, sweep: list[dict], out: Path) -> list[Path]:
    plots = []
    curriculum_max = LengthCurriculum().last_max
    panels = []
    for task in cfg.tasks:
        lines = {}
        for model, entry in cfg.models.items():
            record = main.get((model, task))
            if record:
                cells = sorted(record["eval"], key=lambda c: c["length"])
                lines[entry.label] = ([c["length"] for c in cells], [100 * c["scaled_accuracy"] for c in cells])
        inside = min(cfg.eval.lengths) <= curriculum_max <= max(cfg.eval.lengths)
        panels.append(Panel(task, lines, "length (symbols)", "scaled accuracy (%)", xlog=True, ylim=(-5, 105),
                            xticks=cfg.eval.lengths,
                            vlines={f"longest training length ({curriculum_max})": curriculum_max} if inside else {}))
    if any(p.lines for p in panels):
        plots.append(plot_panels(panels, out / "state-tracking.png", cfg.title))
    loss_panels = [Panel(task, {cfg.models[m].label: ([s for s, _ in r["train"]["losses"]],
                                                      smooth([v for _, v in r["train"]["losses"]]))
                                for (m, t), r in main.items() if t == task},
                         "step", "training loss (answer tokens, smoothed)", ylog=True) for task in cfg.tasks]
    if any(p.lines for p in loss_panels):
        plots.append(plot_panels(loss_panels, out / "state-tracking-loss.png", "Training loss"))
    if sweep:
        tasks = list(sweep[0]["per_task"])
        sweep_panel = Panel("learning-rate sweep", {t: ([s["lr"] for s in sweep],
                                                        [100 * s["per_task"][t] for s in sweep]) for t in tasks},
                            "learning rate", "scaled accuracy (%)", xlog=True, ylim=(-5, 105))
        plots.append(plot_panels([sweep_panel], out / "state-tracking-sweep.png"))
    return [p for p in plots if p]
