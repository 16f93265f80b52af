"""A paper-protocol state-tracking run folder, trimmed to a record small enough to commit.

    python -m hybridlm.studies.state_tracking_record runs/studies/state-tracking-paper OUT.json \
        --device "NVIDIA H200 …" --command "JOBS=8 bash benchmarks/gpu/state_tracking.sh 570 official-mixer" \
        [--only official-mixer] [--every 500] [--diagnostics-every 4000]

Per run (``work/<run>/progress.json``): status, step, best, timing slices, the 100-step training
losses every ``--every`` steps, and the held-out history every ``--every`` steps plus every
evaluation whose scaled accuracy at 256 is above 0.1 (where a run learned), with the diagnostics
kept every ``--diagnostics-every`` steps; losses and history to 4 significant digits. Runs not started are left out. The run folder's
checkpoints do not travel (docs/results.md §1 keeps the records of the GPU sessions).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

LEARNED = 0.1  # scaled accuracy at 256 above which every evaluation is kept
DIGITS = 4  # significant digits a float keeps (a diagnostic is a mean over thousands of tokens)


def rounded(value):
    """``value`` with every float to DIGITS significant digits (lists and dicts walked)."""
    if isinstance(value, float):
        return float(f"{value:.{DIGITS}g}")
    if isinstance(value, list):
        return [rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return value


def trim_run(progress: dict, every: int, diagnostics_every: int) -> dict:
    history = []
    for entry in progress.get("history", []):
        step = entry["step"]
        if step % every and entry.get("scaled_accuracy@256", 0.0) <= LEARNED:
            continue
        entry = dict(entry)
        if step % diagnostics_every:
            entry.pop("diagnostics", None)
        history.append(entry)
    losses = [pair for pair in progress.get("losses", []) if pair[0] % every == 0]
    return {"status": progress.get("status"), "step": int(progress.get("step", 0)), "best": progress.get("best"),
            "slices": progress.get("slices", []), "losses": rounded(losses), "history": rounded(history)}


def as_json(record: dict) -> str:
    """The record as JSON, a line per history entry (indented numbers would triple its size)."""
    runs = ",\n".join(
        f" {json.dumps(name)}: {{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in run.items()
                                               if k != "history")
        + ', "history": [\n' + ",\n".join(f"  {json.dumps(h)}" for h in run["history"]) + "]}"
        for name, run in record["runs"].items())
    head = {k: v for k, v in record.items() if k != "runs"}
    return json.dumps(head, indent=1)[:-2] + ',\n "runs": {\n' + runs + "}\n}\n"


def trim_folder(folder: Path, only: list[str] | None, every: int, diagnostics_every: int) -> dict[str, dict]:
    runs = {}
    for path in sorted((folder / "work").glob("*/progress.json")):
        name = path.parent.name
        if only and not any(f"-{model}-" in name for model in only):
            continue
        progress = json.loads(path.read_text())
        if int(progress.get("step", 0)) > 0:
            runs[name] = trim_run(progress, every, diagnostics_every)
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the study's --out folder")
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", required=True, help="device, software and date, as the record states them")
    parser.add_argument("--command", action="append", default=[], help="a command that made the runs (repeatable)")
    parser.add_argument("--only", default=None, help="comma-separated models (run ids contain -<model>-)")
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--diagnostics-every", type=int, default=4000)
    parser.add_argument("--note", default="", help="appended to the protocol line")
    args = parser.parse_args(argv)
    if not (args.folder / "work").is_dir():
        parser.error(f"{args.folder} has no work/ folder: is it a state-tracking study's --out folder?")
    runs = trim_folder(args.folder, args.only.split(",") if args.only else None, args.every, args.diagnostics_every)
    record = {
        "device": args.device,
        "commands": args.command,
        "protocol": (f"specs/studies/state-tracking/study.toml [paper]; history every {args.every:,} steps (and where "
                     f"scaled accuracy at 256 > {LEARNED}), diagnostics every {args.diagnostics_every:,}"
                     + (f"; {args.note}" if args.note else "")),
        "runs": runs,
    }
    args.out.write_text(as_json(record))
    print(f"wrote {len(runs)} runs to {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
