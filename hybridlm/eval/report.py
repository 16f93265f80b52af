"""Results as a text table, a JSON file and a PNG plot."""
from __future__ import annotations

import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from hybridlm.eval.harness import Cell, EvalModel


def _column(cell: Cell) -> str:
    return f"{cell.task}@{cell.length_label}"


def _value(cell: Cell) -> str:
    return f"{cell.perplexity:.2f}" if cell.perplexity is not None else f"{100 * cell.accuracy:.1f}"


def format_table(cells: Sequence[Cell]) -> str:
    """Rows = models, columns = task@length; accuracy in % (perplexity for ``ppl`` tasks)."""
    columns = list(dict.fromkeys(_column(c) for c in cells))
    models = list(dict.fromkeys(c.model for c in cells))
    value = {(c.model, _column(c)): _value(c) for c in cells}
    chance = {_column(c): c.chance for c in cells}
    head = ["model"] + columns
    body = [[m] + [value.get((m, col), "-") for col in columns] for m in models]
    body.append(["(chance %)"] + [f"{100 * chance[col]:.1f}" if not col.startswith("ppl") else "-"
                                  for col in columns])
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]

    def line(row: list[str]) -> str:
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), rule] + [line(r) for r in body])


def results_document(cells: Sequence[Cell], models: Sequence[EvalModel], settings: dict) -> dict:
    import torch

    return {
        "hybridlm_eval": 1,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "platform": {"python": platform.python_version(), "torch": torch.__version__,
                     "device": settings.get("device")},
        "settings": settings,
        "models": [{"name": m.name, "source": m.source, "train_seq_len": m.train_seq_len, "params": m.params,
                    "tokenizer": m.tokenizer.name} for m in models],
        "results": [c.as_dict() for c in cells],
    }


def write_json(doc: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def plot_results(cells: Sequence[Cell], path: str | Path) -> Path | None:
    """One panel per task: accuracy (or perplexity) against length, one line per model.

    Returns None, with a note on stderr, when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: no plot written: install matplotlib (pip install 'hybridlm[eval]')", file=sys.stderr)
        return None
    tasks = list(dict.fromkeys(c.task for c in cells))
    labels = list(dict.fromkeys(c.length_label for c in cells))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        task_cells = [c for c in cells if c.task == task]
        is_ppl = task_cells[0].perplexity is not None
        for model in dict.fromkeys(c.model for c in task_cells):
            points = sorted((labels.index(c.length_label), c.perplexity if is_ppl else 100 * c.accuracy)
                            for c in task_cells if c.model == model)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=model)
        if is_ppl:
            ax.set_ylabel("perplexity")
        else:
            ax.axhline(100 * task_cells[0].chance, color="grey", linestyle=":", linewidth=1, label="chance")
            ax.set_ylim(-3, 103)
            ax.set_ylabel("accuracy (%)")
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("length")
        ax.set_title(task)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="best")
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
