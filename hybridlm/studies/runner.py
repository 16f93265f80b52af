"""Run a study's runs the way the project's own commands do: train (torchtitan), export, evaluate.

Each run is what these three commands do, and they are recorded verbatim in ``results.json`` (a
run can be repeated by hand):

    hybridlm train SPEC --config RECIPE --job.dump_folder WORK/train FLAGS...
    hybridlm export WORK/train --out WORK/model
    hybridlm eval WORK/model --task ... --lengths ... --out WORK/eval --quiet --no-plot

Training runs in its own process (torchtitan wants one process group per process), several at a
time (``jobs``): tiny models leave a GPU mostly idle, waiting on kernel launches, so runs side by
side cost little more wall time than one. Export and evaluation are short and run in this
process, one at a time, through the library functions those commands call
(:func:`hybridlm.titan.export.export_checkpoint`, :func:`hybridlm.eval.run.run_eval`): studies sit
below the command line and never import it. A time budget stops new runs
from starting when the next one would not finish in time; the study then exits with status 3 and
running it again continues.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hybridlm.errors import HybridLMError
from hybridlm.eval.run import EvalRequest, run_eval
from hybridlm.studies.results import ResultStore, now, parse_train_log

LOG_TAIL_LINES = 25


@dataclass
class Run:
    """One model trained and evaluated. ``meta`` (model, task, lr, ...) is what summaries group by."""

    id: str  # unique in the study, used as a folder name
    spec: Path
    train_flags: list[str]
    eval: EvalRequest
    steps: int
    tokens_per_step: int
    meta: dict = field(default_factory=dict)
    # flags that only set how often the run is observed (evaluated, logged, saved): not in the key
    cadence_flags: tuple[str, ...] = ()

    def key(self, recipe: Path) -> str:
        """Changes whenever anything that decides the result changes."""
        pairs = zip(self.train_flags[::2], self.train_flags[1::2])
        trained = [x for flag, value in pairs if flag not in self.cadence_flags for x in (flag, value)] \
            if self.cadence_flags else self.train_flags
        material = [self.spec.read_text(), recipe.read_text(), trained, self.eval.flags(), self.meta]
        return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunFailed(Exception):
    pass


def display_path(path: Path) -> str:
    """Relative to the working folder when inside it: the recorded commands read like typed ones."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


@dataclass
class Executor:
    """Runs :class:`Run` objects for one study; writes each finished run to the store at once."""

    recipe: Path  # the study's torchtitan TOML
    work: Path  # per-run folders go here
    store: ResultStore
    jobs: int = 1
    log: Callable[[str], None] = print
    keep_checkpoints: bool = False
    _inprocess: threading.Lock = field(default_factory=threading.Lock)

    def commands(self, run: Run) -> list[list[str]]:
        work = self.work / run.id
        dump, model, evaluation = work / "train", work / "model", work / "eval"
        return [
            ["hybridlm", "train", display_path(run.spec), "--config", display_path(self.recipe),
             "--job.dump_folder", display_path(dump), *run.train_flags],
            ["hybridlm", "export", display_path(dump), "--out", display_path(model)],
            ["hybridlm", "eval", display_path(model), *run.eval.flags(), "--out", display_path(evaluation),
             "--quiet", "--no-plot"],
        ]

    def train_only(self, run: Run, slot: int = 0) -> dict:
        """Run the training command in a fresh folder; returns the parsed log plus ``seconds``."""
        work = self.work / run.id
        shutil.rmtree(work, ignore_errors=True)  # a stale checkpoint would make torchtitan resume from it
        work.mkdir(parents=True)
        train_cmd = self.commands(run)[0]
        started = time.monotonic()
        train_log = work / "train.log"
        for attempt in range(2):
            with train_log.open("w") as out:
                proc = subprocess.run([sys.executable, "-m", "hybridlm", *train_cmd[1:]], stdout=out,
                                      stderr=subprocess.STDOUT, env=self._train_env(slot))
            # Each run picks a free port for its one-process group; two runs starting together can
            # rarely pick the same one. That, and only that, is worth a second try.
            if proc.returncode == 0 or "address already in use" not in train_log.read_text(errors="replace").lower():
                break
            shutil.rmtree(work / "train", ignore_errors=True)
        seconds = time.monotonic() - started
        if proc.returncode != 0:
            raise RunFailed(f"training exited with status {proc.returncode}; {_tail(train_log)}")
        parsed = parse_train_log(train_log.read_text(errors="replace"))
        if not parsed["losses"]:
            raise RunFailed(f"training logged no step; {_tail(train_log)}")
        return {**parsed, "seconds": seconds}

    def execute(self, run: Run, slot: int = 0) -> dict:
        """Train, export and evaluate one run; returns its record (raises RunFailed)."""
        parsed = self.train_only(run, slot)
        train_seconds = parsed["seconds"]
        work = self.work / run.id
        train_cmd, export_cmd, eval_cmd = self.commands(run)
        started = time.monotonic()
        with self._inprocess:  # one export/eval at a time: they share this process's stdout and GPU
            self._logged(export_cmd, work / "export.log", lambda: self._export(work))
            if not self.keep_checkpoints:
                shutil.rmtree(work / "train" / "checkpoint", ignore_errors=True)
            self._logged(eval_cmd, work / "eval.log",
                         lambda: run_eval([str(work / "model")], run.eval, work / "eval", quiet=True, plot=False))
        cells = json.loads((work / "eval" / "results.json").read_text())["results"]
        tps = parsed["tokens_per_second"]
        return {
            "id": run.id, "key": run.key(self.recipe), "status": "done", "finished": now(), "meta": run.meta,
            "commands": [shlex.join(c) for c in (train_cmd, export_cmd, eval_cmd)],
            "train": {"steps": run.steps, "tokens_per_step": run.tokens_per_step, "seconds": round(train_seconds, 1),
                      "tokens_per_second": tps,
                      "seconds_per_step": round(run.tokens_per_step / tps, 5) if tps else None,
                      "final_loss": parsed["losses"][-1][1], "losses": parsed["losses"]},
            "eval_seconds": round(time.monotonic() - started, 1),
            "eval": cells,
        }

    def _train_env(self, slot: int) -> dict:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # Runs side by side share the CPU cores (data generation, kernel launches) evenly.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.jobs)))
        gpus = _gpu_count()
        if gpus > 1 and "CUDA_VISIBLE_DEVICES" not in os.environ:
            env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)  # spread side-by-side runs over the GPUs
        return env

    @staticmethod
    def _export(work: Path) -> None:
        from hybridlm.titan.export import export_checkpoint

        print(f"wrote {export_checkpoint(work / 'train', work / 'model')}")

    @staticmethod
    def _logged(cmd: list[str], log_path: Path, call: Callable[[], Any]) -> None:
        """Run ``call`` with its output in ``log_path``; its error becomes RunFailed naming the
        command it stands for, with the line that command would print."""
        failed = False
        with log_path.open("w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                call()
            except HybridLMError as err:
                print(f"error: {err}", file=sys.stderr)
                failed = True
        if failed:
            raise RunFailed(f"`{shlex.join(cmd)}` failed; {_tail(log_path)}")

    def record_failure(self, run: Run, err: Exception, outcome: "Outcome", lock: threading.Lock) -> None:
        """Store ``run`` as failed with its error (the message of a RunFailed, else a short traceback)."""
        message = str(err) if isinstance(err, RunFailed) else traceback.format_exc(limit=3)
        self.store.put({"id": run.id, "key": run.key(self.recipe), "status": "failed",
                        "finished": now(), "meta": run.meta, "error": message})
        with lock:
            outcome.failed.append(run.id)
        self.log(f"FAILED {run.id}: {message}")

    def run_all(self, runs: list[Run], *, deadline: float | None = None,
                estimate: Callable[[Run], float] = lambda run: 0.0) -> "Outcome":
        """Run ``runs`` with ``jobs`` at a time; none starts that would end after ``deadline`` (monotonic)."""
        outcome = Outcome()
        lock = threading.Lock()

        def work(run: Run, slot: int) -> None:
            self.log(f"start  {run.id}")
            try:
                record = self.execute(run, slot)
            except Exception as err:  # one failed run must not stop the others; it is recorded
                self.record_failure(run, err, outcome, lock)
                return
            self.store.put(record)
            with lock:
                outcome.done.append(run.id)
            t = record["train"]
            self.log(f"done   {run.id}: {t['seconds']:.0f} s training, final loss {t['final_loss']:.4f}"
                     + (f", {t['seconds_per_step'] * 1e3:.1f} ms/step" if t["seconds_per_step"] else ""))

        admit = None if deadline is None else (lambda run: time.monotonic() + estimate(run) <= deadline)
        outcome.postponed += [run.id for run in in_slots(runs, self.jobs, work, admit=admit)]
        return outcome


@dataclass
class Outcome:
    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    postponed: list[str] = field(default_factory=list)


def _tail(path: Path) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return f"last lines of {path}:\n" + "\n".join(lines[-LOG_TAIL_LINES:])


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def in_slots(items: list, jobs: int, work: Callable[[Any, int], None], *,
             admit: Callable[[Any], bool] | None = None) -> list:
    """Call ``work(item, slot)`` for every item, ``jobs`` at a time: one thread per slot, so a
    slot number names a fixed share of the machine. Once ``admit(next item)`` is False no more
    items start; returns those never started."""
    queue = list(items)
    skipped: list = []
    lock = threading.Lock()

    def worker(slot: int) -> None:
        while True:
            with lock:
                if not queue:
                    return
                if admit is not None and not admit(queue[0]):
                    skipped.extend(queue)
                    queue.clear()
                    return
                item = queue.pop(0)
            work(item, slot)

    threads = [threading.Thread(target=worker, args=(slot,), daemon=True) for slot in range(min(jobs, len(queue)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return skipped
