"""The paper protocol's summary from committed run records, several GPU sessions' at once, so that
docs/results.md §1's tables come from files in the repository alone.

    python -m hybridlm.studies.state_tracking_merge OUT RECORD.json [RECORD.json ...]

A record is what ``state_tracking_record`` wrote from a run folder (trimmed histories). A run that reached
its planned steps counts as finished, any other as paused at its step; where records share a run (a run
restarted in a later session), the one further along is kept. Writes OUT/summary.md (the study's tables:
best and held accuracy per model and task, every run) and its plots. The tasks are those the records hold
(every other setting is today's study.toml); runs the study does not plan under those settings are listed
and left out.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from hybridlm.studies import state_tracking, state_tracking_paper
from hybridlm.studies.config import find_study_folder, load_config


def furthest_runs(records: list[dict]) -> dict[str, dict]:
    """Run id -> its record entry, the one with the most steps where several records hold the run."""
    runs: dict[str, dict] = {}
    for record in records:
        for run_id, run in record["runs"].items():
            if run_id not in runs or run["step"] > runs[run_id]["step"]:
                runs[run_id] = run
    return runs


def record_tasks(records: list[dict]) -> list[str]:
    """The tasks the records' runs trained, in the study's order (a run id is paper-MODEL-TASK-dWIDTH-lrLR)."""
    names = "|".join(sorted(map(re.escape, state_tracking.TASKS), key=len, reverse=True))
    found = {m.group(1) for record in records for run_id in record["runs"]
             if (m := re.search(rf"-({names})-d\d+-lr", run_id))}
    return [task for task in state_tracking.TASKS if task in found]


def summarize_records(cfg, records: list[dict], out: Path):
    """The study's summary of ``records`` under ``cfg`` (protocol "paper"): paused runs are written as
    OUT/work/<run>/progress.json, which the summary reads as it reads a run in progress. Returns the
    :class:`Summary` and the ids no planned run has."""
    planned = {r.id: r for r in state_tracking_paper.runs(cfg)}
    finished, unknown = {}, []
    for run_id, run in furthest_runs(records).items():
        plan = planned.get(run_id)
        if plan is None:
            unknown.append(run_id)
            continue
        if run["step"] >= plan.steps:
            finished[run_id] = {"id": run_id, "meta": plan.meta, "history": run["history"], "best": run["best"],
                                "train": {"steps": run["step"], "losses": run["losses"]}}
        else:
            folder = out / "work" / run_id
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "progress.json").write_text(json.dumps(
                {"step": run["step"], "best": run["best"], "history": run["history"], "losses": run["losses"]}))
    return state_tracking_paper.summarize(cfg, finished, out, []), sorted(unknown)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="a new folder for summary.md and the plots")
    parser.add_argument("records", type=Path, nargs="+", help="records written by state_tracking_record")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.records if not p.is_file()]
    if missing:
        parser.error(f"no such record: {', '.join(missing)}")
    if (args.out / "work").exists():
        parser.error(f"{args.out} already holds a work/ folder: give a new folder")
    records = [json.loads(p.read_text()) for p in args.records]
    overrides = {"protocol": "paper"}
    tasks = record_tasks(records)
    if tasks:
        overrides["paper"] = {"tasks": tasks}
    cfg = load_config(find_study_folder("state-tracking"), state_tracking.Config, overrides=overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    summary, unknown = summarize_records(cfg, records, args.out)
    merged = "\n".join(f"- `{p}`: {r['device']}; " + "; ".join(f"`{c}`" for c in r["commands"])
                       for p, r in zip(args.records, records))
    text = summary.markdown + "\n\nRecords merged (the run furthest along where several hold it):\n" + merged
    if unknown:
        text += "\n\nLeft out, not planned under today's settings: " + ", ".join(unknown)
    (args.out / "summary.md").write_text(text + "\n")
    print(text)
    print(f"wrote {args.out / 'summary.md'}" + "".join(f", {p}" for p in summary.plots))


if __name__ == "__main__":
    main()
