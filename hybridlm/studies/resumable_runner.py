"""Runs that stop at a deadline and resume: the executor of the state-tracking paper protocol.

A paper-protocol run (4 x 10^4 steps) takes longer than one device call, so a time budget cannot
just refuse to start it (what :class:`hybridlm.studies.runner.Executor` does). Here each run is one
process of :mod:`hybridlm.studies.state_tracking_train`, ``jobs`` at a time: every process gets the
time left before the deadline, stops there with a checkpoint (status ``paused``), and the same
study command resumes it from that checkpoint next time (a changed run key starts it over).
Finished runs go to ``results.json`` and are skipped afterwards; runs never started wait in order.

The driver's ``--probe`` uses :meth:`ResumableExecutor.train_only` (a fresh run of a few steps).
"""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hybridlm.studies.results import now
from hybridlm.studies.runner import Executor, Outcome, Run, RunFailed, _tail, display_path, in_slots

TRAINER = "hybridlm.studies.state_tracking_train"


def read_progress(folder: Path) -> dict | None:
    path = folder / "progress.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None


@dataclass
class ResumableExecutor(Executor):
    stop_margin_seconds: float = 20.0  # left for the last checkpoint, the summary and copying results
    min_slice_seconds: float = 45.0  # a run is not started with less time than this before the deadline
    steps_per_call: int | None = None  # stop each run after this many steps per call (tests, short checks)

    def commands(self, run: Run) -> list[list[str]]:
        return [["python", "-m", TRAINER, "--out", display_path(self.work / run.id), "--run-key",
                 run.key(self.recipe), *run.train_flags]]

    def progress(self, run: Run) -> dict | None:
        """The run's progress.json when it belongs to this run's key."""
        progress = read_progress(self.work / run.id)
        return progress if progress and progress.get("key") == run.key(self.recipe) else None

    def _train(self, run: Run, slot: int, folder: Path, extra: list[str]) -> dict:
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", TRAINER, "--out", str(folder), "--run-key", run.key(self.recipe),
               *run.train_flags, *extra]
        env = {**self._train_env(slot), "HYBRIDLM_STUDY_JOBS": str(self.jobs)}
        # Autotuned kernels (the official module's) keep their choice on disk: a resumed run, or the
        # next of 16 runs, does not tune again.
        env.setdefault("TRITON_CACHE_AUTOTUNING", "1")
        log_path = folder / "train.log"
        with log_path.open("a") as out:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        if proc.returncode != 0:
            raise RunFailed(f"training exited with status {proc.returncode}; {_tail(log_path)}")
        progress = read_progress(folder)
        if progress is None:
            raise RunFailed(f"training wrote no progress.json; {_tail(log_path)}")
        return progress

    def train_only(self, run: Run, slot: int = 0) -> dict:
        """A fresh run to its end (the driver's --probe); returns losses, examples/s as
        ``tokens_per_second`` (``tokens_per_step`` is the batch) and ``seconds``."""
        folder = self.work / run.id
        shutil.rmtree(folder, ignore_errors=True)
        started = time.monotonic()
        self._train(run, slot, folder, [])
        result = json.loads((folder / "result.json").read_text())
        return {"losses": result["train"]["losses"], "tokens_per_second": result["train"]["tokens_per_second"],
                "seconds": time.monotonic() - started}

    def execute(self, run: Run, slot: int = 0, time_limit: float | None = None) -> dict | None:
        """Train ``run`` until it ends or ``time_limit`` seconds pass; its record when done, else None."""
        folder = self.work / run.id
        extra = [] if time_limit is None else ["--stop-at", f"{time.time() + time_limit:.0f}"]
        if self.steps_per_call:
            extra += ["--stop-after-steps", str(self.steps_per_call)]
        progress = self._train(run, slot, folder, extra)
        if progress["status"] != "done":
            return None
        result = json.loads((folder / "result.json").read_text())
        if not self.keep_checkpoints:
            (folder / "checkpoint.pt").unlink(missing_ok=True)  # best.pt stays: the weights the paper reports
        return {"id": run.id, "key": run.key(self.recipe), "status": "done", "finished": now(), "meta": run.meta,
                "commands": [shlex.join(c) for c in self.commands(run)], **result}

    def run_all(self, runs: list[Run], *, deadline: float | None = None,
                estimate: Callable[[Run], float] = lambda run: 0.0) -> Outcome:
        outcome = Outcome()
        lock = threading.Lock()
        self.log(self.plan_line(runs, deadline))

        def work(run: Run, slot: int) -> None:
            left = None if deadline is None else deadline - time.monotonic() - self.stop_margin_seconds
            if left is not None and left < self.min_slice_seconds:
                with lock:
                    outcome.postponed.append(run.id)
                return
            before = (self.progress(run) or {}).get("step", 0)
            self.log(f"start  {run.id}" + (f" (resuming at step {before:,})" if before else ""))
            try:
                record = self.execute(run, slot, left)
            except Exception as err:  # one failed run must not stop the others; it is recorded
                self.record_failure(run, err, outcome, lock)
                return
            progress = self.progress(run) or {}
            if record is None:
                with lock:
                    outcome.postponed.append(run.id)
                self.log(f"paused {run.id} at step {progress.get('step', 0):,}/{run.steps:,} (checkpoint kept)")
                return
            self.store.put(record)
            with lock:
                outcome.done.append(run.id)
            best = record["best"]
            self.log(f"done   {run.id}: best scaled accuracy {best['scaled_accuracy']:.3f} at step {best['step']:,}")

        in_slots(runs, self.jobs, work)
        return outcome

    def plan_line(self, runs: list[Run], deadline: float | None) -> str:
        """Steps left, and the wall time they take at the steps/s this study measured so far."""
        left = sum(r.steps - (self.progress(r) or {}).get("step", 0) for r in runs)
        rates = [sl["steady_steps_per_second"] for r in runs for sl in (self.progress(r) or {}).get("slices", [])
                 if sl.get("steady_steps_per_second") and sl.get("to", 0) - sl.get("from", 0) >= 100]
        line = f"{len(runs)} run(s), {left:,} steps left, {self.jobs} side by side"
        if rates:
            rate = sorted(rates)[len(rates) // 2]
            line += (f"; measured {rate:.1f} steps/s a run (median of {len(rates)} slices) -> "
                     f"~{left / rate / min(self.jobs, len(runs)) / 60:.1f} min wall")
        if deadline is not None:
            line += f"; this call stops in {max(deadline - time.monotonic(), 0) / 60:.1f} min"
        return line

