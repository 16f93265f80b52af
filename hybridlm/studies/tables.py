"""Markdown tables and small helpers shared by the study summaries."""
from __future__ import annotations

from typing import Sequence


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[object]], align_first_left: bool = True) -> str:
    def cell(v: object) -> str:
        return "–" if v is None else str(v)

    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(":---" if i == 0 and align_first_left else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def pct(value: float | None, digits: int = 1) -> str | None:
    return None if value is None else f"{100 * value:.{digits}f}"


def mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def environment_lines(sessions: Sequence[dict]) -> str:
    """Device, date, versions and commands of the invocations that produced the results."""
    if not sessions:
        return ""
    lines = []
    for s in sessions:
        lines.append(f"- {s.get('date', '?')}: {s.get('device', '?')}, torch {s.get('torch')}, Python "
                     f"{s.get('python')}, commit {s.get('git_commit')}, {s.get('jobs')} run(s) at a time; "
                     f"`{s.get('command', '')}`")
    return "\n".join(lines)


def training_table(named: Sequence[tuple[str, dict]]) -> str:
    """Steps, wall seconds, logged ms/step and final loss of each (name, run record)."""
    rows = [[name, f"{r['train']['steps']:,}", f"{r['train']['seconds']:.0f}",
             f"{1e3 * r['train']['seconds_per_step']:.1f}" if r["train"].get("seconds_per_step") else None,
             f"{r['train']['final_loss']:.4f}"] for name, r in named]
    return ("Training (wall seconds include start-up; runs ran side by side, see the session lines):\n"
            + markdown_table(["run", "steps", "seconds", "ms/step (last logged)", "final loss"], rows))
