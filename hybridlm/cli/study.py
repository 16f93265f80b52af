"""``hybridlm study NAME``: the paper's claims at small scale, one command each (docs/results.md).

    hybridlm study state-tracking      # Table 5b: parity, modular arithmetic (lr sweep included)
    hybridlm study out-norm            # Table 9: hybrid length generalization, five norm variants
    hybridlm study discretization      # Table 8: trapezoid vs Euler vs half, on Python's stdlib text
    hybridlm study NAME --quick        # the same runs, tiny: a CPU check in about a minute
    hybridlm study NAME --dry-run      # the runs, their commands and the planned GPU time
    hybridlm study NAME --probe 60     # measure ms/step of each model on this machine, project the time
    hybridlm study NAME --max-minutes 8   # start no run that would end later; run again to continue

Exit status: 0 done, 1 a run failed, 2 bad arguments or config, 3 stopped by --max-minutes (or
waiting on runs that failed before); finished runs are kept in OUT/results.json either way.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    from hybridlm.cli.main import positive_int
    from hybridlm.studies.driver import STUDIES

    p = sub.add_parser("study", help="run a small-scale reproduction of the paper (docs/results.md)",
                       description=__doc__.split("\n\n")[0] + " Trains with `hybridlm train`, exports, evaluates "
                       "with `hybridlm eval`, writes results.json, summary.md and PNG plots.",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("name", choices=list(STUDIES), help="which study")
    p.add_argument("--quick", action="store_true", help="tiny steps and batches: a CPU check, not a result")
    p.add_argument("--out", type=Path, default=None, help="results folder (default runs/studies/NAME[-quick])")
    p.add_argument("--jobs", type=positive_int, default=None, help="training runs at a time (default: study.toml jobs "
                                                          "with a GPU, cpu_jobs without)")
    p.add_argument("--max-minutes", type=float, default=None, help="start no run that would end after this")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a study.toml value (TOML syntax), e.g. --set train.steps=3000 (repeatable)")
    p.add_argument("--only", default=None, help="comma-separated model names of study.toml: run only these")
    p.add_argument("--dry-run", action="store_true", help="list the runs, commands and planned time; run nothing")
    p.add_argument("--probe", type=int, default=None, metavar="STEPS",
                   help="train each model STEPS steps and report ms/step and the projected study time")
    p.add_argument("--summarize", action="store_true", help="only rebuild the tables and plots from results.json")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the DCP checkpoints after export")
    p.set_defaults(func=study)


def study(args: argparse.Namespace) -> int:
    import sys

    from hybridlm.errors import HybridLMError
    from hybridlm.studies.driver import Options, overrides_from, run_study

    if args.probe is not None and args.probe < 2:
        raise HybridLMError(f"--probe needs at least 2 steps, got {args.probe}")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise HybridLMError(f"--max-minutes must be positive, got {args.max_minutes:g}")
    opts = Options(quick=args.quick, out=args.out, jobs=args.jobs, max_minutes=args.max_minutes,
                   overrides=overrides_from(args.overrides),
                   only=[m.strip() for m in args.only.split(",") if m.strip()] if args.only else None,
                   dry_run=args.dry_run, probe_steps=args.probe, summarize_only=args.summarize,
                   keep_checkpoints=args.keep_checkpoints)
    return run_study(args.name, opts, log=_log_to(sys.stdout))


def _log_to(stream):
    """Print to the stream this command started with: export and eval run in-process with their
    output redirected to log files, and progress lines must not land there. One write per line, under
    a lock: runs side by side report from several threads."""
    import threading

    lock = threading.Lock()

    def log(message: str) -> None:
        with lock:
            stream.write(message + "\n")
            stream.flush()

    return log
