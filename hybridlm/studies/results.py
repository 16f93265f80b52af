"""A study's ``results.json``: every finished run, written as soon as it finishes, so a study that
stops (time budget, a killed command) continues where it left off when run again.

A run counts as done only while its ``key`` still matches: a changed spec, recipe, flag or corpus
makes it run again. The file also records each invocation (device, date, command).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

from hybridlm.studies.config import StudyError
from hybridlm.titan.progress import STEP_LINE, parse_step_line

RESULTS_FILE = "results.json"
FORMAT = 1
# torchtitan's per-step line, as `hybridlm train` prints it.


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def parse_train_log(text: str) -> dict:
    """Loss per logged step and the last logged throughput (tokens/s) of a training log."""
    losses, tps = [], None
    for match in STEP_LINE.finditer(text):
        step, loss, rate = parse_step_line(match)
        losses.append([step, loss])
        if rate is not None:
            tps = rate
    return {"losses": losses, "tokens_per_second": tps}


def environment() -> dict:
    """Where and when this ran: the facts docs/results.md must quote."""
    import torch

    if torch.cuda.is_available():
        device = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    else:
        device = f"CPU ({platform.machine()}, {os.cpu_count()} cores), no GPU"
    return {"date": now(), "device": device, "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "git_commit": git_commit(), "command": " ".join(sys.argv)}


def git_commit() -> str | None:
    """HYBRIDLM_COMMIT when set (a machine that got a copy of the working tree may hold stale git
    metadata: name the commit from where the copy was made), else git's HEAD (+ -dirty)."""
    if os.environ.get("HYBRIDLM_COMMIT"):
        return os.environ["HYBRIDLM_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           timeout=10).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


class ResultStore:
    """``results.json`` of one study folder; safe to update from several worker threads."""

    def __init__(self, folder: str | Path, study: str, title: str):
        self.path = Path(folder) / RESULTS_FILE
        self._lock = threading.Lock()
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text())
            except json.JSONDecodeError as err:
                raise StudyError(f"{self.path} is not valid JSON ({err}); move it away to start over") from None
            if self.data.get("study") != study:
                raise StudyError(f"{self.path} belongs to study {self.data.get('study')!r}, not {study!r}: "
                                 "use another --out folder")
        else:
            self.data = {"hybridlm_study": FORMAT, "study": study, "title": title, "sessions": [], "runs": {}}

    def done(self, run_id: str, key: str) -> dict | None:
        record = self.data["runs"].get(run_id)
        return record if record and record.get("status") == "done" and record.get("key") == key else None

    def finished(self) -> dict[str, dict]:
        return {rid: r for rid, r in self.data["runs"].items() if r.get("status") == "done"}

    def put(self, record: dict) -> None:
        with self._lock:
            self.data["runs"][record["id"]] = record
            self._write()

    def start_session(self, info: dict) -> None:
        with self._lock:
            self.data["sessions"].append(info)
            self._write()

    def end_session(self, **fields) -> None:
        with self._lock:
            self.data["sessions"][-1].update(fields)
            self._write()

    def set(self, key: str, value) -> None:
        with self._lock:
            self.data[key] = value
            self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(tmp, self.path)  # a killed command never leaves half a file
