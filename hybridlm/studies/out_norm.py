"""Study 2: hybrid length generalization with the five output-norm variants (paper Table 9, scaled).

A small 5:1 hybrid (five Mamba-3 layers, one NoPE attention layer) trained on NIAH-style
retrieval at length L, once per Mamba-3 output norm (none, pre-gate grouped, pre-gate default,
post-gate grouped, post-gate default), with a pure Mamba-3 and a RoPE Transformer for reference;
each evaluated by the harness at 1x-8x L.

    hybridlm study out-norm
"""
from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from hybridlm.errors import HybridLMError
from hybridlm.eval.run import EvalRequest
from hybridlm.studies.config import ModelEntry, Strict, StudyConfig, TrainSettings
from hybridlm.studies.plots import Panel, plot_panels, smooth
from hybridlm.studies.runner import Run
from hybridlm.studies.tables import environment_lines, markdown_table, mean, pct, training_table

NAME = "out-norm"
# Paper Table 9 (1.5B hybrid, trained at 2K): NIAH accuracy (%) at 1K / 2K / 4K, for reference.
PAPER = {
    "no norm": ("100/100/36.2", "100/100/9.4", "99.8/100/8.8"),
    "post-gate default": ("100/100/100", "100/99.8/49.2", "87.6/94.0/62.0"),
    "pre-gate default": ("100/100/86.2", "100/100/97.8", "99.2/97.8/90.2"),
    "post-gate grouped": ("100/100/79.4", "100/100/65.8", "93.8/97.0/9.6"),
    "pre-gate grouped (Norm*)": ("100/100/100", "100/100/96.0", "99.8/97.2/56.8"),
}


class EvalSettings(Strict):
    tasks: str  # the harness's --task argument
    lengths: str  # its --lengths argument: multiples of the training length
    samples: int = Field(gt=0)
    batch_size: int = Field(gt=0)

    def request(self, seed: int) -> EvalRequest:
        return EvalRequest(self.tasks, self.lengths, samples=self.samples, batch_size=self.batch_size, seed=seed)


class Config(StudyConfig):
    train_task: str  # what every model trains on: an eval-harness task
    models: dict[str, ModelEntry]
    hybrids: list[str]  # the models that differ only in their output norm
    train: TrainSettings
    eval: EvalSettings

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        from hybridlm.eval.harness import parse_lengths
        from hybridlm.eval.tasks import parse_task, parse_tasks

        try:  # an unknown task or length fails here, with the harness's own message
            parse_task(self.train_task)
            parse_tasks(self.eval.tasks)
            parse_lengths(self.eval.lengths)
        except HybridLMError as err:
            raise ValueError(str(err)) from None
        unknown = [h for h in self.hybrids if h not in self.models]
        if unknown:
            raise ValueError(f"hybrids names {', '.join(unknown)}, not in models")
        self.check_files([m.spec for m in self.models.values()])
        return self


def plan(cfg: Config, finished: dict[str, dict], *, preview: bool = False, extra_meta: dict | None = None):
    from hybridlm.studies.driver import Plan

    runs = []
    for model, entry in cfg.models.items():
        flags = cfg.train.flags() + ["--hybrid.data", f"task:{cfg.train_task}", "--hybrid.seed", str(cfg.seed)]
        meta = {"model": model, "spec": entry.spec, "train_task": cfg.train_task}
        runs.append(Run(model, cfg.path(entry.spec), flags, cfg.eval.request(cfg.seed), cfg.train.steps,
                        cfg.train.tokens_per_step, meta))
    return Plan(runs)


def summarize(cfg: Config, finished: dict[str, dict], out: Path, sessions: list[dict]):
    from hybridlm.eval.harness import Cell
    from hybridlm.eval.report import plot_results
    from hybridlm.studies.driver import Summary

    records = {m: finished[m] for m in cfg.models if m in finished}
    tasks = list(dict.fromkeys(c["task"] for r in records.values() for c in r["eval"]))
    labels = list(dict.fromkeys(c["length_label"] for r in records.values() for c in r["eval"]))
    parts = [f"### {cfg.title}",
             f"Accuracy (%) by evaluation length, in multiples of the training length L = {cfg.train.seq_len} "
             f"tokens; every model trained on `{cfg.train_task}` for {cfg.train.steps:,} steps. "
             "\"beyond L\" is the mean over the lengths above 1x."]
    data: dict = {"accuracy": {}, "beyond_train_length": {}}
    by_model = {m: {(c["task"], c["length_label"]): c for c in r["eval"]} for m, r in records.items()}
    for t in tasks:
        rows = []
        for model, by in by_model.items():
            beyond = mean([c["accuracy"] for (task, n), c in by.items() if task == t and n != labels[0]])
            data["beyond_train_length"][f"{model}/{t}"] = beyond
            rows.append([cfg.models[model].label] + [pct(by[(t, n)]["accuracy"]) if (t, n) in by else None
                                                     for n in labels] + [pct(beyond)])
        parts.append(f"`{t}`:\n" + markdown_table(["model"] + labels + ["beyond L"], rows))
    for model, by in by_model.items():
        data["accuracy"][model] = {f"{t}@{n}": c["accuracy"] for (t, n), c in by.items()}
    best = _best_hybrid_beyond(cfg, data["beyond_train_length"], tasks)
    if best:
        data["best_hybrid_beyond_train_length"] = best
        parts.append("Best hybrid beyond L (measured; \" = \" joins ties):\n" + "\n".join(
            f"- `{t}`: {' = '.join(cfg.models[m].label for m in models)} ({pct(value)} %)"
            for t, (models, value) in best.items()))
    parts.append("Paper Table 9 (1.5B hybrid, trained at 2K; NIAH S1 / S2 / S3 at 1K/2K/4K), for reference:\n"
                 + markdown_table(["norm", "S1", "S2", "S3"], [[k, *v] for k, v in PAPER.items()]))
    parts.append(training_table([(cfg.models[m].label, r) for m, r in records.items()]))
    cells = [Cell(**{k: v for k, v in c.items() if k != "scaled_accuracy"} | {"model": cfg.models[m].label})
             for m, r in records.items() for c in r["eval"]]
    plots = [plot_results(cells, out / "out-norm.png")] if cells else []
    loss = Panel("training loss", {cfg.models[m].label: ([s for s, _ in r["train"]["losses"]],
                                                         smooth([v for _, v in r["train"]["losses"]]))
                                   for m, r in records.items()}, "step", "loss (answer tokens, smoothed)", ylog=True)
    if loss.lines:
        plots.append(plot_panels([loss], out / "out-norm-loss.png"))
    parts.append("Runs recorded:\n" + environment_lines(sessions))
    return Summary("\n\n".join(parts), [p for p in plots if p], data)


def _best_hybrid_beyond(cfg: Config, beyond: dict, tasks: list[str]) -> dict:
    """Per task: (the hybrids with the highest mean accuracy beyond L, that accuracy); ties list them all."""
    out = {}
    for t in tasks:
        scores = {h: beyond[f"{h}/{t}"] for h in cfg.hybrids if beyond.get(f"{h}/{t}") is not None}
        if scores:
            top = max(scores.values())
            out[t] = ([h for h, v in scores.items() if abs(v - top) < 1e-9], top)
    return out
