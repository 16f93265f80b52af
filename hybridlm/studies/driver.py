"""``hybridlm study NAME``: plan a study's runs, run what is not done yet, write tables and plots.

A study module (``hybridlm/studies/<name>.py``) provides

    NAME, Config                   its name and config class (a StudyConfig)
    plan(cfg, finished, preview=, extra_meta=)
                                   -> Plan: the runs it can define now (a sweep before the runs that
                                   use its result); ``preview`` fills such gaps with placeholders
    summarize(cfg, finished, out, sessions)
                                   -> Summary: markdown tables and PNG plots from the finished runs
    prepare(cfg, out, look_only)   (optional) -> metadata for every run, e.g. of a corpus it builds
                                   on first use (not when only listing or summarizing)
    executor_class(cfg)            (optional) -> an Executor subclass (or a factory of one) for runs
                                   that train another way; None keeps the default

The driver repeats plan -> run until every planned run is done, the time budget is spent, or a run
fails, then summarizes whatever is done (also partial results, marked as such).
"""
from __future__ import annotations

import importlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hybridlm.studies.config import StudyConfig, StudyError, find_study_folder, load_config
from hybridlm.studies.results import ResultStore, environment, now
from hybridlm.studies.runner import Executor, Run, display_path, in_slots

STUDIES = {"state-tracking": "hybridlm.studies.state_tracking", "out-norm": "hybridlm.studies.out_norm",
           "discretization": "hybridlm.studies.discretization"}
EXIT_DONE, EXIT_FAILED, EXIT_INCOMPLETE = 0, 1, 3


@dataclass
class Plan:
    runs: list[Run]
    waiting: str | None = None  # what cannot be planned until other runs finish


@dataclass
class Summary:
    markdown: str
    plots: list[Path] = field(default_factory=list)
    data: dict = field(default_factory=dict)


@dataclass
class Options:
    quick: bool = False
    out: Path | None = None
    jobs: int | None = None
    max_minutes: float | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    only: list[str] | None = None  # model names
    dry_run: bool = False
    probe_steps: int | None = None
    summarize_only: bool = False
    keep_checkpoints: bool = False


def study_module(name: str):
    if name not in STUDIES:
        raise StudyError(f"unknown study {name!r}; choose from {', '.join(STUDIES)}")
    return importlib.import_module(STUDIES[name])


def default_out(name: str, quick: bool) -> Path:
    return Path("runs/studies") / (f"{name}-quick" if quick else name)


def default_jobs(cfg: StudyConfig) -> int:
    import torch

    return cfg.jobs if torch.cuda.is_available() else cfg.cpu_jobs


def run_study(name: str, opts: Options, log: Callable[[str], None] = print) -> int:
    module = study_module(name)
    cfg = load_config(find_study_folder(name), module.Config, quick=opts.quick, overrides=opts.overrides)
    out = opts.out or default_out(name, opts.quick)
    jobs = opts.jobs or default_jobs(cfg)
    if jobs < 1:
        raise StudyError(f"--jobs must be at least 1, got {jobs}")
    # prepare() may build inputs (study 3's corpus); listing or summarizing must not.
    look_only = opts.dry_run or opts.summarize_only
    extra_meta = module.prepare(cfg, out, look_only) if hasattr(module, "prepare") else {}
    store = ResultStore(out, module.NAME, cfg.title)

    unknown = sorted(set(opts.only or []) - set(cfg.models))
    if unknown:
        raise StudyError(f"--only {','.join(unknown)}: no such model in {name} (models: {', '.join(cfg.models)})")

    def planned(preview: bool) -> Plan:
        plan = module.plan(cfg, store.finished(), preview=preview, extra_meta=extra_meta)
        if opts.only:
            plan.runs = [r for r in plan.runs if r.meta.get("model") in opts.only]
        return plan

    executor_cls = (module.executor_class(cfg) if hasattr(module, "executor_class") else None) or Executor
    executor = executor_cls(recipe=cfg.path(cfg.train_config), work=out / "work", store=store, jobs=jobs, log=log,
                            keep_checkpoints=opts.keep_checkpoints)
    if opts.summarize_only:
        return _summarize(module, cfg, store, out, log, complete=None)
    if opts.dry_run:
        return _dry_run(planned(preview=True), executor, cfg, opts.jobs or cfg.jobs, store, log)
    if opts.probe_steps:
        return _probe(planned(preview=True), executor, cfg, jobs, opts.probe_steps, log)

    store.start_session({**environment(), "jobs": jobs, "max_minutes": opts.max_minutes, "quick": opts.quick})
    deadline = time.monotonic() + 60 * opts.max_minutes if opts.max_minutes else None
    failed: list[str] = []
    postponed: list[str] = []
    waiting = None
    while True:
        plan = planned(preview=False)
        pending = [r for r in plan.runs if not store.done(r.id, r.key(executor.recipe))]
        waiting = plan.waiting
        if not pending:
            break
        log(f"{name}: {len(pending)} run(s) to do, {jobs} at a time"
            + (f", {opts.max_minutes:g} min budget" if opts.max_minutes else ""))
        outcome = executor.run_all(pending, deadline=deadline, estimate=lambda r: _estimate(r, cfg, store))
        failed += outcome.failed
        postponed += outcome.postponed
        if outcome.failed or outcome.postponed:
            break
    complete = not failed and not postponed and waiting is None
    store.end_session(ended=now(), failed=failed, postponed=postponed, complete=complete)
    status = _summarize(module, cfg, store, out, log, complete=complete)
    if failed:
        log(f"{len(failed)} run(s) failed: {', '.join(failed)} (errors in {display_path(store.path)})")
        return EXIT_FAILED
    if postponed or waiting:
        budget = f"--max-minutes {opts.max_minutes:g}" if opts.max_minutes else "this call"  # or a run's own stop
        log(f"INCOMPLETE: {len(postponed)} run(s) did not fit in {budget}" if postponed else f"INCOMPLETE: {waiting}")
        log("run the same command again to continue where this one stopped")
        return EXIT_INCOMPLETE
    return status


def _estimate(run: Run, cfg: StudyConfig, store: ResultStore) -> float:
    """Wall seconds of a run: measured on this machine when a run of the same spec finished, else planned."""
    spec = run.meta.get("spec")
    measured = [r["train"]["seconds"] / r["train"]["steps"] for r in store.finished().values()
                if r["meta"].get("spec") == spec and r.get("train")]
    if measured:
        return cfg.estimate.overhead_seconds + run.steps * max(measured)
    return cfg.estimate.run_seconds(spec or run.spec.name, run.steps)


def _summarize(module, cfg, store: ResultStore, out: Path, log, complete: bool | None) -> int:
    finished = store.finished()
    if not finished:
        log("no finished runs to summarize yet")
        return EXIT_DONE
    summary = module.summarize(cfg, finished, out, store.data.get("sessions", []))
    header = "" if complete or complete is None else "**Partial results: not every planned run has finished.**\n\n"
    text = header + summary.markdown
    (out / "summary.md").write_text(text + "\n")
    store.set("summary", summary.data)
    log(text)
    log(f"wrote {display_path(store.path)}, {display_path(out / 'summary.md')}"
        + "".join(f", {display_path(p)}" for p in summary.plots))
    return EXIT_DONE


def _dry_run(plan: Plan, executor: Executor, cfg: StudyConfig, jobs: int, store: ResultStore, log) -> int:
    total = 0.0
    for run in plan.runs:
        done = store.done(run.id, run.key(executor.recipe)) is not None
        seconds = 0.0 if done else cfg.estimate.run_seconds(run.meta.get("spec", run.spec.name), run.steps)
        total += seconds
        log(f"{run.id:40s} {run.steps:>7,} steps  {'done' if done else f'~{seconds / 60:.1f} min'}")
    log(f"{len(plan.runs)} runs; planned GPU wall time ~{total / jobs / 60:.1f} min with {jobs} at a time on one GPU "
        f"(study budget {cfg.budget_minutes:g} min; estimates from study.toml [estimate], check them with --probe)")
    if plan.runs:
        log("commands of the first run:\n  " + "\n  ".join(" ".join(c) for c in executor.commands(plan.runs[0])))
    return EXIT_DONE


def with_flag(flags: list[str], name: str, value: str) -> list[str]:
    """``flags`` with ``name`` set to ``value`` (replaced where present, else appended)."""
    out = list(flags)
    if name in out:
        out[out.index(name) + 1] = value
        return out
    return out + [name, value]


def _probe(plan: Plan, executor: Executor, cfg: StudyConfig, jobs: int, steps: int, log) -> int:
    """Train the first run of each spec for ``steps`` steps, ``jobs`` at a time, and measure ms/step
    from torchtitan's own throughput; project the whole study's wall time from that."""
    import threading

    firsts = {}
    for run in plan.runs:
        firsts.setdefault(run.meta.get("spec", run.spec.name), run)
    measured: dict[str, float] = {}
    lock = threading.Lock()

    def work(item, slot: int) -> None:
        spec, run = item
        flags = with_flag(with_flag(run.train_flags, "--training.steps", str(steps)),
                          "--metrics.log_freq", str(max(1, steps // 4)))
        flags = with_flag(flags, "--lr_scheduler.warmup_steps", "1")
        probe = Run(f"probe-{run.id}", run.spec, flags, run.eval, steps, run.tokens_per_step, run.meta)
        started = time.monotonic()
        try:
            parsed = executor.train_only(probe, slot)
        except Exception as err:  # report and go on with the other specs
            log(f"probe {spec}: FAILED {err}")
            return
        tps = parsed["tokens_per_second"]
        with lock:
            measured[spec] = run.tokens_per_step / tps if tps else float("nan")
        log(f"probe {spec:32s} {measured[spec] * 1e3:8.1f} ms/step (last logged interval), "
            f"{time.monotonic() - started:.0f} s for {steps} steps incl. start-up")

    in_slots(list(firsts.items()), jobs, work)
    total = sum(cfg.estimate.overhead_seconds + r.steps * measured.get(r.meta.get("spec", r.spec.name),
                                                                       cfg.estimate.seconds_per_step)
                for r in plan.runs)
    for run in firsts.values():  # probes leave nothing behind: results.json never saw them
        shutil.rmtree(executor.work / f"probe-{run.id}", ignore_errors=True)
    log(f"projected: {len(plan.runs)} runs, ~{total / jobs / 60:.1f} min wall with {jobs} at a time "
        f"(budget {cfg.budget_minutes:g} min); seconds per step, for study.toml [estimate] per_spec: "
        + ", ".join(f'"{s}" = {v:.4f}' for s, v in measured.items()))
    return EXIT_DONE


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.steps=3000`` -> (["train", "steps"], 3000); the value is TOML (strings in quotes)."""
    import tomllib

    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise StudyError(f"--set {text!r}: use KEY=VALUE, e.g. --set train.steps=3000 or --set 'corpus=\"dir\"'")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()  # a bare word: take it as a string
    return key.strip().split("."), parsed


def overrides_from(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out

